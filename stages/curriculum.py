"""curriculum: score every training sequence's difficulty and bucket it; the sampler training uses.

A sequence is a window of seq_len + 1 tokens (inputs and shifted targets) inside one train shard:
windows start every seq_len tokens of each shard and never cross a shard boundary, so a window is
addressed by (shard, offset). Its difficulty is the mean cross-entropy of its target tokens under the
train set's add-one-smoothed unigram distribution (a cheap, model-free proxy for how surprising the
text is). Buckets are quantiles of that score, 0 = easiest.

Everything is computed from the shards' memmaps, a bounded chunk of tokens at a time (unigram counts
first, then the windows' scores), so memory grows with the number of windows (a few bytes each), not
with the number of tokens.

When an arm enables the curriculum, training draws sequences with the easy-to-hard crossfade of PR
#1818, driven by the fraction of the budget spent, with a floor weight for every non-empty bucket;
each rank draws its own sequences from its own stream, a whole micro-batch per call.
"""
import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from stages.io import IntegrityError, atomic_path, sha256_file, verify_recorded, write_json
from stages.shards import ShardError, ShardSet, manifest_shards

CHUNK_TOKENS = 1 << 22  # tokens per counting or scoring pass: its int64 ids and float64 surprisal are ~64 MB
BUCKET_KEYS = ("shard", "offset", "bucket_ids", "num_buckets")


def window_starts(num_tokens: int, seq_len: int) -> np.ndarray:
    """Starts of the non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets)."""
    return np.arange(0, num_tokens - seq_len, seq_len, dtype=np.int64)


