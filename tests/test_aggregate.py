import csv
import json
import math

import numpy as np
import pytest
from scipy import stats as st

from stages import aggregate as agg
from stages import report

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
    artifact = _write(tmp_path / f"{stem}.quant.json", quant) if point != "prequant" else None
    return {"arm": arm, "seed": seed, "point": point, "mode": mode,
            "eval": _write(tmp_path / f"{stem}.eval.json", ev),
            "train_summary": _write(tmp_path / f"{stem}.train.json", train),
            "quantize_summary": artifact, "size": artifact}  # one file serves as both here


def plan(tmp_path, runs, report_cfg, arms=None):
    """The aggregate's plan file, as the aggregate_plan rule writes it."""
    return _write(tmp_path / "plan.json", {"runs": runs, "report": report_cfg,
                                           **({"arms": arms} if arms else {})})


def build_runs(tmp_path, table):
    """table: {(arm, point, mode): [bpb per seed 1..n]}"""
    return [make_run(tmp_path, arm, seed, point, mode, v)
            for (arm, point, mode), values in table.items()
            for seed, v in enumerate(values, start=1)]


def test_group_stats_nested_by_arm_point_mode(tmp_path):
    df = agg.load_results(build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.2, 1.1]}))
    g = agg.group_stats(df, 0.95)["a"]["prequant"]["standard"]
    assert g["values"] == {"1": 1.0, "2": 1.2, "3": 1.1}
    assert g["ci_half_width"] == pytest.approx(T_975_DF2 * 0.1 / math.sqrt(3))


def test_quant_gap_stats_pairs_by_seed(tmp_path):
    pre, post = [1.100163, 1.102204, 1.100334], [3.474313, 3.442213, 3.469556]
    runs = build_runs(tmp_path, {("a", "prequant", "standard"): pre, ("a", "quant", "standard"): post,
                                 ("b", "prequant", "standard"): [1.0, 1.1]})
    q = agg.step_stats(agg.load_results(runs), "prequant", "quant")
    assert set(q) == {"a"}
    entry = q["a"]["standard"]
    assert entry["gaps"] == pytest.approx({"1": 2.37415, "2": 2.340009, "3": 2.369222})
    assert entry["mean"] == pytest.approx(np.mean(np.subtract(post, pre)))
    assert abs(entry["t"] - 221.6) < 0.5 and entry["df"] == 2


def test_compare_to_baseline(tmp_path):
    runs = build_runs(tmp_path, {("baseline", "prequant", "standard"): [1.10, 1.11, 1.12],
                                 ("good", "prequant", "standard"): [1.00, 1.012, 1.019],
                                 ("bad", "prequant", "standard"): [1.20, 1.22, 1.21],
                                 ("close", "prequant", "standard"): [1.099, 1.109, 1.119]})
    df = agg.load_results(runs)
    vs = agg.compare_to_baseline(agg.scores(df, 0.95), "baseline", 0.95)
    assert set(vs) == {"good", "bad", "close"}
    good, bad, close = (vs[k] for k in ("good", "bad", "close"))
    assert good["diff"] == pytest.approx(np.mean([1.00, 1.012, 1.019]) - 1.11)
    assert good["margin_bpb"] == pytest.approx(0.005 * TOKENS / BYTES / math.log(2))
    assert good["test"] == "paired t" and good["verdict"] == "better" and good["meets_margin"] is True
    assert bad["verdict"] == "worse" and bad["meets_margin"] is False
    assert bad["p_two_sided"] == pytest.approx(st.ttest_rel([1.20, 1.22, 1.21], [1.10, 1.11, 1.12]).pvalue)
    assert close["meets_margin"] is False
    assert good["n_arm"] == good["n_baseline"] == 3


