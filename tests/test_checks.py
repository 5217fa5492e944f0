"""Plan-time checks (stages/checks.py): each finds what a stage would reject at run time, by its key path."""
import copy

import pytest
import yaml

from conftest import ROOT, default_config
from stages import checks
from stages import config as caddie


@pytest.fixture(autouse=True)
def in_the_workflow(monkeypatch):
    monkeypatch.chdir(ROOT)  # config files are read relative to the workflow, as snakemake reads them


def stage_config(settings: dict) -> dict:
    """The default stage configuration with dotted-path settings, e.g. {"evaluate.stride": 256}."""
    cfg = copy.deepcopy(default_config()["defaults"])
    for path, value in settings.items():
        *parents, key = path.split(".")
        section = cfg
        for parent in parents:
            section = section[parent]
        section[key] = value
    return cfg


def every_arm_of(config: dict) -> list[dict]:
    return [config["defaults"]] + [caddie.deep_merge(config["defaults"], arm) for arm in config["arms"].values()]


def test_the_default_config_and_every_preset_have_no_problems():
    configs = [default_config()] + [caddie.deep_merge(default_config(), yaml.safe_load(p.read_text()))
                                    for p in sorted((ROOT / "presets").glob("*.yaml"))]
    for config in configs:
        for cfg in every_arm_of(config):
            assert checks.problems(cfg) == []


LORA = {"evaluate.modes": ["ttt"], "evaluate.ttt.method": "lora"}

PROBLEMS = {
    "evaluate_windows": ({"evaluate.stride": 256}, "evaluate.stride: 256 exceeds evaluate.seq_len 128"),
    "evaluate_lora_chunk": ({**LORA, "evaluate.ttt.lora.chunk_tokens": 129},
                            "evaluate.ttt.lora.chunk_tokens: 129 exceeds evaluate.seq_len 128"),
    "evaluate_lora_targets": ({**LORA, "evaluate.ttt.lora.targets": ["attn.c_q", "attn.cv"]},
                              "evaluate.ttt.lora.targets: 'attn.cv' matches no layer of the model"),
    "rescue_lcq_targets": ({"rescue.lcq.enabled": True, "rescue.lcq.targets": ["mlp.fc", "mlp.up"]},
                           "rescue.lcq.targets: 'mlp.up' matches no layer of the model"),
    "micro_batches_nproc": ({"train.micro_batches": 2, "train.nproc": 4, "train.batch_tokens": 4096},
                            "train.micro_batches: 2 is not divisible by train.nproc 4"),
    "batch_tokens_micro_batches": ({"train.micro_batches": 3},
                                   "train.batch_tokens: 4096 is not divisible by train.micro_batches 3"),
    "batch_tokens_seq_len": ({"train.micro_batches": 64},
                             "train.batch_tokens: 4096 / 64 micro-batches = 64 tokens is not a whole number of "
                             "train.seq_len 128 sequences"),
    "grow_pairs": ({"train.grow": {"depths": [2, 3], "until": [0.5]}},
                   "train.grow: depths [2, 3] and until [0.5] must pair up"),
    "grow_depths": ({"train.grow": {"depths": [2, 5], "until": [0.2, 0.5]}},
                    "train.grow.depths: [2, 5] exceed train.model.num_layers 4"),
    "gptq_reserve": ({"train.max_seconds": 600, "train.gptq_reserve_seconds": 600},
                     "train.gptq_reserve_seconds: 600 leaves no training time within train.max_seconds 600 "
                     "(the cap would be ignored)"),
    "model_dim_heads": ({"train.model.num_heads": 3},
                        "train.model.model_dim: 128 is not divisible by train.model.num_heads 3"),
    "heads_kv_heads": ({"train.model.num_kv_heads": 3},
                       "train.model.num_heads: 4 is not divisible by train.model.num_kv_heads 3"),
    "head_dim_even": ({"train.model.model_dim": 36, "train.model.num_heads": 4, "train.model.num_kv_heads": 1},
                      "train.model.model_dim: head_dim = model_dim // num_heads = 9 must be even for RoPE"),
    "rope_dims_even": ({"train.model.rope_dims": 7},
                       "train.model.rope_dims: 7 must be even and at most head_dim 32"),
    "rope_dims_head_dim": ({"train.model.rope_dims": 34},
                           "train.model.rope_dims: 34 must be even and at most head_dim 32"),
    "xsa_layers": ({"train.model.xsa_layers": 5}, "train.model.xsa_layers: 5 exceeds train.model.num_layers 4"),
    "parallel_from": ({"train.model.parallel_from": 4},
                      "train.model.parallel_from: 4 is not a layer of train.model.num_layers 4 (-1 = off)"),
    "recur_layers_order": ({"train.model.recur_layers": [2, 1]},
                           "train.model.recur_layers: [2, 1] must be [a, b] with a <= b < train.model.num_layers 4"),
    "recur_layers_range": ({"train.model.recur_layers": [1, 4]},
                           "train.model.recur_layers: [1, 4] must be [a, b] with a <= b < train.model.num_layers 4"),
    "smear_gate": ({"train.model.smear_gate": True, "train.model.model_dim": 8, "train.model.num_heads": 2,
                    "train.model.num_kv_heads": 1},
                   "train.model.smear_gate: needs train.model.model_dim >= 12, got 8"),
    "q_rank": ({"train.model.q_rank": 128},
               "train.model.q_rank: 128 must be below train.model.model_dim 128 (0 = full rank)"),
    "qat_bits": ({"train.model.qat_bits": 1}, "train.model.qat_bits: 1 must be 0 (off) or 2..8"),
    "mixed_rows_bits": ({"quantize.storage.form": "mixed_rows", "quantize.storage.mixed_rows.high_bits": 8,
                         "quantize.bits": 8},
                        "quantize.storage.mixed_rows.high_bits: 8 must exceed quantize.bits 8"),
    "size_target_above_cap": ({"quantize.size_target": {"enabled": True, "bytes": 17_000_000}},
                              "quantize.size_target.bytes: 17000000 exceeds quantize.cap_bytes 16000000"),
    "val_docs_max_docs": ({"tokenize.max_docs": 400},
                          "tokenize.val_docs: 400 held-out documents leave none of tokenize.max_docs 400 for "
                          "training"),
}


