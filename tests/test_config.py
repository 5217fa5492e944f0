import copy
import re

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


def test_an_eval_setting_changes_the_shipped_file_but_not_the_artifact():
    cfg = default_config()
    before = caddie.plan(cfg)["arms"]["baseline"]
    cfg["defaults"]["evaluate"]["ttt"]["lr"] *= 2
    after = caddie.plan(cfg)["arms"]["baseline"]
    assert after["export"] != before["export"]  # the file embeds every setting: its counted bytes can change
    assert (after["quantize"], after["evaluate"]["quant"]["standard"]) == (
        before["quantize"], before["evaluate"]["quant"]["standard"])


def test_a_size_target_keys_quantize_on_the_export_it_leaves_room_for():
    cfg = default_config()
    cfg["defaults"]["quantize"]["size_target"]["enabled"] = True
    plan = caddie.plan(cfg)
    keys = plan["arms"]["baseline"]
    quantize = plan["stages"]["quantize"][keys["quantize"]]
    assert quantize["config"]["code_file"] == caddie.export_file(keys["export"])
    assert quantize["inputs"] == {"train": keys["train"], "export": keys["export"]}
    cfg["defaults"]["evaluate"]["ttt"]["lr"] *= 2  # pruning depends on the file's bytes: it re-quantizes
    assert caddie.plan(cfg)["arms"]["baseline"]["quantize"] != keys["quantize"]


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
    assert caddie.plan(cfg)["arms"]["baseline"]["evaluate"] == {
        point: {"sliding": modes["sliding"]} for point, modes in keys.items()}


def plan_after(change) -> dict:
    cfg = default_config()
    change(cfg)
    return caddie.plan(cfg)["arms"]["baseline"]


def test_a_setting_is_in_a_key_only_where_it_can_change_the_output():
    base = plan_after(lambda cfg: None)
    run_setting = plan_after(lambda cfg: cfg["defaults"]["train"].update(log_every=1, checkpoint_every=3))
    assert run_setting == base
    ttt = plan_after(lambda cfg: cfg["defaults"]["evaluate"]["ttt"].update(lr=1.0))
    budget = plan_after(lambda cfg: cfg["defaults"]["evaluate"].update(budget_seconds=5))
    assert budget == base
    for point, modes in base["evaluate"].items():
        assert ttt["evaluate"][point]["ttt"] != modes["ttt"]
        assert ttt["evaluate"][point]["standard"] == modes["standard"]
        assert ttt["evaluate"][point]["sliding"] == modes["sliding"]
    ogd = plan_after(lambda cfg: cfg["defaults"]["evaluate"]["ogd"].update(enabled=True))
    ogd_chunks = plan_after(lambda cfg: (cfg["defaults"]["evaluate"]["ogd"].update(enabled=True),
                                         cfg["defaults"]["evaluate"]["ttt"].update(chunk_tokens=128)))
    assert ogd_chunks["evaluate"]["quant"]["sliding"] != ogd["evaluate"]["quant"]["sliding"]  # OGD chunks by it


def test_keys_carry_the_digest_of_the_code_each_stage_runs(monkeypatch):
    base = plan_after(lambda cfg: None)
    real = caddie.code_digest.__wrapped__
    caddie.code_digest.cache_clear()
    monkeypatch.setattr(caddie, "code_digest", lambda stage: real(stage) + ("x" if stage == "quantize" else ""))
    changed = plan_after(lambda cfg: None)
    assert changed["train"] == base["train"] and changed["quantize"] != base["quantize"]
    assert changed["evaluate"]["prequant"] == base["evaluate"]["prequant"]
    assert changed["evaluate"]["quant"] != base["evaluate"]["quant"]  # downstream of the new quantize key


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


