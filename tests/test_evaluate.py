import copy
import itertools
import json
import math
import shutil

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from files import change_byte, flip_mantissa_bit, save_checkpoint, summary_of
from stages import bpb, evaluate, ngram_tilt, scoring, ttt
from stages.io import IntegrityError, sha256_file
from stages.model import GPT, GPTConfig
from stages.shards import read_shard, write_shard


@pytest.mark.parametrize("n, seq_len, stride", list(itertools.product(
    [2, 3, 17, 64, 65, 100, 1000], [1, 4, 16, 64], [1, 3, 4, 16, 64])))
def test_every_target_is_scored_exactly_once(n, seq_len, stride):
    if stride > seq_len:
        with pytest.raises(ValueError, match="evaluate.stride"):
            scoring.scoring_windows(n, seq_len, stride)
        return
    counts = np.zeros(n, dtype=int)
    for start, end, first in scoring.scoring_windows(n, seq_len, stride):
        assert 0 <= start < end <= n - 1 and end - start <= seq_len
        assert start < first <= end  # the scored targets lie inside the window
        counts[first:end + 1] += 1
        # every scored target sees at least seq_len - stride tokens, or all tokens before it
        assert first - start >= min(seq_len - stride + 1, first)
    assert counts[0] == 0 and (counts[1:] == 1).all()


