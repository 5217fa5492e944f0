"""Submission export: one arm's runs -> a records folder (train_gpt.py, requirements.txt, submission.json,
README.md, train_seed<N>.log).

    python -m stages.submission --arm ARM --runs RUNS_JSON --stats reports/stats.json --spec SPEC_JSON
        --config ARM_CONFIG_JSON --base-arm NAME --base-config BASE_CONFIG_JSON --defaults DEFAULTS_JSON
        --meta SUBMISSION_JSON --manifest MANIFEST --export-dir DIR --out-dir DIR

The submission's score is the arm's score in stats.json (its decomposition chain's last point and
mode). train_gpt.py and requirements.txt are the arm's export (stages/export.py), whose counted bytes are the
code bytes of every artifact. Each seed's log is written in the records' format from the run's artifacts
(stages/recordlog.py: the metrics of every step, across resumes). The compliance checklist is computed from the
artifacts, never asserted: training (with GPTQ's calibration) and eval seconds against the challenge's limits,
every artifact's counted bytes against the cap, val data kept out of training, calibration and rescue, a
score-first eval, the number of seeds, no resumed run, and the progression test against the frontier row.
"""
import argparse
import datetime
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from stages import recordlog, recordrun
from stages.aggregate import flatten
from stages.io import atomic_path, read_json, write_json, write_text
from stages.report import markdown_table
from stages.shards import ShardSet, document_chunks, document_spans, manifest_shards

TRAIN_LIMIT_SECONDS = 600.0  # the challenge: training and evaluation each within 10 minutes on 8xH100
EVAL_LIMIT_SECONDS = 600.0
SEEDS_REQUIRED = 3


def document_hash(tokens: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(tokens, dtype=np.int64).tobytes()).hexdigest()


def document_hashes(tokens: np.ndarray, bos_id: int) -> set[str]:
    """sha1 of every document's tokens, documents split at BOS (the BOS itself left out)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return {document_hash(tokens[a:b]) for a, b in zip(*document_spans(tokens, bos_id))}


def document_signatures(tokens: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """A cheap 64-bit signature per document (length, sum and sum of squares of its tokens, mixed), computed
    without a Python loop; equal documents have equal signatures, so only matches need a sha1."""
    sums = np.concatenate([[0], np.cumsum(tokens)])
    squares = np.concatenate([[0], np.cumsum(tokens * tokens)])
    with np.errstate(over="ignore"):
        return ((ends - starts).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                + (sums[ends] - sums[starts]).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
                + (squares[ends] - squares[starts]).astype(np.uint64))


def val_overlap(manifest: Path) -> dict:
    """How many val documents also occur, token for token, in the train shards: both splits streamed chunk
    by chunk (memory does not grow with the train set); a train document is hashed only when its signature
    matches a val document's."""
    bos = read_json(manifest)["bos_id"]
    val, signatures = set(), []
    for tokens, starts, ends in document_chunks(ShardSet(manifest_shards(manifest, "val")), bos):
        val |= {document_hash(tokens[a:b]) for a, b in zip(starts, ends)}
        signatures.append(document_signatures(tokens, starts, ends))
    signatures = np.unique(np.concatenate(signatures)) if signatures else np.zeros(0, np.uint64)
    found = set()
    for tokens, starts, ends in document_chunks(ShardSet(manifest_shards(manifest, "train")), bos):
        maybe = np.isin(document_signatures(tokens, starts, ends), signatures)
        found |= {h for a, b in zip(starts[maybe], ends[maybe]) if (h := document_hash(tokens[a:b])) in val}
    return {"val_docs": len(val), "val_docs_in_train": len(found)}


def check(ok: bool, detail: str) -> dict:
    return {"ok": bool(ok), "detail": detail}


