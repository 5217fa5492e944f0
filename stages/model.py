"""The Parameter Golf baseline GPT (`train_gpt.py` of openai/parameter-golf), module for module, plus the
records' architecture options (each off by default, so the defaults reproduce the baseline exactly).

Parameter names match the baseline's state_dict, so checkpoints and the quantizer's name patterns carry over.
"""
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stages import layout, rowquant
from stages.attention import BOS_ID, Segments, causal_attention, document_mask
from stages.io import IntegrityError

SMEAR_GATE_DIMS = 12  # the records' GATE_WINDOW: the input dims that the smear gate and the attention gate read
CONTROL_PATTERNS = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes",
                    "q_gain", "skip_weight", "skip_weights", "skip_gates", "smear", "lane_resid", "lane_post",
                    "head_gate", "softcap_pos", "softcap_neg")


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
    activation: str = "relu2"  # or "leaky_relu2": LeakyReLU(0.5)²
    rope_dims: int = 0  # rotated dims per head; 0 = all
    xsa_layers: int = 0  # XSA on the last N layers
    parallel_from: int = -1  # parallel attention + MLP from this layer on; -1 = never
    recur_layers: list = field(default_factory=list)  # [a, b]: layers a..b repeated recur_loops extra times
    recur_loops: int = 1
    smear_gate: bool = False
    smear_bos_mask: bool = True  # the smear gate does not reach across a BOS (off: #2135, SMEAR_GATE_BOS_FIX=0)
    ln_scale: bool = False  # block i scales its normed sublayer inputs by 1/sqrt(i + 1)
    skip_gates: bool = False  # U-Net skips blended in by learned sigmoid gates
    sparse_attn_gate: bool = False  # per-head sigmoid gate on the attention output
    sparse_attn_gate_scale: float = 1.0
    asym_logit: bool = False  # learned softcaps for positive and negative logits (scoring only)
    rope_fp32: bool = False  # RoPE angles in fp32 even in a bf16 model (the records)
    orthogonal_init: bool = False  # orthogonal block matrices at init (the records)
    q_rank: int = 0  # low-rank c_q; 0 = full rank
    qat_bits: int = 0  # fake-quantize block linears on the export grid; 0 = off
    qat_clip: str = "percentile"  # or "sdclip"
    qat_clip_percentile: float = 99.99984
    qat_clip_sigmas: float = 12.85

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
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(message)
        check(self.model_dim % self.num_heads == 0,
              f"model_dim ({self.model_dim}) must be divisible by num_heads ({self.num_heads})")
        check(self.num_heads % self.num_kv_heads == 0,
              f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        head_dim = self.model_dim // self.num_heads
        check(head_dim % 2 == 0, f"head_dim = model_dim // num_heads = {head_dim} must be even for RoPE")
        check(self.logit_softcap >= 0, f"logit_softcap must be >= 0 (0 disables it), got {self.logit_softcap}")
        check(self.activation in ("relu2", "leaky_relu2"), f"activation must be relu2 or leaky_relu2, "
              f"got {self.activation!r}")
        check(0 <= self.rope_dims <= head_dim and self.rope_dims % 2 == 0,
              f"rope_dims must be even and in [0, head_dim={head_dim}], got {self.rope_dims}")
        check(0 <= self.xsa_layers <= self.num_layers, f"xsa_layers must be in [0, num_layers], got {self.xsa_layers}")
        check(-1 <= self.parallel_from < self.num_layers,
              f"parallel_from must be -1 or a layer index, got {self.parallel_from}")
        check(len(self.recur_layers) == 0 or (len(self.recur_layers) == 2 and
                                              0 <= self.recur_layers[0] <= self.recur_layers[1] < self.num_layers),
              f"recur_layers must be [] or [a, b] with 0 <= a <= b < num_layers, got {self.recur_layers}")
        check(self.recur_loops >= 1, f"recur_loops must be >= 1, got {self.recur_loops}")
        problem = layout.parallel_problem(self.num_layers, self.parallel_from, self.recur_layers, self.recur_loops)
        check(problem is None, f"parallel_from: {problem}")
        check(not self.smear_gate or self.model_dim >= SMEAR_GATE_DIMS,
              f"smear_gate needs model_dim >= {SMEAR_GATE_DIMS}")
        check(not self.sparse_attn_gate or self.model_dim >= SMEAR_GATE_DIMS,
              f"sparse_attn_gate needs model_dim >= {SMEAR_GATE_DIMS}")
        check(not self.asym_logit or self.logit_softcap > 0, "asym_logit needs logit_softcap > 0 (its initial caps)")
        check(0 <= self.q_rank < self.model_dim, f"q_rank must be in [0, model_dim), got {self.q_rank}")
        check(self.qat_bits == 0 or 2 <= self.qat_bits <= 8, f"qat_bits must be 0 or 2..8, got {self.qat_bits}")
        check(self.qat_clip in ("percentile", "sdclip"), f"qat_clip must be percentile or sdclip, "
              f"got {self.qat_clip!r}")
        check(0 < self.qat_clip_percentile <= 100 and self.qat_clip_sigmas > 0,
              "qat_clip_percentile must be in (0, 100] and qat_clip_sigmas > 0")


class FakeQuant(nn.Module):
    """Straight-through fake quantization on the export grid (rowquant's fp16 per-row scales, round-to-nearest).

    The on/off flag is a bool buffer read inside the graph (torch.where), not a Python attribute: torch.compile
    cannot constant-fold it, and switching it needs no recompile. The price is that the quantized weight is
    computed even while QAT is off, but only in models configured with qat_bits > 0."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.qmax, self.cfg = rowquant.qmax_of(cfg.qat_bits), cfg
        self.register_buffer("active", torch.tensor(False), persistent=False)

    def forward(self, w: Tensor) -> Tensor:
        wd = w.detach().float()
        if self.cfg.qat_clip == "sdclip":
            scale = rowquant.sdclip_scale(wd, self.cfg.qat_clip_sigmas, self.qmax)
        else:
            scale = rowquant.percentile_scale(wd, self.cfg.qat_clip_percentile, self.qmax)
        w_q = rowquant.dequantize_rows(rowquant.round_to_nearest(wd, scale, self.qmax), scale).to(w.dtype)
        return torch.where(self.active, w + (w_q - w).detach(), w)


class CastedLinear(nn.Linear):
    # Weights stay fp32 for the optimizer; the matmul runs in the activation dtype (bf16 in training).
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.qat = None  # a FakeQuant, set on block linears when QAT is configured

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.qat is None else self.qat(self.weight)
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float, fp32: bool = False):
        super().__init__()
        # A buffer (not a constant) on purpose: the baseline casts the model to bf16, which also casts
        # inv_freq and hence the tables (in bf16 the positions above 256 are rounded); keeping it a buffer
        # reproduces that. With fp32 the angles are computed in fp32 from the same (cast) frequencies, as the
        # records do.
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.fp32 = fp32
        self._key, self._cos, self._sin = None, None, None

    def tables(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        inv_freq = self.inv_freq.to(device)
        inv_freq = inv_freq.float() if self.fp32 else inv_freq
        t = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Under torch.compile the tables are part of the graph: the cache's is_inference_mode_enabled() would
        # break the graph in every layer.
        if torch.compiler.is_compiling():
            return self.tables(seq_len, device, dtype)
        # Tables built under inference_mode cannot be used by autograd later (eval then train, as TTT does).
        key = (seq_len, device, dtype, torch.is_inference_mode_enabled())
        if self._key != key:
            self._cos, self._sin = self.tables(seq_len, device, dtype)
            self._key = key
        return self._cos, self._sin


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first 2 * cos.size(-1) dims of x; the rest (partial RoPE) pass through."""
    half = cos.size(-1)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos, rest), dim=-1)


