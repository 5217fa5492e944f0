RUNS = aggregate_runs()
PUBLISHED = caddie.published_logs(config["report"])


rule aggregate:
    input:
        run_files(RUNS),
        published=PUBLISHED,
        code=code("aggregate"),
    output:
        results=report(update("reports/results.csv"), category="tables"),
        stats=report(update("reports/stats.json"), category="tables"),
        report=update("reports/report.md"),
        html=report(update("reports/report.html"), category="report"),
        forest=report(update("reports/figures/forest.png"), category="figures"),
        val_bpb=report(update("reports/figures/val_bpb_by_point.png"), category="figures"),
        waterfall=report(update("reports/figures/waterfall.png"), category="figures"),
        train_loss=report(update("reports/figures/train_loss.png"), category="figures"),
        eval_seconds=report(update("reports/figures/eval_seconds.png"), category="figures"),
    params:
        runs=json.dumps(RUNS, sort_keys=True),
        report=json.dumps(config["report"], sort_keys=True),
        arms=json.dumps({"defaults": config["defaults"], "arms": config["arms"]}, sort_keys=True),  # what differs
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    shell:
        "{PYTHON} -m stages.aggregate --runs {params.runs:q} --report {params.report:q} --arms {params.arms:q} "
        "--published {input.published:q} --out-dir reports > {log} 2>&1"
