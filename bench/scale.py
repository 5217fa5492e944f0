"""Stage x data size -> wall time and peak anonymous memory, on synthetic challenge-format shards.

    .venv/bin/python bench/scale.py                          # writes bench/results/scale.md
    .venv/bin/python bench/scale.py --before a51e76f         # and the same stages at an older commit, side by side

The shards are the challenge's format (stages/shards.py): Zipf-distributed token ids over an 8,192 vocabulary,
documents started by BOS (id 1) with geometric lengths (mean 1,000 tokens), train shards of at most 100M
tokens, cached under --work. Each (stage, size) runs in a fresh process whose RssAnon (anonymous memory:
what memory-mapped shards do not count in) is sampled every 5 ms; the table gives its peak and the wall
time of the stage call itself. An older commit (--before) runs from a `git worktree` of it, beside the
current code in the same invocation, so the ratio is what to read (the machine is noisy).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VOCAB, BOS, SHARD_TOKENS, MEAN_DOC = 8192, 1, 100_000_000, 1000
SIZES = {"10M": 10_000_000, "50M": 50_000_000, "100M": 100_000_000, "1B": 1_000_000_000}
VAL_SIZES = {"1M": 1_000_000, "2M": 2_000_000, "10M": 10_000_000}
STAGES = ("curriculum", "train_loader", "quantize_calibration", "rescue_batches", "leak_check")
SEQ_LEN = 2048


# ---- synthetic data -------------------------------------------------------------------------------

def synthetic_tokens(count: int, seed: int, vocab: int = VOCAB) -> np.ndarray:
    """Zipf(1.1) ids in [2, vocab) with a BOS starting each document."""
    rng = np.random.default_rng(seed)
    tokens = (rng.zipf(1.1, size=count) % (vocab - 2) + 2).astype(np.uint16)
    starts = np.cumsum(rng.geometric(1 / MEAN_DOC, size=count // MEAN_DOC * 2))
    tokens[0] = BOS
    tokens[starts[starts < count]] = BOS
    return tokens


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def synthetic_split(folder: Path, split: str, total: int, seed: int, vocab: int = VOCAB) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from stages.shards import shard_name, write_shard
    entries = []
    for i, lo in enumerate(range(0, total, SHARD_TOKENS)):
        path = folder / shard_name(split, i)
        if not path.exists():
            write_shard(path, synthetic_tokens(min(SHARD_TOKENS, total - lo), seed * 1000 + i, vocab))
        entries.append({"name": path.name, "split": split, "sha256": sha256_of(path),
                        "tokens": min(SHARD_TOKENS, total - lo)})
    return entries


def synthetic_dataset(work: Path, train: str, val: str, vocab: int = VOCAB, tokenizer: Path | None = None) -> Path:
    """A folder of shards and a tokenize-style manifest (cached); with `tokenizer` (a SentencePiece model of
    `vocab` pieces, copied in) evaluate can count its bytes."""
    folder = work / f"train{train}-val{val}-vocab{vocab}"
    manifest = folder / "manifest.json"
    if manifest.exists():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    shards = (synthetic_split(folder, "val", VAL_SIZES[val], 1, vocab)
              + synthetic_split(folder, "train", SIZES[train], 2, vocab))
    content = {"vocab_size": vocab, "bos_id": BOS, "shards": shards}
    if tokenizer:
        (folder / "tokenizer.model").write_bytes(Path(tokenizer).read_bytes())
        content["tokenizer"] = {"file": "tokenizer.model", "sha256": sha256_of(folder / "tokenizer.model")}
    manifest.write_text(json.dumps(content))
    return manifest


def synthetic_corpus(work: Path, megabytes: int) -> Path:
    """A jsonl corpus of about `megabytes` MB: documents of Zipf-drawn words (cached)."""
    path = work / f"corpus{megabytes}MB.jsonl"
    if path.exists():
        return path
    rng = np.random.default_rng(megabytes)
    words = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
                      for _ in range(20_000)])
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        written, i = 0, 0
        while written < megabytes * 1_000_000:
            doc = " ".join(words[rng.zipf(1.2, size=int(rng.integers(200, 1000))) % len(words)])
            line = json.dumps({"id": i, "text": doc}) + "\n"
            f.write(line)
            written, i = written + len(line), i + 1
    tmp.rename(path)
    return path


# ---- one stage, in a child process -----------------------------------------------------------------

def default_config() -> dict:
    """The defaults of the code being measured (a child runs in its code root: an older commit, its own)."""
    import yaml
    return yaml.safe_load((Path.cwd() / "config.yaml").read_text())["defaults"]


def measure(stage: str, manifest: Path, scratch: Path) -> dict:
    """Run one stage's data path on `manifest`; returns {seconds, ...} of the call itself."""
    cfg = default_config()
    start = time.perf_counter()
    extra = {}
    if stage == "curriculum":
        from stages import curriculum
        curriculum.run({"buckets": 16, "seq_len": SEQ_LEN}, manifest, scratch / "buckets.npz", scratch / "c.json")
    elif stage == "train_loader":
        extra = train_loader(manifest, scratch, cfg)
    elif stage == "quantize_calibration":
        from stages import quantize
        quantize.train_calibration(manifest, {**cfg["quantize"]["calibration"], "batches": 16, "batch_seqs": 32,
                                              "seq_len": SEQ_LEN}, 1337)
    elif stage == "rescue_batches":
        from stages import rescue
        rescue.train_batches(manifest, {"batches": 16, "batch_seqs": 32, "seq_len": SEQ_LEN, "holdout_batches": 2},
                             1337)
    elif stage == "leak_check":
        from stages import submission
        extra = submission.val_overlap(manifest)
    elif stage == "tokenize":  # `manifest` is a jsonl corpus here
        from stages import config as caddie
        from stages import tokenize
        tok = caddie.tokenize_section({**cfg["tokenize"], "source": "files", "max_docs": 0, "val_docs": 500,
                                       "files": {"paths": [str(manifest)], "txt_split": "file", "text_field": "text"},
                                       "tokenizer_sample_docs": 2000, "shard_tokens": 10_000_000})
        extra = {"tokens": tokenize.run(tok, scratch / "out")["tokens"]}
    return {"seconds": time.perf_counter() - start, **extra}


