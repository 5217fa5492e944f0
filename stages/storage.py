"""Alternative storage forms for quantized matrices (the seed PRs' ideas), each a stored entry kind
with an encoder and a decoder. `DECODERS[kind](entry) -> fp32 tensor` is what the artifact loader uses.

Every encoder takes one 2-D matrix w (rows = outputs) and returns (entry, w_hat): entry holds "kind",
"shape", compact numpy arrays (bit-packed codes, fp16 scales/levels) and JSON scalars; w_hat is the
decoder's output on that entry, so what the caller measures is exactly what the artifact loads.
"""
import numpy as np
import torch
import torch.nn.functional as F

from stages import rowquant  # not stages.pack: pack imports this module

# The C(4,2) = 6 ways to keep 2 weights of a group of 4, and the pattern index of each (i, j) pair.
PAIRS = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))
_PATTERN_OF = torch.zeros(16, dtype=torch.long)
for _k, (_i, _j) in enumerate(PAIRS):
    _PATTERN_OF[4 * _i + _j] = _k
# 6 patterns need log2(6) = 2.58 bits; 3-bit codes waste 0.42 bit per group (0.1 bit per weight).
PATTERN_BITS = 3


# ---- argument checks -------------------------------------------------------------------------

def _bits(value, name="bits") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 2 <= value <= 8:
        raise ValueError(f"{name} must be an integer in 2..8, got {value!r}")
    return int(value)


def _fraction(value, name) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _matrix(w) -> torch.Tensor:
    w = torch.as_tensor(w).detach().float().cpu()
    if w.ndim != 2 or w.numel() == 0:
        raise ValueError(f"w must be a non-empty 2-D matrix, got shape {tuple(w.shape)}")
    return w


def _per_row(values, rows, name) -> torch.Tensor:
    values = torch.as_tensor(values).detach().cpu()
    if tuple(values.shape) != (rows,):
        raise ValueError(f"{name} must hold one value per row ({rows}), got shape {tuple(values.shape)}")
    return values


# ---- bit packing (pack.pack_codes' layout: `bits` big-endian bits per value, signed = offset) ----

def _pack_unsigned(u: np.ndarray, bits: int) -> np.ndarray:
    u = np.asarray(u).astype(np.uint8).ravel()
    return np.packbits(np.unpackbits(u[:, None], axis=1)[:, 8 - bits:])


def _unpack_unsigned(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    columns = np.unpackbits(np.asarray(packed, dtype=np.uint8))[:count * bits].reshape(count, bits)
    return np.packbits(np.pad(columns, ((0, 0), (8 - bits, 0))), axis=1).ravel()


def _pack_signed(q, bits: int) -> np.ndarray:
    return _pack_unsigned(np.asarray(q).astype(np.int16) + (1 << (bits - 1)), bits)


def _unpack_signed(packed, bits: int, count: int) -> torch.Tensor:
    unsigned = _unpack_unsigned(packed, bits, count).astype(np.int16)
    return torch.from_numpy((unsigned - (1 << (bits - 1))).astype(np.int8))


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array))  # a copy: arrays from unpack_tensors are read-only


def stored_bytes(entry: dict) -> int:
    return sum(v.nbytes for v in entry.values() if isinstance(v, np.ndarray))


