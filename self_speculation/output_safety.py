"""The one rule every script follows before it writes: nothing written before is changed
unless the user asked for it.

A script's output directory is refused (one line, before any work) when it

- is, or lies under, a folder shipped with the project (``models/``),
- holds a model (``config.json`` beside weights), an exit adapter (``adapter_config.json``),
- or holds files of an earlier run that this script would write again,

unless the user passes ``--overwrite True``. While a script writes, it holds a lock on the
directory (``flock`` on the directory itself, so no lock file is left behind and a run that
dies releases it): scripts that write fixed file names (train.py, train_adapter.py,
sweep.py, layer_report.py) hold it exclusively, scripts that add timestamped files
(generate.py, benchmark.py, correctness.py, eval.py) hold it shared, so two benchmarks may
share ``./logs`` but a second training run into the same folder is refused in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from self_speculation.errors import ConfigError, expand_home

try:
    import fcntl
except ImportError:  # not POSIX: no locking, the other checks still apply
    fcntl = None  # type: ignore[assignment]

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
OVERWRITE_HINT = "choose another {flag}, or pass --overwrite True to write there anyway"
# A temporary file unchanged this long, of a process that is gone, was left by a killed writer.
ABANDONED_SECONDS = 60.0


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def held_contents(directory: Path) -> str | None:
    """Why a script must not write into ``directory``, in a few words ("holds a model
    (config.json and model.safetensors)"); None when it holds no model or adapter and is no
    shipped folder."""
    resolved = Path(os.path.expanduser(directory)).resolve()
    if SHIPPED_MODELS_DIR.is_dir() and _is_under(resolved, SHIPPED_MODELS_DIR.resolve()):
        return "is a folder shipped with the project (under models/)"
    if not resolved.is_dir():
        return None
    if (resolved / "adapter_config.json").exists():
        return "holds an exit adapter (adapter_config.json)"
    if (resolved / "config.json").exists():
        weights = sorted(
            entry.name
            for entry in resolved.iterdir()
            if entry.suffix in WEIGHT_SUFFIXES and entry.name != "training_args.bin"
        )
        if weights:
            return f"holds a model (config.json and {weights[0]})"
    if any(entry.suffix.lower() == ".gguf" for entry in resolved.iterdir()):
        return "holds a model (a .gguf file)"
    return None


def _umask() -> int:
    """The process's umask, read without setting it where the system shows it (Linux): the
    os.umask pair sets 0 for a moment, in which another thread's new file would be
    writable by everyone."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_by_others(*paths: str | os.PathLike) -> None:
    """Give files the permissions the umask allows (0644 under the usual 022).

    safetensors' ``save_file`` (0.8) writes through a private temporary file, so weights come
    out 0600 whatever the umask: a model or adapter trained here would be unreadable to other
    users, unlike every other file the scripts write. A directory: its safetensors files.
    """
    mode = 0o666 & ~_umask()
    for path in map(Path, paths):
        for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
            if file.is_file() and not file.is_symlink() and (file.stat().st_mode & 0o777) != mode:
                with contextlib.suppress(OSError):  # not ours to change: leave it
                    file.chmod(mode)


def check_output_dir(
    path: str,
    flag: str = "--output_dir",
    *,
    overwrite: bool = False,
    own_files: Iterable[str] = (),
    allow: Iterable[str] = (),
) -> None:
    """Refuse, before any work, an output directory that cannot be written or that holds
    something a run would change without being asked to.

    Args:
        path: the directory as the user gave it (``~`` is expanded).
        flag: the flag that named it, for the message.
        overwrite: the user passed ``--overwrite True``: a model, adapter, shipped folder or
            earlier results there may be written over (the directory must still be usable).
        own_files: names this script writes under fixed names (``layer_report.json``): one
            that exists is an earlier run's result, refused without ``overwrite``.
        allow: what ``held_contents`` may find there without refusal, by the start of its
            description: ``"holds a model"`` for a resumed training run.

    Raises:
        ConfigError: naming the path and what is in the way.
    """
    if not path.strip():  # Path("") is the current directory: never what was meant
        raise ConfigError(f"{flag} is empty (give a folder; '.' for the current one)")
    directory = Path(expand_home(path, flag))
    for link in (directory, *directory.parents):
        if link.is_symlink() and not link.exists():
            # mkdir cannot create it: "File exists", once the model had loaded
            where = f"{flag} {path}" if link == directory else f"{flag} {path}: {link}"
            raise ConfigError(
                f"{where} is a symbolic link to {os.readlink(link)}, which does not exist "
                f"(create that folder, or choose another {flag})"
            )
        if link.exists():
            break
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory (choose another {flag})")
    for parent in directory.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(
                    f"{flag} {path}: {parent} is a file, not a directory (choose another {flag})"
                )
            if not directory.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"{flag} {path}: cannot create it, {parent} is not writable")
            break
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path} is not writable (choose another {flag})")
    if overwrite:
        return
    held = held_contents(directory)
    if held is not None and not any(held.startswith(kind) for kind in allow):
        raise ConfigError(f"{flag} {path} {held}: {OVERWRITE_HINT.format(flag=flag)}")
    earlier = sorted(name for name in own_files if (directory / name).exists())
    if earlier:
        raise ConfigError(
            f"{flag} {path} already holds {earlier[0]} from an earlier run: "
            f"{OVERWRITE_HINT.format(flag=flag)}"
        )


