"""Side-by-side parity of caddie's model with the frontier records' own train_gpt.py, on CPU (the model only).

    .venv/bin/python bench/frontier_parity.py                 # -> bench/results/frontier_parity.md
    .venv/bin/python bench/frontier_parity.py --full          # also at the records' full shape (slower)

Needs each record's train_gpt.py at peers/record-<N>/train_gpt.py (git-ignored, never committed), from the public
openai/parameter-golf repository:

    #1855: main at 4908dc46f21ed3fdd08d2fdca285deb2194b9599, records/track_10min_16mb/
           2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py
    #2135: the pull request's head ff905226136eb2506fe9505feff87f58eb6dc4ff (git fetch origin pull/2135/head),
           records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32/train_gpt.py

`--git-dir DIR` copies them out of a clone (or bare mirror) that has those commits. The files' sha256 are checked.

The records need CUDA, flash-attn 3 and Triton, so this script writes a CPU copy of each (train_gpt_cpu.py beside
it) through the explicit text substitutions in SUBSTITUTIONS, each asserted to match an exact number of times, so
that a changed upstream file fails loudly instead of being half-patched: flash-attn 3 becomes PyTorch SDPA with
the same semantics (causal; varlen as a block-diagonal causal mask from cu_seqlens), and Triton a stub (its
kernels serve the training-only fused paths, which eval mode and FUSED_CE_ENABLED=0 do not take). The model code
is untouched.

For each record, in a process of its own (both register the same torch.library ops): the record's GPT is built
from its Hyperparameters (its logged model settings, at a reduced shape: vocab 1024, width 256, the same 11 layers,
heads, loop and parallel layout), every tensor is moved off its init by seeded noise (so the gates, lambdas and
caps all matter), the weights are copied into caddie's GPT, built from the record's preset
(presets/record-<N>.yaml) at the same shape, through the name mapping in caddie_state(), and both score the
same document-packed batch in fp32: one row of documents that each start with BOS, through the record's varlen
path (cu_seqlens from its own _build_cu_seqlens) and caddie's doc_isolation, and two plain causal rows, each with
the depth recurrence off and on. Reported: max |Δ logit|, |Δ training loss| (the record's eager loss) and the
largest gradient difference relative to the gradient's own scale.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "frontier_parity.md"
TOLERANCE = 1e-5

RECORDS = {
    "1855": {
        "commit": "4908dc46f21ed3fdd08d2fdca285deb2194b9599",
        "path": "records/track_10min_16mb/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_gpt.py",
        "sha256": "454f710d174be80f4603069ca952833d694f60d1d34c0c25703528323bc8878b",
        "model_params": 35945671,
        # The model settings of its README's command and its logs' Hyperparameters: block.
        "env": {"SMEAR_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5"},
    },
    "2135": {
        "commit": "ff905226136eb2506fe9505feff87f58eb6dc4ff",
        "path": "records/track_10min_16mb/2026-05-01_SP8192_PR2130Base_Calib32/train_gpt.py",
        "sha256": "87b8798707fc2d161f5730be6d00bb47e4b62a66c5341dac5f1a4d2fa3cf4bc6",
        "model_params": 35945673,
        "env": {"SMEAR_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_ENABLED": "1", "SPARSE_ATTN_GATE_SCALE": "0.5",
                "ASYM_LOGIT_RESCALE": "1", "SMEAR_GATE_BOS_FIX": "0"},
    },
}
# Both records' defaults, set explicitly so that the comparison does not rest on them.
MODEL_ENV = {
    "VOCAB_SIZE": "8192", "NUM_LAYERS": "11", "MODEL_DIM": "512", "NUM_HEADS": "8", "NUM_KV_HEADS": "4",
    "MLP_MULT": "4.0", "TIE_EMBEDDINGS": "1", "LOGIT_SOFTCAP": "30.0", "ROPE_BASE": "10000.0", "ROPE_DIMS": "16",
    "ROPE_TRAIN_SEQ_LEN": "2048", "ROPE_YARN": "0", "LN_SCALE": "1", "QK_GAIN_INIT": "5.0", "XSA_LAST_N": "11",
    "NUM_LOOPS": "2", "LOOP_START": "3", "LOOP_END": "5", "PARALLEL_START_LAYER": "8", "PARALLEL_FINAL_LANE": "mean",
    "SKIP_GATES_ENABLED": "1", "GATE_WINDOW": "12", "TIED_EMBED_INIT_STD": "0.005", "SPARSE_ATTN_GATE_INIT_STD": "0.0",
    "ATTN_OUT_GATE_ENABLED": "0", "GATED_ATTN_ENABLED": "0",
    "FUSED_CE_ENABLED": "0",  # the eager loss: the fused one is a Triton kernel (the same loss, per its comment)
}
# Each of caddie's options that the presets set, switched in caddie's model alone: the comparison must see it.
FLIPS = {"activation": "relu2", "rope_dims": 0, "xsa_layers": 0, "parallel_from": -1, "recur_layers": [],
         "smear_gate": False, "smear_bos_mask": None, "ln_scale": False, "skip_gates": False,
         "sparse_attn_gate": False, "sparse_attn_gate_scale": 1.0, "asym_logit": None}
# The record's optimizer settings, each set from the preset's train.optimizer, so that both optimizers run the
# preset's numbers (the preset's come from the record's logged Hyperparameters).
OPTIMIZER_ENV = {"TIED_EMBED_LR": "tied_embed_lr", "MATRIX_LR": "matrix_lr", "SCALAR_LR": "scalar_lr",
                 "MUON_MOMENTUM": "muon_momentum", "MUON_BACKEND_STEPS": "muon_backend_steps",
                 "MUON_MOMENTUM_WARMUP_START": "muon_momentum_warmup_start",
                 "MUON_MOMENTUM_WARMUP_STEPS": "muon_momentum_warmup_steps", "BETA1": "beta1", "BETA2": "beta2",
                 "ADAM_EPS": "adam_eps", "GRAD_CLIP_NORM": "grad_clip_norm", "MUON_WD": "muon_weight_decay",
                 "EMBED_WD": "embed_weight_decay", "ADAM_WD": "scalar_weight_decay",
                 "MUON_ROW_NORMALIZE": "muon_row_normalize"}
OPTIMIZER_STEPS = 4
CUT_LEN = 64  # a max_doc_len short enough that the packed row's long documents are cut
SHAPES = {"reduced": {"VOCAB_SIZE": "1024", "MODEL_DIM": "256"}, "full": {}}
TOKENS = {"reduced": 1024, "full": 512}

SDPA_STAND_INS = '''import torch.nn.functional as _sdpa_F  # [cpu-parity] flash-attn 3 -> PyTorch SDPA, same semantics


def flash_attn_3_func(q, k, v, causal=True):
    """(B, T, H, D) layout, causal, grouped-query heads."""
    assert causal
    y = _sdpa_F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
    return y.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           window_size=(-1, -1)):
    """(N, H, D) packed segments [cu[i], cu[i+1]), each causal and attending only within itself."""
    assert causal and tuple(window_size) == (-1, -1) and torch.equal(cu_seqlens_q, cu_seqlens_k)
    n = q.size(0)
    segment = torch.searchsorted(cu_seqlens_q.long(), torch.arange(n, device=q.device), right=True)
    mask = (segment[:, None] == segment[None, :]) & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    y = _sdpa_F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], attn_mask=mask, enable_gqa=True)
    return y[0].transpose(0, 1)
'''
TRITON_STUB = '''import types as _stub_types  # [cpu-parity] no Triton: its kernels are defined, never run

triton = _stub_types.SimpleNamespace(jit=lambda fn: fn)
tl = _stub_types.SimpleNamespace(constexpr=int)
TensorDescriptor = None
'''
# Set on the record's objects at run time (its file is not edited for them).
RUNTIME_SETTINGS = [
    "`BOS_ID = 1` on the record's module after importing it, as its own data loaders do (`if BOS_ID is None: "
    "BOS_ID = 1`) before its first forward pass",
    "for the optimizer steps, `torch.cuda.Stream`, `current_stream` and `stream` as no-op stand-ins in the "
    "record's process (#1855 runs its Adam steps on a side CUDA stream; on CPU every op runs in order)",
    "for the optimizer steps, `block.mlp.use_fused = False` on each block (as the record itself sets it for "
    "calibration): its training-mode MLP is a Triton kernel of the same LeakyReLU² math",
]
# (old text, new text, expected number of matches, why). Nothing else in the record's file is changed.
SUBSTITUTIONS = [
    ("from flash_attn_interface import (\n    flash_attn_func as flash_attn_3_func,\n    flash_attn_varlen_func,\n)\n",
     SDPA_STAND_INS, 1,
     "flash-attn 3 (`flash_attn_3_func`, `flash_attn_varlen_func`) replaced by PyTorch SDPA with the same "
     "semantics: causal, grouped-query; varlen as a block-diagonal causal mask built from `cu_seqlens`"),
    ("@torch.compile\ndef zeropower_via_newtonschulz5(", "def zeropower_via_newtonschulz5(", 1,
     "no `@torch.compile` on the Newton-Schulz iteration (it still runs in bf16, eager; inductor's fused kernels "
     "round differently), as bench/parity.py does for the baseline's"),
    ("import triton\nimport triton.language as tl\nfrom triton.tools.tensor_descriptor import TensorDescriptor\n",
     TRITON_STUB, 1,
     "Triton replaced by a stub (`triton.jit` = identity, `tl.constexpr` = int): its kernels (fused softcapped CE, "
     "fused LeakyReLU² MLP) serve training-only paths, which eval mode and FUSED_CE_ENABLED=0 do not take"),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upstream(record: str) -> Path:
    return ROOT / "peers" / f"record-{record}" / "train_gpt.py"


def fetch(record: str, git_dir: str | None, info: dict | None = None) -> None:
    path, info = upstream(record), info or RECORDS[record]
    if not path.exists() and git_dir:
        text = subprocess.run(["git", "-C", git_dir, "show", f"{info['commit']}:{info['path']}"],
                              capture_output=True, check=True).stdout
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text)
    if not path.exists():
        sys.exit(f"missing {path.relative_to(ROOT)}: fetch the record's train_gpt.py (see this script's docstring)")
    if sha256(path) != info["sha256"]:
        sys.exit(f"{path.relative_to(ROOT)}: sha256 {sha256(path)} is not the record's {info['sha256']}")


def patch(record: str, substitutions: list = SUBSTITUTIONS, name: str = "train_gpt_cpu.py") -> Path:
    """The record's CPU copy `name` beside it: `substitutions` applied in order, each asserted to match its count."""
    text = upstream(record).read_text(encoding="utf-8")
    for old, new, count, _ in substitutions:
        found = text.count(old)
        if found != count:
            raise SystemExit(f"record {record}: expected {count} match(es) of {old[:60]!r}, found {found}")
        text = text.replace(old, new)
    out = upstream(record).with_name(name)
    out.write_text(text, encoding="utf-8")
    return out


