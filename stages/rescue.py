"""rescue: quantized artifact -> rescued artifact, fitted to the prequant teacher on train tokens.

Two post-quantization fits of the dequantized model ("student") by KL(teacher ‖ student):
- LCQ (PR #2128, LoRA-compensated quantization): a rank-r LoRA B·A on the targeted row-quantized
  matrices, B = 0 at the start so the student starts exactly at the quantized model. Unlike #2128, whose
  LoRA lived only in process memory, the trained B·A is stored INSIDE the artifact as the entry's LQER
  factors, so it loads with `pack.load_model` and counts toward the cap.
- calibration (PR #1818's designed-but-unbuilt loop): only the float control tensors (attn/mlp scales,
  resid_mix, q_gain, skip weights) are refitted; every other weight is frozen.
With both on, LCQ runs first and stores its quantized factors; calibration then fits the model those
entries decode to (the LoRA frozen, as stored). Both fits run on rescue.device. Fit batches and the held-out
batches that measure before/after are random windows of TRAIN tokens (never val) from two seed streams, read
from the memory-mapped shards (the train split is never loaded whole). Every number is
measured on what the written artifact decodes to; over the cap, or broken (a fit that diverged to NaN
included), nothing is written. The artifact and the teacher must match the sha256 their stages recorded.
"""
import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from stages import lqer, pack, quantize, rowquant
from stages.io import verify_recorded, write_bytes, write_json
from stages.model import GPT, GPTConfig, is_control_tensor, load_checkpoint, non_finite
from stages.devices import pick_device


def check_config(cfg: dict) -> None:
    if not (cfg["lcq"]["enabled"] or cfg["calibrate"]["enabled"]):
        raise ValueError("rescue: neither rescue.lcq nor rescue.calibrate is enabled; the stage must not run")


def train_batches(manifest: Path, data: dict, seed: int) -> tuple[list, list]:
    """Fit and held-out batches: random windows of TRAIN tokens (never val), from two seed streams."""
    shards = quantize.train_shards(manifest, data["seq_len"], "rescue.data.seq_len")

    def draw(count, stream):
        return quantize.window_batches(shards, np.random.default_rng([seed, 0x5E5C, stream]), count,
                                       data["batch_seqs"], data["seq_len"])
    return draw(data["batches"], 0), draw(data["holdout_batches"], 1)


def editable(t: dict) -> dict:
    """A writable copy of a decoded entry, codes one int8 each (`serialize` packs them again if asked)."""
    t = {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in t.items()}
    if t["kind"] == "rows" and t["container"] == "packed":
        t.update({f: pack.codes(t, f).numpy() for f in pack.CODE_FIELDS if f in t}, container="bytes")
    return t


