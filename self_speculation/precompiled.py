"""Compiled passes kept on disk, so that a second process skips tracing (CPU).

A cold compile of a pass is mostly code generation and the C++ compiler, which inductor's
on-disk cache already saves; what a second process still pays is dynamo tracing the pass
again (about 6 s of 6.7 s per pass on the shipped model). torch's ahead-of-time
compilation (``torch.compile(...).aot_compile``) saves the traced and compiled pass whole;
loading it takes well under a second.

One file per compiled version: the name hashes everything the compiled code depends on
(torch, transformers and Python versions, the CPU, the thread count, this package's
sources, every module of the model and the draft adapter with its class's source, settings
and tensor layout, the configs, the pass's key and the inputs' dtypes, shapes and
devices). The weights are not in it: the pass reads them from the model it is called with.
A loaded pass runs without guard checks (torch's saved guards refuse the cache's dynamic
column dimension in a new process); the name stands for what they would check.

Anything that fails here (an older torch, a pass whose guards cannot be saved, a damaged
file) makes the caller compile as usual; nothing else changes.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import logging
import os
import platform
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch

from self_speculation.errors import one_line

logger = logging.getLogger(__name__)

DIRECTORY_VARIABLE = "LAYERSKIP_PRECOMPILED_DIR"


@cache
def available() -> bool:
    """Whether this torch can save and load compiled functions: torch 2.11 has
    ``load_compiled_function`` but its compiled functions have no ``aot_compile`` (every
    pass then hashed the model and gave up, "not kept on disk")."""
    if not (
        hasattr(torch.compiler, "load_compiled_function")
        and hasattr(torch.compiler, "keep_portable_guards_unsafe")
    ):
        return False
    return hasattr(torch.compile(_probe, backend="eager"), "aot_compile")


def _probe() -> None:
    """What ``available`` wraps in torch.compile (never called)."""


def directory() -> Path:
    """Where compiled passes are kept: LAYERSKIP_PRECOMPILED_DIR, else next to inductor's
    own cache (TORCHINDUCTOR_CACHE_DIR or its default), so that clearing one clears both."""
    chosen = os.environ.get(DIRECTORY_VARIABLE, "")
    if chosen:
        return Path(chosen)
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: PLC0415

    return Path(cache_dir()) / "layerskip-precompiled"


@cache
def _sources_digest() -> str:
    """This package's code (the passes trace it), torch's and transformers' versions, the
    Python version and the CPU (compiled kernels use its instructions)."""
    from self_speculation.cpu_kernels import _cpu_signature  # noqa: PLC0415

    digest = hashlib.sha256()
    for name in ("torch", "transformers"):
        digest.update(f"{name}={importlib.metadata.version(name)};".encode())
    digest.update(f"python={platform.python_version()};cpu={_cpu_signature()};".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@cache
def _file_digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _describe(value: object) -> str:
    """What of a pass's argument the compiled code depends on."""
    if isinstance(value, torch.Tensor):
        # Dimensions marked dynamic (a step's token buffer: its capacity) are any size.
        dynamic = getattr(value, "_dynamo_weak_dynamic_indices", set()) | getattr(
            value, "_dynamo_dynamic_indices", set()
        )
        shape = tuple("*" if dim in dynamic else size for dim, size in enumerate(value.shape))
        return f"tensor({value.dtype}, {shape}, {value.device.type})"
    if isinstance(value, int | float | bool | str | tuple | type(None)):
        return repr(value)
    layers = [pair for pair in getattr(value, "_buffers", None) or [] if pair is not None]
    if layers:  # a ColumnKVCache: its buffers' layout; the column count is dynamic
        keys, values = layers[0]
        return (
            f"cache({type(value).__name__}, {len(layers)} layers, rows {value.rows}, "
            f"{keys.dtype}, {tuple(keys.shape[1::2])}, {tuple(values.shape[1::2])}, "
            f"{keys.device.type}, {getattr(value, 'tree', None) is not None})"
        )
    return f"{type(value).__name__}:{value!r}"