# ---- one record, in its own process ----

def caddie_state(record_state: dict, num_layers: int) -> dict:
    """The record's state dict under caddie's names: its banks split into per-layer linears (qo_bank = [q of
    every layer, then out of every layer], kv_bank = [k..., v...]), its lambdas and gates renamed."""
    renames = {"parallel_post_lambdas": "lane_post", "parallel_resid_lambdas": "lane_resid",
               "smear_gate.weight": "smear.weight", "smear_lambda": "smear.lam"}
    n, out = num_layers, {}
    for name, w in record_state.items():
        if name in ("qo_bank", "kv_bank"):
            first, second = ("attn.c_q", "attn.proj") if name == "qo_bank" else ("attn.c_k", "attn.c_v")
            for i in range(n):
                out[f"blocks.{i}.{first}.weight"], out[f"blocks.{i}.{second}.weight"] = w[i], w[n + i]
        elif name in ("mlp_up_bank", "mlp_down_bank"):
            for i in range(n):
                out[f"blocks.{i}.mlp.{'fc' if name == 'mlp_up_bank' else 'proj'}.weight"] = w[i]
        elif name.endswith(".attn.attn_gate_w"):
            out[name.replace(".attn.attn_gate_w", ".attn.head_gate.weight")] = w
        else:
            out[renames.get(name, name)] = w
    return out


