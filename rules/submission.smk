def submission_runs(arm):
    """The arm's aggregate records, plus the quantize summary that names each seed's calibration data."""
    keys = ARMS[arm]
    return [dict(r, calibration_summary=f"{quantize_dir(keys['quantize'], r['seed'])}/summary.json")
            for r in RUNS if r["arm"] == arm]


rule submission:
    input:
        lambda wc: run_files(submission_runs(wc.arm)),
        stats="reports/stats.json",
        manifest=lambda wc: manifest_path(ARMS[wc.arm]["tokenize"]),
        train_logs=lambda wc: [f"{train_dir(ARMS[wc.arm]['train'], s)}/train.log" for s in config["seeds"]],
        code=code("submission"),
    output:
        json=update("submission/{arm}/submission.json"),
        readme=update("submission/{arm}/README.md"),
        logs=[update(p) for p in expand("submission/{{arm}}/train_seed{seed}.log", seed=config["seeds"])],
    params:
        runs=lambda wc: json.dumps(submission_runs(wc.arm), sort_keys=True),
        config=lambda wc: json.dumps(caddie.deep_merge(config["defaults"], config["arms"][wc.arm]), sort_keys=True),
        meta=json.dumps(config.get("submission", {}), sort_keys=True),
    log:
        "logs/submission/{arm}.log",
    shell:
        "{PYTHON} -m stages.submission --arm {wildcards.arm} --runs {params.runs:q} --stats {input.stats} "
        "--config {params.config:q} --meta {params.meta:q} --manifest {input.manifest} "
        "--train-log {input.train_logs:q} --out-dir submission/{wildcards.arm} > {log} 2>&1"
