rule rescue:
    input:
        artifact=lambda wc: f"{quantize_dir(upstream('rescue', wc.key, 'quantize'), wc.seed)}/artifact.bin",
        quantize_summary=lambda wc: f"{quantize_dir(upstream('rescue', wc.key, 'quantize'), wc.seed)}/summary.json",
        teacher=lambda wc: f"{train_dir(rescue_train_key(wc.key), wc.seed)}/model.pt",
        teacher_summary=lambda wc: f"{train_dir(rescue_train_key(wc.key), wc.seed)}/summary.json",
        manifest=lambda wc: manifest_path(upstream("train", rescue_train_key(wc.key), "tokenize")),
    output:
        artifact=update("artifacts/rescue/{key}/seed{seed}/artifact.bin"),
        summary=update("artifacts/rescue/{key}/seed{seed}/summary.json"),
    params:
        config=stage_config("rescue"),
        launcher=launcher("rescue"),
    threads: per_process("rescue", 1, 8)
    resources:
        gpu=stage_gpus("rescue"),
        mem_mb=per_process("rescue", 8000, 16000),
    log:
        "logs/rescue/{key}/seed{seed}.log",
    benchmark:
        "benchmarks/rescue/{key}/seed{seed}.tsv"
    shell:
        "{PYTHON} {params.launcher} -m stages.rescue --config {params.config:q} --artifact {input.artifact} "
        "--quantize-summary {input.quantize_summary} --teacher {input.teacher} "
        "--teacher-summary {input.teacher_summary} --manifest {input.manifest} "
        "--seed {wildcards.seed} --out {output.artifact} --summary {output.summary} > {log} 2>&1"