def test_missing_baseline_arm_is_named(tmp_path):
    df = agg.load_results(build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.1]}))
    with pytest.raises(ValueError, match="'baseline'"):
        agg.compare_to_baseline(agg.scores(df, 0.95), "baseline", 0.95)


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
    rc = agg.main(["--plan", plan(tmp_path, runs, {"baseline_arm": "baseline", "confidence": 0.95}),
                   "--out-dir", str(out)])
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
    assert stats["vs_baseline"]["noquant"]["test"] == "Welch t"  # one seed against three
    assert stats["vs_baseline"]["noquant"]["p_two_sided"] is None
    assert stats["vs_baseline"]["noquant"]["verdict"] == "untested"
    assert stats["vs_baseline"]["wide"]["arm_score"] == "quant/sliding"

    md = (out / "report.md").read_text()
    for rel in report.FIGURES.values():
        assert f"({rel})" in md
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(report.FIGURES) and "http" not in html
    assert f"{stats['groups']['wide']['quant']['sliding']['mean']:.4f}" in html
    assert not list(out.rglob("*.tmp"))


def chain_table():
    table = {}
    for mode, off in (("standard", 0.0), ("sliding", -0.02), ("ttt", -0.03)):
        table[("baseline", "prequant", mode)] = [1.10 + off, 1.11 + off, 1.12 + off]
        table[("baseline", "quant", mode)] = [1.13 + off, 1.15 + off, 1.14 + off]
    return table


def test_chain_orders_points_then_modes():
    pairs = [("quant", "ttt"), ("prequant", "standard"), ("rescue", "standard"), ("quant", "standard"),
             ("rescue", "sliding"), ("quant", "sliding"), ("rescue", "ttt")]
    assert agg.chain_of(pairs) == [("prequant", "standard"), ("quant", "standard"), ("rescue", "standard"),
                                   ("rescue", "sliding"), ("rescue", "ttt")]
    assert agg.chain_of([("quant", "ttt"), ("quant", "sliding")]) == [("quant", "sliding"), ("quant", "ttt")]
    assert agg.chain_of([("prequant", "sliding")]) == [("prequant", "sliding")]


def test_decomposition_steps_are_paired_by_seed(tmp_path):
    table = chain_table()
    table[("baseline", "quant", "ttt")] = [1.095, 1.118, 1.104]
    d = agg.decomposition(agg.load_results(build_runs(tmp_path, table)))["baseline"]
    assert d["chain"] == ["prequant/standard", "quant/standard", "quant/sliding", "quant/ttt"]
    assert d["values"]["2"] == pytest.approx([1.11, 1.15, 1.13, 1.118])
    names = [s["name"] for s in d["steps"]]
    assert names == ["quantization", "sliding window", "test-time training"]
    ttt = d["steps"][2]
    deltas = np.array([1.095, 1.118, 1.104]) - np.array([1.11, 1.13, 1.12])
    assert ttt["deltas"] == pytest.approx({"1": deltas[0], "2": deltas[1], "3": deltas[2]})
    assert ttt["t"] == pytest.approx(st.ttest_rel([1.095, 1.118, 1.104], [1.11, 1.13, 1.12]).statistic)
    assert ttt["df"] == 2
    assert d["total"]["mean"] == pytest.approx(np.mean([1.095, 1.118, 1.104]) - 1.11)


def test_rescue_step_reports_bytes_added(tmp_path):
    runs = build_runs(tmp_path, {("a", "quant", "standard"): [1.20, 1.21, 1.22],
                                 ("a", "rescue", "standard"): [1.19, 1.205, 1.21]})
    for r in runs:  # the rescue artifact is 25,000 bytes bigger than the quantized one
        if r["point"] == "rescue":
            r["size"] = r["quantize_summary"] = _write(tmp_path / f"rescue{r['seed']}.json", {"total_bytes": 15_075_000})
        else:
            r["size"] = r["quantize_summary"] = _write(tmp_path / f"quant{r['seed']}.json", {"total_bytes": 15_050_000})
    gain = agg.step_stats(agg.load_results(runs), "quant", "rescue")["a"]["standard"]
    assert gain["bytes_added"] == 25_000
    assert gain["mean"] == pytest.approx(-0.025 / 3)