def fitted(state: dict, model) -> dict:
    """`model`'s state dict with the tensors of `state` it has, their leading rows where it has fewer (the skip
    weights of a model without recurrence); the others at their init."""
    own = model.state_dict()
    def fit(name, w):
        if name not in state or state[name].shape[1:] != w.shape[1:]:
            return w
        return state[name][: w.size(0)] if w.ndim else state[name]
    return {name: fit(name, w) for name, w in own.items()}


def moved_off_init(model, seed: int) -> None:
    """Seeded noise on every tensor: matrices by 1/sqrt(fan_in) (their zero-initialised projections too), the
    rest by 0.1 (gates, lambdas, scales), the caps by 5 (so that the positive and negative caps differ)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.startswith("softcap_"):
                p.add_(5 * noise)
            elif p.ndim >= 2 and min(p.shape[-2:]) >= 64:
                p.add_(noise / p.shape[-1] ** 0.5)
            else:
                p.add_(0.1 * noise)


def packed_row(vocab: int, tokens: int, seed: int):
    """One row of documents (lengths 8..300), each starting with BOS (1); other tokens in [2, vocab)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    row = torch.randint(2, vocab, (tokens,), generator=gen)
    start = 0
    while start < tokens:
        row[start] = 1
        start += int(torch.randint(8, 301, (1,), generator=gen))
    return row[None]


