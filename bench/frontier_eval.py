"""The record #2135's eval code and caddie's on the same weights and val tokens, on CPU: the quantized eval
(eval_val) and phased TTT with the token n-gram tilt (eval_val_ttt_phased), val_bpb side by side.

    .venv/bin/python bench/frontier_eval.py            # -> bench/results/frontier_eval.md

Needs peers/record-2135/ (train_gpt.py, online_ngram_tilt.py, online_ngram_state.c: see bench/frontier_parity.py
for where they come from; git-ignored, never committed), a C compiler (the record builds its n-gram state with
it) and ../shared/fixtures/tokenizers/fineweb_1024_bpe.model (the byte tables and the tilt's tokenizer).

The record's train_gpt.py runs from a CPU copy written by bench/frontier_parity.py's patch() (flash-attn 3 -> SDPA,
Triton stubbed) plus the edits in EVAL_SUBSTITUTIONS, each asserted to match exactly once, and the run-time edits
listed in RUNTIME_EDITS. The model is the record's GPT at frontier_parity's reduced shape (vocab 1024, width 256,
its 11 layers, loop and parallel lanes), moved off its init by seeded noise, its weights copied into caddie's GPT
(frontier_parity.caddie_state), after the record's own GPTQ path (collect_hessians, gptq_mixed_quantize,
dequantize_mixed) has quantized them: both evals score the same dequantized weights. The val tokens: Python
standard library sources (one document per file, BOS first) through the 1024-token FineWeb SentencePiece model.

Each comparison runs twice, each in a process of its own (the record registers torch.library ops at import): in
fp32, the precision caddie evaluates in on CPU, and in float64 (the same quantized weights, upcast exactly), where
rounding is too small to hide a difference in what the two codes compute. Phased TTT trains, so in fp32 its score
carries rounding amplified by training (the report shows how far the record's own score moves from fp32 to float64);
the tolerance is met where the comparison can resolve it: float64 for phased TTT, both precisions for the eval
that does not train.
"""
import collections
import copy
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from frontier_parity import (MODEL_ENV, RECORDS, SHAPES, SUBSTITUTIONS, caddie_state, fetch, moved_off_init,  # noqa: E402
                             patch, upstream)

OUT = ROOT / "bench" / "results" / "frontier_eval.md"
RECORD = "2135"
TOKENIZER = ROOT.parent / "shared" / "fixtures" / "tokenizers" / "fineweb_1024_bpe.model"
TOLERANCE = 1e-6
DOCS = 8
DOC_CHARS = 600

# The eval at a reduced shape, in caddie's keys and in the record's environment variables (the same numbers).
SEQ_LEN = 128
EVAL = {"chunk": 32, "batch_docs": 2, "rank": 8, "lora_lr": 3e-4, "weight_decay": 2.0, "beta2": 0.99,
        "prefix_docs": 4, "phases": 2, "global_chunk": 256, "global_lr": 3e-3, "momentum": 0.9,
        "order": 6, "threshold": 0.5, "boost": 2.625}
