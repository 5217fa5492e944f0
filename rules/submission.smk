def submission_runs(arm):
    """The arm's aggregate records, plus the quantize summary that names each seed's calibration data."""
    keys = ARMS[arm]
    return [dict(r, calibration_summary=f"{quantize_dir(keys['quantize'], r['seed'])}/summary.json")
            for r in RUNS if r["arm"] == arm]


def arm_config(arm):
    return json.dumps(caddie.deep_merge(config["defaults"], config["arms"][arm]), sort_keys=True)


rule submission:
    input:
        lambda wc: run_files(submission_runs(wc.arm)),
        stats="reports/stats.json",
        manifest=lambda wc: manifest_path(ARMS[wc.arm]["tokenize"]),
        calibration=lambda wc: sorted({r["calibration_summary"] for r in submission_runs(wc.arm)}),
        script=lambda wc: caddie.export_file(ARMS[wc.arm]["export"]),
        requirements=lambda wc: f"{export_dir(ARMS[wc.arm]['export'])}/requirements.txt",
        code=code("submission"),
    output:
        json=update("submission/{arm}/submission.json"),
        readme=update("submission/{arm}/README.md"),
        script=update("submission/{arm}/train_gpt.py"),
        requirements=update("submission/{arm}/requirements.txt"),
        logs=[update(p) for p in expand("submission/{{arm}}/train_seed{seed}.log", seed=config["seeds"])],
    params:
        runs=lambda wc: json.dumps(submission_runs(wc.arm), sort_keys=True),
        spec=lambda wc: json.dumps(PLAN["exports"][ARMS[wc.arm]["export"]], sort_keys=True),
        config=lambda wc: arm_config(wc.arm),
        base_arm=config["report"]["baseline_arm"],
        base_config=arm_config(config["report"]["baseline_arm"]),
        defaults=json.dumps(config["defaults"], sort_keys=True),
        meta=json.dumps(config.get("submission", {}), sort_keys=True),
        export_dir=lambda wc: export_dir(ARMS[wc.arm]["export"]),
    log:
        "logs/submission/{arm}.log",
    shell:
        "{PYTHON} -m stages.submission --arm {wildcards.arm} --runs {params.runs:q} --stats {input.stats} "
        "--spec {params.spec:q} --config {params.config:q} --base-arm {params.base_arm:q} "
        "--base-config {params.base_config:q} --defaults {params.defaults:q} --meta {params.meta:q} "
        "--manifest {input.manifest} --export-dir {params.export_dir} --out-dir submission/{wildcards.arm} "
        "> {log} 2>&1"
