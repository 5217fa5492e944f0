"""ngram_tilt: the token n-gram tilt of the records (PR #1145, as #2130/#2135 run it: the token expert only).

Before target t is scored, an online n-gram over the targets before it proposes at most one hint: the token that
most often followed the last `order - 1` targets, when it did so in at least `threshold` of those contexts' past
occurrences. The model's distribution is tilted towards a gated hint h,

    p'(a) = exp(boost * [a == h]) * p(a) / Z,   Z = 1 + p(h) * (exp(boost) - 1),

which is the softmax of the logits with `boost` added at h: normalised over the vocabulary, as the records' closed
form is. The hints depend only on the targets before each one (score first): they are computed in one vectorised
pass before scoring (the eval's precompute seconds), from the whole stream, across documents, as the records do.

The records' counts live in a C hash table keyed by a 64-bit hash of the context; here a context is a 64-bit
polynomial hash of its tokens, grouped by sorting. Up to hash collisions (of either), the hints are the same.
"""
from dataclasses import dataclass

import numpy as np
import torch

# Odd 64-bit multipliers, one per context position (fixed: the hints are part of the scored result).
_MULTIPLIERS = np.random.default_rng(20240520).integers(1, 2**63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
MAX_ORDER = len(_MULTIPLIERS) + 1


def record_sequence(targets: np.ndarray) -> np.ndarray:
    """The sequence the records' n-gram state sees: their state is seeded with the first target and then reads
    every target, so the first target appears twice (targets[i]'s context is this sequence's entries up to i)."""
    return np.concatenate((targets[:1], targets))


def context_keys(seq: np.ndarray, context: int, count: int) -> np.ndarray:
    """64-bit hash of seq[i + 1 - context : i + 1] for each target i < count (entries before the sequence's start
    read as 0; those windows are not used)."""
    keys = np.zeros(count, dtype=np.uint64)
    padded = np.concatenate((np.zeros(context, dtype=np.uint64), seq.astype(np.uint64) + np.uint64(1)))
    for j in range(context):  # token j of the window: seq[i + 1 - context + j] = padded[i + 1 + j]
        keys += padded[1 + j:1 + j + count] * _MULTIPLIERS[j]
    return keys


def within_groups(group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For items sorted by group: the index of each item's group start, and its rank in its group."""
    starts = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    start_of = np.repeat(starts, np.diff(np.r_[starts, len(group)]))
    return start_of, np.arange(len(group)) - start_of


def token_hints(tokens: np.ndarray, order: int, threshold: float) -> np.ndarray:
    """The hinted token of every target position 1..n-1 of the stream (-1 where no hint clears `threshold`;
    position 0 is no target). A context's top token is the one with the most occurrences after it so far, the
    first to reach that count on ties, as the records' update (replace only on a strictly larger count)."""
    hints = np.full(len(tokens), -1, dtype=np.int64)
    targets = np.asarray(tokens[1:], dtype=np.int64)
    count, context = len(targets), order - 1
    valid = np.arange(count) >= context - 1  # a full context of `context` entries of the record sequence
    positions = np.flatnonzero(valid)
    if len(positions) < 2:
        return hints
    _, ctx = np.unique(context_keys(record_sequence(targets), context, count)[positions], return_inverse=True)
    by_ctx = np.lexsort((positions, ctx))  # occurrences of each context in stream order
    group, tok = ctx[by_ctx], targets[positions[by_ctx]]
    ctx_start, seen = within_groups(group)  # seen: the context's occurrences before this one (its total)
    by_pair = np.lexsort((positions[by_ctx], tok, group))
    _, pair_rank = within_groups(group[by_pair] * (targets.max() + 1) + tok[by_pair])
    pair_count = np.empty(len(by_pair), dtype=np.int64)
    pair_count[by_pair] = pair_rank + 1  # occurrences of (context, token) up to and including this one
    shift = group * (count + 1)  # keeps the running maximum within each context
    top_count = np.maximum.accumulate(pair_count + shift) - shift
    is_new_top = np.r_[True, top_count[1:] > top_count[:-1]] | (seen == 0)
    top_tok = tok[np.maximum.accumulate(np.where(is_new_top, np.arange(len(tok)), 0))]
    has_past = seen > 0
    prev = np.arange(len(tok)) - 1  # the state after the previous occurrence of the same context
    prob = np.zeros(len(tok), dtype=np.float32)
    prob[has_past] = top_count[prev[has_past]].astype(np.float32) / seen[has_past].astype(np.float32)
    gated = has_past & (prob >= np.float32(threshold))
    target_index = positions[by_ctx]
    hints[1 + target_index[gated]] = top_tok[prev[gated]]
    return hints


@dataclass
class NgramTilt:
    """The hints of a stream and the boost, on the device; called on the logits of scored targets."""
    hints: torch.Tensor
    boost: float

    def __call__(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hint = self.hints[positions]
        gate = (hint >= 0).to(logits.dtype) * self.boost
        return logits.scatter_add(1, hint.clamp(min=0)[:, None], gate[:, None])


def build_tilt(tokens: np.ndarray, cfg: dict, device) -> NgramTilt | None:
    """The tilt of evaluate.ngram_tilt for this val stream, or None when it is off."""
    tilt = cfg.get("ngram_tilt", {"enabled": False})
    if not tilt["enabled"]:
        return None
    if not 2 <= tilt["order"] <= MAX_ORDER:
        raise ValueError(f"evaluate.ngram_tilt.order: {tilt['order']} is outside 2..{MAX_ORDER}")
    hints = token_hints(tokens, tilt["order"], tilt["threshold"])
    return NgramTilt(torch.from_numpy(hints).to(device), float(tilt["boost"]))
