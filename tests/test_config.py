import copy

import pytest

from conftest import default_config
from stages import config as caddie


def test_default_config_is_valid():
    caddie.validate(default_config())


@pytest.mark.parametrize("where, path", [
    (lambda c: c["defaults"]["quantize"], "defaults.quantize.bitz"),
    (lambda c: c["defaults"]["train"]["model"], "defaults.train.model.bitz"),
    (lambda c: c["arms"]["int6"].setdefault("quantize", {}), "arms.int6.quantize.bitz"),
    (lambda c: c["report"], "report.bitz"),
    (lambda c: c, "bitz"),
])
def test_unknown_key_is_rejected_with_its_path(where, path):
    cfg = default_config()
    where(cfg)["bitz"] = 6
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg, source="my.yaml")
    assert f"{path}: unknown key" in str(err.value)
    assert "my.yaml" in str(err.value)


def test_bad_value_names_key_and_baseline_arm_must_exist():
    cfg = default_config()
    cfg["arms"]["int6"]["quantize"]["compressor"] = "gzip"
    with pytest.raises(caddie.ConfigError, match=r"arms\.int6\.quantize\.compressor"):
        caddie.validate(cfg)
    cfg = default_config()
    cfg["report"]["baseline_arm"] = "nope"
    with pytest.raises(caddie.ConfigError, match="report.baseline_arm"):
        caddie.validate(cfg)


def test_arms_differing_only_in_quantize_share_upstream_keys():
    arms = caddie.plan(default_config())["arms"]
    base, int6 = arms["baseline"], arms["int6"]
    for stage in ("tokenize", "curriculum", "train"):
        assert base[stage] == int6[stage]
    assert base["evaluate"]["prequant"] == int6["evaluate"]["prequant"]
    assert base["quantize"] != int6["quantize"]
    assert base["evaluate"]["quant"] != int6["evaluate"]["quant"]


def test_keys_follow_config_and_switching_back_restores_the_key():
    cfg = default_config()
    before = caddie.plan(cfg)["arms"]["baseline"]
    changed = copy.deepcopy(cfg)
    changed["defaults"]["train"]["iterations"] += 1
    after = caddie.plan(changed)["arms"]["baseline"]
    assert after["tokenize"] == before["tokenize"] and after["train"] != before["train"]
    assert after["quantize"] != before["quantize"]  # downstream keys follow their inputs
    assert caddie.plan(cfg)["arms"]["baseline"] == before


def test_disabled_curriculum_is_not_an_input_of_train_and_its_settings_do_not_matter():
    cfg = default_config()
    cfg["defaults"]["curriculum"]["enabled"] = False
    plan = caddie.plan(cfg)
    keys = plan["arms"]["baseline"]
    assert "curriculum" not in keys
    assert "curriculum" not in plan["stages"]["train"][keys["train"]]["inputs"]
    cfg["defaults"]["curriculum"]["buckets"] = 3
    assert caddie.plan(cfg)["arms"]["baseline"]["train"] == keys["train"]


def test_evaluate_modes_do_not_change_keys():
    cfg = default_config()
    keys = caddie.plan(cfg)["arms"]["baseline"]["evaluate"]
    cfg["defaults"]["evaluate"]["modes"] = ["sliding"]
    assert caddie.plan(cfg)["arms"]["baseline"]["evaluate"] == keys


def test_stage_sources_follow_imports():
    sources = caddie.stage_sources("evaluate")
    assert {"stages/evaluate.py", "stages/model.py", "stages/bpb.py", "stages/pack.py"} <= set(sources)
    assert "stages/train.py" not in sources


@pytest.mark.parametrize("preset", sorted((caddie.STAGES_DIR.parent / "presets").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_presets_merged_over_the_default_are_valid(preset):
    import yaml
    cfg = caddie.deep_merge(default_config(), yaml.safe_load(preset.read_text()))
    caddie.validate(cfg, source=str(preset))
    assert caddie.plan(cfg)["arms"]
