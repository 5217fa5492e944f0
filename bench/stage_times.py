"""Per-stage wall time of the last pipeline run, from Snakemake's `benchmark:` files.

    make demo && .venv/bin/python bench/stage_times.py > bench/results/demo.md
"""
import sys
from collections import defaultdict
from pathlib import Path

import pandas as pd


def stage_times(root: Path) -> dict:
    seconds = defaultdict(list)
    for tsv in sorted((root / "benchmarks").rglob("*.tsv")):
        seconds[tsv.relative_to(root / "benchmarks").parts[0]].append(float(pd.read_csv(tsv, sep="\t")["s"].iloc[0]))
    return seconds


def main(root="."):
    rows = stage_times(Path(root))
    print("| stage | jobs | mean s | max s | total s |\n|---|---:|---:|---:|---:|")
    for stage in ("tokenize", "curriculum", "train", "quantize", "evaluate", "aggregate"):
        if stage in rows:
            s = rows[stage]
            print(f"| {stage} | {len(s)} | {sum(s) / len(s):.1f} | {max(s):.1f} | {sum(s):.1f} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