def preset_train(record: str) -> dict:
    import yaml
    sys.path.insert(0, str(ROOT))
    from stages.config import deep_merge
    base = yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["train"]
    return deep_merge(base, yaml.safe_load((ROOT / "presets" / f"record-{record}.yaml").read_text())
                      ["defaults"]["train"])


def optimizer_env(train_cfg: dict) -> dict:
    opt = train_cfg["optimizer"]
    return {env: str(int(opt[key]) if isinstance(opt[key], bool) else opt[key]) for env, key in OPTIMIZER_ENV.items()}


def optimizer_steps(peer, h, theirs, ours, train_cfg: dict, vocab: int, tokens: int, attention: str,
                    shared_gradients: bool = False) -> list[dict]:
    """OPTIMIZER_STEPS training steps side by side from the same weights, each on a fresh packed row: the record's
    step_fn (its Optimizers, momentum warmup, lr, clip) and caddie's (build_optimizers, muon_momentum, the same
    order). Per step: both losses, and the largest weight difference after the step relative to the weight's scale."""
    import torch
    from stages.attention import document_segments
    from stages.train import build_optimizers, muon_momentum
    opt_cfg = train_cfg["optimizer"]
    theirs.train(), ours.train()
    for block in theirs.blocks:  # its Triton LeakyReLU² MLP in training: the same math, eager (RUNTIME_SETTINGS)
        block.mlp.use_fused = False
    theirs.looping_active, ours.recurrence_active = True, True
    stub = types.SimpleNamespace(wait_stream=lambda other: None)  # RUNTIME_SETTINGS: #1855's side stream
    torch.cuda.Stream = torch.cuda.current_stream = lambda *args, **kwargs: stub
    torch.cuda.stream = lambda s: contextlib.nullcontext()
    record_opts = peer.Optimizers(h, theirs)
    caddie_opts = build_optimizers(ours, opt_cfg, fused=False)
    rows = []
    for step in range(OPTIMIZER_STEPS):
        row = packed_row(vocab, tokens + 1, seed=100 + step)
        x, y = row[:, :-1], row[:, 1:]
        bos = (x[0] == 1).nonzero().flatten().tolist()
        cu, _ = peer._build_cu_seqlens(bos, x.size(1), x.device, h.train_seq_len)
        record_opts.zero_grad_all()
        loss_theirs = theirs(x, y, cu_seqlens=cu, max_seqlen=h.train_seq_len)
        loss_theirs.backward()
        frac = min(step / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
        for group in record_opts.optimizer_muon.param_groups:
            group["momentum"] = (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum
        for opt in record_opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"]
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), h.grad_clip_norm)
        record_grads = caddie_state({n: p.grad.clone() for n, p in theirs.named_parameters() if p.grad is not None},
                                    h.num_layers)  # clipped, before its step (which zeroes them)
        record_opts.step()

        for opt in caddie_opts:
            opt.zero_grad(set_to_none=True)
        span = ({"segments": document_segments(x[0].numpy(), train_cfg["seq_len"])} if attention == "segments"
                else {"doc_isolation": True})
        loss_ours = ours(x, y, **span)
        loss_ours.backward()
        caddie_opts[1].param_groups[0]["momentum"] = muon_momentum(step, opt_cfg)
        for opt in caddie_opts:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"]
        if shared_gradients:  # the optimizers alone: caddie steps on the record's clipped gradients
            for n, g in record_grads.items():
                ours.get_parameter(n).grad = g
        else:
            torch.nn.utils.clip_grad_norm_(ours.parameters(), opt_cfg["grad_clip_norm"])
        for opt in caddie_opts:
            opt.step()
        mapped = caddie_state({n: p.detach() for n, p in theirs.named_parameters()}, h.num_layers)
        gaps = {n: float((w - ours.get_parameter(n)).abs().max() / w.abs().max().clamp_min(1e-12))
                for n, w in mapped.items()}
        worst = max(gaps, key=gaps.get)
        rows.append({"attention": attention + (", the record's gradients" if shared_gradients else ""),
                     "step": step + 1, "loss_theirs": loss_theirs.item(), "loss_ours": loss_ours.item(),
                     "max_rel_weight_diff": gaps[worst], "worst": worst,
                     "gaps": dict(sorted(gaps.items(), key=lambda kv: -kv[1])[:8])})
    return rows