@pytest.mark.parametrize("where, key, value, path", [
    (lambda c: c["defaults"]["train"], "seq_len", 32.0, "defaults.train.seq_len"),
    (lambda c: c["defaults"]["train"], "iterations", 30.0, "defaults.train.iterations"),
    (lambda c: c["arms"]["int6"]["quantize"], "bits", 6.0, "arms.int6.quantize.bits"),
    (lambda c: c["arms"]["int6"]["quantize"], "embed_bits", 8.0, "arms.int6.quantize.embed_bits"),
    (lambda c: c["defaults"]["quantize"]["size_target"], "bytes", 1.5e7, "defaults.quantize.size_target.bytes"),
    (lambda c: c["defaults"]["train"]["model"], "recur_layers", [0, 1.0], "defaults.train.model.recur_layers.1"),
    (lambda c: c, "seeds", [1337.0], "seeds.0"),
])
def test_float_valued_integer_is_rejected_with_its_path(where, key, value, path):
    cfg = default_config()
    where(cfg)[key] = value
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg)
    shown = value[-1] if isinstance(value, list) else value
    assert f"{path}: {shown!r} is not of type 'integer'" in str(err.value)


def test_bool_is_not_an_integer():
    cfg = default_config()
    cfg["defaults"]["train"]["nproc"] = True
    with pytest.raises(caddie.ConfigError, match=r"defaults\.train\.nproc: True is not of type 'integer'"):
        caddie.validate(cfg)


def test_plan_time_problem_of_an_arm_names_its_key_path():
    cfg = default_config()
    cfg["arms"]["foo"] = {"evaluate": {"stride": 256}}
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg, source="my.yaml")
    assert "arms.foo.evaluate.stride: 256 exceeds evaluate.seq_len 128" in str(err.value)
    assert "my.yaml" in str(err.value)


def test_every_plan_time_problem_is_listed_once_in_one_error():
    cfg = default_config()
    cfg["defaults"]["evaluate"]["stride"] = 256
    cfg["arms"]["int6"]["train"] = {"micro_batches": 3}
    cfg["arms"]["gptq-int6"]["train"] = {"model": {"num_heads": 3, "num_kv_heads": 1}}
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg)
    lines = str(err.value).splitlines()[1:]
    assert [line.strip() for line in lines] == [
        "defaults.evaluate.stride: 256 exceeds evaluate.seq_len 128",
        "arms.int6.train.batch_tokens: 4096 is not divisible by train.micro_batches 3",
        "arms.gptq-int6.train.model.model_dim: 128 is not divisible by train.model.num_heads 3",
    ]  # an arm that inherits the defaults' problem does not repeat it


def test_plan_time_checks_run_only_on_a_config_the_schema_accepts():
    cfg = default_config()
    cfg["defaults"]["evaluate"]["stride"] = 256
    cfg["arms"]["int6"]["quantize"]["bits"] = 6.0
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg)
    assert "arms.int6.quantize.bits: 6.0 is not of type 'integer'" in str(err.value)
    assert "stride" not in str(err.value)


BROKEN_YAML = "seeds: [1, 2\narms: {baseline: {}}\n"  # the flow sequence is never closed


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from stages import checks
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN_YAML)
    with pytest.raises(caddie.ConfigError) as err:
        checks.load_yaml(path)
    assert f"{path}, line 2, column 5:" in str(err.value)
    assert "line 1, column 8" in str(err.value)  # where the unclosed sequence starts


def test_config_file_that_is_not_a_mapping_names_the_file(tmp_path):
    from stages import checks
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(caddie.ConfigError, match="list.yaml: the top level must be a mapping"):
        checks.load_yaml(path)


def test_checks_cli_merges_configfiles_as_snakemake_does(tmp_path, capsys, monkeypatch):
    from stages import checks
    monkeypatch.chdir(caddie.STAGES_DIR.parent)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("arms: {foo: {evaluate: {stride: 64}}}\n")
    assert checks.main([str(good)]) == 0
    bad.write_text("arms: {foo: {evaluate: {stride: 256}}}\n")
    assert checks.main([str(good), str(bad)]) == 1
    assert "arms.foo.evaluate.stride: 256 exceeds evaluate.seq_len 128" in capsys.readouterr().err
    bad.write_text(BROKEN_YAML)
    assert checks.main([str(bad)]) == 1
    assert f"{bad}, line 2, column 5:" in capsys.readouterr().err


def copied_workflow(tmp_path):
    import shutil
    for name in ("Snakefile", "rules", "schemas", "stages", "profiles", "config.yaml"):
        src = caddie.STAGES_DIR.parent / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    return tmp_path


