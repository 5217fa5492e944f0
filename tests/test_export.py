"""The exported train_gpt.py: generated from caddie's code, run from its own folder with python and torchrun, it
reproduces the pipeline's numbers bit for bit; its counted bytes are the code bytes of every artifact of the arm."""
import ast
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, default_config, tiny_train_config
from stages import codesize, export, records
from stages import config as caddie


def tiny_arm(**train) -> dict:
    """The default stages merged with tiny shapes: curriculum on (as the demo), rtn int8, two eval modes."""
    cfg = copy.deepcopy(default_config()["defaults"])
    cfg["tokenize"]["vocab_size"] = 512
    cfg["curriculum"].update(buckets=4)
    cfg["train"] = tiny_train_config(iterations=16, warmdown_iters=6, micro_batches=2, checkpoint_every=5, **train)
    cfg["quantize"]["calibration"].update(batches=2, batch_seqs=8, seq_len=64)
    cfg["quantize"].update(keep_float_max_numel=1024, code_accounting="minified")
    cfg["evaluate"].update(modes=["standard", "sliding"], seq_len=64, stride=32)
    return cfg


def exported(cfg: dict, folder):
    spec = caddie.export_spec(cfg)
    info = export.write_export(spec, folder)
    return spec, info


def environment(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def launch(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def pipeline_run(spec: dict, cfg: dict, data, code, work, nproc: int) -> dict:
    """The arm's stages as the rules run them (python -m stages.X, torchrun for nproc > 1): eval results by
    (point, mode), the quantize summary, and the artifact's size with `code` (as the artifact_size rule)."""
    def stage(module, *args, procs=1):
        separator = ["--"] if procs > 1 else []  # torchrun 2.13 takes train's --run for its --run-path
        done = subprocess.run([*launch(procs), "-m", f"stages.{module}", *separator, *map(str, args)], cwd=ROOT,
                              env=environment(), capture_output=True, text=True)
        assert done.returncode == 0, f"stages.{module}: {done.stderr[-3000:]}"
    train = {**spec["train"], "train": {**spec["train"]["train"], "nproc": nproc}}
    run = {k: cfg["train"][k] for k in caddie.RUN_SETTINGS["train"]}
    stage("curriculum", "--config", json.dumps(spec["curriculum"]), "--manifest", data["manifest"],
          "--out", work / "buckets.npz", "--summary", work / "curriculum.json")
    stage("train", "--config", json.dumps(train), "--run-settings", json.dumps(run), "--manifest", data["manifest"],
          "--curriculum", work / "buckets.npz", "--curriculum-summary", work / "curriculum.json", "--seed", 7,
          "--out-dir", work / "train", "--resume-dir", work / "resume", procs=nproc)
    stage("quantize", "--config", json.dumps(spec["quantize"]),
          "--checkpoint", work / "train" / "model.pt", "--checkpoint-summary", work / "train" / "summary.json",
          "--manifest", data["manifest"], "--seed", 7, "--out", work / "artifact.bin", "--summary", work / "q.json")
    results = {}
    for ev in spec["evaluations"]:
        model, summary = ((work / "train" / "model.pt", work / "train" / "summary.json") if ev["point"] == "prequant"
                          else (work / "artifact.bin", work / "q.json"))
        out = work / f"{ev['point']}_{ev['mode']}.json"
        stage("evaluate", "--config", json.dumps({**ev, "nproc": nproc}), "--mode", ev["mode"], "--model", model,
              "--model-summary", summary, "--manifest", data["manifest"], "--out", out, procs=nproc)
        results[(ev["point"], ev["mode"])] = json.loads(out.read_text())
    quantized = json.loads((work / "q.json").read_text())
    size = codesize.artifact_size(json.loads(code.read_text()), quantized, spec["quantize"]["cap_bytes"], "q.json")
    return {"evals": results, "quantize": quantized, "size": size}


def export_run(folder, data, nproc: int) -> subprocess.CompletedProcess:
    """`python train_gpt.py` (or torchrun) from inside the export folder, nothing of caddie on the path."""
    return subprocess.run([*launch(nproc), "train_gpt.py"], cwd=folder, capture_output=True, text=True,
                          env=environment(DATA_PATH=str(data["dir"]), SEED="7", RUN_ID="check"))


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_exported_file_reproduces_the_pipeline_bit_for_bit(tiny_data, tmp_path, nproc):
    cfg = tiny_arm()
    folder = tmp_path / "submission"
    spec, info = exported(cfg, folder)
    done = export_run(folder, tiny_data, nproc)
    assert done.returncode == 0, done.stderr[-4000:]
    pipeline = pipeline_run(spec, cfg, tiny_data, folder / "code.json", tmp_path / "pipeline", nproc)
    run = folder / "runs" / "check"
    for (point, mode), expected in pipeline["evals"].items():
        got = json.loads((run / "evaluate" / f"{point}_{mode}.json").read_text())
        assert got["val_bpb"] == expected["val_bpb"] and got["tokens"] == expected["tokens"], (point, mode)
        assert got["nproc"] == nproc
    summary = json.loads((run / "quantize" / "summary.json").read_text())
    assert summary["artifact_sha256"] == pipeline["quantize"]["artifact_sha256"]
    size = json.loads((run / "size_quant.json").read_text())
    assert size == {**pipeline["size"], "code": {**pipeline["size"]["code"], "file": size["code"]["file"]}}
    assert size["model_bytes"] == (run / "quantize" / "artifact.bin").stat().st_size
    assert size["code_bytes"] == info["bytes"] == codesize.counted_bytes(
        (folder / "train_gpt.py").read_text(), "minified")["bytes"]
    log = (folder / "logs" / "check.txt").read_text()
    assert f"Total submission size quantized+zlib: {size['total_bytes']} bytes" in log
    printed = done.stdout.splitlines()
    assert all(line in printed for line in log.splitlines())  # the log's lines, each printed once
    assert sum(line.startswith("step:") for line in printed) == sum(line.startswith("step:") for line in log.splitlines())
    parsed = records.parse_log(folder / "logs" / "check.txt")
    score = pipeline["evals"][("quant", "sliding")]
    assert parsed["seed"] == 7 and parsed["artifact_bytes"] == size["total_bytes"]
    assert parsed["final"]["mode"] == "sliding" and parsed["final"]["val_bpb"] == round(score["val_bpb"], 8)


def test_the_file_imports_nothing_of_stages_from_disk(tmp_path):
    text = export.generate(caddie.export_spec(tiny_arm()))
    imports = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any("stages" in ast.unparse(n) for n in imports)
    namespace = {}
    exec(compile(text.replace('if __name__ == "__main__":', "if False:"), "train_gpt.py", "exec"), namespace)
    for name, source in namespace["SOURCES"].items():
        tree = ast.parse(source)
        modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(m == "stages" or m.startswith("stages.") for m in modules), name


def test_every_module_the_entry_imports_ships_and_only_those():
    text = export.generate(caddie.export_spec(tiny_arm()))
    shipped = set(export.shipped_modules())
    assert {"train", "quantize", "evaluate", "rescue", "model", "recordrun", "codesize"} <= shipped
    assert not shipped & {"config", "export", "aggregate", "submission", "tokenize", "records"}
    for name in shipped:
        assert f"'_caddie.{name}'" in text


def test_the_spec_is_what_the_plan_gives_the_stages():
    cfg = default_config()
    plan = caddie.plan(cfg)
    for arm, keys in plan["arms"].items():
        spec = plan["exports"][keys["export"]]
        stages = plan["stages"]
        assert spec["train"] == stages["train"][keys["train"]]["config"]
        assert stages["quantize"][keys["quantize"]]["config"] == spec["quantize"]  # no size target: no code in it
        chain = [(ev["point"], ev["mode"]) for ev in spec["evaluations"]]
        for ev in spec["evaluations"]:
            assert ev == stages["evaluate"][keys["evaluate"][ev["point"]][ev["mode"]]]["config"]
        assert chain[-1] == (("rescue" if "rescue" in keys else "quant"), "ttt")


@pytest.mark.parametrize("rescue, modes, chain", [
    (False, ["standard"], "prequant/standard quant/standard"),
    (False, ["sliding", "standard"], "prequant/standard quant/standard quant/sliding"),
    (True, ["ttt", "standard", "sliding"], "prequant/standard quant/standard rescue/standard rescue/sliding rescue/ttt"),
    (True, ["ttt"], "prequant/ttt quant/ttt rescue/ttt"),
])
def test_the_evaluations_are_the_decomposition_chain_the_aggregate_reads(rescue, modes, chain):
    """Both take it from config.chain_of: each point at the first mode, then the other modes at the last point."""
    cfg = tiny_arm()
    cfg["evaluate"]["modes"] = modes
    cfg["rescue"]["calibrate"]["enabled"] = rescue
    assert [f"{ev['point']}/{ev['mode']}" for ev in caddie.export_spec(cfg)["evaluations"]] == chain.split()


def test_environment_overrides_the_defaults_and_names_a_bad_value():
    from stages import recordrun
    spec = caddie.export_spec(tiny_arm())
    spec["run"] = dict(recordrun.RUN_DEFAULTS)
    changed = recordrun.with_environment(spec, {"ITERATIONS": "3", "EVAL_STRIDE": "16", "MATRIX_LR": "0.5"})
    assert changed["train"]["train"]["iterations"] == 3 and changed["train"]["train"]["optimizer"]["matrix_lr"] == 0.5
    assert [ev.get("stride") for ev in changed["evaluations"]] == [None, None, 16]  # standard has no stride
    with pytest.raises(ValueError, match=r"environment ITERATIONS='many': not a int"):
        recordrun.with_environment(spec, {"ITERATIONS": "many"})


def test_counted_code_is_the_records_measure():
    source = "def f(x):\n    '''doc'''\n    assert x\n    return x + 1  # one\n"
    raw = codesize.counted_bytes(source, "raw")
    small = codesize.counted_bytes(source, "minified")
    assert raw["bytes"] == len(source.encode())
    wrapper = codesize.wrapped(codesize.minify(source))
    assert small["bytes"] == len(wrapper) and wrapper.startswith(b"import brotli as B,base64 as b\nexec(")
    namespace = {}
    exec(wrapper, namespace)  # the wrapper runs the minified code
    assert namespace["f"](1) == 2
    with pytest.raises(ValueError, match="quantize.code_accounting: 'lzma'"):
        codesize.counted_bytes(source, "lzma")


def test_a_record_preset_exports_without_running(tmp_path):
    out = subprocess.run([sys.executable, "-m", "stages.export", "--configfile", "presets/record-1855.yaml",
                          "--arm", "record-1855", "--out-dir", str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    counted = json.loads(out.stdout.splitlines()[-1])
    text = (tmp_path / "train_gpt.py").read_text()
    assert counted["accounting"] == "minified" and counted["bytes"] == codesize.counted_bytes(text, "minified")["bytes"]
    assert "torch==" in (tmp_path / "requirements.txt").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_exported_file_runs_on_a_gpu_under_torchrun(tiny_data, tmp_path):
    """The records' GPU command, `torchrun --standalone --nproc_per_node=N train_gpt.py`, on the GPUs there are
    (bench/device_check.sh runs it on a lent one); the score is not compared with the CPU's (GPU kernels round
    differently), only that the run completes and its log reads back."""
    cfg = tiny_arm()
    for section in (cfg["train"], cfg["quantize"], cfg["evaluate"]):
        section["device"] = "cuda"
    folder = tmp_path / "submission"
    exported(cfg, folder)
    gpus = torch.cuda.device_count()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                           "train_gpt.py"], cwd=folder, capture_output=True, text=True,
                          env=environment(DATA_PATH=str(tiny_data["dir"]), SEED="7", RUN_ID="gpu"))
    assert done.returncode == 0, done.stderr[-4000:]
    parsed = records.parse_log(folder / "logs" / "gpu.txt")
    assert parsed["seed"] == 7 and parsed["final"]["mode"] == "sliding" and 0 < parsed["final"]["val_bpb"] < 20
    result = json.loads((folder / "runs" / "gpu" / "evaluate" / "quant_sliding.json").read_text())
    assert result["nproc"] == gpus
