"""The engine's forward passes over a ``ColumnKVCache``, eager or compiled.

Three passes serve every strategy (LayerSkip §5; E = exit layer, L = layers):

* ``prefill``: the prompts through layers [0, end), eager (its shape changes per prompt).
* ``early``: one token per row through layers [0, end) + head. A draft is ``early`` with
  end = E; an autoregressive step is ``early`` with end = L (or E for early-exit decoding).
* ``verify``: the last draft through layers [0, E), then the pending token and the drafts,
  from their exit-layer states, through layers [E, L) in one pass + head.

Greedy steps without logits processors run whole in one call: ``greedy_step`` (k greedy
drafts, ``verify`` and acceptance); with their token write and bookkeeping included
(``bookkeeping``), ``decode_step`` (an autoregressive step: ``early`` and argmax) and
``counted_greedy_step`` (``greedy_step`` with the write and the books), the steps the
generator runs.

Shapes never depend on the step: ``verify`` always takes k + 1 positions (when fewer
drafts were made, the missing ones are zero states at columns past the real ones, whose
outputs are ignored and whose cache columns are rewritten before anything reads them), and
the cache's column count is a dynamic dimension. So a compiled pass compiles once per
(batch size, exit layer, k) and never again during generation.

With ``compile=True`` each pass is ``torch.compile``d (inductor, whole graph); on CPU with
the C++ wrapper and the few-row product kernel, on CUDA with CUDA graphs
(``mode="reduce-overhead"``; the cache buffers are static addresses, see ``kv_cache``).

When compiling is impossible (no C++ compiler, a graph break in a model family that
``fullgraph`` refuses, a compiler error), the passes fall back to eager decoding with one
warning that names the reason; the tokens are the same, only slower.
``LAYERSKIP_COMPILE_BACKEND=eager`` (or ``aot_eager``) traces the passes with dynamo but
runs them without inductor: a check that they compile whole, in seconds (tests, CI).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import inspect
import itertools
import logging
import os
import re
import shutil
import threading
import time
import types
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from self_speculation import precompiled
from self_speculation.attention import sdpa_configs, use_few_query_attention
from self_speculation.bookkeeping import appended, settle
from self_speculation.cpu_kernels import FewRowProducts, load_few_row_kernel
from self_speculation.draft import DraftExit, cache_layers
from self_speculation.kv_cache import BufferPool, ColumnKVCache
from self_speculation.model_surgery import LayerwiseModel, layer_regions
from self_speculation.sampling import (
    compared,
    draw,
    finite_or_uniform,
    greedy_accept,
    kept_tokens,
    non_finite,
    speculative_accept,
    warp_inputs,
    warp_key,
    warped,
)
from self_speculation.trees import TokenTree, TreeColumns, tree_accept

logger = logging.getLogger(__name__)

COMPILE_BACKEND_VARIABLE = "LAYERSKIP_COMPILE_BACKEND"
# "0" switches off keeping compiled passes on disk (``precompiled``).
PRECOMPILE_VARIABLE = "LAYERSKIP_PRECOMPILE"
# Compiled versions of one pass: every (exit layer, batch size, k) of every model is one,
# and dynamo's default limit (8) would send a sweep back to eager code. Set on our
# functions only (torch.compile's recompile_limit), not for the whole process.
RECOMPILE_LIMIT = 1024
# Compiles again of one pass in a row (call after call), for inputs it was compiled for,
# after which a hooked model's passes decode eagerly: its hooks' values change at every
# call (``ForwardPasses._timed``).
HOOKED_RECOMPILES = 3


def compile_backend() -> str:
    """The backend the passes compile with: inductor unless LAYERSKIP_COMPILE_BACKEND says."""
    return os.environ.get(COMPILE_BACKEND_VARIABLE, "") or "inductor"


def missing_compiler(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for ``device`` on this machine (no C++ compiler on
    CPU; no C compiler for Triton's launcher on CUDA), or None."""
    if compile_backend() != "inductor":
        return None
    if device.type == "cuda":
        names = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
        kind = "C compiler (Triton builds its CUDA launcher with one)"
    else:
        names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        kind = "C++ compiler"
    if any(name and shutil.which(name) for name in names):
        return None
    return f"no {kind} found (install g++, or set CXX/CC)"


def unwritable_compile_cache() -> str | None:
    """Why inductor could not keep what it compiles, or None: its cache folder
    (``TORCHINDUCTOR_CACHE_DIR``) exists but is not writable (a read-only mount, warm or
    not). Compiling there failed only after minutes, at its lock files."""
    if compile_backend() != "inductor":
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # noqa: PLC0415
    except ImportError:  # another torch's layout
        return None
    # As torch's cache_dir() finds it, without its side effects (it sets the variable).
    folder = os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())
    if not os.path.isdir(folder) or os.access(folder, os.W_OK | os.X_OK):
        return None
    return (
        f"inductor's cache folder {folder} is not writable (set TORCHINDUCTOR_CACHE_DIR to a "
        "writable folder)"
    )


def _cuda_graphs_in_this_thread() -> None:
    """Give this thread CUDA-graph trees of its own where torch does not (torch < 2.13 keeps
    them for the thread that imported ``cudagraph_trees`` alone: a compiled pass first called
    from another thread, a server's worker say, failed a bare assertion in
    ``cudagraph_trees.get_obj``). What torch 2.13 does for each new thread."""
    try:
        from torch._inductor import cudagraph_trees as trees  # noqa: PLC0415

        if hasattr(trees, "_initialize_tls") or hasattr(trees.local, "tree_manager_containers"):
            return
        if torch._C._is_key_in_tls("tree_manager_containers"):
            return
        trees.local.tree_manager_containers = {}
        trees.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    except (ImportError, AttributeError):  # another torch's internals: leave them to it
        return


def _recompile_limit() -> dict:
    """``recompile_limit=RECOMPILE_LIMIT`` where torch.compile takes it (torch >= 2.13: it
    then holds for our functions only); on older torch, dynamo's process-wide limit is
    raised to it instead (torch < 2.7 names it ``cache_size_limit``)."""
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return {"recompile_limit": RECOMPILE_LIMIT}
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    accumulated = f"accumulated_{limit}"
    setattr(config, limit, max(getattr(config, limit), RECOMPILE_LIMIT))
    setattr(config, accumulated, max(getattr(config, accumulated), 4 * RECOMPILE_LIMIT))
    return {}


@functools.cache
def _inductor_config() -> object:
    from torch._inductor import config

    return config


def _without_freezing() -> contextlib.AbstractContextManager:
    """Inductor's weight freezing off for our calls where the environment turns it on
    (TORCHINDUCTOR_FREEZING=1): dynamo then bakes static inputs into the graph as
    constants, the pooled cache buffers included, so that a cache of another capacity
    indexed out of bounds. (The engine never asks for freezing: measured slower.)"""
    config = _inductor_config()
    if not config.freezing:
        return _NOTHING
    return config.patch(freezing=False)


_NOTHING = contextlib.nullcontext()


