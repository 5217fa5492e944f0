"""The artifact: a self-describing, compressed quantized model that loads back to a GPT.

Layout (format v2):

    MAGIC "CADDIE\x02" (7 bytes; the last byte is the format version)
    compressor tag (1 byte) | flags (1 byte: bit 0 byte-shuffled, the other bits 0)
    sha256 of the uncompressed payload (32 bytes)
    the compressed payload
    sha256 of every byte before it, MAGIC through the compressed payload (32 bytes)

The trailing digest makes any change to the file, even one the decompressor would not notice (padding
bits, a window size), an error before anything is decompressed; the payload digest proves that what
the decompressor returned is the payload that was packed. The payload is a little-endian u32 header
length, a JSON header (model config, and per tensor its name, shape, storage and byte offsets), then
the tensor bytes. Quantized tensors store integer codes per row (bit-packed at their width, or one byte
each) with one fp16 scale per row; small tensors stay in fp16 (fp32 for control tensors).
"""
import hashlib
import json
import lzma
import struct
import zlib

import brotli
import numpy as np
import torch
import zstandard

from stages import awq, lqer, pergroup, storage
from stages.rowquant import dequantize_rows

VERSION = 2
MAGIC = b"CADDIE" + bytes([VERSION])
FORMAT = f"caddie-artifact-v{VERSION}"
DIGEST_BYTES = 32
HEADER_BYTES = len(MAGIC) + 2 + DIGEST_BYTES  # magic, tag, flags, payload digest
COMPRESSORS = {
    "zlib": (1, lambda b: zlib.compress(b, 9), zlib.decompress),
    "zstd": (2, lambda b: zstandard.ZstdCompressor(level=22).compress(b),
             lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "brotli": (3, lambda b: brotli.compress(b, quality=11), brotli.decompress),
    "lzma": (4, lambda b: lzma.compress(b, preset=9), lzma.decompress),
    "pergroup": (5, pergroup.compress, pergroup.decompress),  # the records' per-group lrzip/brotli (needs lrzip)
}
AUTO_CANDIDATES = ("zlib", "zstd", "brotli", "lzma")  # the whole-payload compressors `auto` picks among
_BY_TAG = {tag: (name, decompress) for name, (tag, _, decompress) in COMPRESSORS.items()}


class ArtifactError(ValueError):
    """An artifact that cannot be read; the message names the file."""


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes in [-(2^(bits-1)-1), 2^(bits-1)-1] as a tight bitstream of `bits` bits each."""
    unsigned = (q.astype(np.int16).ravel() + (1 << (bits - 1))).astype(np.uint8)
    return np.packbits(np.unpackbits(unsigned[:, None], axis=1)[:, 8 - bits:])


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    columns = np.unpackbits(packed)[:count * bits].reshape(count, bits)
    padded = np.concatenate([np.zeros((count, 8 - bits), np.uint8), columns], axis=1)
    return (np.packbits(padded, axis=1).ravel().astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """De-interleave bytes (all first bytes of each `stride`-byte word, then all second bytes, ...):
    the high bytes of fp16 values are similar, so compressors find them once grouped."""
    usable = len(data) - len(data) % stride
    words = np.frombuffer(data[:usable], dtype=np.uint8).reshape(-1, stride)
    return words.T.tobytes() + data[usable:]


def byte_unshuffle(data: bytes, stride: int = 2) -> bytes:
    usable = len(data) - len(data) % stride
    planes = np.frombuffer(data[:usable], dtype=np.uint8).reshape(stride, -1)
    return planes.T.tobytes() + data[usable:]


def pack_tensors(tensors: list[dict], model_config: dict, meta: dict) -> bytes:
    """tensors: [{"name", "kind", "shape", ...}]; every ndarray field is stored as raw bytes."""
    blobs, entries, offset = [], [], 0
    for t in tensors:
        entry = {k: v for k, v in t.items() if not isinstance(v, np.ndarray)}
        entry["arrays"] = {}
        for field, value in sorted((k, v) for k, v in t.items() if isinstance(v, np.ndarray)):
            raw = np.ascontiguousarray(value).tobytes()
            entry["arrays"][field] = {"offset": offset, "nbytes": len(raw), "dtype": str(value.dtype),
                                      "shape": list(value.shape)}
            blobs.append(raw)
            offset += len(raw)
        entries.append(entry)
    header = json.dumps({"format": FORMAT, "model_config": model_config, "meta": meta,
                         "tensors": entries}, sort_keys=True).encode()
    return struct.pack("<I", len(header)) + header + b"".join(blobs)


def unpack_tensors(payload: bytes):
    (length,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + length])
    body = memoryview(payload)[4 + length:]
    tensors = []
    for entry in header["tensors"]:
        t = {k: v for k, v in entry.items() if k != "arrays"}
        for field, spec in entry["arrays"].items():
            raw = body[spec["offset"]:spec["offset"] + spec["nbytes"]]
            t[field] = np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"])
        tensors.append(t)
    return header, tensors


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def compress(payload: bytes, compressor: str, shuffle: bool = False) -> bytes:
    tag, fn, _ = COMPRESSORS[compressor]
    stream = fn(byte_shuffle(payload) if shuffle else payload)
    body = MAGIC + bytes([tag, int(shuffle)]) + sha256(payload) + stream
    return body + sha256(body)


def compress_smallest(payload: bytes, shuffle: bool = False) -> tuple[bytes, dict]:
    """Every compressor's output size, and the smallest blob (the `auto` compressor)."""
    blobs = {name: compress(payload, name, shuffle) for name in AUTO_CANDIDATES}
    best = min(blobs, key=lambda name: len(blobs[name]))
    return blobs[best], {name: len(b) for name, b in blobs.items()}


def check_container(blob: bytes, source) -> None:
    """The magic, the format version and the trailing digest of every byte before it."""
    if len(blob) < len(MAGIC) or not blob.startswith(MAGIC[:-1]):
        raise ArtifactError(f"{source}: not a caddie artifact (bad magic); the file is truncated or corrupt")
    version = blob[len(MAGIC) - 1]
    if version < VERSION:
        raise ArtifactError(f"{source}: an old format (v{version}) caddie artifact, without the checksums of "
                            f"format v{VERSION}; rerun quantize (and rescue) to rewrite it")
    if version != VERSION:
        raise ArtifactError(f"{source}: format version {version} is not v{VERSION}; the file is truncated or "
                            "corrupt, or written by a newer caddie")
    if len(blob) < HEADER_BYTES + DIGEST_BYTES or sha256(blob[:-DIGEST_BYTES]) != blob[-DIGEST_BYTES:]:
        raise ArtifactError(f"{source}: the artifact's checksum does not match its bytes; the file is truncated "
                            "or corrupt")


def decompress(blob: bytes, source="artifact") -> bytes:
    check_container(blob, source)
    tag, flags = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if tag not in _BY_TAG:
        raise ArtifactError(f"{source}: unknown compressor tag {tag}")
    if flags & ~1:
        raise ArtifactError(f"{source}: unknown flags {flags:#04x}")
    name, decode = _BY_TAG[tag]
    try:
        payload = decode(blob[HEADER_BYTES:-DIGEST_BYTES])
    except pergroup.PergroupError:
        raise
    except Exception as e:  # each library raises its own error type (zlib.error, ZstdError, brotli.error, LZMAError)
        raise ArtifactError(f"{source}: the {name} stream does not decode ({e}); the file is truncated or "
                            "corrupt") from None
    payload = byte_unshuffle(payload) if flags & 1 else payload
    if sha256(payload) != blob[len(MAGIC) + 2:HEADER_BYTES]:
        raise ArtifactError(f"{source}: the decompressed payload's sha256 differs from the one the artifact "
                            f"records; the file is corrupt or {name} decoded it differently")
    return payload


# Integer-code fields of a "rows" entry and the entry keys that may hold their bit width, first found first:
# asymmetric LQER factors have a width each, symmetric ones share lqer_bits.
CODE_FIELDS = {"data": ("bits",), "lqer_a": ("lqer_a_bits", "lqer_bits"), "lqer_b": ("lqer_b_bits", "lqer_bits"),
               "awq_data": ("awq_bits",)}


def code_bits(t: dict, field: str) -> int:
    return next(t[key] for key in CODE_FIELDS[field] if key in t)


def code_shape(t: dict, field: str) -> tuple[int, int]:
    rows, cols = t["shape"]
    return {"data": (rows, cols), "lqer_a": (rows, t.get("lqer_rank")), "lqer_b": (t.get("lqer_rank"), cols),
            "awq_data": (rows, len(t.get("awq_starts", ())) * t.get("awq_group", 0))}[field]


def with_packed_codes(t: dict) -> dict:
    """The entry with its integer codes bit-packed at their width (a copy; other kinds unchanged)."""
    if t["kind"] != "rows" or t["container"] == "packed":
        return t
    packed = dict(t, container="packed")
    for field in CODE_FIELDS:
        if field in t:
            packed[field] = pack_codes(t[field], code_bits(t, field))
    return packed


def codes(t: dict, field: str) -> torch.Tensor:
    shape = code_shape(t, field)
    values = t[field]
    if t.get("container") == "packed":
        values = unpack_codes(values, code_bits(t, field), shape[0] * shape[1])
    return torch.from_numpy(np.array(values, dtype=np.int8).reshape(shape))


def stored_bytes(t: dict) -> int:
    return sum(v.nbytes for v in t.values() if isinstance(v, np.ndarray))


def reconstruct(t: dict) -> torch.Tensor:
    """The fp32 tensor a stored entry stands for."""
    if t["kind"] == "rows":
        w = dequantize_rows(codes(t, "data"), torch.from_numpy(t["scale"].copy()))
        if "awq_data" in t:  # AWQ-lite's column groups, stored at their own width and scale
            w[:, awq.protected_columns(t["awq_starts"], t["awq_group"])] = \
                dequantize_rows(codes(t, "awq_data"), torch.from_numpy(t["awq_scale"].copy()))
        if "lqer_a" in t:  # LQER's low-rank correction of the quantization error
            w = w + lqer.correction(codes(t, "lqer_a"), codes(t, "lqer_b"), t)
    elif t["kind"] == "float":
        w = torch.from_numpy(t["data"].copy()).float()
    elif t["kind"] in storage.DECODERS:
        w = storage.DECODERS[t["kind"]](t)
    else:
        raise ArtifactError(f"tensor {t['name']}: unknown storage kind {t['kind']!r}")
    return w.reshape(t["shape"])


def state_dict_from_tensors(tensors) -> dict:
    return {t["name"]: reconstruct(t) for t in tensors}


def load_artifact(path):
    """Read an artifact file: (header, dequantized fp32 state dict)."""
    with open(path, "rb") as f:
        blob = f.read()
    header, tensors = unpack_tensors(decompress(blob, source=path))
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {header.get('format')!r} != {FORMAT!r}")
    return header, state_dict_from_tensors(tensors)


def load_model(path, device="cpu"):
    """A GPT with the artifact's dequantized weights, in eval mode."""
    from stages.model import GPT, GPTConfig
    header, state = load_artifact(path)
    model = GPT(GPTConfig.from_dict(header["model_config"]))
    model.load_state_dict(state)
    return model.to(device).eval()
