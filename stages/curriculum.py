"""curriculum: score every training sequence's difficulty and bucket it; the sampler training uses.

Difficulty of a train_seq_len window = mean cross-entropy of its target tokens under the train set's
unigram distribution (a cheap, model-free proxy for how surprising the text is). Buckets are
quantiles of that score, 0 = easiest. When an arm enables the curriculum, training draws sequences
with the easy-to-hard crossfade of PR #1818, driven by the fraction of the budget spent, with a
floor weight for every non-empty bucket.
"""
import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from stages.io import IntegrityError, atomic_path, sha256_file, verify_recorded, write_json
from stages.shards import load_tokens, manifest_shards


def window_starts(num_tokens: int, seq_len: int) -> np.ndarray:
    """Starts of the non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets)."""
    return np.arange(0, num_tokens - seq_len, seq_len, dtype=np.int64)


def unigram_surprisal(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """-log p(token) under the add-one-smoothed unigram distribution of `tokens` (nats)."""
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64) + 1.0
    return -np.log(counts / counts.sum())


def sequence_scores(tokens: np.ndarray, starts: np.ndarray, seq_len: int, surprisal: np.ndarray):
    """Mean surprisal of each window's target tokens tokens[s+1 : s+seq_len+1]."""
    per_token = surprisal[tokens]
    cumulative = np.concatenate([[0.0], np.cumsum(per_token)])
    return ((cumulative[starts + seq_len + 1] - cumulative[starts + 1]) / seq_len).astype(np.float32)


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
    """Draws sequence starts: a bucket from the crossfade weights, then a uniform sequence in it.

    Seeded from the run's seed and rank, so seeds differ in data order (PR #1818 seeded by rank only).
    """

    def __init__(self, starts, bucket_ids, num_buckets: int, floor: float, seed: int, rank: int = 0):
        self.members = [np.asarray(starts)[bucket_ids == b] for b in range(num_buckets)]
        self.nonempty = np.array([len(m) > 0 for m in self.members])
        self.floor = floor
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))

    def sample(self, count: int, progress: float) -> np.ndarray:
        weights = bucket_weights(progress, self.nonempty, self.floor)
        buckets = self.rng.choice(len(weights), size=count, p=weights)
        return np.array([self.members[b][self.rng.integers(len(self.members[b]))] for b in buckets],
                        dtype=np.int64)

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state["rng"]


def load_sampler(path, summary_path, floor: float, seed: int, rank: int = 0) -> BucketSampler:
    """The sampler of a bucket file, verified against the sha256 its curriculum summary recorded."""
    verify_recorded(path, summary_path, "buckets_sha256")
    try:
        data = np.load(path)
        return BucketSampler(data["starts"], data["bucket_ids"], int(data["num_buckets"]), floor, seed, rank)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise IntegrityError(f"{path}: not a readable bucket file ({type(e).__name__}: {e})") from None


def run(cfg: dict, manifest: Path, out: Path, summary_path: Path) -> dict:
    start = time.time()
    vocab_size = json.loads(manifest.read_text())["vocab_size"]
    tokens = load_tokens(manifest_shards(manifest, "train")).astype(np.int64)
    seq_len, k = cfg["seq_len"], cfg["buckets"]
    starts = window_starts(len(tokens), seq_len)
    if len(starts) < k:
        raise ValueError(f"curriculum: {len(starts)} train sequences of {seq_len} tokens in {manifest} "
                         f"cannot fill {k} buckets (curriculum.buckets)")
    scores = sequence_scores(tokens, starts, seq_len, unigram_surprisal(tokens, vocab_size))
    bucket_ids, edges = quantile_buckets(scores, k)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, starts=starts, scores=scores, bucket_ids=bucket_ids, edges=edges,
                 num_buckets=k, seq_len=seq_len)
    summary = {
        "config": cfg, "sequences": len(starts), "seq_len": seq_len,
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
