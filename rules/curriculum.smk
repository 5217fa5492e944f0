rule curriculum:
    input:
        manifest=lambda wc: manifest_path(upstream("curriculum", wc.key, "tokenize")),
    output:
        buckets=update("artifacts/curriculum/{key}/buckets.npz"),
        summary=update("artifacts/curriculum/{key}/summary.json"),
    params:
        config=stage_config("curriculum"),
    resources:
        mem_mb=16000,  # the per-window scores and bucket ids (the shards are memory-mapped)
    log:
        "logs/curriculum/{key}.log",
    benchmark:
        "benchmarks/curriculum/{key}.tsv"
    shell:
        "{PYTHON} -m stages.curriculum --config {params.config:q} --manifest {input.manifest} "
        "--out {output.buckets} --summary {output.summary} > {log} 2>&1"
