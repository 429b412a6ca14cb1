"""A byte-level text corpus, built offline and stored as Parquet shards.

The default source is text that every Python installation has: the ``.py`` files of the standard library
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages``). Files are taken in sorted order of their
relative paths and concatenated into one byte stream, capped at ``max_bytes``. Tokens are the bytes
themselves (vocabulary 256), so no tokenizer is needed and every run sees the same tokens.

The stream is cut into blocks of 8 KiB; ``val_fraction`` of the blocks, spread evenly over the stream
(one in twenty for 0.05), are held out as the validation shard ``val-00000.parquet``, so validation text
is drawn from the same mix of modules as training text. The remaining blocks, in order, are cut into
training shards of ``shard_bytes`` each. Each shard is a
Parquet table with one row per piece of a source file:

    path: string   (the file, relative to the source root)
    offset: int64  (where this piece starts inside that file)
    data: binary   (the bytes; concatenating ``data`` over the rows gives the shard's tokens)

``manifest.json`` lists the shards with their token counts and sha256, plus the settings and their
fingerprint. A corpus is built once into a temporary directory and renamed into place, so a reader never
sees half a corpus and two processes building at once both end with the same complete corpus.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from zetta_ray.errors import ConfigError

__all__ = ["Corpus", "CorpusSpec", "Shard", "default_corpus_dir", "ensure_corpus", "source_stream"]

FORMAT = "zetta_ray.corpus/1"
VAL_BLOCK_BYTES = 8192
MANIFEST = "manifest.json"
_SCHEMA = pa.schema([("path", pa.string()), ("offset", pa.int64()), ("data", pa.binary())])
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True, kw_only=True, slots=True)
class CorpusSpec:
    """What to build: ``max_bytes`` of ``.py`` text from ``source`` (``None``: the standard library).

    ``shard_bytes`` sets the training shard size; rank ``r`` of ``w`` data-parallel ranks reads shards
    ``r::w``, so a corpus serves at most as many ranks as it has training shards.
    """

    max_bytes: int = 4_000_000
    shard_bytes: int = 262_144
    val_fraction: float = 0.05
    source: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_bytes", "shard_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"CorpusSpec.{name}={value!r} is invalid: must be a positive integer")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ConfigError(
                f"CorpusSpec.val_fraction={self.val_fraction!r} is invalid: must be in [0, 1) "
                "(0 holds out no validation shard)"
            )

    @property
    def source_root(self) -> Path:
        return Path(self.source if self.source is not None else sysconfig.get_paths()["stdlib"])

    def settings(self) -> dict[str, object]:
        """Everything the corpus content depends on; its hash names the cache directory."""
        return {
            "format": FORMAT,
            "source": str(self.source_root.resolve()),
            "python": sys.version.split()[0] if self.source is None else None,
            **{k: v for k, v in asdict(self).items() if k != "source"},
        }

    def fingerprint(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True, kw_only=True, slots=True)
class Shard:
    """One Parquet file of a corpus: ``split`` is ``"train"`` or ``"val"``."""

    name: str
    split: str
    tokens: int
    sha256: str


def default_corpus_dir(spec: CorpusSpec) -> Path:
    """``$XDG_CACHE_HOME/zetta_ray/corpus-<fingerprint>`` (``~/.cache`` when the variable is unset)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "zetta_ray" / f"corpus-{spec.fingerprint()}"


