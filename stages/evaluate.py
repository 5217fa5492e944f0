"""evaluate: val_bpb of a checkpoint (point prequant) or an artifact (points quant and rescue).

Modes: `standard` scores non-overlapping windows of seq_len; `sliding` moves the window by `stride`
and scores only the tokens not scored before, so every token after the first gets at least
seq_len - stride tokens of context; `ttt` is score-first test-time training, by one of two methods
(`ttt.method`):
- `sgd` (PR #549/#1493): scores like `sliding`, chunk by chunk, and after each chunk trains a copy of
  the whole model (SGD) on the tokens already scored;
- `lora` (the records' per-document LoRA TTT, "reset per document"): the stream is split into
  documents at BOS, each fed on its own (attention never crosses documents); a document is scored
  chunk by chunk, each chunk with the last seq_len tokens of the document as context, and after each
  chunk a fresh per-document LoRA takes AdamW steps on the chunk's targets. `batch_docs` consecutive
  documents run in lockstep, each with its own LoRA and optimizer state.
Every mode scores every val target exactly once, the tail included, and never uses a token before its
score is counted. An online vocabulary bias (Stride-OGD, PR #316), updated after each scored chunk (with
`lora`: after each batch of documents), is an option of every mode.
The model file must match the sha256 recorded by the stage that wrote it (`--model-summary`), the tokenizer
and val shards those in the manifest; a non-finite loss is an error naming the model.
"""
import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

from stages import bpb, pack
from stages.io import read_json, verify_recorded, verify_sha256, write_json
from stages.model import BOS_ID, GPT, cast_to_training_dtypes, load_checkpoint
from stages.shards import load_tokens, manifest_shards


PROGRESS_BATCHES = 64  # batches of windows between two progress checks in the modes that do not adapt
PROGRESS_SECONDS = 10.0


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


def window_batch(stream: torch.Tensor, batch):
    """Inputs, targets, and the mask of scored targets for a batch of windows (padded to the widest)."""
    width = max(end - start for start, end, _ in batch)
    x = torch.zeros(len(batch), width, dtype=torch.long)
    y = torch.zeros(len(batch), width, dtype=torch.long)
    scored = torch.zeros(len(batch), width, dtype=torch.bool)
    for row, (start, end, first) in enumerate(batch):
        n = end - start
        x[row, :n] = stream[start:end]
        y[row, :n] = stream[start + 1:end + 1]
        scored[row, first - start - 1:n] = True
    return x, y, scored


def window_losses(model, stream, batch, device, doc_isolation=False, bias=None):
    """Losses (nats, differentiable) of the scored targets of a batch of windows, in window order, their
    stream positions, and the summed gradient of those losses w.r.t. `bias` (None without a bias)."""
    x, y, scored = window_batch(stream, batch)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_logits(x.to(device), doc_isolation=doc_isolation).float()
    logits, targets = logits[scored.to(device)], y[scored].to(device)
    bias_grad = None
    if bias is not None:
        logits = logits + bias
        with torch.no_grad():
            bias_grad = torch.softmax(logits, -1).sum(0) - torch.bincount(targets, minlength=logits.size(-1))
    offsets = torch.tensor([start + 1 for start, _, _ in batch])[:, None] + torch.arange(x.size(1))
    return offsets[scored], F.cross_entropy(logits, targets, reduction="none"), bias_grad


@torch.no_grad()
def score_windows(model, stream, windows, batch_seqs, device, doc_isolation=False, bias=None):
    """(target positions, their losses in nats, and the mean gradient of the loss w.r.t. `bias`)."""
    positions, losses, grad, count = [], [], None, 0
    for i in range(0, len(windows), batch_seqs):
        pos, loss, g = window_losses(model, stream, windows[i:i + batch_seqs], device, doc_isolation, bias)
        if g is not None:
            grad = g if grad is None else grad + g
        losses.append(loss.double().cpu())
        positions.append(pos)
        count += len(pos)
    return torch.cat(positions), torch.cat(losses), None if grad is None else grad / max(count, 1)


