"""Regressions of the script-handoffs commit (hunt 52)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_package_imports_without_accelerate() -> None:
    """accelerate is an optional dependency (the ``scripts`` extra), but draft.py imported
    it at module level for offloaded heads: ``import self_speculation`` failed without it."""
    code = "import sys; sys.modules['accelerate'] = None; import self_speculation.draft"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_setting_digest_tells_apart_two_models_with_the_same_file_listing(
    tmp_path: Path,
) -> None:
    """setting_digest dropped a local path's name and kept only its files' names, sizes
    and times: two different models whose files match in those (unpacked from archives,
    copied with cp -a) had one key, so a sweep skipped the second model's points and
    eval.py --use_cache answered it from the first model's request cache."""
    import os

    from self_speculation.benchmarking import setting_digest

    digests = set()
    for name, weights in (("a", b"\x01" * 64), ("b", b"\x02" * 64)):
        folder = tmp_path / name
        folder.mkdir()
        for file, content in (("config.json", b"{}"), ("model.safetensors", weights)):
            (folder / file).write_bytes(content)
            os.utime(folder / file, ns=(1_700_000_000_000_000_000,) * 2)
        digests.add(setting_digest({"model": str(folder)}, {"model": str(folder)}))
    assert len(digests) == 2
    # ... while one model spelled otherwise stays one setting.
    (tmp_path / "link").symlink_to(tmp_path / "a")
    spellings = (str(tmp_path / "a"), f"{tmp_path / 'a'}/", str(tmp_path / "link"))
    assert len({setting_digest({"model": s}, {"model": s}) for s in spellings}) == 1


def test_setting_digest_of_a_model_given_by_its_real_path_is_the_earlier_versions(
    tiny_model_dir: Path,
) -> None:
    """The key of a setting whose model is given by its real path (the default model,
    DEFAULT_MODEL, is) stays what earlier versions wrote: the sweep CSV rows and eval.py
    request caches of the shipped model, made before local paths were keyed otherwise,
    are still found (dropping the path from the key measured everything again)."""
    import hashlib
    import json
    import os

    from self_speculation.benchmarking import files_fingerprint, setting_digest

    model = os.path.realpath(tiny_model_dir)
    relevant = {"model": model, "draft_adapter": None, "max_steps": 4}
    earlier = {**relevant, "model_files": files_fingerprint(model)}  # as earlier versions keyed it
    expected = hashlib.sha1(json.dumps(earlier, sort_keys=True, default=str).encode())
    digest = setting_digest(relevant, {"model": model, "draft_adapter": None})
    assert digest == expected.hexdigest()[:12]


def test_prompt_not_utf8_from_an_ascii_standard_input_names_the_byte_at_fault() -> None:
    """A line from an ASCII standard input with a byte that is not UTF-8 was left all
    escaped: the refusal named its first non-ASCII byte (0xc3 of a valid "é") rather than
    the byte at fault, and another character position than from a UTF-8 input."""
    import io

    from generate import read_prompts
    from self_speculation.errors import require_utf8

    data = "café ".encode() + b"caf\xe9\n"
    errors = []
    for encoding in ("ascii", "utf-8"):
        (prompt,) = read_prompts(io.TextIOWrapper(io.BytesIO(data), encoding=encoding))
        assert prompt.startswith("café ")
        try:
            require_utf8(prompt, "the prompt", from_bytes=True)
        except Exception as error:  # noqa: BLE001 - the message is what is compared
            errors.append(str(error))
    assert len(errors) == 2 and errors[0] == errors[1] and "0xe9" in errors[0], errors


def test_generate_speculative_streamer_into_a_stdout_without_isatty(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """A caller's standard output with write and flush only: colours_wanted allows a stream
    without isatty, but generate.py's AnswerOutput called it, and --streamer speculative
    ended in AttributeError."""
    import importlib
    import io
    import json

    generate = importlib.import_module("generate")

    class Writer:
        def __init__(self) -> None:
            self.text = io.StringIO()

        def write(self, text: str) -> int:
            return self.text.write(text)

        def flush(self) -> None:
            pass

    writer = Writer()
    monkeypatch.setattr(sys, "stdout", writer)
    argv = ["--model", str(tiny_model_dir), "--prompt", "hello", "--max_steps", "4"]
    argv += ["--sample", "False", "--streamer", "speculative", "--output_dir", str(tmp_path)]
    assert generate.main(argv) == 0
    (result,) = tmp_path.glob("generate_*.json")
    text = json.loads(result.read_text())["prompts"][0]["text"]
    assert writer.text.getvalue() == text + "\n"
