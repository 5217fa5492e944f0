"""What a lent GPU measures, side by side in one run: caddie's stages as the pipeline runs them (their own CLIs,
configs resolved by stages.config.plan) and the challenge's train_gpt.py, on synthetic challenge-format shards.

    python3 bench/device_bench.py --out $OUT/device-DATE.md          # on the device (bench/device_check.sh)
    .venv/bin/python bench/device_bench.py --smoke --out /tmp/d.md   # here: the same path, tiny shapes, CPU

Rows: the baseline shape's train step (9x512, vocab 1024, seq 1024, 524,288 tokens/step, compile, bf16) for
caddie and for train_gpt.py (when .device/train_gpt.py is there: the challenge's file, never committed);
the frontier shape's step (11x512, MLP 4x, vocab 8192, seq 2048); GPTQ of the frontier shape (Hessians and
quantize seconds, 16 x 32 calibration windows); sliding-window eval tokens/s of the baseline checkpoint.
MFU counts 6 N + 12 L d T flops per token against the H100/H200 dense bf16 peak (989.5 TFLOP/s).
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from scale import synthetic_dataset  # noqa: E402
from stages import config as caddie  # noqa: E402

PEAK_FLOPS = 989.5e12
CARRIED = ROOT / ".device"  # tokenizers and the challenge's train_gpt.py, carried to the device
SHAPES = {
    "baseline": {"model": {"num_layers": 9, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 2},
                 "vocab": 1024, "seq_len": 1024},
    "frontier": {"model": {"num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 4},
                 "vocab": 8192, "seq_len": 2048},
}
SMOKE = {"model": {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1, "mlp_mult": 2}}


RECORD_PRESET = ROOT / "presets" / "record-2135.yaml"  # the frontier row trains the record's model and options
RECORD_MS_PER_STEP = 121.25  # #1855 on 8xH100 (its log; reference/perf-anchors.md): about 8x that on one GPU
RECORD_LOOPED_MS = 140.9  # the same, once the loop is on (96.5 before)


def record_stack(train: dict) -> None:
    """The record preset's model options and training techniques over `train` (its shape, data and run settings
    stay the bench's)."""
    preset = yaml.safe_load(RECORD_PRESET.read_text())["defaults"]["train"]
    train["model"].update({k: v for k, v in preset["model"].items() if k not in SHAPES["frontier"]["model"]})
    for key in ("doc_isolation", "document_packing", "ema", "recur_start", "optimizer"):
        train[key] = caddie.deep_merge(train[key], preset[key]) if isinstance(train[key], dict) else preset[key]


def arm_config(shape: str, smoke: bool) -> dict:
    """config.yaml's defaults with the shape, on one GPU (or tiny on CPU for --smoke); the frontier shape with
    the record's model and training stack."""
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())
    d = cfg["defaults"]
    s = SHAPES[shape]
    d["curriculum"]["enabled"] = False
    if shape == "frontier":
        record_stack(d["train"])
        if smoke:
            d["train"]["model"].update(recur_layers=[0, 1], parallel_from=1, xsa_layers=2)
    d["train"]["model"].update(SMOKE["model"] if smoke else s["model"])
    d["train"].update(seq_len=s["seq_len"] if not smoke else 128, batch_tokens=(786_432 if shape == "frontier" else 524_288) if not smoke else 4096,
                      micro_batches=8, iterations=30 if not smoke else 12, warmdown_iters=5, warmup_steps=10 if not smoke else 0,
                      max_seconds=0, device="cpu" if smoke else "cuda", nproc=1, compile=not smoke, log_every=5,
                      checkpoint_every=0)
    d["quantize"].update(method="gptq", bits=6, embed_bits=8, compressor="zstd", device="cpu" if smoke else "cuda",
                         keep_float_max_numel=65536 if not smoke else 256)
    d["quantize"]["calibration"].update(source="train", batches=16 if not smoke else 2, batch_seqs=32 if not smoke else 4,
                                        seq_len=s["seq_len"] if not smoke else 128)
    d["evaluate"].update(modes=["sliding"], seq_len=s["seq_len"] if not smoke else 128, stride=64 if not smoke else 32,
                         batch_seqs=256 if not smoke else 16, device="cpu" if smoke else "cuda", nproc=1)
    cfg["arms"] = {shape: {}}
    return cfg


def stage_configs(cfg: dict) -> dict:
    """The train, quantize and sliding-evaluate configs exactly as the pipeline passes them to the stages."""
    plan = caddie.plan(cfg)
    keys = next(iter(plan["arms"].values()))
    return {"train": plan["stages"]["train"][keys["train"]]["config"],
            "train_run": plan["stages"]["train"][keys["train"]]["run"],
            "quantize": plan["stages"]["quantize"][keys["quantize"]]["config"],
            "evaluate": plan["stages"]["evaluate"][keys["evaluate"]["prequant"]["sliding"]]["config"]}


