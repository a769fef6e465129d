"""Exceptions a user can cause and fix; the CLI turns each into one line and an exit code."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SdaccelError(Exception):
    """Base class: the message is shown to the user as is."""

    exit_code = 1


class ConfigError(SdaccelError):
    """A settings file, key or value is wrong (names the file, key and what is valid).

    `key` is the dotted settings key it is about ("generation.height"), None when it is about
    no one key (a file, a preset name): a front end reads it to point at its own field (the
    server's request fields) without parsing the message.
    """

    exit_code = 2

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key

    def __reduce__(self):  # pickled (across processes) with its key
        return type(self), (str(self), self.key)


class ModelNotFoundError(SdaccelError):
    """A model reference cannot be resolved or loaded offline."""

    exit_code = 3


class LoraError(ModelNotFoundError):
    """A LoRA file that cannot be used: missing, unreadable, made for another architecture, or
    given a weight that is not a number (names the file and what is wrong)."""


class DeviceError(SdaccelError):
    """The requested device or precision is not available on this machine."""

    exit_code = 4


class OutputError(SdaccelError):
    """A file could not be written (disk full, no permission, a file where a folder should be);
    what was saved before stays."""


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn an OSError while writing `path` into an OutputError naming the file and the cause.
    It names `path`, the file the user asked for, not a temporary file or folder on the way."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
