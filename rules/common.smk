# Helpers for the rules: config validation, the plan of keyed outputs, and paths. Logic lives in stages/.
# Every output is flagged update(): Snakemake does not delete it before its job runs, and restores the
# last good version when the job fails, so a failing rerun never loses work.
import json
import re
import sys

from stages import codesize, config as caddie
from stages.io import read_json, write_json

caddie.validate(config, source=", ".join(map(str, workflow.configfiles)) or "config")
PLAN = caddie.plan(config)
INPUT_FILES = caddie.resolve_inputs(config, PLAN)  # missing inputs fail now, whatever exists on disk
ARMS = PLAN["arms"]
PYTHON = sys.executable  # in shell text, not params: a clone or a moved venv reruns nothing


wildcard_constraints:
    key="[0-9a-f]{12}",
    seed=r"\d+",
    point="|".join(caddie.POINTS),
    mode="standard|sliding|ttt",
    arm="|".join(re.escape(a) for a in config["arms"]),


localrules:
    all,
    all_tokenize,
    all_curriculum,
    all_train,
    all_quantize,
    all_rescue,
    all_evaluate,


def stage_config(stage):
    """params function: the stage's resolved config for this key, as canonical JSON (a rerun trigger)."""
    return lambda wc: json.dumps(PLAN["stages"][stage][wc.key]["config"], sort_keys=True)


def run_settings(stage):
    """params function of the stage's run settings (how it runs, not what it computes). It takes `output`,
    which makes it a derived param: Snakemake does not rerun a job when it changes."""
    return lambda wc, output: json.dumps(PLAN["stages"][stage][wc.key]["run"], sort_keys=True)


def device_settings(stage, key):
    """(device, processes) of one job of a stage that can run on CUDA: train and evaluate run `nproc`
    processes (torchrun when > 1), quantize and rescue one."""
    section = PLAN["stages"][stage][key]["config"]
    section = section["train"] if stage == "train" else section
    return section["device"], section.get("nproc", 1)


def gpu_count(stage, key):
    """The GPUs a job holds: one per process unless its device is cpu. `auto` counts as cuda (it holds
    GPUs where there are any; stages.gpus --optional lets it run without one where the pool is empty)."""
    device, nproc = device_settings(stage, key)
    return 0 if device == "cpu" else nproc


def stage_gpus(stage):
    """resources function: the GPUs a job of the stage holds, counted by Snakemake against `--resources gpu=N`."""
    return lambda wc: gpu_count(stage, wc.key)


def per_process(stage, on_cpu, beside_gpu):
    """threads or resources function: a job's share per process, `on_cpu` or `beside_gpu` (a GPU's process
    also needs host cores and memory: data loading, the CUDA context, compile workers)."""
    def total(wc):
        device, nproc = device_settings(stage, wc.key)
        return nproc * (on_cpu if device == "cpu" else beside_gpu)
    return total


def launcher(stage):
    """params function: what runs `-m stages.<stage>` after the interpreter: nothing (plain python); torchrun
    when nproc > 1; behind stages.gpus, which gives the job its own device ids, when it holds GPUs. The GPU
    count comes from the config, not from resources.gpu, which Snakemake lowers to --resources gpu=N.
    A derived param (it takes `output`): device and nproc are in the key already."""
    def launch(wc, output):
        device, nproc = device_settings(stage, wc.key)
        parts = []
        if gpus := gpu_count(stage, wc.key):
            optional = " --optional" if device == "auto" else ""
            parts.append(f"-m stages.gpus --count {gpus}{optional} -- {PYTHON}")
        if nproc > 1:
            parts.append(f"-m torch.distributed.run --standalone --nproc_per_node={nproc}")
        return " ".join(parts)
    return launch


def check_gpu_budget():
    """Snakemake silently lowers a job's gpu resource to `--resources gpu=N`; say so when a planned job needs more."""
    limit = workflow.global_resources.get("gpu").value
    if limit is None or not workflow.is_main_process:
        return
    need = {stage: max((gpu_count(stage, key) for key in PLAN["stages"][stage]), default=0)
            for stage in ("train", "quantize", "rescue", "evaluate")}
    for stage, gpus in need.items():
        if gpus > limit:
            print(f"caddie: {stage} holds {gpus} GPUs but --resources gpu={limit}: Snakemake counts it as {limit}, "
                  f"stages.gpus still gives it {gpus} device ids (or fails if the node has fewer)", file=sys.stderr)


