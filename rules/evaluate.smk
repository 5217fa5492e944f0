def eval_model(wc):
    """The checkpoint (prequant) or the artifact (quant) this evaluation scores."""
    inputs = PLAN["stages"]["evaluate"][wc.key]["inputs"]
    if wc.point == "prequant":
        return f"{train_dir(inputs['train'], wc.seed)}/model.pt"
    if wc.point == "rescue":
        return f"{rescue_dir(inputs['rescue'], wc.seed)}/artifact.bin"
    return f"{quantize_dir(inputs['quantize'], wc.seed)}/artifact.bin"


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
        model=eval_model,
        manifest=eval_manifest,
        code=code("evaluate"),
    output:
        "artifacts/evaluate/{point}/{key}/seed{seed}/{mode}.json",
    params:
        config=stage_config("evaluate"),
    log:
        "logs/evaluate/{point}/{key}/seed{seed}/{mode}.log",
    benchmark:
        "benchmarks/evaluate/{point}/{key}/seed{seed}/{mode}.tsv"
    shell:
        "{PYTHON} -m stages.evaluate --config {params.config:q} --mode {wildcards.mode} "
        "--model {input.model} --manifest {input.manifest} --out {output} > {log} 2>&1"
