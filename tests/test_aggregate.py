import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as st

from stages import aggregate as agg

T_975_DF2 = 4.302652729911275
TOKENS, BYTES = 1_000_000, 2_436_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def make_run(tmp_path, arm, seed, point, mode, bpb, tokens=TOKENS, nbytes=BYTES, drop=None):
    stem = f"{arm}_{seed}_{point}_{mode}"
    ev = {"point": point, "mode": mode, "tokens": tokens, "bytes": nbytes, "raw_bytes": None,
          "loss_nats": bpb * math.log(2) * nbytes / tokens, "val_bpb": bpb, "seconds": 1.5,
          "seq_len": 1024, "stride": 64 if mode == "sliding" else 1024}
    if drop:
        del ev[drop]
    train = {"steps": 100, "tokens": 10**6, "train_seconds": 60.0, "tokens_per_second": 1.6e4,
             "final_train_loss": 3.0}
    quant = {"model_bytes": 15_000_000, "code_bytes": 50_000, "total_bytes": 15_050_000,
             "cap_bytes": 16_000_000, "headroom_bytes": 950_000, "bits": 6, "compressor": "zstd"}
    return {"arm": arm, "seed": seed, "point": point, "mode": mode,
            "eval": _write(tmp_path / f"{stem}.eval.json", ev),
            "train_summary": _write(tmp_path / f"{stem}.train.json", train),
            "quantize_summary": _write(tmp_path / f"{stem}.quant.json", quant) if point == "quant" else None}


def build_runs(tmp_path, table):
    """table: {(arm, point, mode): [bpb per seed 1..n]}"""
    return [make_run(tmp_path, arm, seed, point, mode, v)
            for (arm, point, mode), values in table.items()
            for seed, v in enumerate(values, start=1)]


def test_summary_uses_sample_std_and_t_interval():
    s = agg.summarize([1.0, 1.2, 1.1], 0.95)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(1.1)
    assert s["std"] == pytest.approx(0.1)
    assert s["ci_half_width"] == pytest.approx(half)
    assert s["ci_half_width"] == pytest.approx(0.24841, abs=1e-5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1.1 - half, 1.1 + half))


def test_summary_of_one_seed_has_null_spread():
    s = agg.summarize([1.3], 0.95)
    assert s["mean"] == 1.3 and s["std"] is None and s["ci_half_width"] is None and s["ci_low"] is None


def test_group_stats_nested_by_arm_point_mode(tmp_path):
    df = agg.load_results(build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.2, 1.1]}))
    g = agg.group_stats(df, 0.95)["a"]["prequant"]["standard"]
    assert g["values"] == {"1": 1.0, "2": 1.2, "3": 1.1}
    assert g["ci_half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))


def test_paired_t_on_pr1818_seeds_divides_by_sqrt_n():
    pre = np.array([1.100163, 1.102204, 1.100334])
    post = np.array([3.474313, 3.442213, 3.469556])
    r = agg.paired_t(pre, post)
    d = post - pre
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)), rel=1e-12)
    assert abs(r["t"] - 221.6) < 0.5
    assert abs(r["t"] - d.mean() / d.std(ddof=1)) > 50
    assert r["df"] == 2
    assert r["p_one_sided_greater"] == pytest.approx(r["p_two_sided"] / 2)


def test_quant_gap_stats_pairs_by_seed(tmp_path):
    pre, post = [1.100163, 1.102204, 1.100334], [3.474313, 3.442213, 3.469556]
    runs = build_runs(tmp_path, {("a", "prequant", "standard"): pre, ("a", "quant", "standard"): post,
                                 ("b", "prequant", "standard"): [1.0, 1.1]})
    q = agg.quant_gap_stats(agg.load_results(runs))
    assert set(q) == {"a"}
    entry = q["a"]["standard"]
    assert entry["gaps"] == pytest.approx({"1": 2.37415, "2": 2.340009, "3": 2.369222})
    assert entry["mean"] == pytest.approx(np.mean(np.subtract(post, pre)))
    assert abs(entry["t"] - 221.6) < 0.5 and entry["df"] == 2


def test_zero_variance_gives_null_not_nan():
    assert agg.paired_t([1.0, 1.0, 1.0], [1.5, 1.5, 1.5])["t"] is None
    assert agg.welch_less([1.0, 1.0], [1.0, 1.0]) == (None, None)
    t, p = agg.welch_less([1.0, 1.0, 1.0], [1.1, 1.2, 1.3])
    assert t == pytest.approx(-0.2 / (0.1 / math.sqrt(3))) and p < 0.05