def run(cmd: list, timeout: float, cwd=None, env=None) -> str:
    done = subprocess.run(cmd, cwd=cwd or ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))}... exit {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout + done.stderr


def flops_per_token(params: int, model: dict, seq_len: int) -> float:
    return 6 * params + 12 * model["num_layers"] * model["model_dim"] * seq_len


def caddie_train(configs: dict, manifest: Path, out: Path, timeout: float) -> dict:
    run([sys.executable, "-m", "stages.train", "--config", json.dumps(configs["train"]),
         "--run-settings", json.dumps(configs["train_run"]), "--manifest", str(manifest),
         "--seed", "1337", "--out-dir", str(out), "--resume-dir", str(out / "resume")], timeout)
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    late = metrics[len(metrics) // 2:]  # past compile and the first steps
    ms = (late[-1]["ms"] - late[0]["ms"]) / max(late[-1]["step"] - late[0]["step"], 1)
    train = configs["train"]["train"]
    tps = train["batch_tokens"] / (ms / 1000)
    return {"ms_per_step": ms, "tokens_per_second": tps, "params": summary["params"],
            "mfu": tps * flops_per_token(summary["params"], train["model"], train["seq_len"]) / PEAK_FLOPS}


def challenge_train(manifest: Path, timeout: float) -> dict | None:
    """train_gpt.py at the baseline shape on the same shards, when the challenge's file was carried."""
    script, tokenizer = CARRIED / "train_gpt.py", CARRIED / "fineweb_1024_bpe.model"
    if not script.exists() or not tokenizer.exists():
        return None
    env = {"DATA_PATH": str(manifest.parent), "TOKENIZER_PATH": str(tokenizer), "ITERATIONS": "30",
           "WARMUP_STEPS": "10", "TRAIN_LOG_EVERY": "5", "VAL_LOSS_EVERY": "0", "MAX_WALLCLOCK_SECONDS": "0",
           "SEED": "1337", "RUN_ID": "device_bench"}
    with tempfile.TemporaryDirectory() as cwd:
        log = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)],
                  timeout, cwd=cwd, env=env)
    steps = [(int(m[1]), float(m[2])) for m in re.finditer(r"step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms", log)]
    if len(steps) < 2:
        raise RuntimeError(f"train_gpt.py logged no step lines: {log[-800:]}")
    (s0, t0), (s1, t1) = steps[len(steps) // 2], steps[-1]
    ms = (t1 - t0) / max(s1 - s0, 1)
    return {"ms_per_step": ms, "tokens_per_second": 524_288 / (ms / 1000)}


def caddie_quantize(configs: dict, train_out: Path, manifest: Path, out: Path, timeout: float) -> dict:
    run([sys.executable, "-m", "stages.quantize", "--config", json.dumps(configs["quantize"]),
         "--checkpoint", str(train_out / "model.pt"), "--checkpoint-summary", str(train_out / "summary.json"),
         "--manifest", str(manifest), "--seed", "1337", "--out", str(out / "artifact.bin"),
         "--summary", str(out / "summary.json")], timeout)
    s = json.loads((out / "summary.json").read_text())
    return {k: s.get(k) for k in ("hessian_seconds", "quantize_seconds", "seconds", "total_bytes", "device")}


def caddie_sliding(configs: dict, train_out: Path, manifest: Path, out: Path, timeout: float) -> dict:
    run([sys.executable, "-m", "stages.evaluate", "--config", json.dumps(configs["evaluate"]), "--mode", "sliding",
         "--model", str(train_out / "model.pt"), "--model-summary", str(train_out / "summary.json"),
         "--manifest", str(manifest), "--out", str(out)], timeout)
    r = json.loads(out.read_text())
    return {"seconds": r["seconds"], "tokens": r["tokens"], "tokens_per_second": r["tokens"] / r["seconds"],
            "val_bpb": r["val_bpb"]}


def guarded(name: str, fn, results: dict):
    t0 = time.time()
    try:
        results[name] = fn()
    except Exception as e:  # one failed row must not lose the others' numbers
        results[name] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
    print(f"{name}: {time.time() - t0:.0f} s {results[name]}", file=sys.stderr, flush=True)


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"


def fmt(r, key, spec):
    if r is None:
        return "not run"
    if "error" in r:
        return "failed"
    return "–" if r.get(key) is None else format(r[key], spec)


def report(results: dict, args) -> str:
    import torch
    lines = [f"# Device check, {datetime.date.today()}: {device_name()}", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPU cores{', SMOKE (tiny shapes on CPU)' if args.smoke else ''}; "
             "synthetic challenge-format shards (Zipf ids, BOS-started documents).", "",
             "    bash bench/device_check.sh", "",
             "| train step (1 GPU) | ms/step | tokens/s | MFU |", "|---|---:|---:|---:|"]
    for name, label in (("caddie_baseline", "caddie, baseline shape"), ("challenge_baseline", "train_gpt.py, baseline shape"),
                        ("caddie_frontier", "caddie, frontier shape")):
        r = results.get(name)
        lines.append(f"| {label} | {fmt(r, 'ms_per_step', '.1f')} | {fmt(r, 'tokens_per_second', ',.0f')} | "
                     f"{fmt(r, 'mfu', '.1%')} |")
    b, c = results.get("caddie_baseline"), results.get("challenge_baseline")
    if b and c and "error" not in b and "error" not in c:
        lines += ["", f"caddie / train_gpt.py ms per step: {b['ms_per_step'] / c['ms_per_step']:.3f}"]
    f = results.get("caddie_frontier")
    if f and "error" not in f:
        lines += ["", f"Frontier row: {RECORD_PRESET.name}'s model and training options (document packing, depth "
                  "recurrence from 35% of the steps, so the timed second half runs looped), 786,432 tokens/step as 8 "
                  f"micro-batches. The record on 8xH100: {RECORD_MS_PER_STEP} ms/step on average, "
                  f"{RECORD_LOOPED_MS} ms looped, so about {8 * RECORD_LOOPED_MS:.0f} ms looped on one GPU "
f"of that class; caddie here: {f['ms_per_step']:.0f} ms ({f['ms_per_step'] / (8 * RECORD_LOOPED_MS):.2f}×)."]
    q, e = results.get("gptq_frontier"), results.get("sliding_baseline")
    lines += ["", "| GPTQ, frontier shape | Hessian s | quantize s | stage s | artifact bytes |", "|---|---:|---:|---:|---:|",
              f"| {fmt(q, 'device', 's')} | {fmt(q, 'hessian_seconds', '.1f')} | {fmt(q, 'quantize_seconds', '.1f')} | "
              f"{fmt(q, 'seconds', '.1f')} | {fmt(q, 'total_bytes', ',d')} |",
              "", "| sliding eval, baseline shape | val tokens | seconds | tokens/s |", "|---|---:|---:|---:|",
              f"| stride 64 | {fmt(e, 'tokens', ',d')} | {fmt(e, 'seconds', '.1f')} | {fmt(e, 'tokens_per_second', ',.0f')} |"]
    errors = {k: v["error"] for k, v in results.items() if v and "error" in v}
    if errors:
        lines += ["", "Failures:", ""] + [f"- {k}: `{v}`" for k, v in errors.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the path, measures nothing")
    ap.add_argument("--work", default=Path(tempfile.gettempdir()) / "caddie-device", type=Path)
    ap.add_argument("--timeout", default=150, type=float, help="seconds per row")
    args = ap.parse_args(argv)
    tokenizers = {1024: CARRIED / "fineweb_1024_bpe.model", 8192: CARRIED / "fineweb_8192_bpe.model"}
    for vocab, path in tokenizers.items():
        if not path.exists():
            sys.exit(f"{path}: missing; run `bash bench/device_check.sh --prepare` on the CPU machine first")
    data = {shape: synthetic_dataset(args.work, "10M" if args.smoke else "50M", "1M" if args.smoke else "2M",
                                     SHAPES[shape]["vocab"], tokenizers[SHAPES[shape]["vocab"]]) for shape in SHAPES}
    configs = {shape: stage_configs(arm_config(shape, args.smoke)) for shape in SHAPES}
    out = args.work / "runs"
    results = {}
    guarded("caddie_baseline", lambda: caddie_train(configs["baseline"], data["baseline"], out / "baseline", args.timeout),
            results)
    if not args.smoke:
        guarded("challenge_baseline", lambda: challenge_train(data["baseline"], args.timeout), results)
    guarded("caddie_frontier", lambda: caddie_train(configs["frontier"], data["frontier"], out / "frontier", args.timeout),
            results)
    guarded("gptq_frontier", lambda: caddie_quantize(configs["frontier"], out / "frontier", data["frontier"],
                                                     out / "gptq", args.timeout), results)
    guarded("sliding_baseline", lambda: caddie_sliding(configs["baseline"], out / "baseline", data["baseline"],
                                                       out / "sliding.json", args.timeout), results)
    text = report(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    (args.out.with_suffix(".json")).write_text(json.dumps(results, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