def decoded_model(entries: list[dict], model_config: dict, device: torch.device) -> GPT:
    """The model the entries decode to, on `device`, frozen."""
    model = GPT(GPTConfig.from_dict(model_config))
    model.load_state_dict(pack.state_dict_from_tensors(entries))
    return model.to(device).eval().requires_grad_(False)


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher ‖ student) in nats per position, of the softmaxes at `temperature`."""
    t = F.log_softmax(teacher_logits / temperature, -1)
    s = F.log_softmax(student_logits / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def distill(student, teacher, params, batches, steps: int, lr: float, temperature: float,
            device: torch.device) -> dict:
    """Adam on `params` only, cycling over the batches (moved to `device`, the models' device); the KL of the
    first and last steps."""
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        x = batches[step % len(batches)][:, :-1].to(device)
        with torch.no_grad():
            target = teacher.forward_logits(x)
        loss = kl_divergence(target, student.forward_logits(x), temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return {"steps": steps, "first_kl": losses[0] if losses else None, "last_kl": losses[-1] if losses else None}


def check_finite(tensors: dict, key: str, fit: dict) -> None:
    """A fit that diverged (NaN or inf in what it trained) is an error, not a rescued artifact."""
    if found := non_finite(tensors):
        what, count = found
        raise quantize.QuantizationError(f"{key}: {what} has {count} non-finite values after distillation (KL "
                                         f"{fit['first_kl']:.4g} -> {fit['last_kl']:.4g}): the fit diverged; lower "
                                         f"{key}.lr")


class LowRankDelta(nn.Module):
    """Parametrization W -> W + B·A on `device`: A (rank × in) small and random, B (out × rank) zero. A is drawn
    on the CPU, from `gen`, so that every device starts from the same A."""

    def __init__(self, rows: int, cols: int, rank: int, gen: torch.Generator, device: torch.device):
        super().__init__()
        bound = 1 / math.sqrt(cols)
        self.a = nn.Parameter(torch.empty(rank, cols).uniform_(-bound, bound, generator=gen).to(device))
        self.b = nn.Parameter(torch.zeros(rows, rank, device=device))

    def forward(self, w):
        return w + self.b @ self.a


def existing_correction(entry: dict) -> torch.Tensor:
    if "lqer_a" not in entry:
        return torch.zeros(entry["shape"])
    return lqer.correction(pack.codes(entry, "lqer_a"), pack.codes(entry, "lqer_b"), entry)


def store_correction(entry: dict, correction: torch.Tensor, rank: int, bits: int) -> None:
    """The correction as LQER stores it: its SVD's U·S (rows × rank) and Vᵀ (rank × cols), each quantized
    per row at `bits`, which `pack.reconstruct` multiplies back and adds to the weight."""
    u, s, vh = torch.linalg.svd(correction.float(), full_matrices=False)
    qmax = rowquant.qmax_of(bits)
    for field, factor in (("lqer_a", u[:, :rank] * s[:rank]), ("lqer_b", vh[:rank])):
        scale = rowquant.percentile_scale(factor, 100.0, qmax)
        entry[field] = rowquant.round_to_nearest(factor, scale, qmax).numpy()
        entry[f"{field}_scale"] = scale.numpy()
    for key in ("lqer_form", "lqer_group", "lqer_a_bits", "lqer_b_bits"):  # an asymmetric LQER's, now replaced
        entry.pop(key, None)
    entry.update(lqer_rank=rank, lqer_bits=bits)


def lcq(entries, model_config, teacher, batches, cfg: dict, seed: int, device: torch.device) -> dict:
    """Distill a LoRA on the targeted rows entries (on `device`, the teacher's), then fold it into their LQER
    factors. An existing LQER correction is frozen during the fit; afterwards old + new is re-factored at rank
    old + new and the factors re-quantized at factor_bits: lqer_a's per-row scale spans old and new columns, so
    the old codes could not be kept verbatim anyway."""
    targets = [e for e in entries if e["kind"] == "rows" and any(s in e["name"] for s in cfg["targets"])]
    if not targets:
        raise ValueError(f"rescue.lcq.targets {cfg['targets']} match no row-quantized tensor")
    student = decoded_model(entries, model_config, device)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for e in targets:
        module_name = e["name"].removesuffix(".weight")
        deltas[e["name"]] = LowRankDelta(*e["shape"], cfg["rank"], gen, device)
        parametrize.register_parametrization(student.get_submodule(module_name), "weight", deltas[e["name"]])
    params = [p for d in deltas.values() for p in d.parameters()]
    fit = distill(student, teacher, params, batches, cfg["steps"], cfg["lr"], cfg["temperature"], device)
    check_finite({f"the LoRA of {name}": torch.cat([d.a.flatten(), d.b.flatten()]) for name, d in deltas.items()},
                 "rescue.lcq", fit)
    trained = []
    for e in targets:
        d = deltas[e["name"]]
        old_rank = e.get("lqer_rank", 0)
        rank = min(old_rank + cfg["rank"], *e["shape"])
        store_correction(e, existing_correction(e) + (d.b @ d.a).detach().cpu(), rank, cfg["factor_bits"])
        trained.append({"name": e["name"], "lora_rank": cfg["rank"], "prior_lqer_rank": old_rank,
                        "lqer_rank": rank, "lqer_bits": cfg["factor_bits"]})
    return {"tensors": trained, "lora_params": sum(p.numel() for p in params), **fit}


def calibrate(entries, model_config, teacher, batches, cfg: dict, device: torch.device) -> dict:
    """Refit the float control tensors by KL at temperature 1 (on `device`, the teacher's), all else frozen;
    written back in their dtype."""
    names = [e["name"] for e in entries if e["kind"] == "float" and is_control_tensor(e["name"])]
    student = decoded_model(entries, model_config, device)
    params = dict(student.named_parameters())
    fit = distill(student, teacher, [params[n].requires_grad_(True) for n in names], batches,
                  cfg["iterations"], cfg["lr"], 1.0, device)
    check_finite({f"the refitted {n}": params[n] for n in names}, "rescue.calibrate", fit)
    for e in entries:
        if e["name"] in names:
            e["data"] = params[e["name"]].detach().cpu().numpy().astype(e["data"].dtype)
    return {"tensors": names, **fit}


@torch.no_grad()
def holdout_metrics(model: GPT, teacher: GPT, batches, device: torch.device) -> dict:
    """Mean KL to the teacher and CE loss (nats per token) on the held-out train batches, on `device` (the
    models')."""
    kl, loss = [], []
    for batch in batches:
        x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
        logits = model.forward_logits(x)
        kl.append(float(kl_divergence(teacher.forward_logits(x), logits)))
        loss.append(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())))
    return {"kl": float(np.mean(kl)), "loss": float(np.mean(loss))}


def run(cfg: dict, artifact: Path, quantize_summary: Path, teacher_path: Path, teacher_summary: Path,
        manifest: Path, seed: int, out: Path, summary_path: Path) -> dict:
    start = time.time()
    check_config(cfg)
    device = pick_device(cfg["device"], "rescue.device")
    qsum = verify_recorded(artifact, quantize_summary, "artifact_sha256")
    verify_recorded(teacher_path, teacher_summary, "model_sha256")
    qcfg = qsum["config"]
    blob_before = Path(artifact).read_bytes()
    header, stored = pack.unpack_tensors(pack.decompress(blob_before, source=artifact))
    entries, model_config = [editable(t) for t in stored], header["model_config"]
    teacher = load_checkpoint(teacher_path)
    teacher_weights = teacher.state_dict()  # on the CPU, as the decoded state they are compared with
    teacher = teacher.to(device).requires_grad_(False)
    fit_batches, holdout = train_batches(manifest, cfg["data"], seed)
    before = holdout_metrics(decoded_model(entries, model_config, device), teacher, holdout, device)

    trained = {}
    if cfg["lcq"]["enabled"]:
        trained["lcq"] = lcq(entries, model_config, teacher, fit_batches, cfg["lcq"], seed, device)
    if cfg["calibrate"]["enabled"]:
        trained["calibrate"] = calibrate(entries, model_config, teacher, fit_batches, cfg["calibrate"], device)

    blob, sizes = quantize.serialize(entries, model_config, qcfg)
    _, decoded = pack.unpack_tensors(pack.decompress(blob))
    state = pack.state_dict_from_tensors(decoded)
    reports = [{"name": n, "rel_error": quantize.relative_error(w, state[n])} for n, w in teacher_weights.items()]
    guard = quantize.check_quantized_model(state, model_config, holdout[0], qcfg, reports, f"rescue ({out})")
    after = holdout_metrics(decoded_model(decoded, model_config, device), teacher, holdout, device)
    summary = {"config": cfg, "artifact": str(artifact), "artifact_sha256": hashlib.sha256(blob).hexdigest(),
               "teacher": str(teacher_path), "seed": seed, "device": str(device),
               "trained": trained, "holdout_tokens": sum(b[:, 1:].numel() for b in holdout),
               "kl_before": before["kl"], "kl_after": after["kl"], "loss_before": before["loss"],
               "loss_after": after["loss"], "teacher_loss": holdout_metrics(teacher, teacher, holdout, device)["loss"],
               "model_bytes_before": len(blob_before), "model_bytes": len(blob),
               "lora_bytes": len(blob) - len(blob_before), "compressed_sizes": sizes, "cap_bytes": qsum["cap_bytes"],
               **guard, "max_rel_error": quantize.worst_tensor(reports)["rel_error"],
               "seconds": round(time.time() - start, 3)}
    if len(blob) > qsum["cap_bytes"]:
        raise quantize.QuantizationError(
            f"rescue: the rescued model alone is {len(blob):,} bytes, over quantize.cap_bytes = "
            f"{qsum['cap_bytes']:,} by {len(blob) - qsum['cap_bytes']:,}; the rescue added "
            f"{len(blob) - len(blob_before):,} bytes")
    write_bytes(out, blob)
    write_json(summary_path, summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the rescue section, as JSON")
    parser.add_argument("--artifact", required=True, type=Path, help="the quantize stage's artifact.bin")
    parser.add_argument("--quantize-summary", required=True, type=Path,
                        help="its summary.json, whose artifact_sha256 the artifact must match")
    parser.add_argument("--teacher", required=True, type=Path, help="the prequant checkpoint model.pt")
    parser.add_argument("--teacher-summary", required=True, type=Path,
                        help="the train summary.json, whose model_sha256 the teacher must match")
    parser.add_argument("--manifest", required=True, type=Path, help="tokenize manifest (train shards only)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args(argv)
    s = run(json.loads(args.config), args.artifact, args.quantize_summary, args.teacher, args.teacher_summary,
            args.manifest, args.seed, args.out, args.summary)
    print(json.dumps({k: s[k] for k in ("kl_before", "kl_after", "loss_before", "loss_after", "model_bytes",
                                        "lora_bytes", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
