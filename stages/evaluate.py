"""evaluate: val_bpb of a checkpoint (point prequant) or an artifact (points quant and rescue), in one process
or in `evaluate.nproc` under torchrun, which give the same result.

Modes: `standard` scores non-overlapping windows of seq_len; `sliding` moves the window by `stride` and scores
only the tokens not scored before, so every token after the first gets at least seq_len - stride tokens of
context; `ttt` is score-first test-time training (stages/ttt.py), by one of three methods (`ttt.method`): `sgd`
scores like `sliding`, chunk by chunk, and trains a copy of the whole model on each chunk once it is scored;
`lora` scores each document chunk by chunk with a fresh per-document LoRA that learns from each scored chunk;
`phased` is the records' (stages/phased_ttt.py): per-document LoRA at their sites, and global SGD on a scored
prefix of documents in phases. Every mode scores every val target exactly once, the tail included, and never
uses a token before its score is counted. An online vocabulary bias (Stride-OGD, PR #316), updated after each
scored chunk (with `lora`: after each round of document batches), is an option of every mode but `phased`; the
records' token n-gram tilt (stages/ngram_tilt.py, hints precomputed from the targets before each one) of every
mode but `lora`. The result splits its seconds into deserialize, compile_warmup, precompute and scoring, and
`seconds` (what the report holds against evaluate.budget_seconds) is their sum.

The ranks share the batches of windows (of each chunk, where something learns between chunks) or of
documents (`lora`), cut the same way for any number of processes (stages/scoring.py); what learns does so
from every rank's scored targets, summed in float64, and the sums of nats, tokens and bytes are reduced in
float64. Only rank 0 logs progress and writes the result, which records `nproc`.
The model file must match the sha256 recorded by the stage that wrote it (`--model-summary`), the tokenizer
and val shards those in the manifest (checked by rank 0); a non-finite loss is an error naming the model.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from stages import bpb, caseops, pack, phased_ttt, ttt
from stages.io import read_json, verify_recorded, verify_sha256, write_json
from stages.model import GPT, cast_to_training_dtypes, load_checkpoint
from stages.ngram_tilt import NgramTilt, build_tilt
from stages.scoring import (ONE, OnlineBias, Ranks, chunk_bounds, on_device, score_chunks, scoring_windows,
                            start_ranks, window_chunks)
from stages.shards import load_tokens, manifest_shards

PROGRESS_BATCHES = 64  # batches of windows per rank between two progress checks in the modes that do not adapt


def stride_of(mode: str, cfg: dict) -> int:
    return cfg["seq_len"] if mode == "standard" else cfg["stride"]


def plain_chunks(windows: np.ndarray, cfg: dict, learns: bool, ranks: Ranks, device):
    """Chunks of the stream of ttt.chunk_tokens when the OGD bias learns between them; else the windows are
    independent, and chunks of PROGRESS_BATCHES batches per rank only pace the progress lines."""
    if learns:
        bounds = chunk_bounds(windows, cfg["ttt"]["chunk_tokens"])
    else:
        step = cfg["batch_seqs"] * PROGRESS_BATCHES * ranks.world
        bounds = np.r_[np.arange(0, len(windows), step), len(windows)]
    return window_chunks(windows, bounds, cfg["batch_seqs"], ranks, device)


def token_losses(model, tokens: np.ndarray, mode: str, cfg: dict, device, ranks: Ranks = ONE,
                 tilt: NgramTilt | None = None) -> np.ndarray:
    """Loss (nats) of every target 1..n-1 that this rank scored, NaN at the others' (one process: every
    target's), scored chunk by chunk (through the n-gram `tilt`, if given: ngram_tilt.build_tilt); after a chunk
    is scored, the OGD bias and (mode ttt) the model learn from it, and only then is the next chunk scored."""
    ogd, method = cfg["ogd"], cfg["ttt"]["method"] if mode == "ttt" else None
    bias = OnlineBias(model.config.vocab_size, ogd["lr"], device) if ogd["enabled"] else None
    if mode == "ttt" and method == "phased":
        return phased_ttt.phased_losses(model, tokens, cfg, device, ranks, tilt).on_host(len(tokens))
    if mode == "ttt" and method == "lora":
        if tilt is not None:
            raise ValueError("evaluate.ngram_tilt: not available with ttt.method lora (its adapters train on the "
                             "scored losses); ttt.method phased runs per-document LoRA with the tilt")
        return ttt.lora_losses(model, tokens, cfg, device, ranks, bias).on_host(len(tokens))
    windows = scoring_windows(len(tokens), cfg["seq_len"], stride_of(mode, cfg))
    stream = on_device(tokens.astype(np.int64), device)
    if mode == "ttt":
        scores = ttt.sgd_losses(model, stream, windows, cfg, ranks, bias, tilt)
    else:
        chunks = plain_chunks(windows, cfg, bias is not None, ranks, device)
        scores = score_chunks(model, stream, chunks, cfg["doc_isolation"], ranks, f"evaluate {mode}", bias,
                              tilt=tilt)
    return scores.on_host(len(tokens))


def check_scored_once(mine: np.ndarray, num_tokens: int, ranks: Ranks, device) -> None:
    """Every target 1..n-1 is scored by exactly one rank (`mine`: the targets this rank scored)."""
    counts = np.zeros(num_tokens, dtype=np.uint8)
    counts[mine] = 1
    if ranks.world > 1:
        counts = ranks.sum(torch.from_numpy(counts).to(device)).cpu().numpy()
    never, shared = int((counts[1:] == 0).sum()), int((counts[1:] > 1).sum())
    if never or shared:
        raise AssertionError(f"{never} targets were never scored and {shared} were scored by more than one rank")


def score(model, tokens: np.ndarray, tables: bpb.ByteCounter, cfg: dict, mode: str, device,
          ranks: Ranks = ONE, tilt: NgramTilt | None = None) -> dict:
    """Sum of target cross-entropies (nats), scored token count and byte count, over all ranks (in float64)."""
    losses = token_losses(model, tokens, mode, cfg, device, ranks, tilt)
    mine = np.flatnonzero(~np.isnan(losses))
    check_scored_once(mine, len(tokens), ranks, device)
    nbytes = bpb.scored_bytes(tables, tokens, mine)
    sums = torch.tensor([losses[mine].sum(), len(mine), nbytes], dtype=torch.float64, device=device)
    loss_sum, count, nbytes = ranks.sum(sums).tolist()
    return {"loss_sum": loss_sum, "tokens": int(count), "bytes": int(nbytes)}


def is_artifact(point: str) -> bool:
    return point in ("quant", "rescue")


def load_model(path: Path, point: str, device) -> GPT:
    model = pack.load_model(path, device) if is_artifact(point) else load_checkpoint(path).to(device)
    if device.type == "cuda":  # evaluate in the layout the baseline trains and evaluates in
        cast_to_training_dtypes(model)
    return model


def verified_model_sha256(model_path: Path, model_summary: Path, point: str) -> str:
    """The model file's sha256, checked against the summary of the stage that wrote it (train for a checkpoint,
    quantize or rescue for an artifact)."""
    field = "artifact_sha256" if is_artifact(point) else "model_sha256"
    return verify_recorded(model_path, model_summary, field)[field]


def context_warnings(cfg: dict, val_tokens: int) -> list[str]:
    """Settings that run but measure less than they say."""
    if cfg["seq_len"] > val_tokens:
        return [f"evaluate.seq_len = {cfg['seq_len']} exceeds the val split's {val_tokens} tokens: no window is "
                "full, so no target is scored with seq_len tokens of context"]
    return []


def check_nproc(cfg: dict, ranks: Ranks) -> None:
    nproc = cfg.get("nproc", 1)
    if nproc != ranks.world:
        raise ValueError(f"evaluate.nproc: {nproc}, but this eval runs in {ranks.world} process(es); "
                         f"launch it with torchrun --nproc_per_node={nproc}")


def read_val(manifest_path: Path, ranks: Ranks) -> tuple[dict, bpb.ByteCounter, np.ndarray]:
    """The manifest, what counts the bytes of val targets (its byte sidecars where it lists them, else the byte
    tables of its tokenizer) and the val tokens (the files verified by rank 0)."""
    manifest = read_json(manifest_path)
    tokenizer = manifest_path.parent / manifest["tokenizer"]["file"]
    if ranks.main:
        verify_sha256(tokenizer, manifest["tokenizer"]["sha256"], manifest_path)
    tables = bpb.build_byte_tables(spm.SentencePieceProcessor(model_file=str(tokenizer)), manifest["vocab_size"])
    val_paths = manifest_shards(manifest_path, "val", verify=ranks.main)
    tokens = load_tokens(val_paths, vocab_size=manifest["vocab_size"])
    sidecar = caseops.manifest_sidecar_bytes(manifest_path, manifest, val_paths, verify=ranks.main)
    return manifest, tables if sidecar is None else bpb.SidecarBytes(sidecar), tokens


class Stopwatch:
    """Seconds per part of an eval, the parts reviewers weigh against the eval budget: deserialize (the model
    file verified, decompressed, dequantized), compile_warmup (0: caddie's eval compiles nothing), precompute (the
    val tokens and byte tables read, the n-gram hints) and scoring. Their sum is the result's `seconds`."""
    PARTS = ("deserialize", "compile_warmup", "precompute", "scoring")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] += now - self.last
        self.last = now

    def split(self) -> dict:
        return {part: round(s, 3) for part, s in self.seconds.items()}

    def total(self) -> float:
        return round(sum(self.seconds.values()), 3)


