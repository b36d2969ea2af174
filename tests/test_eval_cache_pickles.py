"""eval.py --use_cache reads only answers from lm-eval's request cache.

The cache is a SqliteDict, whose values are pickles it loaded with ``pickle.loads``: a
cache file from elsewhere ran whatever code an entry held as soon as its request came up.
An entry that names any class or callable is now a sqlite3 error (one line from eval.py:
the request cache cannot be used), running nothing.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import CachingLM, hash_args
from sqlitedict import SqliteDict
from tiny_models import save_tiny_model

from self_speculation import GenerationConfig, Generator, load_model_and_tokenizer
from self_speculation.eval_harness import LayerSkipLM


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Generator:
    directory = save_tiny_model(tmp_path_factory.mktemp("model"))
    return Generator(*load_model_and_tokenizer(str(directory), "float32", "cpu"))


def _answers(generator: Generator, cache: Path, requests: list[Instance]) -> list[str]:
    config = generator.resolve(GenerationConfig(sample=False, max_steps=4))
    lm = LayerSkipLM(generator, config, progress=False)
    try:
        return CachingLM(lm, str(cache)).generate_until(requests)
    finally:
        lm.cache_hook.dbdict.close()


def test_a_cache_entry_that_runs_code_is_refused(generator: Generator, tmp_path: Path) -> None:
    request = ("class A:", {"until": []})
    marker, cache = tmp_path / "ran", tmp_path / "cache.db"
    with SqliteDict(str(cache), autocommit=True) as stored:
        stored[hash_args("generate_until", request)] = _Payload(marker)
    with pytest.raises(sqlite3.DatabaseError, match="posix.mkdir, not an answer"):
        _answers(generator, cache, [Instance("generate_until", {}, request, 0, ("t", 0, 1))])
    assert not marker.exists(), "the request cache ran code"


def test_a_stored_answer_still_answers_the_rerun(generator: Generator, tmp_path: Path) -> None:
    request = ("def add(a, b):", {"until": []})
    instance = Instance("generate_until", {}, request, 0, ("t", 0, 1))
    first = _answers(generator, tmp_path / "cache.db", [instance])
    with SqliteDict(str(tmp_path / "cache.db")) as stored:
        assert stored[hash_args("generate_until", request)] == first[0]
    assert _answers(generator, tmp_path / "cache.db", [instance]) == first
