"""Errors a user can act on: a stable code and a one-line message.

Tracebacks stay in the logs; what reaches a terminal or an HTTP client is ``str(error)``.
"""

from __future__ import annotations


class TesseraError(Exception):
    """Base class for every error Tessera reports to a user.

    ``code`` is stable across releases (scripts and the REST service key on it);
    ``message`` is one line that says what is wrong and, where possible, what to do.
    """

    code: str = "TESSERA_ERROR"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple:
        # Survive pickling (worker processes, distributed executors): rebuild from code and message.
        return (type(self), (self.code, self.message))


class InputError(TesseraError):
    """The input (file, folder, series) cannot be used as given."""


class ModelError(TesseraError):
    """A model manifest, its weights or a checkpoint is unusable."""


class UsageError(TesseraError):
    """The command or call was given arguments that do not fit together."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: not an error of the case, not caught as one
    """Raised by a progress callback to stop a running case (cancelled, timed out, worker shutting down).

    A ``BaseException`` so that the per-case ``except Exception`` that turns bugs into failed cases lets it
    through: an interrupted case is neither succeeded nor failed, and leaves nothing that looks finished.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
