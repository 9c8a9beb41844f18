"""The exception family. Every message is one line naming the problem and the fix;
the CLI turns these into clean errors (no traceback, non-zero exit)."""

from __future__ import annotations


class CkptError(Exception):
    """Base class of every error ckptkit raises on purpose."""

    exit_code = 1


class ConfigError(CkptError, ValueError):
    """A bad argument or configuration value."""

    exit_code = 2


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No (valid) checkpoint where one was asked for."""

    exit_code = 3


class CorruptCheckpointError(CkptError):
    """A checkpoint's files do not match its manifest, or cannot be decoded."""

    exit_code = 4


class UnsafeCheckpointError(CkptError):
    """Loading would need to unpickle something outside the allowlist."""

    exit_code = 5


class IncompatibleCheckpointError(CkptError):
    """The checkpoint does not fit the model/config it is being restored into."""

    exit_code = 6


class StorageError(CkptError, OSError):
    """The storage backend failed (bad URL, missing bucket, permission, full disk...)."""

    exit_code = 7


class RunLockedError(CkptError):
    """Another live process is writing to the same run."""

    exit_code = 8


class MissingDependencyError(CkptError, ImportError):
    """An optional extra is not installed; the message names the pip command."""

    exit_code = 9


def install_hint(extra: str, package: str) -> str:
    return f"pip install 'ckptkit[{extra}]'  (or: pip install {package})"
