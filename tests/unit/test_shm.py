"""Shared-memory rows (actors/shm.py): regions, their leases, the wire form, and the fallbacks."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from zetta_ray.actors import shm
from zetta_ray.actors.shm import SharedArena, SharedRows, portable, read_rows, write_rows
from zetta_ray.actors.wire import from_wire, reply

pytestmark = pytest.mark.skipif(not os.path.isdir(shm.SHM_DIR), reason="no /dev/shm on this system")


@pytest.fixture
def arena():
    a = SharedArena(segment_bytes=1 << 20)
    yield a
    a.close()


def test_share_copies_the_tensor_and_a_pickled_descriptor_reads_it_without_the_lease(arena):
    t = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    rows = arena.share(t)
    wire = pickle.loads(pickle.dumps(rows.take([(1, 3), (4, 6)])))
    assert wire._lease is None and wire.ranges == ((1, 3), (4, 6)) and not wire.output
    np.testing.assert_array_equal(read_rows(wire), t[[1, 2, 4, 5]].numpy())
    np.testing.assert_array_equal(from_wire(wire).numpy(), t[[1, 2, 4, 5]].numpy())
    assert read_rows(wire.take([(2, 5)])).base is not None  # one range: a view, not a copy
    with pytest.raises(RuntimeError, match="no lease"):
        wire.tensor()


def test_a_unit_writes_its_rows_in_place_and_returns_the_descriptor(arena):
    out = arena.empty((5, 3), np.float32)
    mine = pickle.loads(pickle.dumps(out.take([(0, 2), (3, 5)], output=True)))
    y = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert reply(y, mine) is mine
    whole = out.tensor()
    torch.testing.assert_close(whole[[0, 1, 3, 4]], y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="has 4 rows, got 2"):
        write_rows(mine, y[:2].numpy())
    assert isinstance(reply(y, None), np.ndarray)  # no out: by value


def test_a_segment_is_reused_from_its_start_only_when_every_region_and_tensor_is_gone(arena):
    a = arena.empty((64, 64), np.float32)  # 16 KiB
    b = arena.empty((64, 64), np.float32)
    assert (a.segment, a.offset) == (b.segment, 0) and b.offset == 16 << 10
    view = b.tensor()[3:5]  # a tensor over b keeps b's region
    del a, b
    gc.collect()
    c = arena.empty((64, 64), np.float32)
    assert c.offset == 32 << 10  # b's region is still held by the view: no reuse yet
    del view, c
    gc.collect()
    d = arena.empty((64, 64), np.float32)
    assert d.offset == 0 and arena.nbytes == 1 << 20  # warm pages reused, nothing new reserved


def test_a_request_bigger_than_a_segment_gets_a_segment_of_its_own(arena):
    small = arena.empty((8, 8), np.float32)
    big = arena.empty((1024, 512), np.float32)  # 2 MiB > 1 MiB segments
    assert big.segment != small.segment and arena.nbytes == (1 << 20) + (2 << 20)


def test_portable_replaces_inputs_by_their_rows_and_outputs_by_none(arena):
    rows = arena.share(torch.ones(4, 2))
    args = (
        (0, 1, 0),
        [3],
        rows.take([(1, 3)]),
        True,
        arena.empty((4, 2), np.float32).take([(1, 3)], output=True),
    )
    sent = portable(args)
    assert sent[:2] == args[:2] and sent[3] is True and sent[4] is None
    assert isinstance(sent[2], np.ndarray) and sent[2].shape == (2, 2)
    plain = (1, np.zeros(2))
    assert portable(plain) is plain


def test_close_unlinks_the_segments_but_tensors_over_them_stay_readable():
    arena = SharedArena(segment_bytes=1 << 20)
    t = arena.share(torch.full((3, 3), 7.0)).tensor()
    names = [s.name for s in arena._segments]
    arena.close()
    assert not any(os.path.exists(os.path.join(shm.SHM_DIR, n)) for n in names)
    assert float(t.sum()) == 63.0
    assert arena.empty((2, 2), np.float32) is None  # closed: callers fall back to the object store


def test_no_space_falls_back_with_a_warning_instead_of_dying_later(monkeypatch, caplog):
    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    arena = SharedArena(segment_bytes=1 << 20)
    assert arena.empty((4, 4), np.float32) is None and arena.nbytes == 0
    assert "docker: --shm-size" in caplog.text and "No space left" in caplog.text
    assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(arena._prefix)]  # nothing left behind
    arena.close()


def test_a_missing_segment_names_itself_and_the_fix():
    ghost = SharedRows("zetta_ray-1-00000000-0", 0, (2, 2), "<f4", ((0, 2),))
    with pytest.raises(FileNotFoundError, match="reach only units on the controller's node"):
        read_rows(ghost)


def test_segments_of_a_dead_controller_are_removed_by_the_next_arena():
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, torch; from zetta_ray.actors.shm import SharedArena\n"
            "a = SharedArena(1 << 20); a.share(torch.ones(2, 2)); print(a._segments[0].name, flush=True)\n"
            "os._exit(0)  # as if killed: close() never runs",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    path = os.path.join(shm.SHM_DIR, child.stdout.strip())
    assert os.path.exists(path)
    os.utime(path, (0, 0))  # older than the grace period (a just-started controller's files are spared)
    shm._remove_orphans()
    assert not os.path.exists(path)
