import math

import pytest
import torch

from conftest import assert_learns_a_repeating_sequence
from stages.attention import causal_attention
from stages.model import GPT, GPTConfig, is_control_tensor, param_groups
from stages.muon import Muon, zeropower_via_newtonschulz5


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine their spin-waits cost 10-100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2)
    return GPTConfig(**{**base, **overrides})


def test_baseline_param_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=1024))
    assert model.num_params() == 17_059_912


def test_state_dict_names_match_baseline():
    names = set(GPT(tiny_config(num_layers=3)).state_dict())
    assert {"tok_emb.weight", "skip_weights", "blocks.0.attn.c_q.weight", "blocks.0.attn.c_k.weight",
            "blocks.0.attn.c_v.weight", "blocks.0.attn.proj.weight", "blocks.0.attn.q_gain",
            "blocks.0.mlp.fc.weight", "blocks.0.mlp.proj.weight", "blocks.0.attn_scale",
            "blocks.0.mlp_scale", "blocks.0.resid_mix"} <= names
    assert not any("inv_freq" in n for n in names)


def test_logits_shape_softcap_and_initial_loss():
    torch.manual_seed(0)
    cfg = tiny_config(logit_softcap=0.5)
    model = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model.forward_logits(idx)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == torch.float32
    assert logits.abs().max() <= cfg.logit_softcap
    model = GPT(tiny_config())
    loss = model(idx, torch.randint(0, cfg.vocab_size, (2, 16)))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1


def test_untied_head_starts_at_uniform():
    model = GPT(tiny_config(tie_embeddings=False, logit_softcap=0.0))
    idx = torch.randint(0, 64, (1, 8))
    assert torch.count_nonzero(model.forward_logits(idx)) == 0
    assert param_groups(model)["head"] == [model.lm_head.weight]


def perturbed_blocks(model: GPT) -> GPT:
    # The zero-init projections make every position identical at init; perturb them so causality is testable.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "proj" in name:
                p.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_causality_gqa_and_mha(kv_heads):
    torch.manual_seed(0)
    model = perturbed_blocks(GPT(tiny_config(num_layers=3, num_kv_heads=kv_heads)))
    idx = torch.randint(0, 64, (2, 12))
    t = 7
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    a, b = model.forward_logits(idx), model.forward_logits(changed)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_causal_attention_matches_expanded_heads():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    expanded = causal_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1))
    assert torch.allclose(causal_attention(q, k, v), expanded, atol=1e-6)


def test_param_groups_cover_every_parameter_once():
    model = GPT(tiny_config(num_layers=3))
    groups = param_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    scalar_ids = {id(p) for p in groups["scalar"]}
    for name, p in model.named_parameters():
        if is_control_tensor(name):
            assert id(p) in scalar_ids, name
    assert all(p.ndim == 2 for p in groups["matrix"])
    assert groups["embed"] == [model.tok_emb.weight] and groups["head"] == []
    assert scalar_ids.isdisjoint(id(p) for p in groups["matrix"])