def compliance(rows: list[dict], overlap: dict, score: dict, progression: dict | None = None) -> dict:
    """The checklist, each item {ok, detail}, from the per-seed rows of the arm's score; the frontier item only
    when the report has a frontier row (`progression`: the arm's entry of stats.json's progression)."""
    train_s = max(r["train_seconds"] + r["hessian_seconds"] for r in rows)
    eval_s = max(r["eval_seconds"] for r in rows)
    total = max(r["artifact_bytes"] for r in rows)
    cap = min(r["cap_bytes"] for r in rows)
    calib = sorted({r["calibration_source"] for r in rows if r["calibration_source"]})
    modes = sorted({r["mode"] for r in rows})
    resumed = [r["seed"] for r in rows if r["resumed"]]
    checks = {
        "train_under_600s": check(train_s <= TRAIN_LIMIT_SECONDS,
                                  f"longest training loop plus GPTQ calibration {train_s:.1f} s (limit "
                                  f"{TRAIN_LIMIT_SECONDS:.0f} s) on {rows[0]['device']}"),
        "eval_under_600s": check(eval_s <= EVAL_LIMIT_SECONDS,
                                 f"longest {score['point']}/{score['mode']} eval {eval_s:.1f} s, loading the "
                                 f"artifact and compiling included (limit {EVAL_LIMIT_SECONDS:.0f} s)"),
        "artifact_under_16mb": check(total <= cap, f"largest artifact {total:,} bytes, code included "
                                                    f"(cap {cap:,})"),
        "no_val_in_training": check(
            overlap["val_docs_in_train"] == 0 and all(s in ("train", "generated") for s in calib),
            f"{overlap['val_docs_in_train']} of {overlap['val_docs']} val documents occur in the train shards; "
            f"training, rescue and calibration ({', '.join(calib) or 'none'}) read train shards only"),
        "score_first_eval": check(all(m in ("standard", "sliding", "ttt") for m in modes),
                                  f"mode {', '.join(modes)}: every target is scored before any update that "
                                  f"has seen it (tests/test_evaluate.py checks this by perturbation)"),
        "three_seeds": check(len(rows) >= SEEDS_REQUIRED, f"{len(rows)} seeds"),
        "no_resumed_runs": check(not resumed, f"seeds resumed from a checkpoint: {resumed}" if resumed
                                 else "every seed trained in one uninterrupted run"),
    }
    if progression is not None:
        p = "–" if progression["p_less"] is None else f"{progression['p_less']:.3g}"
        checks["beats_frontier"] = check(progression["progresses"], (
            f"one-sided Welch p = {p} (threshold {progression['alpha']:g}) against the frontier row, "
            f"{progression['margin_bpb']:.5f} bpb margin included; Δ {progression['diff']:+.5f} bpb"))
    return checks


def base_bpb(runs: list[dict], seed: int, point: str) -> float | None:
    """A seed's val_bpb at `point` in the first mode it was scored in (the chain's base mode)."""
    found = {r["mode"]: r for r in runs if int(r["seed"]) == seed and r["point"] == point}
    mode = next((m for m in recordlog.MODE_SUFFIXES if m in found), None)
    return read_json(found[mode]["eval"])["val_bpb"] if mode else None


def seed_rows(runs: list[dict], score: dict) -> list[dict]:
    """Per seed: the score's eval joined with its train summary and artifact summary."""
    rows = []
    for rec in runs:
        if (rec["point"], rec["mode"]) != (score["point"], score["mode"]):
            continue
        ev, tr = read_json(rec["eval"]), read_json(rec["train_summary"])
        art = read_json(rec["size"]) if rec.get("size") else None
        quant = read_json(rec["calibration_summary"]) if rec.get("calibration_summary") else None
        calib = quant["config"]["calibration"]["source"] if quant else None
        seed = int(rec["seed"])
        rows.append({"seed": seed, "point": ev["point"], "mode": ev["mode"],
                     "val_loss": ev["loss_nats"], "val_bpb": ev["val_bpb"], "eval_seconds": ev["seconds"],
                     "val_tokens": ev["tokens"], "pre_quant_bpb": base_bpb(runs, seed, "prequant"),
                     "post_quant_bpb": base_bpb(runs, seed, "quant"), "resumed": bool(tr.get("resumed")),
                     "hessian_seconds": quant["hessian_seconds"] if quant else 0.0,
                     "steps": tr["steps"], "train_seconds": tr["train_seconds"], "device": tr.get("device", "?"),
                     "artifact_bytes": art["total_bytes"] if art else None,
                     "code_bytes": art["code_bytes"] if art else None,
                     "cap_bytes": art["cap_bytes"] if art else None, "calibration_source": calib,
                     "world_size": tr.get("world_size", 1)})
    if not rows:
        raise ValueError(f"--runs: no run at the arm's score {score['point']}/{score['mode']}")
    if any(r["artifact_bytes"] is None for r in rows):
        raise ValueError(f"the arm's score is at point {score['point']}: a submission needs an artifact "
                         f"(a quant or rescue point)")
    return sorted(rows, key=lambda r: r["seed"])


