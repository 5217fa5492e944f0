import pytest
import torch

from conftest import default_config
from stages import gptq, rowquant
from stages.model import GPT, GPTConfig


def correlated_inputs(n=2048, dim=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim ** 0.5 + torch.eye(dim)
    scales = torch.logspace(-1, 1, dim)  # features of very different energy, as real activations
    return (torch.randn(n, dim, generator=g) * scales) @ mixing


def output_error(w, w_hat, x):
    return float(((w - w_hat) @ x.T).pow(2).sum())


SIGMAS = default_config()["defaults"]["quantize"]["clip_sigmas"]


@pytest.mark.parametrize("bits", [8, 6, 4, 3])
@pytest.mark.parametrize("group", sorted(SIGMAS))
def test_gptq_output_error_is_below_round_to_nearest(bits, group):
    x = correlated_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(bits)) * 0.05
    qmax = rowquant.qmax_of(bits)
    scale = rowquant.sdclip_scale(w, SIGMAS[group], qmax)
    rtn = rowquant.dequantize_rows(rowquant.round_to_nearest(w, scale, qmax), scale)
    q = gptq.gptq_quantize(w, x.T @ x, scale, qmax, block_size=32)
    assert q.dtype == torch.int8 and q.abs().max() <= qmax
    assert output_error(w, rowquant.dequantize_rows(q, scale), x) < output_error(w, rtn, x)


def test_act_order_and_blocks_do_not_break_the_result():
    x, w = correlated_inputs(dim=64), torch.randn(32, 64) * 0.05
    scale = rowquant.percentile_scale(w, 100.0, 31)
    errors = [output_error(w, rowquant.dequantize_rows(gptq.gptq_quantize(w, x.T @ x, scale, 31, b, 0.01, a), scale), x)
              for b in (1, 16, 128) for a in (True, False)]
    rtn = output_error(w, rowquant.dequantize_rows(rowquant.round_to_nearest(w, scale, 31), scale), x)
    assert max(errors) < rtn


def test_dead_input_columns_are_zeroed_without_nans():
    x, w = correlated_inputs(dim=32), torch.randn(8, 32)
    x[:, 5] = 0
    scale = rowquant.percentile_scale(w, 100.0, 31)
    q = gptq.gptq_quantize(w, x.T @ x, scale, 31)
    assert (q[:, 5] == 0).all() and not torch.isnan(q.float()).any()


def test_clip_search_never_increases_the_hessian_weighted_error():
    x, w = correlated_inputs(dim=64), torch.randn(16, 64) * 0.05
    w[:, 3] *= 8  # an outlier column
    diag = torch.diag(x.T @ x)
    base = rowquant.percentile_scale(w, 100.0, 7)
    searched = rowquant.searched_scale(w, diag, base, 7)

    def weighted(s):
        return (((w - rowquant.dequantize_rows(rowquant.round_to_nearest(w, s, 7), s)) ** 2) * diag).sum(1)

    assert (weighted(searched) <= weighted(base) + 1e-9).all()
    assert (searched != base).any()


@pytest.mark.parametrize("tied", [True, False])
def test_hessian_hooks_see_every_quantized_layer(tied):
    model = GPT(GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1,
                          tie_embeddings=tied))
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    hessians = gptq.collect_hessians(model, batches, torch.device("cpu"))
    matrices = {n for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 2}
    if not tied:
        matrices.remove("tok_emb.weight")  # an untied embedding is a lookup: no input Hessian
    assert set(hessians) == matrices  # every block linear, and the head (tok_emb when tied)
    for name, h in hessians.items():
        cols = model.state_dict()[name].shape[1]
        assert h.shape == (cols, cols) and torch.allclose(h, h.T, atol=1e-3)
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def per_linear_hessians(model, batches, device) -> dict:
    """The reference: one hook and one XᵀX per quantizable weight, whatever input it shares."""
    hessians, hooks = {}, []

    def accumulate(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].size(-1))
            hessians[name] = x.T @ x if name not in hessians else hessians[name].add_(x.T @ x)
        return hook

    for name, module in gptq.hessian_targets(model).items():
        hooks.append(module.register_forward_hook(accumulate(name)))
    with torch.no_grad():
        for x in batches:
            model.forward_logits(x.to(device))
    for h in hooks:
        h.remove()
    return hessians


def counting_hooks(monkeypatch) -> list:
    """The modules forward hooks are registered on, from now on."""
    registered, register = [], torch.nn.Module.register_forward_hook

    def counted(module, hook, **kwargs):
        registered.append(module)
        return register(module, hook, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", counted)
    return registered


ARCHITECTURES = {"baseline": {}, "untied": {"tie_embeddings": False}, "low-rank q": {"q_rank": 8},
                 "parallel lanes": {"parallel_from": 1}, "recurrence": {"recur_layers": [1, 2], "recur_loops": 2},
                 "xsa": {"xsa_layers": 2}}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_q_k_v_share_one_hessian_equal_to_the_per_linear_one_with_fewer_accumulations(arch, monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1,
                          **ARCHITECTURES[arch])).eval()
    with torch.no_grad():  # the zero-initialised projections would leave later inputs all alike
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    reference = per_linear_hessians(model, batches, torch.device("cpu"))
    registered = counting_hooks(monkeypatch)
    shared = gptq.collect_hessians(model, batches, torch.device("cpu"))
    assert list(shared) == list(reference)  # the same weights, in the model's order
    for name in reference:
        assert torch.equal(shared[name], reference[name]), name  # bit for bit: GPTQ's codes cannot change
    q = "c_q.down" if arch == "low-rank q" else "c_q"
    for i in range(3):
        qkv = [shared[f"blocks.{i}.attn.{m}.weight"] for m in (q, "c_k", "c_v")]
        assert qkv[0] is qkv[1] is qkv[2]
    assert len(registered) == len({id(h) for h in shared.values()}) == len(reference) - 2 * 3
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hessians_collected_on_cuda_match_the_cpu_ones_and_come_back_on_the_cpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1)).eval()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    on_cpu = gptq.collect_hessians(model, batches, torch.device("cpu"))
    on_cuda = gptq.collect_hessians(model.to("cuda"), batches, torch.device("cuda"))
    assert list(on_cuda) == list(on_cpu)
    for name, h in on_cuda.items():
        assert h.device.type == "cpu" and torch.allclose(h, on_cpu[name], rtol=1e-4, atol=1e-4 * h.abs().max())
