"""The records' quantizer pieces: asymmetric LQER, AWQ-lite, int8 gate rows, fp16 control tensors and the
per-group lrzip/brotli compressor; against the record's own code when peers/ holds it."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import needs_lrzip, tiny_quantize_config
from files import summary_of
from stages import awq, gptq, lqer, pack, pergroup, quantize, rowquant

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "peers"


def record_cfg(**overrides):
    cfg = tiny_quantize_config(method="gptq", bits=6, embed_bits=7, clip="sdclip", code_container="bytes",
                               lqer={"rank": 2, "top_k": 2, "factor_bits": 4, "asym_group": 16},
                               awq={"top_k": 2, "bits": 8, "group_size": 16}, gate_int8=True, control_fp16=True,
                               compressor="pergroup")
    cfg.update(overrides)
    return cfg


def naive_order(codes: np.ndarray) -> list[int]:
    order, used = [0], {0}
    for _ in range(len(codes) - 1):
        d = [(int(np.abs(codes[i].astype(int) - codes[order[-1]]).sum()), i) for i in range(len(codes))
             if i not in used]
        order.append(min(d)[1])
        used.add(order[-1])
    return order


def test_similarity_order_is_the_greedy_l1_walk_with_lowest_index_ties():
    codes = np.random.default_rng(0).integers(-2, 3, size=(40, 6)).astype(np.int8)
    codes[7] = codes[3]  # a tie
    assert pergroup.similarity_order(codes).tolist() == naive_order(codes)


def test_asymmetric_lqer_codes_are_in_range_and_reduce_the_error():
    e = torch.randn(64, 32) @ torch.randn(32, 48) * 0.01
    f = lqer.correction_fields(e, 4, 4, 16)
    assert f["lqer_form"] == "asym" and f["lqer_a"].min() >= -2 and f["lqer_a"].max() <= 1
    assert f["lqer_b"].min() >= -8 and f["lqer_b"].max() <= 7 and f["lqer_b_scale"].shape == (4 * 48 // 16,)
    fix = lqer.correction(torch.from_numpy(f["lqer_a"]), torch.from_numpy(f["lqer_b"]), f)
    assert (e - fix).norm() < 0.9 * e.norm()
    assert lqer.correction_fields(e, 4, 4, 7)["lqer_bits"] == 4  # 4·48 is no multiple of 7: symmetric


def test_awq_selects_the_most_salient_groups_over_all_matrices():
    w1, w2 = torch.ones(4, 8), torch.ones(4, 8)
    h1, h2 = torch.tensor([1.0] * 4 + [100.0] * 4), torch.tensor([50.0] * 4 + [1.0] * 4)
    assert awq.select_groups({"a": (w1, h1), "b": (w2, h2)}, 4, 2) == {"a": [4], "b": [0]}


def test_gptq_protected_columns_use_their_own_scale_and_range():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 32, generator=g), torch.randn(256, 32, generator=g)
    h = x.T @ x
    scale, high_scale = rowquant.sdclip_scale(w, 12.0, 31), rowquant.sdclip_scale(w, 12.0, 127)
    mask = awq.column_mask([8], 8, 32)
    q = gptq.gptq_quantize(w, h, scale, 31, 128, 0.01, True, (mask, high_scale, 127))
    assert q[:, ~mask].abs().max() <= 31 and q[:, mask].abs().max() > 31
    plain = gptq.gptq_quantize(w, h, scale, 31)
    err = lambda codes, cols: (w[:, cols] - codes[:, cols].float() * torch.where(mask, high_scale.float()[:, None],
                                                                               scale.float()[:, None])[:, cols]).norm()
    assert err(q, mask) < 0.5 * (w[:, mask] - plain[:, mask].float() * scale.float()[:, None]).norm()


@needs_lrzip
def test_pergroup_restores_the_payload_exactly_and_a_full_artifact_loads(tiny_checkpoint, tiny_data, tmp_path):
    summary = quantize.run(record_cfg(), tiny_checkpoint, summary_of(tiny_checkpoint), tiny_data["manifest"], 1,
                           tmp_path / "a.bin", tmp_path / "a.json")
    header, state = pack.load_artifact(tmp_path / "a.bin")  # what evaluate loads
    model = pack.load_model(tmp_path / "a.bin")
    assert summary["calibration_loss"] < summary["uniform_loss"] - 1 and summary["awq_groups"]
    kinds = {t["name"]: t for t in summary["tensors"]}
    assert kinds["tok_emb.weight"]["bits"] == 7 and len(summary["lqer_tensors"]) == 2
    assert set(state) == set(model.state_dict())
    payload = pack.decompress((tmp_path / "a.bin").read_bytes())
    streams, groups = pergroup.compress_streams(payload)
    assert "tok_emb.weight" in groups and pergroup.decompress(pergroup.frame(streams)) == payload


@needs_lrzip
def test_each_group_gets_the_smaller_of_lrzip_and_brotli():
    data = np.random.default_rng(0).integers(-3, 4, 50_000).astype(np.int8).tobytes()
    method, stream = pergroup.smallest_stream(data)
    assert len(stream) == min(len(pergroup.lrzip_compress(data)), len(__import__("brotli").compress(data, quality=11)))
    assert pergroup.decode_stream(method, stream) == data


def test_missing_lrzip_is_an_error_naming_the_binary_and_the_key(monkeypatch):
    monkeypatch.setattr(pergroup.shutil, "which", lambda name: None)
    with pytest.raises(pergroup.PergroupError, match=r"quantize.compressor: pergroup needs the lrzip binary"):
        pergroup.lrzip_compress(b"x" * 100)


def test_pergroup_with_packed_codes_is_an_error_naming_the_keys():
    with pytest.raises(ValueError, match="code_container: bytes"):
        quantize.serialize([], {}, record_cfg(code_container="packed"))


def test_gate_rows_and_fp16_control_tensors():
    w = torch.randn(8, 12)
    entry, w_hat = quantize.quantize_tensor("blocks.0.attn.head_gate.weight", w, record_cfg())
    assert entry["method"] == "gate_int8" and np.abs(entry["data"]).max() == 127
    assert (w - w_hat).abs().max() <= entry["scale"].astype(np.float32).max() / 2 + 1e-6
    off, _ = quantize.quantize_tensor("blocks.0.attn.head_gate.weight", w, tiny_quantize_config())
    assert off["kind"] == "float" and off["data"].dtype == np.float32
    kept, _ = quantize.quantize_tensor("blocks.0.attn.q_gain", torch.ones(4), record_cfg())
    assert kept["data"].dtype == np.float16


def load_record(record="2135"):
    path = PEERS / f"record-{record}" / "train_gpt.py"
    if not path.is_file():
        pytest.skip(f"{path} is absent (peers/ is fetched, not committed)")
    pytest.importorskip("sentencepiece")
    sys.path.insert(0, str(ROOT / "bench"))
    from frontier_parity import patch  # the CPU copy: flash-attn -> SDPA, a Triton stub (edits listed there)
    spec = importlib.util.spec_from_file_location(f"record_{record}_cpu", patch(record))
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the record imports CUDA-only kernels (triton, flash-attn) at the top
        pytest.skip(f"the record's file does not import on this machine: {e}")
    return module


def test_codes_and_lqer_factors_equal_the_records():
    rec = load_record()
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 128, generator=g) * 0.02, torch.randn(512, 128, generator=g)
    h = x.T @ x
    q_rec, s_rec = rec.gptq_quantize_weight(w, h, clip_sigmas=12.85, clip_range=31)
    scale = rowquant.sdclip_scale(w, 12.85, 31)
    assert torch.equal(scale, s_rec) and torch.equal(gptq.gptq_quantize(w, h, scale, 31), q_rec)
    e = w - q_rec.float() * s_rec.float()[:, None]
    a, b = lqer.low_rank_factors(e, 4)
    qa, sa, qb, sb = rec._lqer_pack_asym(a, b, 64)
    f = lqer.asymmetric_fields(a, b, 64)
    assert np.array_equal(f["lqer_a"], qa.numpy()) and np.array_equal(f["lqer_b"], qb.numpy())
    assert np.array_equal(f["lqer_b_scale"], sb.numpy()) and f["lqer_a_scale"][0] == sa.numpy()


def test_awq_groups_and_codes_equal_the_record_that_brought_them():
    rec = load_record("1945")
    rec.log = lambda *a, **k: None
    from frontier_quant import caddie_cfg, compare_codes, record_hparams  # bench/: this check at the full shape
    g = torch.Generator().manual_seed(2)
    state, hs = {}, {}
    for i, (rows, cols) in enumerate([(256, 512), (512, 256), (384, 512)]):
        x = torch.randn(1024, cols, generator=g) * torch.logspace(0, -1, cols)
        x[:, 64 * i + 5] *= 6  # an outlier channel in a different group of each matrix
        state[f"blocks.{i}.mlp.fc.weight"] = torch.randn(rows, cols, generator=g) * 0.02
        hs[f"blocks.{i}.mlp.fc.weight"] = x.T @ x
    h = record_hparams()
    h.__dict__.update(awq_lite_enabled=True, awq_lite_bits=8, awq_lite_group_top_k=4, awq_lite_group_size=64,
                      lqer_scope="all", lqer_gain_select=False)
    act_rms = {n: (torch.diag(m) / 1024).sqrt() for n, m in hs.items()}
    theirs, _ = rec.gptq_mixed_quantize(state, hs, act_rms, h)
    cfg = caddie_cfg()
    cfg["awq"] = {"top_k": 4, "bits": 8, "group_size": 64}
    protected = quantize.awq_groups(state, hs, cfg)
    assert sum(map(len, protected.values())) == 4 and len(protected) == 3
    entries = [quantize.quantize_tensor(n, w, cfg, hs[n], awq_starts=protected.get(n))[0] for n, w in state.items()]
    quantize.add_lqer(entries, state, cfg["lqer"])
    assert compare_codes(theirs, entries) == {"codes": 3, "awq": 3, "lqer": 3}


def hessian_whose_mean_depends_on_the_order(seed=40, cols=512):
    """x.T @ x whose diagonal sums to another fp32 mean in act order than in column order (seed 40: 2 of the
    2048x512 codes then differ by one between the two orders)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, cols, generator=g) * torch.logspace(0, -1, cols)
    x[:, :3] *= 8
    h = x.T @ x
    assert torch.diag(h).mean() != torch.diag(h)[torch.argsort(torch.diag(h), descending=True)].mean()
    return torch.randn(2048, cols, generator=g) * 0.02, h


def test_gptq_damps_with_the_mean_of_the_diagonal_in_column_order(monkeypatch):
    w, h = hessian_whose_mean_depends_on_the_order()
    seen = []
    real = gptq.inverse_hessian_cholesky
    monkeypatch.setattr(gptq, "inverse_hessian_cholesky", lambda hh, damping: seen.append(damping) or real(hh, damping))
    gptq.gptq_quantize(w, h, rowquant.sdclip_scale(w, 12.85, 31), 31, damp=0.01)
    assert seen == [0.01 * torch.diag(h).mean()] and seen[0].dtype == torch.float32


def test_codes_equal_the_records_where_the_damping_mean_depends_on_the_order():
    rec = load_record()
    w, h = hessian_whose_mean_depends_on_the_order()
    q_rec, s_rec = rec.gptq_quantize_weight(w, h, clip_sigmas=12.85, clip_range=31)
    assert torch.equal(gptq.gptq_quantize(w, h, rowquant.sdclip_scale(w, 12.85, 31), 31), q_rec)