def seed_result(r: dict) -> dict:
    """One seed's entry of seed_results, with the fields the records carry."""
    rounded = {k: None if r[k] is None else round(r[k], 8) for k in ("pre_quant_bpb", "post_quant_bpb")}
    return {"val_loss": round(r["val_loss"], 8), "val_bpb": round(r["val_bpb"], 8),
            "artifact_bytes": r["artifact_bytes"], "steps": r["steps"],
            "step_avg_ms": round(1000 * r["train_seconds"] / r["steps"], 2) if r["steps"] else None,
            "train_time_s": r["train_seconds"], "eval_time_s": r["eval_seconds"], "val_tokens": r["val_tokens"],
            **rounded}


def hardware(row: dict) -> str:
    """The device training ran on, as the records name it (e.g. 8xNVIDIA H100 80GB HBM3)."""
    device, world = row["device"], row.get("world_size", 1)
    if device.startswith("cuda") and torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return f"{world}x{device}" if world > 1 else device


def submission_json(arm: str, meta: dict, rows: list[dict], stats: dict, checks: dict) -> dict:
    loss = np.array([r["val_loss"] for r in rows])
    bpb = np.array([r["val_bpb"] for r in rows])
    sizes = [r["artifact_bytes"] for r in rows]
    out = {"author": meta["author"], "github_id": meta["github_id"], "name": meta.get("name") or arm,
           "blurb": meta.get("blurb") or f"caddie arm `{arm}`",
           "date": meta.get("date") or datetime.date.today().isoformat(), "track": meta["track"],
           "val_loss": round(float(loss.mean()), 8), "val_bpb": round(float(bpb.mean()), 8),
           "val_loss_std": round(float(loss.std(ddof=1)), 8) if len(rows) > 1 else None,
           "val_bpb_std": round(float(bpb.std(ddof=1)), 8) if len(rows) > 1 else None, "std_ddof": 1,
           "seeds": [r["seed"] for r in rows],
           "seed_results": {str(r["seed"]): seed_result(r) for r in rows},
           "artifact_bytes_mean": round(float(np.mean(sizes))), "artifact_bytes_max": max(sizes),
           "bytes_total": max(sizes), "bytes_code": max(r["code_bytes"] for r in rows),
           "train_steps_mean": round(float(np.mean([r["steps"] for r in rows])), 2),
           "step_avg_ms_mean": round(float(np.mean([seed_result(r)["step_avg_ms"] for r in rows])), 2),
           "score": f"{rows[0]['point']}/{rows[0]['mode']}", "hardware": hardware(rows[0]),
           "pytorch_version": torch.__version__,
           "compliance": {k: c["ok"] for k, c in checks.items()}}
    if (ref := stats["vs_reference"].get(arm)) is not None:
        out.update(comparison_name=ref["reference"], comparison_baseline_bpb=ref["reference_bpb"],
                   delta_vs_reference_bpb=round(ref["diff"], 8), t_statistic=ref["t"], p_value=ref["p_less"],
                   significance_test="one-sided one-sample t vs reference - 0.005 nats (df = n - 1)")
    return out


