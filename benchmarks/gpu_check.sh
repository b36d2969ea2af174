#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): the GPU tests, then the engine
# benchmark in bf16 on a random Llama of Llama 3.2 1B's shape and on the shipped model, into
# logs/gpu_check/gpu_check.json and gpu_check.md, in under 8 minutes on one H200 (each part
# is stopped when its share of the time runs out; what it measured is kept).
#   bash benchmarks/gpu_check.sh                             # CUDA
#   bash benchmarks/gpu_check.sh --parts big                 # one part again (tests, big, shipped)
#   bash benchmarks/gpu_check.sh --device cpu                # every part on a CPU
#   bash benchmarks/gpu_check.sh --device cpu --quick True   # tiny sizes, traced only (CI)
# Wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh: what a machine without the network lacks)
# are installed apart, in front of the interpreter's own packages, where it lacks one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
# The GPU machines reach no network: nothing may wait on a hub (the models here are local).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
if compgen -G ".whl/*.whl" > /dev/null \
  && ! GPU_CHECK_PACKAGES_ONLY=1 "$PYTHON" benchmarks/gpu_check.py; then
  site="${TMPDIR:-/tmp}/layerskip-gpu-check-site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
