def tokenize_sources(wc):
    """Corpus files are inputs, so editing one reruns tokenize (python-docs has none)."""
    tok = PLAN["stages"]["tokenize"][wc.key]["config"]
    if tok["source"] == "files":
        return [str(p) for p in caddie.corpus_files(tok)]
    if tok["source"] == "challenge":
        return caddie.challenge_files(tok)
    return []


rule tokenize:
    input:
        sources=tokenize_sources,
        code=code("tokenize"),
    output:
        manifest="artifacts/tokenize/{key}/manifest.json",
        tokenizer="artifacts/tokenize/{key}/tokenizer.model",
        summary="artifacts/tokenize/{key}/summary.json",
    params:
        config=stage_config("tokenize"),
    log:
        "logs/tokenize/{key}.log",
    benchmark:
        "benchmarks/tokenize/{key}.tsv"
    shell:
        "{PYTHON} -m stages.tokenize --config {params.config:q} "
        "--out-dir artifacts/tokenize/{wildcards.key} > {log} 2>&1"