def exclude_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along its own (normalised) value vector.
    y: (B, H, T, D); v: (B, H_kv, T, D); q head h reads kv head h // (H // H_kv), as in SDPA's enable_gqa."""
    B, H, T, D = y.shape
    y = y.reshape(B, v.size(1), H // v.size(1), T, D)
    vn = F.normalize(v, dim=-1).unsqueeze(2)
    return (y - (y * vn).sum(-1, keepdim=True) * vn).reshape(B, H, T, D)


class SparseAttnGate(nn.Module):
    """The records' sparse attention gate (#1787, #1855): head h's output is scaled by σ(s · w_h · x[:12]), x the
    attention's input. w = 0 at init, so every head starts at half its output."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cfg.num_heads, SMEAR_GATE_DIMS))
        self.scale = cfg.sparse_attn_gate_scale

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, C) -> the gates, (B, H, T, 1)."""
        g = torch.sigmoid(self.scale * F.linear(x[..., :SMEAR_GATE_DIMS], self.weight.to(x.dtype)))
        return g.transpose(1, 2).unsqueeze(-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, xsa: bool = False):
        super().__init__()
        dim = cfg.model_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = dim // cfg.num_heads
        self.xsa = xsa
        if cfg.q_rank:  # PR #316: q = up(down(x)), d -> r -> d
            self.c_q = nn.Sequential(OrderedDict(down=CastedLinear(dim, cfg.q_rank, bias=False),
                                                 up=CastedLinear(cfg.q_rank, dim, bias=False)))
        else:
            self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(cfg.rope_dims or self.head_dim, cfg.rope_base, cfg.rope_fp32)
        self.head_gate = SparseAttnGate(cfg) if cfg.sparse_attn_gate else None

    def forward(self, x: Tensor, span: Tensor | Segments | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rms_norm(q), rms_norm(k)
        cos, sin = self.rotary(T, x.device, q.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = causal_attention(q, k, v, span)
        if self.xsa:
            y = exclude_self_value(y, v)
        if self.head_gate is not None:
            y = y * self.head_gate(x)
        return self.proj(y.transpose(1, 2).contiguous().reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = int(cfg.mlp_mult * cfg.model_dim)
        self.fc = CastedLinear(cfg.model_dim, hidden, bias=False)
        self.proj = CastedLinear(hidden, cfg.model_dim, bias=False)
        self.proj._zero_init = True
        self.leaky = cfg.activation == "leaky_relu2"

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, 0.5) if self.leaky else torch.relu(h)
        return self.proj(h.square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, xsa=layer >= cfg.num_layers - cfg.xsa_layers)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.mlp_scale = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))).float())
        self.ln_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else None  # LN scale (PR #315): deeper = smaller

    def normed(self, x: Tensor) -> Tensor:
        x = rms_norm(x)
        return x if self.ln_scale is None else x * self.ln_scale

    def forward(self, x: Tensor, x0: Tensor, span: Tensor | Segments | None = None) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.normed(x), span)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.normed(x))

    def forward_lanes(self, lanes: tuple[Tensor, Tensor], x0: Tensor, resid: Tensor, post: Tensor,
                      span: Tensor | Segments | None = None) -> tuple[Tensor, Tensor]:
        """Parallel residual (the record #1855): attention reads lane 0 (mixed with x0 as in forward), the MLP
        reads lane 1 as it is, both from the same step; lane l keeps resid[l] of itself and gets post[0, l] of
        the attention output and post[1, l] of the MLP output."""
        mix, dtype = self.resid_mix.to(x0.dtype), x0.dtype
        attn = self.attn_scale.to(dtype) * self.attn(self.normed(mix[0] * lanes[0] + mix[1] * x0), span)
        mlp = self.mlp_scale.to(dtype) * self.mlp(self.normed(lanes[1]))
        resid, post = resid.to(dtype), post.to(dtype)
        return (resid[0] * lanes[0] + post[0, 0] * attn + post[1, 0] * mlp,
                resid[1] * lanes[1] + post[0, 1] * attn + post[1, 1] * mlp)


