"""Child processes that never outlive their parent: a killed worker takes its reader processes with it."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from multiprocessing import get_context
from typing import Any, TypeVar

T = TypeVar("T")

_stage_progress: ContextVar[Callable[[float], None] | None] = ContextVar("stage_progress", default=None)


@contextmanager
def stage_progress(callback: Callable[[float], None] | None) -> Iterator[None]:
    """Let the work inside (reading a study, decoding it) report how far it is: ``callback(fraction)``, which may
    raise :class:`~pipelines.errors.Interrupted` (a cancelled or timed-out job stops there)."""
    token = _stage_progress.set(callback)
    try:
        yield
    finally:
        _stage_progress.reset(token)


def report_progress(fraction: float) -> None:
    callback = _stage_progress.get()
    if callback is not None:
        callback(min(max(fraction, 0.0), 1.0))


def collected(results: Iterable[T], total: int, span: tuple[float, float] = (0.0, 1.0)) -> list[T]:
    """``results`` as a list, reporting progress (within ``span`` of the stage) every 16 of ``total``: a cancelled
    or timed-out job stops there."""
    low, high = span
    items = []
    for index, result in enumerate(results):
        if index % 16 == 0:
            report_progress(low + (high - low) * index / max(total, 1))
        items.append(result)
    return items


def mapped(pool: Executor, function: Callable[..., T], *inputs: Iterable[Any], total: int,
           span: tuple[float, float] = (0.0, 1.0), chunksize: int = 1) -> list[T]:
    """``pool.map`` collected with progress; when it is interrupted (a cancel, a timeout, a failure) the work not
    yet started is cancelled rather than waited for."""
    try:
        return collected(pool.map(function, *inputs, chunksize=chunksize), total, span)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); exit at once when the parent
    is already gone. Elsewhere a no-op: callers that run long also watch their parent themselves."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(0)


def forked_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of forked processes (they share the parent's imports) that die with the process that made them."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork"), initializer=die_with_parent,
                               initargs=(os.getpid(),))


def _parent_of(pid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split(maxsplit=2)[1])  # after "pid (comm) state": the parent


def resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Linux ``/proc``; ``[root]`` elsewhere)."""
    try:
        entries = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return [root]
    children: dict[int, list[int]] = {}
    for name in entries:
        parent = _parent_of(name)
        if parent is not None:
            children.setdefault(parent, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def tree_resident_bytes(root: int) -> int:
    """Resident memory of ``root`` and its descendants together (pages shared by forked children are counted
    once per process, as the kernel's own RSS does: an upper bound)."""
    return sum(resident_bytes(pid) for pid in process_tree(root))


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