def tiny_model(vocab=64, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    with torch.no_grad():  # zero-initialised projections would make every position predict the same
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def flat_tables(vocab):
    return bpb.ByteTables(np.ones(vocab, dtype=np.int16), np.zeros(vocab, bool), np.zeros(vocab, bool))


LORA = {"rank": 4, "targets": ["attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"], "chunk_tokens": 8,
        "steps": 1, "lr": 0.05, "weight_decay": 0.0, "batch_docs": 3}


# Phased TTT (stages.phased_ttt): two global SGD passes, after the first 2 and 4 documents (of ~9), in chunks
# of 32 targets (one sequence), the n-gram tilt on.
PHASED = {"phases": 2, "prefix_docs": 4, "sites": ["q", "k", "v", "o", "mlp", "head"], "alpha": 8.0,
          "betas": [0.0, 0.99], "eps": 1e-10, "short_docs": []}
TILT = {"enabled": True, "order": 3, "threshold": 0.3, "boost": 1.5}


def eval_config(method="sgd", lora=None, **overrides):
    cfg = {"seq_len": 32, "stride": 8, "batch_seqs": 8, "device": "cpu", "doc_isolation": False,
           "ttt": {"method": method, "chunk_tokens": 32 if method == "phased" else 64, "epochs": 1, "lr": 0.01,
                   "momentum": 0.9, "grad_clip": 1.0, "batch_seqs": 4, "lora": {**LORA, **(lora or {})},
                   "phased": PHASED},
           "ogd": {"enabled": False, "lr": 0.5}, "budget_seconds": 0, "point": "prequant"}
    if method == "phased":
        cfg["ngram_tilt"] = TILT
    cfg.update(overrides)
    return cfg


CPU = torch.device("cpu")


def test_standard_score_equals_direct_cross_entropy():
    model, tokens = tiny_model(), np.random.default_rng(0).integers(0, 64, 301)
    got = evaluate.score(model, tokens, flat_tables(64), eval_config(seq_len=50, batch_seqs=4), "standard", CPU)
    expected = 0.0
    for s in range(0, 300, 50):
        x = torch.tensor(tokens[s:s + 50])[None]
        y = torch.tensor(tokens[s + 1:s + 51])[None]
        expected += F.cross_entropy(model.forward_logits(x)[0], y[0], reduction="sum").item()
    assert got["tokens"] == 300 and got["bytes"] == 300
    assert got["loss_sum"] == pytest.approx(expected, rel=1e-5)


def test_sliding_with_stride_equal_to_seq_len_is_standard_and_batching_changes_nothing():
    model, tokens = tiny_model(), np.random.default_rng(1).integers(0, 64, 257)
    tables = flat_tables(64)
    a = evaluate.score(model, tokens, tables, eval_config(stride=32), "sliding", CPU)
    b = evaluate.score(model, tokens, tables, eval_config(stride=32, batch_seqs=3), "sliding", CPU)
    s = evaluate.score(model, tokens, tables, eval_config(), "standard", CPU)
    assert a["loss_sum"] == pytest.approx(b["loss_sum"], rel=1e-6) == pytest.approx(s["loss_sum"], rel=1e-6)
    c = evaluate.score(model, tokens, tables, eval_config(stride=8), "sliding", CPU)
    assert c["tokens"] == a["tokens"] == 256
    assert c["loss_sum"] != pytest.approx(a["loss_sum"], rel=1e-9)  # contexts differ, so losses do


MODES = [("standard", "sgd", False), ("sliding", "sgd", False), ("ttt", "sgd", False), ("sliding", "sgd", True),
         ("ttt", "sgd", True), ("ttt", "lora", False), ("ttt", "lora", True), ("ttt", "phased", False)]


def losses_of(model, tokens, mode, cfg):
    """evaluate.token_losses with the n-gram tilt the config asks for, built as evaluate.run builds it."""
    return evaluate.token_losses(model, tokens, mode, cfg, CPU, tilt=ngram_tilt.build_tilt(tokens, cfg, CPU))


@pytest.mark.parametrize("mode, method, ogd", MODES,
                         ids=[f"{m}{'' if t == 'sgd' else '-' + t}{'+ogd' if o else ''}" for m, t, o in MODES])
@pytest.mark.parametrize("p", [1, 37, 100, 150])
def test_scores_before_p_do_not_depend_on_tokens_from_p_on(mode, method, ogd, p):
    """Score first: changing tokens at positions >= p leaves the losses of targets < p unchanged, and
    every target is scored exactly once."""
    model = tiny_model()
    tokens = np.random.default_rng(2).integers(2, 64, 200)
    tokens[::23] = 1  # documents
    cfg = eval_config(method, ogd={"enabled": ogd, "lr": 0.5}, doc_isolation=mode == "ttt")
    before = losses_of(model, tokens, mode, cfg)
    changed = tokens.copy()
    changed[p:] = np.random.default_rng(3).integers(2, 64, len(tokens) - p)
    after = losses_of(model, changed, mode, cfg)
    assert np.isnan(before[0]) and not np.isnan(before[1:]).any()  # all 199 targets, once each
    assert np.array_equal(before[1:p], after[1:p])
    assert not np.array_equal(before[p:], after[p:])


def test_ttt_and_ogd_change_the_scores_and_leave_the_model_untouched():
    model, tokens = tiny_model(), np.random.default_rng(4).integers(2, 64, 400)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    sliding = evaluate.score(model, tokens, flat_tables(64), eval_config(), "sliding", CPU)
    ttt = evaluate.score(model, tokens, flat_tables(64), eval_config(), "ttt", CPU)
    ogd = evaluate.score(model, tokens, flat_tables(64), eval_config(ogd={"enabled": True, "lr": 0.5}),
                         "sliding", CPU)
    assert ttt["tokens"] == ogd["tokens"] == sliding["tokens"] == 399
    assert ttt["loss_sum"] != pytest.approx(sliding["loss_sum"], rel=1e-6)
    assert ogd["loss_sum"] != pytest.approx(sliding["loss_sum"], rel=1e-6)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_ttt_learns_a_repeating_text():
    model, block = tiny_model(), np.random.default_rng(5).integers(2, 64, 50)
    tokens = np.tile(block, 12)
    cfg = eval_config(ttt={"method": "sgd", "chunk_tokens": 100, "epochs": 4, "lr": 0.2, "momentum": 0.9,
                           "grad_clip": 1.0, "batch_seqs": 4})
    sliding = evaluate.score(model, tokens, flat_tables(64), cfg, "sliding", CPU)
    ttt = evaluate.score(model, tokens, flat_tables(64), cfg, "ttt", CPU)
    assert ttt["loss_sum"] < 0.7 * sliding["loss_sum"]  # measured: 0.60



def test_a_ttt_step_is_the_step_on_the_mean_loss_of_its_sequences():
    """Whatever the pieces a step's sequences are cut into (scoring.PIECES), the step is the plain SGD step on
    the mean loss of all their targets."""
    model, tokens = tiny_model().float().train(), np.random.default_rng(9).integers(2, 64, 200)
    reference = copy.deepcopy(model)
    cfg = eval_config(ttt={"method": "sgd", "chunk_tokens": 64, "epochs": 2, "lr": 0.1, "momentum": 0.9,
                           "grad_clip": 1.0, "batch_seqs": 4})
    lo, hi = 10, 150  # sequences start at 10, 42, 74, 106, 138: steps of 4 and of 1 sequence
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ttt.train_on_scored(model, torch.from_numpy(tokens), lo, hi, cfg, 0.1, optimizer, scoring.ONE)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for starts in ([10, 42, 74, 106], [138]):
            spans = [(s, min(s + 32, hi)) for s in starts]
            loss = sum(F.cross_entropy(reference.forward_logits(torch.tensor(tokens[a:b])[None])[0],
                                       torch.tensor(tokens[a + 1:b + 1]), reduction="sum") for a, b in spans)
            optimizer.zero_grad()
            (loss / sum(b - a for a, b in spans)).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            optimizer.step()
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_target_scored_twice_is_an_error_even_within_one_call():
    losses = np.full(5, np.nan)
    with pytest.raises(AssertionError, match="a target was scored twice"):
        scoring.record_losses(losses, torch.tensor([1, 2, 2]), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    scoring.record_losses(losses, torch.tensor([1, 2]), torch.tensor([0.1, 0.2], dtype=torch.float64))
    with pytest.raises(AssertionError, match="a target was scored twice"):
        scoring.record_losses(losses, torch.tensor([3, 2]), torch.tensor([0.1, 0.2], dtype=torch.float64))

def with_bos(n, bos_at, seed=6):
    tokens = np.random.default_rng(seed).integers(2, 64, n)
    tokens[list(bos_at)] = 1
    return tokens


# A prefix before the first BOS, a 1-token document (BOS, BOS), a document longer than seq_len (32), a
# 2-token one, and a stream that ends with a BOS (predicted, but starting no scored document).
LAYOUT = with_bos(300, [5, 6, 40, 41, 150, 160, 162, 299])


@pytest.mark.parametrize("bos_at", [[], [0], [0, 1, 2], [3, 4, 5, 99], [0, 60], [98, 99], list(range(0, 100, 7))])
@pytest.mark.parametrize("seq_len, chunk", [(32, 8), (16, 16), (8, 3), (1, 1)])
def test_lora_documents_and_chunks_score_every_target_once(bos_at, seq_len, chunk):
    tokens = with_bos(100, bos_at)
    counts = np.zeros(len(tokens), dtype=int)
    for start, end in ttt.document_spans(tokens):
        assert tokens[start] == 1 or start == 0
        assert not (tokens[start + 1:end - 1] == 1).any()  # no BOS inside; the last token may be the next BOS
        for w_start, w_end, first in ttt.chunk_windows(start, end, seq_len, chunk):
            assert start <= w_start < first <= w_end < end and w_end - w_start <= seq_len
            assert w_end - first < chunk
            counts[first:w_end + 1] += 1
    assert counts[0] == 0 and (counts[1:] == 1).all()


def test_lora_scores_every_target_once_end_to_end():
    for tokens in (LAYOUT, with_bos(50, []), with_bos(50, [49]), with_bos(2, [1])):
        losses = evaluate.token_losses(tiny_model(), tokens, "ttt", eval_config("lora"), CPU)
        assert np.isnan(losses[0]) and not np.isnan(losses[1:]).any()


def plain_document_scores(model, tokens, seq_len, chunk):
    """The model's loss of each target, its context the last seq_len tokens of its own document before the
    last target of its chunk, computed one chunk at a time."""
    losses = np.full(len(tokens), np.nan)
    starts = [0] + [i for i in range(1, len(tokens)) if tokens[i] == 1]
    for k, start in enumerate(starts):
        last_target = starts[k + 1] if k + 1 < len(starts) else len(tokens) - 1
        for first in range(start + 1, last_target + 1, chunk):
            last = min(first + chunk - 1, last_target)
            lo = max(start, last - seq_len)
            with torch.no_grad():
                logits = model.forward_logits(torch.tensor(tokens[lo:last])[None])[0]
            loss = F.cross_entropy(logits, torch.tensor(tokens[lo + 1:last + 1]), reduction="none")
            losses[first:last + 1] = loss[first - lo - 1:].numpy()
    return losses


@pytest.mark.parametrize("no_learning", [{"lr": 0.0}, {"steps": 0}])
def test_lora_without_learning_is_the_plain_per_document_score(no_learning):
    model = tiny_model()
    got = evaluate.token_losses(model, LAYOUT, "ttt", eval_config("lora", no_learning), CPU)
    expected = plain_document_scores(model, LAYOUT, 32, LORA["chunk_tokens"])
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-5, atol=1e-6)
    learned = evaluate.token_losses(model, LAYOUT, "ttt", eval_config("lora"), CPU)
    assert not np.allclose(learned[1:], expected[1:], rtol=1e-3)  # while with lr > 0 the LoRA changes them


def test_lora_resets_per_document():
    """A document's losses do not depend on the other documents: not on their tokens, not on the batch
    it shares with them, and equal those of the document evaluated on its own."""
    model, (start, end) = tiny_model(), (41, 151)  # the long document and the BOS after it
    cfg = eval_config("lora")
    base = evaluate.token_losses(model, LAYOUT, "ttt", cfg, CPU)[start + 1:end]
    others = LAYOUT.copy()
    outside = np.r_[0:start, end:len(LAYOUT)]
    others[outside] = np.where(LAYOUT[outside] == 1, 1, (LAYOUT[outside] * 7 + 3) % 62 + 2)
    assert np.array_equal(evaluate.token_losses(model, others, "ttt", cfg, CPU)[start + 1:end], base)
    for batch_docs in (1, 2, 64):
        batched = eval_config("lora", {"batch_docs": batch_docs})
        np.testing.assert_allclose(evaluate.token_losses(model, LAYOUT, "ttt", batched, CPU)[start + 1:end],
                                   base, rtol=1e-5)
    alone = evaluate.token_losses(model, LAYOUT[start:end], "ttt", cfg, CPU)[1:]
    np.testing.assert_allclose(alone, base, rtol=1e-5)


def test_lora_learns_repeating_documents():
    model, rng = tiny_model(), np.random.default_rng(7)
    tokens = np.concatenate([np.r_[1, np.tile(rng.integers(2, 64, 20), 10)] for _ in range(4)])
    plain = evaluate.score(model, tokens, flat_tables(64), eval_config("lora", {"lr": 0.0}), "ttt", CPU)
    lora = evaluate.score(model, tokens, flat_tables(64), eval_config("lora"), "ttt", CPU)
    assert lora["tokens"] == plain["tokens"] == len(tokens) - 1
    assert lora["loss_sum"] < 0.75 * plain["loss_sum"]  # measured: 0.66


def test_lora_leaves_the_model_untouched():
    model = tiny_model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.tensor(LAYOUT[:40])[None]
    before = model.forward_logits(x)
    evaluate.token_losses(model, LAYOUT, "ttt", eval_config("lora"), CPU)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())
    assert torch.equal(model.forward_logits(x), before)


