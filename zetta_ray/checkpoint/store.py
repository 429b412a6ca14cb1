"""``DurableStore``: consistent, verified checkpoints on any ``pyarrow.fs`` filesystem.

Layout under the store's root (a local directory, or ``s3://bucket/prefix``, ``gs://...``,
``hdfs://...``)::

    step-000000123/
        controller.safetensors    one file per part: an encoded Snapshot (see checkpoint.snapshot)
        unit-0000.safetensors
        unit-0001.safetensors
        MANIFEST.msgpack          the step, caller metadata, and per part: file, size, sha256, tensors
        COMPLETE                  written last: the sha256 (hex) of MANIFEST.msgpack's bytes

**Atomicity without rename.** Object stores have no atomic directory rename, and local renames do not
cover a directory of files. Instead every reader trusts a directory only if its ``COMPLETE`` marker is
present and well-formed, and the marker is written only after every part and the manifest have been
closed. A crash at any point leaves either a directory without a marker (ignored, removed by a later
prune) or a complete checkpoint.

**Verification.** ``verify`` checks the marker against the manifest's sha256, then each part file's
size and sha256 against the manifest; ``load`` checks the part file again and every tensor's sha256
inside it. ``latest`` walks complete checkpoints newest first and returns the first that verifies;
each one that does not is logged with the file that failed and reported in ``CheckpointInfo.skipped``.
Nothing is ever unpickled.

**Retention.** After a checkpoint completes, ``prune`` keeps the newest ``keep_last`` complete ones and
removes older ones and leftover incomplete directories older than the newest complete one. A
checkpoint is removed marker first, so a half-deleted one reads as incomplete, never as corrupt.

Trade-off: files are not fsync'ed (``pyarrow.fs`` has no fsync). After a power loss, a local marker
may outlive the data it vouches for; verification then catches the damage and falls back one
checkpoint. Object stores make each object durable when its upload completes, so they do not have this
window.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from zetta_ray.checkpoint.layout import (
    MANIFEST,
    MARKER,
    SUFFIX,
    CheckpointInfo,
    PartEntry,
    check_file,
    check_part_name,
    decode_manifest,
    encode_manifest,
    file_error,
    hash_file,
    marker_bytes,
    parse_marker,
    parse_step_dir,
    read_file,
    step_dir_name,
    write_file,
)
from zetta_ray.checkpoint.snapshot import (
    Snapshot,
    TensorEntry,
    decode_snapshot,
    encode_snapshot,
    read_manifest,
)
from zetta_ray.checkpoint.tree import flatten
from zetta_ray.errors import (
    CheckpointError,
    ConfigError,
    CorruptCheckpointError,
    NoValidCheckpointError,
    SnapshotFormatError,
)

__all__ = ["DurableStore"]

logger = logging.getLogger(__name__)


class DurableStore:
    """Checkpoints under ``uri``; see the module docstring for the layout and the rules.

    Args:
        uri: a local path (relative paths are made absolute) or a URI that
            ``pyarrow.fs.FileSystem.from_uri`` opens (``file://``, ``s3://``, ``gs://``, ``hdfs://``).
        keep_last: K, how many complete checkpoints to keep (>= 1; >= 2 leaves a fallback).
        filesystem: use this filesystem, with ``uri`` as the root path inside it (tests, custom auth).
    """

    def __init__(
        self, uri: str | os.PathLike[str], *, keep_last: int = 3, filesystem: pafs.FileSystem | None = None
    ):
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ConfigError(f"DurableStore.keep_last={keep_last!r} is invalid: must be an integer >= 1")
        self.uri = os.fspath(uri)
        self.keep_last = keep_last
        self.fs, root = _open(self.uri) if filesystem is None else (filesystem, self.uri)
        self.root = root.rstrip("/")

    def __repr__(self) -> str:
        return f"DurableStore({self.uri!r}, keep_last={self.keep_last})"

    # -- writing ------------------------------------------------------------------------------------

    def write(
        self, step: int, parts: Mapping[str, Snapshot | bytes], *, meta: Any = None, prune: bool = True
    ) -> CheckpointInfo:
        """Write one consistent checkpoint of ``parts`` (name -> Snapshot or its encoded bytes) at ``step``.

        Every part's snapshot must be at ``step``. ``meta`` is a small tree without arrays (data-loader
        position, mesh, config) stored in the manifest. An existing directory for ``step`` is replaced
        (its marker removed first). With ``prune``, older checkpoints beyond ``keep_last`` are removed
        after this one completes.
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"step={step!r} is invalid: must be an integer >= 0")
        if not parts:
            raise ConfigError(f"checkpoint of step {step} has no parts; pass at least one Snapshot")
        meta_skeleton, meta_arrays = flatten(meta, "meta")
        if meta_arrays:
            raise SnapshotFormatError(
                f"checkpoint meta holds arrays {sorted(meta_arrays)[:5]}; put arrays into a part's Snapshot"
            )
        blobs = {check_part_name(name): _encode_part(step, name, parts[name]) for name in sorted(parts)}
        directory = self._dir(step)
        if self._marker(step) is not None:
            logger.warning("replacing the complete checkpoint at step %d in %s", step, self.uri)
        self._clear(step)
        self.fs.create_dir(directory, recursive=True)
        entries = []
        for name, (blob, tensors) in blobs.items():
            file = f"{name}{SUFFIX}"
            write_file(self.fs, f"{directory}/{file}", blob)
            entries.append(PartEntry(name, file, len(blob), hashlib.sha256(blob).hexdigest(), tensors))
        manifest = encode_manifest(step, meta_skeleton, entries)
        write_file(self.fs, f"{directory}/{MANIFEST}", manifest)
        write_file(self.fs, f"{directory}/{MARKER}", marker_bytes(manifest))  # last: the commit point
        total = sum(e.nbytes for e in entries)
        logger.info(
            "checkpoint step %d complete: %d parts, %d bytes in %s", step, len(entries), total, directory
        )
        if prune:
            self.prune()
        return CheckpointInfo(step, directory, {e.name: e for e in entries}, meta)

    def prune(self) -> list[int]:
        """Remove complete checkpoints beyond the newest ``keep_last``, and incomplete directories older
        than the newest complete one. Returns the removed steps. Failures are logged, not raised."""
        complete, incomplete = self._scan()
        doomed = complete[: -self.keep_last] if len(complete) > self.keep_last else []
        if complete:
            doomed += [s for s in incomplete if s < complete[-1]]
        removed = []
        for step in sorted(doomed):
            try:
                self._clear(step)
                self.fs.delete_dir(self._dir(step))
            except OSError as e:
                logger.warning("could not remove checkpoint %s: %s", self._dir(step), e)
                continue
            removed.append(step)
        if removed:
            logger.info("pruned checkpoints at steps %s from %s", removed, self.uri)
        return removed

    # -- reading ------------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of complete checkpoints (a well-formed marker), oldest first. Not yet verified."""
        return self._scan()[0]

    def verify(self, step: int) -> CheckpointInfo:
        """The checkpoint at ``step`` after checking its marker, manifest and every part file's size and
        sha256. Raises ``CorruptCheckpointError`` naming the first file that fails."""
        info = self.info(step)
        for part in info.parts.values():
            path = f"{info.path}/{part.file}"
            size, digest = hash_file(self.fs, path, part.file, step)
            check_file(part, path, size, digest, step)
        return info

    def latest(self) -> CheckpointInfo | None:
        """The newest complete checkpoint whose every file verifies, or ``None`` if there is none at all.

        Newer checkpoints that fail are logged and listed in ``skipped``. If complete checkpoints exist
        but none verifies, raises ``NoValidCheckpointError`` rather than letting a run start over.
        """
        failures: list[CorruptCheckpointError] = []
        for step in reversed(self.steps()):
            try:
                info = self.verify(step)
            except CorruptCheckpointError as e:
                logger.error(
                    "skipping checkpoint step %d in %s, trying the previous one: %s", step, self.uri, e
                )
                failures.append(e)
                continue
            return replace(info, skipped=tuple(failures))
        if failures:
            raise NoValidCheckpointError(uri=self.uri, failures=failures)
        return None

    def info(self, step: int) -> CheckpointInfo:
        """The manifest of the complete checkpoint at ``step``, checked against its marker (part files are
        not read; ``verify`` reads them)."""
        expected = self._marker(step)
        if expected is None:
            raise CheckpointError(
                f"no complete checkpoint at step {step} in {self.uri}; complete: {self.steps()}"
            )
        directory = self._dir(step)
        path = f"{directory}/{MANIFEST}"
        data = read_file(self.fs, path, MANIFEST, step)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            detail = f"sha256 {actual} differs from the {expected} its {MARKER} marker records"
            raise file_error(MANIFEST, path, step, detail, expected=expected, actual=actual)
        parts, meta = decode_manifest(data, path=path, step=step)
        return CheckpointInfo(step, directory, parts, meta)

    def load(self, checkpoint: int | CheckpointInfo, part: str) -> Snapshot:
        """One part of a checkpoint, verified (file sha256, then every tensor's sha256)."""
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else self.info(checkpoint)
        if part not in info.parts:
            raise CheckpointError(
                f"checkpoint step {info.step} has no part {part!r}; it has {sorted(info.parts)[:10]}"
            )
        entry = info.parts[part]
        path = f"{info.path}/{entry.file}"
        blob = read_file(self.fs, path, entry.file, info.step)
        check_file(entry, path, len(blob), hashlib.sha256(blob).hexdigest(), info.step)
        return decode_snapshot(blob, source=path)

    def load_all(self, checkpoint: int | CheckpointInfo) -> dict[str, Snapshot]:
        """Every part of a checkpoint, verified."""
        info = checkpoint if isinstance(checkpoint, CheckpointInfo) else self.info(checkpoint)
        return {name: self.load(info, name) for name in info.parts}

    # -- internals ----------------------------------------------------------------------------------

    def _dir(self, step: int) -> str:
        return f"{self.root}/{step_dir_name(step)}"

    def _scan(self) -> tuple[list[int], list[int]]:
        complete, incomplete = [], []
        for info in self.fs.get_file_info(pafs.FileSelector(self.root or "/", allow_not_found=True)):
            step = parse_step_dir(info.base_name)
            if info.type != pafs.FileType.Directory or step is None:
                continue
            (complete if self._marker(step) is not None else incomplete).append(step)
        return sorted(complete), sorted(incomplete)

    def _marker(self, step: int) -> str | None:
        """The manifest sha256 the marker of ``step`` records, or None if it is absent or malformed."""
        try:
            with self.fs.open_input_stream(f"{self._dir(step)}/{MARKER}") as f:
                sha = parse_marker(f.read(100))
        except FileNotFoundError:
            return None
        if sha is None:
            logger.debug("ignoring %s: its marker is malformed (interrupted write?)", self._dir(step))
        return sha

    def _clear(self, step: int) -> None:
        """Empty a step directory, marker first, so no reader ever sees it half-removed."""
        directory = self._dir(step)
        if self.fs.get_file_info(directory).type != pafs.FileType.Directory:
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{directory}/{MARKER}")
        self.fs.delete_dir_contents(directory, missing_dir_ok=True)


def _encode_part(step: int, name: str, part: Snapshot | bytes) -> tuple[bytes, tuple[TensorEntry, ...]]:
    if isinstance(part, Snapshot):
        blob = encode_snapshot(part)
    elif isinstance(part, (bytes, bytearray, memoryview)):
        blob = bytes(part)
    else:
        raise SnapshotFormatError(
            f"part {name!r} is a {type(part).__name__}; pass a Snapshot or the bytes of encode_snapshot"
        )
    manifest = read_manifest(blob, source=name)
    if manifest.step != step:
        raise CheckpointError(
            f"part {name!r} holds the snapshot of step {manifest.step}, but the checkpoint is of step "
            f"{step}: a checkpoint must be consistent; pass every part's snapshot of step {step}"
        )
    return blob, manifest.tensors


def _open(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise CheckpointError(
            f"cannot open checkpoint URI {uri!r}: {e}. Use a local path or a URI pyarrow.fs supports "
            "(file://, s3://, gs://, hdfs://) with its credentials configured"
        ) from e