def run(cfg: dict, mode: str, model_path: Path, model_summary: Path, manifest_path: Path, out: Path) -> dict:
    watch = Stopwatch()
    ranks, device = start_ranks(cfg["device"])
    check_nproc(cfg, ranks)
    model_sha256 = verified_model_sha256(model_path, model_summary, cfg["point"]) if ranks.main else None
    model = load_model(model_path, cfg["point"], device)
    watch.lap("deserialize")
    manifest, tables, tokens = read_val(manifest_path, ranks)
    tilt = build_tilt(tokens, cfg, device)
    watch.lap("precompute")
    warnings = context_warnings(cfg, len(tokens))
    for warning in warnings if ranks.main else []:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        sums = score(model, tokens, tables, cfg, mode, device, ranks, tilt)
    except FloatingPointError as e:
        raise FloatingPointError(f"{model_path} ({mode} eval): {e}") from None
    watch.lap("scoring")
    result = {
        "point": cfg["point"], "mode": mode, "tokens": sums["tokens"], "bytes": sums["bytes"],
        "raw_bytes": manifest.get("val_raw_bytes"), "loss_nats": sums["loss_sum"] / sums["tokens"],
        "val_bpb": bpb.bits_per_byte(sums["loss_sum"], sums["bytes"]),
        "tokens_per_byte": sums["tokens"] / sums["bytes"], "seq_len": cfg["seq_len"], "stride": stride_of(mode, cfg),
        "model": str(model_path), "model_sha256": model_sha256, "device": str(device), "nproc": ranks.world,
        "config": cfg, "warnings": warnings, "seconds": watch.total(), "seconds_split": watch.split(),
    }
    if not math.isfinite(result["val_bpb"]):
        raise FloatingPointError(f"{model_path}: val_bpb is {result['val_bpb']}")
    if ranks.main:
        write_json(out, result)
        print(json.dumps({k: result[k] for k in ("point", "mode", "tokens", "loss_nats", "val_bpb", "seconds")}))
    ranks.close()
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the evaluate section plus its point, as JSON")
    parser.add_argument("--mode", required=True, choices=["standard", "sliding", "ttt"])
    parser.add_argument("--model", required=True, type=Path, help="model.pt (prequant) or artifact.bin")
    parser.add_argument("--model-summary", required=True, type=Path,
                        help="the summary.json of the stage that wrote the model (train, quantize or rescue)")
    parser.add_argument("--manifest", required=True, type=Path, help="tokenize manifest (val shards, tokenizer)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    run(json.loads(args.config), args.mode, args.model, args.model_summary, args.manifest, args.out)


if __name__ == "__main__":
    sys.exit(main())