def chunks_of(windows, chunk_tokens: int):
    """Consecutive groups of windows whose first scored target falls in the same chunk of the stream."""
    groups = {}
    for w in windows:
        groups.setdefault((w[2] - 1) // chunk_tokens, []).append(w)
    return [groups[k] for k in sorted(groups)]


def train_on_scored(model, stream, lo: int, hi: int, cfg: dict, lr: float, device, optimizer):
    """TTT: `epochs` passes of SGD over tokens[lo:hi+1], all of which have already been scored."""
    seq = cfg["seq_len"]
    starts = list(range(lo, max(hi - 1, lo), seq))
    if not starts:
        return
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(cfg["ttt"]["epochs"]):
        for i in range(0, len(starts), cfg["ttt"]["batch_seqs"]):
            batch = [(s, min(s + seq, hi), s + 1) for s in starts[i:i + cfg["ttt"]["batch_seqs"]]]
            x, y, mask = window_batch(stream, batch)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model.forward_logits(x.to(device), doc_isolation=cfg["doc_isolation"]).float()
            loss = F.cross_entropy(logits[mask.to(device)], y[mask].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["ttt"]["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["ttt"]["grad_clip"])
            optimizer.step()


def document_spans(tokens: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each document: tokens[start:end] runs from its BOS (or the stream's first token)
    through the next document's BOS, which it predicts from its own last token. So every target 1..n-1
    belongs to exactly one document."""
    starts = np.union1d([0], np.flatnonzero(tokens == BOS_ID))
    ends = np.append(starts[1:] + 1, len(tokens))
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e - s >= 2]


def chunk_windows(start: int, end: int, seq_len: int, chunk_tokens: int):
    """Windows (start, end, first), as scoring_windows', of the document tokens[start:end]: one per chunk of
    chunk_tokens targets, each with the last seq_len tokens of the document before its last target."""
    windows = []
    for first in range(start + 1, end, chunk_tokens):
        last = min(first + chunk_tokens, end) - 1
        windows.append((max(start, last - seq_len), last, first))
    return windows


class DocumentLoRA:
    """Rank-r adapters, one per document of a batch, on the target linears (module names containing one of
    `targets`, as rescue.lcq.targets): forward hooks add x[b] @ A[b] @ B[b] to the output of document b.
    A batch of k rows runs the first k documents' adapters. Every document starts from the same A (fixed
    seed, uniform ±1/sqrt(in)) and B = 0, so its first chunk is scored by the unchanged model."""

    def __init__(self, model: GPT, targets: list, rank: int, device):
        self.modules = [m for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and any(t in name for t in targets)]
        if not self.modules:
            raise ValueError(f"evaluate.ttt.lora.targets {targets} match no linear layer of the model")
        gen = torch.Generator().manual_seed(0)
        self.a0 = [torch.empty(m.in_features, rank).uniform_(-1, 1, generator=gen).div_(math.sqrt(m.in_features))
                   .to(device) for m in self.modules]
        self.a, self.b = [], []
        self.handles = [m.register_forward_hook(self.add_delta(i)) for i, m in enumerate(self.modules)]

    def reset(self, docs: int) -> list:
        """Fresh adapters for a new batch of `docs` documents; returns them (the parameters to train)."""
        self.a = [a0.expand(docs, -1, -1).clone().requires_grad_() for a0 in self.a0]
        self.b = [torch.zeros(docs, a0.size(1), m.out_features, device=a0.device, requires_grad=True)
                  for a0, m in zip(self.a0, self.modules)]
        return self.a + self.b

    def add_delta(self, i: int):
        def hook(module, inputs, out):
            x = inputs[0]
            a, b = self.a[i][:x.size(0)].to(x.dtype), self.b[i][:x.size(0)].to(x.dtype)
            return out + torch.bmm(torch.bmm(x, a), b)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def sum_of_document_means(losses: torch.Tensor, batch) -> torch.Tensor:
    """Each window's (document's) mean loss, summed over the batch. Document b's adapter gets exactly the
    gradient of its own mean loss (the other terms do not depend on it), and AdamW is elementwise with one
    step count that all documents of a batch share (they start together), so the batched optimizer moves each
    adapter exactly as an optimizer of its own would. A batch mean would scale each gradient by 1/k."""
    counts = torch.tensor([end - first + 1 for _, end, first in batch], device=losses.device)
    return (losses / counts.repeat_interleave(counts)).sum()


def lora_ttt_batch(model, stream, documents, adapters: DocumentLoRA, lora: dict, device, bias):
    """Score a batch of documents (lists of chunk windows) chunk by chunk in lockstep; after each chunk is
    scored, each document's own fresh adapter takes `steps` AdamW steps on that chunk's targets.
    Returns the scored positions, their losses and the mean gradient of the loss w.r.t. `bias`."""
    documents = sorted(documents, key=len, reverse=True)  # the documents still running are then a prefix
    params = adapters.reset(len(documents))
    optimizer = torch.optim.AdamW(params, lr=lora["lr"], weight_decay=lora["weight_decay"])
    positions, losses, grad = [], [], None
    for c in range(len(documents[0])):
        # Finished documents drop out; AdamW may still move their adapters (momentum), which no one reads.
        batch = [windows[c] for windows in documents if len(windows) > c]
        trains = lora["steps"] > 0 and c < len(documents[0]) - 1
        with torch.set_grad_enabled(trains):
            pos, loss, g = window_losses(model, stream, batch, device, bias=bias)
        positions.append(pos)
        losses.append(loss.detach().double().cpu())
        if g is not None:
            grad = g if grad is None else grad + g
        for step in range(lora["steps"] if trains else 0):
            if step > 0:
                _, loss, _ = window_losses(model, stream, batch, device, bias=bias)
            optimizer.zero_grad(set_to_none=True)
            sum_of_document_means(loss, batch).backward(inputs=params)
            optimizer.step()
    positions = torch.cat(positions)
    return positions, torch.cat(losses), None if grad is None else grad / max(len(positions), 1)


def record_losses(losses: np.ndarray, positions: torch.Tensor, scored: torch.Tensor) -> None:
    """Store a chunk's losses at their target positions. NaN in `losses` marks a target not scored yet, so a
    target is scored once, and a non-finite loss is an error here (it would read as never scored)."""
    positions, scored = positions.numpy(), scored.numpy()
    if np.isfinite(losses[positions]).any():
        raise AssertionError("a target was scored twice")
    if not np.isfinite(scored).all():
        first = int(np.argmax(~np.isfinite(scored)))
        raise FloatingPointError(f"the model's loss of val target {positions[first]} is {scored[first]}: it "
                                 "produces non-finite outputs")
    losses[positions] = scored


class Progress:
    """Prints `label: done/total chunks, elapsed, eta` to the stage log, at most every PROGRESS_SECONDS."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.every = label, total, PROGRESS_SECONDS
        self.start = self.last = time.time()

    def update(self, done: int):
        now = time.time()
        if now - self.last < self.every and done < self.total:
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        print(f"{self.label}: {done}/{self.total} chunks, {elapsed:.0f} s elapsed, eta {eta:.0f} s", flush=True)


def lora_ttt_losses(model, tokens: np.ndarray, cfg: dict, device) -> np.ndarray:
    """Loss (nats) of every target 1..n-1 under per-document LoRA TTT; `batch_docs` consecutive documents
    run together, and the OGD bias learns from a batch only after all of it is scored, so a target's
    score never depends on a later document."""
    lora, ogd = cfg["ttt"]["lora"], cfg["ogd"]
    if lora["chunk_tokens"] > cfg["seq_len"]:
        raise ValueError(f"evaluate.ttt.lora.chunk_tokens: {lora['chunk_tokens']} exceeds seq_len "
                         f"{cfg['seq_len']}; a chunk's first targets would have no window")
    stream = torch.from_numpy(tokens.astype(np.int64))
    documents = [chunk_windows(s, e, cfg["seq_len"], lora["chunk_tokens"]) for s, e in document_spans(tokens)]
    bias = torch.zeros(model.config.vocab_size, device=device) if ogd["enabled"] else None
    losses = np.full(len(tokens), np.nan)
    adapters = DocumentLoRA(model, lora["targets"], lora["rank"], device)
    batches = range(0, len(documents), lora["batch_docs"])
    progress = Progress("evaluate ttt (lora, document batches)", len(batches))
    try:
        for done, i in enumerate(batches, 1):
            positions, batch_losses, grad = lora_ttt_batch(model, stream, documents[i:i + lora["batch_docs"]],
                                                           adapters, lora, device, bias)
            record_losses(losses, positions, batch_losses)
            if bias is not None:
                bias -= ogd["lr"] * grad
            progress.update(done)
    finally:
        adapters.remove()
    return losses


def token_losses(model, tokens: np.ndarray, mode: str, cfg: dict, device) -> np.ndarray:
    """Loss (nats) of every target 1..n-1, scored chunk by chunk; after a chunk is scored, the OGD bias
    and (mode ttt) a copy of the model learn from it, and only then is the next chunk scored."""
    if mode == "ttt" and cfg["ttt"]["method"] == "lora":
        return lora_ttt_losses(model, tokens, cfg, device)
    stream = torch.from_numpy(tokens.astype(np.int64))
    stride = cfg["seq_len"] if mode == "standard" else cfg["stride"]
    windows = scoring_windows(len(tokens), cfg["seq_len"], stride)
    ogd, ttt = cfg["ogd"], cfg.get("ttt")  # the plan passes ttt settings only where they are used
    adapts = mode == "ttt" or ogd["enabled"]
    if adapts:
        groups = chunks_of(windows, ttt["chunk_tokens"])
    else:  # independent windows: groups of whole batches only pace the progress lines
        size = cfg["batch_seqs"] * PROGRESS_BATCHES
        groups = [windows[i:i + size] for i in range(0, len(windows), size)]
    progress = Progress(f"evaluate {mode}", len(groups))
    if mode == "ttt":
        model = copy.deepcopy(model).float().train()
        optimizer = torch.optim.SGD(model.parameters(), lr=ttt["lr"], momentum=ttt["momentum"])
    bias = torch.zeros(model.config.vocab_size, device=device) if ogd["enabled"] else None
    losses = np.full(len(tokens), np.nan)
    for k, group in enumerate(groups):
        positions, chunk_losses, grad = score_windows(model, stream, group, cfg["batch_seqs"], device,
                                                      cfg["doc_isolation"], bias)
        record_losses(losses, positions, chunk_losses)
        if bias is not None:
            bias -= ogd["lr"] * grad
        if mode == "ttt" and k < len(groups) - 1:
            lr = ttt["lr"] * 0.5 * (1 + math.cos(math.pi * k / max(len(groups) - 1, 1)))
            train_on_scored(model, stream, max(group[0][2] - 1, 0), int(positions.max()), cfg, lr, device, optimizer)
        progress.update(k + 1)
    return losses


def score(model, tokens: np.ndarray, tables: bpb.ByteTables, cfg: dict, mode: str, device) -> dict:
    """Sum of target cross-entropies (nats, float64), scored token count and byte count."""
    losses = token_losses(model, tokens, mode, cfg, device)[1:]
    if np.isnan(losses).any():
        raise AssertionError(f"{int(np.isnan(losses).sum())} targets were never scored")
    return {"loss_sum": float(losses.sum()), "tokens": len(losses), "bytes": bpb.stream_bytes(tables, tokens)}


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


def run(cfg: dict, mode: str, model_path: Path, model_summary: Path, manifest_path: Path, out: Path) -> dict:
    start = time.time()
    device = pick_device(cfg["device"])
    model_sha256 = verified_model_sha256(model_path, model_summary, cfg["point"])
    manifest = read_json(manifest_path)
    tokenizer = manifest_path.parent / manifest["tokenizer"]["file"]
    verify_sha256(tokenizer, manifest["tokenizer"]["sha256"], manifest_path)
    tables = bpb.build_byte_tables(spm.SentencePieceProcessor(model_file=str(tokenizer)), manifest["vocab_size"])
    model = load_model(model_path, cfg["point"], device)
    tokens = load_tokens(manifest_shards(manifest_path, "val"), vocab_size=manifest["vocab_size"])
    warnings = context_warnings(cfg, len(tokens))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    stride = cfg["seq_len"] if mode == "standard" else cfg["stride"]
    try:
        sums = score(model, tokens, tables, cfg, mode, device)
    except FloatingPointError as e:
        raise FloatingPointError(f"{model_path} ({mode} eval): {e}") from None
    result = {
        "point": cfg["point"], "mode": mode, "tokens": sums["tokens"], "bytes": sums["bytes"],
        "raw_bytes": manifest.get("val_raw_bytes"), "loss_nats": sums["loss_sum"] / sums["tokens"],
        "val_bpb": bpb.bits_per_byte(sums["loss_sum"], sums["bytes"]),
        "tokens_per_byte": sums["tokens"] / sums["bytes"], "seq_len": cfg["seq_len"], "stride": stride,
        "model": str(model_path), "model_sha256": model_sha256, "device": str(device),
        "config": cfg, "warnings": warnings, "seconds": round(time.time() - start, 3),
    }
    if not math.isfinite(result["val_bpb"]):
        raise FloatingPointError(f"{model_path}: val_bpb is {result['val_bpb']}")
    write_json(out, result)
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
    r = run(json.loads(args.config), args.mode, args.model, args.model_summary, args.manifest, args.out)
    print(json.dumps({k: r[k] for k in ("point", "mode", "tokens", "loss_nats", "val_bpb", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