@pytest.mark.parametrize("overrides,key", [
    (dict(model_dim=30, num_heads=4), "model_dim"),
    (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
    (dict(model_dim=36, num_heads=12, num_kv_heads=4), "head_dim"),
    (dict(activation="gelu"), "activation"),
    (dict(rope_dims=3), "rope_dims"),
    (dict(rope_dims=10), "rope_dims"),
    (dict(xsa_layers=3), "xsa_layers"),
    (dict(parallel_from=2), "parallel_from"),
    (dict(recur_layers=[1, 0]), "recur_layers"),
    (dict(recur_layers=[1]), "recur_layers"),
    (dict(recur_layers=[0, 1], recur_loops=0), "recur_loops"),
    (dict(q_rank=32), "q_rank"),
    (dict(qat_bits=1), "qat_bits"),
    (dict(qat_bits=4, qat_clip="absmax"), "qat_clip"),
    (dict(qat_bits=4, qat_clip_percentile=100.5), "qat_clip_percentile"),
    (dict(qat_bits=4, qat_clip_sigmas=0.0), "qat_clip_sigmas"),
])
def test_invalid_config_raises(overrides, key):
    with pytest.raises(ValueError, match=key):
        GPT(tiny_config(**overrides))


def test_config_from_dict_roundtrip_and_unknown_key():
    cfg = tiny_config(mlp_mult=3)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus_key"):
        GPTConfig.from_dict({**cfg.to_dict(), "bogus_key": 1})


def test_control_patterns():
    assert is_control_tensor("blocks.3.attn.q_gain") and is_control_tensor("skip_weights")
    assert not is_control_tensor("blocks.0.attn.c_q.weight")


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_zeropower_singular_values_near_one(shape):
    torch.manual_seed(0)
    X = zeropower_via_newtonschulz5(torch.randn(*shape))
    assert X.shape == shape and X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.5 and s.max() < 1.5


def test_muon_reduces_least_squares():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(128, 16)
    y = x @ torch.randn(16, 8)
    opt = Muon(layer.parameters(), lr=0.2, momentum=0.9, backend_steps=5)
    losses = []
    for _ in range(20):
        loss = (layer(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_tiny_model_learns_repeating_sequence():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    groups = param_groups(model)
    adam = torch.optim.Adam([{"params": groups["embed"], "lr": 0.05},
                             {"params": groups["scalar"], "lr": 0.04}], betas=(0.9, 0.95))
    muon = Muon(groups["matrix"], lr=0.04, momentum=0.95, backend_steps=5)
    seq = torch.arange(17).remainder(8).repeat(4, 1)
    idx, targets = seq[:, :-1], seq[:, 1:]
    first = None
    for _ in range(30):
        loss = model(idx, targets)
        first = first if first is not None else loss.item()
        adam.zero_grad()
        muon.zero_grad()
        loss.backward()
        adam.step()
        muon.step()
    assert model(idx, targets).item() < 0.5 * first


def _muon_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    params = _muon_params()
    Muon(params, lr=0.1, momentum=0.9, backend_steps=5).step()
    if rank == 0:
        torch.save([p.detach() for p in params], out_file)
    dist.barrier()  # both ranks done with the group before either tears it down (a gloo abort seen once in CI)
    dist.destroy_process_group()


def _muon_params():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(8, 4), (4, 8), (6, 6)]]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_muon_distributed_matches_single_process(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "out.pt"
    mp.spawn(_muon_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    single = _muon_params()
    Muon(single, lr=0.1, momentum=0.9, backend_steps=5).step()
    for a, b in zip(torch.load(out), single):
        assert torch.equal(a, b.detach())


# ---- architecture options (each off by default) ----

ALL_OPTIONS = dict(activation="leaky_relu2", rope_dims=4, xsa_layers=1, parallel_from=1, recur_layers=[0, 0],
                   recur_loops=2, smear_gate=True, q_rank=8, qat_bits=4)
OPTIONS = {
    "leaky_relu2": dict(activation="leaky_relu2"),
    "partial_rope": dict(rope_dims=4),
    "xsa": dict(xsa_layers=1),
    "xsa_mha": dict(xsa_layers=2, num_kv_heads=4),
    "parallel": dict(parallel_from=1),
    "recurrence": dict(recur_layers=[0, 1], recur_loops=2),
    "smear_gate": dict(smear_gate=True),
    "low_rank_q": dict(q_rank=8),
    "qat_percentile": dict(qat_bits=4),
    "qat_sdclip": dict(qat_bits=4, qat_clip="sdclip", qat_clip_sigmas=3.0),
    "all": ALL_OPTIONS,
}


def perturbed(model: GPT, std: float = 0.1) -> GPT:
    # Moves every parameter off its (often zero) init, so that every gradient path is open.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


@pytest.mark.parametrize("name", OPTIONS)
def test_option_shapes_gradients_and_learning(name):
    torch.manual_seed(0)
    cfg = tiny_config(**OPTIONS[name])
    model = perturbed(GPT(cfg))
    model.qat_active = bool(cfg.qat_bits)
    idx = torch.randint(2, 64, (2, 16))
    logits = model.forward_logits(idx)
    assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all()
    model(idx, torch.randint(0, 64, (2, 16))).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname

    assert_learns_a_repeating_sequence(cfg)


def test_options_default_to_baseline():
    assert GPTConfig(vocab_size=1024) == GPTConfig.from_dict(GPTConfig(vocab_size=1024, **{
        "activation": "relu2", "rope_dims": 0, "xsa_layers": 0, "parallel_from": -1, "recur_layers": [],
        "recur_loops": 1, "smear_gate": False, "q_rank": 0, "qat_bits": 0}).to_dict())
    torch.manual_seed(0)
    a = GPT(tiny_config())
    torch.manual_seed(0)
    b = GPT(tiny_config(smear_gate=True, xsa_layers=0, rope_dims=8))  # smear is the identity at init
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(a.forward_logits(idx), b.forward_logits(idx))
    assert not a.qat_active and not a.recurrence_active


def test_all_options_param_groups_and_roundtrip():
    cfg = tiny_config(num_layers=3, **ALL_OPTIONS)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    model = GPT(cfg)
    groups = param_groups(model)
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in groups["matrix"]} >= {"blocks.0.attn.c_q.down.weight", "blocks.0.attn.c_q.up.weight"}
    scalar = {names[id(p)] for p in groups["scalar"]}
    assert {"smear.weight", "smear.lam", "skip_weights"} <= scalar
    assert all(not is_control_tensor(names[id(p)]) for p in groups["matrix"])
    assert all(is_control_tensor(n) for n in ("smear.weight", "smear.lam"))
    assert not any("active" in n or "inv_freq" in n for n in model.state_dict())


def test_partial_rope_rotates_only_the_first_dims():
    from stages.model import Rotary, apply_rotary_emb
    x = torch.randn(1, 2, 5, 8)
    cos, sin = Rotary(4, 10000.0)(5, x.device, x.dtype)
    y = apply_rotary_emb(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.equal(y[..., :4], apply_rotary_emb(x[..., :4], cos, sin))
    assert not torch.allclose(y[..., :4], x[..., :4])
    torch.manual_seed(0)
    full = perturbed(GPT(tiny_config(rope_dims=8)))  # head_dim 8: the same as rope_dims=0
    base = GPT(tiny_config())
    base.load_state_dict(full.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(full.forward_logits(idx), base.forward_logits(idx))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_xsa_removes_own_value_component(kv_heads):
    from stages.model import exclude_self_value
    y, v = torch.randn(2, 4, 5, 8), torch.randn(2, kv_heads, 5, 8)
    out = exclude_self_value(y, v)
    for h in range(4):
        vh = v[:, h // (4 // kv_heads)]  # the kv head that q head h reads
        unit = vh / vh.norm(dim=-1, keepdim=True)
        assert torch.allclose(out[:, h], y[:, h] - (y[:, h] * unit).sum(-1, keepdim=True) * unit, atol=1e-5)
        assert torch.allclose((out[:, h] * vh).sum(-1), torch.zeros(2, 5), atol=1e-5)
    model = GPT(tiny_config(num_layers=3, xsa_layers=2))
    assert [b.attn.xsa for b in model.blocks] == [False, True, True]


def test_parallel_lanes_follow_the_two_lane_formula():
    # The record #1855's parallel block: attention and MLP both read the lanes as they were before the block.
    from stages.model import rms_norm
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(num_layers=3, parallel_from=2)))
    block, x0 = model.blocks[1], torch.randn(2, 6, 32)
    resid, post = torch.tensor([0.9, 0.8]), torch.tensor([[1.0, 0.5], [0.25, 1.5]])
    lane0, lane1 = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    mix = block.resid_mix
    a = block.attn_scale * block.attn(rms_norm(mix[0] * lane0 + mix[1] * x0))
    m = block.mlp_scale * block.mlp(rms_norm(lane1))
    expected = (0.9 * lane0 + 1.0 * a + 0.25 * m, 0.8 * lane1 + 0.5 * a + 1.5 * m)
    got = block.forward_lanes((lane0, lane1), x0, resid, post)
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(got, expected))
    assert [n for n, _ in model.named_parameters() if "lane_" in n] == ["lane_resid", "lane_post"]
    assert model.lane_resid.shape == (3, 2) and model.lane_post.shape == (3, 2, 2)  # a row per layer, as the record
    fresh = GPT(tiny_config(num_layers=3, parallel_from=2))
    assert torch.equal(fresh.lane_resid, torch.full((3, 2), 1.1)) and torch.equal(fresh.lane_post, torch.ones(3, 2, 2))


def test_recurrence_order_switch_and_shared_weights():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(num_layers=5, recur_layers=[1, 2], recur_loops=2)))
    assert model.recurrence_active and model.layer_order() == [0, 1, 2, 1, 2, 1, 2, 3, 4]
    assert model.skip_weights.shape == (4, 32)  # min(4, 5) over the 9 virtual layers
    plain = GPT(tiny_config(num_layers=5))
    assert model.num_params() - plain.num_params() == 2 * 32  # shared weights: only more skip weights
    idx = torch.randint(0, 64, (2, 12))
    looped = model.forward_logits(idx)
    model.recurrence_active = False
    assert model.layer_order() == [0, 1, 2, 3, 4]
    state = {**model.state_dict(), "skip_weights": model.skip_weights[:2]}
    plain.load_state_dict(state)
    once = model.forward_logits(idx)
    assert torch.equal(once, plain.forward_logits(idx)) and not torch.allclose(once, looped)