def _source_files(root: Path) -> list[str]:
    if not root.is_dir():
        raise ConfigError(
            f"CorpusSpec.source={str(root)!r} is not a directory; point it at a folder of .py files, "
            "or leave it unset for the Python standard library"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
    return sorted(found)


def source_stream(spec: CorpusSpec) -> Iterator[tuple[str, int, bytes]]:
    """``(path, offset, bytes)`` pieces of the source files in order, ``spec.max_bytes`` in total."""
    root, left = spec.source_root, spec.max_bytes
    for rel in _source_files(root):
        if left <= 0:
            return
        data = (root / rel).read_bytes()[:left]
        if data:
            left -= len(data)
            yield rel, 0, data


def _cut(pieces: list[tuple[str, int, bytes]], sizes: list[int]) -> Iterator[list[tuple[str, int, bytes]]]:
    """Regroup the pieces into consecutive groups of ``sizes[0]``, ``sizes[1]``, ... bytes; what is left
    when the sizes run out (or the last, short, group) comes out as one final group."""
    sizes_left = iter(sizes)
    group: list[tuple[str, int, bytes]] = []
    want = next(sizes_left)
    for path, offset, data in pieces:
        while data:
            take = data[:want]
            group.append((path, offset, take))
            data, offset, want = data[len(take) :], offset + len(take), want - len(take)
            if want == 0:
                yield group
                group, want = [], next(sizes_left, sys.maxsize)
    if group:
        yield group


def _write_shard(path: Path, rows: list[tuple[str, int, bytes]]) -> Shard:
    paths, offsets, datas = zip(*rows, strict=True)
    table = pa.table([list(paths), list(offsets), list(datas)], schema=_SCHEMA)
    pq.write_table(table, path, compression="zstd")
    split = path.name.split("-")[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Shard(name=path.name, split=split, tokens=sum(len(d) for d in datas), sha256=digest)


def _held_out(block: int, fraction: float) -> bool:
    """Whether block ``block`` is validation: spreads ``fraction`` of the blocks evenly over the stream."""
    return math.floor((block + 1) * fraction) > math.floor(block * fraction)


def _build(spec: CorpusSpec, out: Path) -> None:
    pieces = list(source_stream(spec))
    total = sum(len(d) for _, _, d in pieces)
    if total == 0:
        raise ConfigError(f"no .py files under {str(spec.source_root)!r}; the corpus would be empty")
    train: list[tuple[str, int, bytes]] = []
    val: list[tuple[str, int, bytes]] = []
    blocks = _cut(pieces, [VAL_BLOCK_BYTES] * -(-total // VAL_BLOCK_BYTES))
    for i, block in enumerate(blocks):
        (val if _held_out(i, spec.val_fraction) else train).extend(block)
    n_train = sum(len(d) for _, _, d in train)
    n_full, rest = divmod(n_train, spec.shard_bytes)
    sizes = [spec.shard_bytes] * n_full + ([rest] if rest else [])
    shards = [_write_shard(out / f"train-{i:05d}.parquet", rows) for i, rows in enumerate(_cut(train, sizes))]
    if val:
        shards.append(_write_shard(out / "val-00000.parquet", val))
    manifest = {
        "fingerprint": spec.fingerprint(),
        "settings": spec.settings(),
        "shards": [asdict(s) for s in shards],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


class Corpus:
    """A built corpus on disk. Open one with ``Corpus.open(dir)`` or get one from ``ensure_corpus``."""

    def __init__(self, directory: Path, manifest: dict):
        self.dir = directory
        self.fingerprint: str = manifest["fingerprint"]
        self.settings: dict = manifest["settings"]
        self.shards = [Shard(**s) for s in manifest["shards"]]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Corpus:
        directory = Path(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{str(directory)!r} holds no corpus ({MANIFEST} is missing); build one with "
                "zetta_ray.data.ensure_corpus or point data_dir at an empty or new directory"
            ) from None
        if manifest.get("settings", {}).get("format") != FORMAT:
            raise ConfigError(
                f"corpus at {str(directory)!r} has format {manifest.get('settings', {}).get('format')!r}, "
                f"not {FORMAT!r}; delete the directory to rebuild it"
            )
        return cls(directory, manifest)

    def split(self, split: str) -> list[Shard]:
        """The shards of ``"train"`` or ``"val"``, in order."""
        if split not in ("train", "val"):
            raise ConfigError(f"split={split!r} is invalid: use 'train' or 'val'")
        return [s for s in self.shards if s.split == split]

    def read(self, shard: Shard) -> np.ndarray:
        """The shard's tokens as a uint8 array, after checking the file's sha256 against the manifest."""
        path = self.dir / shard.name
        blob = path.read_bytes()
        digest = hashlib.sha256(blob).hexdigest()
        if digest != shard.sha256:
            raise ConfigError(
                f"shard {str(path)!r} is corrupt: sha256 {digest[:12]}... does not match the manifest's "
                f"{shard.sha256[:12]}...; delete {str(self.dir)!r} to rebuild the corpus"
            )
        table = pq.read_table(pa.BufferReader(blob))
        tokens = np.frombuffer(b"".join(table.column("data").to_pylist()), dtype=np.uint8)
        if len(tokens) != shard.tokens:
            raise ConfigError(
                f"shard {str(path)!r} holds {len(tokens)} tokens but the manifest says {shard.tokens}; "
                f"delete {str(self.dir)!r} to rebuild the corpus"
            )
        return tokens


def ensure_corpus(spec: CorpusSpec, directory: str | os.PathLike[str] | None = None) -> Corpus:
    """Open the corpus for ``spec`` at ``directory`` (default: ``default_corpus_dir``), building it first
    if the directory does not exist. A directory that holds a corpus of other settings is an error, never
    silently reused or overwritten."""
    final = Path(directory).expanduser() if directory is not None else default_corpus_dir(spec)
    if not (final / MANIFEST).exists():
        if final.exists() and any(final.iterdir()):
            raise ConfigError(
                f"data_dir={str(final)!r} exists and is not empty but holds no corpus; point data_dir at "
                "a new directory (the corpus is built there) or at an existing corpus"
            )
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _build(spec, tmp)
            try:
                tmp.rename(final)  # atomic; replaces an empty directory, never a non-empty one
            except OSError:
                if not (final / MANIFEST).exists():
                    raise
                # another process built the same corpus first: use theirs
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    corpus = Corpus.open(final)
    if corpus.fingerprint != spec.fingerprint():
        theirs, ours = corpus.settings, spec.settings()
        diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
        raise ConfigError(
            f"data_dir={str(final)!r} holds a corpus built with other settings ({diff}, as "
            "{name: (on disk, requested)}); use another data_dir, delete this one, or request the same "
            "settings"
        )
    return corpus
