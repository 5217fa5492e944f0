"""train: the challenge's baseline recipe on caddie's shards, on CPU or GPUs (torchrun).

The global batch (batch_tokens per step) is fixed whatever the number of processes: it is split
into `micro_batches` micro-batches spread over the ranks (gradient accumulation), as the challenge
does. Batches are read from the train shards' memmaps, never concatenated: a contiguous stream, as
the challenge's loader reads it, or with the curriculum on, windows (shard, offset) that each rank
draws from its own sampler stream. The warmdown follows the wallclock cap when one is set, else the
iteration count; so do the phases (QAT, depth recurrence, layer growth, context growth), which the
warmup steps compile one by one before the timer starts. State is checkpointed under --resume-dir (not
a declared output), so a killed run continues where it was.
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from stages import techniques
from stages.attention import Segments, document_segments
from stages.curriculum import load_sampler
from stages.devices import init_distributed
from stages.loader import Batches, TokenStream
from stages.io import IntegrityError, read_json, save_torch, sha256_file, write_json, write_text
from stages.model import GPT, GPTConfig, cast_to_training_dtypes, non_finite, param_groups
from stages.muon import Muon
from stages.shards import ShardSet, manifest_shards, read_header


def progress_line(record: dict, cfg: dict) -> str:
    """A step in the records' log format (step/total, train loss, train time, ms/step), plus tok/s and the
    time left: to the wallclock cap when there is one, else at this pace to the last iteration."""
    step, ms = record["step"], record["ms"]
    avg = ms / step
    left_s = (budget_seconds(cfg) - ms / 1000 if budget_seconds(cfg)
              else (cfg["iterations"] - step) * avg / 1000)
    return (f"step:{step}/{cfg['iterations']} train_loss:{record['loss']:.4f} train_time:{ms:.0f}ms "
            f"step_avg:{avg:.2f}ms tok/s:{record['tokens'] / max(ms / 1000, 1e-9):.0f} eta:{max(left_s, 0):.0f}s")


def budget_seconds(cfg: dict) -> float:
    """The training loop's wallclock budget: the cap less the GPTQ reserve (0 = no cap)."""
    return max(cfg["max_seconds"] - cfg["gptq_reserve_seconds"], 0.0) if cfg["max_seconds"] else 0.0


def lr_multiplier(step: int, elapsed_ms: float, cfg: dict) -> float:
    """1 until the warmdown, then linear to 0, floored at min_lr. The warmdown is the last warmdown_frac of the
    budget (the wallclock budget when capped, else the iterations), as the records set it, or else the last
    warmdown_iters steps (when capped, at the pace so far), as the baseline does."""
    frac, floor = cfg.get("warmdown_frac", 0.0), cfg.get("min_lr", 0.0)
    if frac > 0:
        budget = budget_seconds(cfg)
        progress = elapsed_ms / (budget * 1000) if budget else step / cfg["iterations"]
        return max((1.0 - progress) / frac, floor) if progress >= 1.0 - frac else 1.0
    warmdown = cfg["warmdown_iters"]
    if warmdown <= 0:
        return 1.0
    if not cfg["max_seconds"]:
        start = max(cfg["iterations"] - warmdown, 0)
        return max((cfg["iterations"] - step) / warmdown, floor) if step >= start else 1.0
    warmdown_ms = warmdown * elapsed_ms / max(step, 1)
    remaining_ms = max(budget_seconds(cfg) * 1000 - elapsed_ms, 0.0)
    return max(remaining_ms / max(warmdown_ms, 1e-9), floor) if remaining_ms <= warmdown_ms else 1.0


def muon_momentum(step: int, opt: dict) -> float:
    frac = min(step / opt["muon_momentum_warmup_steps"], 1.0) if opt["muon_momentum_warmup_steps"] else 1.0
    return (1 - frac) * opt["muon_momentum_warmup_start"] + frac * opt["muon_momentum"]


