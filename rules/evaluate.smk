def eval_model(wc):
    """The checkpoint (prequant) or the artifact (quant, rescue) this evaluation scores, and the summary
    of the stage that wrote it (which records its sha256)."""
    inputs = PLAN["stages"]["evaluate"][wc.key]["inputs"]
    if wc.point == "prequant":
        folder = train_dir(inputs["train"], wc.seed)
        return {"model": f"{folder}/model.pt", "model_summary": f"{folder}/summary.json"}
    folder = rescue_dir(inputs["rescue"], wc.seed) if wc.point == "rescue" else quantize_dir(inputs["quantize"], wc.seed)
    return {"model": f"{folder}/artifact.bin", "model_summary": f"{folder}/summary.json"}


def eval_manifest(wc):
    inputs = PLAN["stages"]["evaluate"][wc.key]["inputs"]
    if "train" in inputs:
        train_key = inputs["train"]
    elif "quantize" in inputs:
        train_key = upstream("quantize", inputs["quantize"], "train")
    else:
        train_key = rescue_train_key(inputs["rescue"])
    return manifest_path(upstream("train", train_key, "tokenize"))


rule evaluate:
    input:
        unpack(eval_model),
        manifest=eval_manifest,
    output:
        update("artifacts/evaluate/{point}/{key}/seed{seed}/{mode}.json"),
    params:
        config=stage_config("evaluate"),
        launcher=launcher("evaluate"),
    threads: per_process("evaluate", 1, 8)
    resources:
        gpu=stage_gpus("evaluate"),
        mem_mb=per_process("evaluate", 4000, 16000),
    log:
        "logs/evaluate/{point}/{key}/seed{seed}/{mode}.log",
    benchmark:
        "benchmarks/evaluate/{point}/{key}/seed{seed}/{mode}.tsv"
    shell:
        "{PYTHON} {params.launcher} -m stages.evaluate --config {params.config:q} --mode {wildcards.mode} "
        "--model {input.model} --model-summary {input.model_summary} --manifest {input.manifest} "
        "--out {output} > {log} 2>&1"
