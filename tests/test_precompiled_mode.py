"""Compiled passes saved to a shared LAYERSKIP_PRECOMPILED_DIR are as readable as the umask
allows, like every other file this package writes: they came out 0600 (NamedTemporaryFile),
so another user sharing the directory could not load them, compiled each pass again and
replaced the file with a 0600 one of their own."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model

from self_speculation import GenerationConfig, Generator, precompiled

pytestmark = pytest.mark.skipif(
    not precompiled.available(), reason="this torch cannot save compiled functions (torch 2.11)"
)


def test_saved_passes_follow_the_umask(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    previous = os.umask(0o022)
    try:
        generator = Generator(make_tiny_model("llama_gqa_tied", dtype=torch.float32), IdTokenizer())
        generator.generate([5, 6, 7], GenerationConfig(max_steps=4, sample=False, compile=True))
    finally:
        os.umask(previous)
    saved = sorted(tmp_path.glob("*.pt2"))
    assert saved
    assert {stat.S_IMODE(path.stat().st_mode) for path in saved} == {0o644}
