"""scoring: the pieces every evaluation mode is built of, on one process or on many (torchrun).

A window (start, end, first) feeds tokens[start:end] to the model and scores the targets first..end, each
predicted from the tokens before it. Windows are cut into batches the same way whatever the number of
processes, and a rank scores whole batches (its share: every world-th one), so a batch computes the same
numbers on any number of processes; what the ranks learn from together is summed in float64. A batch is
built on the device by index arithmetic from the token stream (moved there once), and the host knows each
batch's width and number of scored targets from the windows, so scoring never waits for the device: the
losses stay there until they are moved back at once.
"""
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from stages.devices import init_distributed

PROGRESS_SECONDS = 10.0

# Work whose result the ranks must sum before the eval goes on (one SGD step of TTT, one OGD round of LoRA
# TTT) is cut into this many fixed pieces, which the ranks share. The pieces, not the number of processes,
# decide what is computed together, so every number of processes gives the same result; 8 = the GPUs of the
# challenge's node, each of which then gets one piece.
PIECES = 8


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one eval (torchrun's RANK and WORLD_SIZE)."""
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> range:
        """Which of `count` pieces of work this rank does."""
        return range(self.rank, count, self.world)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over all ranks, in place."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def close(self) -> None:
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


ONE = Ranks()


def start_ranks(device_name: str) -> tuple[Ranks, torch.device]:
    """This process's rank and device (gloo on CPU, nccl on cuda:LOCAL_RANK)."""
    rank, world, device = init_distributed(device_name, "evaluate.device")
    return Ranks(rank, world), device


def on_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device; on CUDA copied from pinned memory, so the host does not wait for it."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def scoring_windows(num_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    """Windows (start, end, first), one per row: inputs tokens[start:end] predict targets tokens[start+1:end+1],
    of which those at positions >= first are scored. Targets 1..num_tokens-1 are each scored once."""
    if stride > seq_len:
        raise ValueError(f"evaluate.stride: {stride} exceeds seq_len {seq_len}; tokens would be skipped")
    if num_tokens < 2:
        return np.zeros((0, 3), dtype=np.int64)
    first_stop = min(1 + seq_len, num_tokens)  # the first window scores all its targets, the others `stride`
    firsts = np.r_[1, np.arange(first_stop, num_tokens, stride)]
    ends = np.r_[first_stop, np.minimum(firsts[1:] + stride, num_tokens)] - 1
    return np.stack([np.maximum(ends - seq_len, 0), ends, firsts], axis=1).astype(np.int64)


def chunk_bounds(windows: np.ndarray, chunk_tokens: int) -> np.ndarray:
    """Bounds [0, ..., len(windows)] of the runs of windows whose first scored target lies in the same chunk of
    chunk_tokens of the stream."""
    chunk = (windows[:, 2] - 1) // chunk_tokens
    return np.r_[np.flatnonzero(np.diff(chunk, prepend=-1)), len(windows)]


def batch_bounds(bounds: np.ndarray, batch_seqs: int) -> np.ndarray:
    """Bounds that cut each run [bounds[i], bounds[i+1]) into batches of batch_seqs (the last one shorter)."""
    index = np.arange(bounds[-1])
    since_run = index - np.repeat(bounds[:-1], np.diff(bounds))
    return np.r_[np.flatnonzero(since_run % batch_seqs == 0), bounds[-1]]


def piece_bounds(start: int, stop: int, pieces: int = PIECES) -> np.ndarray:
    """Bounds that cut [start, stop) into at most `pieces` runs of nearly equal length (none empty)."""
    return np.unique(start + np.arange(pieces + 1) * (stop - start) // pieces)


class Batch(NamedTuple):
    """Windows, one per row of a device tensor, and what the host knows of them, so that the batch is launched
    without asking the device: its widest window and its number of scored targets."""
    windows: torch.Tensor
    width: int
    scored: int


def cut_batches(windows: np.ndarray, on_dev: torch.Tensor, bounds: np.ndarray) -> list[Batch]:
    """The batches windows[bounds[i]:bounds[i+1]]; `on_dev` is `windows` on the device."""
    if len(bounds) < 2:
        return []
    windows = windows[:bounds[-1]]  # reduceat's last run goes to the end of the array
    widths = np.maximum.reduceat(windows[:, 1] - windows[:, 0], bounds[:-1])
    scored = np.add.reduceat(windows[:, 1] - windows[:, 2] + 1, bounds[:-1])
    return [Batch(on_dev[a:b], int(w), int(s)) for a, b, w, s in zip(bounds[:-1], bounds[1:], widths, scored)]


def window_inputs(stream: torch.Tensor, batch: Batch) -> torch.Tensor:
    """tokens[start:end] of each window of the batch, one per row, padded with 0 to the batch's width."""
    start, end = batch.windows[:, 0], batch.windows[:, 1]
    column = torch.arange(batch.width, device=stream.device)
    inside = column < (end - start)[:, None]
    return torch.where(inside, stream[(start[:, None] + column).clamp(max=len(stream) - 1)], 0)


def scored_cells(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in the batch's inputs of the token that predicts each scored target, window by window."""
    start, end, first = batch.windows.unbind(1)
    per_window = end - first + 1
    device = batch.windows.device
    rows = torch.repeat_interleave(torch.arange(len(per_window), device=device), per_window,
                                   output_size=batch.scored)
    since_first = torch.arange(batch.scored, device=device) - (per_window.cumsum(0) - per_window)[rows]
    return rows, (first - start - 1)[rows] + since_first


def window_logits(model, stream: torch.Tensor, batch: Batch, doc_isolation=False):
    """Stream positions of the scored targets of a batch, window by window, their logits (float32,
    differentiable) and the targets."""
    rows, columns = scored_cells(batch)
    positions = batch.windows[rows, 0] + 1 + columns
    device = stream.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model.forward_logits(window_inputs(stream, batch), doc_isolation=doc_isolation)
    return positions, logits[rows, columns].float(), stream[positions]


def window_losses(model, stream: torch.Tensor, batch: Batch, doc_isolation=False, logit_bias=None, tilt=None):
    """Stream positions of the scored targets of a batch, window by window, and their losses (nats,
    differentiable). `logit_bias(logits, targets)`, if given, returns the logits to score (an OnlineBias), and
    `tilt(logits, positions)` (an ngram_tilt.NgramTilt) tilts them after it."""
    positions, logits, targets = window_logits(model, stream, batch, doc_isolation)
    if logit_bias is not None:
        logits = logit_bias(logits, targets)
    if tilt is not None:
        logits = tilt(logits, positions)
    return positions, F.cross_entropy(logits, targets, reduction="none")


class OnlineBias:
    """Stride-OGD (PR #316): a vocabulary bias added to the logits. Called on the logits it scores, it also
    sums the gradient of their losses w.r.t. the bias (float64); `step` moves it by the mean gradient over all
    ranks, once everything that gradient came from has been scored."""

    def __init__(self, vocab_size: int, lr: float, device):
        self.lr = lr
        self.bias = torch.zeros(vocab_size, device=device)
        self.grad = torch.zeros(vocab_size, dtype=torch.float64, device=device)

    def shift(self, logits, targets=None):
        return logits + self.bias

    def __call__(self, logits, targets):
        logits = self.shift(logits)
        with torch.no_grad():
            # a count by index_add_, not bincount: bincount asks the device for the largest target
            counts = torch.zeros_like(self.bias).index_add_(0, targets, torch.ones_like(targets, dtype=logits.dtype))
            self.grad += (torch.softmax(logits, -1).sum(0) - counts).double()
        return logits

    def step(self, scored: int, ranks: Ranks) -> None:
        """Learn from the `scored` targets (all ranks') whose gradient has been summed since the last step."""
        ranks.sum(self.grad)
        self.bias -= (self.lr * self.grad / max(scored, 1)).to(self.bias.dtype)
        self.grad.zero_()


def record_losses(losses: np.ndarray, positions: torch.Tensor, scored: torch.Tensor) -> None:
    """Store losses at their target positions. NaN in `losses` marks a target not scored yet, so a target is
    scored once, and a non-finite loss is an error here (it would read as never scored)."""
    positions, scored = positions.numpy(), scored.numpy()
    marked = np.zeros(len(losses), dtype=bool)
    marked[positions] = True
    if np.isfinite(losses[positions]).any() or np.count_nonzero(marked) < len(positions):
        raise AssertionError("a target was scored twice")
    if not np.isfinite(scored).all():
        first = int(np.argmax(~np.isfinite(scored)))
        raise FloatingPointError(f"the model's loss of val target {positions[first]} is {scored[first]}: it "
                                 "produces non-finite outputs")
    losses[positions] = scored


class Scores:
    """The losses a rank has scored and their target positions, kept on the device in scoring order."""

    def __init__(self):
        self.positions, self.losses = [], []

    def add(self, positions: torch.Tensor, losses: torch.Tensor) -> None:
        self.positions.append(positions)
        self.losses.append(losses.detach())

    def on_host(self, num_tokens: int) -> np.ndarray:
        """Loss (nats) of every target this rank scored, NaN at the others; one move from the device."""
        losses = np.full(num_tokens, np.nan)
        if self.positions:
            record_losses(losses, torch.cat(self.positions).cpu(), torch.cat(self.losses).double().cpu())
        return losses


class Progress:
    """Prints `label: done/total chunks, elapsed, eta` to rank 0's stage log, at most every PROGRESS_SECONDS."""

    def __init__(self, label: str, total: int, ranks: Ranks = ONE):
        self.label = label if ranks.world == 1 else f"{label} (rank 0 of {ranks.world})"
        self.total, self.every, self.shown = total, PROGRESS_SECONDS, ranks.main
        self.start = self.last = time.time()

    def update(self, done: int):
        now = time.time()
        if not self.shown or (now - self.last < self.every and done < self.total):
            return
        self.last, elapsed = now, now - self.start
        eta = elapsed / done * (self.total - done) if done else float("nan")
        print(f"{self.label}: {done}/{self.total} chunks, {elapsed:.0f} s elapsed, eta {eta:.0f} s", flush=True)


class Chunk(NamedTuple):
    """Consecutive windows, all scored before anything learns from them."""
    batches: list  # this rank's share of the chunk's batches
    scored: int  # the chunk's scored targets, all ranks'
    first: int  # its first and last scored target
    last: int


def window_chunks(windows: np.ndarray, bounds: np.ndarray, batch_seqs: int, ranks: Ranks, device) -> list[Chunk]:
    """The chunks windows[bounds[i]:bounds[i+1]], each cut into batches of batch_seqs (the same cut on any
    number of processes), of which this rank keeps its share."""
    batches = batch_bounds(bounds, batch_seqs)
    cut = cut_batches(windows, on_device(windows, device), batches)
    first_batch = np.searchsorted(batches, bounds)
    scored = np.add.reduceat(windows[:, 1] - windows[:, 2] + 1, bounds[:-1]) if len(bounds) > 1 else []
    chunks = []
    for k, (lo, hi) in enumerate(zip(first_batch[:-1], first_batch[1:])):
        mine = [cut[lo + i] for i in ranks.share(hi - lo)]
        chunks.append(Chunk(mine, int(scored[k]), int(windows[bounds[k], 2]), int(windows[bounds[k + 1] - 1, 1])))
    return chunks


def score_chunks(model, stream, chunks: list[Chunk], doc_isolation: bool, ranks: Ranks, label: str,
                 bias: OnlineBias | None = None, learn=None, tilt=None) -> Scores:
    """Score the chunks in order (through the n-gram `tilt`, if given). After a chunk is scored (by every rank),
    the OGD bias and `learn(k, chunk)` (TTT) learn from it, and only then is the next chunk scored."""
    scores, progress = Scores(), Progress(label, len(chunks), ranks)
    for k, chunk in enumerate(chunks):
        with torch.no_grad():
            for batch in chunk.batches:
                scores.add(*window_losses(model, stream, batch, doc_isolation, bias, tilt))
        if bias is not None:
            bias.step(chunk.scored, ranks)
        if learn is not None:
            learn(k, chunk)
        progress.update(k + 1)
    return scores