def test_lora_config_errors_name_the_key():
    tokens = with_bos(100, [0, 50])
    with pytest.raises(ValueError, match=r"evaluate\.ttt\.lora\.chunk_tokens"):
        evaluate.token_losses(tiny_model(), tokens, "ttt", eval_config("lora", {"chunk_tokens": 33}), CPU)
    with pytest.raises(ValueError, match=r"evaluate\.ttt\.lora\.targets"):
        evaluate.token_losses(tiny_model(), tokens, "ttt", eval_config("lora", {"targets": ["attn.c_z"]}), CPU)


def saved_model(tiny_data, folder, poison=None):
    """A random model of the tiny data's vocabulary saved as a train stage would (model.pt + summary)."""
    model = tiny_model(vocab=json.loads(tiny_data["manifest"].read_text())["vocab_size"])
    state = model.state_dict()
    if poison:
        poison(state)
    return save_checkpoint(folder, state, model.config.to_dict())


def test_run_writes_the_result_json(tiny_data, tmp_path):
    manifest = json.loads(tiny_data["manifest"].read_text())
    ckpt = saved_model(tiny_data, tmp_path / "train")
    cfg = eval_config(seq_len=64, stride=16, batch_seqs=16)
    out = tmp_path / "sliding.json"
    result = evaluate.run(cfg, "sliding", ckpt, summary_of(ckpt), tiny_data["manifest"], out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens"] == manifest["tokens"]["val"] - 1
    assert result["raw_bytes"] == manifest["val_raw_bytes"]
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["dir"] / "tokenizer.model"))
    from stages.shards import load_tokens, manifest_shards
    val = load_tokens(manifest_shards(tiny_data["manifest"], "val"))
    assert result["bytes"] == bpb.stream_bytes(bpb.build_byte_tables(sp), val)
    assert result["val_bpb"] == pytest.approx(
        result["loss_nats"] * result["tokens"] / (math.log(2) * result["bytes"]))
    for key in ("point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb", "seconds"):
        assert key in result
    assert result["warnings"] == [] and result["model_sha256"] == sha256_file(ckpt)


