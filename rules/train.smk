def train_curriculum(wc):
    """The bucket file and the summary that records its sha256, when the curriculum is on."""
    inputs = PLAN["stages"]["train"][wc.key]["inputs"]
    if "curriculum" not in inputs:
        return {}
    folder = f"artifacts/curriculum/{inputs['curriculum']}"
    return {"curriculum": f"{folder}/buckets.npz", "curriculum_summary": f"{folder}/summary.json"}


rule train:
    input:
        unpack(train_curriculum),
        manifest=lambda wc: manifest_path(upstream("train", wc.key, "tokenize")),
    output:
        model=update("artifacts/train/{key}/seed{seed}/model.pt"),
        metrics=update("artifacts/train/{key}/seed{seed}/metrics.jsonl"),
        summary=update("artifacts/train/{key}/seed{seed}/summary.json"),
        log=update("artifacts/train/{key}/seed{seed}/train.log"),
    params:
        config=stage_config("train"),
        run=run_settings("train"),
        launcher=launcher("train"),
        curriculum=lambda wc: " ".join(f"--{k.replace('_', '-')} {p}" for k, p in train_curriculum(wc).items()),
        resume_dir="artifacts/train/{key}/seed{seed}/resume",
    threads: per_process("train", 2, 8)
    resources:
        gpu=stage_gpus("train"),
        mem_mb=per_process("train", 8000, 25000),
    log:
        "logs/train/{key}/seed{seed}.log",
    benchmark:
        "benchmarks/train/{key}/seed{seed}.tsv"
    shell:
        "{PYTHON} {params.launcher} -m stages.train --config {params.config:q} --run-settings {params.run:q} "
        "--manifest {input.manifest} {params.curriculum} --seed {wildcards.seed} "
        "--out-dir artifacts/train/{wildcards.key}/seed{wildcards.seed} --resume-dir {params.resume_dir} > {log} 2>&1"
