"""LQER: a rank-r correction A·B of a quantized matrix's error E = W − Ŵ, from E's truncated SVD
(A = U_r·S_r, B = V_rᵀ), stored as integer factors.

Two storage forms, as the records have them:
- symmetric: A and B quantized per row at `factor_bits` (one fp16 scale per row);
- asymmetric (#1797, #1855, #2135): A in 2 bits, codes in [-2, 1] with one fp16 scale for the whole
  matrix (|A|max / 1.5); B in 4 bits, codes in [-8, 7] with one fp16 scale per `group` consecutive
  values of B flattened (|B|max / 7.5 per group). A matrix whose B does not split into whole groups
  gets the symmetric form.
"""
import torch

from stages import rowquant

ASYM_A_BITS, ASYM_B_BITS = 2, 4


def fp16_scale(peak: torch.Tensor, divisor: float) -> torch.Tensor:
    """peak / divisor in fp16, floored at fp16's smallest normal (the records floor |peak| at 1e-10 instead,
    which stores a scale of 0 for a factor that small; above the floor the two are the same)."""
    return (peak / divisor).clamp_min(rowquant.FP16_TINY).half()


def low_rank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A·B the best rank-`rank` approximation of `error`."""
    u, s, vh = torch.linalg.svd(error.float(), full_matrices=False)
    r = min(rank, len(s))
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def symmetric_fields(a: torch.Tensor, b: torch.Tensor, factor_bits: int) -> dict:
    qmax = rowquant.qmax_of(factor_bits)
    fields = {"lqer_bits": factor_bits}
    for field, factor in (("lqer_a", a), ("lqer_b", b)):
        scale = fp16_scale(factor.abs().amax(dim=1), qmax)
        fields[field] = rowquant.round_to_nearest(factor, scale, qmax).numpy()
        fields[f"{field}_scale"] = scale.numpy()
    return fields


def asymmetric_fields(a: torch.Tensor, b: torch.Tensor, group: int) -> dict:
    a_scale = fp16_scale(a.abs().amax(), 1.5)
    qa = torch.clamp(torch.round(a / a_scale.float()), -2, 1).to(torch.int8)
    groups = b.reshape(-1, group)
    b_scale = fp16_scale(groups.abs().amax(dim=1), 7.5)
    qb = torch.clamp(torch.round(groups / b_scale.float()[:, None]), -8, 7).to(torch.int8).reshape(b.shape)
    return {"lqer_form": "asym", "lqer_group": group, "lqer_a_bits": ASYM_A_BITS, "lqer_b_bits": ASYM_B_BITS,
            "lqer_a": qa.numpy(), "lqer_a_scale": a_scale.reshape(1).numpy(),
            "lqer_b": qb.numpy(), "lqer_b_scale": b_scale.numpy()}


def correction_fields(error: torch.Tensor, rank: int, factor_bits: int, asym_group: int) -> dict:
    """The stored fields of E's rank-r correction: asymmetric when `asym_group` > 0 divides B's size."""
    a, b = low_rank_factors(error, rank)
    fields = (asymmetric_fields(a, b, asym_group) if asym_group and b.numel() % asym_group == 0
              else symmetric_fields(a, b, factor_bits))
    return {"lqer_rank": a.shape[1], **fields}


def correction(a_codes: torch.Tensor, b_codes: torch.Tensor, t: dict) -> torch.Tensor:
    """A·B decoded from a stored entry's codes and scales."""
    a_scale = torch.from_numpy(t["lqer_a_scale"].copy()).float()
    b_scale = torch.from_numpy(t["lqer_b_scale"].copy()).float()
    if t.get("lqer_form") == "asym":
        a = a_codes.float() * a_scale[0]
        b = (b_codes.reshape(-1, t["lqer_group"]).float() * b_scale[:, None]).reshape(b_codes.shape)
        return a @ b
    return rowquant.dequantize_rows(a_codes, a_scale) @ rowquant.dequantize_rows(b_codes, b_scale)
