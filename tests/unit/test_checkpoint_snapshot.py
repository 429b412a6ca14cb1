"""The snapshot format: bitwise round trips, nested optimizer trees, named corruption errors, no pickle."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

from zetta_ray.checkpoint import (
    CorruptCheckpointError,
    DurableStore,
    Snapshot,
    SnapshotFormatError,
    decode_snapshot,
    encode_snapshot,
    read_manifest,
)

pytestmark = pytest.mark.unit


def _numpy_tree(obj):
    """torch tensors -> numpy, as ComputeUnit.optimizer_state_dict does."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().numpy()
    if isinstance(obj, dict):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_tree(v) for v in obj)
    return obj


def assert_same_tree(a, b, path="<root>"):
    """Bitwise equality, types included (a tuple is not a list, np.float32 is not float)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert (a.dtype, a.tobytes()) == (b.dtype, b.tobytes()), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{path}: key type of {k!r}"
            assert_same_tree(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{path}/{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def _adamw_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(2):
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()
    return model, opt


def _round_trip(snap: Snapshot) -> Snapshot:
    return decode_snapshot(encode_snapshot(snap))


def test_tensors_round_trip_bitwise_across_dtypes():
    f32 = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, 1 / 3], dtype=np.float32)
    bf16 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    tensors = {
        "f32": f32,
        "f16": np.linspace(-65504, 65504, 7).astype(np.float16),
        "bf16": bf16.view(torch.uint16).numpy(),
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64),
        "u8": np.arange(256, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "f64_scalar": np.array(np.pi),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    }
    out = _round_trip(Snapshot(step=7, tensors=tensors))
    assert out.step == 7
    assert list(out.tensors) == list(tensors)
    for name, a in tensors.items():
        b = out.tensors[name]
        assert (b.dtype, b.shape) == (a.dtype, a.shape), name
        assert np.ascontiguousarray(a).tobytes() == b.tobytes(), name
        assert b.flags.writeable and b.flags.c_contiguous, name
    restored = torch.from_numpy(out.tensors["bf16"]).view(torch.bfloat16)
    assert torch.equal(restored.view(torch.int16), bf16.view(torch.int16))


def test_nested_optimizer_state_round_trips_exactly_and_loads_into_torch():
    model, opt = _adamw_state()
    state = _numpy_tree(opt.state_dict())
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    sgd.step()
    snap = Snapshot(step=2, optimizer={"adamw": state, "sgd": _numpy_tree(sgd.state_dict())})
    out = _round_trip(snap)
    assert_same_tree(snap.optimizer, out.optimizer)
    assert isinstance(out.optimizer["adamw"]["param_groups"][0]["betas"], tuple)
    assert 0 in out.optimizer["adamw"]["state"]  # int keys stay ints

    fresh = torch.optim.AdamW(model.parameters(), lr=1.0)
    fresh.load_state_dict(
        {
            "state": {
                k: {n: torch.from_numpy(v) for n, v in s.items()}
                for k, s in out.optimizer["adamw"]["state"].items()
            },
            "param_groups": out.optimizer["adamw"]["param_groups"],
        }
    )
    assert_same_tree(_numpy_tree(fresh.state_dict()), state)


def test_rng_states_and_metadata_round_trip():
    py = random.Random(3)
    rng = {
        "torch": torch.Generator().manual_seed(5).get_state().numpy(),
        "numpy": np.random.default_rng(11).bit_generator.state,  # holds 128-bit ints
        "python": py.getstate(),
        "seed_bytes": b"\x00\xffseed",
        "scalar": np.float32(0.25),
        "huge": -(2**200) + 1,
    }
    snap = Snapshot(
        step=9,
        rng=rng,
        data_position={"shard": 3, "offset": 4096, "epoch": 0},
        mesh={"shape": (2, 4), "axes": ("dp", "ep"), "unit": 5},
        extra={"lr": 3e-4, "none": None, "flag": True},
    )
    out = _round_trip(snap)
    for name in ("rng", "data_position", "mesh", "extra"):
        assert_same_tree(getattr(snap, name), getattr(out, name))
    py2 = random.Random()
    py2.setstate(out.rng["python"])
    assert [py2.random() for _ in range(3)] == [py.random() for _ in range(3)]


def test_encoding_is_deterministic_and_manifest_lists_every_tensor():
    _, opt = _adamw_state()
    snap = Snapshot(
        step=2, tensors={"w": np.ones((2, 3), np.float32)}, optimizer=_numpy_tree(opt.state_dict())
    )
    blob = encode_snapshot(snap)
    assert blob == encode_snapshot(snap)
    header_end = 8 + int.from_bytes(blob[:8], "little")
    manifest = read_manifest(blob[:header_end])  # the header alone is enough
    names = [t.name for t in manifest.tensors]
    assert names[0] == "tensors/w" and "optimizer/state/0/exp_avg" in names
    w = manifest.tensors[0]
    assert (w.shape, w.dtype, w.nbytes, len(w.sha256)) == ((2, 3), "<f4", 24, 64)


def test_flipped_tensor_byte_is_named():
    target = np.arange(1000, 1064, dtype=np.int64)
    snap = Snapshot(step=1, tensors={"a": np.zeros(8, np.float32), "target": target, "z": np.ones(3)})
    blob = bytearray(encode_snapshot(snap))
    at = bytes(blob).find(target.tobytes())
    blob[at + 100] ^= 0x01
    with pytest.raises(CorruptCheckpointError, match="tensors/target") as info:
        decode_snapshot(bytes(blob), source="unit-0001.safetensors")
    assert info.value.kind == "tensor" and info.value.name == "tensors/target"
    assert info.value.path == "unit-0001.safetensors" and info.value.step == 1
    assert info.value.expected != info.value.actual


@pytest.mark.parametrize("damage", ["manifest", "truncate", "short"])
def test_damaged_container_is_a_named_error(damage):
    blob = bytearray(encode_snapshot(Snapshot(step=1, tensors={"w": np.ones(64, np.float32)})))
    if damage == "manifest":
        at = bytes(blob).find(b'"zetta_ray":"v1:') + 100
        blob[at] = ord("A") if blob[at] != ord("A") else ord("B")
    elif damage == "truncate":
        del blob[-10:]
    else:
        del blob[6:]
    with pytest.raises(CorruptCheckpointError, match="part.safetensors"):
        decode_snapshot(bytes(blob), source="part.safetensors")


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"w": torch.ones(2)}, r"extra/w.*\.numpy\(\)"),
        ({"s": {1, 2}}, "extra/s"),
        ({(1, 2): 3}, "dict key"),
        ({"c": np.ones(2, np.complex64)}, "extra/c.*dtype"),
        ({"be": np.ones(2, ">f4")}, "big-endian"),
    ],
)
def test_unsupported_values_are_refused_with_their_path(tree, match):
    with pytest.raises(SnapshotFormatError, match=match):
        encode_snapshot(Snapshot(step=0, extra=tree))


def test_snapshot_validates_its_fields():
    with pytest.raises(SnapshotFormatError, match="step"):
        Snapshot(step=-1)
    with pytest.raises(SnapshotFormatError, match="numpy arrays"):
        Snapshot(step=0, tensors={"w": [1.0]})


def test_loading_never_unpickles(monkeypatch, tmp_path):
    _, opt = _adamw_state()
    snap = Snapshot(step=4, tensors={"w": np.ones(3)}, optimizer=_numpy_tree(opt.state_dict()))
    blob = encode_snapshot(snap)
    store = DurableStore(tmp_path)
    store.write(4, {"unit-0000": snap}, meta={"data_position": {"offset": 8}})

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    assert_same_tree(decode_snapshot(blob).optimizer, snap.optimizer)
    info = store.latest()
    assert info is not None and info.meta == {"data_position": {"offset": 8}}
    assert_same_tree(store.load_all(info)["unit-0000"].optimizer, snap.optimizer)