def dry_run(work, *args):
    import subprocess
    import sys
    from pathlib import Path
    snakemake = str(Path(sys.executable).parent / "snakemake")
    done = subprocess.run([snakemake, "-n", *args], cwd=work, capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.pipeline
def test_snakemake_names_file_and_line_of_a_broken_config_yaml(tmp_path):
    work = copied_workflow(tmp_path)
    text = (work / "config.yaml").read_text()
    assert "  baseline: {}\n" in text
    (work / "config.yaml").write_text(text.replace("  baseline: {}\n", "  baseline: {\n", 1))
    line = text.splitlines().index("  baseline: {}") + 1
    rc, out = dry_run(work)
    assert rc != 0
    assert re.search(rf"config\.yaml, line \d+, column \d+: .*\(while parsing a flow mapping at line {line},", out), out


@pytest.mark.pipeline
def test_snakemake_rejects_float_integers_and_plan_time_problems_in_a_configfile(tmp_path):
    work = copied_workflow(tmp_path)
    (work / "bad.yaml").write_text("arms: {baseline: {}, foo: {evaluate: {stride: 256}, quantize: {bits: 6.0}}}\n")
    rc, out = dry_run(work, "--configfile", "bad.yaml")
    assert rc != 0 and "arms.foo.quantize.bits: 6.0 is not of type 'integer'" in out, out
    (work / "bad.yaml").write_text("arms: {baseline: {}, foo: {evaluate: {stride: 256}}}\n")
    rc, out = dry_run(work, "--configfile", "bad.yaml")
    assert rc != 0 and "arms.foo.evaluate.stride: 256 exceeds evaluate.seq_len 128" in out, out


@pytest.mark.parametrize("path", [("train", "max_seconds"), ("quantize", "clip_percentile"),
                                  ("train", "optimizer", "matrix_lr")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_numbers_are_rejected_with_their_path(path, value):
    cfg = default_config()
    section = cfg["arms"]["int6"]
    for key in path[:-1]:
        section = section.setdefault(key, {})
    section[path[-1]] = value
    with pytest.raises(caddie.ConfigError, match=rf"arms\.int6\.{'.'.join(path)}: {value} is not a finite number"):
        caddie.validate(cfg)


def test_evaluate_keys_leave_out_what_a_mode_does_not_read():
    base = plan_after(lambda cfg: None)
    stride = plan_after(lambda cfg: cfg["defaults"]["evaluate"].update(stride=16))
    ogd_lr = plan_after(lambda cfg: cfg["defaults"]["evaluate"]["ogd"].update(lr=0.5))  # ogd is off
    lora = plan_after(lambda cfg: cfg["defaults"]["evaluate"]["ttt"]["lora"].update(rank=2))  # method sgd
    for point, modes in base["evaluate"].items():
        assert stride["evaluate"][point]["standard"] == modes["standard"]
        assert stride["evaluate"][point]["sliding"] != modes["sliding"]
        assert ogd_lr["evaluate"][point] == modes and lora["evaluate"][point] == modes


def test_settings_of_a_technique_that_is_off_do_not_retrain():
    base = plan_after(lambda cfg: None)
    for change in (lambda t: t["ema"].update(decay=0.9), lambda t: t["qna"].update(bits=4),
                   lambda t: t["sqwa"].update(every=7), lambda t: t["replay"].update(batches=3),
                   lambda t: t.update(gptq_reserve_seconds=12)):
        assert plan_after(lambda cfg: change(cfg["defaults"]["train"]))["train"] == base["train"]
    assert plan_after(lambda cfg: cfg["defaults"]["train"]["ema"].update(enabled=True))["train"] != base["train"]


def test_settings_of_a_quantize_option_not_in_use_do_not_requantize():
    base = plan_after(lambda cfg: None)  # baseline: rtn, percentile clip, dense, no LQER, train calibration
    for change in (lambda q: q["gptq"].update(damp=0.1), lambda q: q["clip_sigmas"].update(mlp=3.0),
                   lambda q: q["storage"]["freeze_dry"].update(tau=0.5), lambda q: q["lqer"].update(top_k=1),
                   lambda q: q["calibration"].update(temperature=0.1), lambda q: q["size_target"].update(bytes=5)):
        assert plan_after(lambda cfg: change(cfg["defaults"]["quantize"]))["quantize"] == base["quantize"]
    used = plan_after(lambda cfg: cfg["defaults"]["quantize"].update(clip_percentile=99.0))
    assert used["quantize"] != base["quantize"]
    gptq = plan_after(lambda cfg: cfg["arms"]["baseline"].update(quantize={"method": "gptq", "gptq": {"damp": 0.1}}))
    assert gptq["quantize"] != plan_after(lambda cfg: cfg["arms"]["baseline"].update(
        quantize={"method": "gptq"}))["quantize"]


def test_the_tokenizer_sample_keys_only_where_a_tokenizer_is_trained():
    tok = default_config()["defaults"]["tokenize"]
    assert caddie.tokenize_section(tok)["tokenizer_sample_docs"] == tok["tokenizer_sample_docs"]
    given = caddie.tokenize_section({**tok, "tokenizer_model": "data/tokenizer.model"})
    assert "tokenizer_sample_docs" not in given
    assert given == caddie.tokenize_section({**tok, "tokenizer_model": "data/tokenizer.model",
                                             "tokenizer_sample_docs": 7})


# ---- only_arms: a preset says which arms run ----

def test_only_arms_narrows_the_config_to_its_arms_in_their_order():
    cfg = default_config()
    cfg["only_arms"] = ["int6", "baseline"]
    caddie.validate(cfg)
    assert list(cfg["arms"]) == ["int6", "baseline"]  # in place: the rules read config["arms"] after validate
    assert list(caddie.plan(cfg)["arms"]) == ["int6", "baseline"]
    unvalidated = default_config()
    unvalidated["only_arms"] = ["gptq-int6"]
    assert list(caddie.plan(unvalidated)["arms"]) == ["gptq-int6"]
    everything = default_config()
    assert everything["only_arms"] is None and list(caddie.plan(everything)["arms"]) == list(everything["arms"])


def test_only_arms_unselected_arms_are_not_checked():
    cfg = default_config()
    cfg["arms"]["broken"] = {"train": {"model": {"num_heads": 3}}}  # a plan-time problem, in an arm not run
    cfg["only_arms"] = ["baseline"]
    caddie.validate(cfg)
    assert list(cfg["arms"]) == ["baseline"]


@pytest.mark.parametrize("only_arms, message", [
    (["baseline", "nope"], "only_arms: 'nope' not among the arms (baseline, int6, gptq-int6, gptq-int6-lcq)"),
    (["nope", "neither"], "only_arms: 'nope', 'neither' not among the arms"),
    (["int6"], "report.baseline_arm: 'baseline' is not an arm that only_arms selects (arms: int6)"),
    ([], "only_arms: [] should be non-empty"),
    (["int6", "int6"], "only_arms: ['int6', 'int6'] has non-unique elements"),
    ("int6", "only_arms: 'int6' is not of type 'array', 'null'"),
])
def test_only_arms_problems_name_the_key(only_arms, message):
    cfg = default_config()
    cfg["only_arms"] = only_arms
    with pytest.raises(caddie.ConfigError) as err:
        caddie.validate(cfg, source="preset.yaml")
    assert message in str(err.value) and "preset.yaml" in str(err.value)


@pytest.mark.parametrize("record, seeds", [("1855", [42, 0, 1234]), ("2135", [314, 42, 0])])
def test_record_preset_runs_exactly_its_arm_with_its_three_seeds(record, seeds):
    import yaml
    preset = caddie.STAGES_DIR.parent / "presets" / f"record-{record}.yaml"
    cfg = caddie.deep_merge(default_config(), yaml.safe_load(preset.read_text()))  # as --configfile merges
    assert set(cfg["arms"]) > {f"record-{record}", "baseline"}  # the demo's arms are merged in ...
    caddie.validate(cfg, source=str(preset))
    plan = caddie.plan(cfg)
    assert list(cfg["arms"]) == list(plan["arms"]) == [f"record-{record}"]  # ... and do not run
    assert cfg["seeds"] == seeds and cfg["report"]["baseline_arm"] == f"record-{record}"
    assert {stage: len(keys) for stage, keys in plan["stages"].items() if keys} == {
        "tokenize": 1, "train": 1, "quantize": 1, "evaluate": 6}  # one arm: 2 points x 3 modes
    tok = plan["stages"]["tokenize"][plan["arms"][f"record-{record}"]["tokenize"]]["config"]
    assert tok == {"source": "challenge", "challenge": {
        "dir": "data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved",
        "tokenizer": "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model",
        "raw_val_bytes": None}, "caseops": True}
