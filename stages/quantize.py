"""quantize: checkpoint -> artifact.bin, the compressed model whose bytes the challenge's cap counts.

Large 2-D matrices are quantized per row, by round-to-nearest or GPTQ, at the bits of their group
(the embedding, which is also the tied head, may get more bits than the block matrices); small
tensors stay in floating point. Row scales come from a percentile clip or SDClip (k·std(row)),
optionally refined by a search that minimises the Hessian-weighted error. Calibration uses training
tokens (random windows read from the memory-mapped shards: the train split is never loaded whole) or text
the model generates itself, never val. GPTQ's Hessians (one XᵀX per distinct layer input) and the mixed_rows
sensitivities are collected on quantize.device; the quantization itself runs on the CPU. Counted bytes =
counted code + the compressed artifact, summed downstream where the arm's exported train_gpt.py exists
(stages/codesize.artifact_size); a size target prunes to leave room for that code. If the model alone is
over the cap, or if the quantized model is no better than uniform on a calibration batch, the stage fails
and writes nothing. So does a checkpoint that is not the one its
train summary records (model_sha256), or whose weights are NaN/inf or beyond what the fp16 row scales can
hold."""
import argparse
import hashlib
import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stages import awq, codesize, gptq, lqer, pack, rowquant, storage
from stages.io import verify_recorded, write_bytes, write_json
from stages.model import GPT, GPTConfig, is_control_tensor, load_checkpoint, non_finite
from stages.devices import pick_device
from stages.shards import ShardSet, manifest_shards


class QuantizationError(RuntimeError):
    """The quantized model is broken or does not fit; nothing is written."""


def tensor_group(name: str) -> str:
    if name in ("tok_emb.weight", "lm_head.weight"):
        return "embed"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "other"


def group_bits(name: str, cfg: dict) -> int:
    return cfg["embed_bits"] if tensor_group(name) == "embed" and cfg["embed_bits"] else cfg["bits"]


def is_quantized(w: torch.Tensor, cfg: dict) -> bool:
    return w.ndim == 2 and w.is_floating_point() and w.numel() > cfg["keep_float_max_numel"]


def row_scale(name: str, w: torch.Tensor, qmax: int, cfg: dict, hessian) -> torch.Tensor:
    if cfg["clip"] == "sdclip":
        scale = rowquant.sdclip_scale(w, cfg["clip_sigmas"][tensor_group(name)], qmax)
    else:
        scale = rowquant.percentile_scale(w, cfg["clip_percentile"], qmax)
    if cfg["clip_search"] and hessian is not None:
        scale = rowquant.searched_scale(w, torch.diag(hessian), scale, qmax)
    return scale


def stored_form(name: str, w: torch.Tensor, cfg: dict, sensitivity) -> tuple[dict, torch.Tensor] | None:
    """A block matrix in one of the seed PRs' storage forms (round-to-nearest codes), or None for dense."""
    form = cfg["storage"]["form"]
    if form == "dense" or tensor_group(name) == "embed":
        return None
    bits = group_bits(name, cfg)
    scale = row_scale(name, w, rowquant.qmax_of(bits), cfg, None)
    if form == "sparse24":
        return storage.encode_sparse24(w, bits, scale)
    if form == "codebook":
        return storage.encode_codebook(w, bits, scale)
    if form == "freeze_dry":
        fd = cfg["storage"]["freeze_dry"]
        return storage.encode_freeze_dry(w, bits, scale, fd["tau"], fd["min_fraction"])
    mixed = cfg["storage"]["mixed_rows"]
    return storage.encode_mixed_rows(w, sensitivity, bits, mixed["high_bits"], mixed["high_fraction"],
                                     lambda rows, b: row_scale(name, rows, rowquant.qmax_of(b), cfg, None))


def awq_high(name: str, w: torch.Tensor, cfg: dict, hessian, starts) -> tuple | None:
    """AWQ-lite's (column mask, row scale, qmax) for the protected column groups at `starts` (None: none)."""
    if not starts:
        return None
    qmax = rowquant.qmax_of(cfg["awq"]["bits"])
    return awq.column_mask(starts, cfg["awq"]["group_size"], w.shape[1]), row_scale(name, w, qmax, cfg, hessian), qmax