def compare(record: str, shape: str) -> dict:
    train_cfg = preset_train(record)
    env = {**MODEL_ENV, **RECORDS[record]["env"], **SHAPES[shape], **optimizer_env(train_cfg),
           "TRAIN_SEQ_LEN": str(train_cfg["seq_len"])}
    os.environ.update(env)  # the record's Hyperparameters read them when its class body runs
    import torch
    import yaml
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() // 2))
    sys.path.insert(0, str(ROOT))
    from stages.attention import document_segments
    from stages.config import deep_merge
    from stages.model import GPT, GPTConfig

    spec = importlib.util.spec_from_file_location(f"record_{record}", upstream(record).with_name("train_gpt_cpu.py"))
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    peer.BOS_ID = 1  # what its data loaders set (`if BOS_ID is None: BOS_ID = 1`) before the first forward
    h = peer.Hyperparameters()
    theirs = peer.GPT(h).eval()
    moved_off_init(theirs, seed=int(record))

    preset = yaml.safe_load((ROOT / "presets" / f"record-{record}.yaml").read_text())
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    model_cfg = deep_merge(base["defaults"]["train"]["model"], preset["defaults"]["train"]["model"])
    model_cfg["model_dim"] = int(env["MODEL_DIM"])
    ours = GPT(GPTConfig(vocab_size=int(env["VOCAB_SIZE"]), **model_cfg)).eval()
    ours.load_state_dict(caddie_state(theirs.state_dict(), h.num_layers), strict=True)

    row = packed_row(h.vocab_size, TOKENS[shape], seed=1)
    rows = packed_row(h.vocab_size, 2 * TOKENS[shape], seed=2).reshape(2, -1)
    bos = (row[0] == 1).nonzero().flatten().tolist()
    cu_seqlens, max_seqlen = peer._build_cu_seqlens(bos, row.size(1), row.device)
    cut_cu, cut_max = peer._build_cu_seqlens(bos, row.size(1), row.device, CUT_LEN)
    paths = (("packed documents: varlen / caddie's segments", row, {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen},
              {"segments": document_segments(row[0].numpy(), 2048)}),
             ("packed documents: varlen / caddie's doc_isolation mask", row,
              {"cu_seqlens": cu_seqlens, "max_seqlen": max_seqlen}, {"doc_isolation": True}),
             (f"packed, documents cut every {CUT_LEN} tokens: varlen / segments", row,
              {"cu_seqlens": cut_cu, "max_seqlen": cut_max}, {"segments": document_segments(row[0].numpy(), CUT_LEN)}),
             ("plain causal rows", rows, {}, {}))
    results = []
    for looping in (False, True):
        theirs.looping_active, ours.recurrence_active = looping, looping
        for path, idx, kwargs, our_kwargs in paths:
            targets = torch.roll(idx, -1, dims=1)
            with torch.no_grad():
                delta = (theirs.forward_logits(idx, **kwargs).float() - ours.forward_logits(idx, **our_kwargs)).abs()
            theirs.zero_grad(set_to_none=True)
            ours.zero_grad(set_to_none=True)
            loss_theirs = theirs(idx, targets, **kwargs)
            loss_ours = ours(idx, targets, **our_kwargs)
            loss_theirs.backward()
            loss_ours.backward()
            grads_theirs = caddie_state({n: p.grad for n, p in theirs.named_parameters() if p.grad is not None},
                                        h.num_layers)
            grad_gap = max(float((g - ours.get_parameter(n).grad).abs().max() / g.abs().max().clamp_min(1e-12))
                           for n, g in grads_theirs.items())
            no_grad = sorted(n for n, p in ours.named_parameters() if p.grad is None)
            results.append({"looping": looping, "path": path, "tokens": int(idx.numel()),
                            "max_logit_diff": delta.max().item(), "loss": loss_theirs.item(),
                            "loss_diff": abs(loss_theirs.item() - loss_ours.item()), "max_rel_grad_diff": grad_gap,
                            "no_grad_in_training": no_grad})
    flips = {}
    if shape == "reduced":  # recurrence on, packed documents: every option is in play
        theirs.looping_active = True
        with torch.no_grad():
            reference = theirs.forward_logits(row, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen).float()
            for key, value in FLIPS.items():
                value = (not model_cfg[key]) if value is None else value
                if key == "asym_logit" and value:
                    continue  # caps added at their init equal the single cap: nothing to see
                flipped = GPT(GPTConfig(vocab_size=h.vocab_size, **{**model_cfg, key: value})).eval()
                flipped.load_state_dict(fitted(caddie_state(theirs.state_dict(), h.num_layers), flipped))
                flips[f"{key}: {model_cfg[key]} -> {value}"] = float((flipped.forward_logits(row, True)
                                                                      - reference).abs().max())
    theirs.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    steps = []
    if shape == "reduced":  # from the same weights each time: caddie's two ways of isolating the documents
        import copy
        for attention, shared in (("segments", False), ("doc_isolation mask", False), ("segments", True)):
            steps += optimizer_steps(peer, h, copy.deepcopy(theirs), copy.deepcopy(ours), train_cfg, h.vocab_size,
                                     TOKENS[shape], attention, shared)
    return {"record": record, "shape": shape, "flips": flips, "steps": steps, "params_theirs": sum(p.numel() for p in theirs.parameters()),
            "params_ours": ours.num_params(), "vocab": h.vocab_size, "model_dim": h.model_dim,
            "torch": torch.__version__, "results": results}


