"""The Parameter Golf baseline GPT (`train_gpt.py` of openai/parameter-golf), module for module.

Parameter names match the baseline's state_dict, so checkpoints and the quantizer's name patterns carry over.
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
                    "q_gain", "skip_weight", "skip_weights")


def is_control_tensor(name: str) -> bool:
    return any(pattern in name for pattern in CONTROL_PATTERNS)


@dataclass
class GPTConfig:
    vocab_size: int
    num_layers: int = 9
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2
    tie_embeddings: bool = True
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    tied_embed_init_std: float = 0.005

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s): {', '.join(unknown)}")
        if "vocab_size" not in d:
            raise ValueError("GPTConfig requires vocab_size")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if (self.model_dim // self.num_heads) % 2:
            raise ValueError(f"head_dim = model_dim // num_heads = {self.model_dim // self.num_heads} must be even "
                             "for RoPE")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 disables it), got {self.logit_softcap}")


class CastedLinear(nn.Linear):
    # Weights stay fp32 for the optimizer; the matmul runs in the activation dtype (bf16 in training).
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float):
        super().__init__()
        # A buffer (not a constant) on purpose: the baseline casts the model to bf16, which also casts
        # inv_freq and hence the tables; keeping it a buffer reproduces that.
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._key, self._cos, self._sin = None, None, None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Tables built under inference_mode cannot be used by autograd later (eval then train, as TTT does).
        key = (seq_len, device, dtype, torch.is_inference_mode_enabled())
        if self._key != key:
            t = torch.arange(seq_len, device=device, dtype=self.inv_freq.dtype)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cos, self._sin = freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)
            self._key = key
        return self._cos, self._sin


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), dim=-1)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q: (B, H, T, D); k, v: (B, H_kv, T, D). Returns (B, H, T, D)."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return y.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, cfg.rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = causal_attention(q, k, v)
        return self.proj(y.transpose(1, 2).contiguous().reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        # Construction order follows the baseline so that a given seed yields the same initial weights.
        self.tok_emb = nn.Embedding(config.vocab_size, config.model_dim)
        self.num_encoder_layers = config.num_layers // 2
        self.num_decoder_layers = config.num_layers - self.num_encoder_layers
        num_skips = min(self.num_encoder_layers, self.num_decoder_layers)
        self.skip_weights = nn.Parameter(torch.ones(num_skips, config.model_dim, dtype=torch.float32))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.lm_head = None if config.tie_embeddings else CastedLinear(config.model_dim, config.vocab_size, bias=False)
        # The output head's input, as a module so that hooks (GPTQ's Hessians) see the tied head too.
        self.head_input = nn.Identity()
        if self.lm_head is None:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=config.tied_embed_init_std)
        else:
            self.lm_head._zero_init = True
        for module in self.modules():
            if getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward_logits(self, idx: Tensor) -> Tensor:
        x = rms_norm(self.tok_emb(idx))
        x0 = x
        skips = []
        # U-Net: encoder outputs are added back, last-in first-out, before the decoder blocks.
        for block in self.blocks[: self.num_encoder_layers]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder_layers:]):
            if i < len(self.skip_weights):
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        x = self.head_input(rms_norm(x))
        logits = F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits.float()

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward_logits(idx)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="mean")


def param_groups(model: GPT) -> dict:
    """Split parameters the way the baseline's optimizers do: Adam for embed/head/scalar, Muon for matrix."""
    embed = [model.tok_emb.weight]
    head = [] if model.lm_head is None else [model.lm_head.weight]
    matrix, scalar = [], []
    for name, p in model.blocks.named_parameters():
        (matrix if p.ndim == 2 and not is_control_tensor(name) else scalar).append(p)
    taken = {id(p) for p in embed + head + matrix + scalar}
    scalar += [p for p in model.parameters() if id(p) not in taken]  # skip_weights, after the block scalars
    return {"embed": embed, "head": head, "matrix": matrix, "scalar": scalar}


def cast_to_training_dtypes(model: GPT) -> GPT:
    """The baseline's dtype layout: bf16 model (tok_emb included), fp32 linear weights and fp32 low-dim/control
    tensors."""
    model.bfloat16()
    for module in model.modules():
        if isinstance(module, CastedLinear):
            module.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or is_control_tensor(name):
                p.data = p.data.float()
    return model