RECORD_ENV = {
    "EVAL_SEQ_LEN": str(SEQ_LEN), "TTT_EVAL_SEQ_LEN": str(SEQ_LEN), "TTT_CHUNK_SIZE": str(EVAL["chunk"]),
    "TTT_BATCH_SIZE": str(EVAL["batch_docs"]), "TTT_LORA_RANK": str(EVAL["rank"]), "TTT_LORA_LR": str(EVAL["lora_lr"]),
    "TTT_WEIGHT_DECAY": str(EVAL["weight_decay"]), "TTT_BETA1": "0", "TTT_BETA2": str(EVAL["beta2"]),
    "TTT_K_LORA": "0", "TTT_MLP_LORA": "1", "TTT_O_LORA": "1", "TTT_LORA_ALPHA": "144", "TTT_OPTIMIZER": "adam",
    "TTT_GRAD_STEPS": "1", "TTT_LORA_EMA_DECAY": "0.0", "TTT_UPDATE_EVERY": "1",
    "TTT_WARM_START_A": "0",  # with RUNTIME_EDITS' reset: every batch starts from caddie's fixed A
    "PHASED_TTT_PREFIX_DOCS": str(EVAL["prefix_docs"]), "PHASED_TTT_NUM_PHASES": str(EVAL["phases"]),
    "GLOBAL_TTT_CHUNK_TOKENS": str(EVAL["global_chunk"]), "GLOBAL_TTT_BATCH_SEQS": "1",
    "GLOBAL_TTT_LR": str(EVAL["global_lr"]), "GLOBAL_TTT_MOMENTUM": str(EVAL["momentum"]), "GLOBAL_TTT_EPOCHS": "1",
    "GLOBAL_TTT_GRAD_CLIP": "1.0", "GLOBAL_TTT_OPTIMIZER": "sgd", "GLOBAL_TTT_RESPECT_DOC_BOUNDARIES": "1",
    "GLOBAL_TTT_WARMUP_CHUNKS": "0", "VAL_DOC_FRACTION": "1.0",
    "NGRAM_TILT_ENABLED": "1", "TOKEN_ORDER": str(EVAL["order"]), "TOKEN_THRESHOLD": str(EVAL["threshold"]),
    "TOKEN_BOOST": str(EVAL["boost"]), "WITHIN_TAU": "99.0", "WITHIN_BOOST": "0.0", "WORD_TAU": "99.0",
    "WORD_BOOST": "0.0", "AGREE_ADD_BOOST": "0.0", "TOKENIZER_PATH": str(TOKENIZER), "RUN_ID": "frontier_eval",
    # the quantizer's settings of the record's command (its README), for the weights both evals score
    "MATRIX_BITS": "6", "EMBED_BITS": "7", "MATRIX_CLIP_SIGMAS": "12.85", "ATTN_CLIP_SIGMAS": "13.0",
    "MLP_CLIP_SIGMAS": "11.5", "EMBED_CLIP_SIGMAS": "14.0", "GATED_ATTN_QUANT_GATE": "0", "LQER_ENABLED": "1",
    "LQER_RANK": "4", "LQER_TOP_K": "3", "LQER_FACTOR_BITS": "4", "LQER_ASYM_ENABLED": "1", "LQER_ASYM_GROUP": "32",
}
CALIBRATION = {"package": "json", "batches": 2, "rows": 4}  # the record's collect_hessians on other text
# (old text, new text, expected matches, why), applied to frontier_parity's CPU copy. Nothing else is changed.
EVAL_SUBSTITUTIONS = [
    ("    global_doc_entries = sorted(doc_entries, key=lambda x: x[1][1])\n",
     "    global_doc_entries = list(doc_entries)  # [cpu-eval] stream order, as caddie's\n", 1,
     "phased TTT's document batches in stream order: the record sorts documents by length (and hands the batches "
     "out longest first, first come first served across ranks); caddie batches consecutive documents, so that no "
     "score depends on a later document's length"),
    ("    if not ascending:\n        indexed.sort(key=lambda ib: -max(dl for _, (_, dl) in ib[1]))\n", "", 1,
     "(the same edit: the batches are processed in the order they were cut)"),
]
RUNTIME_EDITS = [
    "the record module's `BOS_ID = 1`, as its data loaders set it before the first forward pass",
    "`BatchedTTTLoRA.__init__` and `.reset` wrapped so that every adapter's A is caddie's fixed draw (one per site "
    "and pass, the same for every document row; stages.phased_ttt.SiteLoRA) and B is 0; the record draws A per row "
    "from the global RNG (with TTT_WARM_START_A=1 carrying it over from the previous batch)",
    "`forward_ttt_train` is the model's own `forward_ttt` (the record passes a torch.compile'd wrapper of it)",
    "every MLP's `use_fused = False`: in training mode (global TTT) the record's MLP runs a Triton kernel (fused "
    "LeakyReLU(0.5)² up-projection), here its own eager branch of the same function",
    "`val_data` a namespace with the record's own byte look-up tables (`build_sentencepiece_luts`) of the same "
    "tokenizer, CaseOps off",
]
SITE_ATTRS = {"q": "q_loras", "k": "k_loras", "v": "v_loras", "o": "o_loras", "mlp": "mlp_loras", "head": "lm_head_lora"}
NO_TILT = []
SITES = ["q", "v", "o", "mlp", "head"]  # the record #2135: K off (its version has no Q/V switches)


