"""Shared fixtures: tiny models saved to disk for the script tests."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REPOSITORY_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))
sys.path.insert(0, str(REPOSITORY_ROOT))

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the scripts run in subprocesses
# Compiled passes kept on disk (self_speculation.precompiled): this session's own directory,
# so that no test loads what an earlier session (or the user) saved.
os.environ.setdefault("LAYERSKIP_PRECOMPILED_DIR", tempfile.mkdtemp(prefix="layerskip-pc-"))

import torch  # noqa: E402
from tiny_models import save_tiny_model  # noqa: E402

# Tiny models gain nothing from threads, and OpenMP threads spinning against other
# processes on a 2-core machine can slow a test run tenfold.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread_after_each_test():
    """Scripts run in-process set torch's thread count (``--threads 2``, say). Put it back
    after each test: a child that test_bad_inputs.py forks from a pytest process whose
    OpenMP pool ran with several threads deadlocks in its first parallel region."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _root_logging_after_each_test():
    """Scripts run in-process point the root logger at the sys.stderr of their test (pytest's
    capture, closed when the test ends). A later test of the same worker that logged before
    its script configured logging wrote "--- Logging error ---" (a write to that closed
    stream) above its own output. So after each test: the handlers ``logging.basicConfig``
    added are removed (pytest keeps its own) and the root level put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):  # logging.basicConfig's; pytest's own are subclasses
        if type(handler) is logging.StreamHandler and handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-layer Llama (GQA, tied) + tokenizer in save_pretrained form, fp32."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_recommending_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_model_dir, with exit_layer=2 / num_speculations=3 in its generation config."""
    from transformers import GenerationConfig

    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-llama-rec"))
    generation_config = GenerationConfig.from_pretrained(directory)
    generation_config.exit_layer = 2
    generation_config.num_speculations = 3
    generation_config.save_pretrained(directory)
    return directory


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    """A custom_jsonl file of three prompt/response rows."""
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "def add(a, b):", "response": "\n    return a + b"},
        {"prompt": "The quick brown fox", "response": " jumps over the lazy dog."},
        {"prompt": "def sub(a, b):", "response": "\n    return a - b"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def held_folder(tmp_path: Path):
    """``tmp_path/held``, locked alone by another process, as a sweep or training run holds
    its folder (``output_dir_lock``)."""
    folder = tmp_path / "held"
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from self_speculation.output_safety import output_dir_lock\n"
            "with output_dir_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(folder),
        ],
        stdout=subprocess.PIPE, text=True, cwd=REPOSITORY_ROOT,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    yield folder
    holder.kill()
    holder.wait()
