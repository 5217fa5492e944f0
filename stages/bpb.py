"""Bits per byte, exactly as the challenge computes it.

Byte lookup tables from the SentencePiece model: control, unknown and unused tokens are boundaries
worth 0 bytes; byte-fallback pieces are worth 1 byte; other pieces are worth the UTF-8 length of
the piece without its leading "▁", and that "▁" adds 1 byte unless the previous token is a boundary.
"""
import math
from dataclasses import dataclass

import numpy as np

SPACE = "\u2581"


@dataclass(frozen=True)
class ByteTables:
    base_bytes: np.ndarray         # int16, bytes of each piece without its leading "▁"
    has_leading_space: np.ndarray  # bool
    is_boundary: np.ndarray        # bool


def build_byte_tables(sp, vocab_size: int | None = None) -> ByteTables:
    size = max(sp.vocab_size(), vocab_size or 0)
    base = np.zeros(size, dtype=np.int16)
    space = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


def target_bytes(tables: ByteTables, prev_ids, target_ids) -> np.ndarray:
    """Bytes each target token stands for, given the token before it (int64)."""
    prev_ids = np.asarray(prev_ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    extra = tables.has_leading_space[target_ids] & ~tables.is_boundary[prev_ids]
    return tables.base_bytes[target_ids].astype(np.int64) + extra


def stream_bytes(tables: ByteTables, tokens) -> int:
    """Bytes of every target in a token stream (each token predicted from the one before it)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return int(target_bytes(tables, tokens[:-1], tokens[1:]).sum())


def bits_per_byte(loss_sum_nats: float, byte_count: int) -> float:
    return float(loss_sum_nats) / (math.log(2) * float(byte_count))


@dataclass(frozen=True)
class SidecarBytes:
    """Each val token's bytes of original text, from CaseOps byte sidecars (stages/caseops.py)."""
    counts: np.ndarray  # int64, one per val token


ByteCounter = ByteTables | SidecarBytes


def scored_bytes(counter: ByteCounter, tokens: np.ndarray, targets: np.ndarray) -> int:
    """Bytes of the targets at positions `targets` of `tokens` (each > 0, predicted from the token before it):
    from the sidecar where there is one, else from the tokenizer's byte tables. Every eval mode counts here."""
    if isinstance(counter, SidecarBytes):
        return int(counter.counts[targets].sum())
    return int(target_bytes(counter, tokens[targets - 1], tokens[targets]).sum())
