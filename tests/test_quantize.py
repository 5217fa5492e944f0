import json

import pytest
import torch

from stages import pack, quantize
from stages.model import GPT, GPTConfig

CFG = {"method": "rtn", "bits": 8, "clip_percentile": 99.99984, "keep_float_max_numel": 1024,
       "compressor": "zlib", "cap_bytes": 16_000_000, "counted_code": ["stages/model.py", "stages/pack.py"]}


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return model.eval(), path


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_quantize_rows_codes_and_error(bits):
    w = torch.randn(32, 256)
    q, scale = pack.quantize_rows(w, bits, 100.0)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and q.abs().max() <= qmax and scale.dtype == torch.float16
    err = (pack.dequantize_rows(q, scale) - w).abs().max(dim=1).values
    assert (err <= scale.float() * 0.51 + 1e-3).all()  # round-to-nearest: within half a step


def test_percentile_clip_bounds_outliers():
    w = torch.randn(4, 1000)
    w[:, 0] = 100.0
    q, scale = pack.quantize_rows(w, 8, 99.0)
    assert (scale.float() * 127 < 10).all()  # the clip ignores the outlier column


@pytest.mark.parametrize("compressor", sorted(pack.COMPRESSORS))
def test_artifact_round_trip_gives_a_working_model(checkpoint, tmp_path, compressor):
    model, path = checkpoint
    cfg = {**CFG, "compressor": compressor}
    summary = quantize.run(cfg, path, tmp_path / "artifact.bin", tmp_path / "summary.json")
    loaded = pack.load_model(tmp_path / "artifact.bin")
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref, got = model.forward_logits(x), loaded.forward_logits(x)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert summary["model_bytes"] == (tmp_path / "artifact.bin").stat().st_size
    code = sum((quantize.Path(p)).stat().st_size for p in CFG["counted_code"])
    assert summary["code_bytes"] == code
    assert summary["total_bytes"] == summary["model_bytes"] + code
    assert summary["headroom_bytes"] == cfg["cap_bytes"] - summary["total_bytes"]
    assert json.loads((tmp_path / "summary.json").read_text())["compressor"] == compressor
    kinds = {t["name"]: t["kind"] for t in summary["tensors"]}
    assert kinds["tok_emb.weight"] == "rows" and kinds["blocks.0.attn.q_gain"] == "float"


def test_fewer_bits_cost_fewer_bytes_and_more_error(checkpoint, tmp_path):
    _, path = checkpoint
    s8 = quantize.run(CFG, path, tmp_path / "a8.bin", tmp_path / "s8.json")
    s4 = quantize.run({**CFG, "bits": 4}, path, tmp_path / "a4.bin", tmp_path / "s4.json")
    assert s4["model_bytes"] < s8["model_bytes"]
    assert s4["max_rel_error"] > s8["max_rel_error"] > 0


def test_over_the_cap_fails_loudly_and_keeps_the_previous_artifact(checkpoint, tmp_path):
    _, path = checkpoint
    out, summary = tmp_path / "artifact.bin", tmp_path / "summary.json"
    quantize.run(CFG, path, out, summary)
    good = out.read_bytes()
    with pytest.raises(quantize.OverCapError, match=r"over quantize.cap_bytes = 1,000"):
        quantize.run({**CFG, "cap_bytes": 1000, "bits": 6}, path, out, summary)
    assert out.read_bytes() == good
    assert json.loads(summary.read_text())["bits"] == 8


def test_missing_counted_code_file_is_named(checkpoint, tmp_path):
    _, path = checkpoint
    with pytest.raises(FileNotFoundError, match="quantize.counted_code: nope.py"):
        quantize.run({**CFG, "counted_code": ["nope.py"]}, path, tmp_path / "a.bin", tmp_path / "s.json")


def test_not_an_artifact_is_named(tmp_path):
    bad = tmp_path / "x.bin"
    bad.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(pack.ArtifactError, match="x.bin"):
        pack.load_artifact(bad)