def nan_weight(state):
    state["blocks.0.mlp.fc.weight"][0, 0] = math.nan


@pytest.mark.parametrize("mode, method", [("standard", "sgd"), ("sliding", "sgd"), ("ttt", "sgd"), ("ttt", "lora")])
def test_non_finite_losses_are_an_error_not_never_scored_targets(mode, method):
    model = tiny_model()
    nan_weight(model.state_dict())  # its tensors share the parameters' storage
    with pytest.raises(FloatingPointError, match=r"the model's loss of val target 1 is nan"):
        evaluate.score(model, with_bos(100, [0, 50]), flat_tables(64), eval_config(method), mode, CPU)


def test_a_model_with_non_finite_losses_is_named(tiny_data, tmp_path):
    ckpt = saved_model(tiny_data, tmp_path / "train", nan_weight)
    with pytest.raises(FloatingPointError, match=rf"{ckpt} \(standard eval\): the model's loss of val target \d+ "
                                                 r"is nan: it produces non-finite outputs"):
        evaluate.run(eval_config(seq_len=64, stride=16), "standard", ckpt, summary_of(ckpt), tiny_data["manifest"],
                     tmp_path / "standard.json")
    assert not (tmp_path / "standard.json").exists()


def copied_data(tiny_data, folder):
    shutil.copytree(tiny_data["dir"], folder)
    return folder / "manifest.json"


