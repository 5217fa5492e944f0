"""GPTQ (Frantar et al., 2022) with per-row scales, as the challenge's records use it.

Each linear layer's weight W (rows = outputs) is quantized column by column; the rounding error of
a column is spread over the columns not yet quantized, weighted by the inverse Hessian of the
layer's inputs, H = XᵀX over calibration tokens. Columns go in order of decreasing diag(H)
(act-order), in blocks whose updates to later columns are applied lazily, once per block. Linears that
read the same input (an attention block's q, k and v projections) share one H, accumulated once.
"""
import torch
from torch import nn

from stages.model import CastedLinear, CausalSelfAttention


def hessian_targets(model) -> dict:
    """{weight name: module whose input feeds that weight}: every linear, and the tied head's input."""
    targets = {f"{name}.weight": module for name, module in model.named_modules()
               if isinstance(module, CastedLinear)}
    if model.lm_head is None:
        targets["tok_emb.weight"] = model.head_input
    return targets


def query_input_linear(attn: CausalSelfAttention) -> nn.Module:
    """The linear of c_q that reads the attention's input: c_q itself, or its down projection when low-rank."""
    return attn.c_q.down if isinstance(attn.c_q, nn.Sequential) else attn.c_q


def shared_inputs(model) -> list[tuple[nn.Module, list[str]]]:
    """Each distinct input of the quantizable weights once: (a module whose forward input it is, the weights
    that read it). An attention module hands its input, unchanged, to c_q (or c_q.down), c_k and c_v, so the
    three share one Hessian; every other linear, and the tied head, reads an input of its own."""
    weight_of = {module: f"{name}.weight" for name, module in model.named_modules()}
    groups, grouped = [], set()
    for attn in model.modules():
        if isinstance(attn, CausalSelfAttention):
            readers = [weight_of[m] for m in (query_input_linear(attn), attn.c_k, attn.c_v)]
            groups.append((attn, readers))
            grouped.update(readers)
    return groups + [(module, [name]) for name, module in hessian_targets(model).items() if name not in grouped]


@torch.no_grad()
def collect_hessians(model, batches, device) -> dict:
    """H = Σ XᵀX (fp32) of each quantizable weight's input over the calibration batches, computed on `device`
    (where the model must be) and returned on the CPU. Weights that read one input get one and the same
    tensor: read it, never change it in place."""
    groups = shared_inputs(model)
    sums, hooks = [None] * len(groups), []

    def accumulate(i):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].size(-1))
            sums[i] = x.T @ x if sums[i] is None else sums[i].add_(x.T @ x)
        return hook

    for i, (module, _) in enumerate(groups):
        hooks.append(module.register_forward_hook(accumulate(i)))
    try:
        for x in batches:
            model.forward_logits(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    hessians = {}
    for (_, names), h in zip(groups, sums):
        if h is not None:  # None: a layer that never ran (one not yet grown in)
            hessians.update(dict.fromkeys(names, h.cpu()))
    return {name: hessians[name] for name in hessian_targets(model) if name in hessians}  # in the model's order


def inverse_hessian_cholesky(h: torch.Tensor, damping: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping·I)⁻¹."""
    h = h.clone()
    h.diagonal().add_(damping)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmax: int,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                  high: tuple | None = None) -> torch.Tensor:
    """Integer codes (int8 container, |q| <= qmax) of w (rows x cols) with fixed per-row `scale`. `high` =
    (column mask, per-row scale, qmax): those columns are coded with that scale and range instead (AWQ-lite)."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero carry no information
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # damp·mean(diag H) over the columns in their own order, as the records do: a mean taken after the act-order
    # permutation (IST-DASLab's order) can differ in its last bit, and flip a few codes by one
    damping = damp * torch.diag(h).mean()
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.size(1))
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_cholesky(h, damping)
    s = scale.float()[:, None]
    is_high = high[0][perm] if high is not None else torch.zeros(w.size(1), dtype=torch.bool)
    q = torch.zeros_like(w)
    for i1 in range(0, w.size(1), block_size):
        i2 = min(i1 + block_size, w.size(1))
        block, errors, hinv_block = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2]), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = block[:, i:i + 1]
            s_col, qmax_col = (high[1].float()[:, None], high[2]) if is_high[i1 + i] else (s, qmax)
            codes = torch.clamp(torch.round(column / s_col), -qmax_col, qmax_col)
            q[:, i1 + i:i1 + i + 1] = codes
            error = (column - codes * s_col) / hinv_block[i, i]
            block[:, i:] -= error @ hinv_block[i:i + 1, i:]
            errors[:, i:i + 1] = error
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(torch.int8)
