"""Shared fixtures: a small tokenized python-docs corpus and its curriculum, built once per session."""
import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import config as caddie
from stages import curriculum, tokenize

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"


def default_config() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def tiny_tokenize_config(**overrides) -> dict:
    """python-docs, 700 documents, 60 held out, a 512-piece tokenizer."""
    cfg = caddie.tokenize_section(default_config()["defaults"]["tokenize"])
    cfg.update(max_docs=700, val_docs=60, vocab_size=512, shard_tokens=50_000)
    cfg.update(overrides)
    return cfg


def tiny_train_config(**overrides) -> dict:
    cfg = copy.deepcopy(default_config()["defaults"]["train"])
    cfg["model"].update(num_layers=2, model_dim=64, num_heads=2, num_kv_heads=1)
    cfg.update(seq_len=64, batch_tokens=1024, iterations=30, warmdown_iters=10, log_every=5,
               checkpoint_every=0)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Tokenizer, shards and manifest of a small corpus, plus its curriculum buckets (seq_len 64)."""
    out = tmp_path_factory.mktemp("tokenize")
    manifest = tokenize.run(tiny_tokenize_config(), out)
    buckets = out / "buckets.npz"
    curriculum.run({"buckets": 4, "seq_len": 64}, out / "manifest.json", buckets, out / "curriculum.json")
    return {"dir": out, "manifest": out / "manifest.json", "buckets": buckets,
            "buckets_summary": out / "curriculum.json", "info": manifest}


@pytest.fixture(scope="session")
def chromium():
    """Path of a headless chromium for HTML tests (tests/browser.py): on PATH, else Debian's package installed
    by apt-get; skips with the reason when neither can be had."""
    import browser
    try:
        return browser.require_chromium()
    except browser.ChromiumUnavailable as e:
        pytest.skip(str(e))


def have_lrzip() -> bool:
    """lrzip (the records' per-group compressor) on PATH, installed with apt-get when missing."""
    if shutil.which("lrzip") is None:
        subprocess.run(["apt-get", "install", "-y", "lrzip"], capture_output=True)
    return shutil.which("lrzip") is not None


needs_lrzip = pytest.mark.skipif(not have_lrzip(), reason="lrzip is missing and apt-get could not install it")


def shared_fixture(name):
    folder = FIXTURES / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (it ships beside the project in CI, not in a user's clone)")
    return folder


@pytest.fixture(scope="session")
def fixture_tokenizers():
    return shared_fixture("tokenizers")


@pytest.fixture(scope="session")
def record_logs():
    return shared_fixture("record-logs")


def tiny_quantize_config(**overrides) -> dict:
    cfg = copy.deepcopy(default_config()["defaults"]["quantize"])
    cfg["calibration"].update(batches=2, batch_seqs=8, seq_len=64)
    cfg.update(keep_float_max_numel=1024, code_file=str(ROOT / "stages" / "model.py"))  # as the counted train_gpt.py
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory):
    """A 2-layer model trained 60 steps on the tiny corpus (loss well below ln(vocab))."""
    from stages import train
    out = tmp_path_factory.mktemp("train")
    config = {"train": tiny_train_config(iterations=60, warmdown_iters=20),
              "curriculum": {"enabled": False, "buckets": 4, "floor": 0.02}}
    train.main(["--config", json.dumps(config), "--manifest", str(tiny_data["manifest"]), "--seed", "1",
                "--out-dir", str(out), "--resume-dir", str(out / "resume")])
    return out / "model.pt"


def assert_learns_a_repeating_sequence(cfg) -> None:
    """A tiny run that learns: 30 Adam steps on a period-8 token sequence halve the loss (QAT on if configured)."""
    import torch
    from stages.model import GPT
    torch.manual_seed(0)
    model = GPT(cfg)
    model.qat_active = bool(cfg.qat_bits)
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=(0.9, 0.95))
    seq = torch.arange(17).remainder(8).repeat(4, 1) + 2
    idx, targets = seq[:, :-1], seq[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(idx, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model(idx, targets).item() < 0.5 * losses[0], losses
