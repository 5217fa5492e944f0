"""The challenge's token shard format.

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count, zeros)
followed by `count` uint16 little-endian token ids; the file size is exactly 1024 + 2 * count.
This is byte-for-byte the format of the challenge's `fineweb_{train,val}_NNNNNN.bin`.
"""
import re
from pathlib import Path

import numpy as np

from concurrent.futures import ThreadPoolExecutor

from stages.io import atomic_path, read_json, verify_sha256

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_TOKENS = 2**31 - 1


class ShardError(ValueError):
    """A shard file that is not in the challenge format; the message names the file."""


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def split_shards(folder, split: str) -> list[Path]:
    """The token shards of one split in a challenge folder, in order: `fineweb_<split>_NNNNNN.bin` only, not
    the CaseOps byte sidecars beside them (`fineweb_val_bytes_NNNNNN.bin`), which a glob would also match."""
    pattern = re.compile(rf"fineweb_{split}_\d+\.bin")
    return sorted(p for p in Path(folder).glob(f"fineweb_{split}_*.bin") if pattern.fullmatch(p.name))


def header_bytes(num_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, VERSION, num_tokens
    return header.tobytes()


def write_shard(path, tokens) -> None:
    """Write `tokens` (any integer array) as a shard, atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ShardError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) > MAX_TOKENS:
        raise ShardError(f"{path}: {len(tokens)} tokens exceed the int32 header limit")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
        bad = int(tokens[(tokens < 0) | (tokens >= 2**16)][0])
        raise ShardError(f"{path}: token id {bad} does not fit in uint16")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header_bytes(len(tokens)))
        np.ascontiguousarray(tokens, dtype="<u2").tofile(f)  # one copy at most, not two


def read_header(path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: magic {header[0]} != {MAGIC}; not a challenge shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: version {header[1]} != {VERSION}")
    count = int(header[2])
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise ShardError(f"{path}: size {size} bytes != {expected} expected for {count} tokens "
                         "(truncated or padded file)")
    return count


def read_shard(path, vocab_size: int | None = None) -> np.ndarray:
    """Return a shard's tokens as a read-only uint16 memmap, validated against `vocab_size`."""
    count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
    if vocab_size is not None:
        if int(tokens.max()) >= vocab_size:
            where = int(np.argmax(tokens >= vocab_size))
            raise ShardError(f"{path}: token id {int(tokens[where])} at position {where} is outside the "
                             f"vocabulary of {vocab_size}")
    return tokens


def load_tokens(paths, vocab_size: int | None = None) -> np.ndarray:
    """Concatenate shards in the order given."""
    parts = [np.asarray(read_shard(p, vocab_size)) for p in paths]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


class ShardSet:
    """A split's shards as read-only memmaps, addressed by (shard, offset): nothing is concatenated, so
    memory does not grow with the split (only the pages a window touches are read)."""

    def __init__(self, paths, vocab_size: int | None = None):
        self.paths = [Path(p) for p in paths]
        self.shards = [read_shard(p, vocab_size) for p in self.paths]
        self.lengths = np.array([len(t) for t in self.shards], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def window_counts(self, length: int) -> np.ndarray:
        """How many start offsets each shard has for a window of `length` tokens inside it."""
        return np.maximum(self.lengths - length + 1, 0)

    def random_windows(self, rng: np.random.Generator, count: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard ids, offsets) of `count` windows of `length` tokens, uniform over every start offset of
        every shard (a window never crosses a shard boundary)."""
        counts = self.window_counts(length)
        total = int(counts.sum())
        if total <= 0:
            raise ValueError(f"no shard of {[str(p) for p in self.paths]} holds a window of {length} tokens")
        flat = rng.integers(0, total, size=count)
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, flat, side="right")
        return shard, flat - (ends[shard] - counts[shard])

    def read(self, shard: np.ndarray, offset: np.ndarray, length: int) -> np.ndarray:
        """The windows tokens[shard][offset : offset + length] as one int64 array [n, length], gathered
        shard by shard (a loop over shards, not over windows)."""
        shard, offset = np.asarray(shard), np.asarray(offset, dtype=np.int64)
        out = np.empty((len(shard), length), dtype=np.int64)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            out[rows] = np.lib.stride_tricks.sliding_window_view(self.shards[s], length)[offset[rows]]
        return out

    def check_windows(self, shard: np.ndarray, offset: np.ndarray, length: int, source) -> None:
        """Every window (shard, offset, length) lies inside this split's shards; else an error naming
        `source` (e.g. a bucket file written for other shards)."""
        shard, offset = np.asarray(shard), np.asarray(offset, dtype=np.int64)
        bad = (shard < 0) | (shard >= len(self.shards))
        bad[~bad] = (offset[~bad] < 0) | (offset[~bad] + length > self.lengths[shard[~bad]])
        if bad.any():
            i = int(np.argmax(bad))
            raise ShardError(f"{source}: window {i} (shard {int(shard[i])}, offset {int(offset[i])}, {length} tokens) "
                             f"is outside the {len(self.shards)} train shards {[p.name for p in self.paths]}; "
                             "it was written for other shards")


def document_spans(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of the non-empty documents of `tokens`, split at BOS with the BOS left out (tokens
    before the first BOS are a document too)."""
    bos = np.flatnonzero(tokens == bos_id)
    starts = np.concatenate([[0], bos + 1])
    ends = np.concatenate([bos, [len(tokens)]])
    keep = ends > starts
    return starts[keep], ends[keep]


def document_chunks(shards: "ShardSet", bos_id: int, chunk_tokens: int = 1 << 20):
    """Yield (tokens as int64, starts, ends) of whole documents, chunk by chunk through the split's shards
    in order: a document cut by a chunk or shard boundary is carried whole into the next chunk, so memory is
    one chunk (plus the longest document), whatever the split's size."""
    carry = np.zeros(0, dtype=np.int64)
    for shard in shards.shards:
        for lo in range(0, len(shard), chunk_tokens):
            block = np.concatenate([carry, np.asarray(shard[lo:lo + chunk_tokens], dtype=np.int64)])
            last_bos = np.flatnonzero(block == bos_id)[-1:]
            if not len(last_bos):
                carry = block
                continue
            whole, carry = block[:last_bos[0]], block[last_bos[0]:]
            yield whole, *document_spans(whole, bos_id)
    if len(carry):
        yield carry, *document_spans(carry, bos_id)


def check_splits_apart(shards: list[dict], manifest_path) -> None:
    """Val never doubles as train: each shard is named for its split, listed once, and no train shard has
    the bytes of a val shard."""
    names = [s["name"] for s in shards]
    for entry in shards:
        if not entry["name"].startswith(f"fineweb_{entry['split']}_"):
            raise ShardError(f"{manifest_path}: shard {entry['name']} is listed under split {entry['split']!r}")
    for name in names:
        if names.count(name) > 1:
            raise ShardError(f"{manifest_path}: shard {name} is listed more than once")
    val = {s["sha256"]: s["name"] for s in shards if s["split"] == "val" and "sha256" in s}
    for entry in shards:
        if entry["split"] == "train" and entry.get("sha256") in val:
            raise ShardError(f"{manifest_path}: train shard {entry['name']} has the same bytes as val shard "
                             f"{val[entry['sha256']]}: val data would be trained on")


def manifest_shards(manifest_path, split: str, verify: bool = True) -> list[Path]:
    """The shards of one split, in order, as listed by a tokenize manifest beside them, each verified
    against the sha256 the manifest recorded (a changed or corrupted shard is an error naming it)."""
    manifest_path = Path(manifest_path)
    shards = read_json(manifest_path)["shards"]
    check_splits_apart(shards, manifest_path)
    entries = [s for s in shards if s["split"] == split]
    paths = [manifest_path.parent / s["name"] for s in entries]
    if verify:
        with ThreadPoolExecutor(max_workers=min(8, len(paths) or 1)) as pool:  # hashlib releases the GIL
            list(pool.map(lambda ps: verify_sha256(ps[0], ps[1]["sha256"], manifest_path), zip(paths, entries)))
    return paths
