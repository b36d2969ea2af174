"""Build the shipped model's training corpus: the standard library + permissive site-packages.

Writes one JSONL document per source file (``{"text": ..., "path": ...}``) for ``train.py
--data``, and a manifest (files, bytes and licence per package, read from each
distribution's metadata) that the model card quotes. The held-out files of the card's
evaluation (``HELD_OUT``, see ``benchmarks/heldout_accuracy.py``) are excluded, and so is any
file whose text equals one of them, so neither the model nor its tokenizer sees them.

Kept out: tests (``test``/``tests``/``testing`` directories), vendored copies (``_vendor``),
``encodings`` (code-page tables), files over ``--max_file_bytes`` (generated tables),
non-UTF-8 files and exact duplicates. Only distributions whose licence is permissive
(MIT, BSD, Apache-2.0, PSF) are listed in ``PACKAGES``.

Example::

    python benchmarks/build_corpus.py --output runs/corpus/train.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from arguments import run_main  # noqa: E402
from self_speculation.benchmarking import write_json_atomic  # noqa: E402
from self_speculation.errors import ConfigError, expand_home  # noqa: E402
from self_speculation.output_safety import check_output_dir, replaced_when_done  # noqa: E402

# Held-out standard-library files (relative to the standard library directory).
HELD_OUT = (
    "csv.py",
    "difflib.py",
    "fractions.py",
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "json/tool.py",
    "statistics.py",
    "textwrap.py",
)

# distribution name -> source roots under site-packages (a directory or a glob of files).
PACKAGES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy",),
    "pandas": ("pandas",),
    "scipy": ("scipy",),
    "scikit-learn": ("sklearn",),
    "networkx": ("networkx",),
    "matplotlib": ("matplotlib",),
    "sympy": ("sympy/core", "sympy/sets", "sympy/logic", "sympy/utilities"),
    "torch": (
        "torch/*.py",
        "torch/nn",
        "torch/optim",
        "torch/distributions",
        "torch/autograd",
        "torch/utils/data",
    ),
    "transformers": (
        "transformers/*.py",
        "transformers/generation",
        "transformers/utils",
        "transformers/models/llama",
        "transformers/models/gpt2",
        "transformers/models/bert",
    ),
    "huggingface_hub": ("huggingface_hub",),
    "datasets": ("datasets",),
    "accelerate": ("accelerate",),
    "pip": ("pip",),
    "setuptools": ("setuptools",),
    "pytest": ("_pytest",),
    "pygments": ("pygments",),
    "rich": ("rich",),
    "click": ("click",),
    "jinja2": ("jinja2",),
    "requests": ("requests",),
    "urllib3": ("urllib3",),
    "packaging": ("packaging",),
    "pyparsing": ("pyparsing",),
    "attrs": ("attr", "attrs"),
    "python-dateutil": ("dateutil",),
    "more-itertools": ("more_itertools",),
    "fsspec": ("fsspec",),
    "filelock": ("filelock",),
    "PyYAML": ("yaml",),
    "joblib": ("joblib",),
    "anyio": ("anyio",),
    "pydantic": ("pydantic",),
    "narwhals": ("narwhals",),
}

SKIP_DIRS = {
    "test",
    "tests",
    "testing",
    "idle_test",
    "_vendor",
    "vendored",
    "encodings",
    "site-packages",
}


def licence_of(distribution: str) -> str:
    """The distribution's licence as its metadata states it (SPDX expression when present)."""
    meta = metadata.metadata(distribution)
    expression = meta.get("License-Expression")
    if expression:
        return expression
    text = (meta.get("License") or "").strip()
    classifiers = [
        c.split("::")[-1].strip()
        for c in meta.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    if text and len(text) <= 40 and "\n" not in text:
        return text + (f" ({'; '.join(classifiers)})" if classifiers else "")
    return "; ".join(classifiers) or text.splitlines()[0]


def source_files(root: Path, spec: str) -> list[Path]:
    """``*.py`` files of ``spec`` (a directory, recursively, or a glob) under ``root``."""
    path = root / spec
    found = sorted(root.glob(spec)) if "*" in spec else sorted(path.rglob("*.py"))
    return [f for f in found if f.is_file() and f.suffix == ".py"]


def _is_earlier(path: Path, key: str) -> bool:
    """Whether ``path`` is this script's earlier output: a corpus whose first line is a
    record with "text" and "path" (``key`` "text"), or a manifest (``key`` "packages")."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.readline() if key == "text" else stream.read()
        document = json.loads(text)
    except (OSError, UnicodeDecodeError, RecursionError, ValueError):
        return False
    wanted = {"text", "path"} if key == "text" else {"packages", "total_bytes"}
    return isinstance(document, dict) and wanted <= set(document)


def check_output(path: str, overwrite: bool) -> tuple[Path, Path]:
    """The corpus and manifest paths, refused (one line, before any work) where writing
    them would replace something other than this script's earlier output.

    Raises:
        ConfigError: naming the path and what is in the way.
    """
    if not path.strip():
        raise ConfigError("--output is empty (give a .jsonl file path)")
    output = Path(expand_home(path, "--output"))
    if output.is_dir():
        raise ConfigError(f"--output {path} is a directory (give a .jsonl file path)")
    check_output_dir(str(output.parent), "--output's folder", overwrite=overwrite)
    manifest = output.with_suffix(".manifest.json")
    for target, key in ((output, "text"), (manifest, "packages")):
        if target.is_dir():
            raise ConfigError(f"--output {path}: {target} is a directory")
        if target.exists() and not overwrite and not _is_earlier(target, key):
            raise ConfigError(
                f"--output {path}: {target} exists and is not an earlier corpus "
                f"{'manifest ' if key == 'packages' else ''}of this script; choose another "
                "--output, or pass --overwrite True to replace it"
            )
    return output, manifest


def _write_corpus(
    destination: Path,
    groups: list[tuple[str, str, Path, list[Path]]],
    held_out: set[Path],
    seen: set[str],
    max_file_bytes: int,
    manifest: dict[str, dict],
) -> None:
    """Write the corpus records to ``destination``; fill ``manifest`` per package."""
    with open(destination, "x", encoding="utf-8") as sink:
        for name, licence, root, files in groups:
            kept = skipped = size = 0
            for path in files:
                relative = path.relative_to(root)
                if path in held_out or SKIP_DIRS.intersection(relative.parts[:-1]):
                    continue
                data = path.read_bytes()
                digest = hashlib.sha1(data).hexdigest()
                if len(data) > max_file_bytes or digest in seen:
                    skipped += 1
                    continue
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    skipped += 1
                    continue
                if not text.strip() or "\0" in text:
                    continue
                seen.add(digest)
                record = {"text": text, "path": f"{name}:{relative}"}
                sink.write(json.dumps(record) + "\n")
                kept += 1
                size += len(data)
            version = sys.version.split()[0] if name == "python-stdlib" else metadata.version(name)
            manifest[name] = dict(
                version=version, licence=licence, files=kept, bytes=size, skipped=skipped
            )


def _boolean(value: str) -> bool:
    if value.lower() not in ("true", "false"):
        raise ValueError(value)  # argparse: "invalid _boolean value"
    return value.lower() == "true"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/corpus/train.jsonl")
    parser.add_argument("--max_file_bytes", type=int, default=200_000)
    parser.add_argument(
        "--overwrite",
        type=_boolean,
        default=False,
        help="replace an --output that is not an earlier corpus (True/False)",
    )
    args = parser.parse_args(argv)
    output, manifest_path = check_output(args.output, args.overwrite)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    held_out = {stdlib / name for name in HELD_OUT}
    held_out_hashes = {hashlib.sha1(p.read_bytes()).hexdigest() for p in held_out}
    seen: set[str] = set(held_out_hashes)

    groups: list[tuple[str, str, Path, list[Path]]] = [
        ("python-stdlib", "PSF-2.0", stdlib, source_files(stdlib, "."))
    ]
    for distribution, specs in PACKAGES.items():
        files = [f for spec in specs for f in source_files(site, spec)]
        groups.append((distribution, licence_of(distribution), site, files))

    output.parent.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict] = {}
    # Written beside the output and renamed over it at the end: an interrupted or failed
    # build leaves the earlier corpus as it was, never half a corpus under its name.
    with replaced_when_done(output) as temporary:
        _write_corpus(temporary, groups, held_out, seen, args.max_file_bytes, manifest)
    total = sum(entry["bytes"] for entry in manifest.values())
    summary = dict(
        output=str(output), total_bytes=total, held_out=list(HELD_OUT), packages=manifest
    )
    write_json_atomic(manifest_path, summary)
    for name, entry in manifest.items():
        print(
            f"{name:18s} {entry['version']:14s} {entry['files']:5d} files {entry['bytes'] / 1e6:7.2f} MB  {entry['licence']}"
        )
    print(f"total {total / 1e6:.1f} MB -> {output}")
    return 0


if __name__ == "__main__":
    run_main(main, prog="build_corpus.py")
