"""Nested state trees <-> (msgpack skeleton, named arrays), without pickle.

An optimizer's state is a tree: ``torch.optim.Optimizer.state_dict()`` converted to numpy is
``{"state": {0: {"step": array(3.), "exp_avg": array(...)}}, "param_groups": [{"lr": 0.1,
"betas": (0.9, 0.999), "params": [0, 1], ...}]}``. To store it without pickle, ``flatten`` walks the
tree once: every numpy array is taken out and given a name (its path, ``"state/0/exp_avg"``), and what
is left, the *skeleton*, is plain msgpack with four extension types standing where msgpack has no
exact equivalent:

- ``_EXT_ARRAY``: a reference to a named array (payload: the name, utf-8).
- ``_EXT_TUPLE``: a tuple (msgpack has only lists; ``betas`` must come back as a tuple).
- ``_EXT_SCALAR``: a numpy scalar such as ``np.float32(0.5)`` (payload: dtype string + its bytes).
- ``_EXT_BIGINT``: an int outside msgpack's 64-bit range, such as numpy's 128-bit PCG64 state
  (payload: two's-complement big-endian bytes).

Supported leaves: ``None``, ``bool``, ``int`` (any size), ``float`` (as float64, exact),
``str``, ``bytes``, numpy scalars and arrays. Containers: ``dict`` (keys ``str``, ``int`` or
``bytes``; key order is kept), ``list``, ``tuple``. A ``dict`` subclass comes back as a plain ``dict``.
Anything else (a torch tensor, a ``set``, a custom object) is refused with its path, rather than
being converted to something that does not round-trip exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np

from zetta_ray.errors import SnapshotFormatError

__all__ = ["flatten", "pack", "unflatten", "unpack"]

_EXT_ARRAY = 1
_EXT_TUPLE = 2
_EXT_SCALAR = 3
_EXT_BIGINT = 4
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def flatten(tree: Any, prefix: str = "") -> tuple[Any, dict[str, np.ndarray]]:
    """Split ``tree`` into a msgpack-ready skeleton and its arrays, named by path under ``prefix``.

    Names are the path's keys joined by ``/`` (``"optimizer/state/0/exp_avg"``); if two paths give the
    same name (keys ``0`` and ``"0"`` in one dict) the later one gets a ``#n`` suffix. The arrays are
    the caller's objects, not copies.
    """
    arrays: dict[str, np.ndarray] = {}
    skeleton = _flatten(tree, prefix, arrays)
    return skeleton, arrays


def unflatten(skeleton: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    """Rebuild the tree ``flatten`` split: put each referenced array back in its place."""
    return _rebuild(skeleton, arrays)


def pack(skeleton: Any) -> bytes:
    """msgpack bytes of a skeleton (``flatten``'s first result, or any tree without arrays)."""
    return msgpack.packb(skeleton, use_bin_type=True)


def unpack(data: bytes) -> Any:
    """The skeleton ``pack`` wrote. Array references stay references until ``unflatten``."""
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_ext_hook)


class _ArrayRef:
    """An array's place in an unpacked skeleton."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


def _join(prefix: str, key: object) -> str:
    return f"{prefix}/{key}" if prefix else str(key)


def _flatten(node: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    # numpy first (np.float64 is a float subclass, np.str_ a str subclass: they must keep their type),
    # then bool before int (bool is an int subclass; both pack natively).
    if isinstance(node, np.ndarray):
        name = path or "<root>"
        n = 1
        while name in arrays:
            name = f"{path}#{n}"
            n += 1
        arrays[name] = node
        return msgpack.ExtType(_EXT_ARRAY, name.encode())
    if isinstance(node, np.generic):
        return msgpack.ExtType(_EXT_SCALAR, pack([node.dtype.str, node.tobytes()]))
    if node is None or isinstance(node, (bool, str, float, bytes)):
        return node
    if isinstance(node, int):
        if _INT_MIN <= node <= _INT_MAX:
            return node
        return msgpack.ExtType(_EXT_BIGINT, node.to_bytes(node.bit_length() // 8 + 1, "big", signed=True))
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if not isinstance(key, (str, int, bytes)) or isinstance(key, bool):
                raise SnapshotFormatError(
                    f"dict key {key!r} ({type(key).__name__}) at {path or '<root>'!r} is not supported; "
                    "keys must be str, int or bytes"
                )
            out[key] = _flatten(value, _join(path, key), arrays)
        return out
    if isinstance(node, list):
        return [_flatten(v, _join(path, i), arrays) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        items = [_flatten(v, _join(path, i), arrays) for i, v in enumerate(node)]
        return msgpack.ExtType(_EXT_TUPLE, pack(items))
    hint = " (convert torch tensors with .numpy())" if type(node).__module__.startswith("torch") else ""
    raise SnapshotFormatError(
        f"value of type {type(node).__module__}.{type(node).__qualname__} at {path or '<root>'!r} cannot "
        f"be stored in a snapshot{hint}; use numpy arrays, numpy scalars, None, bool, int, float, str, "
        "bytes, dict, list or tuple"
    )


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_ARRAY:
        return _ArrayRef(data.decode())
    if code == _EXT_TUPLE:
        return tuple(unpack(data))
    if code == _EXT_SCALAR:
        dtype, raw = unpack(data)
        return np.frombuffer(raw, dtype=np.dtype(dtype), count=1)[0]
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise SnapshotFormatError(f"unknown msgpack extension type {code} in a snapshot skeleton")


def _rebuild(node: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(node, _ArrayRef):
        try:
            return arrays[node.name]
        except KeyError:
            raise SnapshotFormatError(
                f"the skeleton references array {node.name!r}, which the snapshot does not hold"
            ) from None
    if isinstance(node, dict):
        return {k: _rebuild(v, arrays) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebuild(v, arrays) for v in node]
    if isinstance(node, tuple):
        return tuple(_rebuild(v, arrays) for v in node)
    return node
