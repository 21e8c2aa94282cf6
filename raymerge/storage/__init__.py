"""Where bytes live: local folders and S3-compatible object storage, behind the same calls."""

from __future__ import annotations

import os
import re
import tempfile

from raymerge.errors import ConfigError, shown
from raymerge.storage.base import Destination, Source
from raymerge.storage.local import LocalDestination, LocalSource

# "s3://bucket/key", "gs://...", "hf://...", "https://...": a URI, not a local path
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def uri_scheme(uri: str) -> str | None:
    """The scheme of a URI such as s3://bucket/key, or None for a local path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def is_remote(uri: str) -> bool:
    return uri_scheme(uri) is not None


def open_source(uri: str) -> Source:
    """A reader for the checkpoint folder (or S3 prefix, or virtual model) at `uri`."""
    scheme = uri_scheme(uri)
    if scheme == "s3":
        from raymerge.storage.s3 import S3Source

        return S3Source(uri)
    if scheme == "virtual":  # a named layout's checkpoint without files (storage/virtual.py)
        from raymerge.storage.virtual import VirtualSource

        return VirtualSource(uri)
    if scheme == "hf":  # a Hugging Face model repo read in place at a commit (storage/hub.py)
        from raymerge.storage.hub import HubSource

        return HubSource(uri)
    if scheme == "lora":  # lora://BASE+ADAPTER: a model with a PEFT adapter (storage/lora.py)
        from raymerge.storage.lora import LoraSource

        return LoraSource(uri)
    if scheme is not None:
        raise ConfigError(
            f"{shown(uri)}: {scheme}:// sources are not supported; raymerge reads local "
            "folders, .safetensors files, s3://bucket/prefix, hf://org/name (or org/name in a "
            "config), MODEL+ADAPTER LoRA inputs and virtual://LAYOUT/MODEL"
        )
    return LocalSource(uri)


def open_destination(uri: str, fsync: bool = False) -> Destination:
    """A writer for the output folder (or S3 prefix) at `uri`."""
    scheme = uri_scheme(uri)
    if scheme == "s3":
        from raymerge.storage.s3 import S3Destination

        return S3Destination(uri)
    if scheme is not None:
        raise ConfigError(
            f"{shown(uri)}: {scheme}:// destinations are not supported; give a local folder "
            "(or one on a shared filesystem) or s3://bucket/prefix as the output"
        )
    return LocalDestination(uri, fsync)


def check_writable_destination(uri: str) -> None:
    """Raise ConfigError unless the output folder `uri` can be created or written in.

    Run before anything is written. For a local path: `uri` is a folder or does not exist yet,
    its nearest existing ancestor is a folder, and a probe folder can be made (and is removed)
    there, which catches read-only filesystems, /proc and permissions even for root. For
    s3://: the bucket exists and takes (and gives up) a probe object.
    """
    destination = open_destination(uri)  # refuses URIs of unsupported schemes
    if uri_scheme(uri) is not None:
        destination.check_writable()
        return
    if not uri:
        raise ConfigError("the output folder is empty; give a folder path")
    path = os.path.abspath(uri)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"output {shown(uri)} is an existing file, not a folder; give a folder path (it is "
            "created if missing)"
        )
    ancestor = path
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(
            f"output {shown(uri)} cannot be created: {shown(ancestor)} exists and is not a "
            "folder; choose another output path"
        )
    problem = None
    if not os.access(ancestor, os.W_OK | os.X_OK):
        problem = "permission denied"
    else:
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".raymerge-write-test-", dir=ancestor))
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
    if problem is not None:
        what = "written in" if ancestor == path else f"created under {shown(ancestor)}"
        raise ConfigError(
            f"output {shown(uri)} cannot be {what} ({problem}); choose a writable folder"
        )


__all__ = [
    "Destination",
    "Source",
    "check_writable_destination",
    "is_remote",
    "open_destination",
    "open_source",
    "uri_scheme",
]
