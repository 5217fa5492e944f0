"""The frontier records' model options (#1855, #1945, #2135): each off by default, each checked against the
formula of the record's code, and the presets' models at the records' logged parameter counts. (Logit-level
parity with the records' own train_gpt.py is bench/frontier_parity.py: it needs their files.)"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FIXTURES, ROOT, assert_learns_a_repeating_sequence, default_config
from stages import layout
from stages.model import GPT, GPTConfig, is_control_tensor, param_groups, rms_norm

NEW_OPTIONS = ("smear_bos_mask", "ln_scale", "skip_gates", "sparse_attn_gate", "sparse_attn_gate_scale", "asym_logit",
               "rope_fp32", "orthogonal_init")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
    return GPTConfig(**{**base, **overrides})


# A record-like stack at a tiny shape: 5 layers, 1-2 looped, parallel lanes from 3.
RECORD_STACK = dict(num_layers=5, mlp_mult=4, activation="leaky_relu2", rope_dims=4, xsa_layers=5, parallel_from=3,
                    recur_layers=[1, 2], recur_loops=2, smear_gate=True, ln_scale=True, skip_gates=True,
                    sparse_attn_gate=True, sparse_attn_gate_scale=0.5, asym_logit=True, rope_fp32=True,
                    orthogonal_init=True, qk_gain_init=5.0)


def perturbed(model: GPT, std: float = 0.1) -> GPT:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def preset_model(record: str) -> dict:
    preset = yaml.safe_load((ROOT / "presets" / f"record-{record}.yaml").read_text())
    return {**default_config()["defaults"]["train"]["model"], **preset["defaults"]["train"]["model"]}


# ---- the presets' models are the records' ----

def logged(log: str, pattern: str) -> str:
    return re.search(pattern, log, re.MULTILINE).group(1)


@pytest.mark.parametrize("record", ["1855", "2135"])
def test_preset_model_has_the_records_parameter_count_and_layer_order(record):
    # the records' logs: model_params:35945671 (#1855), 35945673 (#2135), the same layer_loop line
    params = {"1855": 35_945_671, "2135": 35_945_673}[record]
    encoder, decoder = [0, 1, 2, 3, 4, 5, 3, 4], [5, 3, 4, 5, 6, 7, 8, 9, 10]
    log_path = FIXTURES / "record-logs" / "2026-04-27_SP8192_LQER_1.0611_seed42.log"
    if record == "1855" and log_path.exists():  # ../shared/fixtures beside the project (CI has it)
        log = log_path.read_text()
        assert int(logged(log, r"^model_params:(\d+)$")) == params
        assert [eval(logged(log, rf"^layer_loop:enabled .* {half}:(\[[\d, ]+\])")) for half in
                ("encoder", "decoder")] == [encoder, decoder]
    cfg = GPTConfig(vocab_size=8192, **preset_model(record))
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == params
    assert layout.halves(model.layer_order()) == (encoder, decoder)
    model.recurrence_active = False
    assert layout.halves(model.layer_order()) == (list(range(5)), list(range(5, 11)))


def test_the_two_presets_differ_only_where_the_records_do():
    a, b = preset_model("1855"), preset_model("2135")
    assert {k for k in a if a[k] != b[k]} == {"smear_bos_mask", "asym_logit"}


# ---- off by default: the baseline is untouched ----

def test_new_options_are_off_by_default():
    cfg = GPTConfig(vocab_size=1024)
    assert {k: getattr(cfg, k) for k in NEW_OPTIONS} == dict(
        smear_bos_mask=True, ln_scale=False, skip_gates=False, sparse_attn_gate=False, sparse_attn_gate_scale=1.0,
        asym_logit=False, rope_fp32=False, orthogonal_init=False)
    assert {k: v for k, v in default_config()["defaults"]["train"]["model"].items() if k in NEW_OPTIONS} == {
        k: getattr(cfg, k) for k in NEW_OPTIONS}
    names = set(GPT(tiny()).state_dict())
    assert not any(part in n for n in names for part in ("gate", "lane", "softcap"))
    torch.manual_seed(0)
    a = GPT(tiny())
    torch.manual_seed(0)
    b = GPT(tiny(smear_gate=True, smear_bos_mask=False, sparse_attn_gate_scale=0.5, rope_fp32=True))
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(a.forward_logits(idx), b.forward_logits(idx))  # identities at init, fp32 tables in fp32


# ---- each option: shapes, gradients, on/off, and a tiny run that learns ----

OPTIONS = {
    "ln_scale": dict(ln_scale=True),
    "skip_gates": dict(skip_gates=True, num_layers=3),
    "sparse_attn_gate": dict(sparse_attn_gate=True, sparse_attn_gate_scale=0.5),
    "smear_no_bos_mask": dict(smear_gate=True, smear_bos_mask=False),
    "asym_logit": dict(asym_logit=True),
    "rope_fp32": dict(rope_fp32=True, rope_dims=4),
    "orthogonal_init": dict(orthogonal_init=True),
    "parallel_recurrent": dict(num_layers=4, parallel_from=3, recur_layers=[1, 2], recur_loops=2),
    "record_stack": RECORD_STACK,
}
# Switching the option changes the forward pass (of perturbed weights, where the option has tensors).
SWITCHED = {"ln_scale": dict(ln_scale=False), "skip_gates": dict(skip_gates=False),
            "sparse_attn_gate": dict(sparse_attn_gate_scale=1.0), "smear_no_bos_mask": dict(smear_bos_mask=True),
            "asym_logit": dict(asym_logit=False), "parallel_recurrent": dict(parallel_from=-1),
            "record_stack": dict(sparse_attn_gate=False)}


def scoring_loss(model: GPT, idx, targets):
    # Through forward_logits, the path the asymmetric caps are on (the training loss keeps the single cap).
    logits = model.forward_logits(idx)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


@pytest.mark.parametrize("name", OPTIONS)
def test_option_shapes_gradients_and_learning(name):
    torch.manual_seed(0)
    cfg = tiny(**OPTIONS[name])
    model = perturbed(GPT(cfg))
    idx = torch.randint(2, 64, (2, 16))
    idx[:, 5] = 1  # a document boundary
    logits = model.forward_logits(idx)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    scoring_loss(model, idx, torch.randint(0, 64, (2, 16))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    if name in SWITCHED:
        other = GPT(GPTConfig(**{**cfg.to_dict(), **SWITCHED[name]}))
        other.load_state_dict({k: v for k, v in model.state_dict().items() if k in other.state_dict()})
        assert not torch.allclose(other.forward_logits(idx), logits, atol=1e-4)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg

    assert_learns_a_repeating_sequence(cfg)


def test_record_stack_param_groups_and_control_tensors():
    model = GPT(tiny(**RECORD_STACK))
    groups = param_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    scalar = {names[id(p)] for p in groups["scalar"]}
    assert {"skip_gates", "lane_resid", "lane_post", "softcap_pos", "softcap_neg", "blocks.0.attn.head_gate.weight",
            "smear.weight", "smear.lam"} <= scalar
    assert all(is_control_tensor(n) for n in scalar if not n.startswith("blocks.") or "attn." in n and "c_" not in n)
    assert {names[id(p)] for p in groups["matrix"]} == {n for n, p in model.named_parameters()
                                                         if n.startswith("blocks.") and n.endswith(".weight")
                                                         and "head_gate" not in n}


# ---- each option against the formula of the record's code ----

def test_ln_scale_divides_each_blocks_normed_inputs_by_sqrt_of_its_depth():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(num_layers=3, ln_scale=True)))
    block, x, x0 = model.blocks[2], torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    mix, s = block.resid_mix, 1 / math.sqrt(3)
    h = mix[0] * x + mix[1] * x0
    h = h + block.attn_scale * block.attn(rms_norm(h) * s)
    expected = h + block.mlp_scale * block.mlp(rms_norm(h) * s)
    assert torch.allclose(block(x, x0), expected, atol=1e-6)
    assert [b.ln_scale for b in model.blocks] == [1.0, 1 / math.sqrt(2), 1 / math.sqrt(3)]


def test_skip_gates_lerp_between_the_scaled_skip_and_the_stream():
    torch.manual_seed(0)
    model = GPT(tiny(num_layers=4, skip_gates=True))
    x, skip = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    assert model.skip_gates.shape == (2, 32) and not model.skip_gates.any()
    w = model.skip_weights[1]
    assert torch.allclose(model.add_skip(1, x, skip), 0.5 * x + 0.5 * w * skip, atol=1e-6)  # sigmoid(0) = 1/2
    perturbed(model)
    g = torch.sigmoid(model.skip_gates[1])
    assert torch.allclose(model.add_skip(1, x, skip), g * x + (1 - g) * model.skip_weights[1] * skip, atol=1e-6)
    plain = GPT(tiny(num_layers=4))
    assert torch.allclose(plain.add_skip(1, x, skip), x + skip)


def test_sparse_attn_gate_scales_each_head_by_a_sigmoid_of_the_first_12_dims():
    from stages.model import CausalSelfAttention
    torch.manual_seed(0)
    gated = CausalSelfAttention(tiny(sparse_attn_gate=True, sparse_attn_gate_scale=0.5))
    plain = CausalSelfAttention(tiny())
    perturbed(plain)
    gated.load_state_dict({**plain.state_dict(), "head_gate.weight": torch.zeros(4, 12)})
    x = torch.randn(2, 7, 32)
    assert torch.allclose(gated(x), 0.5 * plain(x), atol=1e-6)  # zero init: every head at half its output
    with torch.no_grad():
        gated.head_gate.weight.normal_()
        changed = x.clone()
        changed[..., 12:] += 1.0  # dims the gate does not read: only the attention itself sees them
    g = torch.sigmoid(0.5 * x[..., :12] @ gated.head_gate.weight.T)  # (B, T, H)
    captured = {}
    gated.proj.register_forward_hook(lambda m, inputs, out: captured.setdefault("y", inputs[0]))
    plain.proj.register_forward_hook(lambda m, inputs, out: captured.setdefault("y_plain", inputs[0]))
    gated(x), plain(x)
    y, y_plain = (captured[k].reshape(2, 7, 4, 8) for k in ("y", "y_plain"))
    assert torch.allclose(y, y_plain * g[..., None], atol=1e-6)
    assert torch.equal(gated.head_gate(changed), gated.head_gate(x))


def test_asym_logit_caps_positive_and_negative_logits_apart_in_scoring_only():
    torch.manual_seed(0)
    cfg = tiny(asym_logit=True, logit_softcap=2.0)
    model = perturbed(GPT(cfg), std=0.5)
    plain = GPT(tiny(logit_softcap=2.0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "softcap" not in k})
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        model.softcap_pos.fill_(2.0)
        model.softcap_neg.fill_(2.0)
        assert torch.allclose(model.forward_logits(idx), plain.forward_logits(idx), atol=1e-6)  # caps at init
        model.softcap_pos.fill_(1.0)
        model.softcap_neg.fill_(3.0)
        raw = plain.head(plain.hidden(idx))
        expected = torch.where(raw > 0, 1.0 * torch.tanh(raw / 1.0), 3.0 * torch.tanh(raw / 3.0))
        logits = model.forward_logits(idx)
    assert torch.allclose(logits, expected, atol=1e-6) and logits.max() <= 1.0 and logits.min() >= -3.0
    assert (raw > 0).any() and (raw < 0).any()
    loss = model(idx, targets)  # the training loss: the single cap, as the record's fused loss
    assert torch.allclose(loss, plain(idx, targets), atol=1e-6)
    loss.backward()
    assert model.softcap_pos.grad is None and model.softcap_neg.grad is None
    scoring_loss(model, idx, targets).backward()
    assert model.softcap_pos.grad != 0 and model.softcap_neg.grad != 0
    with pytest.raises(ValueError, match="asym_logit"):
        GPT(tiny(asym_logit=True, logit_softcap=0.0))


def test_rope_fp32_computes_the_angles_in_fp32_in_a_bf16_model():
    from stages.model import Rotary, cast_to_training_dtypes
    base, fp32 = Rotary(16, 10000.0), Rotary(16, 10000.0, fp32=True)
    for rotary in (base, fp32):
        rotary.bfloat16()  # what cast_to_training_dtypes does to the buffer
    cos_base, _ = base(2048, torch.device("cpu"), torch.bfloat16)
    cos_fp32, sin_fp32 = fp32(2048, torch.device("cpu"), torch.bfloat16)
    freqs = torch.outer(torch.arange(2048, dtype=torch.float32), fp32.inv_freq.float())  # the records' tables
    assert torch.equal(cos_fp32[0, 0], freqs.cos().bfloat16()) and torch.equal(sin_fp32[0, 0], freqs.sin().bfloat16())
    exact = torch.outer(torch.arange(2048, dtype=torch.float64), fp32.inv_freq.double()).cos()
    assert (cos_fp32[0, 0].double() - exact).abs().max() < 0.005  # bf16's rounding of the value only
    assert (cos_base[0, 0].double() - exact).abs().max() > 0.5  # bf16 positions and angles: far off late on
    model = cast_to_training_dtypes(GPT(tiny(rope_fp32=True)))
    assert model.blocks[0].attn.rotary.inv_freq.dtype == torch.bfloat16 and model.blocks[0].attn.rotary.fp32
    a, b = Rotary(16, 10000.0), Rotary(16, 10000.0, fp32=True)  # an fp32 model: the same tables
    assert torch.equal(a(300, torch.device("cpu"), torch.float32)[0], b(300, torch.device("cpu"), torch.float32)[0])


def test_orthogonal_init_of_the_block_matrices():
    torch.manual_seed(0)
    model = GPT(tiny(orthogonal_init=True, model_dim=64, mlp_mult=4, tie_embeddings=False))
    for name, p in model.named_parameters():
        if name.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "fc.weight")):
            w = p if p.shape[0] <= p.shape[1] else p.T  # orthonormal rows (or columns, if taller than wide)
            assert torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5), name
        elif name.endswith("proj.weight") or name == "lm_head.weight":
            assert not p.any(), name  # the zero-initialised projections stay zero
    assert model.tok_emb.weight.std() > 0.5  # untied: nn.Embedding's own init


def test_smear_gate_without_the_bos_mask_reaches_across_documents():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(smear_gate=True, smear_bos_mask=False)))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()  # positions interact only through the smear gate
        model.smear.lam.fill_(1.0)
    idx = torch.randint(2, 64, (1, 12))
    idx[0, 6] = 1
    changed = idx.clone()
    changed[0, 5] = (changed[0, 5] + 1) % 62 + 2
    assert not torch.allclose(model.forward_logits(changed)[0, 6], model.forward_logits(idx)[0, 6])
    masked = GPT(tiny(smear_gate=True))
    masked.load_state_dict(model.state_dict())
    assert torch.equal(masked.forward_logits(changed)[0, 6], masked.forward_logits(idx)[0, 6])


def test_parallel_lanes_run_as_the_records_decoder():
    # From the first decoder layer >= parallel_from the two lanes start equal; the skips join lane 0 only; the
    # last hidden state is the mean of the lanes.
    torch.manual_seed(0)
    model = perturbed(GPT(tiny(num_layers=4, parallel_from=3, skip_gates=True)))
    idx = torch.randint(2, 64, (2, 9))
    x = rms_norm(model.tok_emb(idx))
    x0 = x
    h = model.blocks[1](model.blocks[0](x, x0), x0)
    skips = [model.blocks[0](x, x0), h]
    h = model.blocks[2](model.add_skip(0, h, skips.pop()), x0)
    lanes = (model.add_skip(1, h, skips.pop()), h)
    lanes = model.blocks[3].forward_lanes(lanes, x0, model.lane_resid[3], model.lane_post[3])
    assert torch.allclose(model.hidden(idx), 0.5 * (lanes[0] + lanes[1]), atol=1e-6)


@pytest.mark.parametrize("cfg, message", [
    (dict(num_layers=4, parallel_from=1), r"layers from 1 on must end the decoder \(encoder \[0, 1\]"),
    (dict(num_layers=5, parallel_from=3, recur_layers=[2, 3]), r"with recurrence"),  # decoder [2, 3, 2, 3, 4]
    (dict(num_layers=11, parallel_from=5, recur_layers=[3, 5], recur_loops=2), r"decoder \[5, 3, 4, 5"),
])
def test_parallel_layers_must_end_the_decoder(cfg, message):
    with pytest.raises(ValueError, match="parallel_from: .*" + message):
        GPT(tiny(**cfg))


def test_record_stack_switches_recurrence_and_keeps_learning():
    # The record's schedule in miniature: the loop joins partway through the run (recur_start).
    torch.manual_seed(0)
    model = GPT(tiny(**RECORD_STACK))
    model.recurrence_active = False
    groups = param_groups(model)
    opt = torch.optim.Adam([{"params": groups["embed"] + groups["matrix"], "lr": 0.01},
                            {"params": groups["scalar"], "lr": 0.02}], betas=(0.9, 0.95))
    seq = torch.arange(33).remainder(8).repeat(4, 1) + 2
    seq[:, 16] = 1  # two documents per row
    idx, targets = seq[:, :-1], seq[:, 1:]
    losses = []
    for step in range(40):
        model.recurrence_active = step >= 14
        loss = model(idx, targets, doc_isolation=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < losses[13], losses


@pytest.mark.parametrize("model", [
    {}, {"parallel_from": 2}, {"parallel_from": 1}, {"parallel_from": 3, "recur_layers": [1, 2]},
    {"parallel_from": 3, "recur_layers": [2, 3]}, {"parallel_from": 2, "recur_layers": [0, 0], "recur_loops": 3},
    {"sparse_attn_gate": True}, {"sparse_attn_gate": True, "model_dim": 8, "num_heads": 2, "num_kv_heads": 1},
    {"asym_logit": True}, {"asym_logit": True, "logit_softcap": 0.0}, RECORD_STACK | {"num_layers": 5},
], ids=str)
def test_plan_time_checks_agree_with_the_model(model):
    from stages import checks
    cfg = {**default_config()["defaults"]["train"]["model"], **model}
    try:
        GPTConfig(vocab_size=1024, **cfg).validate()
        accepted = True
    except ValueError:
        accepted = False
    problems = list(checks.model_shape({"train": {"model": cfg}}))
    assert (problems == []) == accepted, problems
    assert all(p.startswith("train.model.") for p in problems)