def _stable(value: object) -> str:
    """``value`` described the same way in every process (no object addresses)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key!r}: {_stable(value[key])}" for key in sorted(value)) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_stable(item) for item in value) + "]"
    if isinstance(value, int | float | bool | str | type(None)):
        return repr(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if hasattr(value, "to_json_string"):  # a config
        return _config_digest(value)
    return f"{type(value).__module__}.{type(value).__qualname__}"


def artifact_path(model_digest: str, key: tuple, args: tuple, options: dict) -> Path:
    """The file of the compiled pass ``key`` called with ``args``."""
    digest = hashlib.sha256()
    # Inductor's CPU kernels are built for the thread count of the process that compiled them.
    threads = f"threads={torch.get_num_threads()}"
    for part in (_sources_digest(), model_digest, repr(key), _stable(options), threads):
        digest.update(part.encode())
    for arg in args:
        digest.update(_describe(arg).encode())
    return directory() / f"{key[0]}-{digest.hexdigest()[:32]}.pt2"


def model_digest(model: torch.nn.Module, draft: object) -> str:
    """What compiled code of ``model`` depends on besides the weights' values: every
    module's class (and its source file), settings (non-tensor attributes) and tensors'
    names, dtypes, shapes and sharing (a tied head), the configs (attention implementation
    included), and the draft exit's (adapter, vocabulary size, exit layer). Not hooks: a
    model with any is not kept on disk (``has_hooks``)."""
    parts = [_module_digest(model)]
    if draft is not None:
        adapter = getattr(draft, "adapter", None)
        vocab = getattr(draft, "vocab", None)
        parts.append(
            f"draft exit {getattr(draft, 'exit_layer', None)}, vocab "
            f"{None if vocab is None else tuple(vocab.shape)}, adapter "
            f"{_module_digest(adapter) if isinstance(adapter, torch.nn.Module) else adapter!r}"
        )
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether any module of ``model`` has a hook (forward, pre-forward, state-dict...)."""
    return any(
        value
        for module in model.modules()
        for key, value in vars(module).items()
        if key.endswith("hooks")
    )


_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"}
)


def _module_digest(module: torch.nn.Module) -> str:
    parts = []
    first_name: dict[int, str] = {}  # storage -> first tensor name (tied weights share one)
    tensors = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    for name, tensor in tensors:
        shared = first_name.setdefault(tensor.untyped_storage().data_ptr(), name)
        parts.append(f"{name}: {tensor.dtype} {tuple(tensor.shape)} {shared}")
    for name, child in module.named_modules(remove_duplicate=False):
        kind = type(child)
        source = getattr(inspect.getmodule(kind), "__file__", None)
        settings = {
            key: value
            for key, value in vars(child).items()
            if key not in _MODULE_INTERNALS
            and not key.endswith("hooks")
            and not isinstance(value, torch.Tensor)
        }
        parts.append(
            f"{name}: {kind.__module__}.{kind.__qualname__} "
            f"{_file_digest(source) if source else ''} {_stable(settings)}"
        )
    return "\n".join(parts)


def _config_digest(config: object) -> str:
    """A config in full, with the implementation choices ``to_json_string`` leaves out."""
    parts = [config.to_json_string(use_diff=False)]
    configs = [config, *(getattr(config, name) for name in getattr(config, "sub_configs", {}))]
    for each in configs:
        for name in ("_attn_implementation", "_experts_implementation"):
            parts.append(f"{name}={getattr(each, name, None)!r}")
    return "\n".join(parts)


def load(path: Path) -> Callable | None:
    """The compiled pass saved at ``path``, or None (none there, or it cannot be loaded)."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            compiled = torch.compiler.load_compiled_function(file)
    except Exception as error:  # a damaged or foreign file: compile again
        logger.warning("ignoring the saved compiled pass %s: %s", path.name, one_line(error, 200))
        return None
    # Its saved tensor guards refuse the cache's dynamic column dimension in a new process
    # (torch 2.13: "_has_dynamo_dim_marking ... absent at compile time"); what they would
    # check (dtypes, shapes, devices of every input) is in the file's name.
    compiled.disable_guard_check()
    return compiled


def compile_and_save(function: Callable, options: dict, args: tuple, path: Path) -> None:
    """Compile ``function`` ahead of time for ``args`` and save it at ``path`` (written to a
    temporary file first, so that an interrupted or concurrent save never leaves a
    half-written file under that name). Raises what compiling or saving raises."""
    options = {
        **options,
        "options": {
            **options.get("options", {}),
            "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe,
        },
    }
    options.pop("recompile_limit", None)  # one version per file
    compiled = torch.compile(function, **options).aot_compile((args, {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, suffix=".part") as file:
        temporary = Path(file.name)
    try:
        compiled.save_compiled_function(str(temporary))
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
