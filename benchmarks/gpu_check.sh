#!/usr/bin/env bash
# Every CUDA figure of clipsteer's speed, in one command: install, measure, JSON per figure, a summary table.
#
#   benchmarks/gpu_check.sh OUT_DIR              # on a CUDA machine (meant to finish in under 8 minutes on an H200)
#   benchmarks/gpu_check.sh --dry-run OUT_DIR    # anywhere: the same steps on the CPU with tiny models, 1-2 steps
#   CLIPSTEER_GPU_CHECK_DRY_RUN=1 benchmarks/gpu_check.sh OUT_DIR     # the same as --dry-run
#   benchmarks/gpu_check.sh --fetch-wheels DIR   # on a machine with network: the wheels a bare GPU image lacks
#                                                (for its Python, WHEEL_PYTHON, default 3.12: this workplace's H200)
#
# Figures (random weights in the published architectures; JSON files in OUT_DIR, table in OUT_DIR/summary.md):
#   vqgan_fp32.json, vqgan_bf16.json   VQGAN+CLIP iterations/s and peak memory, 512², f16-16384 + ViT-B/32, 32 cuts:
#                                      fp32; bf16 eager and bf16 --compile in one run (benchmarks/speed.py)
#   vqgan_nerdyrodent.json             the same loop against nerdyrodent's generate.py (benchmarks/competitors.py);
#                                      only with NERDYRODENT=checkout [NERDYRODENT_PYTHONPATH=its deps]
#   sd.json                            guided SD s/image at 50 steps, 512², fp16: full, x0, x0 + tiny VAE, and the
#                                      diffusers community pipeline with COMMUNITY=.../clip_guided_stable_diffusion.py
#   score_vit_b_32.json, score_vit_l_14.json   CLIP-score images/s against torchmetrics' CLIPScore
#   noise.json                         the noise backend's seconds per optimisation step, 512², SD 2.1 sizes
#
# Install: when PYTHON (default python3) cannot import clipsteer's dependencies (or CLIPSTEER_GPU_CHECK_INSTALL=1),
# a virtual environment .venv-gpu is made over PYTHON's packages (the machine's own CUDA torch is kept) and
# `pip install -e '.[test]'` runs into it from the package index; with WHEELS=DIR (a machine without network:
# make DIR with --fetch-wheels where pip works and carry it) the wheels in DIR and clipsteer are installed
# without the index or dependency resolution.
#
# Figures run in the order above, each within 4 minutes and all within CLIPSTEER_GPU_CHECK_BUDGET seconds (480);
# what does not fit is reported as skipped.
# Exit status: 0 every figure measured; 1 a figure failed (the others still run; the table says which);
# 2 usage; 3 no CUDA device here (nothing measured; use --dry-run); 4 the install failed.
set -uo pipefail
{   # the whole script is read before it runs, so editing it meanwhile cannot change a run under way
cd "$(dirname "$0")/.."

DRY=${CLIPSTEER_GPU_CHECK_DRY_RUN:-0}
FETCH=""
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --fetch-wheels) FETCH=${2:?--fetch-wheels needs a folder}; shift ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) OUT=$1 ;;
    esac
    shift
done
PY=${PYTHON:-python3}

# Packages clipsteer needs beyond what a CUDA PyTorch image holds (this workplace's H200 image: torch, torchvision,
# transformers, accelerate, torchmetrics, timm...), at the versions this checkout runs with; about 16 MB of wheels.
# imageio-ffmpeg (68 MB, only for --animation mp4) is left out.
WHEEL_PACKAGES="diffusers importlib_metadata kornia kornia_rs taming-transformers-rom1504 open_clip_torch ftfy wcwidth
omegaconf antlr4-python3-runtime"
if [ -n "$FETCH" ]; then
    mkdir -p "$FETCH"
    for name in $WHEEL_PACKAGES; do
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null) || version=""
        spec=$name${version:+==$version}
        "$PY" -m pip download -q --no-deps -d "$FETCH" "$spec" --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform any --only-binary=:all: || { echo "error: could not fetch $spec" >&2; exit 4; }
    done
    echo "wheels in $FETCH; on the GPU machine: WHEELS=$FETCH benchmarks/gpu_check.sh OUT_DIR"
    exit 0
fi
[ -n "$OUT" ] || { echo "usage: benchmarks/gpu_check.sh [--dry-run] OUT_DIR (see --help)" >&2; exit 2; }

