"""Per-row symmetric integer quantization: scales (percentile clip, SDClip, Hessian-weighted search),
round-to-nearest codes and their reconstruction. Scales are fp16, as stored, and used as stored."""
import torch

FP16_TINY = torch.finfo(torch.float16).tiny  # the smallest normal fp16: a smaller scale would be stored as 0
FP16_MAX = torch.finfo(torch.float16).max  # a larger scale is stored as inf


def qmax_of(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def percentile_scale(w: torch.Tensor, clip_percentile: float, qmax: int) -> torch.Tensor:
    """Clip each row at a percentile of |w| (100 = its max), as the challenge's int8 baseline."""
    w = w.float()
    clip = torch.quantile(w.abs(), clip_percentile / 100.0, dim=1) if clip_percentile < 100 \
        else w.abs().amax(dim=1)
    return (clip / qmax).clamp_min(FP16_TINY).half()


def sdclip_scale(w: torch.Tensor, sigmas: float, qmax: int) -> torch.Tensor:
    """SDClip: clip each row at `sigmas` standard deviations of the row."""
    return (sigmas * w.float().std(dim=1) / qmax).clamp_min(FP16_TINY).half()


def round_to_nearest(w: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.clamp(torch.round(w.float() / scale.float()[:, None]), -qmax, qmax).to(torch.int8)


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def searched_scale(w: torch.Tensor, diag_h: torch.Tensor, base: torch.Tensor, qmax: int,
                   factors=(0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25)) -> torch.Tensor:
    """Per row, the multiple of `base` whose round-to-nearest error Σ_j H_jj (w_j − ŵ_j)² is smallest."""
    weight = diag_h.float().clamp_min(0)[None, :]
    candidates = torch.stack([(base.float() * f).half() for f in factors])
    errors = torch.stack([((w.float() - dequantize_rows(round_to_nearest(w, s, qmax), s)) ** 2 * weight).sum(1)
                          for s in candidates])
    return candidates.gather(0, errors.argmin(0)[None])[0]
