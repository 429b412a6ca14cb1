"""Training data: a byte-level corpus in Parquet shards and a deterministic, resumable, sharded loader.

corpus = ensure_corpus(CorpusSpec(max_bytes=4_000_000))      # built once, then reused from the cache
loader = TokenLoader(corpus, batch_size=8, seq_len=128, seed=0, rank=0, world=1)
x_BS, y_BS = next(loader)
"""

from zetta_ray.data.corpus import Corpus, CorpusSpec, Shard, default_corpus_dir, ensure_corpus
from zetta_ray.data.loader import LoaderState, TokenLoader

__all__ = [
    "Corpus",
    "CorpusSpec",
    "LoaderState",
    "Shard",
    "TokenLoader",
    "default_corpus_dir",
    "ensure_corpus",
]
