"""End to end through the real `snakemake` CLI, on a tiny configuration in a copy of the workflow."""
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, default_config
from stages import config as caddie
from stages import codesize, records, report

pytestmark = pytest.mark.pipeline
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def tiny_config() -> dict:
    cfg = default_config()
    cfg["seeds"] = [1, 2]
    d = cfg["defaults"]
    d["tokenize"].update(max_docs=500, val_docs=40, vocab_size=384)
    d["curriculum"]["buckets"] = 4
    d["train"]["model"].update(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
    d["train"].update(seq_len=32, batch_tokens=512, iterations=20, warmdown_iters=5, checkpoint_every=0)
    d["quantize"]["calibration"].update(batches=2, batch_seqs=8, seq_len=32)
    d["quantize"]["keep_float_max_numel"] = 256  # the 32-wide model's matrices are small
    d["rescue"]["lcq"]["steps"] = 10
    d["rescue"]["data"].update(batches=2, batch_seqs=8, seq_len=32, holdout_batches=1)
    d["evaluate"].update(seq_len=32, stride=16, batch_seqs=64)
    d["evaluate"]["ttt"].update(chunk_tokens=2048, batch_seqs=8)
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A copy of the workflow (so artifacts land in a temp folder) with a tiny config, run once."""
    work = copy_workflow(tmp_path_factory.mktemp("workflow"))
    write_config(work, tiny_config())
    done = snakemake(work, "--cores", "2")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return work


def copy_workflow(work: Path) -> Path:
    for name in ("Snakefile", "rules", "schemas", "stages", "profiles", "presets", "config.yaml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    return work


def write_config(work, cfg):
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))


def snakemake(work, *args):
    return subprocess.run([SNAKEMAKE, "--configfile", "tiny.yaml", *args], cwd=work,
                          capture_output=True, text=True, timeout=600)


def planned_jobs(work, *args) -> dict:
    """{rule: count} from the job-stats table of a dry run."""
    done = snakemake(work, "-n", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout.split("Job stats:")[-1] if "Job stats:" in done.stdout else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_full_run_produces_every_output(workdir):
    for name in ("results.csv", "stats.json", "report.md", "report.html", *report.FIGURES.values()):
        assert (workdir / "reports" / name).stat().st_size > 0
    modes = len(tiny_config()["defaults"]["evaluate"]["modes"])
    results = (workdir / "reports" / "results.csv").read_text().splitlines()
    points = sum(len(keys["evaluate"]) for keys in caddie.plan(tiny_config())["arms"].values())
    assert len(results) == 1 + points * 2 * modes  # header + (arm, point) x seeds x modes
    trains = list((workdir / "artifacts" / "train").glob("*/seed*/model.pt"))
    assert len(trains) == 2  # arms that differ only in quantization share the training runs
    plan = caddie.plan(tiny_config())
    assert len(list((workdir / "artifacts" / "quantize").glob("*/seed*/artifact.bin"))) == \
        len(plan["stages"]["quantize"]) * 2  # arms with the same quantize settings share artifacts
    rescued = [a for a, keys in plan["arms"].items() if "rescue" in keys]
    assert rescued and len(list((workdir / "artifacts" / "rescue").glob("*/seed*/artifact.bin"))) == \
        len(rescued) * 2
    assert "## Rescue" in (workdir / "reports" / "report.md").read_text()
    assert len(list((workdir / "benchmarks" / "train").glob("*/seed*.tsv"))) == 2


def test_immediate_dry_run_has_nothing_to_do(workdir):
    assert planned_jobs(workdir) == {}


def test_changing_a_quantize_setting_reruns_only_what_follows(workdir):
    cfg = tiny_config()
    cfg["defaults"]["quantize"]["clip_percentile"] = 99.9
    write_config(workdir, cfg)
    try:
        jobs = planned_jobs(workdir)
    finally:
        write_config(workdir, tiny_config())
    plan = caddie.plan(cfg)
    quantizers, modes = len(plan["stages"]["quantize"]), len(cfg["defaults"]["evaluate"]["modes"])
    rescues = len(plan["stages"]["rescue"])
    assert jobs.get("quantize") == quantizers * 2 and jobs.get("aggregate") == 1
    assert jobs.get("rescue") == rescues * 2  # downstream of quantize, so it reruns too
    artifacts = len({k for keys in plan["arms"].values() for k in keys["evaluate"]["quant"].values()}) // modes
    assert jobs.get("evaluate") == (artifacts + rescues) * 2 * modes  # quant and rescue points only (arms whose
    # exports differ share one artifact's evaluations)
    for upstream in ("tokenize", "curriculum", "train"):
        assert upstream not in jobs
    assert planned_jobs(workdir) == {}  # switching back finds the old outputs


def test_unknown_config_key_fails_with_its_path(workdir):
    cfg = tiny_config()
    cfg["arms"]["int6"]["quantize"]["bitz"] = 6
    write_config(workdir, cfg)
    try:
        done = snakemake(workdir, "-n")
    finally:
        write_config(workdir, tiny_config())
    assert done.returncode != 0
    assert "arms.int6.quantize.bitz: unknown key" in done.stdout + done.stderr


def test_submission_export_of_the_rescued_arm(workdir):
    done = snakemake(workdir, "--cores", "2", "submission/gptq-int6-lcq/submission.json")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = workdir / "submission" / "gptq-int6-lcq"
    sub = json.loads((folder / "submission.json").read_text())
    stats = json.loads((workdir / "reports" / "stats.json").read_text())
    score = stats["scores"]["gptq-int6-lcq"]
    assert sub["score"] == f"{score['point']}/{score['mode']}" == "rescue/ttt"
    assert sub["val_bpb"] == pytest.approx(score["mean"], abs=1e-8) and sub["seeds"] == [1, 2]
    assert sub["compliance"] == {"train_under_600s": True, "eval_under_600s": True, "artifact_under_16mb": True,
                                 "no_val_in_training": True, "score_first_eval": True, "three_seeds": False,
                                 "no_resumed_runs": True}
    exported = (folder / "train_gpt.py").read_text()  # the counted code is the file that ships
    assert sub["bytes_code"] == codesize.counted_bytes(exported, "raw")["bytes"] and "torch==" in (
        folder / "requirements.txt").read_text()
    for seed, result in sub["seed_results"].items():
        log = records.parse_log(folder / f"train_seed{seed}.log")
        assert (log["final"]["val_bpb"], log["artifact_bytes"], log["train_steps"]) == (
            result["val_bpb"], result["artifact_bytes"], result["steps"])
    readme = (folder / "README.md").read_text()
    assert "- [ ] three_seeds: 2 seeds" in readme and "## Decomposition" in readme
    for seed in (1, 2):
        assert (folder / f"train_seed{seed}.log").read_text().strip()


def test_snakemake_report_bundles_the_registered_outputs(workdir):
    done = snakemake(workdir, "--report", "snakemake-report.zip")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with zipfile.ZipFile(workdir / "snakemake-report.zip") as z:
        names = "\n".join(z.namelist())
    for name in ("report.html", "stats.json", "results.csv", *(Path(f).name for f in report.FIGURES.values())):
        assert name in names


@contextlib.contextmanager
def config_changed(work, change):
    """The tiny config with `change(cfg)` applied, restored afterwards."""
    cfg = tiny_config()
    change(cfg)
    write_config(work, cfg)
    try:
        yield cfg
    finally:
        write_config(work, tiny_config())


@contextlib.contextmanager
def file_edited(path, edit):
    original = path.read_text()
    path.write_text(edit(original))
    try:
        yield
    finally:
        path.write_text(original)


def digests(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("key, value", [("log_every", 3), ("checkpoint_every", 7)])
def test_run_settings_do_not_retrain(workdir, key, value):
    with config_changed(workdir, lambda cfg: cfg["defaults"]["train"].update({key: value})):
        assert planned_jobs(workdir) == {"aggregate_plan": 1, "aggregate": 1, "all": 1}  # only the report, which shows the config


def recounted(before: dict, after: dict, seeds: list) -> dict:
    """The export and artifact_size jobs of the arms whose exported file changed between two plans: a changed
    eval setting changes what ships, so its artifacts are counted again (and nothing is quantized again)."""
    arms = [keys for arm, keys in after["arms"].items() if keys["export"] != before["arms"][arm]["export"]]
    sizes = {(keys["export"], keys[stage], seed) for keys in arms for stage in ("quantize", "rescue") if stage in keys
             for seed in seeds}
    return {"export": len({keys["export"] for keys in arms}), "artifact_size": len(sizes)} if arms else {}


def test_ttt_settings_rerun_only_the_ttt_evaluations_and_the_budget_only_the_report(workdir):
    plan = caddie.plan(tiny_config())
    ttt_evals = len({k for keys in plan["arms"].values() for modes in keys["evaluate"].values()
                     for m, k in modes.items() if m == "ttt"}) * 2
    changed = tiny_config()
    changed["defaults"]["evaluate"]["ttt"].update(lr=0.001)
    counts = recounted(plan, caddie.plan(changed), changed["seeds"])
    assert counts["export"] >= 1 and counts["artifact_size"] >= 2
    with config_changed(workdir, lambda cfg: cfg["defaults"]["evaluate"]["ttt"].update(lr=0.001)):
        assert planned_jobs(workdir) == {"evaluate": ttt_evals, **counts, "aggregate_plan": 1, "aggregate": 1,
                                         "all": 1}
    with config_changed(workdir, lambda cfg: cfg["defaults"]["evaluate"].update(budget_seconds=1)):
        assert planned_jobs(workdir) == {"aggregate_plan": 1, "aggregate": 1, "all": 1}


def test_a_moved_project_under_another_interpreter_path_reruns_nothing(workdir, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(workdir, moved, symlinks=True)
    venv = tmp_path / "venv-elsewhere"  # the same environment reached by another path
    venv.symlink_to(Path(sys.prefix), target_is_directory=True)
    python = venv / "bin" / Path(sys.executable).name
    done = subprocess.run([str(python), "-m", "snakemake", "--configfile", "tiny.yaml", "-n"], cwd=moved,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Nothing to be done" in done.stdout + done.stderr, done.stdout[-3000:]


@pytest.mark.parametrize("change, message", [
    (lambda cfg: cfg["defaults"]["tokenize"].update(source="files", files={"paths": ["corpus/*.txt"],
                                                                            "txt_split": "file", "text_field": "text"}),
     "tokenize.files.paths: 'corpus/*.txt' matches no file"),
    (lambda cfg: cfg["defaults"]["tokenize"].update(tokenizer_model="missing.model"),
     "tokenize.tokenizer_model: 'missing.model' is not a file"),
])
def test_input_problems_fail_the_invocation_whatever_exists(workdir, change, message):
    for target in ([], ["all_train"], ["reports/stats.json"]):
        with config_changed(workdir, change):
            done = snakemake(workdir, "-n", *target)
        assert done.returncode != 0 and message in done.stdout + done.stderr, (target, done.stdout[-2000:])


def test_preset_with_its_data_missing_fails_after_a_completed_run(workdir):
    done = subprocess.run([SNAKEMAKE, "--configfile", "presets/h100x8-sp1024.yaml", "-n"], cwd=workdir,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "tokenize.challenge.dir: 'data/datasets/fineweb10B_sp1024' is not a directory" in done.stdout + done.stderr


def test_overwriting_a_given_tokenizer_model_reruns_tokenize(workdir, tmp_path):
    models = sorted((workdir / "artifacts" / "tokenize").glob("*/tokenizer.model"))
    given = workdir / "given.model"
    shutil.copy(models[0], given)

    def use_given(cfg):
        cfg["defaults"]["tokenize"]["tokenizer_model"] = "given.model"

    with config_changed(workdir, use_given):
        done = snakemake(workdir, "--cores", "2", "all_tokenize")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert planned_jobs(workdir, "all_tokenize") == {}
        given.write_bytes(given.read_bytes() + b"\0")  # a different file at the same path
        assert planned_jobs(workdir, "all_tokenize").get("tokenize") == 1


def test_a_broken_stage_keeps_the_last_good_outputs_and_reverting_it_reruns_nothing(workdir):
    before_train = digests(workdir / "artifacts" / "train")
    before_reports = digests(workdir / "reports")
    train_py = workdir / "stages" / "train.py"
    with file_edited(train_py, lambda text: text.replace("def main(argv=None):\n",
                                                          "def main(argv=None):\n    raise RuntimeError('broken')\n")):
        done = snakemake(workdir, "--cores", "2")
        assert done.returncode != 0 and "broken" in done.stdout + done.stderr + "".join(
            p.read_text() for p in (workdir / "logs" / "train").rglob("*.log"))
    assert {k: v for k, v in digests(workdir / "artifacts" / "train").items() if k in before_train} == before_train
    assert digests(workdir / "reports") == before_reports
    # The reverted code maps back to the old keys: no stage reruns. Only the report can: aggregate_plan (local,
    # no inputs) may have run in the broken invocation and written the plan of the broken keys.
    assert set(planned_jobs(workdir)) <= {"aggregate_plan", "aggregate", "all"}


def test_a_failing_aggregate_keeps_the_last_good_reports(workdir):
    before = digests(workdir / "reports")
    (workdir / "bad.log").write_text("not a train log\n")
    with config_changed(workdir, lambda cfg: cfg["report"].update(published_logs=["bad.log"])):
        done = snakemake(workdir, "--cores", "2")
        assert done.returncode != 0
        assert "Restored previous version" in done.stdout + done.stderr
    assert digests(workdir / "reports") == before
    # Snakemake keeps the failed job's provenance, so the report is made again, and nothing else is.
    assert set(planned_jobs(workdir)) <= {"aggregate_plan", "aggregate", "all"}


def test_a_trainer_orphaned_by_a_killed_snakemake_blocks_a_second_one_then_resumes(workdir):
    def slow(cfg):
        cfg["defaults"]["train"].update(iterations=10**6, max_seconds=30, checkpoint_every=5, log_every=100)

    plan = caddie.plan(tiny_config())
    with config_changed(workdir, slow) as cfg:
        key = caddie.plan(cfg)["arms"]["baseline"]["train"]
        target = f"artifacts/train/{key}/seed1/model.pt"
        run_dir = workdir / "artifacts" / "train" / key / "seed1"
        first = subprocess.Popen([SNAKEMAKE, "--configfile", "tiny.yaml", "--cores", "1", target],
                                 cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lock, state = run_dir / "resume" / "train.lock", run_dir / "resume" / "state.pt"
        deadline = time.time() + 300
        while not (state.exists() and lock.exists()) and time.time() < deadline:
            time.sleep(0.5)
        assert state.exists(), "the trainer never checkpointed"
        orphan = int(lock.read_text().split()[1])
        first.send_signal(signal.SIGKILL)  # snakemake dies; its trainer runs on
        first.wait()
        os.kill(orphan, signal.SIGSTOP)  # alive, but it cannot finish while the second snakemake starts
        try:
            assert snakemake(workdir, "--unlock").returncode == 0
            second = snakemake(workdir, "--cores", "1", "--rerun-incomplete", target)
            assert second.returncode != 0
            log = (workdir / "logs" / "train" / key / "seed1.log").read_text()
            assert f"another trainer (pid {orphan}" in log
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(orphan, signal.SIGKILL)
        deadline = time.time() + 30
        while lock.exists() and Path(f"/proc/{orphan}").exists() and time.time() < deadline:
            time.sleep(0.2)
        third = snakemake(workdir, "--cores", "1", "--rerun-incomplete", target)
        assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["resumed"] and summary["stopped_by"] == "wallclock"
        train_log = (run_dir / "train.log").read_text()
        assert train_log.count("# started at step 0") == 1 and "# resumed at step" in train_log
    assert plan == caddie.plan(tiny_config())


def fake_results(work, runs):
    """Synthetic files at every path the aggregate reads (eval results, train and quantize summaries, sizes)."""
    for i, r in enumerate(runs):
        bpb = 1.2 + 0.001 * (i % 7) + 0.0001 * len(r["arm"]) + (0.01 if r["point"] != "prequant" else 0)
        files = {r["eval"]: {"point": r["point"], "mode": r["mode"], "tokens": 1000, "bytes": 2400,
                             "raw_bytes": None, "loss_nats": bpb * 2400 * 0.6931 / 1000, "val_bpb": bpb,
                             "seconds": 1.0},
                 r["train_summary"]: {"steps": 20, "train_seconds": 3.0},
                 r["quantize_summary"]: {"model_bytes": 90_000},
                 r["size"]: {"code_bytes": 10_000, "model_bytes": 90_000, "total_bytes": 100_000}}
        for path, content in files.items():
            if path:
                (work / path).parent.mkdir(parents=True, exist_ok=True)
                (work / path).write_text(json.dumps(content))
        (work / r["train_metrics"]).write_text(json.dumps({"step": 1, "loss": 5.0, "ms": 10.0}) + "\n")


def test_twenty_arms_by_ten_seeds_plan_and_aggregate_through_a_file(tmp_path):
    """The runs reach the aggregate in a file: on the command line they would pass Linux's 128 KiB limit on
    one argument ('Argument list too long')."""
    work = copy_workflow(tmp_path)
    cfg = tiny_config()
    cfg["seeds"] = list(range(1, 11))
    cfg["arms"] = {f"arm-{i}": {"quantize": {"clip_percentile": 99.0 + i / 20}} for i in range(20)}
    cfg["defaults"]["evaluate"]["modes"] = ["standard", "sliding"]
    cfg["report"].update(baseline_arm="arm-0", reference=None)
    write_config(work, cfg)
    jobs = planned_jobs(work)  # the arms of config.yaml too: --configfile merges into it
    assert jobs["quantize"] >= 200 and jobs["evaluate"] >= 10 * 2 + 200 * 2 and jobs["aggregate"] == 1
    only = ["--allowed-rules", "aggregate_plan", "aggregate", "--cores", "1"]
    done = snakemake(work, *only, "artifacts/aggregate/plan.json")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((work / "artifacts/aggregate/plan.json").read_text())
    ours = [r for r in plan["runs"] if r["arm"].startswith("arm-")]
    assert len(ours) == 20 * 10 * 4 and len(json.dumps(plan["runs"])) > 128 * 1024
    fake_results(work, plan["runs"])
    done = snakemake(work, *only, "reports/stats.json")
    assert done.returncode == 0, done.stderr[-3000:] + (work / "logs/aggregate.log").read_text()[-3000:]
    stats = json.loads((work / "reports/stats.json").read_text())
    assert {f"arm-{i}" for i in range(1, 20)} <= set(stats["vs_baseline"])
    assert all(c["test"] == "paired t" and c["n"] == 10 for c in stats["vs_baseline"].values())
