"""Training-time techniques the records and seed PRs use, each off unless configured.

EMA (an fp32 shadow of the weights), SQWA (PR #975: an average of quantize→dequantize round trips of
snapshots in the warmdown, quantized in a background thread so the training loop does not stall),
QNA (PR #975: uniform noise of one quantization step on the block matrices, scaled by the LR
multiplier) and hard-batch replay (PR #1818: retrain the highest-loss batches at a higher LR).
"""
import heapq
import queue
import threading

import torch

from stages import rowquant


class EMA:
    def __init__(self, model, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        # shadow = decay * shadow + (1 - decay) * w, in this order of operations (the records' EMA)
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach().float(), alpha=1 - self.decay)

    def state_dict(self):
        return self.shadow

    def load_state_dict(self, state):
        self.shadow = {k: v.float().clone() for k, v in state.items()}


def round_trip(state: dict, bits: int, clip_percentile: float, keep_float_max_numel: int) -> dict:
    """The weights as the export quantizer (per-row round-to-nearest) would reconstruct them."""
    qmax = rowquant.qmax_of(bits)
    out = {}
    for name, w in state.items():
        if w.ndim == 2 and w.numel() > keep_float_max_numel:
            scale = rowquant.percentile_scale(w, clip_percentile, qmax)
            w = rowquant.dequantize_rows(rowquant.round_to_nearest(w, scale, qmax), scale)
        out[name] = w.float()
    return out


class SQWA:
    """Running sum of quantize→dequantize round trips of snapshots. The loop only copies the snapshot
    to the CPU; a worker thread quantizes and accumulates."""

    def __init__(self, bits: int, clip_percentile: float, keep_float_max_numel: int):
        self.args = (bits, clip_percentile, keep_float_max_numel)
        self.sum, self.count = None, 0
        self.pending = queue.Queue()
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.worker.start()

    def _work(self):
        while (snapshot := self.pending.get()) is not None:
            with torch.no_grad():
                rt = round_trip(snapshot, *self.args)
                self.sum = rt if self.sum is None else {k: self.sum[k] + rt[k] for k in rt}
                self.count += 1
            self.pending.task_done()

    def add(self, state: dict):
        self.pending.put({k: v.detach().to("cpu", copy=True) for k, v in state.items()})

    def drain(self):
        self.pending.join()

    def average(self) -> dict | None:
        self.drain()
        self.pending.put(None)
        self.worker.join()
        return None if self.count == 0 else {k: v / self.count for k, v in self.sum.items()}

    def state_dict(self):
        self.drain()
        return {"sum": self.sum, "count": self.count}

    def load_state_dict(self, state):
        self.sum, self.count = state["sum"], state["count"]


@torch.no_grad()
def add_quantization_noise(params, bits: int, clip_percentile: float, magnitude: float, generator):
    """QNA: w += U(−Δ/2, Δ/2)·magnitude per row (Δ = the export grid's step). Returns the originals,
    so the caller restores exact weights after the backward pass (the gradient is straight-through)."""
    originals = [p.detach().clone() for p in params]
    qmax = rowquant.qmax_of(bits)
    for p in params:
        step = rowquant.percentile_scale(p.detach(), clip_percentile, qmax).float().to(p.device)[:, None]
        noise = torch.rand(p.shape, generator=generator, device="cpu").to(p.device) - 0.5
        p.add_(noise * step * magnitude)
    return originals


@torch.no_grad()
def restore(params, originals):
    for p, original in zip(params, originals):
        p.copy_(original)


class HardBatches:
    """The `keep` highest-loss batches seen so far (a min-heap on loss), for replay."""

    def __init__(self, keep: int):
        self.keep, self.heap, self.counter = keep, [], 0

    def offer(self, loss: float, batch):
        self.counter += 1  # a tie-breaker, so tensors are never compared
        item = (loss, self.counter, [(x.to("cpu", torch.int32), y.to("cpu", torch.int32)) for x, y in batch])
        if len(self.heap) < self.keep:
            heapq.heappush(self.heap, item)
        elif loss > self.heap[0][0]:
            heapq.heapreplace(self.heap, item)

    def hardest(self):
        return [batch for _, _, batch in sorted(self.heap, reverse=True)]

    def state_dict(self):
        return {"heap": self.heap, "counter": self.counter}

    def load_state_dict(self, state):
        self.heap, self.counter = state["heap"], state["counter"]