def seed_log(spec: dict, runs: list[dict], seed: int, manifest: Path) -> str:
    """A seed's train log in the records' format, from its artifacts (the exported file writes the same)."""
    mine = {(r["point"], r["mode"]): r for r in runs if int(r["seed"]) == seed}
    first = next(iter(mine.values()))
    train = read_json(first["train_summary"])
    metrics = [json.loads(line) for line in Path(first["train_metrics"]).read_text().splitlines()]
    evals = [(ev["point"], ev["mode"], read_json(mine[ev["point"], ev["mode"]]["eval"])) for ev in spec["evaluations"]]
    data = read_json(manifest)
    run = {"data_path": str(manifest.parent), "tokenizer_path": str(manifest.parent / data["tokenizer"]["file"]),
           "seed": seed, "run_id": f"seed{seed}", "world_size": train["world_size"], "rank": 0}
    hyper = recordrun.hyperparameters({**spec, "run": train["run"]}, run)
    sizes = {point: read_json(r["size"]) for (point, _), r in mine.items() if r.get("size")}
    return recordlog.run_log(hyper, data, spec["train"]["train"], train["run"]["log_every"], metrics, train, evals,
                             spec["quantize"]["compressor"], sizes)


def techniques(config: dict, defaults: dict) -> list[tuple[str, str]]:
    """The settings the arm switches on: off in caddie's defaults (false, 0, empty, null), on in the arm."""
    base, arm = flatten(defaults), flatten(config)
    return [(key, json.dumps(value)) for key, value in arm.items()
            if not base.get(key) and value and not key.startswith("tokenize.")]


def config_diff(config: dict, base: dict) -> list[tuple[str, str, str]]:
    a, b = flatten(config), flatten(base)
    return [(key, json.dumps(b.get(key)), json.dumps(a.get(key))) for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key)]


def reproduce(sub: dict, config: dict) -> list[str]:
    nproc = config["train"]["nproc"]
    launch = "python" if nproc == 1 else f"torchrun --standalone --nproc_per_node={nproc}"
    return ["```bash", "pip install -r requirements.txt",
            f"for SEED in {' '.join(map(str, sub['seeds']))}; do",
            f"  DATA_PATH=<shards folder> TOKENIZER_PATH=<its .model> SEED=$SEED RUN_ID=seed$SEED {launch} train_gpt.py",
            "done", "```"]


def data_source(config: dict, manifest: dict) -> str:
    tok = config["tokenize"]
    where = (f"the challenge's shards `{tok['challenge']['dir']}` with `{tok['challenge']['tokenizer']}`"
             if tok["source"] == "challenge" else f"caddie's tokenize of `{tok['source']}` (vocab {tok['vocab_size']})")
    shards = {split: sum(1 for s in manifest["shards"] if s["split"] == split) for split in ("train", "val")}
    return (f"{where}: {shards['train']} train shards ({manifest['tokens']['train']:,} tokens), {shards['val']} val "
            f"shards ({manifest['tokens']['val']:,} tokens).")


