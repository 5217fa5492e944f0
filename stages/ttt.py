"""ttt: score-first test-time training, the eval's mode `ttt`, by one of two methods (`ttt.method`).

- `sgd` (PR #549/#1493): scores like `sliding`, chunk by chunk, and after each chunk trains a copy of the
  whole model (SGD) on the chunk, which every rank has scored by then. A step's sequences are cut into
  scoring.PIECES fixed pieces that the ranks share; their gradients are summed in float64 over pieces and
  ranks, so every rank takes the same step, the step of one process.
- `lora` (the records' per-document LoRA TTT, "reset per document"): the stream is split into documents at
  BOS, each fed on its own (attention never crosses documents); a document is scored chunk by chunk, each
  chunk with the last seq_len tokens of the document as context, and after each chunk a fresh per-document
  LoRA takes AdamW steps on the chunk's targets. `batch_docs` consecutive documents run in lockstep, each with
  its own LoRA and optimizer state; the ranks share the batches. The OGD bias, if on, learns after each round
  of scoring.PIECES batches, from all of the round's targets.
"""
import copy
import math

import numpy as np
import torch
from torch import nn

from stages.model import BOS_ID, GPT
from stages.scoring import (PIECES, Batch, OnlineBias, Progress, Ranks, Scores, chunk_bounds, cut_batches,
                            on_device, piece_bounds, score_chunks, window_chunks, window_losses)


def trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of the model to train at test time: fp32 where it holds a half precision; a float64 model stays
    float64 (the parity benches run both sides in it, where rounding cannot hide a difference)."""
    model = copy.deepcopy(model)
    return model if all(p.dtype == torch.float64 for p in model.parameters()) else model.float()


def sgd_losses(model, stream, windows: np.ndarray, cfg: dict, ranks: Ranks, bias: OnlineBias | None,
               tilt=None) -> Scores:
    """The sliding windows scored chunk by chunk (chunks of ttt.chunk_tokens), a copy of the model trained on
    each chunk (cosine-decayed lr) after it is scored; the n-gram `tilt` changes the scores, not the training."""
    ttt = cfg["ttt"]
    chunks = window_chunks(windows, chunk_bounds(windows, ttt["chunk_tokens"]), cfg["batch_seqs"], ranks,
                           stream.device)
    model = trainable_copy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=ttt["lr"], momentum=ttt["momentum"])

    def learn(k, chunk):
        if k < len(chunks) - 1:
            lr = ttt["lr"] * 0.5 * (1 + math.cos(math.pi * k / max(len(chunks) - 1, 1)))
            train_on_scored(model, stream, chunk.first - 1, chunk.last, cfg, lr, optimizer, ranks)

    return score_chunks(model, stream, chunks, cfg["doc_isolation"], ranks, "evaluate ttt", bias, learn, tilt)


def training_windows(lo: int, hi: int, seq_len: int) -> np.ndarray:
    """Windows (start, end, first) of consecutive sequences of seq_len over tokens[lo:hi+1], every target kept."""
    starts = np.arange(lo, max(hi - 1, lo), seq_len)
    return np.stack([starts, np.minimum(starts + seq_len, hi), starts + 1], axis=1)


class SummedGradients:
    """The gradients of a model's parameters summed in float64 over pieces and ranks: a float64 sum of the same
    float32 pieces does not depend on which rank computed which."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        first = self.params[0]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64, device=first.device)
        self.views = self.flat.split([p.numel() for p in self.params])

    def add(self) -> None:
        """Add the parameters' .grad (one piece's) to the sum, and clear it."""
        for p, view in zip(self.params, self.views):
            if p.grad is not None:
                view += p.grad.reshape(-1)
                p.grad = None

    def set_mean(self, count: int, ranks: Ranks) -> None:
        """Set every parameter's .grad to the sum over all ranks divided by `count`, and restart the sum."""
        ranks.sum(self.flat)
        for p, view in zip(self.params, self.views):
            p.grad = (view / count).to(p.dtype).view_as(p)
        self.flat.zero_()


