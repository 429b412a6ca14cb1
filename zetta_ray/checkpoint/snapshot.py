"""One unit's state at one step, as bytes: the snapshot format.

A ``Snapshot`` is named parameter arrays plus trees of everything else a restore needs (optimizer
state, RNG state, data-loader position, mesh, free-form extras). ``encode_snapshot`` turns it into
bytes that are a valid **safetensors** file, so any safetensors reader can open a stored part:

- Every array of every tree becomes one safetensors tensor, named by its path (``"tensors/0.3.w1"``,
  ``"optimizer/state/0/exp_avg"``, ``"rng/torch"``; see ``checkpoint.tree``).
- The safetensors header's ``__metadata__`` holds a single key, ``"zetta_ray"``, whose value is
  ``"v1:<sha256 hex>:<base64 of a msgpack manifest>"``. The manifest records the step, one entry per
  tensor (name, shape, dtype, byte length, sha256 of its bytes) and the msgpack skeleton of the trees.
  One key, not several, because safetensors writes metadata keys in hash order and the bytes of a
  snapshot must depend only on its contents (two identical runs give byte-identical checkpoints).

Decoding never unpickles: safetensors, JSON, base64 and msgpack only. It checks the manifest's own
sha256, then every tensor's dtype, shape, byte length and sha256, and raises
``CorruptCheckpointError`` naming the first tensor that differs.

Trade-offs: safetensors copies once on encode and once on decode (it takes ``bytes``, not a buffer),
and hashing costs about one pass over the data (~1 GB/s per core). Both happen off the training
thread in the trickle pipeline. Dtypes are those numpy and safetensors share, little-endian: bool,
(u)int8..64, float16/32/64. bfloat16 travels as its bits in a uint16 array (``t.view(torch.uint16)``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
from msgpack.exceptions import UnpackException
from safetensors import SafetensorError

from zetta_ray.checkpoint.tree import flatten, pack, unflatten, unpack
from zetta_ray.errors import CorruptCheckpointError, SnapshotFormatError

__all__ = [
    "GRADIENT_RECORD",
    "Snapshot",
    "SnapshotManifest",
    "TensorEntry",
    "decode_snapshot",
    "encode_snapshot",
    "read_manifest",
]

GRADIENT_RECORD = "gradients"  # ``Snapshot.extra["kind"]`` of a gradient record
_META_KEY = "zetta_ray"
_VERSION = "v1"
_FIELDS = ("tensors", "optimizer", "rng", "data_position", "mesh", "extra")
_DTYPES = frozenset(
    np.dtype(t).newbyteorder("<").str
    for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64)
) | frozenset(("<f2", "<f4", "<f8"))
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


@dataclass(kw_only=True, slots=True, eq=False)
class Snapshot:
    """The state of one part (an expert unit, or the controller's dense model) after ``step``.

    Attributes:
        step: optimizer steps completed when the state was taken.
        tensors: parameters and buffers by name (``{"0.3.w1": array}``), C-order numpy arrays.
        optimizer: the optimizer's state tree (``optimizer.state_dict()`` with tensors as numpy).
        rng: RNG states (``{"torch": uint8 array, "numpy": (...)}``, bytes or ints).
        data_position: where the data loader resumes (a small dict).
        mesh: the mesh and the part's place in it (a small dict).
        extra: anything else a restore needs; same value rules as the other trees.
    """

    step: int
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    optimizer: Any = None
    rng: dict[str, Any] = field(default_factory=dict)
    data_position: dict[str, Any] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise SnapshotFormatError(f"Snapshot.step={self.step!r} is invalid: must be an integer >= 0")
        bad = [k for k, v in self.tensors.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
        if bad:
            raise SnapshotFormatError(
                f"Snapshot.tensors must map str names to numpy arrays; offending keys {bad[:5]!r} "
                "(convert torch tensors with .detach().cpu().numpy())"
            )

    @property
    def is_gradient_record(self) -> bool:
        """Whether this is a compute unit's gradient record (``extra["kind"] == "gradients"``): the
        gradients and hyperparameters of one optimizer step, which redo that step on the state of the
        step before (``zetta_ray.actors.snapshot``), not a full state."""
        return self.extra.get("kind") == GRADIENT_RECORD

    @property
    def nbytes(self) -> int:
        """Bytes of every array in the snapshot (its tensors and the arrays in its trees)."""
        return sum(_tree_nbytes(getattr(self, name)) for name in _FIELDS)


def _tree_nbytes(node: Any) -> int:
    if isinstance(node, np.ndarray):
        return node.nbytes
    if isinstance(node, Mapping):
        return sum(_tree_nbytes(v) for v in node.values())
    if isinstance(node, (list, tuple)):
        return sum(_tree_nbytes(v) for v in node)
    return 0


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor as the manifest records it. ``dtype`` is numpy's ``dtype.str`` (``"<f4"``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    sha256: str

    def to_msgpack(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "nbytes": self.nbytes,
            "sha256": self.sha256,
        }

    @classmethod
    def from_msgpack(cls, d: Mapping[str, Any]) -> TensorEntry:
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["nbytes"], d["sha256"])


@dataclass(frozen=True, slots=True)
class SnapshotManifest:
    """What a snapshot holds, readable without decoding its tensors (``read_manifest``)."""

    step: int
    tensors: tuple[TensorEntry, ...]
    skeleton: Any

    @property
    def tensor_nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def encode_snapshot(snapshot: Snapshot) -> bytes:
    """The snapshot as safetensors bytes with its manifest (see the module docstring).

    Raises ``SnapshotFormatError`` naming the path of a value that cannot be stored exactly.
    """
    tree = {name: getattr(snapshot, name) for name in _FIELDS}
    skeleton, arrays = flatten(tree)
    entries = []
    contiguous: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        if a.dtype.str not in _DTYPES:
            raise SnapshotFormatError(
                f"tensor {name!r} has dtype {a.dtype.str!r}, which snapshots do not store; supported: "
                f"{sorted(_DTYPES)} (bfloat16: store t.view(torch.uint16); big-endian: .astype('<...'))"
            )
        # safetensors reads raw memory: a strided view would be stored garbled. (Not np.ascontiguousarray,
        # which turns a 0-d array into a 1-d one.)
        c = a if a.flags.c_contiguous else a.copy(order="C")
        contiguous[name] = c
        entries.append(TensorEntry(name, tuple(c.shape), c.dtype.str, c.nbytes, _digest(c)))
    manifest = pack(
        {
            "step": snapshot.step,
            "tensors": [e.to_msgpack() for e in entries],
            "skeleton": skeleton,
        }
    )
    value = f"{_VERSION}:{hashlib.sha256(manifest).hexdigest()}:{base64.b64encode(manifest).decode()}"
    return safetensors.numpy.save(contiguous, metadata={_META_KEY: value})


def read_manifest(data: bytes | bytearray | memoryview, *, source: str | None = None) -> SnapshotManifest:
    """Parse and verify the manifest of an encoded snapshot without touching its tensor bytes.

    ``data`` may be just the file's first bytes, as long as it covers the safetensors header. ``source``
    (a file name) is used in error messages.
    """
    name = source or "<snapshot bytes>"
    view = memoryview(data)
    if len(view) < 8:
        raise _corrupt("header", name, source, f"{len(view)} bytes is too short to be a snapshot")
    (n,) = struct.unpack("<Q", view[:8])
    if n > _MAX_HEADER or 8 + n > len(view):
        raise _corrupt(
            "header", name, source, f"header length {n} does not fit in {len(view)} bytes (truncated?)"
        )
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
        value = header["__metadata__"][_META_KEY]
        version, sha, b64 = value.split(":", 2)
        manifest_bytes = base64.b64decode(b64, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as e:
        detail = f"not a zetta_ray snapshot header ({type(e).__name__}: {e})"
        raise _corrupt("header", name, source, detail) from e
    if version != _VERSION:
        raise SnapshotFormatError(f"{name}: snapshot format {version!r} is not supported (this reads v1)")
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if actual != sha:
        raise _corrupt("manifest", name, source, "sha256 mismatch", expected=sha, actual=actual)
    try:
        m = unpack(manifest_bytes)
        return SnapshotManifest(
            step=m["step"],
            tensors=tuple(TensorEntry.from_msgpack(t) for t in m["tensors"]),
            skeleton=m["skeleton"],
        )
    except (ValueError, KeyError, TypeError, UnpackException, SnapshotFormatError) as e:
        raise _corrupt("manifest", name, source, f"unreadable ({type(e).__name__}: {e})") from e


def decode_snapshot(data: bytes | bytearray | memoryview, *, source: str | None = None) -> Snapshot:
    """The ``Snapshot`` ``encode_snapshot`` wrote, bit for bit, after checking every tensor's sha256.

    Raises ``CorruptCheckpointError`` (``kind="tensor"``, ``name=<tensor>``) when a tensor's bytes,
    shape, dtype or length differ from its manifest entry, and ``kind="header"``/``"manifest"``/
    ``"file"`` when the container itself is damaged. Arrays in the result are fresh and writable.
    """
    name = source or "<snapshot bytes>"
    manifest = read_manifest(data, source=source)
    blob = data if isinstance(data, bytes) else bytes(data)
    try:
        arrays = safetensors.numpy.load(blob)
    except SafetensorError as e:
        raise _corrupt("file", name, source, f"safetensors cannot parse it ({e})", step=manifest.step) from e
    expected = {t.name for t in manifest.tensors}
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise _corrupt(
            "file", name, source, f"tensors missing {missing[:5]}, unexpected {extra[:5]}", step=manifest.step
        )
    for entry in manifest.tensors:
        a = arrays[entry.name]
        got = (tuple(a.shape), a.dtype.str, a.nbytes)
        if got != (entry.shape, entry.dtype, entry.nbytes):
            raise _corrupt(
                "tensor",
                entry.name,
                source,
                "shape/dtype/nbytes differ from the manifest",
                expected=(entry.shape, entry.dtype, entry.nbytes),
                actual=got,
                step=manifest.step,
            )
        actual = _digest(a)
        if actual != entry.sha256:
            raise _corrupt(
                "tensor",
                entry.name,
                source,
                "sha256 mismatch",
                expected=entry.sha256,
                actual=actual,
                step=manifest.step,
            )
    try:
        tree = unflatten(manifest.skeleton, arrays)
    except SnapshotFormatError as e:
        raise _corrupt("manifest", name, source, str(e), step=manifest.step) from e
    return Snapshot(step=manifest.step, **tree)


def _corrupt(
    kind: str,
    name: str,
    source: str | None,
    detail: str,
    *,
    expected: object = None,
    actual: object = None,
    step: int | None = None,
) -> CorruptCheckpointError:
    if expected is not None:
        detail = f"{detail}: expected {expected}, got {actual}"
    return CorruptCheckpointError(
        kind=kind, name=name, path=source, detail=detail, expected=expected, actual=actual, step=step
    )
