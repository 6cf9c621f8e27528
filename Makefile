# Two entry points for a fresh machine (see README):
#   make demo   - set up .venv and generate an image offline on the toy models
#   make test   - set up .venv and run the test suite (CPU, no downloads)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= a yellow triangle on a purple background
ARGS   ?=

.PHONY: demo test test-all bench figures clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) scripts/generate.py "$(PROMPT)" --preset toy $(ARGS)

test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

figures: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) scripts/make_figures.py --overwrite

bench: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) benchmarks/quality.py --overwrite --figure docs/images/quality_vs_time.png

test-all: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "slow or not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)