def split_awq_codes(stored: dict, q: torch.Tensor, high: tuple, starts, cfg: dict) -> None:
    """The protected columns' codes into their own field, at their own width; zeros in their place in `data`."""
    columns = awq.protected_columns(starts, cfg["awq"]["group_size"])
    stored.update(awq_bits=cfg["awq"]["bits"], awq_group=cfg["awq"]["group_size"], awq_starts=list(starts),
                  awq_scale=high[1].numpy(), awq_data=q[:, columns].numpy())
    stored["data"][:, columns.numpy()] = 0


def quantize_matrix(name: str, w: torch.Tensor, cfg: dict, hessian, sensitivity=None,
                    awq_starts=None) -> tuple[dict, torch.Tensor]:
    special = stored_form(name, w, cfg, sensitivity)
    if special is not None:
        entry, w_hat = special
        return {"name": name, **entry}, w_hat
    bits = group_bits(name, cfg)
    qmax = rowquant.qmax_of(bits)
    scale = row_scale(name, w, qmax, cfg, hessian)
    high = awq_high(name, w, cfg, hessian, awq_starts)
    method = cfg["method"] if hessian is not None else "rtn"  # an untied embedding has no input Hessian
    if method == "gptq":
        g = cfg["gptq"]
        q = gptq.gptq_quantize(w, hessian, scale, qmax, g["block_size"], g["damp"], g["act_order"], high)
    else:
        q = rowquant.round_to_nearest(w, scale, qmax)
        if high is not None:
            q[:, high[0]] = rowquant.round_to_nearest(w[:, high[0]], high[1], high[2])
    stored = {"name": name, "kind": "rows", "shape": list(w.shape), "bits": bits, "method": method,
              "scale": scale.numpy(), "data": q.numpy().copy(), "container": "bytes"}
    if high is not None:
        split_awq_codes(stored, q, high, awq_starts, cfg)
    return stored, pack.reconstruct(stored)


def is_gate(name: str, w: torch.Tensor) -> bool:
    """The attention output gate's weights, in the size range the records route to int8 rows."""
    return name.endswith(".attn.head_gate.weight") and w.ndim == 2 and 32 <= w.numel() <= 8192