def readme(arm: str, sub: dict, stats: dict, checks: dict, config: dict, base: tuple[str, dict], defaults: dict,
           manifest: dict) -> str:
    d = stats["decomposition"][arm]
    steps = [(s["name"], f"{s['from']} → {s['to']}", f"{s['mean']:+.5f}",
              "–" if s["std"] is None else f"{s['std']:.5f}", "–" if s["p_two_sided"] is None
              else f"{s['p_two_sided']:.3g}") for s in d["steps"]]
    verdicts = [v for v in stats["verdicts"] if v.startswith(f"{arm} (")]
    diff = config_diff(config, base[1])
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(sub['seeds'])} seeds, sample std "
             f"{sub['val_bpb_std'] if sub['val_bpb_std'] is not None else '–'}), scored at {sub['score']}; "
             f"largest artifact {sub['bytes_total']:,} bytes, of which {sub['bytes_code']:,} are the counted "
             f"train_gpt.py. Exported by caddie from arm `{arm}`.", "",
             "## Reproduce", "", *reproduce(sub, config), "",
             "## Data", "", data_source(config, manifest), "",
             "## Techniques (on in this arm, off in caddie's defaults)", "",
             *markdown_table(["setting", "value"], techniques(config, defaults) or [("none", "–")]),
             f"## Configuration against `{base[0]}`", "",
             *(markdown_table(["setting", base[0], arm], diff) if diff else [f"The same as `{base[0]}`.", ""]),
             "## Significance", "", *(f"- {v}" for v in verdicts or ["No comparison configured."]), "",
             "## Seeds", "",
             *markdown_table(["seed", "val_loss", "val_bpb", "pre-quant bpb", "post-quant bpb", "artifact bytes",
                              "steps", "step avg ms", "train s", "eval s"],
                     [(s, f"{r['val_loss']:.8f}", f"{r['val_bpb']:.8f}", r["pre_quant_bpb"], r["post_quant_bpb"],
                       f"{r['artifact_bytes']:,}", r["steps"], r["step_avg_ms"], r["train_time_s"], r["eval_time_s"])
                      for s, r in sub["seed_results"].items()]),
             "## Decomposition (paired by seed; negative is a gain)", "",
             *markdown_table(["step", "from → to", "mean Δ bpb", "std", "p (two-sided)"], steps),
             "## Pre-submit checklist", "",
             *(f"- [{'x' if c['ok'] else ' '}] {name}: {c['detail']}" for name, c in checks.items()), "",
             "## Full configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
             "## Files", "", "- `train_gpt.py` (generated by `python -m stages.export`; the counted code)",
             "- `requirements.txt`", "- `submission.json`", *(f"- `train_seed{s}.log`" for s in sub["seeds"]), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.submission", description=__doc__.splitlines()[0])
    ap.add_argument("--arm", required=True)
    ap.add_argument("--runs", required=True, help="JSON list of the arm's run records (as the aggregate's)")
    ap.add_argument("--stats", required=True, type=Path, help="the aggregate's stats.json")
    ap.add_argument("--spec", required=True, help="the arm's export spec, as JSON (the plan's)")
    ap.add_argument("--config", required=True, help="the arm's resolved configuration, as JSON")
    ap.add_argument("--base-arm", required=True, help="the arm it is compared with (report.baseline_arm)")
    ap.add_argument("--base-config", required=True, help="that arm's resolved configuration, as JSON")
    ap.add_argument("--defaults", required=True, help="the config's defaults, as JSON")
    ap.add_argument("--meta", required=True, help="the config's submission section, as JSON")
    ap.add_argument("--manifest", required=True, type=Path, help="the tokenize manifest the arm used")
    ap.add_argument("--export-dir", required=True, type=Path, help="the arm's export: train_gpt.py, requirements.txt")
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    stats = read_json(args.stats)
    if args.arm not in stats["scores"]:
        raise ValueError(f"{args.stats}: no arm {args.arm!r} (arms: {', '.join(stats['scores'])})")
    score, runs, spec = stats["scores"][args.arm], json.loads(args.runs), json.loads(args.spec)
    rows = seed_rows(runs, score)
    progression = (stats.get("progression") or {}).get("arms", {}).get(args.arm)
    checks = compliance(rows, val_overlap(args.manifest), score, progression)
    sub = submission_json(args.arm, json.loads(args.meta), rows, stats, checks)
    for name in ("train_gpt.py", "requirements.txt"):
        with atomic_path(args.out_dir / name) as tmp:
            shutil.copyfile(args.export_dir / name, tmp)
    for r in rows:
        write_text(args.out_dir / f"train_seed{r['seed']}.log", seed_log(spec, runs, r["seed"], args.manifest))
    config = json.loads(args.config)
    write_text(args.out_dir / "README.md", readme(args.arm, sub, stats, checks, config,
                                                  (args.base_arm, json.loads(args.base_config)),
                                                  json.loads(args.defaults), read_json(args.manifest)))
    write_json(args.out_dir / "submission.json", sub)
    failed = [k for k, c in checks.items() if not c["ok"]]
    print(json.dumps({"val_bpb": sub["val_bpb"], "failed_checks": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