def test_reference_verdict_uses_one_sample_t_against_reference_minus_margin(tmp_path):
    df = agg.load_results(build_runs(tmp_path, chain_table()))
    margin = 0.005 * TOKENS / BYTES / math.log(2)
    ttt = [1.10, 1.12, 1.11]
    for ref, expected in ((1.2, True), (1.11 + margin + 0.001, False)):
        stats = agg.build_stats(df, "baseline", 0.95, {"name": "PR #1", "val_bpb": ref})
        r = stats["vs_reference"]["baseline"]
        assert r["target_bpb"] == pytest.approx(ref - margin)
        assert r["t"] == pytest.approx(st.ttest_1samp(ttt, ref - margin).statistic)
        assert r["p_less"] == pytest.approx(st.ttest_1samp(ttt, ref - margin, alternative="less").pvalue)
        assert r["meets_margin"] is expected
        word = "BEATS" if expected else "does not beat"
        assert stats["verdicts"] == [f"baseline (quant/ttt, 1.11000, n=3) {word} PR #1 ({ref:.5f}) by ≥ 0.005 "
                                     f"nats at p < 0.01: one-sample t vs {ref - margin:.5f}, "
                                     f"p = {r['p_less']:.3g}"]


def test_published_logs_join_the_results_and_the_report(tmp_path, record_logs):
    runs = build_runs(tmp_path, chain_table())
    logs = sorted(str(p) for p in record_logs.glob("2026-04-27_*.log"))
    out = tmp_path / "reports"
    agg.main(["--plan", plan(tmp_path, runs, {"baseline_arm": "baseline", "confidence": 0.95,
                                             "reference": {"name": "LQER", "val_bpb": 1.06107587}}),
              "--published", *logs, "--out-dir", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    lqer = stats["scores"]["2026-04-27_SP8192_LQER_1.0611"]
    assert lqer["source"] == "published" and (lqer["point"], lqer["mode"]) == ("quant", "ttt")
    assert lqer["mean"] == pytest.approx(1.06107587, abs=5e-9)  # the submission's 3-seed mean
    assert lqer["values"] == pytest.approx({"42": 1.05989454, "0": 1.06124613, "1234": 1.06208695}, abs=5e-9)
    assert lqer["threshold_bpb"] == pytest.approx(0.00228, abs=2e-5)  # ref §2.5: 0.005 nats in sp8192 bpb
    assert "2026-04-27_SP8192_LQER_1.0611" not in stats["vs_baseline"]  # other data: not comparable
    rows = list(csv.DictReader((out / "results.csv").read_text().splitlines()))
    assert {r["source"] for r in rows} == {"caddie", "published"}
    assert "2026-04-27_SP8192_LQER_1.0611" in (out / "report.md").read_text()


def test_report_html_renders_offline_with_every_figure_and_the_stats_numbers(tmp_path, chromium):
    import browser
    table = chain_table()
    jitter = (0.0, 0.002, -0.001)
    table.update({("wide", p, m): [v - 0.05 + j for v, j in zip(vals, jitter)]
                  for (a, p, m), vals in chain_table().items()})
    table.update({("worse", p, m): [v + 0.01 - j / 4 for v, j in zip(vals, jitter)]
                  for (a, p, m), vals in chain_table().items()})
    out = tmp_path / "reports"
    agg.main(["--plan", plan(tmp_path, build_runs(tmp_path, table),
                             {"baseline_arm": "baseline", "confidence": 0.95,
                              "reference": {"name": "record", "val_bpb": 1.2}}), "--out-dir", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    page = browser.render(out / "report.html", chromium)
    assert page["loaded"] and not page["errors"] and page["title"] == "caddie report"
    assert len(page["images"]) == len(report.FIGURES)
    assert all(img["loaded"] and img["natural_width"] > 100 for img in page["images"])
    headline = page["tables"][0]  # the first table on the page: each arm against the baseline arm
    assert headline[0][:5] == ["arm", "score at", "val_bpb mean ± std", "Δ bpb [95% CI]", "Δ nats [95% CI]"]
    by_arm = {r[0]: r for r in headline[1:]}
    assert list(by_arm) == ["baseline", "wide", "worse"]
    base = stats["scores"]["baseline"]
    assert by_arm["baseline"][:3] == ["baseline", "quant/ttt", f"{base['mean']:.5f} ± {base['std']:.5f} (n=3)"]
    assert {stats["vs_baseline"][a]["verdict"] for a in ("wide", "worse")} == {"better", "worse"}
    for arm, c in stats["vs_baseline"].items():
        s = stats["scores"][arm]
        assert by_arm[arm] == [
            arm, f"{s['point']}/{s['mode']}", f"{s['mean']:.5f} ± {s['std']:.5f} (n={s['n']})",
            f"{c['diff']:+.5f} [{c['ci_low']:+.5f}, {c['ci_high']:+.5f}]",
            f"{c['diff_nats']:+.5f} [{c['ci_low_nats']:+.5f}, {c['ci_high_nats']:+.5f}]",
            c["test"], f"{c['p_two_sided']:.3g}", f"{c['delta_artifact_bytes']:+,.0f}",
            f"{c['delta_train_seconds']:+.1f}", f"{c['delta_eval_seconds']:+.1f}", c["verdict"],
            f"{'yes' if c['meets_margin'] else 'no'} (p = {c['p_margin']:.3g})"]
    reference = page["tables"][1]
    assert reference[0][:3] == ["arm", "val_bpb mean ± std", "Δ bpb [95% CI]"]
    for row in reference[1:]:
        r = stats["vs_reference"][row[0]]
        assert row[2] == f"{r['diff']:+.5f} [{r['ci_low']:+.5f}, {r['ci_high']:+.5f}]"
        assert row[5:] == [f"{r['p_two_sided']:.3g}", r["verdict"],
                           f"{'yes' if r['meets_margin'] else 'no'} (p = {r['p_less']:.3g})"]
    rows = {tuple(r) for t in page["tables"] for r in t}
    for arm, point, mode, s in report._leaves(stats["groups"], 3):
        ci = f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
        assert (arm, point, mode, "3", f"{s['mean']:.4f} ± {s['std']:.4f}", ci) in rows
    for arm, r in stats["vs_reference"].items():
        assert (arm, f"{r['mean']:.5f}", f"{r['diff']:+.5f}", f"{r['target_bpb']:.5f}", f"{r['t']:.2f}", "2",
                f"{r['p_less']:.3g}", "yes" if r["meets_margin"] else "no") in rows
    steps = stats["decomposition"]["wide"]["steps"]
    assert (steps[0]["name"], f"{steps[0]['from']} → {steps[0]['to']}", "3",
            f"{steps[0]['mean']:+.5f} ± {steps[0]['std']:.5f}") in {r[:4] for r in rows}


def test_a_truncated_eval_json_is_an_error_naming_the_file(tmp_path):
    runs = build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.1]})
    path = runs[1]["eval"]
    text = open(path).read()
    open(path, "w").write(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{path}: not valid JSON .* truncated or corrupt"):
        agg.load_results(runs)


def test_the_eval_budget_comes_from_the_run_record_not_the_eval(tmp_path):
    runs = build_runs(tmp_path, {("a", "prequant", "standard"): [1.0, 1.1]})
    runs[0]["budget_seconds"] = 1.0
    df = agg.load_results(runs)
    assert df["budget_seconds"].tolist()[0] == 1.0 and math.isnan(df["budget_seconds"].tolist()[1])


def rescue_table():
    """baseline: prequant → quant; lcq: prequant → quant → rescue, its score at rescue/standard."""
    return {("baseline", "prequant", "standard"): [1.10, 1.11, 1.12],
            ("baseline", "quant", "standard"): [1.14, 1.16, 1.15],
            ("lcq", "prequant", "standard"): [1.10, 1.11, 1.12],
            ("lcq", "quant", "standard"): [1.15, 1.17, 1.16],
            ("lcq", "rescue", "standard"): [1.12, 1.1405, 1.131]}


def test_a_rescue_arm_is_compared_score_with_score(tmp_path):
    stats = agg.build_stats(agg.load_results(build_runs(tmp_path, rescue_table())), "baseline", 0.95)
    c = stats["vs_baseline"]["lcq"]
    assert (c["arm_score"], c["baseline_score"]) == ("rescue/standard", "quant/standard")
    d = np.subtract([1.12, 1.1405, 1.131], [1.14, 1.16, 1.15])
    assert c["test"] == "paired t" and c["diff"] == pytest.approx(d.mean())
    assert c["p_two_sided"] == pytest.approx(st.ttest_rel([1.12, 1.1405, 1.131], [1.14, 1.16, 1.15]).pvalue)
    assert c["verdict"] == "better"
    assert any(v.startswith("lcq (rescue/standard") and "better than the baseline arm" in v
               for v in stats["verdicts"])


def test_a_worse_arm_is_called_worse_by_the_paired_test(tmp_path):
    base, worse = [1.2000, 1.2105, 1.2051], [1.2102, 1.2211, 1.2150]
    table = {("baseline", "quant", "standard"): base, ("sdclip", "quant", "standard"): worse}
    stats = agg.build_stats(agg.load_results(build_runs(tmp_path, table)), "baseline", 0.95)
    c = stats["vs_baseline"]["sdclip"]
    assert c["test"] == "paired t" and c["verdict"] == "worse"
    assert c["p_two_sided"] == pytest.approx(st.ttest_rel(worse, base).pvalue)
    assert c["p_two_sided"] < 0.01
    assert st.ttest_ind(worse, base, equal_var=False).pvalue > 0.05  # what the unpaired test would say
    nats_per_bpb = math.log(2) * BYTES / TOKENS
    assert c["diff_nats"] == pytest.approx(c["diff"] * nats_per_bpb)
    assert c["ci_low_nats"] == pytest.approx(c["ci_low"] * nats_per_bpb)
    assert c["meets_margin"] is False
    assert any(v.startswith("sdclip (quant/standard") and "worse than the baseline arm" in v
               and "paired t" in v for v in stats["verdicts"])


def test_arms_with_different_seeds_use_welch(tmp_path):
    runs = build_runs(tmp_path, {("baseline", "quant", "standard"): [1.20, 1.21, 1.22]})
    runs += [make_run(tmp_path, "other", seed, "quant", "standard", v) for seed, v in ((7, 1.19), (8, 1.2), (9, 1.22))]
    c = agg.build_stats(agg.load_results(runs), "baseline", 0.95)["vs_baseline"]["other"]
    assert c["test"] == "Welch t"
    assert c["p_two_sided"] == pytest.approx(
        st.ttest_ind([1.19, 1.2, 1.22], [1.20, 1.21, 1.22], equal_var=False).pvalue)


def test_the_headline_deltas_of_bytes_and_seconds(tmp_path):
    runs = build_runs(tmp_path, rescue_table())
    for r in runs:
        if r["arm"] == "lcq" and r["point"] == "rescue":
            r["size"] = r["quantize_summary"] = _write(tmp_path / f"rescue{r['seed']}.json", {"total_bytes": 15_075_000})
            ev = json.loads(open(r["eval"]).read())
            ev["seconds"] = 4.0
            _write(tmp_path / f"lcq_{r['seed']}_rescue_standard.eval.json", ev)
    c = agg.build_stats(agg.load_results(runs), "baseline", 0.95)["vs_baseline"]["lcq"]
    assert c["delta_artifact_bytes"] == 25_000
    assert c["delta_eval_seconds"] == pytest.approx(2.5)
    assert c["delta_train_seconds"] == 0


def test_progression_verdict_for_every_arm_from_the_published_record(tmp_path, record_logs):
    logs = sorted(str(p) for p in record_logs.glob("2026-04-27_*.log"))
    df = agg.load_results(build_runs(tmp_path, {("baseline", "quant", "standard"): [1.10, 1.11, 1.12]}), logs)
    frontier = {"name": "made-up frontier", "val_bpb": [1.0619, 1.0628, 1.0612, 1.0624], "alpha": 0.25}
    stats = agg.build_stats(df, "baseline", 0.95, frontier=frontier)
    prog = stats["progression"]
    assert prog["frontier"]["values"] == frontier["val_bpb"] and prog["frontier"]["alpha"] == 0.25
    lqer = prog["arms"]["2026-04-27_SP8192_LQER_1.0611"]
    seeds = [1.05989454, 1.06124613, 1.06208695]
    assert lqer["p_less"] == pytest.approx(
        st.ttest_ind(seeds, frontier["val_bpb"], equal_var=False, alternative="less").pvalue, rel=1e-6)
    assert lqer["progresses"] is True
    assert prog["arms"]["baseline"]["progresses"] is False
    strict = agg.build_stats(df, "baseline", 0.95, frontier={**frontier, "alpha": 0.01})
    assert strict["progression"]["arms"]["2026-04-27_SP8192_LQER_1.0611"]["progresses"] is False


def test_the_frontier_row_can_be_a_published_record(tmp_path, record_logs):
    logs = sorted(str(p) for p in record_logs.glob("2026-04-27_*.log"))
    df = agg.load_results(build_runs(tmp_path, {("baseline", "quant", "standard"): [1.05, 1.051, 1.052]}), logs)
    stats = agg.build_stats(df, "baseline", 0.95, frontier={"name": "2026-04-27_SP8192_LQER_1.0611", "alpha": 0.25})
    assert sorted(stats["progression"]["frontier"]["values"]) == pytest.approx(
        [1.05989454, 1.06124613, 1.06208695], abs=5e-9)
    assert set(stats["progression"]["arms"]) == {"baseline"}
    assert stats["progression"]["arms"]["baseline"]["progresses"] is True
    with pytest.raises(ValueError, match="report.frontier: 'nope'"):
        agg.build_stats(df, "baseline", 0.95, frontier={"name": "nope", "alpha": 0.25})


def test_what_differs_between_arms():
    defaults = {"train": {"iterations": 150, "model": {"num_layers": 4}},
                "quantize": {"bits": 8, "method": "rtn", "clip_sigmas": {"mlp": 11.5, "attn": 13.0}}}
    arms = {"baseline": {"train": {"iterations": 200}},
            "int6": {"train": {"iterations": 200}, "quantize": {"bits": 6, "method": "rtn"}},
            "sdclip": {"quantize": {"clip_sigmas": {"mlp": 10.0}}}}
    diff = agg.config_differences(defaults, arms, "baseline")
    assert diff["baseline"] == {"vs_defaults": {"train.iterations": {"value": 200, "default": 150}},
                                "vs_baseline": {}}
    assert diff["int6"]["vs_defaults"] == {"train.iterations": {"value": 200, "default": 150},
                                           "quantize.bits": {"value": 6, "default": 8}}
    assert diff["int6"]["vs_baseline"] == {"quantize.bits": {"value": 6, "baseline": 8}}
    assert diff["sdclip"]["vs_defaults"] == {"quantize.clip_sigmas.mlp": {"value": 10.0, "default": 11.5}}
    assert diff["sdclip"]["vs_baseline"] == {"train.iterations": {"value": 150, "baseline": 200},
                                             "quantize.clip_sigmas.mlp": {"value": 10.0, "baseline": 11.5}}


def test_where_the_bytes_go_and_throughput_from_the_summaries(tmp_path):
    runs = build_runs(tmp_path, rescue_table())
    train = _write(tmp_path / "shared_train.json", {"steps": 200, "train_seconds": 50.0, "tokens_per_second": 8000.0,
                                                     "model_sha256": "ab" * 32,
                                                     "config": {"train": {"max_seconds": 60}}})
    tensors = [{"name": "tok_emb.weight", "group": "embed", "kind": "rows", "bits": 8, "numel": 1000,
                "stored_bytes": 1100},
               {"name": "blocks.0.attn.c_q.weight", "group": "attn", "kind": "rows", "bits": 6, "numel": 400,
                "stored_bytes": 330},
               {"name": "blocks.0.mlp.fc.weight", "group": "mlp", "kind": "rows", "bits": 6, "numel": 800,
                "stored_bytes": 650},
               {"name": "blocks.0.mlp.proj.weight", "group": "mlp", "kind": "rows", "bits": 6, "numel": 800,
                "stored_bytes": 640}]
    quant = {"model_bytes": 2000, "code_bytes": 500, "total_bytes": 2500, "cap_bytes": 16_000_000,
             "headroom_bytes": 15_997_500, "tensors": tensors}
    rescue = {"model_bytes": 2300, "lora_bytes": 300, "code_bytes": 500, "total_bytes": 2800,
              "cap_bytes": 16_000_000, "headroom_bytes": 15_997_200}
    for r in runs:
        r["train_summary"] = train  # both arms share one training run per seed (the same file here)
        if r["point"] == "quant":
            r["size"] = r["quantize_summary"] = _write(tmp_path / f"q_{r['arm']}_{r['seed']}.json", quant)
        elif r["point"] == "rescue":
            r["size"] = r["quantize_summary"] = _write(tmp_path / f"r_{r['seed']}.json", rescue)
    stats = agg.build_stats(agg.load_results(runs), "baseline", 0.95, runs=runs)
    b = stats["artifact_budgets"]["lcq"]
    assert (b["point"], b["model_bytes"], b["code_bytes"], b["rescue_bytes"]) == ("rescue", 2300, 500, 300)
    assert b["total_bytes_max"] == 2800 and b["headroom_bytes_min"] == 15_997_200
    assert b["groups"]["mlp"] == {"tensors": 2, "numel": 1600, "stored_bytes": 1290}
    assert [t["name"] for t in b["largest_tensors"]][:2] == ["tok_emb.weight", "blocks.0.mlp.fc.weight"]
    assert stats["artifact_budgets"]["baseline"]["rescue_bytes"] is None
    tp = stats["training_throughput"]
    assert len(tp) == 3 and all(r["arms"] == ["baseline", "lcq"] for r in tp)  # one row per run and seed
    assert tp[0]["ms_per_step"] == pytest.approx(250.0) and tp[0]["within_budget"] is True
    assert stats["eval_seconds"]["lcq"]["1"] == {"standard": 1.5}
    sections = {s["title"]: s for s in report.report_sections(stats)}
    groups, training = sections["Stored bytes by tensor group"]["rows"], sections["Throughput: training"]["rows"]
    assert ("lcq", "mlp", "2", "1,600", "1,290", f"{1290 / 2720:.1%}") in groups
    assert ("baseline, lcq", 1, "200", "8,000", "250.0", "50.0", "60", "yes") in training


def test_main_reports_what_differs_between_arms(tmp_path):
    runs = build_runs(tmp_path, rescue_table())
    arms = {"defaults": {"quantize": {"bits": 8}, "rescue": {"lcq": {"enabled": False}}},
            "arms": {"baseline": {}, "lcq": {"rescue": {"lcq": {"enabled": True}}}}}
    out = tmp_path / "reports"
    agg.main(["--plan", plan(tmp_path, runs, {"baseline_arm": "baseline", "confidence": 0.95}, arms),
              "--out-dir", str(out)])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config_differences"]["lcq"]["vs_baseline"] == {"rescue.lcq.enabled": {"value": True,
                                                                                         "baseline": False}}
    md = (out / "report.md").read_text()
    assert "| lcq | rescue.lcq.enabled | true | false | false |" in md
    assert md.index("## Headline") < md.index("## What differs between arms") < md.index("## Verdict")