def val_documents(sp) -> list[list[int]]:
    """Python standard library sources, one document per file, BOS first."""
    import json as json_pkg
    files = sorted((Path(json_pkg.__file__).parent.parent / "email").glob("*.py"))[:DOCS]
    return [[1] + sp.encode(f.read_text(encoding="utf-8")[:DOC_CHARS]) for f in files]


def caddie_config() -> dict:
    e = EVAL
    return {"seq_len": SEQ_LEN, "stride": SEQ_LEN, "batch_seqs": 4, "device": "cpu", "nproc": 1, "doc_isolation": True,
            "ttt": {"method": "phased", "chunk_tokens": e["global_chunk"], "epochs": 1, "lr": e["global_lr"],
                    "momentum": e["momentum"], "grad_clip": 1.0, "batch_seqs": 1,
                    "lora": {"rank": e["rank"], "targets": ["attn.c_q"], "chunk_tokens": e["chunk"], "steps": 1,
                             "lr": e["lora_lr"], "weight_decay": e["weight_decay"], "batch_docs": e["batch_docs"]},
                    "phased": {"phases": e["phases"], "prefix_docs": e["prefix_docs"], "sites": SITES,
                               "alpha": 144.0, "betas": [0.0, e["beta2"]], "eps": 1e-10, "short_docs": []}},
            "ogd": {"enabled": False, "lr": 0.1},
            "ngram_tilt": {"enabled": not NO_TILT, "order": e["order"], "threshold": e["threshold"], "boost": e["boost"]},
            "budget_seconds": 0, "point": "quant"}


def patch_for_eval() -> Path:
    return patch(RECORD, SUBSTITUTIONS + EVAL_SUBSTITUTIONS, "train_gpt_eval_cpu.py")


def calibration_batches(sp) -> list:
    """Rows of SEQ_LEN tokens from other files (Python's `json` package), never the val documents."""
    import torch
    files = sorted((Path(json.__file__).parent.parent / CALIBRATION["package"]).glob("*.py"))
    stream = [t for f in files for t in [1] + sp.encode(f.read_text(encoding="utf-8"))]
    rows = CALIBRATION["batches"] * CALIBRATION["rows"]
    if len(stream) < rows * SEQ_LEN:
        raise SystemExit(f"the calibration text has {len(stream)} tokens, fewer than {rows * SEQ_LEN}")
    x = torch.tensor(stream[:rows * SEQ_LEN]).view(CALIBRATION["batches"], CALIBRATION["rows"], SEQ_LEN)
    return list(x)


def quantize_like_the_record(peer, h, model, batches) -> dict:
    """The record's own post-training path on `model`, in place: collect_hessians, gptq_mixed_quantize (GPTQ
    int6 / int7 embedding, SDClip, asymmetric LQER, fp16 passthrough), dequantize_mixed: the weights its
    deserialize() hands its evals. Returns the record's per-tensor quantization kinds."""
    import torch

    class Calibration:  # the record's loader interface; the same rows, in order
        def __init__(self):
            self.batches = iter(batches)

        def next_batch(self, *_):
            return next(self.batches), None

    hessians = peer.collect_hessians(model, Calibration(), h, torch.device("cpu"), len(batches))
    for module in model.modules():  # collect_hessians switches the fused MLP back on
        if isinstance(module, peer.MLP):
            module.use_fused = False
    flat = peer._unbank_state_dict(model.state_dict(), h.num_layers)
    result, meta = peer.gptq_mixed_quantize(flat, hessians, h)
    dequantized = peer.dequantize_mixed(result, meta, flat)
    head_dim = h.model_dim // h.num_heads
    model.load_state_dict(peer._rebank_state_dict(dequantized, h.num_layers, h.model_dim, h.num_kv_heads * head_dim,
                                                  int(h.mlp_mult * h.model_dim)), strict=True)
    return collections.Counter(meta.values())


