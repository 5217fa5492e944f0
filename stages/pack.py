"""The artifact: a self-describing, compressed quantized model that loads back to a GPT.

Layout: MAGIC, one byte naming the compressor, then the compressed payload. The payload is a
little-endian u32 header length, a JSON header (model config, and per tensor its name, shape,
storage and byte offsets), then the tensor bytes. Quantized tensors store int8 codes per row with
one fp16 scale per row; small tensors stay in fp16 (fp32 for control tensors).
"""
import json
import lzma
import struct
import zlib

import brotli
import numpy as np
import torch
import zstandard

MAGIC = b"CADDIE\x01"
FORMAT = "caddie-artifact-v1"
COMPRESSORS = {
    "zlib": (1, lambda b: zlib.compress(b, 9), zlib.decompress),
    "zstd": (2, lambda b: zstandard.ZstdCompressor(level=22).compress(b),
             lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "brotli": (3, lambda b: brotli.compress(b, quality=11), brotli.decompress),
    "lzma": (4, lambda b: lzma.compress(b, preset=9), lzma.decompress),
}
_BY_TAG = {tag: (name, decompress) for name, (tag, _, decompress) in COMPRESSORS.items()}


class ArtifactError(ValueError):
    """An artifact that cannot be read; the message names the file."""


def quantize_rows(w: torch.Tensor, bits: int, clip_percentile: float):
    """Per-row symmetric round-to-nearest: int8 codes in [-qmax, qmax] and one fp16 scale per row."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    clip = torch.quantile(w.abs(), clip_percentile / 100.0, dim=1) if clip_percentile < 100 \
        else w.abs().amax(dim=1)
    scale = (clip / qmax).clamp_min(1e-10).half()
    q = torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def pack_tensors(tensors: list[dict], model_config: dict, meta: dict) -> bytes:
    """tensors: [{"name", "kind": "rows"|"float", "data": ndarray, "scale": ndarray?, ...}]."""
    blobs, entries, offset = [], [], 0
    for t in tensors:
        entry = {k: v for k, v in t.items() if k not in ("data", "scale")}
        for field in ("data", "scale"):
            if field in t:
                raw = np.ascontiguousarray(t[field]).tobytes()
                entry[field] = {"offset": offset, "nbytes": len(raw), "dtype": str(t[field].dtype),
                                "shape": list(t[field].shape)}
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
        t = dict(entry)
        for field in ("data", "scale"):
            if field in entry:
                spec = entry[field]
                raw = body[spec["offset"]:spec["offset"] + spec["nbytes"]]
                t[field] = np.frombuffer(raw, dtype=spec["dtype"]).reshape(spec["shape"])
        tensors.append(t)
    return header, tensors


def compress(payload: bytes, compressor: str) -> bytes:
    tag, fn, _ = COMPRESSORS[compressor]
    return MAGIC + bytes([tag]) + fn(payload)


def decompress(blob: bytes, source="artifact") -> bytes:
    if not blob.startswith(MAGIC) or len(blob) <= len(MAGIC):
        raise ArtifactError(f"{source}: not a caddie artifact (bad magic)")
    tag = blob[len(MAGIC)]
    if tag not in _BY_TAG:
        raise ArtifactError(f"{source}: unknown compressor tag {tag}")
    return _BY_TAG[tag][1](blob[len(MAGIC) + 1:])


def state_dict_from_tensors(tensors) -> dict:
    state = {}
    for t in tensors:
        if t["kind"] == "rows":
            w = dequantize_rows(torch.from_numpy(t["data"].copy()), torch.from_numpy(t["scale"].copy()))
        else:
            w = torch.from_numpy(t["data"].copy()).float()
        state[t["name"]] = w.reshape(t["shape"])
    return state


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
