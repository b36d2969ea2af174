#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu_wheels.txt into .whl/ (git-ignored) for the GPU
# machines' Python 3.12 on x86-64 Linux; carry .whl with the repository there, where
# benchmarks/gpu_check.sh installs them before it imports anything.
#   bash benchmarks/fetch_gpu_wheels.sh && ls .whl
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two stop the install there
grep -v '^#' benchmarks/gpu_wheels.txt | grep -v '^$' | while read -r requirement; do
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$requirement"
done
ls .whl
