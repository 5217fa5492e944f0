"""Quantizer options side by side: bytes, bits/weight, relative error, val_bpb gap, seconds.

    .venv/bin/python bench/quantize.py           # both shapes, into bench/results/quantize.md
    .venv/bin/python bench/quantize.py demo      # the demo's trained seed-1337 model (run `make demo` first)
    .venv/bin/python bench/quantize.py record    # the top record's shapes, random weights, Zipfian calibration
"""
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stages import bpb, evaluate, quantize  # noqa: E402
from stages import config as caddie  # noqa: E402
from stages.io import write_text  # noqa: E402
from stages.model import GPT, GPTConfig, load_checkpoint  # noqa: E402
from stages.shards import load_tokens, manifest_shards  # noqa: E402

GPTQ6 = {"method": "gptq", "bits": 6}
SD = {"clip": "sdclip"}
VARIANTS = {
    "rtn int8 (baseline)": {},
    "rtn int6": {"bits": 6},
    "gptq int6": GPTQ6,
    "gptq int6, clip search": {**GPTQ6, "clip_search": True},
    "rtn int6 sdclip": {"bits": 6, **SD},
    "gptq int6 sdclip": {**GPTQ6, **SD},
    "gptq int6 sdclip, embed int8": {**GPTQ6, **SD, "embed_bits": 8},
    "gptq int6, embed int8": {**GPTQ6, "embed_bits": 8},
    "gptq int6, embed int8, lqer r4 top3": {**GPTQ6, "embed_bits": 8,
                                            "lqer": {"rank": 4, "top_k": 3, "factor_bits": 4, "asym_group": 0}},
    "gptq int6, byte containers": {**GPTQ6, "code_container": "bytes"},
    "gptq int6, byte shuffle": {**GPTQ6, "byte_shuffle": True},
    "gptq int6, zstd": {**GPTQ6, "compressor": "zstd"},
    "gptq int6, brotli": {**GPTQ6, "compressor": "brotli"},
    "gptq int6, lzma": {**GPTQ6, "compressor": "lzma"},
    "rtn int6, 2:4 sparsity": {"bits": 6, "storage": {"form": "sparse24"}},
    "rtn int4, Lloyd-Max codebook": {"bits": 4, "storage": {"form": "codebook"}},
    "rtn int4": {"bits": 4},
    "rtn int6, freeze-dry tau 0.3": {"bits": 6, "storage": {"form": "freeze_dry",
                                                              "freeze_dry": {"tau": 0.3, "min_fraction": 0.0}}},
    "rtn int6 + FTLE rows int8 (10%)": {"bits": 6, "storage": {"form": "mixed_rows"}},
    "gptq int6 sdclip, size target -3%": {**GPTQ6, **SD, "size_target": {"enabled": True, "bytes": None}},
    "gptq int5": {"method": "gptq", "bits": 5},
    "gptq int4": {"method": "gptq", "bits": 4},
}
RECORD_VARIANTS = ["rtn int6", "gptq int6", "gptq int6 sdclip", "gptq int6 sdclip, embed int8",
                   "gptq int6, byte containers", "gptq int6, zstd", "gptq int6, lzma"]


def config_with(base: dict, overrides: dict) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    return cfg


def demo_setup():
    keys = caddie.plan(yaml.safe_load((ROOT / "config.yaml").read_text()))["arms"]["baseline"]
    ckpt_path = ROOT / "artifacts" / "train" / keys["train"] / "seed1337" / "model.pt"
    manifest = ROOT / "artifacts" / "tokenize" / keys["tokenize"] / "manifest.json"
    model = load_checkpoint(ckpt_path)
    cal = yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["quantize"]["calibration"]
    sp = spm.SentencePieceProcessor(model_file=str(manifest.parent / "tokenizer.model"))
    val = load_tokens(manifest_shards(manifest, "val"))
    tables = bpb.build_byte_tables(sp)

    eval_cfg = {**yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["evaluate"],
                "seq_len": 128, "stride": 32, "batch_seqs": 64}

    def val_bpb(m):
        s = evaluate.score(m.eval(), val, tables, eval_cfg, "sliding", torch.device("cpu"))
        return bpb.bits_per_byte(s["loss_sum"], s["bytes"])

    return model.eval(), quantize.train_calibration(manifest, cal, 1337), val_bpb, f"{ckpt_path}"


def record_setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8192, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.05 if name == "tok_emb.weight" else p.size(1) ** -0.5)
    ranks = np.arange(1, 8193)
    zipf = (1 / ranks ** 1.1) / (1 / ranks ** 1.1).sum()
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.choice(8192, size=(8, 512), p=zipf)) for _ in range(4)]
    return model.eval(), batches, None, "random weights (11L, d=512, MLP 4x, vocab 8192), Zipf(1.1) tokens"


def shape_section(shape: str) -> list[str]:
    model, batches, val_bpb, source = demo_setup() if shape == "demo" else record_setup()
    base = yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["quantize"]
    if shape == "record":
        base["calibration"].update(batches=4, batch_seqs=8, seq_len=512)
        base["keep_float_max_numel"] = 65536
    names = VARIANTS if shape == "demo" else RECORD_VARIANTS
    pre = val_bpb(model) if val_bpb else None
    params = sum(p.numel() for p in model.parameters())
    lines = [f"## {shape}", "", f"{source}; {params:,} parameters.", ""]
    if pre is not None:
        lines += [f"Prequant val_bpb (sliding, seq 128, stride 32): {pre:.5f}. The gap is quant − prequant.", ""]
    lines += ["| option | model bytes | bits/weight | max rel. error | mean rel. error (quantized) | "
              "val_bpb gap | Hessian s | quantize s | total s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    sizes = {}
    for name in names:
        cfg = config_with(base, VARIANTS[name])
        if cfg["size_target"]["enabled"]:  # 3% below the same quantizer without a target
            cfg["size_target"]["bytes"] = int(0.97 * sizes["gptq int6 sdclip"])
        start = time.time()
        blob, info = quantize.build_artifact(model, cfg, batches, 0)
        sizes[name] = len(blob)
        seconds = time.time() - start
        errors = [t["rel_error"] for t in info["tensors"] if t["kind"] != "float"]
        gap = "n/a"
        if val_bpb:
            quantized = GPT(model.config)
            quantized.load_state_dict(info["state"])
            gap = f"{val_bpb(quantized) - pre:+.5f}"
        lines.append(f"| {name} | {len(blob):,} | {info['bits_per_weight']:.3f} | {info['max_rel_error']:.4f} | "
                     f"{np.mean(errors):.4f} | {gap} | {info['hessian_seconds']:.1f} | "
                     f"{info['quantize_seconds']:.1f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    return lines + [""]


def main(*shapes):
    shapes = shapes or ("demo", "record")
    lines = ["# Quantizer options side by side", "",
             f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {datetime.date.today()}. "
             f"Reproduce: `.venv/bin/python bench/quantize.py {' '.join(shapes)}` (after `make demo`). "
             "bits/weight = 8 × compressed model bytes / parameters (all tensors).", ""]
    for shape in shapes:
        lines += shape_section(shape)
    name = "quantize.md" if len(shapes) == 2 else f"quantize_{shapes[0]}.md"
    write_text(ROOT / "bench" / "results" / name, "\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