def train_on_scored(model, stream, lo: int, hi: int, cfg: dict, lr: float, optimizer, ranks: Ranks):
    """TTT: `epochs` passes of SGD over tokens[lo:hi+1], all of which have already been scored; one step per
    ttt.batch_seqs sequences, on the mean loss of their targets."""
    ttt = cfg["ttt"]
    windows = training_windows(lo, hi, cfg["seq_len"])
    if not len(windows):
        return
    on_dev = on_device(windows, stream.device)
    targets = windows[:, 1] - windows[:, 0]
    for group in optimizer.param_groups:
        group["lr"] = lr
    grads = SummedGradients(model)
    for _ in range(ttt["epochs"]):
        for start in range(0, len(windows), ttt["batch_seqs"]):
            stop = min(start + ttt["batch_seqs"], len(windows))
            pieces = cut_batches(windows, on_dev, piece_bounds(start, stop))
            optimizer.zero_grad(set_to_none=True)
            for i in ranks.share(len(pieces)):
                _, losses = window_losses(model, stream, pieces[i], cfg["doc_isolation"])
                losses.sum().backward()
                grads.add()
            grads.set_mean(int(targets[start:stop].sum()), ranks)
            if ttt["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), ttt["grad_clip"])
            optimizer.step()


def document_spans(tokens: np.ndarray) -> np.ndarray:
    """(start, end) of each document, one per row: tokens[start:end] runs from its BOS (or the stream's first
    token) through the next document's BOS, which it predicts from its own last token. So every target 1..n-1
    belongs to exactly one document."""
    starts = np.union1d([0], np.flatnonzero(tokens == BOS_ID))
    ends = np.append(starts[1:] + 1, len(tokens))
    keep = ends - starts >= 2
    return np.stack([starts[keep], ends[keep]], axis=1).astype(np.int64)


def document_windows(spans: np.ndarray, seq_len: int, chunk_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Windows (start, end, first), as scoring_windows', of every document: one per chunk of chunk_tokens
    targets (one number, or one per document), each with the last seq_len tokens of its document before its
    last target; and the bounds of each document's windows (document d's are windows[bounds[d]:bounds[d+1]])."""
    starts, ends = spans[:, 0], spans[:, 1]
    chunk = np.broadcast_to(np.asarray(chunk_tokens, dtype=np.int64), len(spans))
    bounds = np.r_[0, np.cumsum(-(-(ends - starts - 1) // chunk))]
    doc = np.repeat(np.arange(len(spans)), np.diff(bounds))
    first = starts[doc] + 1 + (np.arange(bounds[-1]) - bounds[doc]) * chunk[doc]
    last = np.minimum(first + chunk[doc], ends[doc]) - 1
    return np.stack([np.maximum(starts[doc], last - seq_len), last, first], axis=1).astype(np.int64), bounds


def chunk_windows(start: int, end: int, seq_len: int, chunk_tokens: int) -> np.ndarray:
    """The windows of the one document tokens[start:end]."""
    return document_windows(np.array([[start, end]]), seq_len, chunk_tokens)[0]


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


def sum_of_document_means(losses: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each window's (document's) mean loss, summed over the batch. Document b's adapter gets exactly the
    gradient of its own mean loss (the other terms do not depend on it), and AdamW is elementwise with one
    step count that all documents of a batch share (they start together), so the batched optimizer moves each
    adapter exactly as an optimizer of its own would. A batch mean would scale each gradient by 1/k."""
    _, end, first = batch.windows.unbind(1)
    per_window = end - first + 1
    return (losses / per_window.repeat_interleave(per_window, output_size=batch.scored)).sum()


def lockstep_batches(windows: np.ndarray, bounds: np.ndarray, docs: range, device) -> list[Batch]:
    """The documents `docs` in lockstep: batch c holds the c-th window of each document that has one. The
    documents are sorted longest first, so those still running are a prefix (DocumentLoRA's first rows)."""
    counts = np.diff(bounds)[docs.start:docs.stop]
    order = np.argsort(-counts, kind="stable")
    counts, starts = counts[order], bounds[docs.start:docs.stop][order]
    column = np.arange(counts[0])
    inside = column < counts[:, None]
    grid = windows[np.where(inside, starts[:, None] + column, 0)]  # [document, chunk, (start, end, first)]
    widths = np.where(inside, grid[..., 1] - grid[..., 0], 0).max(axis=0)
    scored = np.where(inside, grid[..., 1] - grid[..., 2] + 1, 0).sum(axis=0)
    running = inside.sum(axis=0)
    on_dev = on_device(grid, device)
    return [Batch(on_dev[:running[c], c], int(widths[c]), int(scored[c])) for c in column]


def lora_document_batch(model, stream, batches: list[Batch], adapters: DocumentLoRA, lora: dict,
                        bias: OnlineBias | None, scores: Scores) -> None:
    """Score a batch of documents chunk by chunk in lockstep; after each chunk is scored, each document's own
    fresh adapter takes `steps` AdamW steps on that chunk's targets."""
    params = adapters.reset(len(batches[0].windows))
    optimizer = torch.optim.AdamW(params, lr=lora["lr"], weight_decay=lora["weight_decay"])
    for c, batch in enumerate(batches):
        # Finished documents drop out; AdamW may still move their adapters (momentum), which no one reads.
        trains = lora["steps"] > 0 and c < len(batches) - 1
        with torch.set_grad_enabled(trains):
            positions, losses = window_losses(model, stream, batch, logit_bias=bias)
        scores.add(positions, losses)
        for step in range(lora["steps"] if trains else 0):
            if step > 0:
                _, losses = window_losses(model, stream, batch, logit_bias=None if bias is None else bias.shift)
            optimizer.zero_grad(set_to_none=True)
            sum_of_document_means(losses, batch).backward(inputs=params)
            optimizer.step()


def lora_losses(model, tokens: np.ndarray, cfg: dict, device, ranks: Ranks, bias: OnlineBias | None) -> Scores:
    """Per-document LoRA TTT of every target 1..n-1. The ranks share the batches of `batch_docs` consecutive
    documents; the OGD bias learns from a round of PIECES batches only after all of it is scored, so a target's
    score never depends on a later document."""
    lora = cfg["ttt"]["lora"]
    if lora["chunk_tokens"] > cfg["seq_len"]:
        raise ValueError(f"evaluate.ttt.lora.chunk_tokens: {lora['chunk_tokens']} exceeds seq_len "
                         f"{cfg['seq_len']}; a chunk's first targets would have no window")
    stream = on_device(tokens.astype(np.int64), device)
    spans = document_spans(tokens)
    windows, bounds = document_windows(spans, cfg["seq_len"], lora["chunk_tokens"])
    targets = spans[:, 1] - spans[:, 0] - 1
    size = lora["batch_docs"]
    doc_batches = [range(d, min(d + size, len(spans))) for d in range(0, len(spans), size)]
    rounds = [doc_batches[r:r + PIECES] for r in range(0, len(doc_batches), PIECES)]
    scores, adapters = Scores(), DocumentLoRA(model, lora["targets"], lora["rank"], device)
    progress = Progress("evaluate ttt (lora, rounds of document batches)", len(rounds), ranks)
    try:
        for done, batches in enumerate(rounds, 1):
            for i in ranks.share(len(batches)):
                lora_document_batch(model, stream, lockstep_batches(windows, bounds, batches[i], device), adapters,
                                    lora, bias, scores)
            if bias is not None:
                bias.step(int(targets[batches[0].start:batches[-1].stop].sum()), ranks)
            progress.update(done)
    finally:
        adapters.remove()
    return scores
