"""Aggregate stage: per-seed evaluations (and published logs) -> results.csv, stats.json and the reports.

    python -m stages.aggregate --runs RUNS_JSON --report REPORT_JSON [--published LOG ...] --out-dir reports

RUNS_JSON is a list of {arm, seed, point, mode, eval, train_summary, quantize_summary, train_metrics};
REPORT_JSON is the config's `report` section. Published logs (the challenge's train logs) join the
results table as arms of their own, named after their record, so one report compares both.

Every arm is reduced to its decomposition chain, the (point, mode) pairs it has in the order
prequant → quant → rescue (at the base mode, standard) and then the other modes at its last point
(sliding, ttt). The chain's last pair is the arm's score: the number it would submit.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from stages import records, report
from stages.io import atomic_path, read_json, write_json
from stages.stats import (THRESHOLD_NATS, THRESHOLD_P, finite_or_none, one_sample_less, paired_t,
                          summarize, threshold_bpb, welch_less)

POINTS = ("prequant", "quant", "rescue")
MODES = ("standard", "sliding", "ttt")
RECORD_KEYS = ("arm", "seed", "point", "mode", "eval", "train_summary")
EVAL_KEYS = ("point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb", "seconds")
TRAIN_KEYS = ("steps", "train_seconds")
QUANT_KEYS = ("total_bytes",)
COLUMNS = ["arm", "source", "seed", "point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb",
           "seconds", "budget_seconds", "train_steps", "train_seconds", "artifact_bytes"]
CURVE_COLUMNS = ["arm", "source", "seed", "step", "loss", "ms"]
STEP_NAMES = {"quant": "quantization", "rescue": "rescue", "sliding": "sliding window", "ttt": "test-time training"}


def _require(obj, keys, where):
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise ValueError(f"{where}: missing key '{key}'")
    return obj


def _load(path, keys):
    try:
        return _require(read_json(path), keys, path)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def run_row(i, rec) -> dict:
    """One results row: a run record joined with its eval, train and artifact summaries."""
    _require(rec, RECORD_KEYS, f"runs[{i}]")
    if rec["point"] not in POINTS or rec["mode"] not in MODES:
        raise ValueError(f"runs[{i}]: point/mode must be in {POINTS}/{MODES}, "
                         f"got {rec['point']!r}/{rec['mode']!r}")
    ev = _load(rec["eval"], EVAL_KEYS)
    if (ev["point"], ev["mode"]) != (rec["point"], rec["mode"]):
        raise ValueError(f"{rec['eval']}: point/mode {ev['point']}/{ev['mode']} does not match "
                         f"the runs record {rec['point']}/{rec['mode']}")
    tr = _load(rec["train_summary"], TRAIN_KEYS)
    artifact = None
    if rec["point"] != "prequant":  # an artifact: the quantize (or rescue) summary gives its bytes
        if not rec.get("quantize_summary"):
            raise ValueError(f"runs[{i}]: {rec['point']} record needs 'quantize_summary'")
        artifact = _load(rec["quantize_summary"], QUANT_KEYS)["total_bytes"]
    budget = rec.get("budget_seconds") or None  # the arm's evaluate.budget_seconds, judged here
    return {"arm": str(rec["arm"]), "source": "caddie", "seed": int(rec["seed"]), "point": rec["point"],
            "mode": rec["mode"], **{k: ev[k] for k in EVAL_KEYS[2:]}, "budget_seconds": budget,
            "train_steps": tr["steps"], "train_seconds": tr["train_seconds"], "artifact_bytes": artifact}


def results_table(rows) -> pd.DataFrame:
    """Rows in a stable order (arm, point, mode, seed), one per (arm, point, mode, seed)."""
    df = pd.DataFrame(rows, columns=COLUMNS)
    dup = df.duplicated(["arm", "point", "mode", "seed"])
    if dup.any():
        r = df[dup].iloc[0]
        raise ValueError(f"runs: duplicate record arm={r.arm} point={r.point} mode={r.mode} seed={r.seed}")
    for col in ("tokens", "bytes", "raw_bytes", "artifact_bytes", "train_steps"):
        df[col] = pd.array([None if pd.isna(v) else int(v) for v in df[col]], dtype="Int64")
    for col in ("seconds", "budget_seconds", "train_seconds"):
        df[col] = df[col].astype(float)
    order = {**{p: i for i, p in enumerate(POINTS)}, **{m: i for i, m in enumerate(MODES)}}
    df = df.sort_values(["arm", "point", "mode", "seed"],
                        key=lambda s: s.map(order) if s.name in ("point", "mode") else s)
    return df.reset_index(drop=True)


def load_results(runs, published=()) -> pd.DataFrame:
    """One row per run record, and one per eval of each published log."""
    return results_table([run_row(i, rec) for i, rec in enumerate(runs)] + records.results_rows(published))


def load_curves(runs, published=()) -> pd.DataFrame:
    """Training loss against step and time: one curve per (arm, seed) from metrics.jsonl, and the
    published logs' step lines."""
    rows = []
    for rec in runs:
        if not rec.get("train_metrics"):
            continue
        try:
            lines = Path(rec["train_metrics"]).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{rec['train_metrics']}: cannot read ({e})") from e
        for n, line in enumerate(lines, 1):
            try:
                m = json.loads(line)
                rows.append((rec["arm"], "caddie", int(rec["seed"]), m["step"], m["loss"], m["ms"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{rec['train_metrics']}:{n}: not a metrics record ({e})") from e
    for path in published:
        log = records.parse_log(path)
        rows += [(log["record"], "published", log["seed"], c["step"], c["train_loss"], c["train_time_ms"])
                 for c in log["curve"]]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).drop_duplicates(["arm", "seed", "step"])


def group_stats(df, confidence):
    """groups[arm][point][mode] = summary of val_bpb over seeds."""
    groups = {}
    for (arm, point, mode), g in df.groupby(["arm", "point", "mode"], sort=False):
        s = summarize(g["val_bpb"], confidence)
        s["confidence"] = confidence
        s["values"] = {str(k): float(v) for k, v in zip(g["seed"], g["val_bpb"])}
        groups.setdefault(arm, {}).setdefault(point, {})[mode] = s
    return groups


def chain_of(pairs) -> list[tuple[str, str]]:
    """The decomposition chain of the (point, mode) pairs an arm has (see the module docstring)."""
    pairs = set(pairs)
    modes = [m for m in MODES if any(pm[1] == m for pm in pairs)]
    if not modes:
        return []
    base = modes[0]
    chain = [(p, base) for p in POINTS if (p, base) in pairs]
    last = chain[-1][0] if chain else next(p for p in reversed(POINTS) if any(pm[0] == p for pm in pairs))
    return chain + [(last, m) for m in modes[1:] if (last, m) in pairs]


def wide_by_seed(g) -> pd.DataFrame:
    """val_bpb indexed by seed, one column per 'point/mode'."""
    return g.assign(pm=g["point"] + "/" + g["mode"]).pivot(index="seed", columns="pm", values="val_bpb")


def paired_step(wide, before, after) -> dict | None:
    """after − before over the seeds that have both, with the paired t-test (df = n − 1)."""
    w = wide[[before, after]].dropna()
    if not len(w):
        return None
    d = w[after] - w[before]
    return {"from": before, "to": after, "n": len(d), "deltas": {str(k): float(v) for k, v in d.items()},
            "mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) >= 2 else None,
            **paired_t(w[before].to_numpy(), w[after].to_numpy())}


def decomposition(df) -> dict:
    """[arm]: its chain, per-seed values along it, and every consecutive step (and the total) as a
    paired difference: how much quantization costs, rescue recovers, sliding and TTT gain."""
    out = {}
    for arm, g in df.groupby("arm", sort=False):
        chain = chain_of(zip(g["point"], g["mode"]))
        names = [f"{p}/{m}" for p, m in chain]
        wide = wide_by_seed(g)
        steps = []
        for (bp, bm), (ap, am), b, a in zip(chain, chain[1:], names, names[1:]):
            step = paired_step(wide, b, a)
            if step:
                steps.append({"name": STEP_NAMES[ap if ap != bp else am], **step})
        total = paired_step(wide, names[0], names[-1]) if len(names) > 1 else None
        values = {str(s): [finite_or_none(row.get(n)) for n in names] for s, row in wide.iterrows()}
        out[arm] = {"chain": names, "values": values, "steps": steps, "total": total}
    return out


def step_stats(df, before, after):
    """[arm][mode]: after − before val_bpb per seed (e.g. quant − prequant, the quantization gap),
    with a paired t-test, and the artifact bytes the step adds where both points are artifacts."""
    result = {}
    for (arm, mode), g in df.groupby(["arm", "mode"], sort=False):
        wide = g.pivot(index="seed", columns="point", values="val_bpb")
        if not {before, after} <= set(wide.columns) or not (step := paired_step(wide, before, after)):
            continue
        sizes = g.pivot(index="seed", columns="point", values="artifact_bytes")
        if {before, after} <= set(sizes.columns):
            added = (sizes[after] - sizes[before]).dropna()
            step["bytes_added"] = float(added.mean()) if len(added) else None
        step["gaps"] = step.pop("deltas")
        result.setdefault(arm, {})[mode] = step
    return result


def scores(df, confidence) -> dict:
    """[arm]: the summary of the arm's score (its chain's last point/mode) and the 0.005-nat margin
    in BPB at the arm's own tokens per byte."""
    out = {}
    for arm, g in df.groupby("arm", sort=False):
        point, mode = chain_of(zip(g["point"], g["mode"]))[-1]
        s = g[(g["point"] == point) & (g["mode"] == mode)]
        out[arm] = {"source": s["source"].iloc[0], "point": point, "mode": mode, **summarize(s["val_bpb"], confidence),
                    "values": {str(k): float(v) for k, v in zip(s["seed"], s["val_bpb"])},
                    "threshold_bpb": threshold_bpb(float(s["val_bpb"].mean()), float(s["loss_nats"].mean())),
                    "artifact_bytes_max": None if s["artifact_bytes"].isna().all() else int(s["artifact_bytes"].max()),
                    "eval_seconds_max": finite_or_none(s["seconds"].max())}
    return out


def compare_to_baseline(df, baseline):
    """vs_baseline[arm][point][mode] for every other caddie arm, at the (point, mode)s both have.
    `meets_threshold` is the challenge's rule: a one-sided Welch test that the arm beats the baseline
    by at least the 0.005-nat margin (arm + margin < baseline) at p < 0.01."""
    own = df[df["source"] == "caddie"]
    if baseline not in set(own["arm"]):
        raise ValueError(f"baseline arm {baseline!r} not among the runs' arms {sorted(set(own['arm']))}")
    base = {k: g for k, g in own[own["arm"] == baseline].groupby(["point", "mode"], sort=False)}
    result = {}
    for (arm, point, mode), g in own[own["arm"] != baseline].groupby(["arm", "point", "mode"], sort=False):
        if (point, mode) not in base:
            continue
        b = base[(point, mode)]
        arm_v, base_v = g["val_bpb"].to_numpy(float), b["val_bpb"].to_numpy(float)
        thr = threshold_bpb(float(b["val_bpb"].mean()), float(b["loss_nats"].mean()))
        t, p = welch_less(arm_v, base_v)
        t_margin, p_margin = welch_less(arm_v + thr, base_v)
        result.setdefault(arm, {}).setdefault(point, {})[mode] = {
            "arm_mean": float(arm_v.mean()), "baseline_mean": float(base_v.mean()),
            "diff": float(arm_v.mean() - base_v.mean()), "t": t, "p_less": p, "n_arm": len(g),
            "n_baseline": len(b), "threshold_bpb": thr, "t_margin": t_margin, "p_margin": p_margin,
            "meets_threshold": p_margin is not None and p_margin < THRESHOLD_P}
    return result


def compare_to_reference(score_table, reference):
    """[arm]: one-sided one-sample t-test of the arm's score against (published value − margin), as the
    records report significance (df = n − 1), with the challenge's verdict."""
    out = {}
    for arm, s in score_table.items():
        target = reference["val_bpb"] - s["threshold_bpb"]
        t, p = one_sample_less(list(s["values"].values()), target)
        out[arm] = {"reference": reference["name"], "reference_bpb": reference["val_bpb"],
                    "target_bpb": target, "mean": s["mean"], "diff": s["mean"] - reference["val_bpb"],
                    "t": t, "df": s["n"] - 1, "p_less": p,
                    "meets_threshold": p is not None and p < THRESHOLD_P}
    return out


def verdicts(stats) -> list[str]:
    """One line per arm: the challenge's acceptance rule against the reference (or the baseline)."""
    lines = []
    rule = f"≥ {THRESHOLD_NATS} nats at p < {THRESHOLD_P}"
    for arm, s in stats["scores"].items():
        where = f"{s['point']}/{s['mode']}"
        if (r := stats["vs_reference"].get(arm)) is not None:
            p = "–" if r["p_less"] is None else f"{r['p_less']:.3g}"
            word = "BEATS" if r["meets_threshold"] else "does not beat"
            lines.append(f"{arm} ({where}, {s['mean']:.5f}, n={s['n']}) {word} {r['reference']} "
                         f"({r['reference_bpb']:.5f}) by {rule}: one-sample t vs {r['target_bpb']:.5f}, p = {p}")
        if (c := stats["vs_baseline"].get(arm, {}).get(s["point"], {}).get(s["mode"])) is not None:
            p = "–" if c["p_margin"] is None else f"{c['p_margin']:.3g}"
            word = "BEATS" if c["meets_threshold"] else "does not beat"
            lines.append(f"{arm} ({where}, {s['mean']:.5f}, n={s['n']}) {word} the baseline arm "
                         f"{stats['baseline_arm']} ({c['baseline_mean']:.5f}) by {rule}: Welch p = {p}")
    return lines


def json_safe(obj):
    """Replace every non-finite float (e.g. a diverged run's NaN) with null, recursively."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return finite_or_none(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def build_stats(df, baseline, confidence, reference=None):
    score_table = scores(df, confidence)
    stats = json_safe({
        "baseline_arm": baseline, "confidence": confidence, "reference": reference,
        "threshold": {"nats": THRESHOLD_NATS, "p": THRESHOLD_P},
        "groups": group_stats(df, confidence), "quant_gap": step_stats(df, "prequant", "quant"),
        "rescue_gain": step_stats(df, "quant", "rescue"), "decomposition": decomposition(df),
        "scores": score_table, "vs_baseline": compare_to_baseline(df, baseline),
        "vs_reference": compare_to_reference(score_table, reference) if reference else {},
        "sources": {arm: s["source"] for arm, s in score_table.items()}})
    stats["verdicts"] = verdicts(stats)
    return stats


def check_report_config(cfg: dict) -> tuple[str, float, dict | None]:
    baseline = cfg.get("baseline_arm", "baseline")
    confidence = float(cfg.get("confidence", 0.95))
    if not 0 < confidence < 1:
        raise ValueError(f"report.confidence: must be in (0, 1), got {confidence}")
    reference = cfg.get("reference")
    if reference is not None:
        _require(reference, ("name", "val_bpb"), "report.reference")
    return baseline, confidence, reference


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.aggregate", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="JSON list of run records")
    ap.add_argument("--report", default="{}", help="JSON: the config's report section")
    ap.add_argument("--published", nargs="*", default=[], type=Path, help="published train logs")
    ap.add_argument("--out-dir", default="reports", type=Path)
    args = ap.parse_args(argv)
    try:
        runs, report_cfg = json.loads(args.runs), json.loads(args.report)
    except json.JSONDecodeError as e:
        raise ValueError(f"--runs/--report: invalid JSON ({e})") from e
    if not isinstance(runs, list) or not runs:
        raise ValueError("--runs: expected a non-empty JSON list of run records")
    baseline, confidence, reference = check_report_config(report_cfg)

    df = load_results(runs, args.published)
    stats = build_stats(df, baseline, confidence, reference)
    out = args.out_dir
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json(out / "stats.json", stats)
    report.write_reports(stats, df, load_curves(runs, args.published), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
