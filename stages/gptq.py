"""GPTQ (Frantar et al., 2022) with per-row scales, as the challenge's records use it.

Each linear layer's weight W (rows = outputs) is quantized column by column; the rounding error of
a column is spread over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, H = XᵀX over calibration tokens. Columns go in order of decreasing diag(H)
(act-order), in blocks whose updates to later columns are applied lazily, once per block.
"""
import torch

from stages.model import CastedLinear


def hessian_targets(model) -> dict:
    """{weight name: module whose input feeds that weight}: every linear, and the tied head's input."""
    targets = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, CastedLinear)}
    if model.lm_head is None:
        targets["tok_emb.weight"] = model.head_input
    return targets


@torch.no_grad()
def collect_hessians(model, batches, device) -> dict:
    """H = Σ XᵀX (fp32) of each quantizable weight's input over the calibration batches."""
    hessians, hooks = {}, []

    def accumulate(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].size(-1))
            h = hessians.get(name)
            hessians[name] = x.T @ x if h is None else h.add_(x.T @ x)
        return hook

    for name, module in hessian_targets(model).items():
        hooks.append(module.register_forward_hook(accumulate(name)))
    try:
        for x in batches:
            model.forward_logits(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {name: h.cpu() for name, h in hessians.items()}


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹."""
    h = h.clone()
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(h))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True) -> torch.Tensor:
    """Integer codes (int8 container, |q| <= qmax) of w (rows x cols) with fixed per-row `scale`."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero carry no information
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.size(1))
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_cholesky(h, damp)
    s = scale.float()[:, None]
    q = torch.zeros_like(w)
    for i1 in range(0, w.size(1), block_size):
        i2 = min(i1 + block_size, w.size(1))
        block, errors, hinv_block = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = block[:, i:i + 1]
            codes = torch.clamp(torch.round(column / s), -qmax, qmax)
            q[:, i1 + i:i1 + i + 1] = codes
            error = (column - codes * s) / hinv_block[i, i]
            block[:, i:] -= error @ hinv_block[i:i + 1, i:]
            errors[:, i:i + 1] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)