def train_loader(manifest: Path, scratch: Path, cfg: dict) -> dict:
    """The curriculum-on training data path: the trainer's set-up and 32 micro-batches (a tiny model, so the
    data path is what is measured), then the plain stream's micro-batches for comparison."""
    from stages import curriculum, train
    buckets, summary = scratch / "buckets.npz", scratch / "c.json"
    curriculum.run({"buckets": 16, "seq_len": SEQ_LEN}, manifest, buckets, summary)
    t = dict(cfg["train"], seq_len=SEQ_LEN, batch_tokens=8 * 64 * SEQ_LEN, micro_batches=8, device="cpu",
             compile=False, model=dict(cfg["train"]["model"], num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1))
    timings = {}
    for name, on, world in (("curriculum", True, 1), ("curriculum_8_ranks", True, 8), ("plain", False, 1)):
        trainer = train.Trainer(t, {"enabled": on, "buckets": 16, "floor": 0.02}, manifest, buckets, summary, 1337)
        trainer.batches.world = world  # rank 0 of `world` (what each rank draws: its own share, or all then a slice)
        trainer.batches.next(trainer.local_tokens, 0.0)
        t0 = time.perf_counter()
        for i in range(32):
            trainer.batches.next(trainer.local_tokens, i / 32)
        timings[f"ms_per_micro_batch_{name}"] = (time.perf_counter() - t0) / 32 * 1000
    return timings


