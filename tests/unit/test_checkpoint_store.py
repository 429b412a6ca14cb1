"""DurableStore: layout, atomic commit, verification with fallback, pruning."""

from __future__ import annotations

import logging

import msgpack
import numpy as np
import pyarrow.fs as pafs
import pytest

from zetta_ray.checkpoint import (
    MANIFEST,
    MARKER,
    CheckpointError,
    CorruptCheckpointError,
    DurableStore,
    NoValidCheckpointError,
    Snapshot,
    encode_snapshot,
    step_dir_name,
)
from zetta_ray.errors import ConfigError

pytestmark = pytest.mark.unit


def _parts(step: int, units: int = 2) -> dict[str, Snapshot | bytes]:
    parts: dict[str, Snapshot | bytes] = {
        f"unit-{u:04d}": Snapshot(
            step=step,
            tensors={f"0.{u}.w1": np.full((4, 3), step + u / 10, np.float32)},
            optimizer={
                "state": {0: {"step": np.array(float(step), np.float32)}},
                "param_groups": [{"lr": 0.1}],
            },
        )
        for u in range(units)
    }
    # The controller's part arrives already encoded, as a MemoryPool would hold it.
    parts["controller"] = encode_snapshot(
        Snapshot(step=step, tensors={"emb": np.arange(6.0)}, data_position={"i": step})
    )
    return parts


def _write(store: DurableStore, *steps: int) -> None:
    for step in steps:
        store.write(step, _parts(step), meta={"data_position": {"offset": step * 8}, "mesh": {"ep": 2}})


def _file(tmp_path, step: int, name: str):
    return tmp_path / step_dir_name(step) / name


def test_write_then_load_round_trips_with_layout_and_manifest(tmp_path):
    store = DurableStore(tmp_path)
    _write(store, 5)
    directory = tmp_path / "step-000000005"
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [MARKER, MANIFEST, "controller.safetensors", "unit-0000.safetensors", "unit-0001.safetensors"]
    )
    manifest = msgpack.unpackb((directory / MANIFEST).read_bytes(), strict_map_key=False)
    assert (manifest["format"], manifest["step"]) == ("zetta-ray-checkpoint", 5)
    unit0 = next(p for p in manifest["parts"] if p["name"] == "unit-0000")
    assert unit0["nbytes"] == (directory / "unit-0000.safetensors").stat().st_size
    assert {t["name"] for t in unit0["tensors"]} == {"tensors/0.0.w1", "optimizer/state/0/step"}
    assert set(unit0["tensors"][0]) == {"name", "shape", "dtype", "nbytes", "sha256"}

    info = store.latest()
    assert info is not None and (info.step, info.skipped) == (5, ())
    assert info.meta == {"data_position": {"offset": 40}, "mesh": {"ep": 2}}
    loaded = store.load_all(info)
    assert sorted(loaded) == ["controller", "unit-0000", "unit-0001"]
    np.testing.assert_array_equal(loaded["unit-0001"].tensors["0.1.w1"], np.full((4, 3), 5.1, np.float32))
    assert loaded["controller"].data_position == {"i": 5}


def test_uri_forms_and_empty_store(tmp_path):
    assert DurableStore(tmp_path / "nothing-yet").latest() is None
    store = DurableStore(f"file://{tmp_path}")
    _write(store, 1)
    assert DurableStore(str(tmp_path)).steps() == [1]
    with pytest.raises(CheckpointError, match="cannot open checkpoint URI"):
        DurableStore("nosuchscheme://bucket/x")


def test_keep_last_k_prunes_older_checkpoints_and_stale_partials(tmp_path):
    store = DurableStore(tmp_path, keep_last=2)
    _write(store, 1)
    (tmp_path / step_dir_name(0)).mkdir()  # a partial write from a crash, older than a complete one
    _write(store, 2, 3, 4, 5)
    assert store.steps() == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir_name(4), step_dir_name(5)]


