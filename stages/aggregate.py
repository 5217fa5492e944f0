"""Aggregate stage: per-seed evaluations (and published logs) -> results.csv, stats.json and the reports.

    python -m stages.aggregate --plan PLAN_JSON [--published LOG ...] --out-dir reports

PLAN_JSON is a file (a command line cannot hold the runs of a large study): {"runs": [...], "report":
{...}, "arms": {...}}. `runs` is a list of {arm, seed, point, mode, eval, train_summary, quantize_summary,
size, train_metrics, budget_seconds}; `report` is the config's `report` section; `arms` is {defaults, arms} of
the config (for what differs between arms; optional). Published logs (the challenge's train logs) join the results table as arms of
their own, named after their record, so one report compares both.

Each caddie arm's score is compared with the baseline arm's score (paired by seed when both ran the same
seeds, Welch otherwise), with the published reference when one is set, and with the frontier row by the
progression rule when `report.frontier` is set.

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
from stages.config import MODES, POINTS, chain_of, deep_merge
from stages.stats import (THRESHOLD_NATS, THRESHOLD_P, compare, finite_or_none, one_sample_less,
                          one_sample_two_sided, paired_t, progression, summarize, threshold_bpb, verdict_word)

RECORD_KEYS = ("arm", "seed", "point", "mode", "eval", "train_summary")
EVAL_KEYS = ("point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb", "seconds")
TRAIN_KEYS = ("steps", "train_seconds")
SIZE_KEYS = ("total_bytes",)
COLUMNS = ["arm", "source", "seed", "point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb",
           "seconds", "budget_seconds", "train_steps", "train_seconds", "artifact_bytes", "eval_file"]
CURVE_COLUMNS = ["run", "source", "seed", "step", "loss", "ms"]
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
    if rec["point"] != "prequant":  # an artifact: its size (code + model, stages/codesize.py) gives its bytes
        if not rec.get("size"):
            raise ValueError(f"runs[{i}]: {rec['point']} record needs 'size' (the artifact's counted bytes)")
        artifact = _load(rec["size"], SIZE_KEYS)["total_bytes"]
    budget = rec.get("budget_seconds") or None  # the arm's evaluate.budget_seconds, judged here
    return {"arm": str(rec["arm"]), "source": "caddie", "seed": int(rec["seed"]), "point": rec["point"],
            "mode": rec["mode"], **{k: ev[k] for k in EVAL_KEYS[2:]}, "budget_seconds": budget,
            "train_steps": tr["steps"], "train_seconds": tr["train_seconds"], "artifact_bytes": artifact,
            "eval_file": rec["eval"]}


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


def training_runs(runs) -> dict:
    """{train_metrics path: the arms that share that training run}, in the runs' order."""
    out = {}
    for rec in runs:
        if rec.get("train_metrics"):
            arms = out.setdefault(rec["train_metrics"], [])
            if str(rec["arm"]) not in arms:
                arms.append(str(rec["arm"]))
    return out


