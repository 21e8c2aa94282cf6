"""User-facing errors: one clear message each, mapped to an exit code by the CLI.

Exit code 2 means "change the command or the config" (usage, YAML, paths, incompatible
models, an occupied output folder); exit code 1 means the data or the run failed (a corrupt
or truncated checkpoint, a worker that kept failing, a storage error).
"""

from __future__ import annotations


class RaymergeError(Exception):
    """Base of every error the CLI prints as one message, without a traceback."""

    exit_code = 1


class ConfigError(RaymergeError):
    """Bad usage: the config, an option, a path or the choice of models must change."""

    exit_code = 2


class CheckpointError(RaymergeError):
    """A checkpoint's files are unreadable, truncated or malformed."""

    exit_code = 1


class DataError(RaymergeError):
    """Data a merge reads besides checkpoints (calibration tokens) is unusable."""

    exit_code = 1


class MergeFailed(RaymergeError):
    """The merge itself failed at run time (workers, storage)."""

    exit_code = 1


SHOWN_CHARS = 200  # the most of one bad value a message shows


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for a message, cut to at most `limit` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 25]}... ({len(text)} characters)"
