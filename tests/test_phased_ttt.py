"""Phased TTT (stages.phased_ttt), the n-gram tilt (stages.ngram_tilt) and the eval's seconds split."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from files import save_checkpoint, summary_of
from stages import evaluate, ngram_tilt, phased_ttt
from test_evaluate import CPU, PHASED, TILT, eval_config, losses_of, tiny_model


def documents(n, seed, every=23):
    tokens = np.random.default_rng(seed).integers(2, 64, n)
    tokens[::every] = 1
    return tokens


def phased_config(tilt=None, **phased):
    cfg = eval_config("phased")
    cfg["ttt"]["phased"] = {**PHASED, **phased}
    if tilt is not None:
        cfg["ngram_tilt"] = tilt
    return cfg


# ---- the n-gram hints ----

def reference_hints(tokens, order, threshold):
    """The records' online_ngram_state.c token path, one target at a time with exact contexts: its state is seeded
    with the first target, then each target is looked up (hint = the context's top token, share = top / total)
    and counted (the top replaced only on a strictly larger count)."""
    targets = [int(t) for t in tokens[1:]]
    ring, table, hints = [targets[0]], {}, np.full(len(tokens), -1)
    context = order - 1
    for i, tok in enumerate(targets):
        if len(ring) >= context:
            key = tuple(ring[len(ring) - context:])
            entry = table.get(key)
            if entry is not None and np.float32(entry["top_count"]) / np.float32(entry["total"]) >= np.float32(threshold):
                hints[i + 1] = entry["top"]
            entry = table.setdefault(key, {"counts": {}, "total": 0, "top_count": 0, "top": tok})
            entry["counts"][tok] = entry["counts"].get(tok, 0) + 1
            entry["total"] += 1
            if entry["counts"][tok] > entry["top_count"]:
                entry["top_count"], entry["top"] = entry["counts"][tok], tok
        ring.append(tok)
    return hints


@pytest.mark.parametrize("order, threshold, vocab", [(2, 0.5, 4), (3, 0.3, 6), (4, 0.8, 3), (16, 0.8, 3)])
def test_hints_are_the_records_online_ngram(order, threshold, vocab):
    tokens = np.random.default_rng(order).integers(0, vocab, 3000)
    tokens[1000:1400] = np.tile([0, 1, 2], 134)[:400]  # a run where the long contexts repeat
    got = ngram_tilt.token_hints(tokens, order, threshold)
    expected = reference_hints(tokens, order, threshold)
    assert (expected >= 0).sum() > 50  # hints fire
    np.testing.assert_array_equal(got, expected)


def test_a_hint_depends_only_on_the_targets_before_it():
    tokens = np.random.default_rng(0).integers(0, 5, 2000)
    hints = ngram_tilt.token_hints(tokens, 3, 0.4)
    for p in (10, 500, 1500):
        changed = tokens.copy()
        changed[p:] = (changed[p:] + 1) % 5
        assert np.array_equal(ngram_tilt.token_hints(changed, 3, 0.4)[:p + 1], hints[:p + 1])


def test_the_tilt_is_the_records_closed_form():
    """-log p'(y) = -log p(y) - boost [y == h] + log1p(p(h) (e^boost - 1)) where a hint is gated, else unchanged."""
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(50, 64, generator=gen), torch.randint(0, 64, (50,), generator=gen)
    hints = torch.randint(-1, 64, (60,), generator=gen)
    hints[11:20] = targets[1:10]  # hits (position 10 + j predicts targets[j])
    positions = torch.arange(50) + 10
    tilt = ngram_tilt.NgramTilt(hints, 1.7)
    got = F.cross_entropy(tilt(logits, positions), targets, reduction="none")
    ptl = F.cross_entropy(logits, targets, reduction="none")
    h = hints[positions]
    q = torch.softmax(logits, -1).gather(1, h.clamp(min=0)[:, None])[:, 0]
    closed = ptl - 1.7 * (targets == h) + torch.log1p(q * math.expm1(1.7))
    expected = torch.where(h >= 0, closed, ptl)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (h >= 0).any() and (targets == h).any()


def test_a_bad_order_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"evaluate\.ngram_tilt\.order: 70"):
        ngram_tilt.build_tilt(np.arange(10), {"ngram_tilt": {**TILT, "order": 70}}, CPU)