def child_main(stage: str, manifest: str, result: str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        Path(result).write_text(json.dumps(measure(stage, Path(manifest), Path(scratch))))


# ---- the driver ---------------------------------------------------------------------------------------

def rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def run_child(code_root: Path, stage: str, manifest: Path, timeout: float) -> dict:
    """One stage in a fresh interpreter from `code_root`, its peak RssAnon sampled every 5 ms."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        env = dict(os.environ, PYTHONPATH=str(code_root), OMP_NUM_THREADS="2")
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", stage, str(manifest),
                                 result.name], cwd=code_root, env=env, stderr=subprocess.PIPE, text=True)
        peak = [0]

        def sample():
            while proc.poll() is None:
                peak[0] = max(peak[0], rss_anon_kb(proc.pid))
                time.sleep(0.005)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return {"error": f"over {timeout:.0f} s", "peak_rss_anon_mb": peak[0] / 1024}
        sampler.join()
        if proc.returncode:
            return {"error": (err.strip().splitlines() or ["exit %d" % proc.returncode])[-1][:120],
                    "peak_rss_anon_mb": peak[0] / 1024}
        return {**json.loads(Path(result.name).read_text()), "peak_rss_anon_mb": peak[0] / 1024}


def worktree(rev: str, work: Path) -> Path:
    path = work / f"code-{rev}"
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def cell(r: dict | None, key: str, spec: str) -> str:
    if r is None:
        return "not run"
    if "error" in r:
        return f"failed: {r['error']}"
    return format(r[key], spec)


def table(results: dict, versions: list[str]) -> list[str]:
    head = ["stage", "train tokens", "val tokens"] + [f"{v} {m}" for v in versions for m in ("s", "peak RssAnon MB")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (stage, train, val), by_version in results.items():
        cells = [stage, train, val]
        for v in versions:
            r = by_version.get(v)
            cells += [cell(r, "seconds", ".2f"), cell(r, "peak_rss_anon_mb", ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="10M,100M,1B", help="train sizes (of %s)" % ", ".join(SIZES))
    ap.add_argument("--val", default="1M,10M", help="val sizes for the leak check (of %s)" % ", ".join(VAL_SIZES))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--corpus", default="20,200", help="corpus sizes (MB of jsonl) for streaming tokenize; '' = none")
    ap.add_argument("--before", help="a git revision to measure beside the current code")
    ap.add_argument("--before-max", default="100M", help="the largest train size to run the older code at")
    ap.add_argument("--work", default="/tmp/caddie-scale", type=Path)
    ap.add_argument("--timeout", default=1800, type=float)
    ap.add_argument("--out", default=ROOT / "bench/results/scale.md", type=Path)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(*args.child)
    versions = {"now": ROOT}
    if args.before:
        versions[f"at {args.before}"] = worktree(args.before, args.work)
    results = {}
    for train in args.sizes.split(","):
        for val in (args.val.split(",") if train == args.sizes.split(",")[0] else [args.val.split(",")[0]]):
            manifest = synthetic_dataset(args.work, train, val)
            for stage in args.stages.split(","):
                if stage != "leak_check" and val != args.val.split(",")[0]:
                    continue
                row = results.setdefault((stage, train, val), {})
                for name, code in versions.items():
                    if name != "now" and SIZES[train] > SIZES[args.before_max]:
                        continue
                    row[name] = run_child(code, stage, manifest, args.timeout)
                    print(stage, train, val, name, row[name], file=sys.stderr, flush=True)
    corpus = {}
    for mb in filter(None, args.corpus.split(",")):
        path = synthetic_corpus(args.work, int(mb))
        for name, code in versions.items():
            corpus.setdefault(mb, {})[name] = run_child(code, "tokenize", path, args.timeout)
            print("tokenize", mb, name, corpus[mb][name], file=sys.stderr, flush=True)
    lines = [f"# Scale: stage x data size ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores)", "",
             "Synthetic challenge-format shards (Zipf ids, vocab 8,192, BOS-started documents of mean 1,000 tokens, "
             f"{SHARD_TOKENS:,}-token train shards); seq_len {SEQ_LEN}; each cell one fresh process.", "",
             "    " + " ".join(["python", "bench/scale.py", *(argv if argv is not None else sys.argv[1:])]), "",
             *table(results, list(versions)), ""]
    loader = {k: v for k, v in results.items() if k[0] == "train_loader"}
    if loader:
        lines += ["Micro-batch draw, inside the timed training step (one rank's micro-batch: 64 sequences of 2,049 "
                  "tokens; at 8 ranks, what rank 0 does), ms:", "",
                  "| train tokens | " + " | ".join(f"{v} curriculum | {v} curriculum, 8 ranks | {v} plain stream"
                                                   for v in versions) + " |",
                  "|---|" + "---|---|---|" * len(versions)]
        for (_, train, _), by_version in loader.items():
            cells = []
            for v in versions:
                r = by_version.get(v)
                cells += [cell(r, f"ms_per_micro_batch_{k}", ".2f") for k in ("curriculum", "curriculum_8_ranks", "plain")]
            lines.append(f"| {train} | " + " | ".join(cells) + " |")
        lines.append("")
    if corpus:
        lines += ["Streaming tokenize (`source: files`, one jsonl corpus of Zipf-drawn words, 2,000-document tokenizer "
                  "sample, 2 encoding workers; the main process's peak RssAnon):", "",
                  "| corpus MB | " + " | ".join(f"{v} s | {v} peak RssAnon MB" for v in versions) + " |",
                  "|---|" + "---|---|" * len(versions)]
        for mb, by_version in corpus.items():
            cells = []
            for v in versions:
                cells += [cell(by_version.get(v), "seconds", ".1f"), cell(by_version.get(v), "peak_rss_anon_mb", ",.0f")]
            lines.append(f"| {mb} | " + " | ".join(cells) + " |")
        lines.append("")
    if args.before:
        lines += [f"The older commit is not run above {args.before_max} train tokens: its curriculum holds 32 bytes per "
                  "train token (32 GB at 1B), past this machine's memory.", ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
