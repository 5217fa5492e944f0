"""Varlen attention over documents packed into one row (the records' DocumentPackingLoader + flash varlen), its
SDPA fallback, and training on packed rows."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_train_config
from stages import attention, loader, train
from stages.attention import causal_attention, document_segments, segment_starts
from stages.model import GPT, GPTConfig


def packed_row(lengths, seed=0, vocab=50):
    """Documents of the given lengths, each starting with BOS (1), one after the other."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.r_[1, rng.integers(2, vocab, n - 1)] for n in lengths])


def segment_mask(starts, n) -> torch.Tensor:
    """The reference: causal, and a query sees only keys of its own segment."""
    seg = np.searchsorted(starts, np.arange(n), side="right")
    same = torch.from_numpy(seg[:, None] == seg[None, :])
    return (same & torch.ones(n, n, dtype=torch.bool).tril())[None, None]


def test_segments_start_at_every_bos_and_every_max_len_tokens_of_a_document():
    row = packed_row([5, 9, 3, 20])  # documents at 0, 5, 14, 17
    assert segment_starts(row, max_len=8).tolist() == [0, 5, 13, 14, 17, 25, 33]
    assert segment_starts(row, max_len=64).tolist() == [0, 5, 14, 17]
    # A row that starts inside a document (the stream's span does not begin at a BOS): its head is a segment.
    assert segment_starts(row[3:], max_len=64).tolist() == [0, 2, 11, 14]


def test_the_records_cu_seqlens_come_padded_to_a_bucket_with_the_row_length():
    row = packed_row([5, 9, 3, 20])
    seg = document_segments(row, max_len=8, bucket=4)
    assert seg.cu_seqlens.dtype == torch.int32
    assert seg.cu_seqlens.tolist() == [0, 5, 13, 14, 17, 25, 33, 37, 37]
    assert seg.index.shape == (8, 8) and seg.back.shape == (len(row),)
    assert torch.equal(seg.index.flatten()[seg.back], torch.arange(len(row)))


@pytest.mark.parametrize("max_len", [8, 64])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_the_sdpa_fallback_is_attention_under_the_segment_mask(max_len, heads, kv_heads):
    row = packed_row([5, 9, 3, 20, 1, 12])
    n = len(row)
    torch.manual_seed(0)
    q = torch.randn(1, heads, n, 16, requires_grad=True)
    k = torch.randn(1, kv_heads, n, 16, requires_grad=True)
    v = torch.randn(1, kv_heads, n, 16, requires_grad=True)
    seg = document_segments(row, max_len)
    got = causal_attention(q, k, v, seg)
    want = causal_attention(q, k, v, segment_mask(segment_starts(row, max_len), n))
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-6)
    grads = torch.autograd.grad(got.square().sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, want_grads))