def fixed_a(peer, a0: dict):
    """Wrap the record's BatchedTTTLoRA so that each adapter starts from caddie's A (see RUNTIME_EDITS)."""
    import torch
    cls, init = peer.BatchedTTTLoRA, peer.BatchedTTTLoRA.__init__

    def reset(self):
        with torch.no_grad():
            for site, attr in SITE_ATTRS.items():
                loras = getattr(self, attr, None)
                if loras is None:
                    continue
                loras = [loras] if site == "head" else list(loras)
                if site not in a0 or len(loras) != len(a0[site]):
                    raise SystemExit(f"the record's {attr} has {len(loras)} adapters, caddie's {site} "
                                     f"{len(a0.get(site, []))}")
                for lora, a in zip(loras, a0[site]):
                    lora.A.copy_(a.T.expand_as(lora.A))
                    lora.B.zero_()

    def wrapped_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        reset(self)

    cls.__init__, cls.reset = wrapped_init, reset


def record_side(peer, h, theirs, tokens, sp) -> dict:
    import torch
    luts = peer.build_sentencepiece_luts(sp, h.vocab_size, torch.device("cpu"))
    val = SimpleNamespace(val_tokens=torch.from_numpy(tokens.astype("int64")), base_bytes_lut=luts[0],
                          has_leading_space_lut=luts[1], is_boundary_token_lut=luts[2], caseops_enabled=False,
                          val_bytes=None)
    h.val_batch_tokens = SEQ_LEN * h.grad_accum_steps * h.world_size  # one sequence per batch: nothing cut off
    out = {}
    t0 = time.time()
    out["quant"] = peer.eval_val(h, torch.device("cpu"), val, theirs)
    out["quant_s"] = time.time() - t0
    model = copy.deepcopy(theirs)
    t0 = time.time()
    out["phased"] = peer.eval_val_ttt_phased(h, model, torch.device("cpu"), val, model.forward_ttt)
    out["phased_s"] = time.time() - t0
    return out


def caddie_side(ours, tokens, sp) -> dict:
    import torch
    from stages import bpb, evaluate, ngram_tilt
    cpu, cfg = torch.device("cpu"), caddie_config()
    tables = bpb.build_byte_tables(sp, ours.config.vocab_size)
    out = {}
    t0 = time.time()
    s = evaluate.score(ours, tokens, tables, cfg, "standard", cpu)
    out["quant"], out["quant_s"] = s, time.time() - t0
    t0 = time.time()
    tilt = ngram_tilt.build_tilt(tokens, cfg, cpu)
    out["gated"] = 0 if tilt is None else int((tilt.hints >= 0).sum())
    s = evaluate.score(ours, tokens, tables, cfg, "ttt", cpu, tilt=tilt)
    out["phased"], out["phased_s"] = s, time.time() - t0
    return out


