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

Files no process has loaded or saved for 30 days are removed whenever a pass is saved
(``prune``): every package edit, torch version and sweep setting leaves files behind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
import platform
import re
import tempfile
import time
import types
from collections import deque
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path

import torch

from self_speculation.errors import one_line
from self_speculation.model_surgery import (
    CAPTURE_HOOKS_MARK,
    global_forward_hooks,
    user_hooks,
)
from self_speculation.output_safety import readable_by_others, replaced_when_done

logger = logging.getLogger(__name__)

DIRECTORY_VARIABLE = "LAYERSKIP_PRECOMPILED_DIR"
_SAVED_NAME = re.compile(r"[a-z_]+-[0-9a-f]{32}\.pt2")  # artifact_path's names
UNUSED_DAYS = 30.0  # a saved pass no process loaded for this long is removed (``prune``)


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
    import transformers  # noqa: PLC0415

    from self_speculation.cpu_kernels import _cpu_signature  # noqa: PLC0415

    digest = hashlib.sha256()
    for module in (torch, transformers):  # a source checkout has no installed metadata
        digest.update(f"{module.__name__}={module.__version__};".encode())
    digest.update(f"python={platform.python_version()};cpu={_cpu_signature()};".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name.startswith("."):  # an editor's lock or backup file
            continue
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(f"unreadable {path.name};".encode())
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
    if isinstance(value, tuple):  # a sampled pass's warp: values of its tensors are inputs
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    if isinstance(value, int | float | bool | str | type(None)):
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
    if isinstance(value, functools.partial):  # gelu with approximate="tanh", say
        return f"partial({_stable(value.func)}, {_stable(value.args)}, {_stable(value.keywords)})"
    if callable(value) and hasattr(value, "__qualname__"):
        # A function by its code too (and what it calls): a function of the same name
        # patched in, or edited, runs other code.
        return (
            f"{getattr(value, '__module__', '')}.{value.__qualname__} "
            f"{_functions_digest(_functions_of(value))}"
        )
    if hasattr(value, "to_json_string"):  # a config
        return _config_digest(value)
    return f"{type(value).__module__}.{type(value).__qualname__}"


def global_state() -> torch._C._dynamo.guards.GlobalStateGuard:
    """torch's global state as dynamo's guards check it at every call of a compiled
    function: grad mode, autocast (each device's, with its dtype), the default dtype,
    deterministic algorithms, TF32 and reduced-precision reductions, the thread count.
    The compiled code depends on it (a pass traced under ``torch.autocast`` casts to
    bfloat16 inside its kernels); a loaded pass runs without guard checks, so it is part
    of the file's name and is checked (``check()``, under a microsecond) at each call."""
    return torch._C._dynamo.guards.GlobalStateGuard()


def artifact_path(model_digest: str, key: tuple, args: tuple, options: dict) -> Path:
    """The file of the compiled pass ``key`` called with ``args`` under the current global
    state (``global_state``)."""
    digest = hashlib.sha256()
    # Inductor's CPU kernels are built for the thread count of the process that compiled them.
    threads = f"threads={torch.get_num_threads()}"
    state = global_state().__getstate__()
    for part in (_sources_digest(), model_digest, repr(key), _stable(options), threads, state):
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
    """Whether any module of ``model`` has a hook (forward, pre-forward, state-dict...; one
    registered for every module too), or a callable of its own that carries values a file's
    name cannot describe: a ``forward`` (or other attribute) replaced by a closure, a
    ``functools.partial``, a method bound to another object or a callable object. Like a
    hook's, their values are traced into the pass (two closures of one factory have one
    name, one code and other values). transformers' output-capturing hooks do not count: they
    do nothing inside compiled passes (``capture_hooks_suspended``)."""
    if global_forward_hooks():
        return True
    for module in model.modules():
        for key, value in vars(module).items():
            hooks = user_hooks(key, value)
            if hooks is not None:
                if hooks:
                    return True
            elif key not in _MODULE_INTERNALS and _carries_values(value, module):
                return True
    return False


def _carries_values(value: object, module: torch.nn.Module) -> bool:
    """Whether ``value`` (a module's attribute) is a callable with state of its own."""
    if isinstance(value, torch.nn.Module | type) or not callable(value):
        return False
    if isinstance(value, types.MethodType):  # bound to the module itself: its own state
        return value.__self__ is not module or bool(value.__func__.__closure__)
    if isinstance(value, types.FunctionType):
        return bool(value.__closure__)
    if isinstance(value, types.BuiltinFunctionType):  # torch.tanh, math.sqrt; not tensor.mul
        return not isinstance(getattr(value, "__self__", None), types.ModuleType | type(None))
    if isinstance(value, functools.partial):  # described by its arguments when plain ones
        plain = (*value.args, *value.keywords.values())
        return _carries_values(value.func, module) or not all(
            isinstance(item, int | float | bool | str | type(None)) for item in plain
        )
    return True  # a callable object


def _functions_of(value: object) -> list:
    """The Python functions behind ``value`` (a function, method, static or class method,
    property, partial); [] for anything else."""
    if isinstance(value, types.MethodType | staticmethod | classmethod):
        return _functions_of(value.__func__)
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if f is not None]
    if isinstance(value, functools.partial):
        return _functions_of(value.func)
    if isinstance(value, types.FunctionType):
        return [value]
    return []


