"""AWQ-lite (#1945): the few input-column groups that matter most get more bits.

A group of `group_size` consecutive input columns of a matrix is scored by its saliency
Σ_j rms(x_j)·mean_i |w_ij| (activation scale times weight scale). Over all quantized matrices whose bits
are below `bits`, the `top_k` highest-scoring groups are kept at `bits` (int8 by default), with a scale of
their own per row (the same clip, at the wider range); GPTQ quantizes them in place with that scale, so
their rounding error is still spread over the columns after them.

rms(x_j) is read off the Hessian: H_jj = Σ x_j² over the calibration tokens, the same token count for every
matrix, so √H_jj ranks the groups across matrices exactly as the record's rms does.
"""
import torch


def group_saliency(w: torch.Tensor, diag_h: torch.Tensor, group_size: int) -> torch.Tensor:
    """One score per whole group of `group_size` columns (a ragged tail is never a candidate)."""
    groups = w.shape[1] // group_size
    saliency = diag_h.float().clamp_min(0).sqrt() * w.float().abs().mean(dim=0)
    return saliency[:groups * group_size].reshape(groups, group_size).sum(dim=1)


def select_groups(candidates: dict, group_size: int, top_k: int) -> dict:
    """{name: sorted column starts} of the `top_k` most salient groups over `candidates` {name: (w, diag_h)}."""
    scored = [(float(score), name, g * group_size)
              for name, (w, diag_h) in candidates.items()
              for g, score in enumerate(group_saliency(w, diag_h, group_size))]
    scored.sort(key=lambda c: -c[0])  # stable: ties keep the model's order, as the record's sort does
    chosen = {}
    for _, name, start in scored[:top_k]:
        chosen.setdefault(name, []).append(start)
    return {name: sorted(starts) for name, starts in chosen.items()}


def protected_columns(starts, group_size: int) -> torch.Tensor:
    """The column indices of the groups that start at `starts`."""
    return torch.tensor([s + j for s in starts for j in range(group_size)], dtype=torch.long)


def column_mask(starts, group_size: int, cols: int) -> torch.Tensor:
    mask = torch.zeros(cols, dtype=torch.bool)
    mask[protected_columns(starts, group_size)] = True
    return mask
