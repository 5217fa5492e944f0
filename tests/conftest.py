"""Shared fixtures: a small tokenized python-docs corpus and its curriculum, built once per session."""
import copy
import json
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
    return {"dir": out, "manifest": out / "manifest.json", "buckets": buckets, "info": manifest}


@pytest.fixture(scope="session")
def fixture_tokenizers():
    folder = FIXTURES / "tokenizers"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (it ships beside the project in CI, not in a user's clone)")
    return folder
