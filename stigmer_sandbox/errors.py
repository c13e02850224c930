"""Errors the tool reports to a person: one line, a hint, an exit code.

Every failure the library anticipates is a `SandboxError`; the task layer turns
it into one printed line and a non-zero exit, never a traceback.
"""

from __future__ import annotations


class SandboxError(Exception):
    """A failure with a one-line explanation and, where known, how to fix it."""

    exit_code = 1

    def __init__(
        self, message: str, hint: str | None = None, details: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        # Context shown above the one-line error, e.g. the last log lines of a failed step.
        self.details = details

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(SandboxError):
    """Invalid configuration: a file, a key, or a value that is not allowed."""

    exit_code = 2


class UsageError(SandboxError):
    """Bad input on the command line or through the API."""

    exit_code = 2


class EngineError(SandboxError):
    """The Docker Engine is missing, down, refused us, or is too old."""

    exit_code = 3


class BuildError(SandboxError):
    """An image build failed."""

    exit_code = 4


class SandboxNotReady(SandboxError):
    """The sandbox container is missing, stopped or unhealthy."""

    exit_code = 5
