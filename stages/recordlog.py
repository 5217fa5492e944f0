"""A run's train log in the records' format, built from its artifacts (stages/records.py parses it back).

The lines a record's train_gpt.py prints: the `Hyperparameters:` block, `train_shards` / `val_tokens`, the step
lines (caddie's, as the trainer prints them: step/total, train loss, train time, step average, tok/s), the
`stopping_early` line of a wallclock stop, the labelled evals with their eval times, the serialized sizes and
`Total submission size`. The step lines come from metrics.jsonl, which holds every step of every attempt of a
resumed run, so the log is complete however often the run was resumed.
"""
from stages.train import progress_line

POINT_LABELS = {"prequant": "diagnostic pre-quantization", "quant": "quantized", "rescue": "rescued_quantized"}
MODE_SUFFIXES = {"standard": "", "sliding": "_sliding_window", "ttt": "_ttt"}


def eval_label(point: str, mode: str) -> str:
    """A label stages.records maps back onto (point, mode); rescue reads as quant there, the record's final."""
    return POINT_LABELS[point] + MODE_SUFFIXES[mode]


def hyperparameter_lines(values: dict) -> list[str]:
    return ["Hyperparameters:", *(f"  {key}: {values[key]}" for key in sorted(values))]


def step_lines(metrics: list[dict], train_cfg: dict, log_every: int) -> list[str]:
    """Every log_every-th step, the first and the last, as the trainer logs them."""
    last = metrics[-1]["step"] if metrics else None
    return [progress_line(m, train_cfg) for m in metrics
            if m["step"] % log_every == 0 or m["step"] in (1, train_cfg["iterations"], last)]


def eval_line(point: str, mode: str, result: dict) -> str:
    return (f"{eval_label(point, mode)} val_loss:{result['loss_nats']:.8f} val_bpb:{result['val_bpb']:.8f} "
            f"eval_time:{result['seconds'] * 1000:.0f}ms")


def size_lines(size: dict, compressor: str) -> list[str]:
    """The serialized model, the counted code and their total (stages/codesize.artifact_size)."""
    code = size["code"]
    return [f"Serialized model quantized+{compressor}: {size['model_bytes']} bytes",
            f"Code size (uncompressed): {code['raw_bytes']} bytes",
            f"Code size (compressed): {code['bytes']} bytes ({code['accounting']})",
            f"Total submission size quantized+{compressor}: {size['total_bytes']} bytes"]


def run_log(hyper: dict, manifest: dict, train_cfg: dict, log_every: int, metrics: list[dict], train_summary: dict,
            evals: list[tuple[str, str, dict]], compressor: str, sizes: dict) -> str:
    """The whole log; `evals` are (point, mode, eval result) in the arm's decomposition order, `sizes` the
    artifact sizes of its points ({"quant": ..., "rescue": ...})."""
    train_shards = sum(1 for s in manifest["shards"] if s["split"] == "train")
    lines = [*hyperparameter_lines(hyper), f"train_shards: {train_shards}",
             f"val_tokens: {manifest['tokens']['val']}", f"model_params:{train_summary['params']}"]
    if train_summary.get("resumed"):
        lines.append("resumed_from_checkpoint: True")
    lines += step_lines(metrics, train_cfg, log_every)
    if train_summary.get("stopped_by") == "wallclock":
        lines.append(f"stopping_early: wallclock_cap train_time:{train_summary['train_seconds'] * 1000:.0f}ms "
                     f"step:{train_summary['steps']}/{train_cfg['iterations']}")
    for point, mode, result in evals:
        if point != "prequant" and not any(line.startswith("Total submission size") for line in lines):
            lines += size_lines(sizes["quant"], compressor)
        if point == "rescue" and not any(line.startswith("Total submission size rescued") for line in lines):
            lines.append(f"Total submission size rescued+{compressor}: {sizes['rescue']['total_bytes']} bytes")
        lines.append(eval_line(point, mode, result))
    lines.append(f"total_eval_time:{sum(r['seconds'] for _, _, r in evals):.1f}s")
    return "\n".join(lines) + "\n"
