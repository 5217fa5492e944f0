"""Muon (MomentUm Orthogonalized by Newton-schulz), as in the Parameter Golf baseline (from modded-nanogpt), with
the records' options: row normalisation before the orthogonalisation (MuonEq-R) and Polar Express's
per-iteration Newton-Schulz coefficients."""
import torch
import torch.distributed as dist
from torch import Tensor

# The baseline's quintic: the same (a, b, c) at every iteration.
STANDARD = ((3.4445, -4.7750, 2.0315),)
# Polar Express (Amsel et al. 2025; record #1855 via PR #1344/#1787): minimax-optimal (a, b, c) for each of the
# first five iterations, the largest first. Iterations past the table repeat its last (converged) tuple.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NEWTON_SCHULZ = {"standard": STANDARD, "polar_express": POLAR_EXPRESS}


def zeropower_via_newtonschulz5(G: Tensor, steps: int = 5, eps: float = 1e-7,
                                coefficients: tuple = STANDARD, records_form: bool = False) -> Tensor:
    """Approximately orthogonalize a 2-D matrix (push its singular values towards 1) in bf16. Iteration i
    applies X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = coefficients[i] (the last for i beyond).
    records_form: the records' arithmetic (transpose, then normalise; c · (A @ A)) instead of the baseline's
    (normalise, then transpose; (c · A) @ A): the same math, rounded differently in bf16."""
    X = G.bfloat16()
    transposed = G.size(0) > G.size(1)
    if records_form and transposed:
        X = X.T
    X = X / (X.norm() + eps)
    if transposed and not records_form:  # iterate on the short side: A = X X^T is then the smaller Gram matrix
        X = X.T
    for i in range(steps):
        a, b, c = coefficients[min(i, len(coefficients) - 1)]
        A = X @ X.T
        B = b * A + c * (A @ A) if records_form else b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then orthogonalized updates. With torch.distributed initialised, each rank
    orthogonalizes a round-robin share of the parameters and the updates are summed with one all_reduce.
    Gradients must already be averaged across ranks (DDP does this)."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, nesterov: bool = True,
                 weight_decay: float = 0.0, row_normalize: bool = False, newton_schulz: str = "standard",
                 momentum_bf16: bool = False):
        if newton_schulz not in NEWTON_SCHULZ:
            raise ValueError(f"newton_schulz must be one of {sorted(NEWTON_SCHULZ)}, got {newton_schulz!r}")
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      weight_decay=weight_decay, row_normalize=row_normalize,
                                      newton_schulz=newton_schulz, momentum_bf16=momentum_bf16))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        world_size = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0

        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            momentum = group["momentum"]
            coefficients = NEWTON_SCHULZ[group["newton_schulz"]]
            # fp32 (the baseline uses bf16) so all_reduce also works on gloo; the values are identical,
            # since each slot holds one rank's bf16 update and zeros elsewhere.
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=torch.float32)
            offset = 0
            for i, p in enumerate(params):
                if i % world_size == rank and p.grad is not None:
                    # The records round the gradient to bf16 first, so momentum and Nesterov run in bf16.
                    g = p.grad.bfloat16() if group["momentum_bf16"] else p.grad
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(g)
                    buf = state["momentum_buffer"]
                    buf.mul_(momentum).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=momentum)
                    if group["row_normalize"]:  # MuonEq-R (the records): unit rows before orthogonalizing
                        g = g / g.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(g.dtype)
                    g = zeropower_via_newtonschulz5(g, steps=group["backend_steps"], coefficients=coefficients,
                                                    records_form=group["newton_schulz"] == "polar_express")
                    scale = max(1, g.size(0) / g.size(1)) ** 0.5
                    if group["momentum_bf16"]:  # the records scale the update in fp32, not in bf16 as the baseline
                        updates[offset: offset + p.numel()] = g.reshape(-1).float() * scale
                    else:
                        g *= scale
                        updates[offset: offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                if group["weight_decay"] and p.grad is not None:  # decoupled, times the current lr (the records)
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(updates[offset: offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
        return loss