def compile_options(device: torch.device, module_guards: bool = False) -> dict:
    """``torch.compile`` arguments for the engine's passes on ``device``.

    Guards: a compiled version is chosen by the guards that tell versions apart (ints such
    as the exit layer, the inputs' shapes and dtypes, and which ``ForwardPasses`` called:
    ``ForwardPasses.instance``). Guards on the model's modules and weights are dropped
    (``skip_guard_on_all_nn_modules_unsafe``): re-checking them costs about 0.75 ms per call
    on the shipped model on a (loaded) 2-core CPU, against 0.23 ms for all the others, and
    the passes never change a model. The instance guard keeps one model's compiled code
    from serving another model of the same shapes but another structure.

    ``module_guards``: keep them (a hooked model's passes): the filter drops every guard
    read through a module, those on a hook's values too, and the passes decoded with the
    values of their first call (a steering hook's scale set later changed no token); kept,
    a changed value compiles again.
    """
    common = {"fullgraph": True, "dynamic": False, **_recompile_limit()}
    guards = {} if module_guards else dict(_guard_filter())
    backend = compile_backend()
    if backend != "inductor":
        return {**common, "backend": backend, "options": guards}
    if device.type == "cuda":
        # CUDA graphs: what mode="reduce-overhead" turns on (torch takes a mode or options,
        # not both, and the guard filter goes in the options).
        return {**common, "options": {**guards, "triton.cudagraphs": True}}
    # CPU: no CUDA graphs. A one-token step is a chain of matrix-vector products bound by
    # reading weights; inductor's decomposition of an [1, n] x [n, m] product into a fused
    # multiply-and-sum reads them about 1.4x faster than the BLAS call. (Measured slower
    # here: weight freezing with MKL-packed weights, decomposing multi-token products.)
    # Verification's k + 1 rows (and batches of up to 8 rows) go to the few-row kernel,
    # which reads each weight once for all rows (BLAS: 2-4x a one-row product); so do
    # one-row products with large weights (cpu_kernels.ONE_ROW_MIN_WEIGHTS).
    options = {**guards, "post_grad_fusion_options": {"decompose_mm_pass": {}}}
    if not layer_regions():
        # Each decoder layer unrolled: the C++ wrapper calls the kernels without Python in
        # between (~6 ms per step of Python wrapper overhead on the shipped model
        # otherwise). It cannot call a layer traced once (LAYERSKIP_LAYER_REGIONS=1,
        # model_surgery's _layer_region): those passes call their kernels from Python.
        options["cpp_wrapper"] = True
        import torch._inductor.config as inductor_config  # noqa: PLC0415 (loads inductor)

        if hasattr(inductor_config, "cpp_wrapper_build_separate"):
            # Kernels and the C++ wrapper in two files, the wrapper built at -O1: a cold
            # compile of the shipped model's greedy step took 78.5 s against 116.0 s in one
            # -O3 file (g++ 27 s against 65 s), at the same decoding speed.
            options["cpp_wrapper_build_separate"] = True
    if load_few_row_kernel():
        options["post_grad_custom_pre_pass"] = FewRowProducts()
    return {**common, "options": options}


def fast_path_measured() -> bool:
    """Whether the installed torch is one the fast path's speed was measured on (>= 2.8,
    where torch.compile takes a guard filter): ``--compile auto`` uses it there only."""
    return hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")