if [ "$DRY" != 1 ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "no CUDA device here: nothing measured (exit 3). benchmarks/gpu_check.sh --dry-run OUT_DIR runs the same steps on the CPU." >&2
        exit 3
    fi
fi

# -- install ------------------------------------------------------------------------------------------------
NEEDED="import diffusers, kornia, taming, open_clip, omegaconf, transformers, torchmetrics, torchvision"
if [ "${CLIPSTEER_GPU_CHECK_INSTALL:-}" = 1 ] || ! "$PY" -c "$NEEDED" 2>/dev/null; then
    echo "installing clipsteer into .venv-gpu (over $PY's packages: the machine's own torch)" >&2
    if [ ! -x .venv-gpu/bin/python ]; then
        # A .pth file puts $PY's site-packages behind the new environment's own: also when $PY is itself a
        # virtual environment, which --system-site-packages would skip.
        "$PY" -m venv --without-pip .venv-gpu || exit 4    # pip, setuptools and wheel come from $PY
        site=$(.venv-gpu/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        "$PY" -c "import site; print('\n'.join(site.getsitepackages()))" >"$site/clipsteer-base.pth" || exit 4
    fi
    PIP=(.venv-gpu/bin/python -m pip install -q --no-build-isolation)
    if [ -n "${WHEELS:-}" ]; then   # offline: exactly these wheels, then clipsteer itself, no resolver downloads
        "${PIP[@]}" --no-index --no-deps "$WHEELS"/*.whl && "${PIP[@]}" --no-index --no-deps -e . \
            || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 4; }
    else
        "${PIP[@]}" -e '.[test]' || { echo "error: pip install -e '.[test]' failed (offline? set WHEELS, see --fetch-wheels)" >&2; exit 4; }
    fi
    PY=.venv-gpu/bin/python
    "$PY" -c "$NEEDED" || { echo "error: clipsteer's dependencies still do not import" >&2; exit 4; }
fi

# -- sizes ----------------------------------------------------------------------------------------------------
export HF_HUB_OFFLINE=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    export CLIPSTEER_BENCH_TINY=1 CLIPSTEER_COMPILE_BACKEND=${CLIPSTEER_COMPILE_BACKEND:-aot_eager}
    DEV=cpu; HALF=bf16; VQ=(--sizes 32 --warmup 1 --repeats 1); LIMIT=600
    NR=(--size 32 --steps 1 2 --repeats 1); SD=(--size 64 --steps 1 2)
    SCORE=(--images 8 --batch-size 4 --size 64 --rounds 1); NOISE=(--size 64 --iterations 2 --threads 1)
else
    DEV=cuda; HALF=fp16; VQ=(--sizes 512 --warmup 3 --repeats 10); LIMIT=240
    NR=(--size 512 --steps 5 25 --repeats 1); SD=(--size 512 --steps 2 50)
    SCORE=(--images 256 --batch-size 64 --size 256 --rounds 2); NOISE=(--size 512 --iterations 4 --threads 4)
fi
mkdir -p "$OUT" || exit 2
START=$SECONDS
BUDGET=${CLIPSTEER_GPU_CHECK_BUDGET:-$(( DRY == 1 ? 3600 : 480 ))}   # seconds for all figures together
FAILED=0

step() {   # step NAME JSON COMMAND...: one figure, within its limit and what is left of BUDGET; log beside its JSON
    local name=$1 json=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    echo "== $name ($((SECONDS - START)) s so far)" >&2
    if [ "$left" -lt 20 ]; then
        echo "   SKIPPED: the ${BUDGET} s budget is spent" >&2
        printf '{"error": "%s skipped: the %s s budget was spent"}\n' "$name" "$BUDGET" >"$OUT/$json"
        FAILED=1
        return
    fi
    if ! timeout "$(( left < LIMIT ? left : LIMIT ))" "$@" >"$OUT/${json%.json}.log" 2>&1; then
        echo "   FAILED (see $OUT/${json%.json}.log): $(tail -n 1 "$OUT/${json%.json}.log")" >&2
        [ -s "$OUT/$json" ] || printf '{"error": "%s failed; see %s"}\n' "$name" "${json%.json}.log" >"$OUT/$json"
        FAILED=1
    fi
}

step "VQGAN+CLIP fp32" vqgan_fp32.json "$PY" benchmarks/speed.py --cases vqgan --impls clipsteer --device "$DEV" \
    "${VQ[@]}" --json "$OUT/vqgan_fp32.json"
step "VQGAN+CLIP bf16, eager and compiled" vqgan_bf16.json "$PY" benchmarks/speed.py --cases vqgan \
    --impls clipsteer compiled --precision bf16 --device "$DEV" "${VQ[@]}" --json "$OUT/vqgan_bf16.json"
if [ -n "${NERDYRODENT:-}" ]; then
    step "VQGAN+CLIP vs nerdyrodent" vqgan_nerdyrodent.json "$PY" benchmarks/competitors.py vqgan \
        --nerdyrodent "$NERDYRODENT" ${NERDYRODENT_PYTHONPATH:+--pythonpath "$NERDYRODENT_PYTHONPATH"} \
        --precision bf16 --device "$DEV" "${NR[@]}" --json "$OUT/vqgan_nerdyrodent.json"
else
    echo "== VQGAN+CLIP vs nerdyrodent: skipped (set NERDYRODENT to a nerdyrodent/VQGAN-CLIP checkout)" >&2
fi
[ -n "${COMMUNITY:-}" ] || echo "== guided SD: no community pipeline row (set COMMUNITY to clip_guided_stable_diffusion.py)" >&2
step "guided SD" sd.json "$PY" benchmarks/competitors.py sd ${COMMUNITY:+--community "$COMMUNITY"} \
    --precision "$HALF" --device "$DEV" "${SD[@]}" --json "$OUT/sd.json"
step "CLIP score ViT-B/32" score_vit_b_32.json "$PY" benchmarks/score_throughput.py --arch ViT-B/32 \
    --device "$DEV" "${SCORE[@]}" --json "$OUT/score_vit_b_32.json"
step "CLIP score ViT-L/14" score_vit_l_14.json "$PY" benchmarks/score_throughput.py --arch ViT-L/14 \
    --device "$DEV" "${SCORE[@]}" --json "$OUT/score_vit_l_14.json"
step "noise backend" noise.json "$PY" benchmarks/noise_memory.py --render-steps 1 --device "$DEV" "${NOISE[@]}" \
    --json "$OUT/noise.json"

echo "== done in $((SECONDS - START)) s" >&2
"$PY" benchmarks/gpu_summary.py "$OUT" || FAILED=1
exit $FAILED
}
