"""Child processes that never outlive their parent: a killed worker takes its reader processes with it."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from multiprocessing import get_context

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
