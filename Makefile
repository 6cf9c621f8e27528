# Two entry points for a fresh machine (see README):
#   make demo   - set up .venv and generate an image offline on the toy models
#   make test   - set up .venv and run the test suite (CPU, no downloads)
#   make ui     - set up .venv with the web UI and serve it on http://127.0.0.1:7860 (toy models, offline)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PROMPT ?= a yellow triangle on a purple background
ARGS   ?=

.PHONY: demo test test-all bench figures ui clean-venv

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) scripts/generate.py "$(PROMPT)" --preset toy $(ARGS)

ui: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[ui]'
	HF_HUB_OFFLINE=1 $(PY) scripts/app.py --preset toy $(ARGS)

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
