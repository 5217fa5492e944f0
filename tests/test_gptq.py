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
