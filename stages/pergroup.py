"""The records' per-group compressor (#1855's COMPRESSOR=pergroup): the integer codes of the quantized
matrices are grouped by role, and each group is compressed on its own.

A group is one role's code matrices over all layers (tok_emb, c_k, c_q, c_v, proj, fc, mlp.proj), in layer
order, each matrix one byte per code (quantize.code_container: bytes). The rows of tok_emb, c_q and fc are
first reordered by a greedy L1 nearest-neighbour walk (similar rows side by side), and each matrix is stored
transposed, so that one input column's codes over all rows are contiguous. Each group is compressed with the
smaller of lrzip's ZPAQ (`lrzip -z -L 9`, as the records run it) and brotli-11; everything else in the payload
(the header, scales, floats, LQER factors) is compressed with brotli-11, and so are the row orders.

This is a compressor of caddie's payload (stages/pack.py): decompress returns the very payload bytes that were
compressed, so the artifact's checksums and loader are unchanged. The frame: u32 stream count, then per stream
u8 method (0 brotli, 1 lrzip) and u32 length, then the streams: the groups in GROUPS order, the remainder, the
row orders.
"""
import json
import os
import shutil
import struct
import subprocess
import tempfile

import brotli
import numpy as np
import torch

GROUPS = ("tok_emb.weight", "attn.c_k.weight", "attn.c_q.weight", "attn.c_v.weight", "attn.proj.weight",
          "mlp.fc.weight", "mlp.proj.weight")
SORTED_GROUPS = {"tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight"}
BROTLI, LRZIP = 0, 1
KEY = "quantize.compressor: pergroup"


class PergroupError(RuntimeError):
    """lrzip is missing or failed; the message names the binary and the config key."""


# ---- which payload arrays are grouped ---------------------------------------------------------------

def group_of(name: str) -> tuple[str, int] | None:
    """(group, layer) of a weight name, or None for a weight in no group."""
    parts = name.split(".")
    if parts[0] == "blocks" and len(parts) > 2 and parts[1].isdigit():
        role = ".".join(parts[2:])
        return (role, int(parts[1])) if role in GROUPS else None
    return (name, 0) if name in GROUPS else None


def grouped_arrays(header: dict) -> dict:
    """{group: [array spec, ...] in layer order}: the int8 code matrices (one byte per code) of "rows" entries."""
    groups = {}
    for t in header["tensors"]:
        spec = t["arrays"].get("data")
        found = group_of(t["name"])
        if t["kind"] == "rows" and t.get("container") == "bytes" and spec and spec["dtype"] == "int8" \
                and len(spec["shape"]) == 2 and found:
            groups.setdefault(found[0], []).append((found[1], spec))
    return {g: [spec for _, spec in sorted(groups[g], key=lambda x: x[0])] for g in GROUPS if g in groups}


