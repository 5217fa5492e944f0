"""The records' quantizer and per-group compressor against caddie's, on the same weights and Hessians (CPU).

Imports a CPU copy of peers/record-1855/train_gpt.py (bench/frontier_parity.py's patch: its listed, asserted
edits, flash-attn -> SDPA and a Triton stub; the quantizer and serializer are not edited), builds random weights
at the record's shape (11 layers of 512, kv 256, MLP 2048, vocab 8192) with row scales and heavy tails like
trained ones and Hessians of correlated inputs, then runs the record's gptq_mixed_quantize + _serialize_pergroup
and caddie's quantize_tensor + add_lqer + the pergroup compressor. Asserts identical integer codes, scales and
LQER factors, and per-group compressed bytes within 0.5%. Then AWQ-lite, which #1855 does not have, against the
record that brought it (#1945, peers/record-1945/train_gpt.py, copied like the others; `--git-dir` copies it out of
a clone): the same weights and Hessians (at `--awq-layers`, the activation rms the record collects read off the
Hessian's diagonal, √(H_jj / tokens)), the record's gptq_mixed_quantize with AWQ_LITE_* on, caddie's awq_groups +
quantize_tensor: the same protected groups, their int8 codes and scales, every other code and the LQER factors.
Writes bench/results/frontier_quant.md.

    .venv/bin/python bench/frontier_quant.py [--layers 11] [--awq-layers 3] [--awq-top-k 24]
"""
import argparse
import collections
import importlib.util
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from frontier_parity import SUBSTITUTIONS, fetch, patch  # noqa: E402
from stages import pack, pergroup, quantize  # noqa: E402
import yaml  # noqa: E402

RECORD = "1855"
AWQ_RECORD = "1945"
AWQ_SOURCE = {"commit": "46c75f4dfec0b98ae37db6249f515447a0cff572",  # the pull request's head (pull/1945/head)
              "path": "records/track_10min_16mb/2026-04-30_V19_PR1908_AsymLogit_WD2/train_gpt.py",
              "sha256": "448607376a9b2e86dc3baaf4455ff9e045650a93c7d90e35356e25423dbf3a94"}
AWQ = {"bits": 8, "group_size": 64}  # the record's AWQ_LITE_BITS, AWQ_LITE_GROUP_SIZE (its runs: GROUP_TOP_K=1)
SIGMAS = {"embed": 14.0, "attn": 13.0, "mlp": 11.5, "other": 12.85}
TOKENS = 4096


