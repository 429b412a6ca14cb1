"""The durable checkpoint's names and files: directory and file names, the checkpoint manifest, the
completion marker, and verified reads and writes over ``pyarrow.fs``. ``DurableStore`` composes these.

The checkpoint manifest (``MANIFEST.msgpack``) is one msgpack map::

    {"format": "zetta-ray-checkpoint", "version": 1, "step": 123,
     "meta": <caller's metadata tree, see checkpoint.tree>,
     "parts": [{"name": "unit-0003", "file": "unit-0003.safetensors", "nbytes": 1048712,
                "sha256": "<hex of the whole file>",
                "tensors": [{"name": "tensors/0.3.w1", "shape": [512, 128], "dtype": "<f4",
                             "nbytes": 262144, "sha256": "<hex of the tensor's bytes>"}, ...]}, ...]}

The marker (``COMPLETE``) holds the manifest's sha256 in hex and a newline: it vouches for exactly one
manifest, which vouches for every file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
from msgpack.exceptions import UnpackException

from zetta_ray.checkpoint.snapshot import TensorEntry
from zetta_ray.checkpoint.tree import pack, unflatten, unpack
from zetta_ray.errors import ConfigError, CorruptCheckpointError, SnapshotFormatError

__all__ = ["MANIFEST", "MARKER", "CheckpointInfo", "PartEntry", "step_dir_name"]

MANIFEST = "MANIFEST.msgpack"
MARKER = "COMPLETE"
FORMAT = "zetta-ray-checkpoint"
SUFFIX = ".safetensors"
_STEP_DIR = re.compile(r"^step-(\d{9,})$")
_PART_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 16 * 2**20


def step_dir_name(step: int) -> str:
    """``step-000000123``: zero-padded so that names sort in step order."""
    return f"step-{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step a directory name stands for, or None if it is not a checkpoint directory."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def check_part_name(name: object) -> str:
    if not isinstance(name, str) or not _PART_NAME.match(name):
        raise ConfigError(
            f"part name {name!r} is invalid: use 1-128 characters from [A-Za-z0-9_.-] starting with a "
            "letter or digit (e.g. 'unit-0003', 'controller')"
        )
    return name


@dataclass(frozen=True, slots=True)
class PartEntry:
    """One part file as the checkpoint manifest records it."""

    name: str
    file: str
    nbytes: int
    sha256: str
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """A complete checkpoint: its step, directory, parts and caller metadata.

    ``skipped`` (set by ``DurableStore.latest``) lists the newer checkpoints that failed verification.
    """

    step: int
    path: str
    parts: Mapping[str, PartEntry]
    meta: Any
    skipped: tuple[CorruptCheckpointError, ...] = field(default=())


def encode_manifest(step: int, meta_skeleton: Any, parts: Sequence[PartEntry]) -> bytes:
    entries = [
        {
            "name": p.name,
            "file": p.file,
            "nbytes": p.nbytes,
            "sha256": p.sha256,
            "tensors": [t.to_msgpack() for t in p.tensors],
        }
        for p in parts
    ]
    return pack({"format": FORMAT, "version": 1, "step": step, "meta": meta_skeleton, "parts": entries})


def decode_manifest(data: bytes, *, path: str, step: int) -> tuple[dict[str, PartEntry], Any]:
    """Parts by name and the caller's metadata from ``MANIFEST.msgpack`` bytes already checked against
    the marker. Raises ``CorruptCheckpointError`` if they do not parse or belong to another step."""
    try:
        m = unpack(data)
        parts = {
            p["name"]: PartEntry(
                p["name"],
                p["file"],
                p["nbytes"],
                p["sha256"],
                tuple(map(TensorEntry.from_msgpack, p["tensors"])),
            )
            for p in m["parts"]
        }
        meta = unflatten(m["meta"], {})
        found = (m["format"], m["step"])
    except (ValueError, KeyError, TypeError, UnpackException, SnapshotFormatError) as e:
        raise file_error(MANIFEST, path, step, f"unreadable ({type(e).__name__}: {e})") from e
    if found != (FORMAT, step):
        raise file_error(MANIFEST, path, step, f"(format, step) is {found}, expected {(FORMAT, step)}")
    return parts, meta


def marker_bytes(manifest: bytes) -> bytes:
    return f"{hashlib.sha256(manifest).hexdigest()}\n".encode()


def parse_marker(data: bytes) -> str | None:
    """The manifest sha256 a marker records, or None if the marker is malformed (an interrupted write)."""
    text = data.decode("ascii", errors="replace").strip()
    return text if _SHA_HEX.match(text) else None


def file_error(
    name: str, path: str, step: int, detail: str, *, expected: object = None, actual: object = None
) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        kind="file", name=name, path=path, step=step, detail=detail, expected=expected, actual=actual
    )


def write_file(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def read_file(fs: pafs.FileSystem, path: str, name: str, step: int) -> bytes:
    """The whole file; a missing file is a ``CorruptCheckpointError`` naming it."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise file_error(name, path, step, "missing") from e


def hash_file(fs: pafs.FileSystem, path: str, name: str, step: int) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 16 MiB chunks so that memory stays flat."""
    h, size = hashlib.sha256(), 0
    try:
        with fs.open_input_stream(path) as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
    except FileNotFoundError as e:
        raise file_error(name, path, step, "missing") from e
    return size, h.hexdigest()


def check_file(part: PartEntry, path: str, size: int, digest: str, step: int) -> None:
    """Raise ``CorruptCheckpointError`` naming the part's file if its size or sha256 is not recorded."""
    if size != part.nbytes:
        detail = f"{size} bytes, the manifest records {part.nbytes} (truncated or overwritten)"
        raise file_error(part.file, path, step, detail, expected=part.nbytes, actual=size)
    if digest != part.sha256:
        detail = f"sha256 {digest} differs from the manifest's {part.sha256}"
        raise file_error(part.file, path, step, detail, expected=part.sha256, actual=digest)
