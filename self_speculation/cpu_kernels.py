"""The fast path's CPU kernel for few-row matrix products, and the compiler pass that uses it.

A decoding step multiplies 1 row (autoregressive decoding, drafting) or k + 1 rows
(verification) by every weight matrix, and reading the weights is the cost. BLAS sgemm is
built for many rows: on the 2-core CPUs measured here a 6-row product read the weights at
about 3 GB/s and cost 2-4x a 1-row one, which made verification the largest part of a
self-speculative step. ``layerskip::few_row_linear`` (``csrc/few_row_linear.cpp``) reads each
weight row once for all rows (8-12 GB/s at 6 rows, 12-18 GB/s at one).

The kernel is built once per machine with the compiler inductor already needs (cached by
``torch.utils.cpp_extension``, about a minute; a log line says so before it starts). Where it
cannot be built, the fast path keeps inductor's own kernels and says why once. A build that
was killed leaves its lock file behind, on which every later build would wait forever: each
build holds an ``flock`` (which the kernel releases when its process dies) while it runs, so
a lock file found with that flock free is a killed build's and is removed at once, with one
warning; without ``fcntl``, a lock older than ``STALE_LOCK_SECONDS`` is. A torch whose build
holds an OS lock on that file instead (2.14 and newer) leaves it after every build, and a
killed build's frees itself: there the file is left alone (``lock_file_blocks``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

try:
    import fcntl
except ImportError:  # not POSIX: builds wait on a stale lock's age instead
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "few_row_linear.cpp"
MAX_ROWS = 8  # the kernel's row limit; larger products stay with BLAS
# One-row products go to the kernel only from this many weights (1 MB in float32): below
# it, inductor's fused multiply-and-sum is faster, because it fuses with its neighbours.
# Measured: the shipped model's 24 layers (at most 98K weights a product) took 12.4 ms per
# token through the kernel against 9.1 ms; SmolLM2's (110K-885K weights and a 28M head),
# 30.7 ms against 40.8 ms (a microbenchmark of its products, compiled).
ONE_ROW_MIN_WEIGHTS = 1 << 18
# A build takes about a minute; a lock this old was left by a build that did not finish.
STALE_LOCK_SECONDS = 600.0
_available: bool | None = None


def clear_stale_lock(lock: Path, stale_after: float = STALE_LOCK_SECONDS) -> bool:
    """Wait for a build lock held by a running build; remove one older than ``stale_after``
    seconds (a killed build's), with one warning. True when a stale lock was removed."""
    waited = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= stale_after:
            lock.unlink(missing_ok=True)
            logger.warning(
                "removed a stale build lock (%s, %.0f s old) left by an interrupted build",
                lock,
                age,
            )
            return True
        if not waited:
            logger.info(
                "waiting for another process's build of the few-row kernel (lock %s, "
                "removed as stale after %.0f s)",
                lock,
                stale_after,
            )
            waited = True
        time.sleep(1.0)


def lock_file_blocks() -> bool:
    """Whether torch's extension build waits while its ``lock`` file exists (torch <= 2.13's
    ``FileBaton``: a killed build's file blocked every later build). torch 2.14 holds a
    ``filelock`` lock on that file, which the kernel frees when its holder dies, and keeps
    the file after every build: removing it there said "left by an interrupted build" in
    every process."""
    from torch.utils import cpp_extension  # noqa: PLC0415

    return hasattr(cpp_extension, "FileBaton")


@contextlib.contextmanager
def build_guard(build_directory: Path, lock_blocks: bool = True) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``build_directory/layerskip-build.flock`` while the
    block builds (waiting for another process's build to finish); a ``lock`` file found
    once it is held was left by a killed build, and is removed at once. Where no flock can
    be had (not POSIX, another user's file, a file system without locks):
    ``clear_stale_lock``'s wait. ``lock_blocks`` False (``lock_file_blocks``): torch's
    ``lock`` file blocks nothing and is left as it is."""
    descriptor = _build_flock(build_directory)
    if descriptor is None:
        if lock_blocks:
            clear_stale_lock(build_directory / "lock")
        yield
        return
    try:
        lock = build_directory / "lock"
        if lock_blocks and lock.exists():  # no live build of ours holds it: a killed one's
            lock.unlink(missing_ok=True)
            logger.warning("removed a build lock (%s) left by an interrupted build", lock)
        yield
    finally:
        os.close(descriptor)  # releases the flock


def _build_flock(build_directory: Path) -> int | None:
    """A descriptor holding the exclusive build flock of ``build_directory`` (after waiting
    for a live build), or None where it cannot be had."""
    if fcntl is None:
        return None
    build_directory.mkdir(parents=True, exist_ok=True)
    try:  # read-only is enough for flock (another user's 0644 file)
        descriptor = os.open(build_directory / "layerskip-build.flock", os.O_RDONLY | os.O_CREAT)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process's build of the few-row kernel")
            fcntl.flock(descriptor, fcntl.LOCK_EX)
    except OSError:  # no flock on this file system (ENOLCK)
        os.close(descriptor)
        return None
    return descriptor


def _cpu_signature() -> str:
    """What -march=native depends on: a cached build is reused only on the same CPU kind."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return platform.machine() + flags


def load_few_row_kernel() -> bool:
    """Build (first time on this machine) and load the kernel; False with a logged reason
    when this machine cannot build it."""
    global _available
    if _available is not None:
        return _available
    if hasattr(torch.ops.layerskip, "few_row_linear"):
        _available = True
        return True
    from torch.utils.cpp_extension import _get_build_directory, load

    digest = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()[:12]
    name = f"layerskip_few_row_linear_{digest}"
    try:
        build_directory = Path(_get_build_directory(name, verbose=False))
        with build_guard(build_directory, lock_file_blocks()):
            building = not any(build_directory.glob(f"{name}*.so"))
            if building:
                logger.info(
                    "building the fast path's few-row product kernel (once on this machine, "
                    "about a minute) in %s",
                    build_directory,
                )
            started = time.perf_counter()
            load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
            )
            if building:  # outside any generation's compile_seconds: said here
                logger.info("built the few-row kernel in %.0f s", time.perf_counter() - started)
    except Exception as error:  # no compiler, no ninja, an unsupported platform
        logger.warning(
            "fast path: few-row product kernel unavailable (%s); using inductor's kernels",
            str(error).splitlines()[0] if str(error) else type(error).__name__,
        )
        _available = False
        return False

    @torch.library.register_fake("layerskip::few_row_linear")
    def _(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    _available = True
    return True


class FewRowProducts(CustomGraphPass):
    """Inductor post-grad pass: ``mm(x, w.T)`` / ``addmm(b, x, w.T)`` with 2 to ``MAX_ROWS``
    float32 rows of x (one row: from ``ONE_ROW_MIN_WEIGHTS`` weights) becomes
    ``few_row_linear(x, w)`` (+ b). It runs before inductor's own post-grad passes, which
    decompose the one-row products it leaves."""

    def __init__(self) -> None:
        self.replaced = 0  # products rewritten so far, over every graph this pass saw

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.mm.default:
                bias, (x, transposed) = None, node.args
            elif node.target is aten.addmm.default and not node.kwargs:
                bias, x, transposed = node.args
            else:
                continue
            weight = _transposed_weight(transposed)
            if weight is None or not _few_float_rows(x):
                continue
            if x.meta["val"].shape[0] == 1 and weight.meta["val"].numel() < ONE_ROW_MIN_WEIGHTS:
                continue
            with graph.inserting_before(node):
                product = graph.call_function(
                    torch.ops.layerskip.few_row_linear.default, (x, weight)
                )
                product.meta["val"] = node.meta["val"]
                if bias is not None:
                    product = graph.call_function(aten.add.Tensor, (product, bias))
                    product.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(product)
            graph.erase_node(node)
            self.replaced += 1

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__, str(SOURCE)))


def _transposed_weight(node: object) -> torch.fx.Node | None:
    """w when ``node`` is ``permute(w, [1, 0])`` of a contiguous 2-D float32 w, else None."""
    if not isinstance(node, torch.fx.Node) or node.target is not torch.ops.aten.permute.default:
        return None
    weight, order = node.args
    value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if list(order) != [1, 0] or value is None or value.dim() != 2:
        return None
    if value.dtype != torch.float32 or not value.is_contiguous():
        return None
    return weight


def _few_float_rows(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return (
        value is not None
        and value.dim() == 2
        and value.dtype == torch.float32
        and value.device.type == "cpu"
        and isinstance(value.shape[0], int)
        and 1 <= value.shape[0] <= MAX_ROWS
    )
