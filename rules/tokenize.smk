rule tokenize:
    input:
        sources=lambda wc: INPUT_FILES[wc.key],  # corpus files, challenge shards, a given tokenizer_model
    output:
        manifest=update("artifacts/tokenize/{key}/manifest.json"),
        tokenizer=update("artifacts/tokenize/{key}/tokenizer.model"),
        summary=update("artifacts/tokenize/{key}/summary.json"),
    params:
        config=stage_config("tokenize"),
    threads: 8  # SentencePiece trains on several cores
    resources:
        mem_mb=16000,  # SentencePiece holds its sample of train documents in memory
    log:
        "logs/tokenize/{key}.log",
    benchmark:
        "benchmarks/tokenize/{key}.tsv"
    shell:
        "{PYTHON} -m stages.tokenize --config {params.config:q} "
        "--out-dir artifacts/tokenize/{wildcards.key} > {log} 2>&1"
