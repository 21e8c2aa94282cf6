"""Where bytes live: local folders now, S3-compatible object storage behind the same calls."""

from __future__ import annotations

from raymerge.storage.base import Destination, Source
from raymerge.storage.local import LocalDestination, LocalSource


def open_source(uri: str) -> Source:
    """A reader for the checkpoint or file at `uri`."""
    return LocalSource(uri)


def open_destination(uri: str, fsync: bool = False) -> Destination:
    """A writer for the output folder at `uri`."""
    return LocalDestination(uri, fsync)


__all__ = ["Destination", "Source", "open_destination", "open_source"]