def run(dtype: str) -> dict:
    import numpy as np
    env = {**MODEL_ENV, **RECORDS[RECORD]["env"], **SHAPES["reduced"], **RECORD_ENV}
    os.environ.update(env)  # the record's Hyperparameters (and its LoRA's class attributes) read them at import
    import sentencepiece as spm
    import torch
    import yaml
    torch.manual_seed(0)
    sys.path.insert(0, str(upstream(RECORD).parent))  # its online_ngram_tilt
    from stages.config import deep_merge
    from stages.model import GPT, GPTConfig
    from stages.phased_ttt import SiteLoRA

    spec = importlib.util.spec_from_file_location(f"record_{RECORD}_eval", patch_for_eval())
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    peer.BOS_ID = 1
    h = peer.Hyperparameters()
    theirs = peer.GPT(h).eval()
    moved_off_init(theirs, seed=int(RECORD))
    theirs.looping_active = True
    for module in theirs.modules():
        if isinstance(module, peer.MLP):
            module.use_fused = False
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    peer.log = lambda *a, **k: None
    kinds = quantize_like_the_record(peer, h, theirs, calibration_batches(sp))  # in fp32, as the record's
    if dtype == "float64":  # both evals in float64 from here, on the same (exactly representable) weights
        theirs.double()
        torch.set_default_dtype(torch.float64)  # the record's LoRA and caddie's adapters are made in it
    preset = yaml.safe_load((ROOT / "presets" / f"record-{RECORD}.yaml").read_text())
    base = yaml.safe_load((ROOT / "config.yaml").read_text())
    model_cfg = deep_merge(base["defaults"]["train"]["model"], preset["defaults"]["train"]["model"])
    model_cfg["model_dim"] = int(env["MODEL_DIM"])
    ours = GPT(GPTConfig(vocab_size=h.vocab_size, **model_cfg)).to(getattr(torch, dtype)).eval()
    ours.load_state_dict(caddie_state(theirs.state_dict(), h.num_layers), strict=True)
    ours.recurrence_active = True

    docs = val_documents(sp)
    tokens = np.concatenate([np.array(d) for d in docs])
    full = (len(tokens) - 1) // SEQ_LEN * SEQ_LEN + 1  # eval_val scores whole sequences only: the same targets
    tokens = tokens[:full].astype(np.uint16)
    sites = SiteLoRA(ours, SITES, EVAL["rank"], 144.0, torch.device("cpu"))
    fixed_a(peer, sites.a0)
    sites.remove()
    theirs_out = record_side(peer, h, theirs, tokens, sp)
    ours_out = caddie_side(ours, tokens, sp)
    rows = []
    for name, label in (("quant", "quantized eval (eval_val / mode standard, doc_isolation)"),
                        ("phased", "phased TTT + n-gram tilt (eval_val_ttt_phased / ttt.method phased)")):
        s = ours_out[name]
        ours_bpb = bpb_of(s)
        theirs_loss, theirs_bpb = theirs_out[name]
        rows.append({"eval": label, "tokens": s["tokens"], "bytes": s["bytes"], "record_bpb": theirs_bpb,
                     "caddie_bpb": ours_bpb, "rel_diff": abs(ours_bpb - theirs_bpb) / theirs_bpb,
                     "record_s": theirs_out[f"{name}_s"], "caddie_s": ours_out[f"{name}_s"]})
    return {"dtype": dtype, "rows": rows, "tokens": int(len(tokens)), "docs": len(docs), "gated": ours_out["gated"],
            "kinds": dict(kinds),
            "tokens_sha256": hashlib.sha256(tokens.tobytes()).hexdigest(), "torch": torch.__version__}


def bpb_of(sums: dict) -> float:
    import math
    return sums["loss_sum"] / (math.log(2) * sums["bytes"])


def passes(runs: dict) -> bool:
    """Every float64 row within the tolerance; in fp32 the eval that does not train too."""
    return (all(r["rel_diff"] <= TOLERANCE for r in runs["float64"]["rows"])
            and runs["float32"]["rows"][0]["rel_diff"] <= TOLERANCE)


