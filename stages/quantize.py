"""quantize: checkpoint -> artifact.bin, with the byte count that the challenge's cap applies to.

Large 2-D matrices are quantized per row, by round-to-nearest or GPTQ, at the bits of their group
(the embedding, which is also the tied head, may get more bits than the block matrices); small
tensors stay in floating point. Row scales come from a percentile clip or SDClip (k·std(row)),
optionally refined by a search that minimises the Hessian-weighted error. Calibration uses training
tokens or text the model generates itself, never val. Counted bytes = counted code + the compressed
artifact; over the cap, or if the quantized model is no better than uniform on a calibration batch,
the stage fails and writes nothing.
"""
import argparse
import base64
import json
import math
import sys
import time
from pathlib import Path

import brotli
import numpy as np
import torch
import torch.nn.functional as F

from stages import gptq, pack, rowquant
from stages.io import write_bytes, write_json
from stages.model import GPT, GPTConfig, is_control_tensor
from stages.shards import load_tokens, manifest_shards


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


def quantize_matrix(name: str, w: torch.Tensor, cfg: dict, hessian) -> tuple[dict, torch.Tensor]:
    bits = group_bits(name, cfg)
    qmax = rowquant.qmax_of(bits)
    scale = row_scale(name, w, qmax, cfg, hessian)
    method = cfg["method"] if hessian is not None else "rtn"  # an untied embedding has no input Hessian
    if method == "gptq":
        g = cfg["gptq"]
        q = gptq.gptq_quantize(w, hessian, scale, qmax, g["block_size"], g["damp"], g["act_order"])
    else:
        q = rowquant.round_to_nearest(w, scale, qmax)
    stored = {"name": name, "kind": "rows", "shape": list(w.shape), "bits": bits, "method": method,
              "scale": scale.numpy()}
    if cfg["code_container"] == "packed" and bits < 8:
        stored.update(container="packed", data=pack.pack_codes(q.numpy(), bits))
    else:
        stored.update(container="bytes", data=q.numpy())
    return stored, rowquant.dequantize_rows(q, scale)


def quantize_tensor(name: str, w: torch.Tensor, cfg: dict, hessian=None) -> tuple[dict, torch.Tensor]:
    """One tensor's stored form and its reconstruction."""
    w = w.detach().float().cpu()
    if is_quantized(w, cfg):
        return quantize_matrix(name, w, cfg, hessian)
    kept = w.to(torch.float32 if is_control_tensor(name) else torch.float16)
    return {"name": name, "kind": "float", "shape": list(w.shape), "data": kept.numpy()}, kept.float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    norm = w.float().norm()
    return float((w.float() - w_hat).norm() / norm) if norm > 0 else 0.0


def tensor_report(name, w, stored, w_hat) -> dict:
    bits = stored.get("bits", 8 * stored["data"].itemsize)
    nbytes = stored["data"].nbytes + (stored["scale"].nbytes if "scale" in stored else 0)
    return {"name": name, "shape": list(w.shape), "numel": w.numel(), "kind": stored["kind"],
            "method": stored.get("method"),
            "group": tensor_group(name), "bits": bits, "rel_error": relative_error(w, w_hat),
            "stored_bytes": nbytes, "bits_per_weight": 8 * nbytes / w.numel()}


def train_calibration(manifest: Path, cal: dict, seed: int) -> list[torch.Tensor]:
    """Random windows of training tokens (never val), seeded by the run's seed."""
    tokens = load_tokens(manifest_shards(manifest, "train"))
    if len(tokens) <= cal["seq_len"]:
        raise QuantizationError(f"{manifest}: {len(tokens)} train tokens cannot fill one "
                                f"{cal['seq_len']}-token calibration sequence (quantize.calibration.seq_len)")
    rng = np.random.default_rng([seed, 0xCA1])
    batches = []
    for _ in range(cal["batches"]):
        starts = rng.integers(0, len(tokens) - cal["seq_len"], size=cal["batch_seqs"])
        batches.append(torch.from_numpy(np.stack([tokens[s:s + cal["seq_len"]] for s in starts]).astype(np.int64)))
    return batches


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