def build_optimizers(model: GPT, opt: dict, fused: bool) -> list[torch.optim.Optimizer]:
    """[embed Adam, matrix Muon, scalar Adam(, head Adam)], as the baseline. A weight decay makes the Adam of
    its group an AdamW (decoupled: w *= 1 - lr·wd at the current lr), as the records' EMBED_WD and ADAM_WD."""
    groups = param_groups(model)

    def adam(params, lr, weight_decay=0.0):
        kwargs = dict(betas=(opt["beta1"], opt["beta2"]), eps=opt["adam_eps"], fused=fused)
        group = [{"params": params, "lr": lr, "base_lr": lr}]
        if weight_decay:
            return torch.optim.AdamW(group, weight_decay=weight_decay, **kwargs)
        return torch.optim.Adam(group, **kwargs)

    embed_lr = opt["tied_embed_lr"] if model.config.tie_embeddings else opt["embed_lr"]
    optimizers = [adam(groups["embed"], embed_lr, opt["embed_weight_decay"]),
                  Muon(groups["matrix"], lr=opt["matrix_lr"], momentum=opt["muon_momentum"],
                       backend_steps=opt["muon_backend_steps"], weight_decay=opt["muon_weight_decay"],
                       row_normalize=opt["muon_row_normalize"], newton_schulz=opt["newton_schulz"],
                       momentum_bf16=opt["muon_momentum_bf16"]),
                  adam(groups["scalar"], opt["scalar_lr"], opt["scalar_weight_decay"])]
    for group in optimizers[1].param_groups:
        group["base_lr"] = opt["matrix_lr"]
    if groups["head"]:
        optimizers.append(adam(groups["head"], opt["head_lr"]))
    return optimizers


def average_gradients(params, world: int):
    """Average the gradients across ranks, one all_reduce per dtype (DDP's job, done by hand where each rank
    clips its own gradient first)."""
    by_dtype = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= world
    return float(value)