def gate_rows(name: str, w: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The records' int8 gate rows (GATED_ATTN_QUANT_GATE): codes in [-127, 127], scale = |row|max / 127."""
    scale = rowquant.percentile_scale(w, 100.0, 127)
    q = rowquant.round_to_nearest(w, scale, 127)
    stored = {"name": name, "kind": "rows", "shape": list(w.shape), "bits": 8, "method": "gate_int8",
              "scale": scale.numpy(), "data": q.numpy(), "container": "bytes"}
    return stored, rowquant.dequantize_rows(q, scale)


def quantize_tensor(name: str, w: torch.Tensor, cfg: dict, hessian=None, sensitivity=None, awq_starts=None):
    """One tensor's stored form and its reconstruction."""
    w = w.detach().float().cpu()
    if cfg["gate_int8"] and is_gate(name, w):
        return gate_rows(name, w)
    if is_quantized(w, cfg):
        return quantize_matrix(name, w, cfg, hessian, sensitivity, awq_starts)
    kept = w.to(torch.float32 if is_control_tensor(name) and not cfg["control_fp16"] else torch.float16)
    return {"name": name, "kind": "float", "shape": list(w.shape), "data": kept.numpy()}, kept.float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """‖w − ŵ‖ / ‖w‖, NaN when either holds a NaN or inf (a NaN norm is not 0), 0 for an all-zero w."""
    norm = w.float().norm()
    return 0.0 if norm == 0 else float((w.float() - w_hat).norm() / norm)


def worst_tensor(reports: list[dict]) -> dict:
    """The report of the largest relative error, a NaN one above all (max() compares NaN as never larger)."""
    return max(reports, key=lambda r: math.inf if math.isnan(r["rel_error"]) else r["rel_error"])


def check_finite_weights(state: dict, checkpoint) -> None:
    if found := non_finite(state):
        name, count = found
        raise QuantizationError(f"{checkpoint}: {name} has {count} non-finite values (NaN or inf) of "
                                f"{state[name].numel():,}: the training run diverged; nothing to quantize")


def check_storable(name: str, w: torch.Tensor, entry: dict, w_hat: torch.Tensor, source) -> None:
    """Refuse weights the stored form cannot hold. Row scales are fp16: a scale above 65504 overflows to inf, and
    a row so small that its scale would fall below fp16's smallest normal gets that normal instead, which can
    round the whole non-zero row to zero codes. Floats kept in fp16 overflow above 65504 too."""
    w = w.float()
    if "scale" in entry and w.ndim == 2:
        scale, peak = torch.from_numpy(entry["scale"].astype(np.float32)), w.abs().amax(dim=1)
        overflow = ~torch.isfinite(scale)
        underflow = (peak > 0) & (scale <= rowquant.FP16_TINY) & (w_hat.abs().amax(dim=1) == 0)
        if overflow.any():
            row = int(overflow.nonzero()[0])
            raise QuantizationError(f"{source}: {name} row {row}: |w| reaches {float(peak[row]):.4g}; its row scale "
                                    f"overflows the fp16 that row scales are stored in (largest "
                                    f"{rowquant.FP16_MAX:.0f})")
        if underflow.any():
            row = int(underflow.nonzero()[0])
            raise QuantizationError(f"{source}: {name} row {row}: |w| reaches only {float(peak[row]):.3g}; its row "
                                    f"scale underflows the fp16 that row scales are stored in (smallest normal "
                                    f"{rowquant.FP16_TINY:.3g}), so the non-zero row would be stored as zeros")
    if not torch.isfinite(w_hat).all():
        raise QuantizationError(f"{source}: {name}: |w| reaches {float(w.abs().max()):.4g}, which its stored form "
                                f"({entry['kind']}, fp16) cannot hold: fp16 overflows above {rowquant.FP16_MAX:.0f}")


def tensor_report(name, w, stored, w_hat, cfg) -> dict:
    nbytes = pack.stored_bytes(pack.with_packed_codes(stored) if cfg["code_container"] == "packed" else stored)
    bits = stored["bits"] if "bits" in stored else float(stored["row_bits"].mean()) if "row_bits" in stored \
        else 8 * stored["data"].itemsize
    return {"name": name, "shape": list(w.shape), "numel": w.numel(), "kind": stored["kind"],
            "method": stored.get("method"),
            "group": tensor_group(name), "bits": bits, "rel_error": relative_error(w, w_hat),
            "stored_bytes": nbytes, "bits_per_weight": 8 * nbytes / w.numel()}


@contextmanager
def moved_to(model: GPT, device: torch.device):
    """The model on `device` inside the block, and back where it was after it (its weights are quantized there)."""
    home = next(model.parameters()).device
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def row_sensitivities(model: GPT, batches: list[torch.Tensor], device: torch.device) -> dict:
    """Per-row gradient sensitivity Σ grad² · w² of every 2-D weight over the calibration batches, computed on
    `device` (where the model must be), returned on the CPU."""
    grad_sq = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.ndim == 2}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        batch = batch.to(device)
        model(batch[:, :-1], batch[:, 1:]).backward()
        for n, p in model.named_parameters():
            if n in grad_sq and p.grad is not None:
                grad_sq[n] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    weights = dict(model.named_parameters())
    return {n: storage.row_sensitivity(weights[n].detach(), g).cpu() for n, g in grad_sq.items()}


def train_shards(manifest: Path, seq_len: int, key: str) -> ShardSet:
    """The train split's shards, memory-mapped: windows are read from them, the split is never loaded whole.
    None holding one `seq_len`-token window is an error naming the manifest and `key` (the seq_len setting)."""
    shards = ShardSet(manifest_shards(manifest, "train"))
    if not shards.window_counts(seq_len).any():
        raise ValueError(f"{manifest}: none of its {len(shards.paths)} train shards (the longest has "
                         f"{int(shards.lengths.max(initial=0)):,} tokens) can fill one {seq_len}-token window ({key})")
    return shards


def window_batches(shards: ShardSet, rng: np.random.Generator, batches: int, batch_seqs: int,
                   seq_len: int) -> list[torch.Tensor]:
    """`batches` int64 batches of `batch_seqs` random `seq_len`-token windows, uniform over the windows that lie
    inside one shard."""
    windows = shards.read(*shards.random_windows(rng, batches * batch_seqs, seq_len), seq_len)
    return list(torch.from_numpy(windows).reshape(batches, batch_seqs, seq_len).unbind(0))


def train_calibration(manifest: Path, cal: dict, seed: int) -> list[torch.Tensor]:
    """Random windows of training tokens (never val), seeded by the run's seed."""
    shards = train_shards(manifest, cal["seq_len"], "quantize.calibration.seq_len")
    return window_batches(shards, np.random.default_rng([seed, 0xCA1]), cal["batches"], cal["batch_seqs"],
                          cal["seq_len"])