# ---- the driver ----

def run_child(record: str, shape: str) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--child", record, shape], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        sys.exit(f"record {record} ({shape}) failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["seconds"] = time.time() - t0
    return out


def full_shape_params(record: str) -> int:
    """The record's GPT at its logged shape, counted without building it (meta device)."""
    code = ("import os, sys, importlib.util, json, torch; os.environ.update(json.loads(sys.argv[2])); "
            "spec = importlib.util.spec_from_file_location('r', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(m)\nwith torch.device('meta'): g = m.GPT(m.Hyperparameters())\n"
            "print(sum(p.numel() for p in g.parameters()))")
    env = json.dumps({**MODEL_ENV, **RECORDS[record]["env"]})
    proc = subprocess.run([sys.executable, "-c", code, str(upstream(record).with_name("train_gpt_cpu.py")), env],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.split()[-1])


def write_report(reports: list[dict], counts: dict, argv: list[str]) -> None:
    worst = max(r["max_logit_diff"] for rep in reports for r in rep["results"])
    lines = [
        "# Frontier parity: caddie's model vs the records' train_gpt.py (CPU, fp32)", "",
        f"Command: `{' '.join(['.venv/bin/python bench/frontier_parity.py', *argv])}`", "",
        "Each record runs in a process of its own (both register the same torch.library ops). Besides the edits "
        "to its file listed below, the script sets at run time: " + "; ".join(RUNTIME_SETTINGS) + ". The SDPA "
        "stand-ins give flash-attn's semantics, not its bf16 GPU numerics: this compares the two models' math, "
        "in fp32.", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} on {platform.machine()} ({os.cpu_count()} CPUs), "
        f"torch {reports[0]['torch']}, Python {platform.python_version()}.", "",
        f"**Max |Δ logit| over every comparison: {worst:.2e}** (tolerance {TOLERANCE:.0e}: "
        f"{'pass' if worst <= TOLERANCE else 'FAIL'}).", "",
        "## The records' files", "",
    ]
    for record, info in RECORDS.items():
        lines.append(f"- #{record}: `{info['path']}` at `{info['commit'][:12]}`, sha256 `{info['sha256'][:16]}…`; "
                     f"model settings {', '.join(f'{k}={v}' for k, v in info['env'].items())} over the shared "
                     "ones below.")
    lines += ["", "Shared model settings (both records' logged values, set explicitly): "
              + ", ".join(f"`{k}={v}`" for k, v in MODEL_ENV.items()) + ".", "",
              "## Edits made to the records' files (nothing else changed)", ""]
    lines += [f"{i}. {why} ({count} match{'es' if count > 1 else ''})."
              for i, (_, _, count, why) in enumerate(SUBSTITUTIONS, 1)]
    lines += ["", "## Parameter counts at the full shape (vocab 8192)", "",
              "| record | logged model_params | the record's GPT | caddie's GPT from the preset |", "|---|---|---|---|"]
    for record, c in counts.items():
        lines.append(f"| #{record} | {RECORDS[record]['model_params']:,} | {c['theirs']:,} | {c['ours']:,} |")
    lines += ["", "## Logits, loss and gradients on the same weights and batch", "",
              "Both models in fp32 with the record's weights (seeded noise over its init, mapped to caddie's names); "
              "the batch is document-packed (documents of 8–300 tokens, each starting with BOS). `rel Δ grad`: the "
              "largest |Δ| of any parameter's gradient of the training loss, over that gradient's largest |value|.",
              "", "| record | shape | recurrence | path | tokens | max abs Δ logit | loss | Δ loss | rel Δ grad |",
              "|---|---|---|---|---|---|---|---|---|"]
    for rep in reports:
        shape = f"{rep['shape']} (vocab {rep['vocab']}, dim {rep['model_dim']}, {rep['params_ours']:,} params)"
        for r in rep["results"]:
            lines.append(f"| #{rep['record']} | {shape} | {'on' if r['looping'] else 'off'} | {r['path']} | "
                         f"{r['tokens']} | {r['max_logit_diff']:.2e} | {r['loss']:.4f} | {r['loss_diff']:.1e} | "
                         f"{r['max_rel_grad_diff']:.1e} |")
    lines += ["", "## Each option is seen by the comparison", "",
              "Max |Δ logit| against the record when one option is switched in caddie's model alone (the same weights, "
              "packed documents, recurrence on; tensors the switched model lacks are dropped, new ones keep their "
              "init). A zero here would mean the comparison could not tell that option's two settings apart.", "",
              "| option switched | " + " | ".join(f"#{rep['record']}" for rep in reports if rep["flips"]) + " |",
              "|---|" + "---|" * sum(1 for rep in reports if rep["flips"])]
    flipped = [rep for rep in reports if rep["flips"]]
    for key in FLIPS:
        cells = [next((f"{v:.2e} ({k.split(': ')[1]})" for k, v in rep["flips"].items() if k.startswith(key + ":")),
                      "–") for rep in flipped]
        lines.append(f"| `{key}` | " + " | ".join(cells) + " |")
    stepped = [rep for rep in reports if rep["steps"]]
    if stepped:
        lines += ["", "## Optimizer steps side by side", "",
                  f"From the same weights, {OPTIMIZER_STEPS} training steps, each on a fresh packed row (recurrence on): "
                  "the record's own `Optimizers` (its bank Muon with Polar Express, row normalisation and weight decay; "
                  "AdamW for the embedding and the scalars), momentum warmup, lr and gradient clip, as its `step_fn`, "
                  "and caddie's `build_optimizers` with the preset's `train.optimizer` (the record's hyperparameters are "
                  "set from the same values: " + ", ".join(f"`{e}`" for e in OPTIMIZER_ENV) + "). `rel Δ weight`: "
                  "after the step, the largest |Δ| of any weight over that weight's largest |value|.", "",
                  "The last rows feed caddie's optimizers the record's clipped gradients (the optimizers alone): what "
                  "is left there is the optimizers' own arithmetic. In the others each model steps on its own gradients, "
                  "which agree to about 1e-5 (above); bf16 Newton-Schulz and Adam's first steps (g/√v ≈ ±1 for "
                  "gradients near zero, the embedding's rare rows) turn that into the weight gap shown, the "
                  "trajectories' float noise, not a difference of method.", "",
                  "| record | caddie's attention, gradients | step | loss (record) | loss (caddie) | Δ loss | rel Δ weight |",
                  "|---|---|---|---|---|---|---|"]
        for rep in stepped:
            for r in rep["steps"]:
                lines.append(f"| #{rep['record']} | {r['attention']} | {r['step']} | {r['loss_theirs']:.6f} | {r['loss_ours']:.6f} | "
                             f"{abs(r['loss_theirs'] - r['loss_ours']):.1e} | {r['max_rel_weight_diff']:.1e} |")
    untrained = sorted({n for rep in reports for r in rep["results"] for n in r["no_grad_in_training"]})
    lines += ["", "Parameters that get no gradient from the training loss in caddie (as in the record, whose "
              f"fused loss keeps the single cap): {', '.join(f'`{n}`' for n in untrained) or 'none'}.", ""]
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="also compare at the records' full shape")
    ap.add_argument("--git-dir", help="a clone or bare mirror of openai/parameter-golf to copy the records from")
    ap.add_argument("--records", nargs="+", default=list(RECORDS), choices=list(RECORDS))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(compare(*args.child)))
        return
    import torch
    import yaml
    sys.path.insert(0, str(ROOT))
    from stages.config import deep_merge
    from stages.model import GPT, GPTConfig
    reports, counts = [], {}
    for record in args.records:
        fetch(record, args.git_dir)
        patch(record)
        model = deep_merge(yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["train"]["model"],
                           yaml.safe_load((ROOT / "presets" / f"record-{record}.yaml").read_text())
                           ["defaults"]["train"]["model"])
        with torch.device("meta"):
            counts[record] = {"theirs": full_shape_params(record), "ours": GPT(GPTConfig(vocab_size=8192, **model)).num_params()}
        for shape in ("reduced", "full") if args.full else ("reduced",):
            reports.append(run_child(record, shape))
    shown = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--git-dir")]
    write_report(reports, counts, shown)
    worst = max(r["max_logit_diff"] for rep in reports for r in rep["results"])
    if worst > TOLERANCE or any(c["theirs"] != c["ours"] or c["ours"] != RECORDS[r]["model_params"]
                                for r, c in counts.items()):
        sys.exit(1)


if __name__ == "__main__":
    main()
