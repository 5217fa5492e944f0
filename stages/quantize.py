"""quantize: checkpoint -> artifact.bin, with the byte count that the challenge's cap applies to.

Large 2-D matrices are quantized per row (round-to-nearest at `bits`, clipped at a per-row
percentile of |w|); small tensors stay in floating point. Counted bytes = counted code (the files
named in config, raw) + the compressed artifact; over the cap the stage fails and writes nothing.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stages import pack
from stages.io import write_bytes, write_json
from stages.model import is_control_tensor


class OverCapError(RuntimeError):
    pass


def quantize_tensor(name: str, w: torch.Tensor, cfg: dict) -> tuple[dict, torch.Tensor]:
    """One tensor's stored form and its reconstruction."""
    w = w.detach().float().cpu()
    if w.ndim == 2 and w.numel() > cfg["keep_float_max_numel"]:
        q, scale = pack.quantize_rows(w, cfg["bits"], cfg["clip_percentile"])
        stored = {"name": name, "kind": "rows", "shape": list(w.shape), "bits": cfg["bits"],
                  "data": q.numpy(), "scale": scale.numpy()}
        return stored, pack.dequantize_rows(q, scale)
    dtype = torch.float32 if is_control_tensor(name) else torch.float16
    kept = w.to(dtype)
    return {"name": name, "kind": "float", "shape": list(w.shape), "data": kept.numpy()}, kept.float()


def relative_error(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    norm = w.float().norm()
    return float((w.float() - w_hat).norm() / norm) if norm > 0 else 0.0


def tensor_report(name, w, stored, w_hat) -> dict:
    bits = stored.get("bits", 8 * stored["data"].itemsize)
    return {"name": name, "shape": list(w.shape), "numel": w.numel(), "kind": stored["kind"],
            "bits": bits, "rel_error": relative_error(w, w_hat),
            "stored_bytes": stored["data"].nbytes + (stored["scale"].nbytes if "scale" in stored else 0)}


def counted_code_bytes(paths) -> dict:
    sizes = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"quantize.counted_code: {p} is not a file")
        sizes[str(p)] = path.stat().st_size
    return sizes


def run(cfg: dict, checkpoint: Path, out: Path, summary_path: Path) -> dict:
    start = time.time()
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    stored, report = [], []
    for name, w in ckpt["state_dict"].items():
        entry, w_hat = quantize_tensor(name, w, cfg)
        stored.append(entry)
        report.append(tensor_report(name, w, entry, w_hat))
    payload = pack.pack_tensors(stored, ckpt["model_config"], {"method": cfg["method"], "bits": cfg["bits"]})
    blob = pack.compress(payload, cfg["compressor"])
    code = counted_code_bytes(cfg["counted_code"])
    total = len(blob) + sum(code.values())
    summary = {
        "config": cfg, "checkpoint": str(checkpoint), "bits": cfg["bits"], "compressor": cfg["compressor"],
        "model_bytes": len(blob), "payload_bytes": len(payload), "code_bytes": sum(code.values()),
        "code_files": code, "total_bytes": total, "cap_bytes": cfg["cap_bytes"],
        "headroom_bytes": cfg["cap_bytes"] - total,
        "max_rel_error": max(r["rel_error"] for r in report),
        "largest_tensors": sorted(report, key=lambda r: -r["stored_bytes"])[:10],
        "tensors": report, "seconds": round(time.time() - start, 3),
    }
    if total > cfg["cap_bytes"]:
        raise OverCapError(f"{checkpoint}: artifact is {total:,} bytes (model {len(blob):,} + code "
                           f"{sum(code.values()):,}), over quantize.cap_bytes = {cfg['cap_bytes']:,} "
                           f"by {total - cfg['cap_bytes']:,}")
    write_bytes(out, blob)
    write_json(summary_path, summary)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the quantize section, as JSON")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--summary", required=True, type=Path)
    args = parser.parse_args(argv)
    s = run(json.loads(args.config), args.checkpoint, args.out, args.summary)
    print(json.dumps({k: s[k] for k in ("model_bytes", "code_bytes", "total_bytes", "headroom_bytes",
                                        "max_rel_error", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
