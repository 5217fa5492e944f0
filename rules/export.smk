def export_dir(key):
    return f"{caddie.EXPORT_DIR}/{key}"


def cap_bytes(stage, key):
    quantize_key = upstream("rescue", key, "quantize") if stage == "rescue" else key
    return PLAN["stages"]["quantize"][quantize_key]["config"]["cap_bytes"]


rule export:
    """An arm's single train_gpt.py, its requirements.txt and what the challenge counts of the file (no
    training needed)."""
    output:
        script=update(caddie.export_file("{key}")),
        requirements=update(f"{caddie.EXPORT_DIR}/{{key}}/requirements.txt"),
        code=update(f"{caddie.EXPORT_DIR}/{{key}}/code.json"),
    params:
        spec=lambda wc: json.dumps(PLAN["exports"][wc.key], sort_keys=True),
        out_dir=lambda wc: export_dir(wc.key),
    log:
        "logs/export/{key}.log",
    localrule: True
    shell:
        "{PYTHON} -m stages.export --spec {params.spec:q} --out-dir {params.out_dir} > {log} 2>&1"


rule artifact_size:
    """What the cap counts of one artifact: the code its arm ships plus the compressed model. Kept out of the
    quantize key, so that a change to the shipped file (an eval setting) re-counts without re-quantizing."""
    input:
        code=f"{caddie.EXPORT_DIR}/{{export}}/code.json",
        summary="artifacts/{stage}/{key}/seed{seed}/summary.json",
        source=code("codesize"),
    output:
        update("artifacts/size/{export}/{stage}/{key}/seed{seed}.json"),  # common.smk's artifact_size
    params:
        cap=lambda wc: cap_bytes(wc.stage, wc.key),
    wildcard_constraints:
        export="[0-9a-f]{12}",
        stage="quantize|rescue",
    localrule: True
    run:
        write_json(output[0], codesize.artifact_size(read_json(input.code), read_json(input.summary), params.cap,
                                                     where=input.summary))