def test_directory_without_valid_marker_is_ignored(tmp_path):
    store = DurableStore(tmp_path)
    _write(store, 1, 2, 3)
    _file(tmp_path, 3, MARKER).unlink()
    _file(tmp_path, 2, MARKER).write_bytes(b"3f2a")  # an interrupted marker write
    assert store.steps() == [1]
    assert store.latest().step == 1
    with pytest.raises(CheckpointError, match="no complete checkpoint at step 3"):
        store.load(3, "controller")


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_part_file_is_named_and_latest_falls_back(tmp_path, caplog, damage):
    store = DurableStore(tmp_path)
    _write(store, 1, 2)
    path = _file(tmp_path, 2, "unit-0001.safetensors")
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        del data[-7:]
    else:
        data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))

    with caplog.at_level(logging.ERROR, logger="zetta_ray.checkpoint"):
        info = store.latest()
    assert info is not None and info.step == 1
    (skipped,) = info.skipped
    assert (skipped.kind, skipped.name, skipped.step) == ("file", "unit-0001.safetensors", 2)
    assert skipped.path == str(path)
    assert "unit-0001.safetensors" in caplog.text
    with pytest.raises(CorruptCheckpointError, match="unit-0001.safetensors"):
        store.load(2, "unit-0001")
    store.load(2, "unit-0000")  # the intact parts of step 2 still load
    assert store.load_all(info)["unit-0001"].step == 1


def test_damaged_manifest_is_named_and_latest_falls_back(tmp_path):
    store = DurableStore(tmp_path)
    _write(store, 1, 2)
    path = _file(tmp_path, 2, MANIFEST)
    data = bytearray(path.read_bytes())
    data[10] ^= 0x01
    path.write_bytes(bytes(data))
    info = store.latest()
    assert info.step == 1 and info.skipped[0].name == MANIFEST


def test_no_valid_checkpoint_is_an_error_listing_every_file(tmp_path):
    store = DurableStore(tmp_path)
    _write(store, 1, 2)
    for step in (1, 2):
        _file(tmp_path, step, "controller.safetensors").write_bytes(b"garbage")
    with pytest.raises(NoValidCheckpointError, match="controller.safetensors") as info:
        store.latest()
    assert [f.step for f in info.value.failures] == [2, 1]


def test_inconsistent_or_badly_named_parts_are_refused(tmp_path):
    store = DurableStore(tmp_path)
    with pytest.raises(CheckpointError, match="'unit-0000' holds the snapshot of step 4"):
        store.write(5, {"unit-0000": Snapshot(step=4)})
    with pytest.raises(ConfigError, match="part name '../x'"):
        store.write(5, {"../x": Snapshot(step=5)})
    with pytest.raises(ConfigError, match="no parts"):
        store.write(5, {})
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_step_replaces_it(tmp_path):
    store = DurableStore(tmp_path)
    _write(store, 1)
    store.write(1, {"controller": Snapshot(step=1, extra={"v": 2})})
    assert sorted(store.latest().parts) == ["controller"]
    assert store.load(1, "controller").extra == {"v": 2}


class _Recording(pafs.FileSystemHandler):
    """A local filesystem that records every file opened for writing and can fail on a chosen one."""

    def __init__(self, fail_on: str | None = None):
        self.fs = pafs.LocalFileSystem()
        self.writes: list[str] = []
        self.fail_on = fail_on

    def open_output_stream(self, path, metadata):
        self.writes.append(path.rsplit("/", 1)[-1])
        if self.fail_on and path.endswith(self.fail_on):
            raise OSError(f"injected failure writing {path}")
        return self.fs.open_output_stream(path)

    def get_type_name(self):
        return "recording"

    def equals(self, other):
        return self is other

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("not in tests")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        raise OSError("not in tests")


def test_marker_is_written_last_and_a_crash_before_it_leaves_the_last_good_checkpoint(tmp_path):
    handler = _Recording()
    store = DurableStore(str(tmp_path), filesystem=pafs.PyFileSystem(handler))
    _write(store, 1)
    assert handler.writes[-1] == MARKER and handler.writes[-2] == MANIFEST
    assert sorted(handler.writes[:-2]) == [
        "controller.safetensors",
        "unit-0000.safetensors",
        "unit-0001.safetensors",
    ]

    for fail_on in ("unit-0001.safetensors", MANIFEST, MARKER):
        crashing = DurableStore(str(tmp_path), filesystem=pafs.PyFileSystem(_Recording(fail_on)))
        with pytest.raises(OSError, match="injected"):
            _write(crashing, 2)
        assert store.steps() == [1] and store.latest().step == 1