@pytest.mark.parametrize("mode, method", [("standard", "sgd"), ("sliding", "sgd"), ("ttt", "sgd")])
def test_the_tilt_changes_the_score_first_scores_of_every_mode(mode, method):
    model, tokens = tiny_model(), np.tile(np.random.default_rng(4).integers(2, 64, 20), 10)
    plain = eval_config(method)
    tilted = {**plain, "ngram_tilt": TILT}
    a, b = losses_of(model, tokens, mode, plain), losses_of(model, tokens, mode, tilted)
    assert np.nansum(b) < np.nansum(a)  # a repeating text: the hints are right
    changed = tokens.copy()
    changed[120:] = 5
    np.testing.assert_array_equal(losses_of(model, changed, mode, tilted)[1:120], b[1:120])


def test_the_tilt_and_lora_ttt_is_an_error_naming_the_key():
    cfg = {**eval_config("lora"), "ngram_tilt": TILT}
    with pytest.raises(ValueError, match=r"evaluate\.ngram_tilt: not available with ttt\.method lora"):
        losses_of(tiny_model(), documents(100, 0), "ttt", cfg)


# ---- phased TTT ----

def test_phase_bounds_cut_the_prefix_as_the_records():
    assert phased_ttt.phase_bounds(50000, 2500, 1) == [0, 2500, 50000]
    assert phased_ttt.phase_bounds(50000, 2000, 3) == [0, 666, 1333, 2000, 50000]
    assert phased_ttt.phase_bounds(10, 0, 2) == [0, 10]
    assert phased_ttt.phase_bounds(3, 8, 2) == [0, 3]


def test_short_documents_get_their_chunks():
    spans = np.array([[0, 100], [100, 400], [400, 3400], [3400, 5400]])
    chunks = phased_ttt.document_chunks(spans, 48, [[2000, 24], [256, 8]])
    assert chunks.tolist() == [8, 24, 48, 24]


def test_without_learning_phased_is_the_plain_per_document_score():
    model, tokens = tiny_model(), documents(200, 2)
    cfg = phased_config(prefix_docs=0)
    cfg["ttt"]["lora"] = {**cfg["ttt"]["lora"], "steps": 0}
    del cfg["ngram_tilt"]
    lora = eval_config("lora", lora={"steps": 0})
    np.testing.assert_array_equal(losses_of(model, tokens, "ttt", cfg)[1:], losses_of(model, tokens, "ttt", lora)[1:])


def test_each_piece_changes_the_score_and_the_model_is_left_untouched():
    model, tokens = tiny_model(), documents(300, 5)
    weights = copy.deepcopy(model.state_dict())
    full = phased_config()
    variants = {"no tilt": phased_config(tilt={**TILT, "enabled": False}), "no prefix": phased_config(prefix_docs=0),
                "one phase": phased_config(phases=1), "no_qv": phased_config(sites=["k", "o", "mlp", "head"]),
                "short docs": phased_config(short_docs=[[30, 4]])}
    reference = losses_of(model, tokens, "ttt", full)
    for name, cfg in variants.items():
        assert np.nansum(losses_of(model, tokens, "ttt", cfg)) != pytest.approx(np.nansum(reference), rel=1e-7), name
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_short_document_chunks_stay_score_first_when_the_documents_stay():
    """Short-document chunking reads each document's length (where its next BOS is), as the records do: changing
    tokens from p on, BOS kept where they are, leaves every score before p unchanged."""
    model, tokens = tiny_model(), documents(200, 2)
    cfg = phased_config(short_docs=[[30, 4]])
    before = losses_of(model, tokens, "ttt", cfg)
    for p in (37, 100):
        changed = tokens.copy()
        keep = changed[p:] == 1
        changed[p:] = np.where(keep, 1, np.random.default_rng(3).integers(2, 64, len(tokens) - p))
        after = losses_of(model, changed, "ttt", cfg)
        assert np.array_equal(before[1:p], after[1:p]) and not np.array_equal(before[p:], after[p:])


