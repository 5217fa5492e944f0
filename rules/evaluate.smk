def eval_model(wc):
    """The checkpoint (prequant) or the artifact (quant) this evaluation scores."""
    inputs = PLAN["stages"]["evaluate"][wc.key]["inputs"]
    if wc.point == "prequant":
        return f"{train_dir(inputs['train'], wc.seed)}/model.pt"
    return f"{quantize_dir(inputs['quantize'], wc.seed)}/artifact.bin"


def eval_manifest(wc):
    inputs = PLAN["stages"]["evaluate"][wc.key]["inputs"]
    train_key = inputs.get("train") or upstream("quantize", inputs["quantize"], "train")
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