def _lock(directory: Path, exclusive: bool, flag: str) -> int | None:
    """Lock ``directory`` (created if missing) and return the descriptor holding the lock."""
    directory.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        return None
    descriptor = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigError(
            f"{flag} {directory} is in use by another run writing there: wait for it to "
            f"finish, or choose another {flag}"
        ) from None
    return descriptor


@contextlib.contextmanager
def output_dir_lock(
    path: str | os.PathLike, exclusive: bool = True, flag: str = "--output_dir"
) -> Iterator[Path]:
    """Hold a lock on the output directory (created if missing) while the block runs.

    Args:
        path: the directory.
        exclusive: True for a run that writes fixed file names (no other run may write
            there meanwhile); False for one that adds files of its own (other such runs
            may share the directory, an exclusive one may not).
        flag: the flag that named the directory, for the message.

    Raises:
        ConfigError: another run holds a conflicting lock.
    """
    directory = Path(expand_home(path, flag))
    if directory.exists():
        # A shared lock this process took for an earlier in-process run is not another run.
        held = _HELD.pop(directory.resolve(), None)
        if held is not None:
            os.close(held)
    descriptor = _lock(directory, exclusive, flag)
    try:
        yield directory
    finally:
        if descriptor is not None:
            os.close(descriptor)  # closing releases the lock


_HELD: dict[Path, int | None] = {}


def refuse_output_dir_in_use(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Refuse now, in one line, an existing ``path`` that another run holds alone (a sweep,
    a training run): scripts that add timestamped files take their shared lock
    (``hold_output_dir``) only where they name their files, once the model has loaded.

    Raises:
        ConfigError: as ``hold_output_dir`` would.
    """
    directory = Path(expand_home(path, flag))
    if directory.is_dir() and directory.resolve() not in _HELD:
        descriptor = _lock(directory, exclusive=False, flag=flag)
        if descriptor is not None:
            os.close(descriptor)  # a probe: the run's own lock is taken later


def hold_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """Take a shared lock on ``path`` for the rest of this process (scripts that add
    timestamped files take it where they name their files). Taken once per directory."""
    directory = Path(expand_home(path, flag))
    key = directory.resolve()
    if key not in _HELD:
        _HELD[key] = _lock(directory, exclusive=False, flag=flag)


def release_output_dirs() -> None:
    """Release every lock :func:`hold_output_dir` took (for scripts run in-process)."""
    while _HELD:
        descriptor = _HELD.popitem()[1]
        if descriptor is not None:
            os.close(descriptor)


def check_output_file(
    path: str, kind: str, legacy_keys: Iterable[str], flag: str = "--output"
) -> Path:
    """Refuse, before any work, a result file whose writing would replace something other
    than an earlier result of the same kind: a file that is not a JSON document marked
    ``"benchmark": kind`` or, unmarked (written before results were), holding every key
    of ``legacy_keys`` (``--output README.md``, a model's config.json), or any file in a
    folder shipped with the project; or whose folder cannot be made or written
    (``check_output_dir``). A benchmark's rerun replaces its own earlier result.

    Returns:
        The path, ``~`` expanded.
    """
    if not path.strip():
        raise ConfigError(f"{flag} is empty (give a .json file path)")
    target = Path(expand_home(path, flag))
    if target.is_dir():
        raise ConfigError(f"{flag} {path} is a directory (give a .json file path)")
    # A folder that cannot be made or written fails now, not when the result is written at
    # the end of the run (which then lost every figure it had measured).
    check_output_dir(str(target.parent), f"{flag}'s folder", overwrite=True)
    held = held_contents(target.parent)
    if held is not None and held.startswith("is a folder shipped"):
        raise ConfigError(f"{flag} {path}: its folder {held}; choose another {flag}")
    if target.exists():
        try:
            document = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, RecursionError, ValueError):
            document = None
        ours = isinstance(document, dict) and (
            document.get("benchmark") == kind
            or ("benchmark" not in document and set(legacy_keys) <= set(document))
        )
        if not ours:
            raise ConfigError(
                f"{flag} {path} exists and is not an earlier {kind} result; choose another "
                f"{flag}, or delete it"
            )
    return target


def temporary_beside(path: Path) -> Path:
    """A new name beside ``path`` to write ``path``'s next version to before renaming it over
    (``.<name>.<pid>.<random>.tmp``), after removing the ones writers killed outright left
    (their process gone and the file unchanged for ``ABANDONED_SECONDS``): a corpus build
    killed with SIGKILL left up to 85 MB each time."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{32}}\.tmp")
    with contextlib.suppress(OSError):
        for sibling in path.parent.iterdir():
            match = pattern.fullmatch(sibling.name)
            if match is None or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if time.time() - sibling.stat().st_mtime > ABANDONED_SECONDS:
                    sibling.unlink()
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def replaced_when_done(path: Path) -> Iterator[Path]:
    """A new temporary file name beside ``path`` (``temporary_beside``) for the block to
    write ``path``'s next version to: renamed over ``path`` when the block ends, removed if
    it fails, so that ``path`` is never half written."""
    temporary = temporary_beside(path)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, say
        return True
    return True
