#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): the GPU tests, then the engine
# benchmark in bf16 on a random Llama of Llama 3.2 1B's shape and on the shipped model, into
# logs/gpu_check/gpu_check.json and gpu_check.md, in under 8 minutes on one H200 (each part
# is stopped when its share of the time runs out; what it measured is kept).
#   bash benchmarks/gpu_check.sh                             # CUDA
#   bash benchmarks/gpu_check.sh --device cpu                # every part on a CPU
#   bash benchmarks/gpu_check.sh --device cpu --quick True   # tiny sizes, traced only (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