def counted_code(paths, accounting: str) -> dict:
    """Bytes of the counted code: raw files, or one minified script wrapped in a brotli+base85
    self-extractor, as the top records count it."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"quantize.counted_code: {missing[0]} is not a file")
    raw = {str(p): Path(p).stat().st_size for p in paths}
    if accounting == "raw":
        return {"files": raw, "raw_bytes": sum(raw.values()), "bytes": sum(raw.values())}
    import python_minifier
    source = "\n".join(python_minifier.minify(Path(p).read_text(), remove_literal_statements=True,
                                              rename_locals=False, hoist_literals=False, remove_asserts=True)
                       for p in paths)
    blob = base64.b85encode(brotli.compress(source.encode(), quality=11)).decode()
    wrapper = f'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("{blob}")))'
    return {"files": raw, "raw_bytes": sum(raw.values()), "minified_bytes": len(source.encode()),
            "bytes": len(wrapper.encode())}


def check_quantized_model(state, model_config, batch, cfg, reports, checkpoint) -> dict:
    """Guards: per-tensor error bound, and loss clearly better than a uniform predictor."""
    worst = max(reports, key=lambda r: r["rel_error"])
    if worst["rel_error"] > cfg["max_rel_error"]:
        raise QuantizationError(f"{checkpoint}: {worst['name']} relative error {worst['rel_error']:.3f} exceeds "
                                f"quantize.max_rel_error = {cfg['max_rel_error']}")
    model = GPT(GPTConfig.from_dict(model_config))
    model.load_state_dict(state)
    loss, uniform = batch_loss(model.eval(), batch), math.log(model_config["vocab_size"])
    if loss > uniform - 0.1:
        raise QuantizationError(f"{checkpoint}: quantized model's calibration loss {loss:.3f} nats is within "
                                f"0.1 of ln(vocab) = {uniform:.3f}: the quantizer destroyed the model")
    return {"calibration_loss": loss, "uniform_loss": uniform}


def run(cfg: dict, checkpoint: Path, manifest: Path, seed: int, out: Path, summary_path: Path) -> dict:
    start = time.time()
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    cal = cfg["calibration"]
    batches = (generated_calibration(model, cal, seed) if cal["source"] == "generated"
               else train_calibration(manifest, cal, seed))
    needs_hessian = cfg["method"] == "gptq" or cfg["clip_search"]
    t0 = time.time()
    hessians = gptq.collect_hessians(model, batches, torch.device("cpu")) if needs_hessian else {}
    hessian_seconds = time.time() - t0
    stored, reports, state = [], [], {}
    for name, w in ckpt["state_dict"].items():
        entry, w_hat = quantize_tensor(name, w, cfg, hessians.get(name))
        stored.append(entry)
        reports.append(tensor_report(name, w, entry, w_hat))
        state[name] = w_hat.reshape(w.shape)
    quantize_seconds = time.time() - t0 - hessian_seconds
    guard = check_quantized_model(state, ckpt["model_config"], batches[0], cfg, reports, checkpoint)
    guard["prequant_calibration_loss"] = batch_loss(model, batches[0])
    payload = pack.pack_tensors(stored, ckpt["model_config"], {"method": cfg["method"], "bits": cfg["bits"]})
    if cfg["compressor"] == "auto":
        blob, sizes = pack.compress_smallest(payload, cfg["byte_shuffle"])
    else:
        blob = pack.compress(payload, cfg["compressor"], cfg["byte_shuffle"])
        sizes = {cfg["compressor"]: len(blob)}
    code = counted_code(cfg["counted_code"], cfg["code_accounting"])
    total = len(blob) + code["bytes"]
    quantized = [r for r in reports if r["kind"] == "rows"]
    summary = {
        "config": cfg, "checkpoint": str(checkpoint), "bits": cfg["bits"], "compressor": cfg["compressor"],
        "compressed_sizes": sizes, "model_bytes": len(blob), "payload_bytes": len(payload),
        "code_bytes": code["bytes"], "code": code, "total_bytes": total, "cap_bytes": cfg["cap_bytes"],
        "headroom_bytes": cfg["cap_bytes"] - total, **guard,
        "max_rel_error": max(r["rel_error"] for r in reports),
        "bits_per_weight": 8 * len(blob) / sum(r["numel"] for r in reports),
        "quantized_params": sum(r["numel"] for r in quantized),
        "largest_tensors": sorted(reports, key=lambda r: -r["stored_bytes"])[:10], "tensors": reports,
        "hessian_seconds": round(hessian_seconds, 3), "quantize_seconds": round(quantize_seconds, 3),
        "seconds": round(time.time() - start, 3),
    }
    if total > cfg["cap_bytes"]:
        raise QuantizationError(f"{checkpoint}: artifact is {total:,} bytes (model {len(blob):,} + code "
                                f"{code['bytes']:,}), over quantize.cap_bytes = {cfg['cap_bytes']:,} "
                                f"by {total - cfg['cap_bytes']:,}")
    write_bytes(out, blob)
    write_json(summary_path, summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the quantize section, as JSON")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path, help="tokenize manifest (train shards calibrate)")
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args(argv)
    s = run(json.loads(args.config), args.checkpoint, args.manifest, args.seed, args.out, args.summary)
    print(json.dumps({k: s[k] for k in ("model_bytes", "code_bytes", "total_bytes", "headroom_bytes",
                                        "max_rel_error", "calibration_loss", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