@torch.no_grad()
def generated_calibration(model: GPT, cal: dict, seed: int, bos_id: int = 1) -> list[torch.Tensor]:
    """Sequences the model samples itself from BOS at `temperature`: no train or val data at all."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(cal["batches"]):
        seqs = torch.full((cal["batch_seqs"], 1), bos_id, dtype=torch.long)
        for _ in range(cal["seq_len"] - 1):
            logits = model.forward_logits(seqs)[:, -1] / max(cal["temperature"], 1e-6)
            seqs = torch.cat([seqs, torch.multinomial(F.softmax(logits, -1), 1, generator=gen)], dim=1)
        batches.append(seqs)
    return batches


@torch.no_grad()
def batch_loss(model: GPT, batch: torch.Tensor) -> float:
    return float(model(batch[:, :-1], batch[:, 1:]))


def add_lqer(entries: list[dict], weights: dict, cfg: dict) -> list[str]:
    """LQER (stages/lqer.py): a rank-r correction A·B of the quantization error E = W − Ŵ of the top-k
    quantized matrices by ‖E‖ (not the int8 gate rows). Returns the corrected tensors' names."""
    rows = [e for e in entries if e["kind"] == "rows" and e["method"] != "gate_int8"]
    errors = {e["name"]: weights[e["name"]].float() - pack.reconstruct(e) for e in rows}
    top = sorted(rows, key=lambda e: -float(errors[e["name"]].norm()))[:cfg["top_k"]]
    for entry in top:
        entry.update(lqer.correction_fields(errors[entry["name"]], cfg["rank"], cfg["factor_bits"],
                                            cfg["asym_group"]))
    return [e["name"] for e in top]


def serialize(entries: list[dict], model_config: dict, cfg: dict) -> tuple[bytes, dict]:
    """Pack codes at their width when asked, then compress: the artifact's bytes."""
    if cfg["compressor"] == "pergroup" and (cfg["code_container"] != "bytes" or cfg["byte_shuffle"]):
        raise ValueError("quantize.compressor: pergroup groups the one-byte codes of the payload itself: it needs "
                         f"quantize.code_container: bytes (got {cfg['code_container']}) and quantize.byte_shuffle: "
                         f"false (got {cfg['byte_shuffle']})")
    packed = [pack.with_packed_codes(e) if cfg["code_container"] == "packed" else e for e in entries]
    payload = pack.pack_tensors(packed, model_config, {"method": cfg["method"], "bits": cfg["bits"]})
    if cfg["compressor"] == "auto":
        return pack.compress_smallest(payload, cfg["byte_shuffle"])
    blob = pack.compress(payload, cfg["compressor"], cfg["byte_shuffle"])
    return blob, {cfg["compressor"]: len(blob)}


def prune_to_target(entries, hessians, model_config, cfg, budget: int) -> dict:
    """Zero the ±1 codes of least Hessian-weighted importance (scale² · H_jj) until the compressed
    model fits `budget` bytes, by binary search on their count, as the records do."""
    candidates = []
    for i, e in enumerate(entries):
        if e["kind"] != "rows":
            continue
        q = torch.from_numpy(e["data"])
        rows, cols = torch.nonzero(q.abs() == 1, as_tuple=True)
        h = hessians.get(e["name"])
        h_diag = torch.diag(h)[cols] if h is not None else torch.ones(len(cols))
        importance = torch.from_numpy(e["scale"]).float()[rows] ** 2 * h_diag
        candidates.append((importance, torch.full_like(rows, i), rows, cols))
    importance, which, rows, cols = (torch.cat(t) for t in zip(*candidates))
    order = torch.argsort(importance)
    original = {i: entries[i]["data"] for i in set(which.tolist())}

    def size_with(n):
        for i, data in original.items():
            entries[i]["data"] = data
        pruned = {i: data.copy() for i, data in original.items()}
        for k in order[:n].tolist():
            pruned[int(which[k])][rows[k], cols[k]] = 0
        for i, data in pruned.items():
            entries[i]["data"] = data
        return len(serialize(entries, model_config, cfg)[0])

    lo, hi = 0, len(order)
    if size_with(hi) > budget:
        raise QuantizationError(f"quantize.size_target: even zeroing all {hi:,} ±1 codes leaves the model over "
                                f"{budget:,} bytes")
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if size_with(mid) <= budget else (mid + 1, hi)
    size_with(lo)
    return {"pruned_codes": lo, "candidates": len(order), "quantized_weights": sum(
        e["data"].size for e in entries if e["kind"] == "rows"),
        "importance_given_up": float(importance[order[:lo]].sum())}


