def train_curriculum(wc):
    inputs = PLAN["stages"]["train"][wc.key]["inputs"]
    return [f"artifacts/curriculum/{inputs['curriculum']}/buckets.npz"] if "curriculum" in inputs else []


def train_launcher(wc):
    """torchrun when the arm asks for more than one process, else plain python."""
    nproc = PLAN["stages"]["train"][wc.key]["config"]["train"]["nproc"]
    if nproc == 1:
        return PYTHON
    return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node={nproc}"


def train_gpus(wc):
    train = PLAN["stages"]["train"][wc.key]["config"]["train"]
    return 0 if train["device"] == "cpu" else train["nproc"]


rule train:
    input:
        manifest=lambda wc: manifest_path(upstream("train", wc.key, "tokenize")),
        curriculum=train_curriculum,
        code=code("train"),
    output:
        model="artifacts/train/{key}/seed{seed}/model.pt",
        metrics="artifacts/train/{key}/seed{seed}/metrics.jsonl",
        summary="artifacts/train/{key}/seed{seed}/summary.json",
    params:
        config=stage_config("train"),
        launcher=train_launcher,
        curriculum=lambda wc: " ".join(f"--curriculum {p}" for p in train_curriculum(wc)),
        resume_dir="artifacts/train/{key}/seed{seed}/resume",
    threads: 2
    resources:
        gpu=train_gpus,
    log:
        "logs/train/{key}/seed{seed}.log",
    benchmark:
        "benchmarks/train/{key}/seed{seed}.tsv"
    shell:
        "{params.launcher} -m stages.train --config {params.config:q} --manifest {input.manifest} "
        "{params.curriculum} --seed {wildcards.seed} --out-dir artifacts/train/{wildcards.key}/seed{wildcards.seed} "
        "--resume-dir {params.resume_dir} > {log} 2>&1"