def load_curves(runs, published=()) -> pd.DataFrame:
    """Training loss against step and time: one curve per distinct training run and seed from its
    metrics.jsonl (`run` names the arms that share it), and the published logs' step lines."""
    rows = []
    seeds = {rec["train_metrics"]: int(rec["seed"]) for rec in runs if rec.get("train_metrics")}
    for path, arms in training_runs(runs).items():
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"{path}: cannot read ({e})") from e
        for n, line in enumerate(lines, 1):
            try:
                m = json.loads(line)
                rows.append((", ".join(arms), "caddie", seeds[path], m["step"], m["loss"], m["ms"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a metrics record ({e})") from e
    for path in published:
        log = records.parse_log(path)
        rows += [(log["record"], "published", log["seed"], c["step"], c["train_loss"], c["train_time_ms"])
                 for c in log["curve"]]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS).drop_duplicates(["run", "seed", "step"])


def sharing(df) -> dict:
    """{(arm, point, mode): the arms whose evals there are the same files for every seed}: rows identical
    by construction, e.g. the prequant point of arms that share a training run."""
    signature = {}
    for (arm, point, mode), g in df[df["eval_file"].notna()].groupby(["arm", "point", "mode"], sort=False):
        signature[(arm, point, mode)] = (point, mode, frozenset(zip(g["seed"], g["eval_file"])))
    by_signature = {}
    for key, sig in signature.items():
        by_signature.setdefault(sig, []).append(key[0])
    return {key: by_signature[sig] for key, sig in signature.items()}


def group_stats(df, confidence):
    """groups[arm][point][mode] = summary of val_bpb over seeds; `shared_by` lists the arms whose evals
    there are the same files (the arm alone when none shares them)."""
    groups, shared = {}, sharing(df)
    for (arm, point, mode), g in df.groupby(["arm", "point", "mode"], sort=False):
        s = summarize(g["val_bpb"], confidence)
        s["confidence"] = confidence
        s["values"] = {str(k): float(v) for k, v in zip(g["seed"], g["val_bpb"])}
        s["shared_by"] = shared.get((arm, point, mode), [arm])
        groups.setdefault(arm, {}).setdefault(point, {})[mode] = s
    return groups


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
    with a paired t-test, and the artifact bytes the step adds where both points are artifacts.
    `shared_by`: the arms for which both points are the same files (the same step by construction)."""
    result, shared = {}, sharing(df)
    for (arm, mode), g in df.groupby(["arm", "mode"], sort=False):
        wide = g.pivot(index="seed", columns="point", values="val_bpb")
        if not {before, after} <= set(wide.columns) or not (step := paired_step(wide, before, after)):
            continue
        sizes = g.pivot(index="seed", columns="point", values="artifact_bytes")
        if {before, after} <= set(sizes.columns):
            added = (sizes[after] - sizes[before]).dropna()
            step["bytes_added"] = float(added.mean()) if len(added) else None
        step["gaps"] = step.pop("deltas")
        both = [set(shared.get((arm, p, mode), [arm])) for p in (before, after)]
        step["shared_by"] = [a for a in shared.get((arm, before, mode), [arm]) if a in both[1]]
        result.setdefault(arm, {})[mode] = step
    return result


def scores(df, confidence) -> dict:
    """[arm]: the summary of the arm's score (its chain's last point/mode), the 0.005-nat margin in BPB at
    the arm's own tokens per byte, and the means of what it cost (artifact bytes, train and eval seconds)."""
    out = {}
    for arm, g in df.groupby("arm", sort=False):
        point, mode = chain_of(zip(g["point"], g["mode"]))[-1]
        s = g[(g["point"] == point) & (g["mode"] == mode)]
        out[arm] = {"source": s["source"].iloc[0], "point": point, "mode": mode, **summarize(s["val_bpb"], confidence),
                    "values": {str(k): float(v) for k, v in zip(s["seed"], s["val_bpb"])},
                    "loss_nats_mean": float(s["loss_nats"].mean()),
                    "threshold_bpb": threshold_bpb(float(s["val_bpb"].mean()), float(s["loss_nats"].mean())),
                    "artifact_bytes_max": None if s["artifact_bytes"].isna().all() else int(s["artifact_bytes"].max()),
                    "artifact_bytes_mean": _mean_or_none(s["artifact_bytes"]),
                    "train_seconds_mean": _mean_or_none(s["train_seconds"]),
                    "eval_seconds_mean": _mean_or_none(s["seconds"]),
                    "eval_seconds_max": finite_or_none(s["seconds"].max())}
    return out


def _mean_or_none(series):
    v = pd.to_numeric(series, errors="coerce").astype(float).dropna()
    return float(v.mean()) if len(v) else None


def _delta(a, b):
    return None if a is None or b is None else a - b


def nats_per_bpb(score) -> float:
    """The run's own ratio of nats per token to bits per byte (ln 2 × bytes per token)."""
    return score["loss_nats_mean"] / score["mean"]


def in_nats(comparison, ratio) -> dict:
    """The BPB difference and its interval converted to nats per token at `ratio`."""
    return {f"{k}_nats": None if comparison[k] is None else comparison[k] * ratio
            for k in ("diff", "ci_low", "ci_high")}


def compare_to_baseline(score_table, baseline, confidence):
    """[arm]: every other caddie arm's score against the baseline arm's score, whatever points they are at:
    paired by seed when both have the same seeds, Welch otherwise (stats.compare), with the differences in
    nats and in what the arm costs. `meets_margin` is the challenge's rule: the arm beats the baseline by
    0.005 nats (in bpb at the baseline's tokens per byte) at one-sided p < 0.01."""
    own = {a: s for a, s in score_table.items() if s["source"] == "caddie"}
    if baseline not in own:
        raise ValueError(f"baseline arm {baseline!r} not among the runs' arms {sorted(own)}")
    base = own[baseline]
    result = {}
    for arm, s in own.items():
        if arm == baseline:
            continue
        c = compare(s["values"], base["values"], confidence, base["threshold_bpb"])
        result[arm] = {"arm_score": f"{s['point']}/{s['mode']}", "baseline_score": f"{base['point']}/{base['mode']}",
                       "arm_mean": s["mean"], "baseline_mean": base["mean"], **c, **in_nats(c, nats_per_bpb(base)),
                       "delta_artifact_bytes": _delta(s["artifact_bytes_mean"], base["artifact_bytes_mean"]),
                       "delta_train_seconds": _delta(s["train_seconds_mean"], base["train_seconds_mean"]),
                       "delta_eval_seconds": _delta(s["eval_seconds_mean"], base["eval_seconds_mean"])}
    return result


def compare_to_reference(score_table, reference, confidence):
    """[arm]: the arm's score against a published value: the difference with its t-interval (df = n − 1),
    the two-sided one-sample t-test for the verdict, and the challenge's rule as the records report it:
    a one-sided one-sample t-test against (published value − margin) at p < 0.01."""
    out = {}
    for arm, s in score_table.items():
        values = list(s["values"].values())
        target = reference["val_bpb"] - s["threshold_bpb"]
        t, p = one_sample_less(values, target)
        two = one_sample_two_sided(values, reference["val_bpb"])
        diff = s["mean"] - reference["val_bpb"]
        c = {"diff": diff, "ci_low": _delta(s["ci_low"], reference["val_bpb"]),
             "ci_high": _delta(s["ci_high"], reference["val_bpb"])}
        out[arm] = {"reference": reference["name"], "reference_bpb": reference["val_bpb"], "test": "one-sample t",
                    "target_bpb": target, "mean": s["mean"], **c, **in_nats(c, nats_per_bpb(s)),
                    "p_two_sided": two, "verdict": verdict_word(diff, two, confidence),
                    "t": t, "df": s["n"] - 1, "p_less": p, "margin_bpb": s["threshold_bpb"],
                    "meets_margin": p is not None and p < THRESHOLD_P}
    return out


def frontier_values(frontier, score_table) -> list[float]:
    """The frontier row's per-seed values: given in the config, or the score of a published record."""
    if frontier.get("val_bpb"):
        return [float(v) for v in frontier["val_bpb"]]
    s = score_table.get(frontier["name"])
    if s is None or s["source"] != "published":
        published = sorted(a for a, x in score_table.items() if x["source"] == "published")
        raise ValueError(f"report.frontier: {frontier['name']!r} has no val_bpb list and is not a published "
                         f"record among report.published_logs ({', '.join(published) or 'none'})")
    return list(s["values"].values())


def compare_to_frontier(score_table, frontier) -> dict:
    """The progression rule for every arm (the frontier record itself excepted): a one-sided Welch test of
    its per-seed scores (plus margin_nats in bpb at its own tokens per byte) against the frontier row's."""
    values = frontier_values(frontier, score_table)
    alpha, margin_nats = float(frontier.get("alpha", 0.25)), float(frontier.get("margin_nats", 0.0))
    arms = {}
    for arm, s in score_table.items():
        if arm == frontier["name"]:
            continue
        margin = threshold_bpb(s["mean"], s["loss_nats_mean"], margin_nats) if margin_nats else 0.0
        arms[arm] = {"mean": s["mean"], "frontier_mean": float(np.mean(values)),
                     "diff": s["mean"] - float(np.mean(values)),
                     **progression(list(s["values"].values()), values, alpha, margin)}
    return {"frontier": {"name": frontier["name"], "values": values, "alpha": alpha, "margin_nats": margin_nats},
            "arms": arms}


def flatten(tree, prefix="") -> dict:
    """{dotted.key: leaf} of a nested config; lists are leaves."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differing(a: dict, b: dict, other: str) -> dict:
    """{key: {value, <other>}} of the dotted keys where flat config `a` differs from `b`."""
    return {k: {"value": a.get(k), other: b.get(k)} for k in list(a) + [k for k in b if k not in a]
            if a.get(k) != b.get(k)}


def config_differences(defaults, arms, baseline) -> dict:
    """[arm]: the config keys (dotted paths) where the arm's resolved config differs from the defaults
    and from the baseline arm's."""
    flat_defaults = flatten(defaults)
    resolved = {arm: flatten(deep_merge(defaults, override)) for arm, override in arms.items()}
    base = resolved.get(baseline, flat_defaults)
    return {arm: {"vs_defaults": differing(flat, flat_defaults, "default"),
                  "vs_baseline": {} if arm == baseline else differing(flat, base, "baseline")}
            for arm, flat in resolved.items()}


def _first_per_arm_seed(runs, point=None):
    """{(arm, seed): the first run record of that arm and seed (at `point` if given)}."""
    out = {}
    for rec in runs:
        if point is None or rec["point"] == point:
            out.setdefault((str(rec["arm"]), int(rec["seed"])), rec)
    return out


def group_bytes(tensors) -> dict:
    """{group: {tensors, numel, stored_bytes}} of a quantize summary's per-tensor reports; stored bytes
    are before compression."""
    out = {}
    for t in tensors:
        g = out.setdefault(t.get("group", "other"), {"tensors": 0, "numel": 0, "stored_bytes": 0})
        g["tensors"] += 1
        g["numel"] += int(t.get("numel", 0))
        g["stored_bytes"] += int(t.get("stored_bytes", 0))
    return out


def artifact_budgets(runs, score_table, largest=5) -> dict:
    """[arm]: where the bytes of the arm's scored artifact go, from its size and quantize summary:
    compressed model bytes, code bytes, what a rescue added, headroom under the cap, stored bytes by
    tensor group and the largest tensors (both from the quantize summary, before compression)."""
    out = {}
    for arm, s in score_table.items():
        if s["source"] != "caddie" or s["point"] == "prequant":
            continue
        scored = {k: r for k, r in _first_per_arm_seed(runs, s["point"]).items() if k[0] == arm}
        quant = {k: r for k, r in _first_per_arm_seed(runs, "quant").items() if k[0] == arm}
        seeds = []
        for key, rec in sorted(scored.items()):
            qrec = quant.get(key) or rec
            seeds.append((read_json(rec["size"]), read_json(qrec["quantize_summary"])))
        if not seeds:
            continue
        summaries = [a for a, _ in seeds]
        tensors = seeds[0][1].get("tensors") or []

        def mean_of(key, rows=summaries):
            vals = [r[key] for r in rows if r.get(key) is not None]
            return float(np.mean(vals)) if vals else None
        groups = [group_bytes(q.get("tensors") or []) for _, q in seeds]
        names = sorted({g for gs in groups for g in gs})
        out[arm] = {"point": s["point"], "n": len(seeds), "model_bytes": mean_of("model_bytes"),
                    "code_bytes": mean_of("code_bytes"), "rescue_bytes": mean_of("lora_bytes"),
                    "total_bytes_max": max(r["total_bytes"] for r in summaries),
                    "cap_bytes": summaries[0].get("cap_bytes"),
                    "headroom_bytes_min": min((r["headroom_bytes"] for r in summaries
                                               if r.get("headroom_bytes") is not None), default=None),
                    "groups": {g: {k: float(np.mean([gs[g][k] for gs in groups if g in gs]))
                                   for k in ("tensors", "numel", "stored_bytes")} for g in names},
                    "largest_tensors": [{k: t.get(k) for k in ("name", "group", "kind", "bits", "numel",
                                                              "stored_bytes")}
                                        for t in sorted(tensors, key=lambda t: -t.get("stored_bytes", 0))[:largest]]}
    return out


def training_throughput(runs) -> list[dict]:
    """One row per distinct training run and seed (arms that share one are listed together): steps,
    tokens/s, ms/step, train seconds against train.max_seconds."""
    rows = {}
    for (arm, seed), rec in _first_per_arm_seed(runs).items():
        tr = read_json(rec["train_summary"])
        key = (tr.get("model_sha256") or rec["train_summary"], seed)
        if key in rows:
            rows[key]["arms"].append(arm)
            continue
        budget = ((tr.get("config") or {}).get("train") or {}).get("max_seconds") or None
        steps, seconds = tr["steps"], tr["train_seconds"]
        rows[key] = {"arms": [arm], "seed": seed, "steps": steps, "tokens_per_second": tr.get("tokens_per_second"),
                     "ms_per_step": 1000 * seconds / steps if steps else None, "train_seconds": seconds,
                     "budget_seconds": budget, "within_budget": None if budget is None else seconds <= budget}
    return list(rows.values())


def eval_seconds(df, score_table) -> dict:
    """[arm][seed][mode]: eval seconds at the arm's scored point, with the eval budget."""
    out = {}
    for arm, s in score_table.items():
        g = df[(df["arm"] == arm) & (df["point"] == s["point"])]
        for seed, rows in g.groupby("seed", sort=False):
            out.setdefault(arm, {})[str(seed)] = {m: finite_or_none(v) for m, v in zip(rows["mode"], rows["seconds"])}
    return out


def verdicts(stats) -> list[str]:
    """One line per arm and comparison: against the reference, the baseline arm and the frontier row."""
    lines = []
    rule = f"≥ {THRESHOLD_NATS} nats at p < {THRESHOLD_P}"
    for arm, s in stats["scores"].items():
        where = f"{s['point']}/{s['mode']}, {s['mean']:.5f}, n={s['n']}"
        if (r := stats["vs_reference"].get(arm)) is not None:
            p = "–" if r["p_less"] is None else f"{r['p_less']:.3g}"
            word = "BEATS" if r["meets_margin"] else "does not beat"
            lines.append(f"{arm} ({where}) {word} {r['reference']} "
                         f"({r['reference_bpb']:.5f}) by {rule}: one-sample t vs {r['target_bpb']:.5f}, p = {p}")
        if (c := stats["vs_baseline"].get(arm)) is not None:
            word = {"better": "is better than", "worse": "is worse than", "no difference": "is no different from",
                    "untested": "cannot be tested against"}[c["verdict"]]
            p = "–" if c["p_two_sided"] is None else f"{c['p_two_sided']:.3g}"
            margin = "met" if c["meets_margin"] else "not met"
            lines.append(f"{arm} ({where}) {word} the baseline arm {stats['baseline_arm']} "
                         f"({c['baseline_score']}, {c['baseline_mean']:.5f}) at {stats['confidence']:.0%}: "
                         f"Δ {c['diff']:+.5f} bpb, {c['test']} p = {p}; margin {rule}: {margin}")
        if (g := (stats["progression"] or {}).get("arms", {}).get(arm)) is not None:
            f = stats["progression"]["frontier"]
            p = "–" if g["p_less"] is None else f"{g['p_less']:.3g}"
            word = "progresses past" if g["progresses"] else "does not progress past"
            lines.append(f"{arm} ({where}) {word} the frontier row {f['name']} ({g['frontier_mean']:.5f}): "
                         f"one-sided Welch p = {p}, threshold p < {f['alpha']:g}")
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


def build_stats(df, baseline, confidence, reference=None, frontier=None, runs=(), arms_config=None):
    """Everything the reports show. `runs` (the run records) give the artifact budgets and training
    throughput; `arms_config` ({defaults, arms}) gives what differs between arms."""
    score_table = scores(df, confidence)
    stats = json_safe({
        "baseline_arm": baseline, "confidence": confidence, "reference": reference,
        "threshold": {"nats": THRESHOLD_NATS, "p": THRESHOLD_P},
        "groups": group_stats(df, confidence), "quant_gap": step_stats(df, "prequant", "quant"),
        "rescue_gain": step_stats(df, "quant", "rescue"), "decomposition": decomposition(df),
        "scores": score_table, "vs_baseline": compare_to_baseline(score_table, baseline, confidence),
        "vs_reference": compare_to_reference(score_table, reference, confidence) if reference else {},
        "progression": compare_to_frontier(score_table, frontier) if frontier else None,
        "config_differences": config_differences(arms_config["defaults"], arms_config["arms"], baseline)
        if arms_config else {},
        "artifact_budgets": artifact_budgets(runs, score_table) if runs else {},
        "training_throughput": training_throughput(runs) if runs else [],
        "eval_seconds": eval_seconds(df, score_table),
        "sources": {arm: s["source"] for arm, s in score_table.items()}})
    stats["verdicts"] = verdicts(stats)
    return stats


def check_report_config(cfg: dict) -> tuple[str, float, dict | None, dict | None]:
    baseline = cfg.get("baseline_arm", "baseline")
    confidence = float(cfg.get("confidence", 0.95))
    if not 0 < confidence < 1:
        raise ValueError(f"report.confidence: must be in (0, 1), got {confidence}")
    reference = cfg.get("reference")
    if reference is not None:
        _require(reference, ("name", "val_bpb"), "report.reference")
    frontier = cfg.get("frontier")
    if frontier is not None:
        _require(frontier, ("name",), "report.frontier")
        if not 0 < float(frontier.get("alpha", 0.25)) < 1:
            raise ValueError(f"report.frontier.alpha: must be in (0, 1), got {frontier['alpha']}")
    return baseline, confidence, reference, frontier


def read_plan(path) -> tuple[list, dict, dict | None]:
    """(runs, report section, {defaults, arms} or None) of a plan file, each checked for its shape."""
    try:
        plan = _require(read_json(path), ("runs", "report"), path)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the aggregate plan ({e})") from e
    runs, report_cfg, arms = plan["runs"], plan["report"], plan.get("arms")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{path}: 'runs' must be a non-empty list of run records")
    if not isinstance(report_cfg, dict):
        raise ValueError(f"{path}: 'report' must be an object (the config's report section)")
    if arms is not None:
        _require(arms, ("defaults", "arms"), f"{path}: 'arms'")
    return runs, report_cfg, arms


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.aggregate", description=__doc__.splitlines()[0])
    ap.add_argument("--plan", required=True, type=Path, help="JSON file: {runs, report, arms}")
    ap.add_argument("--published", nargs="*", default=[], type=Path, help="published train logs")
    ap.add_argument("--out-dir", default="reports", type=Path)
    args = ap.parse_args(argv)
    runs, report_cfg, arms_config = read_plan(args.plan)
    baseline, confidence, reference, frontier = check_report_config(report_cfg)

    df = load_results(runs, args.published)
    stats = build_stats(df, baseline, confidence, reference, frontier, runs, arms_config)
    out = args.out_dir
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    write_json(out / "stats.json", stats)
    report.write_reports(stats, df, load_curves(runs, args.published), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