def _functions_digest(functions: Iterable[types.FunctionType]) -> str:
    """The code of ``functions`` and of every Python function they reach by name through
    their globals, their closures and ``__wrapped__`` (a monkeypatched method or module
    function, or an edited file other than the class's own, changes it)."""
    digest = hashlib.sha256()
    seen: set[int] = set()
    pending = deque(functions)
    while pending:
        function = pending.popleft()
        if id(function) in seen or not isinstance(function, types.FunctionType):
            continue
        if (function.__module__ or "").split(".")[0] == "torch":  # torch's version stands for it
            continue
        seen.add(id(function))
        digest.update(f"{function.__module__}.{function.__qualname__};".encode())
        _code_digest(function.__code__, digest)
        wrapped = getattr(function, "__wrapped__", None)
        if wrapped is not None:
            pending.extend(_functions_of(wrapped))
        for cell in function.__closure__ or ():
            try:
                pending.extend(_functions_of(cell.cell_contents))
            except ValueError:  # an empty cell
                continue
        scope = function.__globals__
        for name in _global_names(function.__code__):
            pending.extend(_functions_of(scope.get(name)))
    return digest.hexdigest()[:32]


def _global_names(code: types.CodeType) -> Iterable[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _code_digest(code: types.CodeType, digest: object) -> None:
    digest.update(code.co_code)
    digest.update(repr((code.co_names, code.co_varnames, code.co_freevars)).encode())
    for const in code.co_consts:
        _const_digest(const, digest)


def _const_digest(value: object, digest: object) -> None:
    if isinstance(value, types.CodeType):
        _code_digest(value, digest)
    elif isinstance(value, tuple):
        digest.update(b"(")
        for item in value:
            _const_digest(item, digest)
        digest.update(b")")
    elif isinstance(value, frozenset):  # its order follows string hashing, per process
        digest.update(("{" + ",".join(sorted(map(repr, value))) + "}").encode())
    else:
        digest.update(repr(value).encode())


def _class_digest(kind: type) -> str:
    """The code of ``kind``'s methods (its own and inherited, up to ``nn.Module``): a
    method patched into the class (``LlamaMLP.forward = ...``) leaves its source file as
    it was."""
    functions = []
    for cls in kind.__mro__:
        if cls in (torch.nn.Module, object) or cls.__module__.startswith(
            ("transformers.modeling_utils", "transformers.generation", "transformers.integrations.")
        ):
            continue
        for name in sorted(vars(cls)):
            functions.extend(_functions_of(vars(cls)[name]))
    return _functions_digest(functions)


_MODULE_INTERNALS = frozenset(
    {"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"}
    | {CAPTURE_HOOKS_MARK}
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
    classes: dict[type, str] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        kind = type(child)
        if kind not in classes:
            classes[kind] = _class_digest(kind)
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
            f"{_file_digest(source) if source else ''} {classes[kind]} {_stable(settings)}"
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


def _header(path: Path) -> bytes:
    """The first line of the file saved at ``path``: its own name (the hash of what its
    code depends on), so that a file copied or renamed onto another pass's name, which would
    load and run without a guard check, is told apart."""
    return b"layerskip-precompiled " + path.name.encode() + b"\n"


def load(path: Path) -> Callable | None:
    """The compiled pass saved at ``path``, or None (none there, or it cannot be loaded)."""
    if not path.is_file():
        return None
    try:
        with path.open("rb") as file:
            header = file.readline()
            if header != _header(path):
                raise ValueError(
                    "saved as another pass"
                    if header.startswith(b"layerskip-precompiled ")
                    else "not a compiled pass saved by this version"
                )
            compiled = torch.compiler.load_compiled_function(file)
    except Exception as error:  # a damaged or foreign file: compile again
        logger.warning("ignoring the saved compiled pass %s: %s", path.name, one_line(error, 200))
        return None
    # Its saved tensor guards refuse the cache's dynamic column dimension in a new process
    # (torch 2.13: "_has_dynamo_dim_marking ... absent at compile time"); what they would
    # check (dtypes, shapes, devices of every input) is in the file's name.
    compiled.disable_guard_check()
    with contextlib.suppress(OSError):  # used now: kept by ``prune`` for another while
        os.utime(path)
    return compiled


def prune(directory: Path, days: float = UNUSED_DAYS) -> list[Path]:
    """Remove the saved passes of ``directory`` that no process has loaded or saved for
    ``days`` days: a package edit, a new torch or a sweep's settings leave files that
    nothing loads again (3-6 MB each for the shipped model). Returns the files removed."""
    removed = []
    cutoff = time.time() - days * 86400
    for path in directory.glob("*.pt2"):
        if not _SAVED_NAME.fullmatch(path.name):  # not ours (a torch.export package, say)
            continue
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    if removed:
        logger.info("removed %d compiled passes unused for %g days", len(removed), days)
    return removed


def compile_and_save(function: Callable, options: dict, args: tuple, path: Path) -> None:
    """Compile ``function`` ahead of time for ``args`` and save it at ``path`` (written to a
    temporary file first, so that an interrupted or concurrent save never leaves a
    half-written file under that name). Raises what compiling or saving raises; a
    directory that cannot be written raises before compiling (the caller then compiles
    once, as usual, not twice)."""
    options = {
        **options,
        "options": {
            **options.get("options", {}),
            "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe,
        },
    }
    options.pop("recompile_limit", None)  # one version per file
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part"):
        pass  # the directory takes files (removed at once: a killed compile leaves none)
    compiled = torch.compile(function, **options).aot_compile((args, {}))
    with replaced_when_done(path) as temporary:
        compiled.save_compiled_function(str(temporary))
        temporary.write_bytes(_header(path) + temporary.read_bytes())
        # Others sharing the directory load it too (a 0600 file: a warning and a compile in
        # each of their processes, which then replaced it).
        readable_by_others(temporary)
    prune(path.parent)


# The sources as this process imported them: hashed lazily, at the first compile, a file
# edited since (a long sweep while the checkout is updated) named this process's passes,
# compiled from the old code, after the new sources, for later processes to load.
with contextlib.suppress(Exception):  # else it fails (and is handled) at the first compile
    _sources_digest()