def record_module(record: str = RECORD):
    path = patch(record)
    spec = importlib.util.spec_from_file_location(f"record_{record}_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.log = lambda *a, **k: None
    return module


def shapes(layers: int) -> dict:
    out = {"tok_emb.weight": (8192, 512)}
    for i in range(layers):
        out.update({f"blocks.{i}.attn.c_q.weight": (512, 512), f"blocks.{i}.attn.c_k.weight": (256, 512),
                    f"blocks.{i}.attn.c_v.weight": (256, 512), f"blocks.{i}.attn.proj.weight": (512, 512),
                    f"blocks.{i}.mlp.fc.weight": (2048, 512), f"blocks.{i}.mlp.proj.weight": (512, 2048),
                    f"blocks.{i}.attn.head_gate.weight": (8, 12), f"blocks.{i}.attn_scale": (512,)})
    return out


def trained_like(shape, gen) -> torch.Tensor:
    """Student-t (5 dof) entries with log-normal row scales around 1/√fan_in: the heavy tails and uneven rows of
    trained weights, which SDClip's k·std clipping is tuned for."""
    if len(shape) == 1:
        return 1 + 0.1 * torch.randn(shape, generator=gen)
    z = torch.randn(shape, generator=gen) / torch.sqrt(torch.distributions.Chi2(5.0).sample((shape[0], 1)) / 5)
    rows = torch.exp(0.3 * torch.randn(shape[0], 1, generator=gen))
    return z * rows / shape[1] ** 0.5 * 0.5


def hessian(cols: int, gen) -> torch.Tensor:
    """XᵀX of TOKENS correlated inputs with a decaying spectrum and a few outlier channels."""
    mix = torch.randn(cols, cols, generator=gen) * torch.logspace(0, -1.5, cols)[:, None]
    x = torch.randn(TOKENS, cols, generator=gen) @ mix
    x[:, :4] *= 8
    return x.T @ x


def inputs(layers: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    state = {n: trained_like(s, gen) for n, s in shapes(layers).items()}
    hs = {}
    for i in range(layers):
        shared = hessian(512, gen)
        for r in ("c_q", "c_k", "c_v"):
            hs[f"blocks.{i}.attn.{r}.weight"] = shared
        hs[f"blocks.{i}.attn.proj.weight"] = hessian(512, gen)
        hs[f"blocks.{i}.mlp.fc.weight"] = hessian(512, gen)
        hs[f"blocks.{i}.mlp.proj.weight"] = hessian(2048, gen)
    hs["tok_emb.weight"] = hessian(512, gen)
    return state, hs


def record_hparams():
    return types.SimpleNamespace(gated_attn_quant_gate=True, lqer_enabled=True, lqer_rank=4, lqer_top_k=3,
                                 lqer_factor_bits=4, lqer_asym_enabled=True, lqer_asym_group=64,
                                 embed_clip_sigmas=SIGMAS["embed"], mlp_clip_sigmas=SIGMAS["mlp"],
                                 attn_clip_sigmas=SIGMAS["attn"], matrix_clip_sigmas=SIGMAS["other"],
                                 embed_bits=7, matrix_bits=6)


def caddie_cfg() -> dict:
    cfg = yaml.safe_load((ROOT / "config.yaml").read_text())["defaults"]["quantize"]
    cfg.update(method="gptq", bits=6, embed_bits=7, clip="sdclip", clip_sigmas=SIGMAS, keep_float_max_numel=65536,
               lqer={"rank": 4, "top_k": 3, "factor_bits": 4, "asym_group": 64}, gate_int8=True,
               control_fp16=True, code_container="bytes", compressor="pergroup")
    return cfg


def record_names(state):
    """The record's names: its gate is attn.attn_gate_w."""
    return {n.replace("attn.head_gate.weight", "attn.attn_gate_w"): w for n, w in state.items()}


def full_codes(e) -> np.ndarray:
    """An entry's codes with AWQ-lite's protected columns back in place (the record keeps them in one matrix)."""
    if "awq_data" not in e:
        return e["data"]
    codes = e["data"].copy()
    codes[:, [s + j for s in e["awq_starts"] for j in range(e["awq_group"])]] = e["awq_data"]
    return codes


def compare_codes(rec_result, entries) -> dict:
    checked = collections.Counter()
    for e in entries:
        name = e["name"].replace("attn.head_gate.weight", "attn.attn_gate_w")
        if e["kind"] != "rows":
            assert torch.equal(rec_result[name], torch.from_numpy(e["data"])), name
            checked["passthrough"] += 1
            continue
        q, s = (".gq", ".gs") if e["method"] == "gate_int8" else (".q", ".scale")
        assert np.array_equal(rec_result[name + q].numpy(), full_codes(e)), f"{name}: codes differ"
        if name + ".awqg_start" in rec_result or "awq_data" in e:
            # the record keeps a matrix's groups in the order it chose them, caddie by column
            assert sorted(rec_result[name + ".awqg_start"].tolist()) == e["awq_starts"], f"{name}: AWQ groups differ"
            assert np.array_equal(rec_result[name + ".awqg_s_hi"].numpy(), e["awq_scale"]), f"{name}: AWQ scales"
            checked["awq"] += 1
        assert np.array_equal(rec_result[name + s].numpy(), e["scale"]), f"{name}: scales differ"
        checked["codes"] += 1
        if "lqer_a" in e:
            for ours, theirs in (("lqer_a", ".lqA_a"), ("lqer_a_scale", ".lqAs_a"), ("lqer_b", ".lqB_a"),
                                 ("lqer_b_scale", ".lqBs_a")):
                assert np.array_equal(rec_result[name + theirs].numpy().reshape(-1), e[ours].reshape(-1)), \
                    f"{name}: {ours} differs"
            checked["lqer"] += 1
    return dict(checked)


def awq_check(layers: int, top_k: int) -> dict:
    """AWQ-lite against #1945: the protected groups, their codes and scales, the rest of the codes, LQER."""
    rec = record_module(AWQ_RECORD)
    state, hs = inputs(layers, seed=1)
    act_rms = {n: (torch.diag(h) / TOKENS).sqrt() for n, h in record_names(hs).items()}
    h = record_hparams()
    h.__dict__.update(awq_lite_enabled=True, awq_lite_bits=AWQ["bits"], awq_lite_group_top_k=top_k,
                      awq_lite_group_size=AWQ["group_size"], lqer_scope="all", lqer_gain_select=False)
    t0 = time.time()
    rec_result, rec_meta = rec.gptq_mixed_quantize(record_names(state), record_names(hs), act_rms, h)
    rec_s = time.time() - t0
    cfg = caddie_cfg()
    cfg["awq"] = {"top_k": top_k, **AWQ}
    t0 = time.time()
    protected = quantize.awq_groups(state, hs, cfg)
    entries = [quantize.quantize_tensor(n, w, cfg, hs.get(n), awq_starts=protected.get(n))[0]
               for n, w in state.items()]
    lqer_names = quantize.add_lqer(entries, state, cfg["lqer"])
    ours_s = time.time() - t0
    checked = compare_codes(rec_result, entries)
    assert checked.get("awq", 0) == len(protected) > 0, (checked, protected)
    return {"layers": layers, "top_k": top_k, "protected": protected, "checked": checked, "lqer": lqer_names,
            "record_s": rec_s, "caddie_s": ours_s,
            "record_meta": sorted(n for n, m in rec_meta.items() if "awqgrpint" in m)}


def awq_lines(a: dict) -> list:
    size = AWQ["group_size"]
    groups = "; ".join(f"{n}: columns {', '.join(f'{s}-{s + size - 1}' for s in starts)}"
                       for n, starts in a["protected"].items())
    return ["## AWQ-lite against #1945", "",
            f"Record #{AWQ_RECORD}'s train_gpt.py (pull/{AWQ_RECORD}/head {AWQ_SOURCE['commit'][:12]}, "
            f"`{AWQ_SOURCE['path']}`, the same CPU edits), {a['layers']} layers, new weights and Hessians (seed 1); "
            f"the record's activation rms given as √(H_jj / {TOKENS}), the statistic it collects, so both rank the "
            f"same saliency; AWQ_LITE_BITS {AWQ['bits']}, GROUP_SIZE {AWQ['group_size']}, GROUP_TOP_K {a['top_k']} "
            "(its runs use 1; more here, so that groups land in many matrices and some matrices get more than one), the #1855 settings above.", "",
            f"Protected by both: {groups}.", "",
            f"Identical to the record: the protected groups and their int8 codes and fp16 scales in "
            f"{a['checked'].get('awq', 0)} matrices, the integer codes and scales of all "
            f"{a['checked'].get('codes', 0)} matrices, LQER factors of {a['checked'].get('lqer', 0)} "
            f"({', '.join(a['lqer'])}), {a['checked'].get('passthrough', 0)} fp16 passthrough tensors.", "",
            f"Seconds (GPTQ + AWQ + LQER): record {a['record_s']:.1f}, caddie {a['caddie_s']:.1f}.", ""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--awq-layers", type=int, default=3)
    parser.add_argument("--awq-top-k", type=int, default=24)
    parser.add_argument("--git-dir", help="a clone or bare mirror of openai/parameter-golf to copy #1945 from")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "frontier_quant.md")
    args = parser.parse_args(argv)
    fetch(AWQ_RECORD, args.git_dir, AWQ_SOURCE)
    awq = awq_lines(awq_check(args.awq_layers, args.awq_top_k))  # first: the shorter check
    print("\n".join(awq), flush=True)
    rec = record_module()
    state, hs = inputs(args.layers)

    t0 = time.time()
    rec_result, rec_meta = rec.gptq_mixed_quantize(record_names(state), record_names(hs), record_hparams())
    rec_quant_s = time.time() - t0
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rec_blob = rec._serialize_pergroup(rec_result, rec_meta, args.layers, tmp)
    rec_ser_s = time.time() - t0
    rec_streams = [len(s) for s in rec._unpack_streams(rec_blob)]

    cfg = caddie_cfg()
    t0 = time.time()
    entries = [quantize.quantize_tensor(n, w, cfg, hs.get(n))[0] for n, w in state.items()]
    lqer_names = quantize.add_lqer(entries, state, cfg["lqer"])
    ours_quant_s = time.time() - t0
    checked = compare_codes(rec_result, entries)
    t0 = time.time()
    payload = pack.pack_tensors(entries, {}, {"method": "gptq", "bits": 6})
    streams, groups = pergroup.compress_streams(payload)
    ours_ser_s = time.time() - t0
    ours_blob = pack.compress(payload, "pergroup")
    assert pack.decompress(ours_blob) == payload

    rows = []
    rec_by_group = dict(zip([g.lstrip("_").removesuffix(".q") for g in rec._GROUP_ORDER], rec_streams))
    for group, (method, s) in zip(groups, streams):
        theirs = rec_by_group[group]
        rows.append((group, theirs, len(s), "lrzip" if method == pergroup.LRZIP else "brotli"))
    rows.append(("remainder (brotli)", rec_streams[-2], len(streams[-2][1]), "brotli"))
    rows.append(("row orders (brotli)", rec_streams[-1], len(streams[-1][1]), "brotli"))
    total_rec, total_ours = len(rec_blob), len(ours_blob)
    for group, theirs, ours, _ in rows[:-2]:
        assert abs(ours - theirs) <= 0.005 * theirs, f"{group}: {ours} vs the record's {theirs}"
    assert abs(total_ours - total_rec) <= 0.005 * total_rec, (total_ours, total_rec)

    lines = ["# The records' quantizer and per-group compressor vs caddie's", "",
             f"`{' '.join(['.venv/bin/python', 'bench/frontier_quant.py', *(argv or sys.argv[1:])])}` "
             f"(CPU; record #{RECORD}'s train_gpt.py, CPU copy with the edits of bench/frontier_parity.py:",
             *[f"- {why}" for *_, why in SUBSTITUTIONS], ")", "",
             f"Shape: {args.layers} layers of 512 (kv 256, MLP 2048), vocab 8192 tied embedding, sparse attention "
             f"gates (8x12); random weights (Student-t rows, log-normal row scales), Hessians of {TOKENS} correlated "
             "inputs. Settings of #1855: int6 blocks, int7 embedding, SDClip sigmas attn 13.0 / mlp 11.5 / embed "
             "14.0 / other 12.85, LQER asym rank 4 top-3 group 64, int8 gate rows, fp16 passthrough.", "",
             f"Identical to the record: integer codes and fp16 scales of {checked.get('codes', 0)} matrices, "
             f"LQER factors of {checked.get('lqer', 0)} ({', '.join(lqer_names)}), "
             f"{checked.get('passthrough', 0)} fp16 passthrough tensors.", "",
             "| stream | record bytes | caddie bytes | caddie's pick | diff |", "| --- | ---: | ---: | --- | ---: |"]
    for group, theirs, ours, method in rows:
        lines.append(f"| {group} | {theirs:,} | {ours:,} | {method} | {100 * (ours - theirs) / max(theirs, 1):+.2f}% |")
    lines += [f"| **total** (caddie: inside its artifact container, +{pack.HEADER_BYTES + pack.DIGEST_BYTES} bytes) "
              f"| {total_rec:,} | {total_ours:,} | | {100 * (total_ours - total_rec) / total_rec:+.2f}% |", "",
              "| seconds | record | caddie |", "| --- | ---: | ---: |",
              f"| quantize (GPTQ + LQER) | {rec_quant_s:.1f} | {ours_quant_s:.1f} |",
              f"| per-group compression | {rec_ser_s:.1f} | {ours_ser_s:.1f} (lrzip and brotli on every group) |", ""]
    lines += awq
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
