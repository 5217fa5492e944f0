"""Submission export: one arm's runs -> a records-style folder (submission.json, README.md, train logs).

    python -m stages.submission --arm ARM --runs RUNS_JSON --stats reports/stats.json
        --config ARM_CONFIG_JSON --meta SUBMISSION_JSON --manifest MANIFEST --train-log LOG ... --out-dir DIR

The submission's score is the arm's score in stats.json (its decomposition chain's last point and
mode). The compliance checklist is computed from the artifacts, never asserted: training and eval
seconds against the challenge's limits, every artifact's counted bytes against the cap, val data kept
out of training, calibration and rescue, a score-first eval, and the number of seeds.
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


def compliance(rows: list[dict], overlap: dict, score: dict) -> dict:
    """The checklist, each item {ok, detail}, from the per-seed rows of the arm's score."""
    train_s = max(r["train_seconds"] for r in rows)
    eval_s = max(r["eval_seconds"] for r in rows)
    total = max(r["artifact_bytes"] for r in rows)
    cap = min(r["cap_bytes"] for r in rows)
    calib = sorted({r["calibration_source"] for r in rows if r["calibration_source"]})
    modes = sorted({r["mode"] for r in rows})
    return {
        "train_under_600s": check(train_s <= TRAIN_LIMIT_SECONDS,
                                  f"longest training loop {train_s:.1f} s (limit {TRAIN_LIMIT_SECONDS:.0f} s) "
                                  f"on {rows[0]['device']}"),
        "eval_under_600s": check(eval_s <= EVAL_LIMIT_SECONDS,
                                 f"longest {score['point']}/{score['mode']} eval {eval_s:.1f} s "
                                 f"(limit {EVAL_LIMIT_SECONDS:.0f} s)"),
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
    }


def seed_rows(runs: list[dict], score: dict) -> list[dict]:
    """Per seed: the score's eval joined with its train summary and artifact summary."""
    rows = []
    for rec in runs:
        if (rec["point"], rec["mode"]) != (score["point"], score["mode"]):
            continue
        ev, tr = read_json(rec["eval"]), read_json(rec["train_summary"])
        art = read_json(rec["quantize_summary"]) if rec.get("quantize_summary") else None
        calib = (read_json(rec["calibration_summary"])["config"]["calibration"]["source"]
                 if rec.get("calibration_summary") else None)
        rows.append({"seed": int(rec["seed"]), "point": ev["point"], "mode": ev["mode"],
                     "val_loss": ev["loss_nats"], "val_bpb": ev["val_bpb"], "eval_seconds": ev["seconds"],
                     "steps": tr["steps"], "train_seconds": tr["train_seconds"], "device": tr.get("device", "?"),
                     "artifact_bytes": art["total_bytes"] if art else None,
                     "code_bytes": art["code_bytes"] if art else None,
                     "cap_bytes": art["cap_bytes"] if art else None, "calibration_source": calib})
    if not rows:
        raise ValueError(f"--runs: no run at the arm's score {score['point']}/{score['mode']}")
    if any(r["artifact_bytes"] is None for r in rows):
        raise ValueError(f"the arm's score is at point {score['point']}: a submission needs an artifact "
                         f"(a quant or rescue point)")
    return sorted(rows, key=lambda r: r["seed"])


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
           "seed_results": {str(r["seed"]): {"val_loss": round(r["val_loss"], 8), "val_bpb": round(r["val_bpb"], 8),
                                             "artifact_bytes": r["artifact_bytes"], "steps": r["steps"],
                                             "train_time_s": r["train_seconds"], "eval_time_s": r["eval_seconds"]}
                            for r in rows},
           "artifact_bytes_mean": round(float(np.mean(sizes))), "artifact_bytes_max": max(sizes),
           "bytes_total": max(sizes), "bytes_code": max(r["code_bytes"] for r in rows),
           "score": f"{rows[0]['point']}/{rows[0]['mode']}", "hardware": rows[0]["device"],
           "pytorch_version": torch.__version__,
           "compliance": {k: c["ok"] for k, c in checks.items()}}
    if (ref := stats["vs_reference"].get(arm)) is not None:
        out.update(comparison_name=ref["reference"], comparison_baseline_bpb=ref["reference_bpb"],
                   delta_vs_reference_bpb=round(ref["diff"], 8), t_statistic=ref["t"], p_value=ref["p_less"],
                   significance_test="one-sided one-sample t vs reference - 0.005 nats (df = n - 1)")
    return out


