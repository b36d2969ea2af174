"""benchmarks/adapter.py measures an adapter at the draft vocabulary it was trained for.

docs/adapters.md: "exit layer, N and k come from the adapter unless given", and its
``python benchmarks/adapter.py --adapters models/smollm2-adapter-e16 --plain_exit_layers 16
--num_speculations 1 2`` gives no N. The benchmark used to default to N = 0 (the whole
49,152-token head) where every script defaults to the adapter's own N (8192 for the shipped
adapter), so that command timed a draft head six times wider than the one the adapter ships.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def test_the_default_draft_vocabulary_is_the_adapters_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPOSITORY_ROOT)
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(REPOSITORY_ROOT))
    sys.modules.pop("adapter", None)
    import adapter  # benchmarks/adapter.py

    from arguments import Arguments

    assert adapter.AdapterBenchmarkArguments().draft_vocab_sizes == [Arguments().draft_vocab_size]
    assert Arguments().draft_vocab_size == -1  # the adapter's own N, else the whole vocabulary