def unigram_counts(shards: ShardSet, vocab_size: int, chunk_tokens: int = CHUNK_TOKENS) -> np.ndarray:
    """How often each token id occurs in the shards, counted a chunk at a time."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for path, tokens in zip(shards.paths, shards.shards):
        for a in range(0, len(tokens), chunk_tokens):
            chunk = np.bincount(tokens[a:a + chunk_tokens], minlength=vocab_size)
            if len(chunk) > vocab_size:
                raise ShardError(f"{path}: token id {len(chunk) - 1} is outside the vocabulary of {vocab_size}")
            counts += chunk
    return counts


def unigram_surprisal(counts: np.ndarray) -> np.ndarray:
    """-log p(token) under the add-one-smoothed unigram distribution of these counts (nats)."""
    smoothed = counts.astype(np.float64) + 1.0
    return -np.log(smoothed / smoothed.sum())


def shard_window_scores(tokens: np.ndarray, seq_len: int, surprisal: np.ndarray,
                        chunk_tokens: int = CHUNK_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of one shard's windows and the mean surprisal of each window's targets
    tokens[o + 1 : o + seq_len + 1], a chunk of windows at a time. Windows are seq_len apart, so their
    targets tile the shard and a chunk's targets reshape to [windows, seq_len]."""
    offsets = window_starts(len(tokens), seq_len)
    scores = np.empty(len(offsets), dtype=np.float32)
    per_chunk = max(chunk_tokens // seq_len, 1)
    for i in range(0, len(offsets), per_chunk):
        n = min(per_chunk, len(offsets) - i)
        first = offsets[i] + 1
        targets = surprisal[tokens[first:first + n * seq_len]]
        scores[i:i + n] = targets.reshape(n, seq_len).mean(axis=1)
    return offsets, scores


def window_scores(shards: ShardSet, seq_len: int, surprisal: np.ndarray,
                  chunk_tokens: int = CHUNK_TOKENS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, offset, score) of every window of every shard, shard by shard."""
    parts = [shard_window_scores(tokens, seq_len, surprisal, chunk_tokens) for tokens in shards.shards]
    shard = np.concatenate([np.full(len(o), s, dtype=np.int32) for s, (o, _) in enumerate(parts)])
    offset = np.concatenate([o for o, _ in parts])
    scores = np.concatenate([sc for _, sc in parts])
    return shard, offset, scores


def window_count(shards: ShardSet, seq_len: int) -> int:
    return sum(len(window_starts(int(n), seq_len)) for n in shards.lengths)


def quantile_buckets(scores: np.ndarray, num_buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket ids by score quantile (0 = easiest) and the inner bucket edges."""
    edges = np.quantile(scores, np.linspace(0, 1, num_buckets + 1)[1:-1]) if len(scores) else np.array([])
    return np.searchsorted(edges, scores, side="right").astype(np.int8), edges


def bucket_weights(progress: float, nonempty: np.ndarray, floor: float) -> np.ndarray:
    """Sampling probability per bucket at a fraction `progress` of the budget (PR #1818's crossfade)."""
    k = len(nonempty)
    p = min(max(progress, 0.0), 1.0)
    difficulty = np.arange(k) / (k - 1) if k > 1 else np.zeros(1)
    w = (1 - difficulty) * (1 - p) + difficulty * p
    w = np.where(nonempty, np.maximum(w, floor), 0.0)
    return w / w.sum()


class BucketSampler:
    """Draws windows (shard, offset): a bucket per sequence from the crossfade weights, then a uniform
    member of that bucket, for all the sequences of a call at once. Members are held sorted by bucket, so
    bucket b is rows first[b] : first[b] + sizes[b].

    Seeded from the run's seed and rank, so seeds differ in data order (PR #1818 seeded by rank only) and
    each rank draws its own sequences.
    """

    def __init__(self, shard, offset, bucket_ids, num_buckets: int, floor: float, seed: int, rank: int = 0):
        bucket_ids = np.asarray(bucket_ids)
        order = np.argsort(bucket_ids, kind="stable")
        self.shard, self.offset = np.asarray(shard)[order], np.asarray(offset, dtype=np.int64)[order]
        self.sizes = np.bincount(bucket_ids, minlength=num_buckets)
        self.first = np.cumsum(self.sizes) - self.sizes
        self.floor = floor
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))

    def sample(self, count: int, progress: float) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, offsets) of `count` windows."""
        weights = bucket_weights(progress, self.sizes > 0, self.floor)
        buckets = self.rng.choice(len(weights), size=count, p=weights)
        rows = self.first[buckets] + self.rng.integers(0, self.sizes[buckets])
        return self.shard[rows], self.offset[rows]

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def load_sampler(path, summary_path, floor: float, seed: int, rank: int = 0) -> BucketSampler:
    """The sampler of a bucket file, verified against the sha256 its curriculum summary recorded."""
    verify_recorded(path, summary_path, "buckets_sha256")
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise IntegrityError(f"{path}: not a readable bucket file ({type(e).__name__}: {e})") from None
    if missing := [key for key in BUCKET_KEYS if key not in arrays]:  # e.g. the older format's global starts
        raise IntegrityError(f"{path}: bucket file lacks {missing}; rerun the curriculum stage")
    return BucketSampler(arrays["shard"], arrays["offset"], arrays["bucket_ids"], int(arrays["num_buckets"]),
                         floor, seed, rank)


def run(cfg: dict, manifest: Path, out: Path, summary_path: Path) -> dict:
    start = time.time()
    vocab_size = json.loads(manifest.read_text())["vocab_size"]
    shards = ShardSet(manifest_shards(manifest, "train"))
    seq_len, k = cfg["seq_len"], cfg["buckets"]
    sequences = window_count(shards, seq_len)
    if sequences < k:
        raise ValueError(f"curriculum: {sequences} train sequences of {seq_len} tokens in {manifest} "
                         f"cannot fill {k} buckets (curriculum.buckets)")
    surprisal = unigram_surprisal(unigram_counts(shards, vocab_size))
    shard, offset, scores = window_scores(shards, seq_len, surprisal)
    bucket_ids, edges = quantile_buckets(scores, k)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, shard=shard, offset=offset, scores=scores, bucket_ids=bucket_ids, edges=edges,
                 num_buckets=k, seq_len=seq_len)
    summary = {
        "config": cfg, "sequences": sequences, "seq_len": seq_len,
        "buckets": [{"bucket": b, "sequences": int((bucket_ids == b).sum()),
                     "mean_score": float(scores[bucket_ids == b].mean())} for b in range(k)],
        "edges": edges.tolist(), "buckets_sha256": sha256_file(out), "seconds": round(time.time() - start, 3),
    }
    write_json(summary_path, summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help='{"buckets": K, "seq_len": L} as JSON')
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="buckets .npz")
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args(argv)
    summary = run(json.loads(args.config), args.manifest, args.out, args.summary)
    print(json.dumps({k: summary[k] for k in ("sequences", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