def readme(arm: str, sub: dict, stats: dict, checks: dict, config: dict) -> str:
    d = stats["decomposition"][arm]
    steps = [(s["name"], f"{s['from']} → {s['to']}", f"{s['mean']:+.5f}",
              "–" if s["std"] is None else f"{s['std']:.5f}", "–" if s["p_two_sided"] is None
              else f"{s['p_two_sided']:.3g}") for s in d["steps"]]
    verdicts = [v for v in stats["verdicts"] if v.startswith(f"{arm} (")]
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"**val_bpb {sub['val_bpb']:.8f}** (mean of {len(sub['seeds'])} seeds, sample std "
             f"{sub['val_bpb_std'] if sub['val_bpb_std'] is not None else '–'}), scored at {sub['score']}; "
             f"largest artifact {sub['bytes_total']:,} bytes. Exported by caddie from arm `{arm}`.", "",
             "## Significance", "", *(f"- {v}" for v in verdicts or ["No comparison configured."]), "",
             "## Seeds", "",
             *markdown_table(["seed", "val_loss", "val_bpb", "artifact bytes", "steps", "train s", "eval s"],
                     [(s, f"{r['val_loss']:.8f}", f"{r['val_bpb']:.8f}", f"{r['artifact_bytes']:,}", r["steps"],
                       r["train_time_s"], r["eval_time_s"]) for s, r in sub["seed_results"].items()]),
             "## Decomposition (paired by seed; negative is a gain)", "",
             *markdown_table(["step", "from → to", "mean Δ bpb", "std", "p (two-sided)"], steps),
             "## Compliance", "",
             *(f"- [{'x' if c['ok'] else ' '}] {name}: {c['detail']}" for name, c in checks.items()), "",
             "## Configuration", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", "",
             "## Files", "", "- `submission.json`", *(f"- `train_seed{s}.log`" for s in sub["seeds"]), ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m stages.submission", description=__doc__.splitlines()[0])
    ap.add_argument("--arm", required=True)
    ap.add_argument("--runs", required=True, help="JSON list of the arm's run records (as the aggregate's)")
    ap.add_argument("--stats", required=True, type=Path, help="the aggregate's stats.json")
    ap.add_argument("--config", required=True, help="the arm's resolved configuration, as JSON")
    ap.add_argument("--meta", required=True, help="the config's submission section, as JSON")
    ap.add_argument("--manifest", required=True, type=Path, help="the tokenize manifest the arm used")
    ap.add_argument("--train-log", nargs="+", required=True, type=Path, help="train logs, one per seed")
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    stats = read_json(args.stats)
    if args.arm not in stats["scores"]:
        raise ValueError(f"{args.stats}: no arm {args.arm!r} (arms: {', '.join(stats['scores'])})")
    score = stats["scores"][args.arm]
    rows = seed_rows(json.loads(args.runs), score)
    checks = compliance(rows, val_overlap(args.manifest), score)
    sub = submission_json(args.arm, json.loads(args.meta), rows, stats, checks)
    logs = {int(p.parent.name.removeprefix("seed")): p for p in args.train_log}  # .../seed<N>/train.log
    for r in rows:
        if r["seed"] not in logs:
            raise ValueError(f"--train-log: no log for seed {r['seed']} (got {sorted(logs)})")
        with atomic_path(args.out_dir / f"train_seed{r['seed']}.log") as tmp:
            shutil.copyfile(logs[r["seed"]], tmp)
    write_text(args.out_dir / "README.md", readme(args.arm, sub, stats, checks, json.loads(args.config)))
    write_json(args.out_dir / "submission.json", sub)
    failed = [k for k, c in checks.items() if not c["ok"]]
    print(json.dumps({"val_bpb": sub["val_bpb"], "failed_checks": failed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