@pytest.mark.parametrize("settings, message", PROBLEMS.values(), ids=PROBLEMS.keys())
def test_each_check_names_the_key_path(settings, message):
    found = checks.problems(stage_config(settings))
    assert any(p.startswith(message) for p in found), found


@pytest.mark.parametrize("settings", [
    {"evaluate.ttt.lora.chunk_tokens": 129},  # the lora settings only matter to ttt with method lora
    {**LORA, "evaluate.modes": ["standard"], "evaluate.ttt.lora.targets": ["nope"]},
    {"rescue.lcq.targets": ["nope"]},  # lcq off
    {"quantize.storage.mixed_rows.high_bits": 2},  # form dense
    {"quantize.size_target": {"enabled": False, "bytes": 1}},
    {"quantize.cap_bytes": 1000},  # the counted code is known once the export is generated: quantize checks it
    {"train.gptq_reserve_seconds": 600},  # no cap
    {"tokenize.source": "challenge", "tokenize.max_docs": 400},  # challenge shards are split already
    {"evaluate.stride": 128, "train.micro_batches": 32, "train.grow": {"depths": [4], "until": [0.5]},
     "train.model.recur_layers": [0, 3], "train.model.rope_dims": 32, "train.model.q_rank": 127},
])
def test_settings_that_do_not_apply_or_are_at_their_limit_pass(settings):
    assert checks.problems(stage_config(settings)) == []


MODEL_CASES = [
    {}, {"num_heads": 3}, {"num_kv_heads": 3}, {"model_dim": 36, "num_kv_heads": 1}, {"rope_dims": 7},
    {"rope_dims": 32}, {"rope_dims": 34}, {"xsa_layers": 4}, {"xsa_layers": 5}, {"parallel_from": 3},
    {"parallel_from": 4}, {"recur_layers": [3, 3]}, {"recur_layers": [2, 1]}, {"recur_layers": [0, 4]},
    {"smear_gate": True, "model_dim": 8, "num_heads": 2, "num_kv_heads": 1}, {"smear_gate": True},
    {"q_rank": 127}, {"q_rank": 128}, {"qat_bits": 1}, {"qat_bits": 2},
]


@pytest.mark.parametrize("model", MODEL_CASES, ids=str)
def test_model_shape_agrees_with_the_model_itself(model):
    from stages.model import GPTConfig
    cfg = stage_config({f"train.model.{k}": v for k, v in model.items()})
    try:
        GPTConfig(vocab_size=1024, **cfg["train"]["model"]).validate()
        model_accepts = True
    except ValueError:
        model_accepts = False
    assert (list(checks.model_shape(cfg)) == []) == model_accepts


def test_smear_gate_dims_match_the_model():
    from stages import model
    assert checks.SMEAR_GATE_DIMS == model.SMEAR_GATE_DIMS


@pytest.mark.parametrize("model", [{}, {"q_rank": 16}, {"tie_embeddings": False}], ids=str)
def test_linear_layers_are_the_models(model):
    from torch import nn

    from stages.model import GPT, GPTConfig
    cfg = stage_config({f"train.model.{k}": v for k, v in model.items()})["train"]["model"]
    gpt = GPT(GPTConfig(vocab_size=300, **cfg))
    assert checks.linear_layers(cfg) == [n for n, m in gpt.named_modules() if isinstance(m, nn.Linear)]
