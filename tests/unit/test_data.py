"""The corpus (Parquet shards built from .py files) and the deterministic, sharded, resumable loader."""

from __future__ import annotations

import json
from pathlib import Path

import msgpack
import pyarrow.parquet as pq
import pytest
import torch

from zetta_ray.data import Corpus, CorpusSpec, LoaderState, TokenLoader, default_corpus_dir, ensure_corpus
from zetta_ray.data import corpus as corpus_mod
from zetta_ray.errors import ConfigError

pytestmark = pytest.mark.unit

STDLIB = CorpusSpec(max_bytes=200_000, shard_bytes=32_000)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small, known source tree: eight files, one in a package, plus files the builder must skip."""
    root = tmp_path_factory.mktemp("src")
    for i in range(8):
        sub = root / "pkg" if i % 3 == 0 else root
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_bytes(bytes((i * 7 + j) % 251 for j in range(6_000 + 1_000 * i)))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "ignored.py").write_text("x = 1\n")
    (root / "notes.txt").write_text("not python\n")
    return root


@pytest.fixture(scope="module")
def small(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    spec = CorpusSpec(source=str(source), max_bytes=60_000, shard_bytes=3_000, val_fraction=0.25)
    return ensure_corpus(spec, tmp_path_factory.mktemp("corpus") / "small")


def _loader(corpus: Corpus, **kw: object) -> TokenLoader:
    return TokenLoader(corpus, **{"batch_size": 4, "seq_len": 16, "seed": 0, **kw})


# -- corpus -----------------------------------------------------------------------------------------------


def test_stdlib_corpus_build_is_deterministic(tmp_path: Path) -> None:
    a, b = ensure_corpus(STDLIB, tmp_path / "a"), ensure_corpus(STDLIB, tmp_path / "b")
    assert a.fingerprint == b.fingerprint == STDLIB.fingerprint()
    assert a.shards == b.shards
    assert sum(s.tokens for s in a.shards) == STDLIB.max_bytes
    assert [s.split for s in a.shards].count("val") == 1
    assert [s.name for s in a.split("train")] == [
        f"train-{i:05d}.parquet" for i in range(len(a.split("train")))
    ]
    assert not list(tmp_path.glob(".*tmp*")), "the temporary build directory must be gone"


def test_shards_round_trip_through_parquet(small: Corpus, source: Path) -> None:
    seen = 0
    for shard in small.shards:
        table = pq.read_table(small.dir / shard.name)
        assert table.column_names == ["path", "offset", "data"]
        for path, offset, data in zip(
            *(table.column(c).to_pylist() for c in table.column_names), strict=True
        ):
            assert (source / path).read_bytes()[offset : offset + len(data)] == data
            assert not path.startswith("site-packages") and path.endswith(".py")
            seen += len(data)
        tokens = small.read(shard)
        assert tokens.dtype.name == "uint8" and len(tokens) == shard.tokens
        assert tokens.tobytes() == b"".join(table.column("data").to_pylist())
    assert seen == 60_000


def test_val_blocks_are_spread_over_the_stream(small: Corpus) -> None:
    (val,) = small.split("val")
    paths = set(pq.read_table(small.dir / val.name).column("path").to_pylist())
    # 60_000 bytes make 8 blocks of 8192 (the last holds 2656); one in four is held out: blocks 3 and 7.
    assert corpus_mod.VAL_BLOCK_BYTES == 8192
    assert val.tokens == 8192 + 2656
    assert len(paths) > 1
    assert sum(s.tokens for s in small.split("train")) == 60_000 - val.tokens


def test_existing_corpus_is_reused_not_rebuilt(small: Corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_: object) -> None:
        raise AssertionError("rebuilt")

    monkeypatch.setattr(corpus_mod, "_build", fail)
    spec = CorpusSpec(source=small.settings["source"], max_bytes=60_000, shard_bytes=3_000, val_fraction=0.25)
    assert ensure_corpus(spec, small.dir).shards == small.shards


def test_a_concurrent_build_of_the_same_corpus_is_used(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = CorpusSpec(source=str(source), max_bytes=10_000, shard_bytes=3_000)
    final, real_build = tmp_path / "corpus", corpus_mod._build

    def other_process_wins(spec_: CorpusSpec, out: Path) -> None:
        real_build(spec_, out)
        monkeypatch.setattr(corpus_mod, "_build", real_build)
        ensure_corpus(spec_, final)  # finishes and renames into place first

    monkeypatch.setattr(corpus_mod, "_build", other_process_wins)
    assert ensure_corpus(spec, final).fingerprint == spec.fingerprint()
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_default_dir_is_named_by_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_corpus_dir(STDLIB) == tmp_path / "zetta_ray" / f"corpus-{STDLIB.fingerprint()}"
    assert CorpusSpec(max_bytes=100).fingerprint() != CorpusSpec(max_bytes=101).fingerprint()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"shard_bytes": -1}, "shard_bytes"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_spec_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"CorpusSpec.{field}="):
        CorpusSpec(**kwargs)


def test_corpus_errors_name_the_fix(small: Corpus, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="other settings.*max_bytes"):
        ensure_corpus(CorpusSpec(source=small.settings["source"], max_bytes=10_000), small.dir)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(ConfigError, match="not empty but holds no corpus"):
        ensure_corpus(STDLIB, tmp_path / "junk")
    with pytest.raises(ConfigError, match="not a directory"):
        ensure_corpus(CorpusSpec(source=str(tmp_path / "missing")), tmp_path / "c")
    with pytest.raises(ConfigError, match="manifest.json is missing"):
        Corpus.open(tmp_path)


def test_corrupt_shard_is_detected(small: Corpus, tmp_path: Path) -> None:
    manifest = json.loads((small.dir / "manifest.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    first = small.shards[0]
    blob = bytearray((small.dir / first.name).read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (copy / first.name).write_bytes(bytes(blob))
    with pytest.raises(ConfigError, match="is corrupt: sha256"):
        Corpus.open(copy).read(first)


# -- loader -----------------------------------------------------------------------------------------------


def test_batches_are_shifted_int64_windows(small: Corpus) -> None:
    loader = _loader(small)
    w = loader.windows(3)
    x, y = loader.batch(3)
    assert w.shape == (4, 17) and w.dtype == torch.int64
    assert torch.equal(x, w[:, :-1]) and torch.equal(y, w[:, 1:])
    assert x.shape == y.shape == (4, 16)
    for row, index in zip(w, range(12, 16), strict=True):
        name, start = loader.locate(index)
        shard = next(s for s in small.shards if s.name == name)
        assert row.tolist() == small.read(shard)[start : start + 17].tolist()


def test_same_seed_same_batches_other_seed_other_batches(small: Corpus) -> None:
    a, b, c = _loader(small), _loader(small), _loader(small, seed=1)
    batches_a = [next(a) for _ in range(5)]
    assert all(
        torch.equal(xa, xb) for (xa, _), (xb, _) in zip(batches_a, (next(b) for _ in range(5)), strict=True)
    )
    assert torch.equal(batches_a[4][0], a.batch(4)[0])  # random access agrees with iteration
    assert not all(torch.equal(xa, c.batch(i)[0]) for i, (xa, _) in enumerate(batches_a))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_get_disjoint_shards_that_cover_the_corpus(small: Corpus, world: int) -> None:
    every_window = {(s.name, w * 16) for s in small.split("train") for w in range((s.tokens - 1) // 16)}
    seen: list[tuple[str, int]] = []
    for rank in range(world):
        loader = _loader(small, rank=rank, world=world)
        assert [s.name for s in loader.shards] == [s.name for s in small.split("train")[rank::world]]
        seen += [loader.locate(i) for i in range(loader.windows_per_epoch)]
    assert len(seen) == len(set(seen)) == len(every_window)
    assert set(seen) == every_window


def test_each_epoch_visits_every_window_in_a_new_order(small: Corpus) -> None:
    loader = _loader(small)
    n = loader.windows_per_epoch
    first, second = [loader.locate(i) for i in range(n)], [loader.locate(i) for i in range(n, 2 * n)]
    assert sorted(first) == sorted(second) and first != second
    loader.load_state({**loader.state().to_dict(), "step": n // 4 + 1})
    assert loader.epoch == 1


def test_state_resume_gives_identical_next_batches(small: Corpus) -> None:
    a = _loader(small, rank=1, world=2)
    for _ in range(7):
        next(a)
    blob = msgpack.packb(a.state().to_dict())
    expected = [next(a) for _ in range(5)]
    b = _loader(small, rank=1, world=2)
    b.load_state(msgpack.unpackb(blob))
    assert b.state().step == 7
    for (xa, ya), (xb, yb) in zip(expected, (next(b) for _ in range(5)), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert LoaderState.from_dict(a.state().to_dict()) == a.state()


def test_state_from_another_stream_is_rejected(small: Corpus) -> None:
    saved = _loader(small, seed=3).state()
    with pytest.raises(ConfigError, match=r"'seed': \(3, 0\)"):
        _loader(small).load_state(saved)
    with pytest.raises(ConfigError, match="expected"):
        _loader(small).load_state({"step": 1})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2, "world": 2}, r"rank=2.*\[0, world=2\)"),
        ({"world": 99}, "world=99 ranks need at least 99 train shards"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"seq_len": 10_000}, "too few for one window"),
        ({"seed": -1}, "seed=-1"),
        ({"split": "test"}, "split='test'"),
    ],
)
def test_bad_loader_arguments_are_errors(small: Corpus, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _loader(small, **kwargs)