def write_report(runs: dict) -> None:
    out, f32, f64 = runs["float32"], runs["float32"]["rows"], runs["float64"]["rows"]
    lines = [
        f"# Frontier eval parity: caddie's eval vs the record #{RECORD}'s eval code (CPU)", "",
        "Command: `.venv/bin/python bench/frontier_eval.py`", "",
        f"Result: **{'PASS' if passes(runs) else 'FAIL'}** (tolerance {TOLERANCE:g} relative on val_bpb: in float64 "
        "for both evals, in fp32 for the eval that does not train).", "",
        "| eval | precision | scored tokens | bytes | record val_bpb | caddie val_bpb | rel. diff | record s | "
        "caddie s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype in ("float32", "float64"):
        for r in runs[dtype]["rows"]:
            lines.append(f"| {r['eval']} | {dtype} | {r['tokens']:,} | {r['bytes']:,} | {r['record_bpb']:.10f} | "
                         f"{r['caddie_bpb']:.10f} | {r['rel_diff']:.2e} | {r['record_s']:.1f} | {r['caddie_s']:.1f} |")
    shift = [abs(a["record_bpb"] - b["record_bpb"]) / b["record_bpb"] for a, b in zip(f32, f64)]
    lines += ["", f"The record's own val_bpb, fp32 against float64: {shift[0]:.2e} relative for the quantized eval, "
              f"{shift[1]:.2e} for phased TTT, whose training amplifies rounding; caddie's fp32 phased TTT is "
              f"{f32[1]['rel_diff']:.2e} from the record's fp32 one, and {f64[1]['rel_diff']:.2e} from it in float64."]
    lines += [
        "", "## Setup", "",
        f"- Model: the record's GPT (its own code), vocab 1024, width 256, 11 layers with its loop (layers 3-5 twice "
        "more) and parallel lanes from layer 8, SmearGate, sparse attention gate, AsymLogit; seeded noise on every "
        "tensor (frontier_parity.moved_off_init); then quantized by the record's own code as its serialize() and "
        "deserialize() do (collect_hessians on "
        f"{CALIBRATION['batches']} batches of {CALIBRATION['rows']}x{SEQ_LEN} tokens of Python's "
        f"`{CALIBRATION['package']}` package, gptq_mixed_quantize with its command's settings, dequantize_mixed: "
        + ", ".join(f"{n} {k}" for k, n in sorted(out["kinds"].items())) + "); the same dequantized weights in "
        "caddie's GPT through frontier_parity.caddie_state. Scored in fp32 and, upcast exactly, in float64 (the "
        "record's deserialize casts to bf16 for its GPU kernels, which on CPU would only add rounding to compare).",
        f"- Val: {out['docs']} documents (the first {DOCS} files of Python's `email` package, {DOC_CHARS} characters "
        f"each, BOS first), {out['tokens']:,} tokens (sha256 `{out['tokens_sha256'][:16]}`), cut to whole "
        f"sequences of {SEQ_LEN} (the record's eval_val scores no partial sequence).",
        f"- Eval: context {SEQ_LEN}; per-document LoRA rank {EVAL['rank']} at sites {SITES} (K off, as #2135), "
        f"alpha 144, Adam betas (0, {EVAL['beta2']}), eps 1e-10, lr {EVAL['lora_lr']}, weight decay "
        f"{EVAL['weight_decay']}, chunks of {EVAL['chunk']}, batches of {EVAL['batch_docs']} documents; "
        f"{EVAL['phases']} global SGD phases over the first {EVAL['prefix_docs']} documents (chunks of "
        f"{EVAL['global_chunk']} targets, lr {EVAL['global_lr']}, momentum {EVAL['momentum']}, clip 1.0, one "
        f"sequence per step: the record packs a step's sequences into one row, caddie into its pieces, which agree "
        f"at one sequence); the token n-gram tilt, order {EVAL['order']}, threshold {EVAL['threshold']}, boost "
        f"{EVAL['boost']} ({out['gated']} of the targets hinted).",
        f"- torch {out['torch']}, {platform.platform()}.", "",
        "## Edits to the record's code", "",
        "Text substitutions, each asserted to match exactly once (bench/frontier_parity.py's, then this script's):", "",
    ]
    lines += [f"- {why}" for _, _, _, why in SUBSTITUTIONS + EVAL_SUBSTITUTIONS]
    lines += ["", "At run time:", ""] + [f"- {edit}" for edit in RUNTIME_EDITS]
    lines += ["", "Seconds are this machine's (2 shared CPU cores), for orientation only.", ""]
    OUT.write_text("\n".join(lines))


def main():
    if "--no-tilt" in sys.argv[1:]:  # a diagnostic: phased TTT alone, printed, not written to the report
        RECORD_ENV["NGRAM_TILT_ENABLED"] = "0"
        NO_TILT.append(True)
    fetch(RECORD, None)
    for name in ("online_ngram_tilt.py", "online_ngram_state.c"):
        if not (upstream(RECORD).parent / name).exists():
            sys.exit(f"missing peers/record-{RECORD}/{name} (see this script's docstring)")
    if not TOKENIZER.exists():
        sys.exit(f"missing {TOKENIZER}")
    if "--dtype" in sys.argv[1:]:  # one precision, in this process: its result as JSON on the last line
        out = run(sys.argv[sys.argv.index("--dtype") + 1])
        print(json.dumps(out))
        return
    runs = {}
    for dtype in ("float32", "float64"):
        done = subprocess.run([sys.executable, __file__, "--dtype", dtype, *sys.argv[1:]], capture_output=True,
                              text=True)
        if done.returncode != 0:
            sys.exit(f"the {dtype} run failed:\n{done.stderr[-3000:]}")
        runs[dtype] = json.loads(done.stdout.strip().splitlines()[-1])
        print(dtype, json.dumps(runs[dtype]["rows"], indent=1), flush=True)
    if not NO_TILT:
        write_report(runs)
    if not passes(runs):
        sys.exit("val_bpb differs beyond the tolerance")


if __name__ == "__main__":
    main()