def test_a_seq_len_beyond_the_val_split_is_a_warning_in_the_log_and_the_result(tiny_data, tmp_path, capsys):
    manifest_path = copied_data(tiny_data, tmp_path / "data")
    manifest = json.loads(manifest_path.read_text())
    val = next(s for s in manifest["shards"] if s["split"] == "val")
    write_shard(manifest_path.parent / val["name"], read_shard(manifest_path.parent / val["name"])[:40])
    val.update(tokens=40, sha256=sha256_file(manifest_path.parent / val["name"]))
    manifest["shards"] = [s for s in manifest["shards"] if s["split"] != "val" or s is val]
    manifest_path.write_text(json.dumps(manifest))
    ckpt = saved_model(tiny_data, tmp_path / "train")
    result = evaluate.run(eval_config(seq_len=64, stride=16), "sliding", ckpt, summary_of(ckpt), manifest_path,
                          tmp_path / "sliding.json")
    assert result["tokens"] == 39
    warning = "evaluate.seq_len = 64 exceeds the val split's 40 tokens: no window is full"
    assert len(result["warnings"]) == 1 and result["warnings"][0].startswith(warning)
    assert warning in capsys.readouterr().err


def test_a_changed_checkpoint_is_refused_naming_it(tiny_data, tmp_path):
    ckpt = saved_model(tiny_data, tmp_path / "train")
    flip_mantissa_bit(ckpt, torch.load(ckpt, weights_only=True)["state_dict"]["blocks.1.attn.c_v.weight"])
    with pytest.raises(IntegrityError, match=r"train/model.pt: sha256 .* recorded in .*train/summary.json"):
        evaluate.run(eval_config(seq_len=64), "standard", ckpt, summary_of(ckpt), tiny_data["manifest"],
                     tmp_path / "standard.json")