def check_quantized_model(state, model_config, batch, cfg, reports, checkpoint) -> dict:
    """Guards: finite weights, per-tensor error bound, and a finite loss clearly better than a uniform predictor
    (each written so that NaN fails it)."""
    if found := non_finite(state):
        raise QuantizationError(f"{checkpoint}: the quantized {found[0]} has {found[1]} non-finite values")
    worst = worst_tensor(reports)
    if not worst["rel_error"] <= cfg["max_rel_error"]:
        raise QuantizationError(f"{checkpoint}: {worst['name']} relative error {worst['rel_error']:.3f} exceeds "
                                f"quantize.max_rel_error = {cfg['max_rel_error']}")
    model = GPT(GPTConfig.from_dict(model_config))
    model.load_state_dict(state)
    loss, uniform = batch_loss(model.eval(), batch), math.log(model_config["vocab_size"])
    if not math.isfinite(loss):
        raise QuantizationError(f"{checkpoint}: quantized model's calibration loss is {loss}")
    if loss > uniform - 0.1:
        raise QuantizationError(f"{checkpoint}: quantized model's calibration loss {loss:.3f} nats is not 0.1 "
                                f"below ln(vocab) = {uniform:.3f} (a uniform guess): the quantizer destroyed the model")
    return {"calibration_loss": loss, "uniform_loss": uniform}


def pruning_code(cfg: dict) -> dict | None:
    """The counted code that pruning to a size target leaves room for (quantize.code_file, the arm's export,
    which the plan gives quantize only then); without a target the code is counted downstream (the artifact's
    size, stages/codesize.py), so that a change to the shipped file does not re-quantize."""
    if not cfg["size_target"]["enabled"]:
        return None
    if not Path(cfg["code_file"]).is_file():
        raise FileNotFoundError(f"quantize.code_file: {cfg['code_file']} is not a file (the arm's exported "
                                "train_gpt.py, which quantize.size_target leaves room for)")
    return codesize.measure(cfg["code_file"], cfg["code_accounting"])


def size_target(cfg: dict, code_bytes: int) -> int | None:
    """The total bytes quantize.size_target prunes to (None when it is off); it must leave room for a model."""
    if not cfg["size_target"]["enabled"]:
        return None
    target = cfg["size_target"]["bytes"] or cfg["cap_bytes"]
    if target <= code_bytes:
        key = "quantize.size_target.bytes" if cfg["size_target"]["bytes"] else "quantize.cap_bytes (the size target)"
        raise QuantizationError(f"{key} = {target:,} leaves no room for the model: the counted code alone is "
                                f"{code_bytes:,} bytes")
    return target


def check_hessians(hessians: dict, source) -> None:
    for name, h in hessians.items():
        if not torch.isfinite(h).all():
            raise QuantizationError(f"{source}: the calibration inputs of {name} are not finite: the model overflows "
                                    "on its calibration data")


def awq_groups(weights: dict, hessians: dict, cfg: dict) -> dict:
    """{name: column starts} of AWQ-lite's protected groups over the dense block matrices below awq.bits
    (none when awq.top_k is 0)."""
    a = cfg["awq"]
    if not a["top_k"] or cfg["storage"]["form"] != "dense":
        return {}
    candidates = {name: (w.detach().float().cpu(), torch.diag(hessians[name])) for name, w in weights.items()
                  if name in hessians and is_quantized(w, cfg) and group_bits(name, cfg) < a["bits"]}
    return awq.select_groups(candidates, a["group_size"], a["top_k"])


