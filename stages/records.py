"""Published runs of the challenge: parse train logs into caddie's results table.

The challenge's train logs come in two formats, and each line kind is matched by its own regex;
every other line (torch/NCCL warnings, hyperparameters, GPTQ and TTT progress) is ignored.

Baseline `train_gpt.py` (2026-03-17 NaiveBaseline):
    seed:1337
    step:200/20000 train_loss:2.8 train_time:8699ms step_avg:43.49ms
    step:13780/20000 val_loss:2.0606 val_bpb:1.2172 train_time:600038ms step_avg:43.54ms
    stopping_early: wallclock_cap train_time:600038ms step:13780/20000
    Total submission size int8+zlib: 15863489 bytes
    final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1401ms
    final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570

Records (2026-04-09 3LayerRecur, 2026-04-27 LQER): a `Hyperparameters:` block with `  seed: 42`,
step lines without the `step:` prefix and with the train time in minutes
(`500/20000 train_loss: 3.3346 train_time: 0.9m tok/s: ...`), `stopping_early: ... train_time:
588047ms step: 4550/20000`, `Total submission size quantized+brotli: N bytes`, and labelled evals
`<label> val_loss:X val_bpb:Y eval_time:Nms` with 8 decimals.

Labelled evals map onto caddie's (point, mode) by keywords in the label:
    pre-quantization / prequant / post-ema (the EMA model before export)   -> point prequant
    quant / roundtrip / int<N> / ttt (TTT adapts the dequantized artifact)  -> point quant
    rescued (caddie's exports: the rescued artifact)                         -> point rescue
    ttt -> mode ttt;  sliding -> mode sliding;  otherwise mode standard
so `[diagnostic] pre-quantization post-ema` -> prequant/standard, `final_int8_zlib_roundtrip` and
`[diagnostic] quantized` -> quant/standard, `quantized_sliding_window` -> quant/sliding,
`quantized_ttt` and `quantized_ttt_phased` -> quant/ttt. A label with none of the point keywords
is ignored. A `<label>_exact` line repeats the eval of `<label>` at 8 decimals: it refines that
eval's numbers and keeps its eval time. When no labelled prequant eval is logged (the baseline),
the last step-line val eval (the final model before export) is the prequant/standard eval.

The record's score (`final`) is its last eval of the last artifact point (rescue if logged, else quant) in
the best mode it reports: ttt if present, else sliding, else standard (the baseline's int8+zlib roundtrip).
"""
import json
import re
from pathlib import Path

NUM = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
SEED_LINE = re.compile(r"^\s*seed:\s*(\d+)\s*$")
TRAIN_STEP = re.compile(r"^(?:step:)?(\d+)/(\d+)\s+train_loss:\s*" + NUM + r"\s+train_time:\s*" + NUM
                        + r"(ms|s|m)\b")
VAL_STEP = re.compile(r"^(?:step:)?(\d+)/(\d+)\s+val_loss:\s*" + NUM + r"\s+val_bpb:\s*" + NUM)
STOPPING = re.compile(r"^stopping_early:.*?train_time:\s*(\d+)ms\s+step:\s*(\d+)/(\d+)")
# The unqualified "Total submission size: N bytes" is the unquantized model plus code, not the artifact.
SUBMISSION_SIZE = re.compile(r"^Total submission size (\S+): (\d+) bytes")
LABELLED_EVAL = re.compile(r"^([A-Za-z][\w+\- ]*?)\s+val_loss:\s*" + NUM + r"\s+val_bpb:\s*" + NUM)
EVAL_TIME = re.compile(r"\beval_time:\s*" + NUM + r"ms")
SEED_IN_NAME = re.compile(r"_seed(\d+)")

PREQUANT_HINT = re.compile(r"pre[-_ ]?quant|post[-_ ]?ema")
RESCUE_HINT = re.compile(r"^rescued")
QUANT_HINT = re.compile(r"quant|roundtrip|int\d|ttt")
TIME_UNIT_MS = {"ms": 1.0, "s": 1000.0, "m": 60000.0}
MODE_RANK = {"standard": 0, "sliding": 1, "ttt": 2}


def record_name(path) -> str:
    """The record a log or submission.json belongs to, from its file name
    (`<record>_seed42.log`, `<record>_train.log`, `<record>_submission.json`); a bare
    `train_seed42.log` or `submission.json` inside a record folder is named after the folder."""
    path = Path(path)
    stem = re.sub(r"(_train)?(_seed\d+)?(_train)?(_submission)?$", "", path.stem)
    return stem if stem not in ("", "train", "submission") else path.parent.name


def eval_point_mode(label: str):
    """(point, mode) of a labelled eval, or None when the label names neither point."""
    label = label.lower()
    if PREQUANT_HINT.search(label):
        point = "prequant"
    elif RESCUE_HINT.search(label):
        point = "rescue"
    elif QUANT_HINT.search(label):
        point = "quant"
    else:
        return None
    mode = "ttt" if "ttt" in label else "sliding" if "sliding" in label else "standard"
    return point, mode


def train_time_ms(value: str, unit: str) -> float:
    return float(value) * TIME_UNIT_MS[unit]


def parse_labelled_eval(line: str):
    """{label, point, mode, val_loss, val_bpb, seconds} of an eval line, or None."""
    m = LABELLED_EVAL.match(line)
    if not m:
        return None
    label = m.group(1).strip()
    kind = eval_point_mode(label.removesuffix("_exact"))
    if kind is None:
        return None
    t = EVAL_TIME.search(line, m.end())
    return {"label": label, "point": kind[0], "mode": kind[1], "val_loss": float(m.group(2)),
            "val_bpb": float(m.group(3)), "seconds": float(t.group(1)) / 1000 if t else None}


