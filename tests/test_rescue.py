import json

import numpy as np
import pytest
import torch

from conftest import tiny_quantize_config
from files import change_byte, flip_mantissa_bit, save_checkpoint, summary_of
from stages import io, pack, quantize, rescue
from stages.shards import load_tokens, manifest_shards
from test_quantize import SHARD_STRIDE, synthetic_train_set

TARGETS = ["attn.c_q", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"]


def rescue_config(lcq=True, calibrate=False) -> dict:
    return {"lcq": {"enabled": lcq, "rank": 4, "targets": TARGETS, "factor_bits": 6, "steps": 40, "lr": 3e-3,
                    "temperature": 1.0},
            "calibrate": {"enabled": calibrate, "iterations": 30, "lr": 1e-2},
            "data": {"batches": 4, "batch_seqs": 8, "seq_len": 64, "holdout_batches": 2}, "device": "cpu"}


@pytest.fixture(scope="module")
def quantized(tiny_checkpoint, tiny_data, tmp_path_factory):
    """4-bit artifacts (damage to rescue), without and with LQER factors of their own."""
    out = tmp_path_factory.mktemp("quantize")
    for name, lqer in (("plain", {"rank": 0, "top_k": 3, "factor_bits": 4, "asym_group": 0}),
                       ("lqer", {"rank": 2, "top_k": 3, "factor_bits": 4, "asym_group": 0})):
        quantize.run(tiny_quantize_config(bits=4, lqer=lqer), tiny_checkpoint, summary_of(tiny_checkpoint),
                     tiny_data["manifest"], 1, out / f"{name}.bin", out / f"{name}.json")
    return out


def run(cfg, quantized, teacher, tiny_data, tmp_path, source="plain", summary=None):
    return rescue.run(cfg, quantized / f"{source}.bin", summary or quantized / f"{source}.json", teacher,
                      summary_of(teacher), tiny_data["manifest"], 1, tmp_path / "rescued.bin",
                      tmp_path / "rescued.json")


def entries_of(path):
    return pack.unpack_tensors(pack.decompress(path.read_bytes()))[1]


def factor_bytes(e) -> int:
    return sum(e[f].nbytes for f in ("lqer_a", "lqer_a_scale", "lqer_b", "lqer_b_scale") if f in e)


def check_lora_round_trips(summary, before_path, after_path) -> int:
    """Trained tensors carry prior + new rank in their decoded LQER fields and decode to new weights; the
    others are unchanged. Returns the stored bytes the factors added."""
    before = {e["name"]: e for e in entries_of(before_path)}
    trained = {t["name"]: t for t in summary["trained"]["lcq"]["tensors"]}
    assert trained and all(any(t in n for t in TARGETS) for n in trained) and "tok_emb.weight" not in trained
    added = 0
    for e in entries_of(after_path):
        old = before[e["name"]]
        if e["name"] in trained:
            rank = old.get("lqer_rank", 0) + 4
            assert e["lqer_rank"] == trained[e["name"]]["lqer_rank"] == rank and e["lqer_bits"] == 6
            assert pack.codes(e, "lqer_a").shape == (e["shape"][0], rank)
            assert pack.codes(e, "lqer_b").shape == (rank, e["shape"][1])
            assert not torch.equal(pack.reconstruct(e), pack.reconstruct(old))
            added += factor_bytes(e) - factor_bytes(old)
        elif e["kind"] == "rows":
            assert torch.equal(pack.reconstruct(e), pack.reconstruct(old)), e["name"]
    return added


def test_lcq_stores_its_lora_in_the_artifact_and_lowers_kl(quantized, tiny_checkpoint, tiny_data, tmp_path):
    s = run(rescue_config(), quantized, tiny_checkpoint, tiny_data, tmp_path)
    assert s["device"] == "cpu"
    assert s["kl_after"] < 0.9 * s["kl_before"] and s["trained"]["lcq"]["last_kl"] < s["trained"]["lcq"]["first_kl"]
    added = check_lora_round_trips(s, quantized / "plain.bin", tmp_path / "rescued.bin")
    assert s["lora_bytes"] == s["model_bytes"] - s["model_bytes_before"] > 0
    assert 0.5 * added < s["lora_bytes"] < 1.2 * added  # the factors, compressed, are what the bytes grew by
    assert s["model_bytes"] == (tmp_path / "rescued.bin").stat().st_size
    assert s["artifact_sha256"] == io.sha256_file(tmp_path / "rescued.bin")
    assert s["cap_bytes"] == 16_000_000 and "total_bytes" not in s  # the code is counted with the export's
    x = torch.arange(32)[None] % 500
    old, new = pack.load_model(quantized / "plain.bin"), pack.load_model(tmp_path / "rescued.bin")
    assert not torch.allclose(old.forward_logits(x), new.forward_logits(x))
    assert json.loads((tmp_path / "rescued.json").read_text())["kl_after"] == s["kl_after"]


def test_calibration_refits_only_control_tensors_and_lowers_kl(quantized, tiny_checkpoint, tiny_data, tmp_path):
    s = run(rescue_config(lcq=False, calibrate=True), quantized, tiny_checkpoint, tiny_data, tmp_path)
    assert s["kl_after"] < s["kl_before"] and "lcq" not in s["trained"]
    assert "blocks.0.attn_scale" in s["trained"]["calibrate"]["tensors"]
    changed = set()
    for a, b in zip(entries_of(quantized / "plain.bin"), entries_of(tmp_path / "rescued.bin")):
        assert a["name"] == b["name"] and a["kind"] == b["kind"]
        if a["kind"] == "rows":
            assert np.array_equal(pack.codes(a, "data"), pack.codes(b, "data")) and "lqer_a" not in b
        elif not np.array_equal(a["data"], b["data"]):
            assert b["data"].dtype == a["data"].dtype
            changed.add(a["name"])
    assert changed and changed <= set(s["trained"]["calibrate"]["tensors"])


def test_both_fits_extend_existing_lqer_factors(quantized, tiny_checkpoint, tiny_data, tmp_path):
    s = run(rescue_config(calibrate=True), quantized, tiny_checkpoint, tiny_data, tmp_path, "lqer")
    assert list(s["trained"]) == ["lcq", "calibrate"] and s["kl_after"] < 0.9 * s["kl_before"]
    check_lora_round_trips(s, quantized / "lqer.bin", tmp_path / "rescued.bin")
    assert any(t["prior_lqer_rank"] == 2 for t in s["trained"]["lcq"]["tensors"])
    before = {e["name"]: e for e in entries_of(quantized / "lqer.bin")}
    assert any(not np.array_equal(e["data"], before[e["name"]]["data"])
               for e in entries_of(tmp_path / "rescued.bin") if e["name"] in s["trained"]["calibrate"]["tensors"])


def test_neither_fit_enabled_refuses_to_run(quantized, tiny_checkpoint, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="neither rescue.lcq nor rescue.calibrate is enabled"):
        run(rescue_config(lcq=False), quantized, tiny_checkpoint, tiny_data, tmp_path)


def test_over_the_cap_fails_and_writes_nothing(quantized, tiny_checkpoint, tiny_data, tmp_path):
    cfg = rescue_config()
    cfg["lcq"]["steps"] = 2
    qsum = json.loads((quantized / "plain.json").read_text())
    qsum["cap_bytes"] = qsum["model_bytes"] + 100  # less headroom than the factors take
    (tmp_path / "tight.json").write_text(json.dumps(qsum))
    with pytest.raises(quantize.QuantizationError, match=r"rescue: the rescued model alone is .* over quantize.cap_bytes"):
        run(cfg, quantized, tiny_checkpoint, tiny_data, tmp_path, summary=tmp_path / "tight.json")
    assert not (tmp_path / "rescued.bin").exists() and not (tmp_path / "rescued.json").exists()


def test_batches_are_train_tokens_only_and_held_out_differs(tiny_data):
    data = rescue_config()["data"]
    fit, holdout = rescue.train_batches(tiny_data["manifest"], data, seed=1)
    assert len(fit) == 4 and len(holdout) == 2 and fit[0].shape == (8, 64)
    train = load_tokens(manifest_shards(tiny_data["manifest"], "train")).tobytes()
    assert all(np.asarray(row, dtype=np.uint16).tobytes() in train for b in fit + holdout for row in b)
    assert not any(torch.equal(f, h) for f in fit for h in holdout)


def poisoned_distill(monkeypatch):
    """distill as it is, then one trained parameter set to NaN: a fit that diverged."""
    distill = rescue.distill

    def diverged(student, teacher, params, *args):
        fit = distill(student, teacher, params, *args)
        with torch.no_grad():
            params[-1].view(-1)[0] = float("nan")
        return fit
    monkeypatch.setattr(rescue, "distill", diverged)


@pytest.mark.parametrize("lcq, calibrate, what", [(True, False, r"rescue.lcq: the LoRA of blocks\.\d\.\S+\.weight"),
                                                  (False, True, r"rescue.calibrate: the refitted \S+")])
def test_a_fit_that_diverged_is_refused_and_writes_nothing(quantized, tiny_checkpoint, tiny_data, tmp_path,
                                                          monkeypatch, lcq, calibrate, what):
    poisoned_distill(monkeypatch)
    with pytest.raises(quantize.QuantizationError, match=what + r" has 1 non-finite value"):
        run(rescue_config(lcq, calibrate), quantized, tiny_checkpoint, tiny_data, tmp_path)
    assert not (tmp_path / "rescued.bin").exists() and not (tmp_path / "rescued.json").exists()


def test_a_changed_artifact_is_refused_naming_it(quantized, tiny_checkpoint, tiny_data, tmp_path):
    artifact = tmp_path / "q" / "plain.bin"
    artifact.parent.mkdir()
    artifact.write_bytes((quantized / "plain.bin").read_bytes())
    change_byte(artifact, 1000)
    with pytest.raises(io.IntegrityError, match=r"q/plain.bin: sha256 .* recorded in .*plain.json"):
        rescue.run(rescue_config(), artifact, quantized / "plain.json", tiny_checkpoint, summary_of(tiny_checkpoint),
                   tiny_data["manifest"], 1, tmp_path / "rescued.bin", tmp_path / "rescued.json")


def test_a_changed_teacher_is_refused_naming_it(quantized, tiny_checkpoint, tiny_data, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    teacher = save_checkpoint(tmp_path / "train", ckpt["state_dict"], ckpt["model_config"])
    flip_mantissa_bit(teacher, ckpt["state_dict"]["blocks.0.attn.proj.weight"])
    with pytest.raises(io.IntegrityError, match=r"train/model.pt: sha256 .* recorded in .*train/summary.json"):
        run(rescue_config(), quantized, teacher, tiny_data, tmp_path)


def test_batches_lie_inside_one_shard_and_a_split_too_short_names_the_key(tmp_path):
    data = {**rescue_config()["data"], "seq_len": 100}
    fit, holdout = rescue.train_batches(synthetic_train_set(tmp_path / "ok", [3000, 70, 5000]), data, seed=1)
    rows = torch.cat(fit + holdout)
    assert rows.shape == (6 * 8, 100) and (rows.diff(dim=1) == 1).all()  # none crosses into the next shard
    assert set((rows[:, 0] // SHARD_STRIDE).tolist()) <= {0, 2}
    with pytest.raises(ValueError, match=r"none of its 1 train shards \(the longest has 99 tokens\) can fill one "
                                         r"100-token window \(rescue.data.seq_len\)"):
        rescue.train_batches(synthetic_train_set(tmp_path / "short", [99]), data, seed=1)


def test_auto_device_without_cuda_is_the_cpu_and_cuda_requested_is_an_error_naming_the_key(
        quantized, tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = rescue_config()
    cfg["lcq"]["steps"] = 2
    assert run({**cfg, "device": "auto"}, quantized, tiny_checkpoint, tiny_data, tmp_path)["device"] == "cpu"
    (tmp_path / "rescued.bin").unlink()
    with pytest.raises(RuntimeError, match=r"rescue.device: cuda requested but no CUDA device is available"):
        run({**cfg, "device": "cuda"}, quantized, tiny_checkpoint, tiny_data, tmp_path)
    assert not (tmp_path / "rescued.bin").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_both_fits_on_cuda_record_it_and_lower_kl(quantized, tiny_checkpoint, tiny_data, tmp_path):
    s = run({**rescue_config(calibrate=True), "device": "cuda"}, quantized, tiny_checkpoint, tiny_data, tmp_path)
    assert s["device"] == "cuda" and s["kl_after"] < 0.9 * s["kl_before"]
    check_lora_round_trips(s, quantized / "plain.bin", tmp_path / "rescued.bin")


def test_an_asymmetric_lqer_correction_is_read_and_replaced_as_stored():
    """The records' asymmetric LQER (A int2 + one scale, B int4 per group): rescue reads it as pack decodes it,
    and rewriting the correction drops the asymmetric form, so the new factors decode as written."""
    from stages import lqer, pack
    torch.manual_seed(0)
    error = torch.randn(32, 64) * 0.01
    entry = {"shape": [32, 64], **lqer.correction_fields(error, rank=4, factor_bits=4, asym_group=64)}
    assert entry["lqer_form"] == "asym"
    stored = lqer.correction(pack.codes(entry, "lqer_a"), pack.codes(entry, "lqer_b"), entry)
    assert torch.equal(rescue.existing_correction(entry), stored)
    new = torch.randn(32, 64) * 0.01
    rescue.store_correction(entry, new, rank=4, bits=6)
    assert "lqer_form" not in entry and "lqer_group" not in entry
    got = rescue.existing_correction(entry)
    assert (got - new).norm() < (stored - new).norm()