class Trainer:
    def __init__(self, cfg, curriculum_cfg, manifest, curriculum_path, curriculum_summary, seed):
        self.cfg, self.seed = cfg, seed
        self.rank, self.world, self.device = init_distributed(cfg["device"], "train.device")
        if cfg["micro_batches"] % self.world:
            raise ValueError(f"train.micro_batches: {cfg['micro_batches']} is not divisible by "
                             f"{self.world} processes")
        self.accum = cfg["micro_batches"] // self.world
        self.local_tokens = cfg["batch_tokens"] // cfg["micro_batches"]
        if cfg["batch_tokens"] % cfg["micro_batches"] or self.local_tokens % cfg["seq_len"]:
            raise ValueError(f"train.batch_tokens: {cfg['batch_tokens']} must split into "
                             f"{cfg['micro_batches']} micro-batches of whole {cfg['seq_len']}-token sequences")
        seed_everything(seed)
        vocab = read_json(manifest)["vocab_size"]
        self.model = GPT(GPTConfig(vocab_size=vocab, **cfg["model"])).to(self.device)
        if self.device.type == "cuda":  # the baseline's bf16/fp32 layout under autocast (parity on GPUs)
            cast_to_training_dtypes(self.model)
        grow = cfg["grow"]
        if len(grow["depths"]) != len(grow["until"]) or any(d > cfg["model"]["num_layers"] for d in grow["depths"]):
            raise ValueError(f"train.grow: depths {grow['depths']} and until {grow['until']} must pair up, each "
                             f"depth at most num_layers = {cfg['model']['num_layers']}")
        seq = cfg["seq_growth"]
        if (len(seq["lengths"]) != len(seq["until"]) or any(b <= a for a, b in zip(seq["until"], seq["until"][1:]))
                or any(n > cfg["seq_len"] or self.local_tokens % n for n in seq["lengths"])):
            raise ValueError(f"train.seq_growth: lengths {seq['lengths']} and until {seq['until']} must pair up, until "
                             f"increasing, each length at most seq_len = {cfg['seq_len']} and dividing the "
                             f"{self.local_tokens} tokens of a micro-batch")
        # The records clip each rank's gradient, then average (clip_grad_norm_ before their all_reduce): with
        # grad_clip_per_rank the ranks average by hand after clipping, instead of DDP during the backward.
        opt = cfg["optimizer"]
        self.clip_per_rank = self.world > 1 and opt["grad_clip_norm"] > 0 and opt["grad_clip_per_rank"]
        # Skipped (not yet grown) layers, and AsymLogit's caps (used only in scoring), get no gradient, which
        # DDP must be told about.
        unused = bool(grow["depths"]) or bool(cfg["model"].get("asym_logit"))
        self.ddp = (DDP(self.model, find_unused_parameters=unused)
                    if self.world > 1 and not self.clip_per_rank else None)
        net = self.ddp or self.model
        self.step_model = torch.compile(net) if cfg["compile"] else net
        self.optimizers = build_optimizers(self.model, cfg["optimizer"], fused=self.device.type == "cuda")
        paths = manifest_shards(manifest, "train", verify=self.rank == 0)  # once, not once per rank
        if curriculum_cfg["enabled"]:  # each rank its own sampler stream, seeded by (seed, rank)
            sampler = load_sampler(curriculum_path, curriculum_summary, curriculum_cfg["floor"], seed, self.rank)
            stream, windows = None, ShardSet(paths, vocab)
            windows.check_windows(sampler.shard, sampler.offset, cfg["seq_len"] + 1, curriculum_path)
        else:
            sampler, stream, windows = None, TokenStream(paths, vocab), None
        if cfg["document_packing"] and sampler is not None:
            raise ValueError("train.document_packing: packs the stream's contiguous spans, so it needs "
                             "curriculum.enabled: false")
        self.batches = Batches(stream, sampler, windows, cfg["seq_len"], self.rank, self.world,
                               packed=cfg["document_packing"])
        self.step, self.elapsed_ms, self.metrics = 0, 0.0, []
        self.seq_len = self.phase_at(0.0)["seq_len"]  # the context growth's current length
        self.rewarm_from = None  # the step its length last changed, while the LR warms up again
        self.priming = False
        self.train_tokens = sum(read_header(p) for p in paths)
        self.warnings = []
        if cfg["seq_len"] + 1 > self.train_tokens:
            self.warnings.append(f"train.seq_len + 1 = {cfg['seq_len'] + 1} exceeds the {self.train_tokens} train "
                                 "tokens: every training sequence wraps around the split")
        self.ema = techniques.EMA(self.model, cfg["ema"]["decay"]) if cfg["ema"]["enabled"] else None
        sq = cfg["sqwa"]
        self.sqwa = techniques.SQWA(sq["bits"], sq["clip_percentile"], 0) if sq["enabled"] else None
        self.sqwa_loop_ms = 0.0
        self.hard = techniques.HardBatches(cfg["replay"]["batches"]) if cfg["replay"]["every"] else None
        self.replay_steps = 0
        self.noise_rng = torch.Generator().manual_seed(seed * 7919 + self.rank)
        self.matrices = param_groups(self.model)["matrix"]

    def progress(self) -> float:
        budget = budget_seconds(self.cfg)
        return self.elapsed_ms / (budget * 1000) if budget else self.step / self.cfg["iterations"]

    def qna_noise(self, lr_mul: float):
        """QNA's noise on the block matrices while the LR multiplier is above its threshold, else None."""
        qna = self.cfg["qna"]
        if not qna["enabled"] or lr_mul < qna["threshold"]:
            return None
        return techniques.add_quantization_noise(self.matrices, qna["bits"], qna["clip_percentile"],
                                                 qna["magnitude"] * lr_mul, self.noise_rng)

    def phase_at(self, progress: float) -> dict:
        """What the schedule has switched on at this fraction of the budget: QAT, depth recurrence, the layers
        progressive growth runs, and the context length (seq_growth: lengths[i] while progress <= until[i], as
        the record #2014's TRAIN_SEQ_SCHEDULE; then seq_len)."""
        cfg, model_cfg = self.cfg, self.cfg["model"]
        grow, seq = cfg["grow"], cfg["seq_growth"]
        return {"qat": bool(model_cfg["qat_bits"]) and progress >= cfg["qat_start"],
                "recurrence": bool(model_cfg["recur_layers"]) and progress >= cfg["recur_start"],
                "layers": next((d for d, at in zip(grow["depths"], grow["until"]) if progress < at),
                               model_cfg["num_layers"]),
                "seq_len": next((n for n, at in zip(seq["lengths"], seq["until"]) if progress <= at), cfg["seq_len"])}

    def enter_phase(self, phase: dict):
        """Set the phase on the raw model (whose flags compiled graphs read) and the batches' length. A new
        length after step 0 warms the LR up again over seq_growth.rewarm_steps steps."""
        model_cfg = self.cfg["model"]
        if model_cfg["qat_bits"]:
            self.model.qat_active = phase["qat"]
        if model_cfg["recur_layers"]:
            self.model.recurrence_active = phase["recurrence"]
        if self.cfg["grow"]["depths"]:
            self.model.active_layers = phase["layers"]
        if phase["seq_len"] != self.seq_len:
            self.seq_len = phase["seq_len"]
            if self.step > 0 and self.cfg["seq_growth"]["rewarm_steps"]:
                self.rewarm_from = self.step
            if not self.priming:
                self.log(f"# seq_len {self.seq_len} from step {self.step + 1} (progress {self.progress():.3f})")

    def rewarm(self) -> float:
        """The LR factor after a change of context length: (k + 1) / rewarm_steps at the k-th step after it,
        then 1 (the record #2014's SEQ_CHANGE_WARMUP_STEPS)."""
        if self.rewarm_from is None:
            return 1.0
        factor = min((self.step - self.rewarm_from + 1) / self.cfg["seq_growth"]["rewarm_steps"], 1.0)
        if factor >= 1.0:
            self.rewarm_from = None
        return factor

    def train_step(self, lr_scale: float = 1.0, replay=None, phase=None) -> tuple[float, list]:
        """One optimizer step on the next global batch (or on a replayed one, at lr_scale × the LR), in the
        phase the schedule is in (or in `phase`, when priming)."""
        self.enter_phase(phase or self.phase_at(self.progress()))
        lr_mul = lr_multiplier(self.step, self.elapsed_ms, self.cfg)
        applied = lr_mul * self.rewarm()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * applied * lr_scale
        self.optimizers[1].param_groups[0]["momentum"] = muon_momentum(self.step, self.cfg["optimizer"])
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        batch = replay or [self.batches.next(self.local_tokens, self.progress(), self.seq_len)
                           for _ in range(self.accum)]
        originals = self.qna_noise(lr_mul)
        total = torch.zeros((), device=self.device)
        for micro, (x, y) in enumerate(batch):
            sync = self.ddp is None or micro == self.accum - 1
            with (nullcontext() if sync else self.ddp.no_sync()), autocast:
                loss = self.step_model(x.to(self.device, torch.long), y.to(self.device, torch.long),
                                       doc_isolation=self.cfg["doc_isolation"], segments=self.segments(x))
            (loss / self.accum).backward()
            total += loss.detach() / self.accum
        if originals is not None:
            techniques.restore(self.matrices, originals)
        clip = self.cfg["optimizer"]["grad_clip_norm"]
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        if self.clip_per_rank:
            average_gradients(self.model.parameters(), self.world)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.lr_mul, self.applied_lr_mul = lr_mul, applied
        return all_reduce_mean(total, self.world), batch

    def segments(self, x: torch.Tensor) -> Segments | None:
        """With document packing, where the packed row is cut: at each BOS and every seq_len tokens of a document."""
        return document_segments(x[0].numpy(), self.seq_len).to(self.device) if self.batches.packed else None

    def replay_hard_batches(self):
        """Every `replay.every` steps, one more step on each of the hardest batches at lr_mult × the LR."""
        cfg = self.cfg["replay"]
        if self.hard is None or self.step % cfg["every"]:
            return
        for batch in self.hard.hardest():
            self.train_step(lr_scale=cfg["lr_mult"], replay=batch)
            self.replay_steps += 1

    def snapshot_for_sqwa(self):
        sq = self.cfg["sqwa"]
        if self.sqwa is None or self.lr_mul >= sq["below_lr"] or self.step % sq["every"]:
            return
        t0 = time.perf_counter()
        self.sqwa.add(self.ema.state_dict() if self.ema is not None else self.model.state_dict())
        self.sqwa_loop_ms += (time.perf_counter() - t0) * 1000

    def phases(self) -> list[dict]:
        """Every distinct phase the run passes through, in order: the one at the start, and those at and just
        after each point where the schedule switches something (before 1: a point at 1 is never reached)."""
        cfg = self.cfg
        points = {0.0, cfg["qat_start"], cfg["recur_start"], *cfg["grow"]["until"], *cfg["seq_growth"]["until"]}
        found = []
        for point in sorted(p for p in points if p < 1.0):
            for progress in (point, math.nextafter(point, math.inf)):
                if (phase := self.phase_at(progress)) not in found:
                    found.append(phase)
        return found

    def prime(self):
        """Run warmup_steps in each phase of the run (the records' warmup, then their loop warmup), so that
        every graph the run uses is compiled before the timer starts; then restore the initial state."""
        if not self.cfg["warmup_steps"]:
            return
        saved = copy.deepcopy(self.state_dict())
        self.priming = True
        phases = self.phases()
        for phase in phases:
            if len(phases) > 1:
                self.log(f"# warmup: {self.cfg['warmup_steps']} steps at seq_len {phase['seq_len']}, "
                         f"{phase['layers']} layers, recurrence {'on' if phase['recurrence'] else 'off'}, "
                         f"QAT {'on' if phase['qat'] else 'off'}")
            for _ in range(self.cfg["warmup_steps"]):
                self.train_step(phase=phase)
        self.priming = False
        self.load_state_dict(saved)

    def state_dict(self):
        state = {"model": self.model.state_dict(), "opt": [o.state_dict() for o in self.optimizers],
                 "data": self.batches.state_dict(), "step": self.step, "elapsed_ms": self.elapsed_ms,
                 "metrics": self.metrics, "noise_rng": self.noise_rng.get_state(),
                 "replay_steps": self.replay_steps, "seq_len": self.seq_len, "rewarm_from": self.rewarm_from}
        for name in ("ema", "sqwa", "hard"):
            if getattr(self, name) is not None:
                state[name] = getattr(self, name).state_dict()
        return state

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["opt"]):
            opt.load_state_dict(s)
        self.batches.load_state_dict(state["data"])
        self.step, self.elapsed_ms, self.metrics = state["step"], state["elapsed_ms"], state["metrics"]
        self.noise_rng.set_state(state["noise_rng"])
        self.replay_steps = state["replay_steps"]
        self.seq_len, self.rewarm_from = state["seq_len"], state["rewarm_from"]
        for name in ("ema", "sqwa", "hard"):
            if getattr(self, name) is not None:
                getattr(self, name).load_state_dict(state[name])

    def save_resume(self, resume_dir: Path):
        if self.rank == 0:
            save_torch(resume_dir / "state.pt", self.state_dict())
            write_text(resume_dir / "state.sha256", sha256_file(resume_dir / "state.pt"))

    def load_resume(self, resume_dir: Path) -> bool:
        """Continue from resume_dir/state.pt when it is the file save_resume wrote (its sha256 matches); a
        corrupt or unreadable state is moved aside and the run starts again at step 0, said in the log."""
        path, digest = resume_dir / "state.pt", resume_dir / "state.sha256"
        if not path.exists():
            return False
        try:
            if not digest.exists() or sha256_file(path) != digest.read_text().strip():
                raise IntegrityError("its sha256 is not the one recorded when it was written")
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as e:  # torch.load's errors do not name the file
            os.replace(path, path.with_suffix(".pt.corrupt"))
            self.log(f"# resume state {path} is corrupt ({type(e).__name__}: {e}); moved to "
                     f"{path.with_suffix('.pt.corrupt')}; starting again at step 0")
            return False
        self.load_state_dict(state)
        return True

    def log(self, line: str):
        """A line of the train log: printed, and appended to the resume folder's train.log, which keeps
        every attempt's lines across kills and resumes until it is published beside model.pt."""
        if self.rank == 0:
            print(line, flush=True)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def reached_cap(self) -> bool:
        """Whether the wallclock budget is spent. The ranks share one clock, the slowest's, so that the phases
        and the warmdown, which follow it, switch at the same step on every rank."""
        budget = budget_seconds(self.cfg)
        if not budget:
            return False
        if self.world > 1:  # on the device: NCCL reduces only CUDA tensors
            elapsed = torch.tensor(self.elapsed_ms, dtype=torch.float64, device=self.device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            self.elapsed_ms = float(elapsed)
        return self.elapsed_ms >= budget * 1000

    def logs_step(self, step: int) -> bool:
        return step % self.cfg["log_every"] == 0 or step in (1, self.cfg["iterations"])

    def fit(self, resume_dir: Path):
        self.log_path = resume_dir / "train.log"
        resumed = self.load_resume(resume_dir)
        if resumed:
            self.log(f"# resumed at step {self.step} from {resume_dir / 'state.pt'}")
        else:
            self.log(f"# started at step 0 (seed {self.seed}, world size {self.world}, device {self.device})")
            self.prime()
        for warning in self.warnings:
            self.log(f"# warning: {warning}")
        cfg = self.cfg
        stopped_by = "iterations"
        while self.step < cfg["iterations"]:
            if self.reached_cap():
                stopped_by = "wallclock"
                break
            t0 = time.perf_counter()
            loss, batch = self.train_step()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.step += 1
            if not math.isfinite(loss):
                last = self.metrics[-1] if self.metrics else None
                raise FloatingPointError(f"train: loss is {loss} at step {self.step}; last good metrics: {last}")
            if self.hard is not None:
                self.hard.offer(loss, batch)
            self.replay_hard_batches()
            self.snapshot_for_sqwa()
            step_ms = (time.perf_counter() - t0) * 1000
            self.elapsed_ms += step_ms
            record = {"step": self.step, "loss": loss, "lr_mul": self.applied_lr_mul,
                      "tokens": self.step * cfg["batch_tokens"], "ms": round(self.elapsed_ms, 3),
                      "step_ms": round(step_ms, 3)}
            self.metrics.append(record)  # every step: metrics.jsonl does not depend on log_every
            if self.logs_step(self.step):
                self.log(progress_line(record, cfg))
            if cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0:
                self.save_resume(resume_dir)
        if self.metrics and not self.logs_step(self.metrics[-1]["step"]):  # the last step is always logged
            self.log(progress_line(self.metrics[-1], cfg))
        if stopped_by == "wallclock":
            self.log(f"stopping_early: wallclock_cap train_time:{self.elapsed_ms:.0f}ms "
                     f"step:{self.step}/{cfg['iterations']}")
        return {"stopped_by": stopped_by, "resumed": resumed}

    def final_weights(self) -> tuple[dict, str]:
        """What training exports: the SQWA average if it has snapshots, else the EMA, else the weights."""
        if self.sqwa is not None:
            t0 = time.perf_counter()
            average = self.sqwa.average()
            self.sqwa_wait_ms = (time.perf_counter() - t0) * 1000
            if average is not None:
                return average, "sqwa"
        if self.ema is not None:
            return self.ema.state_dict(), "ema"
        return self.model.state_dict(), "weights"

    def check_learned(self, state: dict):
        """A model with non-finite weights, or whose final loss is within 0.1 nats of ln(vocab) (it learned
        nothing), is an error, not a result."""
        if found := non_finite(state):
            raise FloatingPointError(f"train: exported weight {found[0]} has {found[1]} non-finite values")
        uniform = math.log(self.model.config.vocab_size)
        final = self.metrics[-1]["loss"] if self.metrics else None
        if final is not None and final > uniform - 0.1:
            raise FloatingPointError(f"train: final loss {final:.4f} nats at step {self.step} is not 0.1 below "
                                     f"ln(vocab) = {uniform:.4f} (a uniform guess): the model learned nothing "
                                     "(check train.optimizer learning rates and train.iterations)")

    def write_outputs(self, out_dir: Path, info: dict, config: dict):
        weights, source = self.final_weights()
        if self.rank != 0:
            return
        state = {k: v.detach().float().cpu() for k, v in weights.items()}
        self.check_learned(state)
        save_torch(out_dir / "model.pt", {"state_dict": state, "model_config": self.model.config.to_dict()})
        write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.metrics))
        seconds = self.elapsed_ms / 1000
        tokens = self.step * self.cfg["batch_tokens"]
        extras = {"exported": source, "replay_steps": self.replay_steps}
        if self.sqwa is not None:
            extras.update(sqwa_snapshots=self.sqwa.count, sqwa_loop_ms=round(self.sqwa_loop_ms, 3),
                          sqwa_wait_ms=round(self.sqwa_wait_ms, 3))
        write_json(out_dir / "summary.json", {
            "config": config, "seed": self.seed, "steps": self.step, "tokens": tokens,
            "model_sha256": sha256_file(out_dir / "model.pt"),
            "train_seconds": round(seconds, 3), "tokens_per_second": tokens / seconds if seconds else None,
            "final_train_loss": self.metrics[-1]["loss"] if self.metrics else None,
            "params": self.model.num_params(), "world_size": self.world, "device": str(self.device),
            "grad_accum_steps": self.accum, "warnings": self.warnings, **extras, **info})
        write_text(out_dir / "train.log", self.log_path.read_text())