check_gpu_budget()


def upstream(stage, key, name):
    return PLAN["stages"][stage][key]["inputs"][name]


def code(stage):
    """The stages/ modules an unkeyed rule (aggregate, submission) runs, declared as its inputs; keyed
    stages carry the digest of their code in their key instead."""
    return caddie.stage_sources(stage)


def manifest_path(tokenize_key):
    return f"artifacts/tokenize/{tokenize_key}/manifest.json"


def train_dir(key, seed):
    return f"artifacts/train/{key}/seed{seed}"


def quantize_dir(key, seed):
    return f"artifacts/quantize/{key}/seed{seed}"


def rescue_dir(key, seed):
    return f"artifacts/rescue/{key}/seed{seed}"


def rescue_train_key(key):
    return upstream("quantize", upstream("rescue", key, "quantize"), "train")


ARTIFACT_STAGES = {"quant": "quantize", "rescue": "rescue"}  # the stage that writes a point's artifact


def artifact_summary(keys, point, seed):
    """The summary of a point's artifact (None for the prequant checkpoint)."""
    stage = ARTIFACT_STAGES.get(point)
    return f"artifacts/{stage}/{keys[stage]}/seed{seed}/summary.json" if stage else None


def artifact_size(keys, point, seed):
    """The counted bytes of a point's artifact with its arm's code (None for the prequant checkpoint)."""
    stage = ARTIFACT_STAGES.get(point)
    return f"artifacts/size/{keys['export']}/{stage}/{keys[stage]}/seed{seed}.json" if stage else None


def eval_path(point, key, seed, mode):
    return f"artifacts/evaluate/{point}/{key}/seed{seed}/{mode}.json"


def arm_outputs(stage):
    """Every output of one stage over all arms and seeds (the per-stage targets)."""
    paths = set()
    for arm, keys in ARMS.items():
        for seed in config["seeds"]:
            if stage == "tokenize":
                paths.add(manifest_path(keys["tokenize"]))
            elif stage == "curriculum" and "curriculum" in keys:
                paths.add(f"artifacts/curriculum/{keys['curriculum']}/buckets.npz")
            elif stage == "train":
                paths.add(f"{train_dir(keys['train'], seed)}/model.pt")
            elif stage == "quantize":
                paths.add(f"{quantize_dir(keys['quantize'], seed)}/artifact.bin")
            elif stage == "rescue" and "rescue" in keys:
                paths.add(f"{rescue_dir(keys['rescue'], seed)}/artifact.bin")
            elif stage == "evaluate":
                paths |= {eval_path(p, k, seed, m) for p, modes in keys["evaluate"].items() for m, k in modes.items()}
    return sorted(paths)


def aggregate_runs():
    """One record per (arm, seed, point, mode) with the files the aggregate stage reads."""
    runs = []
    for arm, keys in ARMS.items():
        budget = caddie.deep_merge(config["defaults"], config["arms"][arm])["evaluate"]["budget_seconds"]
        for seed in config["seeds"]:
            for point, modes in keys["evaluate"].items():
                for mode, key in modes.items():
                    runs.append({"arm": arm, "seed": seed, "point": point, "mode": mode,
                                 "budget_seconds": budget or None,
                                 "eval": eval_path(point, key, seed, mode),
                                 "train_summary": f"{train_dir(keys['train'], seed)}/summary.json",
                                 "train_metrics": f"{train_dir(keys['train'], seed)}/metrics.jsonl",
                                 "quantize_summary": artifact_summary(keys, point, seed),
                                 "size": artifact_size(keys, point, seed)})
    return runs


def run_files(runs):
    return sorted({path for r in runs for k in ("eval", "train_summary", "train_metrics", "quantize_summary", "size")
                   if (path := r[k])})


rule all_tokenize:
    input:
        arm_outputs("tokenize"),


rule all_curriculum:
    input:
        arm_outputs("curriculum"),


rule all_train:
    input:
        arm_outputs("train"),


rule all_quantize:
    input:
        arm_outputs("quantize"),


rule all_rescue:
    input:
        arm_outputs("rescue"),


rule all_evaluate:
    input:
        arm_outputs("evaluate"),
