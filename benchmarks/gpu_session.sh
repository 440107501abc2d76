#!/usr/bin/env bash
# The GPU checks of issue 6 for a lent, offline GPU machine (torch already installed there), in two phases:
#
#   bash benchmarks/gpu_session.sh prepare   # here, with the package registries: wheels + tiny-verifier cache
#   bash benchmarks/gpu_session.sh run       # on the GPU machine; carry benchmarks/.gpu_session
#   bash benchmarks/gpu_session.sh budget    # there too, optional (~10 min): largest total_seq_len within 40 GiB
#
# `prepare` downloads, for the GPU machine's Python (GPU_PYTHON_VERSION, default 3.12), the wheels our package and
# speculators 0.9.0 need beyond what that machine has (torch, accelerate, safetensors, huggingface_hub, numpy,
# pyarrow; see ../shared/research/gpu_anchor.md), and copies the tiny verifiers the GPU tests use. `run` installs
# them with --no-deps into a folder on PYTHONPATH (both trainers then run in the one interpreter), runs the GPU tests
# (tests/gpu and the fused loss's CUDA tests in tests/test_losses.py), then `train_throughput.py --gpu` (Llama-3.1-8B
# draft shapes, both trainers, designed for < 8 min). `budget` runs `memory_budget.py --gpu` at the same shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=benchmarks/.gpu_session
PY=${PYTHON:-python3}

case "${1:-}" in
prepare)
  mkdir -p "$DIR/wheels" "$DIR/cache"
  # Pure-Python wheels; then those built per Python version, for the GPU machine's Python.
  "$PY" -m pip download --quiet --no-deps --dest "$DIR/wheels" \
    transformers==5.19.0 datasets==5.1.0 chitchat-dataset==0.9.0 \
    speculators==0.9.0 hs-connectors==0.9.0 dill==0.4.1 fsspec==2026.7.0 \
    pydantic==2.14.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 \
    typing-inspection==0.4.5 typing-extensions==4.16.0 loguru==0.7.3 openai==3.57.0 sniffio==1.3.1 \
    truststore==0.10.5 httpx2==2.16.2 httpcore2==2.16.2 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1
  "$PY" -m pip download --quiet --no-deps --dest "$DIR/wheels" --only-binary=:all: \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    pydantic-core==2.50.5 jiter==0.19.0 multiprocess==0.70.19
  # The tiny verifiers the GPU tests train on (built here once; ~1 MB).
  "$PY" -c "from speculators_hf.tiny_kit import tiny_verifier; tiny_verifier('random'); tiny_verifier('peaked')"
  cp -r "${SPECULATORS_HF_CACHE:-$HOME/.cache/speculators_hf}/." "$DIR/cache/"
  du -sh "$DIR"
  ;;
run | budget)
  SITE=/tmp/gpu_session_site
  [ -d "$SITE/speculators" ] || "$PY" -m pip install --quiet --no-deps --no-index --target "$SITE" "$DIR"/wheels/*.whl
  export PYTHONPATH="$SITE:$PWD" SPECULATORS_HF_CACHE="$PWD/$DIR/cache" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  if [ "$1" = budget ]; then
    "$PY" benchmarks/memory_budget.py --gpu --baseline-python "$PY" --work-dir /tmp/gpu_bench --timeout 240 \
      --output "${OUT:-/tmp}/memory-budget-llama8b-cuda.json"
    exit
  fi
  "$PY" -c "import torch, transformers, speculators, speculators_hf; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'speculators_hf', speculators_hf.__file__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
  "$PY" -m pytest tests/gpu tests/test_losses.py -m gpu -q -x -p no:cacheprovider || echo "GPU tests failed (continuing)"
  "$PY" benchmarks/train_throughput.py --gpu --baseline-python "$PY" --work-dir /tmp/gpu_bench \
    --output "${OUT:-/tmp}/throughput-llama8b-cuda.json"
  ;;
*)
  echo "usage: bash benchmarks/gpu_session.sh prepare|run|budget" >&2
  exit 2
  ;;
esac