def test_smear_gate_bos_mask():
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(smear_gate=True)))
    with torch.no_grad():  # no attention output: positions interact only through the smear gate
        for block in model.blocks:
            block.attn.proj.weight.zero_()
        model.smear.lam.fill_(1.0)
    idx = torch.randint(2, 64, (1, 12))
    idx[0, 6] = 1  # BOS at 6
    base = model.forward_logits(idx)
    before_bos = idx.clone()
    before_bos[0, 5] = (before_bos[0, 5] + 1) % 62 + 2
    out = model.forward_logits(before_bos)
    assert torch.equal(out[0, 6], base[0, 6]) and not torch.allclose(out[0, 5], base[0, 5])
    before_plain = idx.clone()
    before_plain[0, 8] = (before_plain[0, 8] + 1) % 62 + 2
    assert not torch.allclose(model.forward_logits(before_plain)[0, 9], base[0, 9])  # the gate does mix


def test_low_rank_q_param_count():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=1024, q_rank=128))
    assert model.num_params() == 17_059_912 - 9 * (512 * 512 - 2 * 512 * 128)
    assert GPT(tiny_config()).num_params() - GPT(tiny_config(q_rank=8)).num_params() == 2 * (32 * 32 - 2 * 32 * 8)


def dequantised_copy(model: GPT) -> GPT:
    from stages import rowquant
    cfg = model.config
    plain = GPT(GPTConfig.from_dict({**cfg.to_dict(), "qat_bits": 0}))
    state = model.state_dict()
    qmax = rowquant.qmax_of(cfg.qat_bits)
    for name, w in state.items():
        if name.startswith("blocks.") and name.endswith(".weight"):
            scale = (rowquant.sdclip_scale(w, cfg.qat_clip_sigmas, qmax) if cfg.qat_clip == "sdclip"
                     else rowquant.percentile_scale(w, cfg.qat_clip_percentile, qmax))
            state[name] = rowquant.dequantize_rows(rowquant.round_to_nearest(w, scale, qmax), scale)
    plain.load_state_dict(state)
    return plain


