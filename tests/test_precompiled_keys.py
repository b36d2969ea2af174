"""Compiled passes kept on disk (``self_speculation.precompiled``): what a file's name must
tell apart besides shapes, and files that do not belong under their name."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time

import pytest
import torch
from tiny_models import IdTokenizer, make_tiny_model
from torch._dynamo.utils import counters
from transformers.models.llama import modeling_llama

from self_speculation import GenerationConfig, Generator, precompiled

pytestmark = pytest.mark.skipif(
    not precompiled.available(), reason="this torch cannot save compiled functions (torch 2.11)"
)

PROMPTS = [[100, 101, 102, 7, 9], [3, 4]]
CONFIG = GenerationConfig(max_steps=12, sample=False, compile=True)


@pytest.fixture()
def kept_in(tmp_path, monkeypatch):
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(tmp_path / "kept"))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    return tmp_path / "kept"


def model(family: str = "llama_mha_untied"):
    return make_tiny_model(family, seed=0, dtype=torch.float32)


def token_ids(model, config: GenerationConfig = CONFIG) -> list[list[int]]:
    generator = Generator(model, IdTokenizer())
    return [r.token_ids for r in generator.generate_batch(PROMPTS, config)]


def eager(config: GenerationConfig = CONFIG) -> GenerationConfig:
    return dataclasses.replace(config, compile=False)


def test_a_method_patched_into_a_module_class_gets_its_own_file(kept_in, monkeypatch) -> None:
    """``LlamaMLP.forward = ...`` (a patching library, a notebook) leaves the class's name
    and source file as they were; the pass compiled before the patch must not serve it."""
    token_ids(model())
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: original(self, x) * 3.0)
    patched = model()
    assert token_ids(patched) == token_ids(patched, eager())


def test_forwards_replaced_by_closures_are_not_kept_on_disk(kept_in) -> None:
    """Two closures of one factory have one name and one code: like hooks, not kept."""

    def scaled(forward, factor):
        return lambda x: forward(x) * factor

    for factor in (3.0, -5.0):
        patched = model()
        for layer in patched.model.layers:
            layer.mlp.forward = scaled(layer.mlp.forward, factor)
        assert token_ids(patched) == token_ids(patched, eager())
    assert not list(kept_in.glob("*.pt2"))


def test_a_partial_activation_is_still_kept_on_disk(kept_in) -> None:
    """Gemma's activation holds ``partial(gelu, approximate="tanh")``: described by its
    arguments, so its passes are kept as before."""
    gemma = model("gemma")
    assert token_ids(gemma) == token_ids(gemma, eager())
    assert list(kept_in.glob("*.pt2"))


def test_a_file_copied_onto_another_pass_name_is_ignored(kept_in, caplog) -> None:
    """A loaded pass runs without guard checks: a file renamed (or copied) onto another
    pass's name would run the wrong code (here: 2 layers instead of 4)."""
    full = model()
    token_ids(full)
    (full_file,) = kept_in.glob("*.pt2")
    early = dataclasses.replace(CONFIG, exit_layer=2)
    token_ids(full, early)
    (early_file,) = set(kept_in.glob("*.pt2")) - {full_file}
    shutil.copy(early_file, full_file)
    with caplog.at_level(logging.WARNING):
        assert token_ids(full) == token_ids(full, eager())
    assert "saved as another pass" in caplog.text


def test_an_unwritable_directory_compiles_each_pass_once(tmp_path, monkeypatch) -> None:
    """A directory that cannot be written is found before compiling ahead of time, not
    after (which threw that compile away and compiled the pass again)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(precompiled.DIRECTORY_VARIABLE, str(blocker))
    monkeypatch.setenv("LAYERSKIP_COMPILE_BACKEND", "eager")
    graphs = counters["stats"]["unique_graphs"]
    tiny = model()
    assert token_ids(tiny) == token_ids(tiny, eager())
    assert counters["stats"]["unique_graphs"] == graphs + 1


def test_the_sources_are_hashed_as_imported(tmp_path) -> None:
    """A file of this package edited after the process imported it (before its first
    compile) must not name that process's passes (compiled from the old code) as if they
    were the new code's."""
    import subprocess
    import sys
    from pathlib import Path

    import self_speculation

    copy = tmp_path / "self_speculation"
    shutil.copytree(Path(self_speculation.__file__).parent, copy)
    digest = "from self_speculation import precompiled; print(precompiled._sources_digest())"
    edit = f"open({str(copy / 'model_surgery.py')!r}, 'a').write('# edited\\n'); "

    def run(code: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", code],
            cwd=tmp_path,
            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    imported_then_edited = run("import self_speculation; " + edit + digest)
    edited_then_imported = run(digest)
    assert imported_then_edited != edited_then_imported
    # An editor's lock file (Emacs: a dangling symlink ".#name.py") neither stops the
    # import nor changes the name.
    (copy / ".#generator.py").symlink_to("user@host.1234:1")
    assert run(digest) == edited_then_imported


def test_passes_unused_for_a_month_are_pruned_and_a_load_marks_use(tmp_path) -> None:
    month = time.time() - 31 * 86400
    stale = tmp_path / f"decode_step-{'a' * 32}.pt2"
    recent = tmp_path / f"greedy_step-{'b' * 32}.pt2"
    other = tmp_path / "notes.txt"  # not a pass: never touched
    exported = tmp_path / "exported_model.pt2"  # a user's torch.export package: not ours
    for path in (stale, recent, other, exported):
        path.write_bytes(b"x")
        os.utime(path, (month, month))
    os.utime(recent, None)
    assert precompiled.prune(tmp_path) == [stale]
    assert not stale.exists() and recent.exists() and other.exists() and exported.exists()
    # A load that fails leaves the time alone (test_precompiled: one that succeeds marks it).
    os.utime(recent, (month, month))
    assert precompiled.load(recent) is None
    assert recent.stat().st_mtime == pytest.approx(month)


def test_a_method_bound_to_another_object_is_not_kept_on_disk() -> None:
    """``module.scale = tensor.mul`` carries the tensor's values, which no name describes;
    a plain builtin function (``torch.tanh``) carries none."""
    layer = torch.nn.Linear(2, 2)
    layer.activation = torch.tanh
    assert not precompiled.has_hooks(layer)
    layer.scale = torch.ones(2).mul
    assert precompiled.has_hooks(layer)