def test_padding_the_segment_count_to_a_bucket_changes_nothing():
    row = packed_row([7, 30, 2, 11])
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, len(row), 8) for _ in range(3))
    outs = [causal_attention(q, k, v, document_segments(row, 16, bucket=b)) for b in (1, 3, 64)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def tiny_model(**options) -> GPT:
    """Weights off the zero init (whose attention outputs are zero), so that attention shapes the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_a_packed_row_with_documents_shorter_than_max_len_scores_as_document_isolation():
    row = torch.from_numpy(packed_row([5, 9, 3, 20, 12]))[None]
    model = tiny_model(xsa_layers=2, smear_gate=True, rope_dims=8)
    isolated = model.forward_logits(row, doc_isolation=True)
    packed = model.forward_logits(row, segments=document_segments(row[0].numpy(), max_len=64))
    plain = model.forward_logits(row)
    assert torch.allclose(packed, isolated, atol=1e-5)
    assert not torch.allclose(packed, plain, atol=1e-3)  # the segments are seen


def test_cutting_a_long_document_at_max_len_hides_its_head_from_its_tail():
    row = torch.from_numpy(packed_row([40]))[None]
    model = tiny_model()
    cut = model.forward_logits(row, segments=document_segments(row[0].numpy(), max_len=16))
    # The tail (from token 32) scores as if it were a document of its own.
    alone = model.forward_logits(row[:, 32:], segments=document_segments(row[0, 32:].numpy(), max_len=16))
    assert torch.allclose(cut[:, 32:], alone, atol=1e-5)
    whole = model.forward_logits(row, segments=document_segments(row[0].numpy(), max_len=64))
    assert not torch.allclose(cut[:, 32:], whole[:, 32:], atol=1e-3)


def test_gradients_through_the_packed_row_reach_every_weight_as_under_document_isolation():
    row = torch.from_numpy(packed_row([5, 9, 3, 20, 12]))[None]
    grads = {}
    for name, kwargs in (("packed", {"segments": document_segments(row[0, :-1].numpy(), max_len=64)}),
                         ("isolated", {"doc_isolation": True})):
        model = tiny_model()
        model(row[:, :-1], row[:, 1:], **kwargs).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["packed"].values())
    assert all(torch.allclose(grads["packed"][n], grads["isolated"][n], atol=1e-5) for n in grads["packed"])


def test_flash_attn_absent_here_means_the_sdpa_path():
    # On CPU the fallback runs whatever is installed: flash-attn needs CUDA and half precision.
    q = torch.randn(1, 2, 10, 8)
    assert not attention.half_precision_cuda(q)


def packed_args(data, out, **overrides):
    config = {"train": tiny_train_config(doc_isolation=True, document_packing=True, **overrides),
              "curriculum": {"enabled": False, "buckets": 4, "floor": 0.02}}
    return ["--config", json.dumps(config), "--manifest", str(data["manifest"]), "--seed", "1",
            "--out-dir", str(out), "--resume-dir", str(out / "resume")]


def test_training_on_packed_documents_learns_and_differs_from_rows(tiny_data, tmp_path):
    train.main(packed_args(tiny_data, tmp_path / "packed"))
    curve = [json.loads(line)["loss"] for line in (tmp_path / "packed" / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1] < curve[0] - 1.0, curve
    config = {"train": tiny_train_config(doc_isolation=True), "curriculum": {"enabled": False, "buckets": 4,
                                                                             "floor": 0.02}}
    rows = tmp_path / "rows"
    train.main(["--config", json.dumps(config), "--manifest", str(tiny_data["manifest"]), "--seed", "1",
                "--out-dir", str(rows), "--resume-dir", str(rows / "resume")])
    rows_curve = [json.loads(line)["loss"] for line in (rows / "metrics.jsonl").read_text().splitlines()]
    assert rows_curve != curve


def test_a_packed_batch_is_each_ranks_contiguous_span_as_one_row(tiny_data):
    from stages.shards import manifest_shards
    vocab = json.loads(tiny_data["manifest"].read_text())["vocab_size"]
    paths = manifest_shards(tiny_data["manifest"], "train")
    spans = []
    for rank in range(2):
        batches = loader.Batches(loader.TokenStream(paths, vocab), None, None, 64, rank, 2, packed=True)
        x, y = batches.next(256, 0.0)
        assert x.shape == (1, 256) and torch.equal(x[0, 1:], y[0, :-1])
        spans.append(x[0])
    stream = loader.TokenStream(paths, vocab).take(2 * 257)
    assert torch.equal(spans[0], torch.from_numpy(stream[:256].astype(np.int64)))
    assert torch.equal(spans[1], torch.from_numpy(stream[257:513].astype(np.int64)))


def test_packing_refuses_the_curriculum_loader(tiny_data, tmp_path):
    config = {"train": tiny_train_config(doc_isolation=True, document_packing=True),
              "curriculum": {"enabled": True, "buckets": 4, "floor": 0.02}}
    args = ["--config", json.dumps(config), "--manifest", str(tiny_data["manifest"]), "--seed", "1",
            "--out-dir", str(tmp_path), "--resume-dir", str(tmp_path / "resume"),
            "--curriculum", str(tiny_data["buckets"]), "--curriculum-summary", str(tiny_data["buckets_summary"])]
    with pytest.raises(ValueError, match="train.document_packing"):
        train.main(args)


@pytest.mark.cuda
def test_flash_varlen_matches_the_sdpa_fallback_on_a_gpu():
    if attention.flash_attn_varlen_func is None or not torch.cuda.is_available():
        pytest.skip("needs CUDA and flash-attn (flash_attn_varlen_func)")
    row = packed_row([300, 900, 17, 2048, 600])
    seg = document_segments(row, 512).to("cuda")
    torch.manual_seed(0)
    q = torch.randn(1, 8, len(row), 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, len(row), 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flash = causal_attention(q, k, v, seg)
    fallback = attention.segment_attention(q.float(), k.float(), v.float(), seg)
    assert (flash.float() - fallback).abs().max() < 2e-2
