RUNS = aggregate_runs()
PUBLISHED = caddie.published_logs(config["report"])


rule aggregate_plan:
    """What the aggregate reads, as a file: every (arm, seed, point, mode) on a command line would pass
    Linux's 128 KiB limit on one argument at about 65 arm-seeds."""
    output:
        update("artifacts/aggregate/plan.json"),
    params:
        runs=RUNS,
        report=config["report"],
        arms={"defaults": config["defaults"], "arms": config["arms"]},  # for what differs between arms
    localrule: True
    run:
        write_json(output[0], {"runs": params.runs, "report": params.report, "arms": params.arms})


rule aggregate:
    input:
        run_files(RUNS),
        plan=rules.aggregate_plan.output[0],
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
    log:
        "logs/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    shell:
        "{PYTHON} -m stages.aggregate --plan {input.plan} --published {input.published:q} --out-dir reports "
        "> {log} 2>&1"