def process_alive(pid: int) -> bool:
    """Whether `pid` runs on this host (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:  # gone meanwhile; without /proc (not Linux), kill() said it is alive
        return not Path("/proc/self").exists()
    return state != "Z"


@contextmanager
def trainer_lock(resume_dir: Path, out_dir: Path, rank: int):
    """Refuse to train beside another live trainer of the same outputs (e.g. one orphaned when snakemake
    was killed): rank 0 holds resume_dir/train.lock with its host and pid; a lock whose process is gone
    is taken over."""
    if rank != 0:
        yield
        return
    resume_dir.mkdir(parents=True, exist_ok=True)
    lock, me = resume_dir / "train.lock", f"{socket.gethostname()} {os.getpid()}"
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            host, _, pid = lock.read_text().partition(" ")
            if host == socket.gethostname() and pid.strip().isdigit() and process_alive(int(pid)):
                raise RuntimeError(f"{out_dir}: another trainer (pid {pid.strip()} on {host}) is writing these "
                                   f"outputs; stop it first (its lock: {lock})") from None
            if host != socket.gethostname():
                raise RuntimeError(f"{out_dir}: a trainer on host {host} (pid {pid.strip()}) holds {lock}; "
                                   "remove the lock if that trainer is gone") from None
            lock.unlink(missing_ok=True)  # its owner is gone
    with os.fdopen(fd, "w") as f:
        f.write(me)
    try:
        yield
    finally:
        if lock.exists() and lock.read_text() == me:
            lock.unlink()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help='{"train": ..., "curriculum": ...} as JSON')
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--curriculum", type=Path, help="bucket .npz (when the curriculum is enabled)")
    parser.add_argument("--curriculum-summary", type=Path, help="its summary.json, which records its sha256")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--resume-dir", required=True, type=Path)
    parser.add_argument("--run-settings", default="{}", help="run settings (log_every, checkpoint_every), as JSON "
                        "(not --run: torchrun would take it for its own --run-path)")
    args = parser.parse_args(argv)
    config, run = json.loads(args.config), json.loads(args.run_settings)
    trainer = Trainer({**config["train"], **run}, config["curriculum"], args.manifest, args.curriculum,
                      args.curriculum_summary, args.seed)
    with trainer_lock(args.resume_dir, args.out_dir, trainer.rank):
        start = time.time()
        info = trainer.fit(args.resume_dir)
        trainer.write_outputs(args.out_dir, {**info, "wall_seconds": round(time.time() - start, 3), "run": run},
                              config)
        if trainer.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        if trainer.rank == 0:
            shutil.rmtree(args.resume_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