def split_payload(payload: bytes) -> tuple[dict, int]:
    """(header, offset of the body); bytes that are no caddie payload (byte-shuffled ones) have an empty header,
    so they are all remainder."""
    try:
        (length,) = struct.unpack_from("<I", payload)
        return json.loads(payload[4:4 + length]), 4 + length
    except (struct.error, ValueError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return {"tensors": []}, 0


# ---- row order ----------------------------------------------------------------------------------------

def similarity_order(codes: np.ndarray) -> np.ndarray:
    """The greedy L1 walk over the rows: start at row 0, then always the nearest row not yet taken (the
    lowest index on a tie), as the record's _similarity_sort_l1. uint16, so at most 65,536 rows."""
    n = codes.shape[0]
    if n > 1 << 16:
        raise ValueError(f"{KEY}: a matrix of {n:,} rows has more than the 65,536 a uint16 row order holds")
    x = torch.from_numpy(codes.astype(np.float32))
    dist = torch.cdist(x, x, p=1.0)  # sums of integers below 2^24: exact in fp32
    taken = torch.zeros(n, dtype=torch.bool)
    order = [0]
    taken[0] = True
    for _ in range(n - 1):
        d = dist[order[-1]].masked_fill(taken, float("inf"))
        nxt = int(torch.argmin(d))
        order.append(nxt)
        taken[nxt] = True
    return np.array(order, dtype=np.uint16)


# ---- lrzip ----------------------------------------------------------------------------------------------

def lrzip_binary() -> str:
    path = shutil.which("lrzip")
    if path is None:
        raise PergroupError(f"{KEY} needs the lrzip binary (Debian/Ubuntu: apt-get install lrzip), and no `lrzip` "
                            "is on PATH")
    return path


def run_lrzip(args: list[str], data: bytes, suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in" + suffix), os.path.join(tmp, "out")
        with open(src, "wb") as f:
            f.write(data)
        done = subprocess.run([lrzip_binary(), *args, "-o", dst, src], capture_output=True)
        if done.returncode != 0 or not os.path.exists(dst):
            raise PergroupError(f"{KEY}: `lrzip {' '.join(args)}` failed (exit {done.returncode}): "
                                f"{done.stderr.decode(errors='replace')[:400]}")
        with open(dst, "rb") as f:
            return f.read()


def lrzip_compress(data: bytes) -> bytes:
    return run_lrzip(["-q", "-z", "-L", "9"], data, ".bin")


def lrzip_decompress(data: bytes) -> bytes:
    return run_lrzip(["-q", "-d", "-f"], data, ".lrz")


def smallest_stream(data: bytes) -> tuple[int, bytes]:
    """(method, stream): the smaller of lrzip ZPAQ and brotli-11."""
    candidates = [(LRZIP, lrzip_compress(data)), (BROTLI, brotli.compress(data, quality=11))]
    return min(candidates, key=lambda c: len(c[1]))


def decode_stream(method: int, stream: bytes) -> bytes:
    if method == LRZIP:
        return lrzip_decompress(stream)
    if method == BROTLI:
        return brotli.decompress(stream)
    raise ValueError(f"{KEY}: unknown stream method {method}")


# ---- the frame ------------------------------------------------------------------------------------------

def group_bytes(payload: bytes, body: int, specs: list, group: str) -> tuple[bytes, bytes]:
    """(the group's codes, row-sorted and transposed, concatenated; their row orders)."""
    blobs, orders = [], []
    for spec in specs:
        raw = payload[body + spec["offset"]:body + spec["offset"] + spec["nbytes"]]
        codes = np.frombuffer(raw, dtype=np.int8).reshape(spec["shape"])
        if group in SORTED_GROUPS:
            order = similarity_order(codes)
            orders.append(order.tobytes())
            codes = codes[order.astype(np.int64)]
        blobs.append(np.ascontiguousarray(codes.T).tobytes())
    return b"".join(blobs), b"".join(orders)


def cut_ranges(header: dict, body: int) -> list[tuple[int, int]]:
    """The (start, end) payload ranges that the groups hold, in payload order."""
    return sorted((body + s["offset"], body + s["offset"] + s["nbytes"])
                  for specs in grouped_arrays(header).values() for s in specs)


def remainder_of(payload: bytes, ranges) -> bytes:
    pieces, at = [], 0
    for start, end in ranges:
        pieces.append(payload[at:start])
        at = end
    return b"".join(pieces) + payload[at:]


def frame(streams: list[tuple[int, bytes]]) -> bytes:
    table = b"".join(struct.pack("<BI", method, len(s)) for method, s in streams)
    return struct.pack("<I", len(streams)) + table + b"".join(s for _, s in streams)


def unframe(blob: bytes) -> list[tuple[int, bytes]]:
    (count,) = struct.unpack_from("<I", blob)
    table = [struct.unpack_from("<BI", blob, 4 + 5 * i) for i in range(count)]
    at, streams = 4 + 5 * count, []
    for method, length in table:
        streams.append((method, blob[at:at + length]))
        at += length
    if at != len(blob):
        raise ValueError(f"{KEY}: the frame's streams end at byte {at:,} of {len(blob):,}")
    return streams


def compress_streams(payload: bytes) -> tuple[list[tuple[int, bytes]], list[str]]:
    """The frame's streams and the group each of the first ones holds."""
    header, body = split_payload(payload)
    grouped = grouped_arrays(header)
    streams, orders = [], []
    for group, specs in grouped.items():
        data, order = group_bytes(payload, body, specs, group)
        streams.append(smallest_stream(data))
        orders.append(order)
    remainder = remainder_of(payload, cut_ranges(header, body))
    streams.append((BROTLI, brotli.compress(remainder, quality=11, lgwin=24)))
    all_orders = b"".join(orders)
    streams.append((BROTLI, brotli.compress(all_orders, quality=11) if all_orders else b""))
    return streams, list(grouped)


def compress(payload: bytes) -> bytes:
    return frame(compress_streams(payload)[0])


def restore_group(data: bytes, orders: bytes, specs: list, group: str) -> tuple[list[bytes], bytes]:
    """The group's matrices in payload form (row order undone, untransposed), and the row orders left over."""
    matrices, at = [], 0
    for spec in specs:
        rows, cols = spec["shape"]
        codes = np.frombuffer(data[at:at + rows * cols], dtype=np.int8).reshape(cols, rows).T
        at += rows * cols
        if group in SORTED_GROUPS:
            order = np.frombuffer(orders[:2 * rows], dtype=np.uint16).astype(np.int64)
            orders = orders[2 * rows:]
            unsorted = np.empty_like(codes)
            unsorted[order] = codes
            codes = unsorted
        matrices.append(np.ascontiguousarray(codes).tobytes())
    return matrices, orders


def decompress(blob: bytes) -> bytes:
    streams = [decode_stream(method, s) if s else b"" for method, s in unframe(blob)]
    remainder, orders = streams[-2], streams[-1]
    if len(streams) == 2:  # no groups: the remainder is the whole payload
        return remainder
    header, body = split_payload(remainder)  # the header and everything before the first group are intact
    grouped = grouped_arrays(header)
    if len(streams) != len(grouped) + 2:
        raise ValueError(f"{KEY}: {len(streams)} streams for {len(grouped)} groups (+ remainder and row orders)")
    placed = {}
    for (group, specs), data in zip(grouped.items(), streams):
        matrices, orders = restore_group(data, orders, specs, group)
        for spec, raw in zip(specs, matrices):
            placed[body + spec["offset"]] = raw
    pieces, at, prev_end = [], 0, 0
    for start, end in cut_ranges(header, body):
        gap = start - prev_end  # remainder bytes between the previous range and this one
        pieces += [remainder[at:at + gap], placed[start]]
        at, prev_end = at + gap, end
    return b"".join(pieces) + remainder[at:]