def build_artifact(model: GPT, cfg: dict, batches: list[torch.Tensor], code_bytes: int,
                   source="model") -> tuple[bytes, dict]:
    """Quantize a model into artifact bytes; the report is measured on what the artifact decodes to. The
    calibration passes (Hessians, sensitivities) run on quantize.device, the rest on the CPU. Errors name
    `source` (the checkpoint)."""
    target = size_target(cfg, code_bytes)
    device = pick_device(cfg["device"], "quantize.device")
    t0 = time.time()
    needs_hessian = cfg["method"] == "gptq" or cfg["clip_search"]
    with moved_to(model, device):
        hessians = gptq.collect_hessians(model, batches, device) if needs_hessian else {}
        check_hessians(hessians, source)
        hessian_seconds = time.time() - t0
        sensitivity = row_sensitivities(model, batches, device) if cfg["storage"]["form"] == "mixed_rows" else {}
    weights, model_config = model.state_dict(), model.config.to_dict()
    protected = awq_groups(weights, hessians, cfg)
    entries = []
    for name, w in weights.items():
        entry, w_hat = quantize_tensor(name, w, cfg, hessians.get(name), sensitivity.get(name), protected.get(name))
        check_storable(name, w, entry, w_hat, source)
        entries.append(entry)
    lqer_names = add_lqer(entries, weights, cfg["lqer"]) if cfg["lqer"]["rank"] else []
    quantize_seconds = time.time() - t0 - hessian_seconds
    blob, sizes = serialize(entries, model_config, cfg)
    pruning = None
    if target is not None:
        before = len(blob)
        if before + code_bytes > target:
            pruning = prune_to_target(entries, hessians, model_config, cfg, target - code_bytes)
            blob, sizes = serialize(entries, model_config, cfg)
        pruning = {**(pruning or {"pruned_codes": 0}), "target_bytes": target, "model_bytes_before": before}
    _, decoded = pack.unpack_tensors(pack.decompress(blob))
    state = pack.state_dict_from_tensors(decoded)
    reports = [tensor_report(n, w, e, state[n], cfg) for (n, w), e in zip(weights.items(), entries)]
    return blob, {
        "state": state, "tensors": reports, "compressed_sizes": sizes, "model_bytes": len(blob),
        "lqer_tensors": lqer_names, "awq_groups": protected, "size_target": pruning, "max_rel_error": worst_tensor(reports)["rel_error"],
        "bits_per_weight": 8 * len(blob) / sum(r["numel"] for r in reports),
        "quantized_params": sum(r["numel"] for r in reports if r["kind"] != "float"),
        "largest_tensors": sorted(reports, key=lambda r: -r["stored_bytes"])[:10],
        "device": str(device), "hessian_seconds": round(hessian_seconds, 3),
        "quantize_seconds": round(quantize_seconds, 3)}


def run(cfg: dict, checkpoint: Path, checkpoint_summary: Path, manifest: Path, seed: int, out: Path,
        summary_path: Path) -> dict:
    start = time.time()
    verify_recorded(checkpoint, checkpoint_summary, "model_sha256")
    model = load_checkpoint(checkpoint)
    check_finite_weights(model.state_dict(), checkpoint)
    cal = cfg["calibration"]
    batches = (generated_calibration(model, cal, seed) if cal["source"] == "generated"
               else train_calibration(manifest, cal, seed))
    prequant_loss = batch_loss(model, batches[0])
    uniform = math.log(model.config.vocab_size)
    if not prequant_loss < uniform - 0.1:  # then a failing guard below would blame the quantizer
        raise QuantizationError(f"{checkpoint}: the checkpoint itself scores {prequant_loss:.3f} nats on its "
                                f"calibration batch, not 0.1 below ln(vocab) = {uniform:.3f}: it was broken before "
                                "quantization")
    code = pruning_code(cfg)
    blob, info = build_artifact(model, cfg, batches, code["bytes"] if code else 0, source=checkpoint)
    state = info.pop("state")
    guard = check_quantized_model(state, model.config.to_dict(), batches[0], cfg, info["tensors"], checkpoint)
    guard["prequant_calibration_loss"] = prequant_loss
    summary = {"config": cfg, "checkpoint": str(checkpoint), "artifact_sha256": hashlib.sha256(blob).hexdigest(),
               "bits": cfg["bits"], "compressor": cfg["compressor"], "cap_bytes": cfg["cap_bytes"],
               **({"pruned_for_code": code} if code else {}), **guard, **info,
               "seconds": round(time.time() - start, 3)}
    if len(blob) > cfg["cap_bytes"]:
        raise QuantizationError(f"{checkpoint}: the compressed model alone is {len(blob):,} bytes, over "
                                f"quantize.cap_bytes = {cfg['cap_bytes']:,} by {len(blob) - cfg['cap_bytes']:,}")
    write_bytes(out, blob)
    write_json(summary_path, summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the quantize section, as JSON")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--checkpoint-summary", required=True, type=Path,
                        help="the train summary.json, whose model_sha256 the checkpoint must match")
    parser.add_argument("--manifest", required=True, type=Path, help="tokenize manifest (train shards calibrate)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args(argv)
    s = run(json.loads(args.config), args.checkpoint, args.checkpoint_summary, args.manifest, args.seed, args.out,
            args.summary)
    print(json.dumps({k: s[k] for k in ("model_bytes", "max_rel_error", "calibration_loss", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