@pytest.mark.parametrize("clip", ["percentile", "sdclip"])
def test_qat_matches_export_grid_and_passes_gradients(clip):
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(q_rank=8, qat_bits=3, qat_clip=clip, qat_clip_sigmas=2.5,
                                      qat_clip_percentile=90.0)))
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    plain = GPT(tiny_config(q_rank=8))
    plain.load_state_dict(model.state_dict())
    assert not model.qat_active and torch.equal(model.forward_logits(idx), plain.forward_logits(idx))
    model.qat_active = True
    assert model.qat_active
    reference = dequantised_copy(model)
    assert torch.allclose(model.forward_logits(idx), reference.forward_logits(idx), atol=1e-5)
    assert not torch.allclose(model.forward_logits(idx), plain.forward_logits(idx), atol=1e-3)
    model(idx, targets).backward()
    reference(idx, targets).backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():  # straight-through: dL/dw = dL/dw_q
        assert p.dtype == torch.float32 and torch.allclose(p.grad, ref_grads[name].grad, atol=1e-5), name


def test_run_time_switches_survive_torch_compile():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(qat_bits=3, recur_layers=[1, 1])))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        off = compiled(idx, targets)
        model.qat_active = True
        on = compiled(idx, targets)
        assert counter.frame_count == 1  # the QAT flag is a buffer: no recompile, and no constant folding
        assert on != off and torch.allclose(on, model(idx, targets))
        model.recurrence_active = False
        once = compiled(idx, targets)
        assert once != on and torch.allclose(once, model(idx, targets))


def test_document_isolation():
    from stages.attention import document_mask
    idx = torch.tensor([[5, 1, 7, 8, 1, 9]])
    allowed = document_mask(idx)[0, 0]
    assert allowed[3].tolist() == [False, True, True, True, False, False]
    assert allowed[5].tolist() == [False] * 4 + [True, True] and allowed[0].tolist() == [True] + [False] * 5
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(num_layers=3, smear_gate=True)))
    idx = torch.randint(2, 64, (2, 16))
    idx[:, 0], idx[:, 9] = 1, 1
    changed = idx.clone()
    changed[:, 3] = (changed[:, 3] + 1) % 62 + 2
    iso, iso_changed = model.forward_logits(idx, doc_isolation=True), model.forward_logits(changed, doc_isolation=True)
    assert torch.allclose(iso[:, 9:], iso_changed[:, 9:], atol=1e-6)
    assert not torch.allclose(iso[:, 3:9], iso_changed[:, 3:9])
    assert not torch.allclose(model.forward_logits(idx)[:, 9:], model.forward_logits(changed)[:, 9:])
    one_doc = torch.randint(2, 64, (2, 16))
    one_doc[:, 0] = 1
    assert torch.allclose(model.forward_logits(one_doc, doc_isolation=True), model.forward_logits(one_doc), atol=1e-6)
    assert model(idx, idx, doc_isolation=True).dim() == 0
