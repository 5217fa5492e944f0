"""evaluate: val_bpb of a checkpoint (point prequant) or an artifact (point quant).

Modes: `standard` scores non-overlapping windows of seq_len; `sliding` moves the window by `stride`
and scores only the tokens not scored before, so every token after the first gets at least
seq_len - stride tokens of context. Both score every val target exactly once, the tail included.
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
import torch.nn.functional as F

from stages import bpb, pack
from stages.io import read_json, sha256_file, write_json
from stages.model import GPT, GPTConfig, cast_to_training_dtypes
from stages.shards import load_tokens, manifest_shards


def scoring_windows(num_tokens: int, seq_len: int, stride: int):
    """Windows (start, end, first): inputs tokens[start:end] predict targets tokens[start+1:end+1],
    of which those at positions >= first are scored. Targets 1..num_tokens-1 are each scored once."""
    if stride > seq_len:
        raise ValueError(f"evaluate.stride: {stride} exceeds seq_len {seq_len}; tokens would be skipped")
    windows, first = [], 1
    while first < num_tokens:
        stop = min(first + (seq_len if first == 1 else stride), num_tokens)
        end = stop - 1
        windows.append((max(0, end - seq_len), end, first))
        first = stop
    return windows


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("evaluate.device: cuda requested but no CUDA device is available")
    return torch.device(name)


@torch.inference_mode()
def score(model, tokens: np.ndarray, tables: bpb.ByteTables, seq_len: int, stride: int,
          batch_seqs: int, device) -> dict:
    """Sum of target cross-entropies (nats, float64), scored token count and byte count."""
    windows = scoring_windows(len(tokens), seq_len, stride)
    stream = torch.from_numpy(tokens.astype(np.int64))
    loss_sum, count, byte_count = 0.0, 0, 0
    for i in range(0, len(windows), batch_seqs):
        batch = windows[i:i + batch_seqs]
        width = max(end - start for start, end, _ in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (start, end, first) in enumerate(batch):
            n = end - start
            x[row, :n] = stream[start:end]
            y[row, :n] = stream[start + 1:end + 1]
            scored[row, first - start - 1:n] = True
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model.forward_logits(x.to(device))
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="none")
        mask = scored.flatten().to(device)
        loss_sum += losses[mask].double().sum().item()
        count += int(mask.sum())
        prev, target = x.flatten()[scored.flatten()].numpy(), y.flatten()[scored.flatten()].numpy()
        byte_count += int(bpb.target_bytes(tables, prev, target).sum())
    return {"loss_sum": loss_sum, "tokens": count, "bytes": byte_count}


def load_model(path: Path, point: str, device) -> GPT:
    if point == "quant":
        model = pack.load_model(path, device)
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["state_dict"])
        model = model.to(device).eval()
    if device.type == "cuda":  # evaluate in the layout the baseline trains and evaluates in
        cast_to_training_dtypes(model)
    return model


def run(cfg: dict, mode: str, model_path: Path, manifest_path: Path, out: Path) -> dict:
    start = time.time()
    device = pick_device(cfg["device"])
    manifest = read_json(manifest_path)
    sp = spm.SentencePieceProcessor(model_file=str(manifest_path.parent / manifest["tokenizer"]["file"]))
    tables = bpb.build_byte_tables(sp, manifest["vocab_size"])
    model = load_model(model_path, cfg["point"], device)
    tokens = load_tokens(manifest_shards(manifest_path, "val"), vocab_size=manifest["vocab_size"])
    stride = cfg["seq_len"] if mode == "standard" else cfg["stride"]
    sums = score(model, tokens, tables, cfg["seq_len"], stride, cfg["batch_seqs"], device)
    if sums["tokens"] != len(tokens) - 1:
        raise AssertionError(f"scored {sums['tokens']} targets of {len(tokens) - 1}")
    result = {
        "point": cfg["point"], "mode": mode, "tokens": sums["tokens"], "bytes": sums["bytes"],
        "raw_bytes": manifest.get("val_raw_bytes"), "loss_nats": sums["loss_sum"] / sums["tokens"],
        "val_bpb": bpb.bits_per_byte(sums["loss_sum"], sums["bytes"]),
        "tokens_per_byte": sums["tokens"] / sums["bytes"], "seq_len": cfg["seq_len"], "stride": stride,
        "model": str(model_path), "model_sha256": sha256_file(model_path), "device": str(device),
        "config": cfg, "seconds": round(time.time() - start, 3),
    }
    if not math.isfinite(result["val_bpb"]):
        raise FloatingPointError(f"{model_path}: val_bpb is {result['val_bpb']}")
    write_json(out, result)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the evaluate section plus its point, as JSON")
    parser.add_argument("--mode", required=True, choices=["standard", "sliding"])
    parser.add_argument("--model", required=True, type=Path, help="model.pt (prequant) or artifact.bin (quant)")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    r = run(json.loads(args.config), args.mode, args.model, args.manifest, args.out)
    print(json.dumps({k: r[k] for k in ("point", "mode", "tokens", "loss_nats", "val_bpb", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
