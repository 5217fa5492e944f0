"""The challenge's token shard format.

A shard is a 256 x int32 little-endian header (magic 20240520, version 1, token count, zeros)
followed by `count` uint16 little-endian token ids; the file size is exactly 1024 + 2 * count.
This is byte-for-byte the format of the challenge's `fineweb_{train,val}_NNNNNN.bin`.
"""
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
        f.write(tokens.astype("<u2").tobytes())


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