def test_phased_ttt_learns_repeating_documents():
    """The same document 12 times: global SGD on the first 6 and per-document LoRA score the rest better than the
    plain per-document score."""
    model, doc = tiny_model(), np.r_[1, np.random.default_rng(6).integers(2, 64, 47)]
    tokens = np.tile(doc, 12)
    plain = phased_config(tilt={**TILT, "enabled": False}, prefix_docs=0)
    plain["ttt"]["lora"] = {**plain["ttt"]["lora"], "steps": 0}
    learning = phased_config(tilt={**TILT, "enabled": False}, prefix_docs=6, phases=2)
    learning["ttt"] = {**learning["ttt"], "lr": 0.3, "epochs": 3}
    a, b = losses_of(model, tokens, "ttt", plain), losses_of(model, tokens, "ttt", learning)
    later = slice(6 * 48 + 1, None)
    assert np.nansum(b[later]) < 0.8 * np.nansum(a[later])
    np.testing.assert_array_equal(a[1:9], b[1:9])  # the first chunk: the same model, the adapters not trained yet


def test_head_and_o_sites_move_the_logits_of_a_trained_adapter():
    model = tiny_model()
    adapters = phased_ttt.SiteLoRA(model, ["o", "mlp", "head"], rank=2, alpha=4.0, device=CPU)
    adapted = phased_ttt.AdaptedModel(model, adapters)
    idx = torch.randint(2, 64, (3, 16))
    params = adapters.reset(3)
    torch.testing.assert_close(adapted.forward_logits(idx), model.forward_logits(idx), rtol=0, atol=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
    assert not torch.allclose(adapted.forward_logits(idx), model.forward_logits(idx))
    assert len(adapters.a["o"]) == len(model.layer_order()) and len(adapters.a["head"]) == 1
    adapters.remove()


@pytest.mark.parametrize("change, message", [
    ({"ogd": {"enabled": True, "lr": 0.1}}, r"evaluate\.ogd\.enabled"),
    ({"phased": {"sites": ["q", "x"]}}, r"evaluate\.ttt\.phased\.sites"),
    ({"phased": {"short_docs": [[10, 64]]}}, r"short_docs: a chunk of 64 exceeds seq_len 32"),
])
def test_phased_config_errors_name_the_key(change, message):
    cfg = phased_config(**change.get("phased", {}))
    if "ogd" in change:
        cfg["ogd"] = change["ogd"]
    with pytest.raises(ValueError, match=message):
        losses_of(tiny_model(), documents(100, 0), "ttt", cfg)


# ---- the seconds split ----

def test_the_result_splits_its_seconds_and_sums_them(tiny_data, tmp_path):
    vocab = json.loads(tiny_data["manifest"].read_text())["vocab_size"]
    model = tiny_model(vocab=vocab)
    ckpt = save_checkpoint(tmp_path / "train", model.state_dict(), model.config.to_dict())
    cfg = {**eval_config(seq_len=64, stride=16, batch_seqs=16), "ngram_tilt": TILT}
    result = evaluate.run(cfg, "sliding", ckpt, summary_of(ckpt), tiny_data["manifest"], tmp_path / "out.json")
    split = result["seconds_split"]
    assert list(split) == ["deserialize", "compile_warmup", "precompute", "scoring"]
    assert split["scoring"] > 0 and split["deserialize"] > 0 and split["precompute"] > 0
    assert result["seconds"] == pytest.approx(sum(split.values()), abs=0.01)
    plain = evaluate.run(eval_config(seq_len=64, stride=16, batch_seqs=16), "sliding", ckpt, summary_of(ckpt),
                         tiny_data["manifest"], tmp_path / "plain.json")
    assert plain["tokens"] == result["tokens"] and plain["val_bpb"] != result["val_bpb"]


def test_the_trained_copy_is_fp32_from_half_precision_and_stays_float64():
    from stages.ttt import trainable_copy
    model = tiny_model()
    assert {p.dtype for p in trainable_copy(model.bfloat16()).parameters()} == {torch.float32}
    doubled = trainable_copy(model.double())
    assert {p.dtype for p in doubled.parameters()} == {torch.float64} and doubled is not model


def test_the_fixed_a_is_the_same_draw_in_a_float64_run():
    model = tiny_model()
    a32 = phased_ttt.SiteLoRA(model, ["q", "mlp"], rank=2, alpha=4.0, device=CPU)
    a32.remove()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        a64 = phased_ttt.SiteLoRA(model.double(), ["q", "mlp"], rank=2, alpha=4.0, device=CPU)
        a64.remove()
    finally:
        torch.set_default_dtype(previous)
    for site in ("q", "mlp"):
        for x, y in zip(a32.a0[site], a64.a0[site]):
            assert x.dtype == torch.float32 and y.dtype == torch.float64 and torch.equal(x.double(), y)