def test_a_tokenizer_that_is_not_the_manifest_s_is_refused_naming_it(tiny_data, tmp_path):
    manifest_path = copied_data(tiny_data, tmp_path / "data")
    change_byte(manifest_path.parent / "tokenizer.model", 100)
    ckpt = saved_model(tiny_data, tmp_path / "train")
    with pytest.raises(IntegrityError, match=r"data/tokenizer.model: sha256 .* recorded in .*data/manifest.json"):
        evaluate.run(eval_config(seq_len=64), "standard", ckpt, summary_of(ckpt), manifest_path,
                     tmp_path / "standard.json")


def test_the_model_summary_must_record_the_field_of_its_point(tiny_data, tmp_path):
    ckpt = saved_model(tiny_data, tmp_path / "train")
    with pytest.raises(IntegrityError, match=r"summary.json: no 'artifact_sha256' recorded"):
        evaluate.run(eval_config(seq_len=64, point="quant"), "standard", ckpt, summary_of(ckpt),
                     tiny_data["manifest"], tmp_path / "standard.json")


def test_progress_is_printed_per_chunk_and_does_not_change_the_scores(tiny_data, tiny_checkpoint, capsys, monkeypatch):
    from stages.model import load_checkpoint
    from stages.shards import load_tokens, manifest_shards
    model = load_checkpoint(tiny_checkpoint)
    val = load_tokens(manifest_shards(tiny_data["manifest"], "val"))
    cfg = {"seq_len": 64, "stride": 16, "batch_seqs": 4, "doc_isolation": False,
           "ogd": {"enabled": False, "lr": 0.5}}
    monkeypatch.setattr(scoring, "PROGRESS_SECONDS", math.inf)  # only the final line
    whole = evaluate.token_losses(model, val, "sliding", cfg, torch.device("cpu"))
    monkeypatch.setattr(evaluate, "PROGRESS_BATCHES", 3)
    monkeypatch.setattr(scoring, "PROGRESS_SECONDS", 0.0)
    paced = evaluate.token_losses(model, val, "sliding", cfg, torch.device("cpu"))
    assert np.array_equal(whole, paced, equal_nan=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluate sliding:")]
    windows = len(scoring.scoring_windows(len(val), 64, 16))
    chunks = -(-windows // 12)
    assert len(lines) == chunks + 1 and lines[-1].startswith(f"evaluate sliding: {chunks}/{chunks} chunks")