def test_welch_one_sided_matches_hand_computation():
    a, b = np.array([1.00, 1.02, 1.01]), np.array([1.10, 1.13, 1.12, 1.11])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    got_t, got_p = agg.welch_less(a, b)
    assert got_t == pytest.approx(t)
    assert got_p == pytest.approx(st.t.cdf(t, df))
    assert got_p < 0.05
    assert agg.welch_less(b, a)[1] > 0.5


def test_threshold_bpb_from_tokens_per_byte():
    assert agg.threshold_bpb(TOKENS, BYTES) == pytest.approx(0.005 * TOKENS / BYTES / math.log(2))


def test_compare_to_baseline(tmp_path):
    runs = build_runs(tmp_path, {("baseline", "prequant", "standard"): [1.10, 1.11, 1.12],
                                 ("good", "prequant", "standard"): [1.00, 1.01, 1.02],
                                 ("bad", "prequant", "standard"): [1.20, 1.22, 1.21],
                                 ("close", "prequant", "standard"): [1.099, 1.109, 1.119]})
    vs = agg.compare_to_baseline(agg.load_results(runs), "baseline")
    assert set(vs) == {"good", "bad", "close"}
    good, bad, close = (vs[k]["prequant"]["standard"] for k in ("good", "bad", "close"))
    assert good["diff"] == pytest.approx(-0.1)
    assert good["threshold_bpb"] == pytest.approx(0.005 * TOKENS / BYTES / math.log(2))
    assert good["p_less"] < 0.01 and good["meets_threshold"] is True
    assert bad["p_less"] > 0.5 and bad["meets_threshold"] is False
    assert close["meets_threshold"] is False
    assert good["n_arm"] == good["n_baseline"] == 3


def test_missing_baseline_arm_is_named(tmp_path):
    df = agg.load_results(build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.1]}))
    with pytest.raises(ValueError, match="'baseline'"):
        agg.compare_to_baseline(df, "baseline")


def test_missing_eval_key_names_file(tmp_path):
    run = make_run(tmp_path, "a", 1, "prequant", "standard", 1.0, drop="val_bpb")
    with pytest.raises(ValueError, match="missing key 'val_bpb'") as e:
        agg.load_results([run])
    assert run["eval"] in str(e.value)


def _no_nan(name):
    raise AssertionError(f"non-JSON constant {name} in stats.json")


def test_main_end_to_end(tmp_path):
    table = {}
    for mode in ("standard", "sliding"):
        off = -0.02 if mode == "sliding" else 0.0
        table[("baseline", "prequant", mode)] = [1.10 + off, 1.11 + off, 1.12 + off]
        table[("baseline", "quant", mode)] = [1.13 + off, 1.15 + off, 1.14 + off]
        table[("wide", "prequant", mode)] = [1.05 + off, 1.06 + off, 1.05 + off]
        table[("wide", "quant", mode)] = [1.08 + off, 1.08 + off, 1.08 + off]
        table[("noquant", "prequant", mode)] = [1.2 + off]
    runs = build_runs(tmp_path, table)
    out = tmp_path / "reports"
    rc = agg.main(["--runs", json.dumps(runs), "--report",
                   json.dumps({"baseline_arm": "baseline", "confidence": 0.95}), "--out-dir", str(out)])
    assert rc == 0

    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert len(rows) == len(runs) == 26
    assert list(rows[0]) == agg.COLUMNS
    keys = [(r["arm"], ("prequant", "quant").index(r["point"]), r["mode"], int(r["seed"])) for r in rows]
    assert keys == sorted(keys, key=lambda k: (k[0], k[1], ("standard", "sliding").index(k[2]), k[3]))
    assert {r["artifact_bytes"] for r in rows if r["point"] == "quant"} == {"15050000"}
    assert {r["artifact_bytes"] for r in rows if r["point"] == "prequant"} == {""}

    stats = json.loads((out / "stats.json").read_text(), parse_constant=_no_nan)
    assert {"groups", "quant_gap", "vs_baseline"} <= set(stats)
    assert stats["groups"]["noquant"]["prequant"]["standard"]["std"] is None
    assert set(stats["quant_gap"]) == {"baseline", "wide"}
    assert stats["quant_gap"]["wide"]["sliding"]["t"] is not None
    assert set(stats["vs_baseline"]) == {"wide", "noquant"}
    assert stats["vs_baseline"]["noquant"]["prequant"]["standard"]["p_less"] is None

    md = (out / "report.md").read_text()
    assert "figures/val_bpb_by_point.png" in md and "figures/quant_gap.png" in md
    for png in ("val_bpb_by_point.png", "quant_gap.png"):
        assert (out / "figures" / png).read_bytes()[:8] == PNG_MAGIC
    assert not list(out.rglob("*.tmp"))
