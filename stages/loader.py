"""loader: the train batches, read from the shards' memmaps, never concatenated: a contiguous stream that wraps
around, as the challenge's loader reads it, or (curriculum) the windows each rank's sampler draws."""
import numpy as np
import torch

from stages.shards import ShardSet, read_shard


class TokenStream:
    """Reads shards in order and wraps around forever, as the challenge's loader does."""

    def __init__(self, paths, vocab_size):
        self.shards = [read_shard(p, vocab_size) for p in paths]
        if not any(len(s) for s in self.shards):
            raise ValueError(f"no training tokens in {[str(p) for p in paths]}")
        self.shard, self.pos = 0, 0

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            tokens = self.shards[self.shard]
            chunk = tokens[self.pos:self.pos + n]
            parts.append(np.asarray(chunk))
            n -= len(chunk)
            self.pos += len(chunk)
            if self.pos >= len(tokens):
                self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        return np.concatenate(parts)

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        self.shard, self.pos = state["shard"], state["pos"]


class Batches:
    """Each call yields this rank's (x, y) share of one micro-batch of the fixed global batch: a contiguous
    span of the stream (as rows of seq_len, or packed: the whole span as one row), or (curriculum) the windows this
    rank's sampler draws, read from the shards' memmaps by (shard, offset)."""

    def __init__(self, stream, sampler, windows: ShardSet | None, seq_len, rank, world_size, packed=False):
        self.stream, self.sampler, self.windows = stream, sampler, windows
        self.seq_len, self.rank, self.world, self.packed = seq_len, rank, world_size, packed

    def next(self, local_tokens: int, progress: float, seq_len: int | None = None):
        """local_tokens tokens as rows of seq_len (default: the configured one; context growth passes
        shorter ones: more rows, the same tokens)."""
        seq_len = seq_len or self.seq_len
        if self.sampler is None:  # contiguous spans, one per rank, as the challenge's loader
            span = local_tokens + 1
            chunk = self.stream.take(span * self.world)[self.rank * span:(self.rank + 1) * span]
            local = torch.from_numpy(chunk.astype(np.int64))
            shape = (1, -1) if self.packed else (-1, seq_len)
            return local[:-1].view(shape), local[1:].view(shape)
        shard, offset = self.sampler.sample(local_tokens // seq_len, progress)
        seqs = torch.from_numpy(self.windows.read(shard, offset, seq_len + 1))
        return seqs[:, :-1], seqs[:, 1:]

    def state_dict(self):
        source = self.sampler if self.sampler is not None else self.stream
        return source.state_dict()

    def load_state_dict(self, state):
        (self.sampler if self.sampler is not None else self.stream).load_state_dict(state)
