"""phased_ttt: the records' phased score-first TTT (#1855, #2135), the eval's `ttt.method: phased`.

Documents (split at BOS, as stages.ttt.document_spans) are scored in stream order, in batches of
`ttt.lora.batch_docs`, each document by its own fresh LoRA at the records' sites, chunk by chunk: a chunk is scored
with the last seq_len tokens of its document as context, and only then do the adapters take `ttt.lora.steps`
Adam(W) steps on it (betas, eps and the alpha / rank output scale of `ttt.phased`). The first
`ttt.phased.prefix_docs` documents are cut into `phases` equal parts; when every document of part k has been scored,
a copy of the base model trains on all documents of parts 1..k (global SGD, the records' schedule: chunks of
`ttt.chunk_tokens`, the last one skipped, cosine-decayed `ttt.lr`, `ttt.epochs`, steps of `ttt.batch_seqs` full
sequences packed with attention inside documents), and the documents after are scored by the changed model.
So every target is scored before anything learns from it; the model passed in is never changed.

Short documents (#2014): `ttt.phased.short_docs` [[max_len, chunk], ...] scores a document of at most max_len
tokens in chunks of `chunk` (the first limit that fits), others in chunks of `ttt.lora.chunk_tokens`. The records
pick it per batch of length-sorted documents; here each document by its own length (where its next BOS is).

Ranks: each part's batches are shared in rounds of scoring.PIECES; a global step's sequences are cut into PIECES
packed rows (on 8 GPUs: one per rank, as the records' ranks split them), their gradients summed in float64 and
divided by the step's target count, so every number of processes takes the same step.

Differences from the records' code, each for determinism across ranks: batches are consecutive documents in
stream order (the records sort by length and hand batches out first come, first served); every document's A starts
from the same fixed draw (the records draw per row, and with TTT_WARM_START_A carry A over from the batch before
on that rank); a global step divides by its target count (the records average the ranks' means).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.attention import document_segments
from stages.model import GPT, rms_norm
from stages.scoring import (PIECES, Batch, Progress, Ranks, Scores, on_device, piece_bounds, window_logits)
from stages.ttt import (SummedGradients, document_spans, document_windows, lockstep_batches, sum_of_document_means,
                        trainable_copy)

SITES = ("q", "k", "v", "o", "mlp", "head")  # the records' TTT_*_LORA switches; head = their lm_head_lora
LINEAR_SITES = {"q": "c_q", "k": "c_k", "v": "c_v"}


class SiteLoRA:
    """Rank-r adapters, one per document of a batch, where the records put them: on the q, k, v projections
    (from the attention's normed input), `o` (from the same input to the attention's output), `mlp` (from the
    MLP's normed input to its output) and `head` (from the final normed hidden state to the logits). A block that
    runs more than once (depth recurrence) has an adapter per pass, as the records' slots: adapter s of a site
    belongs to the s-th block run (model.layer_order()). Output scaled by alpha / rank; A starts from a fixed
    draw (uniform ±1/sqrt(in)), B at 0, so a first chunk is scored by the unchanged model."""

    def __init__(self, model: GPT, sites: list, rank: int, alpha: float, device):
        unknown = sorted(set(sites) - set(SITES))
        if unknown or not sites:
            raise ValueError(f"evaluate.ttt.phased.sites: {list(sites)} must be a non-empty subset of {list(SITES)}")
        self.rank, self.scale, self.active = rank, alpha / rank, False
        self.sites = [s for s in SITES if s in sites]
        order, dim = model.layer_order(), model.config.model_dim
        gen = torch.Generator().manual_seed(0)
        self.a0, self.a, self.b, self.outs, self.handles, self.calls = {}, {}, {}, {}, [], {}
        for site in self.sites:
            if site == "head":
                self.add_site(site, [(dim, model.config.vocab_size)], gen, device)
                continue
            modules = [site_module(block, site) for block in model.blocks]
            self.add_site(site, [(dim, out_features(modules[i], dim)) for i in order], gen, device)
            for i, module in enumerate(modules):
                slots = [s for s, layer in enumerate(order) if layer == i]
                self.handles.append(module.register_forward_hook(self.add_delta(site, slots)))

    def add_site(self, site: str, shapes: list, gen, device) -> None:
        self.outs[site] = [n_out for _, n_out in shapes]
        # drawn in fp32 whatever the default dtype, so a float64 run starts from the same A
        self.a0[site] = [torch.empty(n_in, self.rank, dtype=torch.float32).uniform_(-1, 1, generator=gen)
                         .div_(math.sqrt(n_in)).to(device=device, dtype=torch.get_default_dtype())
                         for n_in, _ in shapes]

    def reset(self, docs: int) -> list:
        """Fresh adapters for a new batch of `docs` documents; returns them (the parameters to train)."""
        params = []
        for site in self.sites:
            self.a[site] = [a0.expand(docs, -1, -1).clone().requires_grad_() for a0 in self.a0[site]]
            self.b[site] = [torch.zeros(docs, self.rank, n_out, device=a0.device, requires_grad=True)
                            for a0, n_out in zip(self.a0[site], self.outs[site])]
            params += self.a[site] + self.b[site]
        return params

    def begin(self) -> None:
        """Before each adapted forward pass: the next call of each hooked module is its first pass."""
        self.calls, self.active = {}, True

    def end(self) -> None:
        """After it: the model runs unadapted (global SGD)."""
        self.active = False

    def delta(self, site: str, slot: int, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a[site][slot][:x.size(0)].to(x.dtype), self.b[site][slot][:x.size(0)].to(x.dtype)
        return torch.bmm(torch.bmm(x, a), b) * self.scale

    def add_delta(self, site: str, slots: list):
        def hook(module, inputs, out):
            if not self.active:
                return out
            k = self.calls.get(id(module), 0)
            self.calls[id(module)] = k + 1
            return out + self.delta(site, slots[k], inputs[0])
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def site_module(block, site: str) -> nn.Module:
    if site in LINEAR_SITES:
        return getattr(block.attn, LINEAR_SITES[site])
    return block.attn if site == "o" else block.mlp


def out_features(module: nn.Module, dim: int) -> int:
    return module.out_features if isinstance(module, nn.Linear) else dim


class AdaptedModel:
    """The model with a SiteLoRA, behind the forward_logits that scoring.window_logits calls."""

    def __init__(self, model: GPT, adapters: SiteLoRA):
        self.model, self.adapters = model, adapters

    def forward_logits(self, idx: torch.Tensor, doc_isolation: bool = False) -> torch.Tensor:
        model, adapters = self.model, self.adapters
        adapters.begin()
        try:
            hidden = model.hidden(idx, doc_isolation)
        finally:
            adapters.end()
        logits = model.head(hidden)
        if "head" in adapters.sites:
            logits = logits + adapters.delta("head", 0, model.head_input(rms_norm(hidden)))
        return model.softcap(logits, model.config.asym_logit).float()


def document_chunks(spans: np.ndarray, chunk_tokens: int, short_docs: list) -> np.ndarray:
    """Each document's chunk size: that of the first [max_len, chunk] of short_docs (sorted by max_len) whose
    max_len its length (tokens, its next BOS included) does not exceed, else chunk_tokens."""
    lengths = spans[:, 1] - spans[:, 0]
    chunks = np.full(len(spans), chunk_tokens, dtype=np.int64)
    for max_len, chunk in sorted(short_docs, reverse=True):  # the smallest fitting limit is applied last
        chunks[lengths <= max_len] = chunk
    return chunks


def phase_bounds(num_docs: int, prefix_docs: int, phases: int) -> list[int]:
    """Document bounds [0, b_1, ..., b_phases, num_docs] of the prefix's parts and the rest, without empty parts:
    b_k = prefix_docs * k // phases, the records' cut when the split has at least prefix_docs documents (FineWeb's
    val has 50,000). With fewer, the parts stay where prefix_docs puts them (the records shrink the prefix to the
    documents there are), so a document's part never depends on how many documents follow it."""
    bounds = [0] + [min(prefix_docs * (k + 1) // phases, num_docs) for k in range(phases)] + [num_docs]
    return sorted(set(bounds))


def concatenated_documents(spans: np.ndarray, stream: torch.Tensor) -> torch.Tensor:
    """The documents' tokens one after the other (each through its next BOS, as the records concatenate them)."""
    lengths = spans[:, 1] - spans[:, 0]
    index = np.repeat(spans[:, 0] - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(lengths.sum())
    return stream[on_device(index, stream.device)]


def global_lr(ttt: dict, chunk: int, chunks: int) -> float:
    return ttt["lr"] * 0.5 * (1 + math.cos(math.pi * chunk / max(chunks - 1, 1)))


def packed_loss_sum(model: GPT, row: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Summed training loss of one packed row of tokens (inputs row[:-1]), attention inside documents and seq_len.
    The training loss keeps the single softcap, as the records' global TTT (their training forward) does: with
    asym_logit the two caps get no gradient here."""
    x, y = row[:-1], row[1:]
    # Segments unpadded (bucket 1): nothing here is compiled, and SDPA would attend over every padding segment.
    segments = document_segments(x.cpu().numpy(), seq_len, bucket=1).to(row.device)
    with torch.autocast(row.device.type, dtype=torch.bfloat16, enabled=row.device.type == "cuda"):
        logits = model.softcap(model.head(model.hidden(x[None], segments=segments)), asym=False)
    return F.cross_entropy(logits[0].float(), y, reduction="sum")


def global_sgd(model, tokens: torch.Tensor, cfg: dict, ranks: Ranks) -> None:
    """The records' global TTT on scored documents (concatenated): SGD over chunks of ttt.chunk_tokens targets
    but the last, each chunk's full sequences of seq_len in steps of ttt.batch_seqs, cosine-decayed lr."""
    ttt, seq_len = cfg["ttt"], cfg["seq_len"]
    total = len(tokens) - 1
    chunks = -(-total // ttt["chunk_tokens"])
    optimizer = torch.optim.SGD(model.parameters(), lr=ttt["lr"], momentum=ttt["momentum"])
    grads = SummedGradients(model)
    model.train()
    for ci in range(chunks - 1):
        start = ci * ttt["chunk_tokens"]
        seqs = (min(start + ttt["chunk_tokens"], total) - start) // seq_len
        for group in optimizer.param_groups:
            group["lr"] = global_lr(ttt, ci, chunks)
        for _ in range(ttt["epochs"]):
            for first in range(0, seqs, ttt["batch_seqs"]):
                pieces = piece_bounds(first, min(first + ttt["batch_seqs"], seqs))
                optimizer.zero_grad(set_to_none=True)
                for i in ranks.share(len(pieces) - 1):
                    a, b = start + pieces[i] * seq_len, start + pieces[i + 1] * seq_len
                    packed_loss_sum(model, tokens[a:b + 1], seq_len).backward()
                    grads.add()
                grads.set_mean((pieces[-1] - pieces[0]) * seq_len, ranks)
                if ttt["grad_clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), ttt["grad_clip"])
                optimizer.step()
    model.eval()


def document_batch(adapted: AdaptedModel, stream, batches: list[Batch], cfg: dict, tilt, scores: Scores) -> None:
    """Score a batch of documents chunk by chunk in lockstep; after each chunk is scored, each document's fresh
    adapters take `steps` Adam(W) steps on its targets. The n-gram tilt changes the scores, not the training."""
    lora, phased = cfg["ttt"]["lora"], cfg["ttt"]["phased"]
    params = adapted.adapters.reset(len(batches[0].windows))
    optimizer = torch.optim.AdamW(params, lr=lora["lr"], betas=tuple(phased["betas"]), eps=phased["eps"],
                                  weight_decay=lora["weight_decay"])
    for c, batch in enumerate(batches):
        trains = lora["steps"] > 0 and c < len(batches) - 1
        with torch.set_grad_enabled(trains):
            positions, logits, targets = window_logits(adapted, stream, batch)
            losses = F.cross_entropy(logits, targets, reduction="none")
        if tilt is None:
            scores.add(positions, losses)
        else:
            with torch.no_grad():
                scores.add(positions, F.cross_entropy(tilt(logits, positions), targets, reduction="none"))
        for step in range(lora["steps"] if trains else 0):
            if step > 0:
                _, logits, targets = window_logits(adapted, stream, batch)
                losses = F.cross_entropy(logits, targets, reduction="none")
            optimizer.zero_grad(set_to_none=True)
            sum_of_document_means(losses, batch).backward(inputs=params)
            optimizer.step()


def check_config(cfg: dict) -> None:
    ttt = cfg["ttt"]
    if cfg["ogd"]["enabled"]:
        raise ValueError("evaluate.ogd.enabled: the OGD bias does not run with evaluate.ttt.method phased")
    chunks = [ttt["lora"]["chunk_tokens"]] + [chunk for _, chunk in ttt["phased"]["short_docs"]]
    if max(chunks) > cfg["seq_len"]:
        raise ValueError(f"evaluate.ttt.lora.chunk_tokens / phased.short_docs: a chunk of {max(chunks)} exceeds "
                         f"seq_len {cfg['seq_len']}; a chunk's first targets would have no window")


def phased_losses(model, tokens: np.ndarray, cfg: dict, device, ranks: Ranks, tilt=None) -> Scores:
    """Phased TTT of every target 1..n-1 (see the module's docstring)."""
    check_config(cfg)
    lora, phased = cfg["ttt"]["lora"], cfg["ttt"]["phased"]
    stream = on_device(tokens.astype(np.int64), device)
    spans = document_spans(tokens)
    windows, bounds = document_windows(spans, cfg["seq_len"], document_chunks(spans, lora["chunk_tokens"],
                                                                              phased["short_docs"]))
    parts = phase_bounds(len(spans), phased["prefix_docs"], phased["phases"])
    prefix_parts = sum(hi <= min(phased["prefix_docs"], len(spans)) for hi in parts[1:])
    base = trainable_copy(model) if prefix_parts else model
    adapters = SiteLoRA(base, phased["sites"], lora["rank"], phased["alpha"], device)
    adapted, scores, size = AdaptedModel(base, adapters), Scores(), lora["batch_docs"]
    rounds = []
    for k, (lo, hi) in enumerate(zip(parts[:-1], parts[1:])):
        doc_batches = [range(d, min(d + size, hi)) for d in range(lo, hi, size)]
        rounds += [(k, doc_batches[r:r + PIECES]) for r in range(0, len(doc_batches), PIECES)]
    progress = Progress("evaluate ttt (phased, rounds of document batches)", len(rounds), ranks)
    try:
        for done, (k, batches) in enumerate(rounds, 1):
            for i in ranks.share(len(batches)):
                document_batch(adapted, stream, lockstep_batches(windows, bounds, batches[i], device), cfg, tilt,
                               scores)
            part_done = done == len(rounds) or rounds[done][0] != k
            if part_done and k < prefix_parts and parts[k + 1] < len(spans):  # (nothing is left to score)
                global_sgd(base, concatenated_documents(spans[:parts[k + 1]], stream), cfg, ranks)
            progress.update(done)
    finally:
        adapters.remove()
    return scores