@functools.cache
def _guard_filter() -> dict:
    """The guard filter option where torch.compile takes one (torch >= 2.8); older torch
    keeps the guards on modules and weights (the same code, about 0.75 ms more per call),
    said once."""
    if not fast_path_measured():
        logger.warning(
            "fast path: torch %s has no guard filter (torch >= 2.8); compiled calls also "
            "check the model's modules (slower)",
            torch.__version__,
        )
        return {}
    return {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def _compiled(function: Callable, options: dict) -> Callable:
    """``torch.compile(function, **options)`` with options of its own: torch.compile takes
    ``guard_filter_fn`` out of the ``options`` dict it is given, so passes sharing one dict
    would leave every pass but the first without the guard filter."""
    return torch.compile(
        _with_own_code(function), **{**options, "options": dict(options.get("options", {}))}
    )


def _with_own_code(method: Callable) -> Callable:
    """``method`` (a bound method) over a copy of its code object. Dynamo keeps compiled
    versions on the code object of the function it compiles: shared by every
    ``ForwardPasses``, they outlived their passes (a Generator dropped, passes rebuilt after
    the model changed), each held its compiled code (on CUDA, its CUDA graphs), and all of
    them counted toward one recompile limit, past which a compile failed
    (``FailOnRecompileLimitHit``). A code object of its own per instance goes with it."""
    function = method.__func__
    copy = types.FunctionType(
        function.__code__.replace(),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        function.__closure__,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    _OWN_CODES.setdefault(method.__self__, []).append(copy.__code__)
    return types.MethodType(copy, method.__self__)


# ForwardPasses -> the code objects of its compiled passes (``_with_own_code``), until its
# constructor hands them to the finalizer that forgets their compiled versions.
_OWN_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached_backends() -> dict:
    """dynamo's backend wrappers by id, one per torch.compile call ({} in a torch without)."""
    return getattr(torch._dynamo.eval_frame, "cached_backends", {})


def _forget_compiled(codes: list[types.CodeType], backends: list[int] = ()) -> None:
    """Drop the compiled versions dynamo keeps on ``codes`` (a dead ForwardPasses': nothing
    else runs them) and the backend wrappers its torch.compile calls left in dynamo's
    ``cached_backends`` (ids). They would otherwise stay, with whatever they hold, for good:
    dynamo's cache entries are not garbage-collected with their code object."""
    remove = getattr(torch._dynamo.eval_frame, "remove_from_cache", None)  # a torch without it:
    for code in codes if remove is not None else ():  # the versions stay, as before
        remove(code)
    cached = _cached_backends()
    for key in backends:
        cached.pop(key, None)


_INSTANCES = itertools.count()
# ForwardPasses -> pass key -> its compiled version kept on disk (``precompiled``), called
# with the ForwardPasses first (it keeps no reference to it, so entries go with their
# ForwardPasses). Not an attribute: saving a compiled pass pickles what it reads from its
# ForwardPasses, and a loaded compiled function cannot be pickled.
_PRECOMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# ... as a list of (global state it was compiled under, the pass or None: not kept, called
# through torch.compile's dispatch) per key; _NOT_TRIED: none for the current state yet.
_NOT_TRIED = object()


class ForwardPasses:
    """Prefill, early (draft / decode) and verify passes of one model.

    Args:
        model: the layer-wise view of the model.
        compile: compile ``early`` and ``verify`` with ``torch.compile``.
        draft: how drafts leave layer E (an exit adapter, a reduced draft vocabulary);
            None: layer E's states go to the model's own final norm + head. It serves
            every pass that ends below the last layer.
    """

    def __init__(
        self, model: LayerwiseModel, compile: bool = False, draft: DraftExit | None = None
    ) -> None:
        self.model = model
        self.draft = draft
        self.compiled = compile
        # Which ForwardPasses this is: the compiled passes guard on it (compile_options).
        self.instance = next(_INSTANCES)
        # Seconds spent in calls that compiled something (first call of each shape).
        self.compile_seconds = 0.0
        # Set to {} to time the calls that compile nothing: pass key ("early" / "verify" /
        # "greedy_drafts", end layer, batch, ...) -> [seconds, calls]. Benchmarks use it to
        # say where a step's time goes (on CUDA each timed call synchronises).
        self.pass_seconds: dict[tuple, list] | None = None
        self._seen: set[tuple] = set()
        for name in _PASS_NAMES:  # self._early = self._early_eager, ... (compiled below)
            setattr(self, f"_{name}", getattr(self, f"_{name}_eager"))
        self._tree_tensors: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self._warps: dict[tuple, tuple] = {}  # _warp_inputs
        self._attention_configs: list = []
        # Compiled passes keep their cache buffers from one generation to the next, at
        # fixed addresses (CUDA graphs replay on them).
        self._pool: BufferPool | None = None
        self._compiles = 0  # compiles so far (for the expected time of the next one)
        # CPU: compiled passes saved to / loaded from disk (``precompiled``), per key
        # (in _PRECOMPILED), each called directly with these passes as its first argument.
        self._keep_on_disk = False
        self._options: dict = {}
        self._model_digest: str | None = None
        self._loaded: set[tuple] = set()  # keys whose compiled pass came from disk
        # A hooked model's passes keep their guards on the modules: compiles again in a row
        # of a pass already compiled, per key (HOOKED_RECOMPILES).
        self._hooked = False
        self._recompiles: collections.Counter = collections.Counter()
        # Why compiling was given up (the passes then run eagerly), or None.
        self.fallback_reason: str | None = None
        self._removed: set[Path] = set()  # damaged files removed from inductor's cache
        if compile:
            reason = missing_compiler(model.device) or unwritable_compile_cache()
            if reason is not None:
                self._fall_back(reason)
                return
            self._pool = BufferPool()
            # A hook runs inside the pass, and what it does (a closure's values, a callable
            # object's attributes) is read through the model's modules.
            hooked = precompiled.has_hooks(model.model) or bool(
                draft and draft.adapter and precompiled.has_hooks(draft.adapter)
            )
            # A hooked model's passes check its modules at each call (about 0.75 ms more),
            # so that a hook's changed value compiles again.
            options = compile_options(model.device, module_guards=hooked)
            self._options = options
            self._hooked = hooked
            self._keep_on_disk = (
                model.device.type == "cpu"
                and precompiled.available()
                and os.environ.get(PRECOMPILE_VARIABLE, "") != "0"
                # Nor is what a hook does something a file's name can carry (nor do passes
                # kept on disk check guards): such passes are compiled per process.
                and not hooked
                # torch 2.13 saves passes holding layer regions with inductor only (the eager
                # backend cannot save them, aot_eager's do not load back).
                and (compile_backend() == "inductor" or not layer_regions())
            )
            if model.device.type == "cpu" and compile_backend() == "inductor":
                # Compiled CPU calls use the grouped few-query attention (attention.py).
                self._attention_configs = sdpa_configs(model.model)
            known = set(_cached_backends())
            for name in _PASS_NAMES:
                setattr(self, f"_{name}", _compiled(getattr(self, f"_{name}_eager"), options))
            # torch.compile keeps each call's backend wrapper for good (dynamo's
            # ``cached_backends``, emptied by torch._dynamo.reset() only): ours are forgotten
            # with the passes too, so that Generators made and dropped leave none behind.
            backends = [key for key in _cached_backends() if key not in known]
            # Their compiled versions go when these passes go (``_with_own_code``).
            weakref.finalize(self, _forget_compiled, list(_OWN_CODES.pop(self, ())), backends)

    def _fall_back(self, reason: str) -> None:
        """Decode eagerly from now on (same tokens), after one warning naming ``reason``."""
        logger.warning("fast path off, decoding eagerly: %s", reason)
        self.fallback_reason = reason
        self.compiled = False
        _PRECOMPILED.pop(self, None)
        for name in _PASS_NAMES:
            setattr(self, f"_{name}", getattr(self, f"_{name}_eager"))
        self._attention_configs = []

    def _timed(self, key: tuple, function: Callable, *args) -> object:
        """Call ``function``; a first call of a new compiled shape counts as compile time.

        A compile that fails (a graph break ``fullgraph`` refuses, a compiler error)
        switches these passes to eager decoding with one warning (``_fall_back``). A call
        of a compiled shape whose inputs differ from the compiled ones in what the guards
        check (another dtype, say) compiles again: dynamo's graph counter tells.
        """
        if not self.compiled:
            return self._counted(key, function, *args)
        first = key not in self._seen
        if first:
            logger.info(
                "compiling the %s pass (%s): %s",
                key[0],
                ", ".join(
                    f"{name} {value}" for name, value in zip(_KEY_NAMES.get(key[0], ()), key[1:])
                ),
                self._expected_compile_time(),
            )
        if self.model.device.type == "cuda":
            _cuda_graphs_in_this_thread()
        graphs = counters["stats"]["unique_graphs"]
        started = time.perf_counter()
        try:
            with use_few_query_attention(self._attention_configs), _without_freezing():
                saved = _NOT_TRIED
                if not first and self._keep_on_disk:
                    # A kept pass runs without guard checks: its global state is checked
                    # here (autocast, the default dtype... ``precompiled.global_state``).
                    kept = _PRECOMPILED.get(self, {}).get(key, ())
                    saved = next((pass_ for state, pass_ in kept if state.check()), _NOT_TRIED)
                elif not first:
                    saved = None
                if saved is not _NOT_TRIED:
                    call = function if saved is None else partial(saved, self)
                    result = self._counted(key, call, *args)
                else:
                    result = self._first_call(key, function, args)
                    if self.model.device.type == "cuda":
                        torch.cuda.synchronize(self.model.device)
        except _COMPILE_FAILURES as error:
            damaged = _damaged_compiled_file(error)
            if damaged is not None and damaged not in self._removed:
                logger.warning(
                    "compiling the %s pass: %s in inductor's cache is damaged (left by an "
                    "interrupted compile?); removed, compiling again",
                    key[0],
                    damaged,
                )
                self._removed.add(damaged)
                damaged.unlink(missing_ok=True)
                return self._timed(key, function, *args)
            self._fall_back(f"compiling the {key[0]} pass failed: {_first_line(error)}")
            return self._counted(key, getattr(self, f"_{key[0]}_eager"), *args)
        elapsed = time.perf_counter() - started
        # A pass loaded or compiled for a global state first seen now (under torch.autocast,
        # say) traces no graph in torch.compile's counter: its time is compiling too.
        new_state = not first and saved is _NOT_TRIED
        if first or new_state or counters["stats"]["unique_graphs"] != graphs:
            self.compile_seconds += elapsed
            self._compiles += 1
            self._seen.add(key)
            logger.info(
                "%s the %s pass%s in %.1f s",
                "loaded" if key in self._loaded else "compiled",
                key[0],
                "" if first else " again, for inputs unlike the compiled ones",
                elapsed,
            )
            if not first and self._hooked:
                self._recompiles[key] += 1
                if self._recompiles[key] >= HOOKED_RECOMPILES:
                    # A hook that keeps state (counts calls, appends what it sees) changes
                    # what its compiled code read at every call: a compile per call, each
                    # seconds long. Eager code runs the hooks as written.
                    self._fall_back(
                        f"the {key[0]} pass compiled again at every call: a hook on the "
                        "model changes its own values (a counter, a list it appends to)"
                    )
        else:  # a value changed once (a steering hook's scale) recompiled once: not counted
            self._recompiles.pop(key, None)
        return self._compiled_result(result, args)

    def _first_call(self, key: tuple, function: Callable, args: tuple) -> object:
        """The first call of a compiled pass: through the version kept on disk when there is
        one (loaded, or compiled ahead of time, saved and loaded back), else through
        ``function`` (torch.compile's dispatch)."""
        if not self._keep_on_disk:
            return function(*args)
        kept_versions = _PRECOMPILED.setdefault(self, {}).setdefault(key, [])
        # An earlier first call under this state that never finished (interrupted) left
        # its placeholder, which would shadow what this one keeps.
        kept_versions[:] = [(state, kept) for state, kept in kept_versions if not state.check()]
        state = precompiled.global_state()
        index = len(kept_versions)
        kept_versions.append((state, None))  # until kept below: torch.compile's dispatch
        try:
            if self._model_digest is None:
                self._model_digest = precompiled.model_digest(self.model.model, self.draft)
            path = precompiled.artifact_path(self._model_digest, key, args, self._options)
            kept = self._kept_on_disk(key, args, path)
        except Exception as error:  # a disk, hashing or saving failure: compile as usual
            logger.info("not kept on disk (%s): %s", key[0], _first_line(error))
            return function(*args)
        try:
            result = kept(self, *args)
        except Exception as error:  # a saved pass that does not fit: not kept
            loaded = key in self._loaded
            self._loaded.discard(key)
            path.unlink(missing_ok=True)
            logger.warning(
                "the saved %s pass does not fit, compiling it%s: %s",
                key[0],
                " again" if loaded else " as usual",
                _first_line(error),
            )
            # A file from an earlier process is compiled again and saved in its place
            # (else every later process would load it and compile anyway).
            if loaded:
                del kept_versions[index]
                return self._first_call(key, function, args)
            return function(*args)
        kept_versions[index] = (state, kept)
        return result

    def _kept_on_disk(self, key: tuple, args: tuple, path: Path) -> Callable:
        """The pass ``key`` as kept on disk for ``args`` at ``path``: loaded, or compiled
        ahead of time, saved and loaded back (the loaded copy holds no reference to these
        passes and runs as it will in a later process). Called with these passes as its
        first argument."""
        kept = precompiled.load(path)
        if kept is None:
            unbound = getattr(type(self), f"_{key[0]}_eager")
            precompiled.compile_and_save(unbound, self._options, (self, *args), path)
            kept = precompiled.load(path)
            if kept is None:
                raise RuntimeError(f"the saved pass could not be loaded back from {path}")
        else:
            logger.info("loading the compiled %s pass from %s", key[0], path)
            self._loaded.add(key)
        return kept

    def _expected_compile_time(self) -> str:
        if self._compiles:
            return f"about {self.compile_seconds / self._compiles:.0f} s, as the ones before"
        if compile_backend() != "inductor":
            return f"{compile_backend()} backend, seconds"
        if self.model.device.type == "cuda":
            return "typically 20 s to 2 min (once per shape; CUDA graphs are captured after)"
        return "typically 20 s to 3 min on a CPU (once per shape; cached on disk after)"

    def _compiled_result(self, result: object, args: tuple) -> object:
        """On CUDA, copies of a compiled pass's outputs: CUDA graphs write every replay's
        outputs to the same memory, and drafts outlive the next draft's call."""
        for arg in args:
            if isinstance(arg, ColumnKVCache):
                arg.write_columns = None  # a graph output; nothing reads it after the call
                arg.tree = None
        if self.model.device.type != "cuda":
            return result
        if isinstance(result, tuple):
            return tuple(item.clone() for item in result)
        return result.clone()

    # The keys of the compiled passes (one compiled version each). Strategies build them
    # here too, to ask whether a batch size is compiled (``ready``).
    @staticmethod
    def early_key(end: int, batch: int) -> tuple:
        return ("early", end, batch)

    @staticmethod
    def greedy_drafts_key(exit_layer: int, batch: int, count: int) -> tuple:
        return ("greedy_drafts", exit_layer, batch, count)

    @staticmethod
    def verify_key(exit_layer: int, batch: int, positions: int) -> tuple:
        return ("verify", exit_layer, batch, positions)

    @staticmethod
    def greedy_step_key(exit_layer: int, batch: int, count: int) -> tuple:
        return ("greedy_step", exit_layer, batch, count)

    @staticmethod
    def decode_step_key(end: int, batch: int) -> tuple:
        return ("decode_step", end, batch)

    @staticmethod
    def counted_greedy_step_key(exit_layer: int, batch: int, count: int) -> tuple:
        return ("counted_greedy_step", exit_layer, batch, count)

    @staticmethod
    def tree_step_key(
        exit_layer: int, batch: int, branching: tuple[int, ...], warp: tuple | None = None
    ) -> tuple:
        """A tree step's key; ``warp`` (temperature, top_k, top_p) when it samples."""
        greedy = ("tree_step", exit_layer, batch, branching)
        return greedy if warp is None else (*greedy, warp_key(warp))

    @staticmethod
    def counted_tree_step_key(
        exit_layer: int, batch: int, branching: tuple[int, ...], warp: tuple | None = None
    ) -> tuple:
        return (
            "counted_tree_step",
            *ForwardPasses.tree_step_key(exit_layer, batch, branching, warp)[1:],
        )

    # Sampled passes: which warpers apply and top-k's size are compiled into them, so they
    # are part of the key (a pass kept on disk runs without dynamo's guards); the
    # temperature's and top-p's values are inputs (``sampling.warp_key``).
    @staticmethod
    def sampled_decode_step_key(end: int, batch: int, warp: tuple) -> tuple:
        return ("sampled_decode_step", end, batch, warp_key(warp))

    @staticmethod
    def sampled_step_key(exit_layer: int, batch: int, count: int, warp: tuple) -> tuple:
        return ("sampled_step", exit_layer, batch, count, warp_key(warp))

    @staticmethod
    def counted_sampled_step_key(exit_layer: int, batch: int, count: int, warp: tuple) -> tuple:
        return ("counted_sampled_step", exit_layer, batch, count, warp_key(warp))

    def _warp_inputs(self, warp: tuple | None) -> tuple | None:
        """``warp`` as the sampled passes take it: compiled, with the temperature and top-p
        as tensor inputs (``sampling.warp_inputs``, made once per value); eager, as is."""
        if warp is None or not self.compiled:
            return warp
        inputs = self._warps.get(warp)
        if inputs is None:
            inputs = self._warps[warp] = warp_inputs(warp, self.model.device)
        return inputs

    def ready(self, keys: list[tuple]) -> bool:
        """Whether calls with these keys run without compiling (always, when eager)."""
        return not self.compiled or all(key in self._seen for key in keys)

    def _counted(self, key: tuple, function: Callable, *args) -> object:
        if self.pass_seconds is None:
            return function(*args)
        started = time.perf_counter()
        result = function(*args)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        totals = self.pass_seconds.setdefault(key, [0.0, 0])
        totals[0] += time.perf_counter() - started
        totals[1] += 1
        return result

    def new_cache(self, batch_size: int, capacity: int) -> ColumnKVCache:
        layers = cache_layers(self.model, self.draft)
        return ColumnKVCache(layers, batch_size, capacity, dynamic=self.compiled, pool=self._pool)

    def _exit_logits(
        self,
        hidden: torch.Tensor,
        end: int,
        cache: ColumnKVCache,
        positions: torch.Tensor,
        pad_counts: torch.Tensor,
    ) -> torch.Tensor:
        """Logits [batch, n, vocab] of states [batch, n, hidden] leaving layer ``end - 1``:
        the full model's head at the last layer, the draft exit below it (which writes the
        adapter's cache columns)."""
        if end == self.model.num_layers or self.draft is None:
            return self.model.unembed(hidden)
        return self.draft.logits(hidden, cache, positions, pad_counts)

    def _adapter_columns(
        self,
        hidden: torch.Tensor,
        cache: ColumnKVCache,
        positions: torch.Tensor,
        pad_counts: torch.Tensor,
    ) -> None:
        """Write the adapter's cache columns for states that leave layer E but are not drafted
        from (the prompt under self-speculation, the last draft)."""
        if self.draft is not None and self.draft.adapter is not None:
            self.draft.adapt(hidden, cache, positions, pad_counts)

    @torch.no_grad()
    def prefill(
        self,
        tokens: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        end: int,
    ) -> torch.Tensor:
        """Left-padded prompts [batch, width] through layers [0, end) + head.

        Returns:
            Logits at the last column [batch, vocab].
        """
        columns = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        cache.write_columns = columns  # [batch, width]
        positions = (columns - pad_counts[:, None]).clamp_min(0)  # [batch, width]
        hidden = self.model.embed(tokens)
        split = self.draft.exit_layer if self.draft is not None else None
        if split is not None and split < end:  # the adapter reads layer E's states
            hidden = self.model.run_layers(hidden, 0, split, cache, positions, pad_counts)
            self._adapter_columns(hidden, cache, positions, pad_counts)
            hidden = self.model.run_layers(hidden, split, end, cache, positions, pad_counts)
        else:
            hidden = self.model.run_layers(hidden, 0, end, cache, positions, pad_counts)
        if end < self.model.num_layers and self.draft is not None:
            # Early-exit decoding: the first token comes from the draft exit too. The
            # adapter fills its cache columns for every prompt position; the head scores
            # only the last one.
            adapted = self.draft.adapt(hidden, cache, positions, pad_counts)
            return self.draft.head(adapted[:, -1:])[:, 0]
        return self.model.unembed(hidden[:, -1:])[:, 0]

    def _early_eager(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._first_layers(tokens, columns, cache, pad_counts, end)  # [batch, 1, hidden]
        positions = columns - pad_counts[:, None]
        return self._exit_logits(hidden, end, cache, positions, pad_counts)[:, 0], hidden

    def _guard_on_instance(self) -> None:
        """Makes dynamo guard on which ``ForwardPasses`` calls (compile_options: the module
        guards are dropped, so that without it one model's compiled pass served another
        model of the same shapes). Every compiled pass must call it."""
        if self.instance < 0:  # never
            raise AssertionError("ForwardPasses.instance must be >= 0")

    def _first_layers(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        end: int,
    ) -> torch.Tensor:
        """Tokens [batch, n] written at ``columns`` [batch, n] through layers [0, end)."""
        self._guard_on_instance()
        cache.write_columns = columns
        return self.model.run_layers(
            self.model.embed(tokens), 0, end, cache, columns - pad_counts[:, None], pad_counts
        )  # [batch, n, hidden]

    @torch.no_grad()
    def early(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        end: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [batch, 1] at ``columns`` [batch, 1] through layers [0, end) + head.

        Returns:
            Logits [batch, vocab] and the hidden states leaving layer end - 1
            [batch, 1, hidden] (a draft's exit-layer state).
        """
        key = self.early_key(end, tokens.shape[0])
        return self._timed(key, self._early, tokens, columns, cache, pad_counts, end)

    def _greedy_drafts_eager(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        drafts, states = [], []
        for i in range(count):
            logits, hidden = self._early_eager(tokens, columns + i, cache, pad_counts, exit_layer)
            tokens = compared(logits).argmax(dim=-1, keepdim=True)  # [batch, 1]
            drafts.append(tokens)
            states.append(hidden)
        return torch.cat(drafts, dim=1), torch.cat(states, dim=1)

    @torch.no_grad()
    def greedy_drafts(
        self,
        tokens: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` greedy drafts in one call: ``early`` through layers [0, E), each draft
        the argmax of the previous one's logits (no logits processors).

        One compiled call instead of ``count``: on a CPU each call of a compiled pass
        costs about a millisecond outside its kernels, as much as a draft's own layers.

        Args:
            tokens: the pending token of each row, [batch, 1].
            columns: its column, [batch, 1]; draft i goes to ``columns + i``.

        Returns:
            Draft tokens [batch, count] and their exit-layer states [batch, count, hidden].
        """
        key = self.greedy_drafts_key(exit_layer, tokens.shape[0], count)
        return self._timed(
            key, self._greedy_drafts, tokens, columns, cache, pad_counts, exit_layer, count
        )

    def _verify_eager(
        self,
        last_tokens: torch.Tensor,
        exit_states: torch.Tensor,
        num_drafts: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
    ) -> torch.Tensor:
        last_column = columns.gather(1, num_drafts.expand(len(columns), 1))  # [batch, 1]
        last_state = self._first_layers(last_tokens, last_column, cache, pad_counts, exit_layer)
        self._adapter_columns(last_state, cache, last_column - pad_counts[:, None], pad_counts)
        states = exit_states.index_copy(1, num_drafts, last_state)  # [batch, k + 1, hidden]
        cache.write_columns = columns
        states = self.model.run_layers(
            states,
            exit_layer,
            self.model.num_layers,
            cache,
            columns - pad_counts[:, None],
            pad_counts,
        )
        return self.model.unembed(states)  # [batch, k + 1, vocab]

    @torch.no_grad()
    def verify(
        self,
        last_tokens: torch.Tensor,
        exit_states: torch.Tensor,
        num_drafts: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
    ) -> torch.Tensor:
        """Verification of one self-speculative step.

        Args:
            last_tokens: the last draft of each row, [batch, 1]; it goes through layers
                [0, E) first (every earlier draft already did, while being drafted).
            exit_states: exit-layer states of the pending token and the earlier drafts,
                zero past them, [batch, k + 1, hidden].
            num_drafts: how many drafts were made (<= k), a [1] long tensor; the last
                draft's state goes to index ``num_drafts``.
            columns: columns of the k + 1 positions, [batch, k + 1].
            cache, pad_counts: the cache and each row's left padding [batch].
            exit_layer: E.

        Returns:
            Full-model logits at the k + 1 positions, [batch, k + 1, vocab].
        """
        key = self.verify_key(exit_layer, *exit_states.shape[:2])
        return self._timed(
            key,
            self._verify,
            last_tokens,
            exit_states,
            num_drafts,
            columns,
            cache,
            pad_counts,
            exit_layer,
        )

    def _greedy_step_eager(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.arange(count + 1, device=lengths.device)
        columns = lengths[:, None] - 1 + positions  # [batch, k + 1]
        drafts, states = self._greedy_drafts_eager(
            pending, columns[:, :1], cache, pad_counts, exit_layer, count
        )  # [batch, k], [batch, k, hidden]
        logits, draft_tokens = self._verified(
            drafts, states, made, columns, cache, pad_counts, exit_layer
        )
        accepted_counts, next_tokens = greedy_accept(draft_tokens, compared(logits).argmax(dim=-1))
        return (
            kept_tokens(draft_tokens, accepted_counts, next_tokens),
            accepted_counts,
            draft_tokens,
            non_finite(logits),  # [batch, k + 1]
        )

    def _verified(
        self,
        drafts: torch.Tensor,
        states: torch.Tensor,
        made: torch.Tensor,
        columns: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Verification of the first ``made`` of ``drafts`` [batch, k], whose exit-layer
        states are ``states`` [batch, k, hidden]: the full model's logits at the k + 1
        positions [batch, k + 1, vocab], and the drafts with -1 past ``made`` [batch, k]."""
        drafted = torch.arange(drafts.shape[1], device=drafts.device) < made  # [k]
        # Exit-layer states of the pending token and the drafts but the last, zero past them.
        exit_states = torch.nn.functional.pad(
            torch.where(drafted[None, :, None], states, 0), (0, 0, 0, 1)
        )  # [batch, k + 1, hidden]
        last_tokens = drafts.gather(1, (made - 1).expand(len(drafts), 1))  # [batch, 1]
        logits = self._verify_eager(
            last_tokens, exit_states, made, columns, cache, pad_counts, exit_layer
        )
        return logits, torch.where(drafted, drafts, -1)

    @torch.no_grad()
    def greedy_step(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole greedy self-speculative step in one call: ``count`` greedy drafts
        (``greedy_drafts``), verification of the first ``made`` (``verify``) and greedy
        acceptance. One compiled call (one CUDA graph) per step instead of two, with the
        glue between them (padding, argmax, acceptance) inside it.

        Args:
            pending: the pending token of each row, [batch, 1], at column ``lengths - 1``.
            lengths: columns filled per row, [batch].
            made: how many of the ``count`` drafts to verify (<= count), a [1] long tensor.

        Returns:
            The step's new tokens [batch, k + 1] (accepted drafts, then the correction or
            bonus token; the first ``accepted + 1`` of each row count), the accepted counts
            [batch], the drafts [batch, k] (-1 past ``made``) and where the logits at the
            k + 1 positions were not finite [batch, k + 1] (``sampling.non_finite``).
        """
        key = self.greedy_step_key(exit_layer, pending.shape[0], count)
        return self._timed(
            key, self._greedy_step, pending, lengths, cache, pad_counts, made, exit_layer, count
        )

    # One compiled call per step: a step with its token write and bookkeeping
    # (``bookkeeping``). They take the token buffer [batch, capacity], its fill levels
    # [batch], the cache and the left padding, then the books (``RowBooks.tensors``: stop
    # ids, limits, generated counts, stop reasons, statistics), and
    # return new tensors for all of them but the cache: tokens, lengths, the step's new
    # tokens [batch, n], their counts [batch], drafts [batch, k], accepted drafts [batch],
    # non-finite flags [batch, n], then ``settle``'s kept counts, generated counts,
    # reasons, statistics and summary for the host. Only running rows (reason 0) advance.

    def _decode_step_eager(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        stop_ids: torch.Tensor,
        limit: torch.Tensor,
        generated: torch.Tensor,
        reason: torch.Tensor,
        statistics: torch.Tensor,
        end: int,
    ) -> tuple[torch.Tensor, ...]:
        columns = lengths[:, None] - 1  # [batch, 1]: the pending tokens'
        logits, _ = self._early_eager(tokens.gather(1, columns), columns, cache, pad_counts, end)
        new_tokens = compared(logits).argmax(dim=-1, keepdim=True)  # [batch, 1]
        books = (stop_ids, limit, generated, reason, statistics)
        return _closed_decode(tokens, lengths, new_tokens, non_finite(logits), books)

    @torch.no_grad()
    def decode_step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        books: tuple[torch.Tensor, ...],
        end: int,
    ) -> tuple[torch.Tensor, ...]:
        """A greedy autoregressive step through layers [0, end) (``early`` and argmax)
        with its bookkeeping, in one call (see above)."""
        key = self.decode_step_key(end, tokens.shape[0])
        _mark_dynamic_sizes(tokens, books[0], self.compiled)
        return self._timed(key, self._decode_step, tokens, lengths, cache, pad_counts, *books, end)

    def _counted_greedy_step_eager(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        stop_ids: torch.Tensor,
        limit: torch.Tensor,
        generated: torch.Tensor,
        reason: torch.Tensor,
        statistics: torch.Tensor,
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, ...]:
        pending = tokens.gather(1, lengths[:, None] - 1)  # [batch, 1]
        step = self._greedy_step_eager(pending, lengths, cache, pad_counts, made, exit_layer, count)
        books = (stop_ids, limit, generated, reason, statistics)
        return _closed_speculative(tokens, lengths, step, made, books)

    @torch.no_grad()
    def counted_greedy_step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        books: tuple[torch.Tensor, ...],
        exit_layer: int,
        count: int,
    ) -> tuple[torch.Tensor, ...]:
        """``greedy_step`` with its token write and bookkeeping, in one call (see above;
        ``made``: drafts to verify, a [1] tensor)."""
        key = self.counted_greedy_step_key(exit_layer, tokens.shape[0], count)
        _mark_dynamic_sizes(tokens, books[0], self.compiled)
        return self._timed(
            key,
            self._counted_greedy_step,
            tokens,
            lengths,
            cache,
            pad_counts,
            made,
            *books,
            exit_layer,
            count,
        )

    def _sampled_decode_step_eager(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        uniforms: torch.Tensor,
        stop_ids: torch.Tensor,
        limit: torch.Tensor,
        generated: torch.Tensor,
        reason: torch.Tensor,
        statistics: torch.Tensor,
        end: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, ...]:
        columns = lengths[:, None] - 1  # [batch, 1]: the pending tokens'
        logits, _ = self._early_eager(tokens.gather(1, columns), columns, cache, pad_counts, end)
        bad = non_finite(logits)  # [batch]: the row stops before this token
        new_tokens = _warped_draw(logits, bad, uniforms[:, 0], warp)[0][:, None]  # [batch, 1]
        books = (stop_ids, limit, generated, reason, statistics)
        return _closed_decode(tokens, lengths, new_tokens, bad, books)

    @torch.no_grad()
    def sampled_decode_step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        uniforms: torch.Tensor,
        books: tuple[torch.Tensor, ...],
        end: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, ...]:
        """``decode_step`` sampling: the token drawn with ``uniforms`` [batch, 1] from the
        logits warped by ``warp`` (temperature, top_k, top_p: ``sampling.warped``)."""
        key = self.sampled_decode_step_key(end, tokens.shape[0], warp)
        _mark_dynamic_sizes(tokens, books[0], self.compiled)
        return self._timed(
            key, self._sampled_decode_step, tokens, lengths, cache, pad_counts, uniforms, *books,
            end, self._warp_inputs(warp),
        )  # fmt: skip

    def _sampled_step_eager(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        uniforms: torch.Tensor,
        exit_layer: int,
        count: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = torch.arange(count + 1, device=lengths.device)
        columns = lengths[:, None] - 1 + positions  # [batch, k + 1]
        tokens = pending  # [batch, 1]
        drafts, states, draft_probs = [], [], []
        for i in range(count):
            logits, hidden = self._early_eager(
                tokens, columns[:, i : i + 1], cache, pad_counts, exit_layer
            )
            # A broken draft only proposes: drawn uniformly, and verification is told so.
            chosen, probs = _warped_draw(logits, non_finite(logits), uniforms[:, i], warp)
            tokens = chosen[:, None]
            drafts.append(tokens)
            states.append(hidden)
            draft_probs.append(probs)
        logits, draft_tokens = self._verified(
            torch.cat(drafts, dim=1), torch.cat(states, dim=1), made, columns, cache,
            pad_counts, exit_layer,
        )  # fmt: skip
        bad = non_finite(logits)  # [batch, k + 1]
        accepted, next_tokens = speculative_accept(
            draft_tokens,
            torch.stack(draft_probs, dim=1),
            _warped_probs(logits, bad, warp),
            uniforms=uniforms[:, count:],
        )
        return kept_tokens(draft_tokens, accepted, next_tokens), accepted, draft_tokens, bad

    @torch.no_grad()
    def sampled_step(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        uniforms: torch.Tensor,
        exit_layer: int,
        count: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``greedy_step`` sampling: ``count`` drafts drawn from the early exit's warped
        distributions, verification of the first ``made`` and speculative acceptance
        (``sampling.speculative_accept``), in one call. ``uniforms`` [batch, 2 count + 1]:
        the drafts' draws, the acceptance tests, the residual or bonus token's draw (what
        the eager step draws with: ``TokenSelector.uniforms``)."""
        key = self.sampled_step_key(exit_layer, pending.shape[0], count, warp)
        return self._timed(
            key, self._sampled_step, pending, lengths, cache, pad_counts, made, uniforms,
            exit_layer, count, self._warp_inputs(warp),
        )  # fmt: skip

    def _counted_sampled_step_eager(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        uniforms: torch.Tensor,
        stop_ids: torch.Tensor,
        limit: torch.Tensor,
        generated: torch.Tensor,
        reason: torch.Tensor,
        statistics: torch.Tensor,
        exit_layer: int,
        count: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, ...]:
        pending = tokens.gather(1, lengths[:, None] - 1)  # [batch, 1]
        step = self._sampled_step_eager(
            pending, lengths, cache, pad_counts, made, uniforms, exit_layer, count, warp
        )
        books = (stop_ids, limit, generated, reason, statistics)
        return _closed_speculative(tokens, lengths, step, made, books)

    @torch.no_grad()
    def counted_sampled_step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        made: torch.Tensor,
        uniforms: torch.Tensor,
        books: tuple[torch.Tensor, ...],
        exit_layer: int,
        count: int,
        warp: tuple,
    ) -> tuple[torch.Tensor, ...]:
        """``sampled_step`` with its token write and bookkeeping, in one call."""
        key = self.counted_sampled_step_key(exit_layer, tokens.shape[0], count, warp)
        _mark_dynamic_sizes(tokens, books[0], self.compiled)
        return self._timed(
            key, self._counted_sampled_step, tokens, lengths, cache, pad_counts, made, uniforms,
            *books, exit_layer, count, self._warp_inputs(warp),
        )  # fmt: skip

    def _tree_step_eager(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
        tree: TokenTree,
        depths: torch.Tensor,
        ancestors: torch.Tensor,
        uniforms: torch.Tensor | None = None,
        warp: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self._guard_on_instance()  # the only pass that does not go through _first_layers
        device = lengths.device
        base = lengths - 1  # [batch]: the root (pending token) column
        batch = len(lengths)
        level_tokens = [pending]  # per depth, [batch, nodes at that depth]
        exit_states = []  # per depth, [batch, nodes at that depth, hidden]
        for depth in range(tree.depth + 1):
            first = tree.starts[depth]
            nodes = slice(first, first + tree.sizes[depth])
            columns = base[:, None] + torch.arange(nodes.start, nodes.stop, device=device)
            positions = (base - pad_counts + depth)[:, None].expand_as(columns)  # root's + depth
            cache.tree = TreeColumns(base, depths, ancestors[nodes], depths[nodes])
            cache.write_columns = columns
            hidden = self.model.run_layers(
                self.model.embed(level_tokens[depth]), 0, exit_layer, cache, positions, pad_counts
            )  # [batch, nodes at depth, hidden]
            exit_states.append(hidden)
            if depth == tree.depth:  # leaves: nothing to draft after them
                self._adapter_columns(hidden, cache, positions, pad_counts)
                break
            logits = self._exit_logits(hidden, exit_layer, cache, positions, pad_counts)
            children = compared(logits).topk(tree.branching[depth], dim=-1).indices  # [b, n, width]
            level_tokens.append(children.reshape(batch, -1))
        tokens = torch.cat(level_tokens, dim=1)  # [batch, nodes]
        columns = base[:, None] + torch.arange(tree.num_nodes, device=device)
        cache.tree = TreeColumns(base, depths, ancestors, depths)
        cache.write_columns = columns
        hidden = self.model.run_layers(
            torch.cat(exit_states, dim=1),
            exit_layer,
            self.model.num_layers,
            cache,
            base[:, None] + depths - pad_counts[:, None],
            pad_counts,
        )
        cache.tree = None
        logits = self.model.unembed(hidden)  # [batch, nodes, vocab]
        bad_nodes = non_finite(logits)  # [batch, nodes]
        if warp is None:
            targets = compared(logits).argmax(dim=-1)  # [batch, nodes]
        else:
            # Each node's next token drawn from the full model's warped distribution with
            # the number of the node's depth: the walk follows one node per depth, so each
            # new token is a draw of its own from p given the tokens before it.
            node_uniforms = uniforms.gather(1, depths.expand(batch, -1))  # [batch, nodes]
            probs = _warped_probs(logits, bad_nodes, warp)  # [batch, nodes, vocab]
            targets = draw(probs, node_uniforms)  # [batch, nodes]
        accepted, next_tokens, path, drafts = tree_accept(tree, tokens, targets)
        # The accepted path's columns (and those after it) move behind the root.
        behind = base[:, None] + 1 + torch.arange(tree.depth, device=device)
        cache.move_columns(base[:, None] + path, behind)
        # Where the logits that chose each new token (the root's, then the path's) were not
        # finite, [batch, depth + 1].
        chosen_at = torch.nn.functional.pad(path, (1, 0))  # node 0 is the root
        bad = bad_nodes.gather(1, chosen_at)
        return kept_tokens(drafts, accepted, next_tokens), accepted, drafts, bad

    @torch.no_grad()
    def tree_step(
        self,
        pending: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        exit_layer: int,
        tree: TokenTree,
        uniforms: torch.Tensor | None = None,
        warp: tuple | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """A self-speculative step over a token tree (``trees``) in one call: each depth's
        nodes drafted through layers [0, E) (children: the early exit's most likely
        tokens), every node verified through layers [E, L), the path the full model's
        choices follow accepted and its cache columns moved behind the root.

        Args:
            pending: the pending token of each row (the root), [batch, 1], at column
                ``lengths - 1``; the tree's nodes take the columns after it.
            tree: the tree's shape.
            uniforms, warp: when sampling, the step's numbers [batch, depth + 1]
                (``TokenSelector.uniforms``: one per depth) and the warp (temperature,
                top_k, top_p): the full model's choice after a node is a draw from its
                warped distribution (``trees.tree_accept``); None: its argmax.

        Returns:
            The step's new tokens [batch, depth + 1] (the accepted path, then the correction
            or bonus token; the first ``accepted + 1`` of each row count), the accepted
            counts [batch], the path's drafts [batch, depth] and where the logits that chose
            the new tokens were not finite [batch, depth + 1].
        """
        key = self.tree_step_key(exit_layer, pending.shape[0], tree.branching, warp)
        return self._timed(
            key,
            self._tree_step,
            pending,
            lengths,
            cache,
            pad_counts,
            exit_layer,
            tree,
            *self._tree_shape(tree, lengths.device),
            uniforms,
            self._warp_inputs(warp),
        )

    def _tree_shape(self, tree: TokenTree, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The node depths and ancestor table of ``tree``, made once per shape."""
        tensors = self._tree_tensors.get(tree.branching)
        if tensors is None:
            tensors = (tree.depths(device), tree.ancestors(device))
            self._tree_tensors[tree.branching] = tensors
        return tensors

    def _counted_tree_step_eager(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        stop_ids: torch.Tensor,
        limit: torch.Tensor,
        generated: torch.Tensor,
        reason: torch.Tensor,
        statistics: torch.Tensor,
        exit_layer: int,
        tree: TokenTree,
        depths: torch.Tensor,
        ancestors: torch.Tensor,
        uniforms: torch.Tensor | None,
        warp: tuple | None,
    ) -> tuple[torch.Tensor, ...]:
        pending = tokens.gather(1, lengths[:, None] - 1)  # [batch, 1]
        step = self._tree_step_eager(
            pending, lengths, cache, pad_counts, exit_layer, tree, depths, ancestors, uniforms,
            warp,
        )  # fmt: skip
        books = (stop_ids, limit, generated, reason, statistics)
        return _closed_speculative(tokens, lengths, step, tree.depth, books)

    @torch.no_grad()
    def counted_tree_step(
        self,
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        cache: ColumnKVCache,
        pad_counts: torch.Tensor,
        books: tuple[torch.Tensor, ...],
        exit_layer: int,
        tree: TokenTree,
        uniforms: torch.Tensor | None = None,
        warp: tuple | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """``tree_step`` with its token write and bookkeeping, in one call (see
        ``counted_greedy_step``; the drafts reported are the path's, ``depth`` of them)."""
        key = self.counted_tree_step_key(exit_layer, tokens.shape[0], tree.branching, warp)
        _mark_dynamic_sizes(tokens, books[0], self.compiled)
        return self._timed(
            key,
            self._counted_tree_step,
            tokens,
            lengths,
            cache,
            pad_counts,
            *books,
            exit_layer,
            tree,
            *self._tree_shape(tree, lengths.device),
            uniforms,
            self._warp_inputs(warp),
        )


def _closed(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    new_tokens: torch.Tensor,
    counts: torch.Tensor,
    drafts: torch.Tensor,
    accepted: torch.Tensor,
    bad: torch.Tensor,
    made: torch.Tensor | int,
    books: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """A step's outputs with its tokens written and its books settled (``decode_step``,
    ``counted_greedy_step``)."""
    tokens, lengths = appended(tokens, lengths, new_tokens, counts)
    booked = settle(new_tokens, counts, bad, accepted, made, *books)
    return (tokens, lengths, new_tokens, counts, drafts, accepted, bad, *booked)


def _warped_draw(
    logits: torch.Tensor, bad: torch.Tensor, uniform: torch.Tensor, warp: tuple
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [batch] drawn with ``uniform`` [batch] from ``logits`` [batch, vocab] warped
    by ``warp``, uniformly where ``bad`` [batch] (non-finite logits), and the distributions
    drawn from [batch, vocab]: what ``TokenSelector.choose`` does without processors."""
    probs = _warped_probs(logits, bad, warp)
    return draw(probs, uniform), probs


def _warped_probs(logits: torch.Tensor, bad: torch.Tensor, warp: tuple) -> torch.Tensor:
    """Distributions [..., vocab] of ``logits`` warped by ``warp``, uniform where ``bad``
    [...] (non-finite logits)."""
    return torch.softmax(warped(finite_or_uniform(logits, bad).float(), *warp), dim=-1)


def _mark_dynamic_sizes(tokens: torch.Tensor, stop_ids: torch.Tensor, compiled: bool) -> None:
    """Marks dynamic (compiled once) a compiled step's sizes that vary between generations
    of one batch size: the token buffer's columns (its capacity follows the prompt, as the
    cache's does) and the number of stop ids (at least two, ``RowBooks.start``: dynamo
    gives sizes 0 and 1 their own versions)."""
    if compiled:
        torch._dynamo.maybe_mark_dynamic(tokens, 1)
        torch._dynamo.maybe_mark_dynamic(stop_ids, 0)


# The compiled passes: ``_<name>_eager`` is each one's code, ``_<name>`` what calls run
# (compiled, or the eager code itself).
_PASS_NAMES = (
    "early", "verify", "greedy_drafts", "greedy_step", "tree_step", "decode_step",
    "counted_greedy_step", "sampled_decode_step", "sampled_step", "counted_sampled_step",
    "counted_tree_step",
)  # fmt: skip
# Names of the values in each pass key after its kind (for the log line before a compile).
_KEY_NAMES = {
    "sampled_decode_step": ("end layer", "batch", "warpers"),
    "sampled_step": ("exit layer", "batch", "drafts", "warpers"),
    "counted_sampled_step": (
        "exit layer",
        "batch",
        "drafts",
        "warpers",
    ),
    "decode_step": ("end layer", "batch"),
    "counted_greedy_step": ("exit layer", "batch", "drafts"),
    "greedy_step": ("exit layer", "batch", "drafts"),
    "tree_step": ("exit layer", "batch", "branching", "warpers"),
    "counted_tree_step": (
        "exit layer",
        "batch",
        "branching",
        "warpers",
    ),
    "early": ("end layer", "batch"),
    "greedy_drafts": ("exit layer", "batch", "drafts"),
    "verify": ("exit layer", "batch", "positions"),
}
# What a failed compile raises: a graph break (``fullgraph``), an unsupported construct, a
# backend (inductor, C++ compiler) failure.
_COMPILE_FAILURES = (
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.BackendCompilerFailed,
    # Dynamo's own failures while tracing a family it has not seen: an internal error, an
    # operator failing on fake tensors, a user-facing constraint. Eager decoding either
    # runs (the failure was the compiler's) or raises the model's own error.
    *(
        getattr(torch._dynamo.exc, name)
        for name in ("InternalTorchDynamoError", "TorchRuntimeError", "UserError")
        if hasattr(torch._dynamo.exc, name)
    ),
    # A pass recompiled past RECOMPILE_LIMIT (fullgraph: a hard failure); not in older torch.
    *(
        [torch._dynamo.exc.FailOnRecompileLimitHit]
        if hasattr(torch._dynamo.exc, "FailOnRecompileLimitHit")
        else []
    ),
)


def _closed_decode(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    new_tokens: torch.Tensor,
    bad: torch.Tensor,
    books: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """``_closed`` for a plain decoding step (one new token per row [batch, 1], non-finite
    flags [batch]; no drafts): running rows (reason 0, ``books[3]``) add it."""
    counts = (books[3] == 0).long()
    return _closed(
        tokens, lengths, new_tokens, counts, new_tokens[:, :0], torch.zeros_like(counts),
        bad[:, None], 0, books,
    )  # fmt: skip


def _closed_speculative(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    step: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    made: torch.Tensor,
    books: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, ...]:
    """``_closed`` for a self-speculative step (new tokens, accepted counts, drafts,
    non-finite flags): running rows (reason 0, ``books[3]``) add accepted + 1 tokens."""
    new_tokens, accepted, drafts, bad = step
    counts = (accepted + 1) * (books[3] == 0)
    return _closed(tokens, lengths, new_tokens, counts, drafts, accepted, bad, made, books)


def _damaged_compiled_file(error: BaseException) -> Path | None:
    """The library in inductor's on-disk cache that a failed compile could not load because
    it is empty or cut short (a compile killed while writing it: every later process would
    fail on it), or None."""
    inner = getattr(error, "inner_exception", None) or error
    if not isinstance(inner, ImportError | OSError):
        return None
    found = re.search(r"(/\S+\.so): (file too short|invalid ELF header)", str(inner))
    if found is None:
        return None
    from torch._inductor.runtime.cache_dir_utils import cache_dir  # noqa: PLC0415

    path = Path(found.group(1))
    return path if path.resolve().is_relative_to(Path(cache_dir()).resolve()) else None


def _first_line(error: BaseException) -> str:
    """The error in one line: a backend failure's own error (a compiler's message), else the
    first line of dynamo's (the graph break's reason)."""
    inner = getattr(error, "inner_exception", None)
    if inner is not None:
        error = inner
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
