"""End to end through the real `snakemake` CLI, on a tiny configuration in a copy of the workflow."""
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, default_config
from stages import config as caddie
from stages import report

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
    work = tmp_path_factory.mktemp("workflow")
    for name in ("Snakefile", "rules", "schemas", "stages", "profiles", "config.yaml"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    write_config(work, tiny_config())
    done = snakemake(work, "--cores", "2")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return work


def write_config(work, cfg):
    (work / "tiny.yaml").write_text(yaml.safe_dump(cfg))


def snakemake(work, *args):
    return subprocess.run([SNAKEMAKE, "--configfile", "tiny.yaml", *args], cwd=work,
                          capture_output=True, text=True, timeout=600)


def planned_jobs(work) -> dict:
    """{rule: count} from the job-stats table of a dry run."""
    done = snakemake(work, "-n")
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
    assert jobs.get("evaluate") == (quantizers + rescues) * 2 * modes  # quant and rescue points only
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
                                 "no_val_in_training": True, "score_first_eval": True, "three_seeds": False}
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
