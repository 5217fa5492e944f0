rule quantize:
    input:
        checkpoint=lambda wc: f"{train_dir(upstream('quantize', wc.key, 'train'), wc.seed)}/model.pt",
        checkpoint_summary=lambda wc: f"{train_dir(upstream('quantize', wc.key, 'train'), wc.seed)}/summary.json",
        manifest=lambda wc: manifest_path(upstream("train", upstream("quantize", wc.key, "train"), "tokenize")),
        code=lambda wc: PLAN["stages"]["quantize"][wc.key]["config"].get("code_file", []),  # a size target's room
    output:
        artifact=update("artifacts/quantize/{key}/seed{seed}/artifact.bin"),
        summary=update("artifacts/quantize/{key}/seed{seed}/summary.json"),
    params:
        config=stage_config("quantize"),
        launcher=launcher("quantize"),
    threads: per_process("quantize", 1, 8)
    resources:
        gpu=stage_gpus("quantize"),
        mem_mb=per_process("quantize", 8000, 16000),
    log:
        "logs/quantize/{key}/seed{seed}.log",
    benchmark:
        "benchmarks/quantize/{key}/seed{seed}.tsv"
    shell:
        "{PYTHON} {params.launcher} -m stages.quantize --config {params.config:q} --checkpoint {input.checkpoint} "
        "--checkpoint-summary {input.checkpoint_summary} --manifest {input.manifest} --seed {wildcards.seed} "
        "--out {output.artifact} --summary {output.summary} > {log} 2>&1"
