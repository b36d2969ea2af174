#!/usr/bin/env bash
# GPU checks in one command (under 5 minutes on one GPU): the GPU tests, then the engine
# benchmark on the shipped model and on a random Llama with a 1B shape (16 x 2048, bf16).
# Run from the repository root on a machine with CUDA; results land in logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p logs
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q -m gpu tests/test_engine_gpu.py tests/test_train_gpu.py 2>&1 | tail -5
python benchmarks/engine.py --device cuda --dtype bfloat16 --num_prompts 10 \
    --batch_sizes 1 8 --memory False --output logs/engine-gpu-stdlib.json 2>&1 | tail -25
python benchmarks/engine.py --device cuda --dtype bfloat16 --model random-llama-1b \
    --num_prompts 5 --max_steps 64 --exit_layer 4 --num_speculations 4 --batch_sizes 1 \
    --skip_transformers True --output logs/engine-gpu-1b.json 2>&1 | tail -20