class SmearGate(nn.Module):
    """x_t += λ·σ(w·x_t[:12])·x_{t-1}, one scalar gate per position (w: (1, 12), as modded-nanogpt), except
    (bos_mask) where token t is BOS: its previous token belongs to another document. λ = 0 at init: the identity."""

    def __init__(self, bos_mask: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, SMEAR_GATE_DIMS))
        self.lam = nn.Parameter(torch.zeros(1))
        self.bos_mask = bos_mask

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        gate = torch.sigmoid(F.linear(x[..., :SMEAR_GATE_DIMS], self.weight.to(x.dtype)))
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        if self.bos_mask:
            prev = prev * (idx != BOS_ID).unsqueeze(-1).to(x.dtype)
        return x + self.lam.to(x.dtype) * gate * prev


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        dim, layers = config.model_dim, config.num_layers
        # Construction order follows the baseline so that a given seed yields the same initial weights.
        self.tok_emb = nn.Embedding(config.vocab_size, dim)
        # Depth recurrence is switched on by training (from a fraction of the run); when off, layers run once.
        self.recurrence_active = bool(config.recur_layers)
        # Progressive growth: only the first active_layers blocks run; the others are skipped (and, with
        # their zero-initialised output projections, are identities when they join).
        self.active_layers = layers
        encoder, decoder = layout.halves(self.layer_order())
        num_skips = min(len(encoder), len(decoder))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, dim, dtype=torch.float32))
        # Skip gates (the records): x = lerp(w·skip, x, σ(g)), g = 0 at init: half the stream, half the skip.
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, dim)) if config.skip_gates else None
        self.blocks = nn.ModuleList(Block(config, i) for i in range(layers))
        if config.parallel_from >= 0:  # a row per layer, as the record has (only the parallel layers' are read)
            self.lane_resid = nn.Parameter(torch.full((layers, 2), 1.1))
            self.lane_post = nn.Parameter(torch.ones(layers, 2, 2))
        self.lm_head = None if config.tie_embeddings else CastedLinear(dim, config.vocab_size, bias=False)
        self.smear = SmearGate(config.smear_bos_mask) if config.smear_gate else None
        if config.asym_logit:  # AsymLogit (#1945): separate caps for positive and negative logits
            self.softcap_pos = nn.Parameter(torch.tensor(float(config.logit_softcap)))
            self.softcap_neg = nn.Parameter(torch.tensor(float(config.logit_softcap)))
        # The output head's input, as a module so that hooks (GPTQ's Hessians) see the tied head too.
        self.head_input = nn.Identity()
        if self.lm_head is None:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=config.tied_embed_init_std)
        else:
            self.lm_head._zero_init = True
        for module in self.modules():
            if getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)
            elif config.orthogonal_init and isinstance(module, CastedLinear):
                nn.init.orthogonal_(module.weight)
        if config.qat_bits:
            for module in self.blocks.modules():
                if isinstance(module, CastedLinear):
                    module.qat = FakeQuant(config)

    @property
    def qat_active(self) -> bool:
        return any(bool(m.active) for m in self.modules() if isinstance(m, FakeQuant))

    @qat_active.setter
    def qat_active(self, on: bool) -> None:
        # In place, so a compiled graph (which reads the buffers as inputs) sees the change without recompiling.
        for m in self.modules():
            if isinstance(m, FakeQuant):
                m.active.fill_(bool(on))

    def layer_order(self) -> list[int]:
        """The blocks in the order they run: with recurrence, layers a..b are repeated recur_loops times."""
        c = self.config
        return layout.layer_order(c.num_layers, c.recur_layers, c.recur_loops, self.recurrence_active)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def add_skip(self, j: int, x: Tensor, skip: Tensor) -> Tensor:
        skip = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + skip
        return torch.lerp(skip, x, torch.sigmoid(self.skip_gates[j].to(x.dtype)))

    def hidden(self, idx: Tensor, doc_isolation: bool = False, segments: Segments | None = None) -> Tensor:
        """The last block's output (the mean of the two lanes after parallel blocks). Attention stays within each
        row, within each document of a row (doc_isolation), or within each segment of one packed row (segments)."""
        x = self.tok_emb(idx)
        if self.smear is not None:
            x = self.smear(x, idx)
        x = rms_norm(x)
        x0 = x
        span = segments if segments is not None else document_mask(idx) if doc_isolation else None
        encoder, decoder = layout.halves(self.layer_order())
        skips, lanes = [], None  # lanes: the two residual streams from the first parallel decoder layer on
        # U-Net: encoder outputs are added back, last-in first-out, before the decoder blocks.
        for i in encoder:
            if i < self.active_layers:
                x = self.blocks[i](x, x0, span)
            skips.append(x)
        for j, i in enumerate(decoder):
            if lanes is None and 0 <= self.config.parallel_from <= i:
                lanes = (x, x)
            if skips:
                if lanes is None:
                    x = self.add_skip(j, x, skips.pop())
                else:  # the skip joins the attention's lane only
                    lanes = (self.add_skip(j, lanes[0], skips.pop()), lanes[1])
            if i >= self.active_layers:
                continue
            if lanes is None:
                x = self.blocks[i](x, x0, span)
            else:
                lanes = self.blocks[i].forward_lanes(lanes, x0, self.lane_resid[i], self.lane_post[i], span)
        return x if lanes is None else 0.5 * (lanes[0] + lanes[1])

    def head(self, x: Tensor) -> Tensor:
        """The logits before the softcap."""
        x = self.head_input(rms_norm(x))
        return F.linear(x, self.tok_emb.weight) if self.lm_head is None else self.lm_head(x)

    def softcap(self, logits: Tensor, asym: bool) -> Tensor:
        if asym:
            pos, neg = self.softcap_pos.to(logits.dtype), self.softcap_neg.to(logits.dtype)
            return torch.where(logits > 0, pos * torch.tanh(logits / pos), neg * torch.tanh(logits / neg))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward_logits(self, idx: Tensor, doc_isolation: bool = False, segments: Segments | None = None) -> Tensor:
        """The logits every scoring path (and TTT) reads: with asym_logit, under the two learned caps."""
        return self.softcap(self.head(self.hidden(idx, doc_isolation, segments)), self.config.asym_logit).float()

    def forward(self, idx: Tensor, targets: Tensor, doc_isolation: bool = False,
                segments: Segments | None = None) -> Tensor:
        """The training loss. It keeps the single cap even with asym_logit, as the record's fused loss does, so
        the two caps get no gradient in training: they learn at test time (TTT) only."""
        logits = self.softcap(self.head(self.hidden(idx, doc_isolation, segments)), asym=False).float()
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="mean")