def row_sensitivity(weight: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """Per output row, Σ_j g_ij² · w_ij²: the diagonal-Fisher estimate (up to ½) of the loss increase
    from zeroing the row, with g² averaged over calibration batches by the caller."""
    return (grad_sq.float() * weight.float() ** 2).sum(1)


# ---- 2:4 structured sparsity -----------------------------------------------------------------

def encode_sparse24(w, bits, scale):
    """Keep the 2 largest |w| of every 4 consecutive weights of a row, as codes at `bits` with the
    row's `scale`, plus one of the 6 keep-patterns per group."""
    w, bits = _matrix(w), _bits(bits)
    scale = _per_row(scale, w.shape[0], "scale").half()
    groups = F.pad(w, (0, -w.shape[1] % 4)).reshape(w.shape[0], -1, 4)
    keep = groups.abs().argsort(dim=-1, descending=True, stable=True)[..., :2].sort(dim=-1).values
    pattern = _PATTERN_OF[4 * keep[..., 0] + keep[..., 1]]
    q = rowquant.round_to_nearest(groups.gather(-1, keep).reshape(w.shape[0], -1), scale, rowquant.qmax_of(bits))
    entry = {"kind": "sparse24", "shape": list(w.shape), "bits": bits, "scale": scale.numpy(),
             "values": _pack_signed(q.numpy(), bits), "patterns": _pack_unsigned(pattern.numpy(), PATTERN_BITS)}
    return entry, decode_sparse24(entry)


def decode_sparse24(entry: dict) -> torch.Tensor:
    rows, cols = entry["shape"]
    groups = -(-cols // 4)
    q = _unpack_signed(entry["values"], entry["bits"], rows * groups * 2).reshape(rows, -1)
    values = rowquant.dequantize_rows(q, _tensor(entry["scale"])).reshape(rows, groups, 2)
    pattern = torch.from_numpy(_unpack_unsigned(entry["patterns"], PATTERN_BITS, rows * groups).astype(np.int64))
    positions = torch.tensor(PAIRS)[pattern].reshape(rows, groups, 2)
    return torch.zeros(rows, groups, 4).scatter_(-1, positions, values).reshape(rows, -1)[:, :cols]


# ---- Lloyd-Max codebook ----------------------------------------------------------------------

def _nearest_level(u: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(u, (levels[1:] + levels[:-1]) / 2)


def _weighted_error(u, weight, levels) -> float:
    return float((weight * (u - levels[_nearest_level(u, levels)]) ** 2).sum())


def lloyd_max_levels(u: torch.Tensor, weight: torch.Tensor, count: int, iterations: int = 300) -> torch.Tensor:
    """`count` sorted levels minimising Σ weight·(u − level)² (1-D weighted k-means), started at the
    quantiles of u; a level that loses all its points stays where it is."""
    order = u.argsort().numpy()
    u, weight = u.numpy()[order], weight.numpy()[order]
    levels = u[((np.arange(count) + 0.5) / count * len(u)).astype(np.int64)]
    # u sorted: each level owns a contiguous run, so prefix sums give every level's mass and mean
    # (numpy: hundreds of tiny steps are slower in torch's thread pool)
    cum_mass, cum_moment = np.concatenate([[0], weight.cumsum()]), np.concatenate([[0], (weight * u).cumsum()])
    for _ in range(iterations):
        ends = np.searchsorted(u, (levels[1:] + levels[:-1]) / 2, side="right")  # as _nearest_level
        edges = np.concatenate([[0], ends, [len(u)]])
        mass = cum_mass[edges[1:]] - cum_mass[edges[:-1]]
        moment = cum_moment[edges[1:]] - cum_moment[edges[:-1]]
        updated = np.where(mass > 0, moment / np.maximum(mass, 1e-300), levels)
        converged = np.abs(updated - levels).max() <= 1e-7 * np.abs(levels).max()
        levels = updated
        if converged:
            break
    return torch.from_numpy(np.sort(levels))


def encode_codebook(w, bits, scale):
    """Per-tensor non-uniform levels on the row-normalised weights u = w / scale, fit by Lloyd's
    algorithm; stores 2**bits fp16 levels, `bits`-bit level indices and the per-row fp16 scale."""
    w, bits = _matrix(w), _bits(bits)
    scale = _per_row(scale, w.shape[0], "scale").half()
    s = scale.double().clamp_min(torch.finfo(torch.float16).tiny)  # a zero-scale row decodes to 0 anyway
    u = (w.double() / s[:, None]).ravel()
    weight = (scale.double()[:, None] ** 2).expand_as(w).ravel()  # so the fit minimises the error in w
    lloyd = lloyd_max_levels(u, weight, 2 ** bits).half().double()
    # Lloyd finds a local optimum of the sampled error, so keep the uniform grid when it does better:
    # it holds every round-to-nearest level (and one more), so the codebook never loses to RTN.
    grid = torch.arange(-2 ** (bits - 1), 2 ** (bits - 1), dtype=torch.float64)
    levels = min((lloyd, grid), key=lambda c: _weighted_error(u, weight, c))
    index = _nearest_level(u, levels)
    entry = {"kind": "codebook", "shape": list(w.shape), "bits": bits, "scale": scale.numpy(),
             "levels": levels.half().numpy(), "indices": _pack_unsigned(index.numpy(), bits)}
    return entry, decode_codebook(entry)


def decode_codebook(entry: dict) -> torch.Tensor:
    rows, cols = entry["shape"]
    index = torch.from_numpy(_unpack_unsigned(entry["indices"], entry["bits"], rows * cols).astype(np.int64))
    levels = _tensor(entry["levels"]).float()
    return levels[index].reshape(rows, cols) * _tensor(entry["scale"]).float()[:, None]


# ---- freeze-dry: columns rebuilt from their two stored neighbours --------------------------------

def _neighbour_fit(w: torch.Tensor, w_q: torch.Tensor):
    """Per interior column j: fp16 least-squares (a, b) for w[:, j] ≈ a·ŵ[:, j−1] + b·ŵ[:, j+1] on the
    quantized neighbours ŵ (all the decoder has), and the relative residual of that prediction."""
    neighbours = torch.stack([w_q[:, :-2], w_q[:, 2:]], dim=-1).transpose(0, 1).double()  # (C−2, R, 2)
    target = w[:, 1:-1].T.double()[..., None]                                               # (C−2, R, 1)
    coefs = torch.linalg.lstsq(neighbours, target, driver="gelsd").solution.half()
    residual = (target - neighbours @ coefs.double()).norm(dim=(1, 2))
    return coefs[..., 0], residual / target.norm(dim=(1, 2)).clamp_min(1e-30)


def _non_adjacent_below(residual: torch.Tensor, tau: float) -> np.ndarray:
    """Interior columns with residual < tau, best first, skipping any next to one already taken."""
    taken = np.zeros(len(residual) + 2, dtype=bool)
    for j in (torch.argsort(residual, stable=True) + 1).tolist():
        if residual[j - 1] >= tau:
            break
        if not (taken[j - 1] or taken[j + 1]):
            taken[j] = True
    return np.flatnonzero(taken)


def encode_freeze_dry(w, bits, scale, tau, min_fraction):
    """Round-to-nearest codes of the kept columns; an interior column that a·left + b·right of its
    quantized neighbours predicts within relative error `tau` is dropped and stored as (a, b) only.
    Neighbours of a dropped column are always kept, so decoding never chains predictions."""
    w, bits, min_fraction = _matrix(w), _bits(bits), _fraction(min_fraction, "min_fraction")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    scale = _per_row(scale, w.shape[0], "scale").half()
    rows, cols = w.shape
    q = rowquant.round_to_nearest(w, scale, rowquant.qmax_of(bits))
    dropped = np.zeros(0, dtype=np.int64)
    if cols >= 3:
        coefs, residual = _neighbour_fit(w, rowquant.dequantize_rows(q, scale))
        dropped = _non_adjacent_below(residual, tau)
        if len(dropped) == 0 or len(dropped) < min_fraction * cols:
            dropped = np.zeros(0, dtype=np.int64)
    kept = np.ones(cols, dtype=bool)
    kept[dropped] = False
    entry = {"kind": "freeze_dry", "shape": [rows, cols], "bits": bits, "dropped": len(dropped),
             "scale": scale.numpy(), "codes": _pack_signed(q[:, torch.from_numpy(kept)].numpy(), bits),
             "dropped_columns": dropped.astype(np.uint16 if cols <= 2 ** 16 else np.uint32),
             "coefs": coefs[dropped - 1].numpy() if len(dropped) else np.zeros((0, 2), np.float16)}
    return entry, decode_freeze_dry(entry)


def decode_freeze_dry(entry: dict) -> torch.Tensor:
    rows, cols = entry["shape"]
    dropped = torch.from_numpy(np.asarray(entry["dropped_columns"]).astype(np.int64))
    kept = torch.ones(cols, dtype=torch.bool)
    kept[dropped] = False
    q = _unpack_signed(entry["codes"], entry["bits"], rows * int(kept.sum())).reshape(rows, -1)
    w = torch.zeros(rows, cols)
    w[:, kept] = rowquant.dequantize_rows(q, _tensor(entry["scale"]))
    a, b = _tensor(entry["coefs"]).float().reshape(-1, 2).T
    w[:, dropped] = a * w[:, dropped - 1] + b * w[:, dropped + 1]
    return w


# ---- per-row mixed precision (FTLE-style) ----------------------------------------------------

def encode_mixed_rows(w, row_sensitivity, low_bits, high_bits, high_fraction, scale_fn):
    """The `high_fraction` most sensitive rows at `high_bits`, the rest at `low_bits`, each class's
    codes packed at its own width; `scale_fn(w_rows, bits) -> fp16 scale` applies the caller's clip."""
    w = _matrix(w)
    low_bits, high_bits = _bits(low_bits, "low_bits"), _bits(high_bits, "high_bits")
    if high_bits <= low_bits:
        raise ValueError(f"high_bits ({high_bits}) must exceed low_bits ({low_bits})")
    high_fraction = _fraction(high_fraction, "high_fraction")
    sensitivity = _per_row(row_sensitivity, w.shape[0], "row_sensitivity").float()
    high = torch.zeros(w.shape[0], dtype=torch.bool)
    high[sensitivity.argsort(descending=True, stable=True)[:round(high_fraction * w.shape[0])]] = True
    scale = torch.zeros(w.shape[0], dtype=torch.float16)
    entry = {"kind": "mixed_rows", "shape": list(w.shape), "low_bits": low_bits, "high_bits": high_bits,
             "row_bits": torch.where(high, high_bits, low_bits).to(torch.uint8).numpy()}
    for name, rows, bits in (("high", high, high_bits), ("low", ~high, low_bits)):
        q = torch.zeros(0, dtype=torch.int8)
        if rows.any():
            scale[rows] = _per_row(scale_fn(w[rows], bits), int(rows.sum()), "scale_fn(w_rows, bits)").half()
            q = rowquant.round_to_nearest(w[rows], scale[rows], rowquant.qmax_of(bits))
        entry[f"codes_{name}"] = _pack_signed(q.numpy(), bits)
    entry["scale"] = scale.numpy()
    return entry, decode_mixed_rows(entry)


def decode_mixed_rows(entry: dict) -> torch.Tensor:
    rows, cols = entry["shape"]
    high = torch.from_numpy(np.asarray(entry["row_bits"]) == entry["high_bits"])
    scale = _tensor(entry["scale"])
    w = torch.zeros(rows, cols)
    for name, mask in (("high", high), ("low", ~high)):
        count = int(mask.sum())
        q = _unpack_signed(entry[f"codes_{name}"], entry[f"{name}_bits"], count * cols).reshape(count, cols)
        w[mask] = rowquant.dequantize_rows(q, scale[mask])
    return w


DECODERS = {"sparse24": decode_sparse24, "codebook": decode_codebook, "freeze_dry": decode_freeze_dry,
            "mixed_rows": decode_mixed_rows}
