import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_lrzip, tiny_quantize_config
from files import flip_mantissa_bit, save_checkpoint, summary_of
from stages import io, pack, quantize, rowquant
from stages.model import load_checkpoint
from stages.shards import shard_name, write_shard
from test_gptq import per_linear_hessians


def run(cfg, ckpt, data, tmp_path, name="artifact"):
    return quantize.run(cfg, ckpt, summary_of(ckpt), data["manifest"], 1, tmp_path / f"{name}.bin",
                        tmp_path / f"{name}.json")


def altered_checkpoint(tiny_checkpoint, folder, name, change):
    """A copy of the tiny checkpoint, recorded by its own train summary, with `change(weight)` applied to one
    tensor in place."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    with torch.no_grad():
        change(ckpt["state_dict"][name])
    return save_checkpoint(folder, ckpt["state_dict"], ckpt["model_config"])


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_round_to_nearest_codes_stay_in_range_within_half_a_step(bits):
    w = torch.randn(32, 256)
    qmax = rowquant.qmax_of(bits)
    scale = rowquant.percentile_scale(w, 100.0, qmax)
    q = rowquant.round_to_nearest(w, scale, qmax)
    assert q.dtype == torch.int8 and q.abs().max() <= qmax and scale.dtype == torch.float16
    err = (rowquant.dequantize_rows(q, scale) - w).abs().max(dim=1).values
    assert (err <= scale.float() * 0.51 + 1e-3).all()


def test_percentile_clip_ignores_outliers_and_sdclip_follows_the_row_spread():
    w = torch.randn(4, 1000)
    w[:, 0] = 100.0
    assert (rowquant.percentile_scale(w, 99.0, 127).float() * 127 < 10).all()
    s = rowquant.sdclip_scale(torch.randn(3, 4096) * torch.tensor([[1.0], [2.0], [4.0]]), 12.0, 31).float()
    assert s[1] / s[0] == pytest.approx(2, rel=0.1) and s[2] / s[0] == pytest.approx(4, rel=0.1)


@pytest.mark.parametrize("compressor", [pytest.param(c, marks=needs_lrzip) if c == "pergroup" else c
                                        for c in sorted(pack.COMPRESSORS)] + ["auto"])
def test_artifact_round_trip_gives_a_working_model(tiny_checkpoint, tiny_data, tmp_path, compressor):
    container = "bytes" if compressor == "pergroup" else "packed"  # pergroup groups one-byte codes
    summary = run(tiny_quantize_config(compressor=compressor, code_container=container), tiny_checkpoint, tiny_data,
                  tmp_path)
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    loaded = pack.load_model(tmp_path / "artifact.bin")
    for name, w in loaded.state_dict().items():
        assert (w - ckpt["state_dict"][name]).norm() <= 0.02 * ckpt["state_dict"][name].norm() + 1e-6, name
    assert summary["model_bytes"] == (tmp_path / "artifact.bin").stat().st_size
    assert summary["artifact_sha256"] == io.sha256_file(tmp_path / "artifact.bin")
    assert "pruned_for_code" not in summary  # the code is counted where the export is (stages/codesize.py)
    assert summary["calibration_loss"] < summary["uniform_loss"] - 1
    if compressor == "auto":
        assert summary["model_bytes"] == min(summary["compressed_sizes"].values())
    kinds = {t["name"]: t["kind"] for t in summary["tensors"]}
    assert kinds["tok_emb.weight"] == "rows" and kinds["blocks.0.attn.q_gain"] == "float"


@pytest.mark.parametrize("container, shuffle", [("packed", False), ("bytes", False), ("packed", True)])
def test_packed_artifact_round_trips_bit_exactly(tiny_checkpoint, container, shuffle):
    cfg = tiny_quantize_config(bits=6, code_container=container, byte_shuffle=shuffle, compressor="zstd",
                               lqer={"rank": 2, "top_k": 2, "factor_bits": 4, "asym_group": 0})
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    entries = [quantize.quantize_tensor(n, w, cfg)[0] for n, w in state.items()]
    assert len(quantize.add_lqer(entries, state, cfg["lqer"])) == 2
    blob, _ = quantize.serialize(entries, {"vocab_size": 512}, cfg)
    _, back = pack.unpack_tensors(pack.decompress(blob))
    for a, b in zip(entries, back):
        assert a["name"] == b["name"] and b.get("container", container) == container
        if a["kind"] == "rows":
            for field in ("data", "lqer_a", "lqer_b"):
                if field in a:
                    assert np.array_equal(pack.codes(a, field), pack.codes(b, field)), (a["name"], field)
            assert np.array_equal(a["scale"], b["scale"])
            assert torch.equal(pack.reconstruct(a), pack.reconstruct(b))
        else:
            assert np.array_equal(a["data"], b["data"])
    rows = [b for b in back if b["kind"] == "rows"]
    if container == "packed":
        assert all(b["data"].nbytes == -(-np.prod(b["shape"]) * 6 // 8) for b in rows)
    else:
        assert all(b["data"].nbytes == np.prod(b["shape"]) for b in rows)


def test_lqer_lowers_the_error_of_the_corrected_tensors_and_costs_bytes(tiny_checkpoint, tiny_data, tmp_path):
    plain = run(tiny_quantize_config(bits=4), tiny_checkpoint, tiny_data, tmp_path, "plain")
    lqer = run(tiny_quantize_config(bits=4, lqer={"rank": 4, "top_k": 3, "factor_bits": 4, "asym_group": 0}),
               tiny_checkpoint, tiny_data, tmp_path, "lqer")
    assert len(lqer["lqer_tensors"]) == 3 and plain["lqer_tensors"] == []
    before = {t["name"]: t["rel_error"] for t in plain["tensors"]}
    for t in lqer["tensors"]:
        if t["name"] in lqer["lqer_tensors"]:
            assert t["rel_error"] < before[t["name"]]
    assert lqer["model_bytes"] > plain["model_bytes"]


def test_size_target_prunes_least_important_codes_to_fit(tiny_checkpoint, tiny_data, tmp_path):
    sdclip = {"bits": 6, "clip": "sdclip"}  # coarse steps, as the records use: many ±1 codes
    free = run(tiny_quantize_config(**sdclip, size_target={"enabled": True, "bytes": None}),
               tiny_checkpoint, tiny_data, tmp_path, "free")
    assert free["size_target"]["pruned_codes"] == 0  # already under the cap: nothing given up
    code = free["pruned_for_code"]["bytes"]
    assert code == len(open(tiny_quantize_config()["code_file"], "rb").read())
    target = free["model_bytes"] + code - 2000
    tight = run(tiny_quantize_config(**sdclip, size_target={"enabled": True, "bytes": target}),
                tiny_checkpoint, tiny_data, tmp_path, "tight")
    assert tight["model_bytes"] + code <= target < free["model_bytes"] + code
    assert 0 < tight["size_target"]["pruned_codes"] < tight["size_target"]["candidates"]
    assert tight["max_rel_error"] > free["max_rel_error"]
    with pytest.raises(quantize.QuantizationError, match="quantize.size_target: even zeroing all"):
        run(tiny_quantize_config(**sdclip, size_target={"enabled": True, "bytes": code + 500}),
            tiny_checkpoint, tiny_data, tmp_path, "impossible")


def test_fewer_bits_cost_fewer_bytes_and_more_error(tiny_checkpoint, tiny_data, tmp_path):
    s8 = run(tiny_quantize_config(), tiny_checkpoint, tiny_data, tmp_path, "a8")
    s4 = run(tiny_quantize_config(bits=4), tiny_checkpoint, tiny_data, tmp_path, "a4")
    assert s4["model_bytes"] < s8["model_bytes"]
    assert s4["max_rel_error"] > s8["max_rel_error"] > 0


def test_embedding_gets_its_own_bits(tiny_checkpoint, tiny_data, tmp_path):
    s = run(tiny_quantize_config(bits=5, embed_bits=8), tiny_checkpoint, tiny_data, tmp_path)
    bits = {t["name"]: t["bits"] for t in s["tensors"] if t["kind"] == "rows"}
    assert bits.pop("tok_emb.weight") == 8 and set(bits.values()) == {5}


def test_over_the_cap_fails_loudly_and_keeps_the_previous_artifact(tiny_checkpoint, tiny_data, tmp_path):
    run(tiny_quantize_config(), tiny_checkpoint, tiny_data, tmp_path)
    good = (tmp_path / "artifact.bin").read_bytes()
    with pytest.raises(quantize.QuantizationError, match=r"model alone is [\d,]+ bytes, over quantize.cap_bytes = 1,000"):
        run(tiny_quantize_config(cap_bytes=1000, bits=6), tiny_checkpoint, tiny_data, tmp_path)
    assert (tmp_path / "artifact.bin").read_bytes() == good
    assert json.loads((tmp_path / "artifact.json").read_text())["bits"] == 8


def test_guard_fires_on_a_broken_quantizer(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    # A quantizer whose scales are far too large rounds every weight to 0: a uniform predictor.
    monkeypatch.setattr(rowquant, "percentile_scale", lambda w, p, qmax: torch.full((w.size(0),), 1e4).half())
    with pytest.raises(quantize.QuantizationError, match="not 0.1 below ln\\(vocab\\) = .*: the quantizer destroyed"):
        run(tiny_quantize_config(max_rel_error=10.0), tiny_checkpoint, tiny_data, tmp_path)
    assert not (tmp_path / "artifact.bin").exists()


def test_guard_fires_on_a_tensor_error_above_the_bound(tiny_checkpoint, tiny_data, tmp_path):
    with pytest.raises(quantize.QuantizationError, match="quantize.max_rel_error = 0.001"):
        run(tiny_quantize_config(bits=3, max_rel_error=0.001), tiny_checkpoint, tiny_data, tmp_path)


def test_a_missing_code_file_under_a_size_target_is_named(tiny_checkpoint, tiny_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="quantize.code_file: nope.py is not a file"):
        run(tiny_quantize_config(code_file="nope.py", size_target={"enabled": True, "bytes": None}), tiny_checkpoint,
            tiny_data, tmp_path)


def test_without_a_size_target_the_code_file_is_not_read(tiny_checkpoint, tiny_data, tmp_path):
    assert run(tiny_quantize_config(code_file="nope.py"), tiny_checkpoint, tiny_data, tmp_path)["model_bytes"] > 0


def test_calibration_is_train_tokens_or_self_generated(tiny_checkpoint, tiny_data):
    cal = tiny_quantize_config()["calibration"]
    from stages.shards import load_tokens, manifest_shards
    train = load_tokens(manifest_shards(tiny_data["manifest"], "train")).tobytes()
    batches = quantize.train_calibration(tiny_data["manifest"], cal, seed=1)
    assert len(batches) == 2 and batches[0].shape == (8, 64)
    assert all(np.asarray(row, dtype=np.uint16).tobytes() in train for row in batches[0])
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    model = quantize.GPT(quantize.GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    generated = quantize.generated_calibration(model.eval(), {**cal, "seq_len": 16}, seed=1)
    assert generated[0].shape == (8, 16) and (generated[0][:, 0] == 1).all()


def test_not_an_artifact_is_named(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(pack.ArtifactError, match="x.bin"):
        pack.load_artifact(bad)


@pytest.mark.parametrize("form", ["sparse24", "codebook", "freeze_dry", "mixed_rows"])
def test_each_storage_form_changes_the_artifact_and_round_trips(tiny_checkpoint, tiny_data, tmp_path, form):
    dense = run(tiny_quantize_config(bits=4), tiny_checkpoint, tiny_data, tmp_path, "dense")
    cfg = tiny_quantize_config(bits=4, storage={"form": form, "freeze_dry": {"tau": 1.0, "min_fraction": 0.0},
                                                "mixed_rows": {"high_bits": 8, "high_fraction": 0.25}})
    other = run(cfg, tiny_checkpoint, tiny_data, tmp_path, form)  # tau 1: trained columns are barely predictable
    kinds = {t["name"]: t["kind"] for t in other["tensors"]}
    assert kinds["blocks.0.mlp.fc.weight"] == form and kinds["tok_emb.weight"] == "rows"
    assert (tmp_path / f"{form}.bin").read_bytes() != (tmp_path / "dense.bin").read_bytes()
    assert other["model_bytes"] != dense["model_bytes"]
    loaded = pack.load_model(tmp_path / f"{form}.bin")
    _, entries = pack.unpack_tensors(pack.decompress((tmp_path / f"{form}.bin").read_bytes()))
    for entry in entries:
        assert torch.equal(loaded.state_dict()[entry["name"]], pack.reconstruct(entry))
    if form == "freeze_dry":
        assert any(e.get("dropped", 0) > 0 for e in entries)
    if form == "mixed_rows":
        bits = [t["bits"] for t in other["tensors"] if t["kind"] == "mixed_rows"]
        assert all(4 < b < 8 for b in bits)  # a mix of 4- and 8-bit rows


def test_a_size_target_below_the_counted_code_names_the_key_its_value_and_the_code(tiny_checkpoint, tiny_data,
                                                                                 tmp_path):
    code = len(open(tiny_quantize_config()["code_file"], "rb").read())
    with pytest.raises(quantize.QuantizationError,
                       match=rf"quantize.size_target.bytes = 1,000 leaves no room for the model: the counted code "
                             rf"alone is {code:,} bytes"):
        run(tiny_quantize_config(size_target={"enabled": True, "bytes": 1000}), tiny_checkpoint, tiny_data, tmp_path)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tiny_checkpoint, tiny_data, tmp_path,
                                                                          value):
    def poison(w):
        w[3, 5] = value
    ckpt = altered_checkpoint(tiny_checkpoint, tmp_path / "train", "blocks.1.mlp.fc.weight", poison)
    with pytest.raises(quantize.QuantizationError, match=r"model.pt: blocks.1.mlp.fc.weight has 1 non-finite"):
        run(tiny_quantize_config(), ckpt, tiny_data, tmp_path)
    assert not (tmp_path / "artifact.bin").exists()


def test_a_row_scale_that_overflows_fp16_is_refused_naming_the_tensor_and_value(tiny_checkpoint, tiny_data,
                                                                               tmp_path):
    def huge(w):
        w[2, 7] = 2e7  # 2e7 / 127 > 65504, the largest fp16
    ckpt = altered_checkpoint(tiny_checkpoint, tmp_path / "train", "blocks.0.attn.c_q.weight", huge)
    with pytest.raises(quantize.QuantizationError,
                       match=r"blocks.0.attn.c_q.weight row 2: \|w\| reaches 2e\+07; its row scale overflows the fp16"):
        run(tiny_quantize_config(), ckpt, tiny_data, tmp_path)


def test_a_non_zero_row_whose_scale_underflows_fp16_is_refused(tiny_checkpoint, tiny_data, tmp_path):
    def tiny(w):
        w[4] = 1e-7 * torch.randn(w.size(1))
    ckpt = altered_checkpoint(tiny_checkpoint, tmp_path / "train", "blocks.0.mlp.proj.weight", tiny)
    with pytest.raises(quantize.QuantizationError,
                       match=r"blocks.0.mlp.proj.weight row 4: \|w\| reaches only \d.*e-07.*stored as zeros"):
        run(tiny_quantize_config(), ckpt, tiny_data, tmp_path)


def test_an_all_zero_row_is_stored_as_zeros(tiny_checkpoint, tiny_data, tmp_path):
    def zero(w):
        w[4] = 0
    ckpt = altered_checkpoint(tiny_checkpoint, tmp_path / "train", "blocks.0.mlp.proj.weight", zero)
    run(tiny_quantize_config(), ckpt, tiny_data, tmp_path)
    assert (pack.load_model(tmp_path / "artifact.bin").state_dict()["blocks.0.mlp.proj.weight"][4] == 0).all()


def test_relative_error_of_non_finite_weights_is_nan():
    w = torch.ones(4, 4)
    assert math.isnan(quantize.relative_error(w, torch.full((4, 4), math.nan)))
    assert math.isnan(quantize.relative_error(torch.full((4, 4), math.nan), w))
    assert quantize.relative_error(torch.zeros(4, 4), torch.zeros(4, 4)) == 0.0


def guard_inputs(tiny_checkpoint, tiny_data):
    model = load_checkpoint(tiny_checkpoint)
    batch = quantize.train_calibration(tiny_data["manifest"], tiny_quantize_config()["calibration"], seed=1)[0]
    return model.state_dict(), model.config.to_dict(), batch


def test_a_nan_relative_error_fails_the_guard_and_is_the_worst(tiny_checkpoint, tiny_data):
    state, model_config, batch = guard_inputs(tiny_checkpoint, tiny_data)
    reports = [{"name": n, "rel_error": e} for n, e in (("a", 0.001), ("b", math.nan), ("c", 0.002))]
    assert quantize.worst_tensor(reports)["name"] == "b"
    with pytest.raises(quantize.QuantizationError, match=r"ckpt: b relative error nan exceeds quantize.max_rel_"):
        quantize.check_quantized_model(state, model_config, batch, tiny_quantize_config(), reports, "ckpt")


def test_a_nan_calibration_loss_fails_the_guard(tiny_checkpoint, tiny_data, monkeypatch):
    state, model_config, batch = guard_inputs(tiny_checkpoint, tiny_data)
    monkeypatch.setattr(quantize, "batch_loss", lambda model, batch: math.nan)
    with pytest.raises(quantize.QuantizationError, match=r"ckpt: quantized model's calibration loss is nan"):
        quantize.check_quantized_model(state, model_config, batch, tiny_quantize_config(),
                                       [{"name": "a", "rel_error": 0.001}], "ckpt")


def test_a_non_finite_decoded_tensor_fails_the_guard(tiny_checkpoint, tiny_data):
    state, model_config, batch = guard_inputs(tiny_checkpoint, tiny_data)
    state["blocks.0.attn.c_k.weight"][0, 0] = math.inf
    with pytest.raises(quantize.QuantizationError, match=r"ckpt: the quantized blocks.0.attn.c_k.weight has 1 non-fin"):
        quantize.check_quantized_model(state, model_config, batch, tiny_quantize_config(),
                                       [{"name": "a", "rel_error": 0.001}], "ckpt")


def test_a_checkpoint_changed_after_training_is_refused_naming_it(tiny_checkpoint, tiny_data, tmp_path):
    ckpt = altered_checkpoint(tiny_checkpoint, tmp_path / "train", "tok_emb.weight", lambda w: None)
    flip_mantissa_bit(ckpt, torch.load(ckpt, weights_only=True)["state_dict"]["blocks.0.mlp.fc.weight"])
    with pytest.raises(io.IntegrityError, match=r"train/model.pt: sha256 .* recorded in .*train/summary.json"):
        run(tiny_quantize_config(), ckpt, tiny_data, tmp_path)


def test_a_truncated_checkpoint_is_an_error_naming_it(tiny_checkpoint, tmp_path):
    truncated = tmp_path / "model.pt"
    data = tiny_checkpoint.read_bytes()
    for length in (0, 100, len(data) // 2, len(data) - 10):
        truncated.write_bytes(data[:length])
        with pytest.raises(io.IntegrityError, match=rf"{truncated}: cannot be read as a checkpoint .*truncated or"):
            load_checkpoint(truncated)


def test_a_checkpoint_broken_before_quantization_is_named_as_such(tiny_checkpoint, tiny_data, tmp_path):
    """A model that already scores like a uniform guess is the checkpoint's fault, not the quantizer's."""
    broken = altered_checkpoint(tiny_checkpoint, tmp_path / "ckpt", "tok_emb.weight", lambda w: w.mul_(0))
    with pytest.raises(quantize.QuantizationError, match=r"the checkpoint itself scores .* it was broken before"):
        run(tiny_quantize_config(), broken, tiny_data, tmp_path)
    assert not (tmp_path / "artifact.bin").exists()


SHARD_STRIDE = 16_000  # shard i holds the tokens i·16000, i·16000 + 1, ...: a window across two jumps by > 1


def synthetic_train_set(folder, lengths, tokens=None) -> Path:
    """A manifest of train shards of `lengths` tokens (by default counting up from i·SHARD_STRIDE in shard i),
    and one val shard."""
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for split, index, n in [("train", i, n) for i, n in enumerate(lengths)] + [("val", 0, 100)]:
        path = folder / shard_name(split, index)
        write_shard(path, tokens(n) if tokens else np.arange(n) + index * SHARD_STRIDE)
        shards.append({"name": path.name, "split": split, "tokens": n, "sha256": io.sha256_file(path)})
    io.write_json(folder / "manifest.json", {"shards": shards})
    return folder / "manifest.json"


def test_calibration_windows_lie_inside_one_shard_and_follow_the_seed(tmp_path):
    manifest = synthetic_train_set(tmp_path, [3000, 70, 5000])
    cal = {**tiny_quantize_config()["calibration"], "batches": 4, "batch_seqs": 32, "seq_len": 100}
    batches = quantize.train_calibration(manifest, cal, seed=1)
    assert len(batches) == 4 and all(b.shape == (32, 100) and b.dtype == torch.int64 for b in batches)
    rows = torch.cat(batches)
    assert (rows.diff(dim=1) == 1).all()  # consecutive tokens of one shard: none crosses into the next
    assert set((rows[:, 0] // SHARD_STRIDE).tolist()) == {0, 2}  # the 70-token shard holds no window
    assert all(torch.equal(a, b) for a, b in zip(batches, quantize.train_calibration(manifest, cal, seed=1)))
    assert not torch.equal(rows, torch.cat(quantize.train_calibration(manifest, cal, seed=2)))


def test_calibration_reads_windows_without_loading_the_train_split(tmp_path):
    import tracemalloc
    manifest = synthetic_train_set(tmp_path, [8_000_000] * 4, tokens=lambda n: np.arange(n) % 1000)
    tracemalloc.start()
    try:
        batches = quantize.train_calibration(manifest, tiny_quantize_config()["calibration"], seed=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(batches) == 2 and peak < 16_000_000  # one shard is 16 MB, the split 64 MB


def test_no_shard_long_enough_for_one_calibration_window_names_the_manifest_and_key(tmp_path):
    manifest = synthetic_train_set(tmp_path, [50, 63])
    with pytest.raises(ValueError, match=r"manifest.json: none of its 2 train shards \(the longest has 63 tokens\) "
                                         r"can fill one 64-token window \(quantize.calibration.seq_len\)"):
        quantize.train_calibration(manifest, tiny_quantize_config()["calibration"], seed=1)


def test_shared_input_hessians_give_the_artifact_per_linear_ones_give(tiny_checkpoint, tiny_data, tmp_path,
                                                                       monkeypatch):
    cfg = tiny_quantize_config(method="gptq", bits=6, clip_search=True)
    shared = run(cfg, tiny_checkpoint, tiny_data, tmp_path, "shared")
    monkeypatch.setattr(quantize.gptq, "collect_hessians", per_linear_hessians)
    reference = run(cfg, tiny_checkpoint, tiny_data, tmp_path, "reference")
    assert (tmp_path / "shared.bin").read_bytes() == (tmp_path / "reference.bin").read_bytes()
    assert shared["device"] == reference["device"] == "cpu"


def test_auto_device_without_cuda_is_the_cpu_and_cuda_requested_is_an_error_naming_the_key(
        tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = tiny_quantize_config(method="gptq", bits=6)
    assert run({**cfg, "device": "auto"}, tiny_checkpoint, tiny_data, tmp_path, "auto")["device"] == "cpu"
    with pytest.raises(RuntimeError, match=r"quantize.device: cuda requested but no CUDA device is available"):
        run({**cfg, "device": "cuda"}, tiny_checkpoint, tiny_data, tmp_path, "cuda")
    assert not (tmp_path / "cuda.bin").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gptq_on_cuda_records_it_and_leaves_the_model_on_the_cpu(tiny_checkpoint, tiny_data, tmp_path):
    cfg = tiny_quantize_config(method="gptq", bits=6, storage={**tiny_quantize_config()["storage"],
                                                                "form": "mixed_rows"})
    on_cpu = run(cfg, tiny_checkpoint, tiny_data, tmp_path, "cpu")
    on_cuda = run({**cfg, "device": "cuda"}, tiny_checkpoint, tiny_data, tmp_path, "cuda")
    assert on_cuda["device"] == "cuda" and on_cpu["device"] == "cpu"
    assert on_cuda["calibration_loss"] == pytest.approx(on_cpu["calibration_loss"], abs=0.02)
    model = load_checkpoint(tiny_checkpoint)
    batches = quantize.train_calibration(tiny_data["manifest"], cfg["calibration"], seed=1)
    quantize.build_artifact(model, {**cfg, "device": "cuda"}, batches, 0)
    assert all(p.device.type == "cpu" for p in model.parameters())