def param_groups(model: GPT) -> dict:
    """Split parameters the way the baseline's optimizers do: Adam for embed/head/scalar, Muon for matrix."""
    embed = [model.tok_emb.weight]
    head = [] if model.lm_head is None else [model.lm_head.weight]
    matrix, scalar = [], []
    for name, p in model.blocks.named_parameters():
        (matrix if p.ndim == 2 and not is_control_tensor(name) else scalar).append(p)
    taken = {id(p) for p in embed + head + matrix + scalar}
    scalar += [p for p in model.parameters() if id(p) not in taken]  # skip_weights, smear: after the block scalars
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


def non_finite(state: dict) -> tuple[str, int] | None:
    """(name, count) of the first tensor holding NaN or inf values, or None."""
    for name, w in state.items():
        if count := int((~torch.isfinite(w)).sum()):
            return name, count
    return None


def load_checkpoint(path) -> GPT:
    """The GPT of a train checkpoint (model.pt: state dict and model config), on the CPU, in eval mode; a
    truncated or corrupt file is an error naming it."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # OSError, RuntimeError, UnpicklingError, ...: torch.load's messages do not name the file
        detail = ": ".join(filter(None, (type(e).__name__, str(e).partition("\n")[0])))
        raise IntegrityError(f"{path}: cannot be read as a checkpoint ({detail}); the file is truncated or "
                             "corrupt") from None
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()
