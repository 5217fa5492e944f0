"""The records' training options, each off by default: Polar Express Newton-Schulz, row normalisation, weight
decay per optimizer group, warmdown by fraction with a floor, per-rank gradient clipping, the EMA update, and
what each of them does to the train key. Fast unit tests; the runs that use them are in test_train.py."""
import copy

import pytest
import torch

from conftest import default_config, tiny_train_config
from stages import config as caddie
from stages import muon, techniques, train
from stages.model import GPT, GPTConfig, param_groups


def record_zeropower(G, coefficients, steps, dtype=torch.bfloat16, eps=1e-7):
    """The record #1855's zeropower_via_newtonschulz5 (train_gpt.py L1729-1748): batched, the norm over the
    last two dims after transposing to the short side, coefficients[:steps]; in bf16 as there, or in float64."""
    X = G.unsqueeze(0).to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients[:steps]:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.squeeze(0)


def baseline_zeropower(G, steps=5, eps=1e-7):
    """The challenge's train_gpt.py L96-109."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    X /= X.norm() + eps
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    return X.T if transposed else X


def polar_factor(G):
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return (U @ Vh).float()


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_standard_newton_schulz_is_the_baselines(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(muon.zeropower_via_newtonschulz5(G), baseline_zeropower(G))


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_polar_express_matches_the_records_formula_and_orthogonalizes(shape):
    G = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    pe = muon.zeropower_via_newtonschulz5(G, steps=5, coefficients=muon.POLAR_EXPRESS, records_form=True)
    assert pe.dtype == torch.bfloat16
    # In the records' form, the record's own bf16 arithmetic, bit for bit; the baseline's form rounds differently.
    assert torch.equal(pe, record_zeropower(G, muon.POLAR_EXPRESS, 5))
    assert not torch.equal(muon.zeropower_via_newtonschulz5(G, steps=5, coefficients=muon.POLAR_EXPRESS), pe)
    # Both near the record's formula in exact arithmetic.
    exact_formula = record_zeropower(G, muon.POLAR_EXPRESS, 5, dtype=torch.float64)
    error = lambda X: float((X.double() - exact_formula).norm() / exact_formula.norm())
    assert error(pe) < 0.08 and error(pe) < 1.25 * error(record_zeropower(G, muon.POLAR_EXPRESS, 5)) + 0.01
    standard = muon.zeropower_via_newtonschulz5(G, steps=5).float()
    polar = polar_factor(G)
    pe_error, standard_error = (pe.float() - polar).norm() / polar.norm(), (standard - polar).norm() / polar.norm()
    assert pe_error < 0.16 and standard_error < 0.3  # both near the polar factor U V^T; Polar Express nearer
    assert pe_error < standard_error
    assert (pe.float() - standard).norm() / standard.norm() < 0.4
    s = torch.linalg.svdvals(pe.float())
    assert s.max() < 1.2 and (s > 0.7).float().mean() > 0.9  # a square random G has a few tiny ones


def test_polar_express_coefficients_are_the_records():
    # record #1855 train_gpt.py L1720-1726 (_PE_COEFFS), applied at MUON_BACKEND_STEPS=5
    assert muon.POLAR_EXPRESS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert muon.POLAR_EXPRESS[-1] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    assert len(muon.POLAR_EXPRESS) == 5 and muon.STANDARD == ((3.4445, -4.7750, 2.0315),)


def test_polar_express_past_its_table_repeats_the_last_tuple():
    G = torch.randn(32, 16, generator=torch.Generator().manual_seed(3))
    seven = muon.zeropower_via_newtonschulz5(G, steps=7, coefficients=muon.POLAR_EXPRESS)
    table = muon.POLAR_EXPRESS + (muon.POLAR_EXPRESS[-1],) * 2
    assert torch.equal(seven, muon.zeropower_via_newtonschulz5(G, steps=7, coefficients=table))
    with pytest.raises(ValueError, match="newton_schulz"):
        muon.Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.1, momentum=0.9, backend_steps=5,
                  newton_schulz="quintic")


def muon_update(newton_schulz="standard", row_normalize=False, shape=(16, 8)):
    p = torch.nn.Parameter(torch.zeros(*shape))
    p.grad = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * torch.arange(1, shape[0] + 1)[:, None]
    muon.Muon([p], lr=1.0, momentum=0.0, backend_steps=5, nesterov=False, row_normalize=row_normalize,
              newton_schulz=newton_schulz).step()
    return -p.detach(), p.grad


@pytest.mark.parametrize("newton_schulz", ["standard", "polar_express"])
def test_muon_row_normalisation_is_the_records(newton_schulz):
    update, grad = muon_update(newton_schulz, row_normalize=True)
    # record #1855 L1862-1865: rows divided by their fp32 norm, clamped at 1e-7, before Newton-Schulz
    rows = grad / grad.float().norm(dim=-1, keepdim=True).clamp_min(1e-7)
    expected = muon.zeropower_via_newtonschulz5(rows, coefficients=muon.NEWTON_SCHULZ[newton_schulz],
                                                records_form=newton_schulz == "polar_express").float()
    scale = max(1, 16 / 8) ** 0.5
    assert torch.allclose(update, expected * scale, atol=1e-2)
    assert not torch.allclose(update, muon_update(newton_schulz)[0], atol=1e-2)


def record_muon_steps(grads, lr, momentum, wd, coefficients):
    """The records' Muon step (#2135 L2034-2095, not distributed) on one matrix: the gradient rounded to bf16,
    bf16 momentum and Nesterov, rows normalised, Newton-Schulz, decay, then the update at lr × the shape scale."""
    p = torch.zeros(grads[0].shape)
    buf = torch.zeros(grads[0].shape, dtype=torch.bfloat16)
    scale = max(1, p.shape[0] / p.shape[1]) ** 0.5
    for grad in grads:
        g = grad.bfloat16()
        buf.mul_(momentum).add_(g)
        update = g.add(buf, alpha=momentum)
        update = update / update.float().norm(dim=-1, keepdim=True).clamp_min(1e-07).to(update.dtype)
        update = record_zeropower(update, coefficients, 5)
        p.mul_(1.0 - lr * wd)
        p.add_(update.to(p.dtype), alpha=-lr * scale)
    return p


def test_muon_momentum_in_bf16_is_the_records_bank_muon():
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(32, 8, generator=gen) * 1e-3 for _ in range(3)]  # the shape scale 2, as the MLP's fc
    coefficients = muon.NEWTON_SCHULZ["polar_express"]
    results = {}
    for bf16 in (True, False):
        p = torch.nn.Parameter(torch.zeros(32, 8))
        opt = muon.Muon([p], lr=0.02, momentum=0.95, backend_steps=5, weight_decay=0.095, row_normalize=True,
                        newton_schulz="polar_express", momentum_bf16=bf16)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[bf16] = p.detach()
    record = record_muon_steps(grads, 0.02, 0.95, 0.095, coefficients)
    assert torch.equal(results[True], record)
    assert not torch.allclose(results[False], record, rtol=0, atol=1e-5)


def tiny_model(tie=True):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                          tie_embeddings=tie))
    with torch.no_grad():  # no zero-initialised tensors: their decay would be invisible
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def decayed_fraction(model, opt_cfg):
    """One step on zero gradients: Adam(W)'s and Muon's updates vanish, so each tensor keeps (1 - lr·wd) of
    itself under decoupled weight decay and all of itself without. Returns {group: ratio after / before}."""
    optimizers = train.build_optimizers(model, opt_cfg, fused=False)
    groups = param_groups(model)
    before = {name: [p.detach().clone() for p in ps] for name, ps in groups.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()
    ratios = {}
    for name, ps in groups.items():
        if ps:
            num = sum(float((p.detach() * b).sum()) for p, b in zip(ps, before[name]))
            den = sum(float((b * b).sum()) for b in before[name])
            ratios[name] = num / den
    return optimizers, ratios


def test_weight_decay_of_each_group_lands_on_that_group():
    opt = copy.deepcopy(tiny_train_config()["optimizer"])
    opt.update(embed_weight_decay=0.5, scalar_weight_decay=0.25, muon_weight_decay=0.125)
    optimizers, ratios = decayed_fraction(tiny_model(tie=False), opt)
    assert ratios["embed"] == pytest.approx(1 - opt["embed_lr"] * 0.5)  # untied: embed_lr
    assert ratios["scalar"] == pytest.approx(1 - opt["scalar_lr"] * 0.25)
    assert ratios["matrix"] == pytest.approx(1 - opt["matrix_lr"] * 0.125)
    assert ratios["head"] == pytest.approx(1.0)  # the records' head has no weight decay
    assert [type(o).__name__ for o in optimizers] == ["AdamW", "Muon", "AdamW", "Adam"]
    _, tied = decayed_fraction(tiny_model(tie=True), opt)
    assert tied["embed"] == pytest.approx(1 - opt["tied_embed_lr"] * 0.5)


def test_without_weight_decay_the_optimizers_are_the_baselines():
    opt = tiny_train_config()["optimizer"]
    optimizers, ratios = decayed_fraction(tiny_model(tie=False), opt)
    assert [type(o) for o in optimizers] == [torch.optim.Adam, muon.Muon, torch.optim.Adam, torch.optim.Adam]
    assert all(r == 1.0 for r in ratios.values())
    assert optimizers[1].param_groups[0]["newton_schulz"] == "standard"


def schedule(**cfg):
    base = {"iterations": 100, "warmdown_iters": 0, "warmdown_frac": 0.0, "min_lr": 0.0, "max_seconds": 0,
            "gptq_reserve_seconds": 0}
    return {**base, **cfg}


def test_warmdown_frac_by_iterations_and_by_wallclock():
    cfg = schedule(warmdown_frac=0.25, warmdown_iters=10)  # the fraction wins over the iterations
    assert train.lr_multiplier(74, 0, cfg) == 1.0
    assert train.lr_multiplier(75, 0, cfg) == pytest.approx(1.0)
    assert train.lr_multiplier(80, 0, cfg) == pytest.approx(0.8)
    assert train.lr_multiplier(99, 0, cfg) == pytest.approx(0.04)
    wall = schedule(warmdown_frac=0.85, max_seconds=600, gptq_reserve_seconds=4, iterations=20000)
    budget_ms = 596_000  # the records' 600 s less the GPTQ reserve
    assert train.lr_multiplier(10, 0.10 * budget_ms, wall) == 1.0  # before 1 - 0.85
    assert train.lr_multiplier(10, 0.575 * budget_ms, wall) == pytest.approx(0.5)
    assert train.lr_multiplier(10, 0.99 * budget_ms, wall) == pytest.approx(0.01 / 0.85)


def test_min_lr_floors_the_warmdown_only():
    frac = schedule(warmdown_frac=0.5, min_lr=0.1)
    assert train.lr_multiplier(10, 0, frac) == 1.0
    assert train.lr_multiplier(75, 0, frac) == pytest.approx(0.5)
    assert train.lr_multiplier(96, 0, frac) == pytest.approx(0.1)  # (1 - 0.96) / 0.5 = 0.08, floored
    iters = schedule(warmdown_iters=20, min_lr=0.1)  # #2014 floors the iteration warmdown too
    assert train.lr_multiplier(90, 0, iters) == pytest.approx(0.5)
    assert train.lr_multiplier(99, 0, iters) == pytest.approx(0.1)
    wall = schedule(warmdown_iters=10, min_lr=0.2, max_seconds=10, iterations=10**6)
    assert train.lr_multiplier(99, 9900, wall) == pytest.approx(0.2)  # 100 ms/step: 0.1 left, floored


def test_without_frac_or_floor_the_warmdown_is_the_baselines():
    cfg = schedule(warmdown_iters=10)
    for step in range(85, 101):
        assert train.lr_multiplier(step, 0, cfg) == max((100 - step) / 10, 0.0) if step >= 90 else 1.0


def test_ema_update_is_the_records():
    model = torch.nn.Linear(7, 5)
    ema = techniques.EMA(model, decay=0.9965)
    reference = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema.update(model)
        for k, t in model.state_dict().items():  # record #1855 L3519-3521
            reference[k].mul_(0.9965).add_(t.detach(), alpha=1.0 - 0.9965)
    assert all(torch.equal(ema.shadow[k], reference[k]) for k in reference)


def _clip_worker(rank, world_size, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    params = _clip_params(rank)
    torch.nn.utils.clip_grad_norm_(params, 1.0)  # as Trainer.train_step with grad_clip_per_rank
    train.average_gradients(params, world_size)
    if rank == 0:
        torch.save([p.grad for p in params], out_file)
    dist.destroy_process_group()


def _clip_params(rank):
    torch.manual_seed(10 + rank)
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(5)),
              torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))]
    for p in params:
        p.grad = torch.randn_like(p) * (1 + 3 * rank)
    return params


def test_per_rank_clipping_averages_the_clipped_gradients(tmp_path):
    import torch.multiprocessing as mp
    out = tmp_path / "grads.pt"
    mp.spawn(_clip_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2)
    got = torch.load(out)
    clipped = []
    for rank in range(2):
        params = _clip_params(rank)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        clipped.append([p.grad for p in params])
    for g, a, b in zip(got, *clipped):
        assert torch.allclose(g, (a + b) / 2) and g.dtype == a.dtype
    averaged = [(p.grad + q.grad) / 2 for p, q in zip(_clip_params(0), _clip_params(1))]
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in averaged))
    assert norm > 1.0  # clipping the average instead would give another gradient
    assert not torch.allclose(got[0], averaged[0] / norm.float())


def train_key(change) -> str:
    cfg = default_config()
    change(cfg["defaults"]["train"])
    return caddie.plan(cfg)["arms"]["baseline"]["train"]


def test_the_train_key_holds_each_option_and_an_option_that_is_off_keys_as_off():
    base = train_key(lambda t: None)
    off = (lambda t: t["seq_growth"].update(rewarm_steps=32),
           lambda t: t["optimizer"].update(grad_clip_per_rank=True),  # no clip
           lambda t: (t["optimizer"].update(grad_clip_per_rank=True), t.update(nproc=1)))
    no_warmdown = train_key(lambda t: t.update(warmdown_iters=0))
    assert train_key(lambda t: t.update(warmdown_iters=0, min_lr=0.1)) == no_warmdown  # nothing to floor
    for change in off:
        assert train_key(change) == base
    frac = train_key(lambda t: t.update(warmdown_frac=0.85))
    assert frac != base and train_key(lambda t: t.update(warmdown_frac=0.85, warmdown_iters=7)) == frac
    on = (lambda t: t.update(min_lr=0.1), lambda t: t["optimizer"].update(newton_schulz="polar_express"),
          lambda t: t["optimizer"].update(embed_weight_decay=0.085),
          lambda t: t["optimizer"].update(scalar_weight_decay=0.02),
          lambda t: t["seq_growth"].update(lengths=[64], until=[0.5]),
          lambda t: (t["optimizer"].update(grad_clip_norm=0.3, grad_clip_per_rank=True), t.update(nproc=2)))
    keys = {train_key(change) for change in on}
    assert len(keys) == len(on) and base not in keys
    clipped = train_key(lambda t: (t["optimizer"].update(grad_clip_norm=0.3), t.update(nproc=2)))
    assert clipped not in keys


def test_schema_types_the_new_keys():
    cfg = default_config()
    caddie.validate(cfg)
    for path, value in ((("optimizer", "newton_schulz"), "quintic"), (("min_lr",), 2.0),
                        (("seq_growth", "rewarm_steps"), 1.5), (("optimizer", "grad_clip_per_rank"), 1),
                        (("warmdown_frac",), -0.1), (("optimizer", "embed_weight_decay"), -1.0)):
        bad = copy.deepcopy(cfg)
        section = bad["defaults"]["train"]
        for key in path[:-1]:
            section = section[key]
        section[path[-1]] = value
        with pytest.raises(caddie.ConfigError, match="defaults.train." + ".".join(path)):
            caddie.validate(bad)
    missing = copy.deepcopy(cfg)
    del missing["defaults"]["train"]["seq_growth"]
    with pytest.raises(caddie.ConfigError, match="seq_growth"):
        caddie.validate(missing)
