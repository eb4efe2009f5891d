"""Exceptions a user sees. Each says what is wrong and where, so the CLI prints it without a traceback."""

from __future__ import annotations

from pathlib import Path


class PipelineError(Exception):
    """Base class for errors caused by input or state, not by a bug."""


class ShardError(PipelineError):
    """A shard that breaks the annotation or feature contract. Nothing of it is counted."""

    def __init__(self, path: str | Path, message: str, *, row: int | None = None, column: str | None = None):
        self.path = str(path)
        self.row = row
        self.column = column
        self.message = message
        where = [self.path]
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {message}")

    def __reduce__(self):  # travels between Dask workers and the client; subclasses may change __init__
        return _rebuild_error, (type(self), self.args, dict(self.__dict__))


def _rebuild_error(cls: type[Exception], args: tuple, state: dict) -> Exception:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class StoreError(PipelineError):
    """An embedding store that is missing, foreign, locked or inconsistent."""