def add_eval(evals: list, ev: dict) -> None:
    """Append ev, or let an `<label>_exact` line refine the numbers of its `<label>` eval."""
    if ev["label"].endswith("_exact"):
        stem = ev["label"].removesuffix("_exact")
        for prev in reversed(evals):
            if prev["label"] == stem:
                prev.update(label=ev["label"], val_loss=ev["val_loss"], val_bpb=ev["val_bpb"])
                return
    evals.append(ev)


def final_eval(evals: list, path) -> dict:
    quant = [e for e in evals if e["point"] == "rescue"] or [e for e in evals if e["point"] == "quant"]
    if not quant:
        raise ValueError(f"{path}: no final (quantized) val_bpb in the log")
    best = max(MODE_RANK[e["mode"]] for e in quant)
    last = [e for e in quant if MODE_RANK[e["mode"]] == best][-1]
    return {k: last[k] for k in ("point", "mode", "val_loss", "val_bpb")}


def parse_log(path) -> dict:
    """One published train log: {record, seed, evals, final, train_steps, train_seconds,
    artifact_bytes, curve}. Raises ValueError naming the file when it has no final metric or seed."""
    path = Path(path)
    seed = stop = last_val = artifact = None
    evals, curve = [], []
    last_step = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if m := TRAIN_STEP.match(line):
                curve.append({"step": int(m.group(1)), "train_loss": float(m.group(3)),
                              "train_time_ms": train_time_ms(m.group(4), m.group(5))})
                last_step = max(last_step, int(m.group(1)))
            elif m := VAL_STEP.match(line):
                last_val = {"label": f"step {m.group(1)}", "point": "prequant", "mode": "standard",
                            "val_loss": float(m.group(3)), "val_bpb": float(m.group(4)), "seconds": None}
                last_step = max(last_step, int(m.group(1)))
            elif m := STOPPING.match(line):
                stop = {"train_ms": int(m.group(1)), "step": int(m.group(2))}
            elif m := SUBMISSION_SIZE.match(line):
                artifact = int(m.group(2))
            elif m := SEED_LINE.match(line):
                seed = seed if seed is not None else int(m.group(1))
            elif ev := parse_labelled_eval(line):
                add_eval(evals, ev)
    if last_val is not None and not any(e["point"] == "prequant" for e in evals):
        evals.insert(0, last_val)
    if seed is None and (m := SEED_IN_NAME.search(path.stem)):
        seed = int(m.group(1))
    if seed is None:
        raise ValueError(f"{path}: no seed line in the log and no _seed<N> in its name")
    if stop is not None:
        steps, seconds = stop["step"], stop["train_ms"] / 1000
    else:
        steps = last_step or None
        seconds = curve[-1]["train_time_ms"] / 1000 if curve else None
    return {"record": record_name(path), "seed": seed, "evals": evals, "final": final_eval(evals, path),
            "train_steps": steps, "train_seconds": seconds, "artifact_bytes": artifact, "curve": curve}


def last_eval_per_kind(evals: list) -> list:
    """One eval per (point, mode): a log that evaluates the same kind twice (e.g. a diagnostic and a
    scored eval, or two TTT variants) is represented by its last one, the one the record reports."""
    latest = {}
    for ev in evals:
        latest.pop((ev["point"], ev["mode"]), None)  # re-insert so the order follows the kept eval
        latest[(ev["point"], ev["mode"])] = ev
    return list(latest.values())


def results_rows(paths) -> list:
    """Rows for the aggregate stage's results table, one per (log, point, mode), source "published".
    A prequant row has no artifact (as in aggregate), so its artifact_bytes is None."""
    rows = []
    for path in paths:
        log = parse_log(path)
        for ev in last_eval_per_kind(log["evals"]):
            rows.append({"arm": log["record"], "seed": log["seed"], "point": ev["point"], "mode": ev["mode"],
                         "tokens": None, "bytes": None, "raw_bytes": None, "loss_nats": ev["val_loss"],
                         "val_bpb": ev["val_bpb"], "seconds": ev["seconds"], "train_steps": log["train_steps"],
                         "train_seconds": log["train_seconds"],
                         "artifact_bytes": None if ev["point"] == "prequant" else log["artifact_bytes"],
                         "source": "published"})
    return rows


def seed_of_log(path) -> int:
    """The seed a log prints (baseline `seed:N`, records `  seed: N`), else the one in its name."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if m := SEED_LINE.match(line):
                return int(m.group(1))
    if m := SEED_IN_NAME.search(Path(path).stem):
        return int(m.group(1))
    raise ValueError(f"{path}: no seed line in the log and no _seed<N> in its name")


def matching_logs(path) -> list:
    """The *.log files beside a submission.json that belong to the same record (same record_name)."""
    path = Path(path)
    return sorted(p for p in path.parent.glob("*.log") if record_name(p) == record_name(path))


def submission_seed_bpb(path, log=None) -> dict:
    """{str(seed): val_bpb} of a submission.json: its `seed_results`, or for a single-seed submission
    (the baseline has none) its top-level val_bpb under the seed of its one train log. That log is
    `log` if given, else the only *.log beside the json with the same record name (for
    `2026-03-17_NaiveBaseline_submission.json`, `2026-03-17_NaiveBaseline_train.log`)."""
    path = Path(path)
    sub = json.loads(path.read_text())
    if isinstance(sub.get("seed_results"), dict):
        return {str(seed): float(r["val_bpb"]) for seed, r in sub["seed_results"].items()}
    if log is None:
        logs = matching_logs(path)
        if len(logs) != 1:
            raise ValueError(f"{path}: no seed_results, and {len(logs)} logs of record "
                             f"{record_name(path)!r} beside it (need exactly one to take its seed)")
        log = logs[0]
    return {str(seed_of_log(log)): float(sub["val_bpb"])}
