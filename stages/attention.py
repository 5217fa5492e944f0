"""Causal attention over a batch of rows, or over documents packed into one row (the records' varlen attention).

What attention may see is one of: None (causal within each row), a dense bool mask (B, 1, T, T), or Segments: one
packed row cut at every BOS and every max_len tokens within a document (the records' DocumentPackingLoader), where
each segment attends only to itself. Segments run on flash-attn's varlen kernel when it is installed (CUDA,
half precision), and otherwise on SDPA over the segments gathered into a padded batch: padding sits at the end of
each segment row, so causal attention never lets a real query see it, and the padded outputs are dropped.
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from flash_attn import flash_attn_func, flash_attn_varlen_func
except ImportError:
    flash_attn_func = flash_attn_varlen_func = None

BOS_ID = 1  # stages.tokenize.BOS_ID: every document starts with it
SEGMENT_BUCKET = 64  # segment counts and lengths are padded to multiples of this, so compiled shapes change rarely


@dataclass
class Segments:
    """One packed row's attention segments. cu_seqlens: int32 boundaries, padded to a bucket with the row length
    (empty segments) as flash-attn's varlen kernel takes them; max_len, the longest a segment may be. For the SDPA
    fallback: index, (S, L), the row position of each segment's tokens (padding reads position 0; L is the longest
    segment rounded up to the bucket, at most max_len), and back, (N,), where each row position lands in the
    flattened (S * L) segments (index arithmetic, not a boolean mask: no data-dependent shapes to break a
    compiled graph)."""
    cu_seqlens: Tensor
    max_len: int
    index: Tensor
    back: Tensor

    def to(self, device) -> "Segments":
        return Segments(self.cu_seqlens.to(device), self.max_len, self.index.to(device), self.back.to(device))


def segment_starts(tokens: np.ndarray, max_len: int, bos_id: int = BOS_ID) -> np.ndarray:
    """Start of every segment of a packed row: position 0, every BOS, and every max_len tokens after each of those
    (a document longer than max_len is cut into pieces that do not see each other, as the records' loader does)."""
    docs = np.flatnonzero(np.asarray(tokens) == bos_id)
    if len(docs) == 0 or docs[0] != 0:
        docs = np.concatenate(([0], docs))
    ends = np.append(docs[1:], len(tokens))
    pieces = (ends - docs + max_len - 1) // max_len
    return np.repeat(docs, pieces) + max_len * (np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces))


def document_segments(tokens, max_len: int, bos_id: int = BOS_ID, bucket: int = SEGMENT_BUCKET) -> Segments:
    """The Segments of one packed row of token ids (1-D, CPU)."""
    tokens = np.asarray(tokens)
    n = len(tokens)
    starts = segment_starts(tokens, max_len, bos_id)
    count = -(-len(starts) // bucket) * bucket
    cu = np.full(count + 1, n, dtype=np.int32)
    cu[:len(starts)] = starts
    lengths = np.diff(cu)
    offsets = np.arange(min(max_len, -(-int(lengths.max(initial=1)) // bucket) * bucket))
    valid = offsets[None, :] < lengths[:, None]
    index = np.where(valid, cu[:-1, None] + offsets[None, :], 0)
    back = np.flatnonzero(valid)
    return Segments(torch.from_numpy(cu), max_len, torch.from_numpy(index), torch.from_numpy(back))


def document_mask(idx: Tensor, bos_id: int = BOS_ID) -> Tensor:
    """(B, 1, T, T) causal mask that also stops attention at the last BOS at or before each query."""
    doc = torch.cumsum(idx == bos_id, dim=1)
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def half_precision_cuda(q: Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def segment_attention(q: Tensor, k: Tensor, v: Tensor, seg: Segments) -> Tensor:
    """q: (1, H, N, D); k, v: (1, H_kv, N, D), one packed row; each segment attends causally to itself only."""
    if flash_attn_varlen_func is not None and half_precision_cuda(q):
        y = flash_attn_varlen_func(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                   seg.cu_seqlens, seg.cu_seqlens, seg.max_len, seg.max_len, causal=True)
        return y.transpose(0, 1)[None]
    gather = lambda t: t[0][:, seg.index].transpose(0, 1)  # (S, H, L, D)
    y = F.scaled_dot_product_attention(gather(q), gather(k), gather(v), is_causal=True,
                                       enable_gqa=k.size(1) != q.size(1))
    return y.transpose(0, 1).flatten(1, 2)[:, seg.back][None]


def causal_attention(q: Tensor, k: Tensor, v: Tensor, span: Tensor | Segments | None = None) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H_kv, T, D); span: what each query may see (see the module's docstring).
    Returns (B, H, T, D)."""
    if isinstance(span, Segments):
        return segment_attention(q, k, v, span)
    if span is None and flash_attn_func is not None and half_precision_cuda(q):
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return y.transpose(1, 2)
    gqa = k.size(1) != q.size(1)
    if span is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=span, enable_gqa=gqa)
