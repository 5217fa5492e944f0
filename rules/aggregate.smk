RUNS = aggregate_runs()


rule aggregate:
    input:
        run_files(RUNS),
        code=code("aggregate"),
    output:
        results=report("reports/results.csv", category="tables"),
        stats="reports/stats.json",
        report="reports/report.md",
        val_bpb=report("reports/figures/val_bpb_by_point.png", category="figures"),
        quant_gap=report("reports/figures/quant_gap.png", category="figures"),
    params:
        runs=json.dumps(RUNS, sort_keys=True),
        report=json.dumps(config["report"], sort_keys=True),
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    shell:
        "{PYTHON} -m stages.aggregate --runs {params.runs:q} --report {params.report:q} "
        "--out-dir reports > {log} 2>&1"
