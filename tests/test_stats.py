import math

import numpy as np
import pytest
from scipy import stats as st

from stages import stats

T_975_DF2 = 4.302652729911275


def test_summary_uses_sample_std_and_t_interval():
    s = stats.summarize([1.0, 1.2, 1.1], 0.95)
    half = T_975_DF2 * 0.1 / math.sqrt(3)
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(1.1)
    assert s["std"] == pytest.approx(0.1)
    assert s["ci_half_width"] == pytest.approx(half)
    assert s["ci_half_width"] == pytest.approx(0.24841, abs=1e-5)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((1.1 - half, 1.1 + half))


def test_summary_of_one_seed_has_null_spread():
    s = stats.summarize([1.3], 0.95)
    assert s["mean"] == 1.3 and s["std"] is None and s["ci_half_width"] is None and s["ci_low"] is None


def test_paired_t_on_pr1818_seeds_divides_by_sqrt_n():
    pre = np.array([1.1002, 1.1022, 1.1003])
    post = np.array([3.4743, 3.4422, 3.4696])
    r = stats.paired_t(pre, post)
    d = post - pre
    assert r["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3)), rel=1e-12)
    assert r["t"] == pytest.approx(221.6, abs=0.5)  # PR #1818 published 131: it left out the sqrt(n)
    assert abs(r["t"] - 131) > 50
    assert r["df"] == 2
    assert r["p_one_sided_greater"] == pytest.approx(r["p_two_sided"] / 2)


def test_zero_variance_gives_null_not_nan():
    assert stats.paired_t([1.0, 1.0, 1.0], [1.5, 1.5, 1.5])["t"] is None
    assert stats.welch_less([1.0, 1.0], [1.0, 1.0]) == (None, None)
    assert stats.one_sample_less([1.0, 1.0, 1.0], 2.0) == (None, None)
    t, p = stats.welch_less([1.0, 1.0, 1.0], [1.1, 1.2, 1.3])
    assert t == pytest.approx(-0.2 / (0.1 / math.sqrt(3))) and p < 0.05


def test_welch_one_sided_matches_hand_computation():
    a, b = np.array([1.00, 1.02, 1.01]), np.array([1.10, 1.13, 1.12, 1.11])
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    got_t, got_p = stats.welch_less(a, b)
    assert got_t == pytest.approx(t)
    assert got_p == pytest.approx(st.t.cdf(t, df))
    assert got_p < 0.05
    assert stats.welch_less(b, a)[1] > 0.5


def test_one_sample_less_matches_hand_computation():
    # 2026-03-19_TrainingOptSeq4096's README tests 3 seeds against SOTA - 0.005 = 1.21113611 (df 2)
    v = np.array([1.0, 1.02, 1.04])
    t = (v.mean() - 1.1) / (v.std(ddof=1) / math.sqrt(3))
    got_t, got_p = stats.one_sample_less(v, 1.1)
    assert got_t == pytest.approx(t) == pytest.approx(-0.08 / (0.02 / math.sqrt(3)))
    assert got_p == pytest.approx(st.t.cdf(t, 2))
    assert stats.one_sample_less(v, 0.9)[1] > 0.9


def test_threshold_bpb_is_the_records_conversion():
    # ref §2.5: 0.005 nats/token in BPB = 0.005 * val_bpb / val_loss; the LQER record: 1.06107587 / 2.32202732
    assert stats.threshold_bpb(1.06107587, 2.32202732) == pytest.approx(0.002285, abs=1e-6)
    tokens, nbytes = 1_000_000, 2_442_000
    loss = 2.0
    bpb = loss / math.log(2) * tokens / nbytes
    assert stats.threshold_bpb(bpb, loss) == pytest.approx(0.005 * tokens / nbytes / math.log(2))


# Per-seed scores of an arm that is worse than its baseline by ~0.0102 bpb with a tiny spread (issue 11):
# paired by seed the difference is clear; Welch on the two unpaired samples sees only the seed spread.
BASE = {"1": 1.2000, "2": 1.2105, "3": 1.2051}
WORSE = {"1": 1.2102, "2": 1.2211, "3": 1.2150}


def test_paired_difference_matches_hand_computation():
    d = np.array([0.0102, 0.0106, 0.0099])
    mean, sd = d.mean(), d.std(ddof=1)
    t = mean / (sd / math.sqrt(3))
    half = T_975_DF2 * sd / math.sqrt(3)
    r = stats.compare(WORSE, BASE, 0.95, margin_bpb=0.002)
    assert r["test"] == "paired t" and r["n"] == 3 and r["df"] == 2
    assert r["diff"] == pytest.approx(mean) and r["std"] == pytest.approx(sd)
    assert r["t"] == pytest.approx(t)
    assert r["p_two_sided"] == pytest.approx(2 * st.t.sf(abs(t), 2))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((mean - half, mean + half))
    assert r["verdict"] == "worse"
    assert r["meets_margin"] is False


def test_welch_difference_when_seeds_differ():
    base = {"7": 1.2000, "8": 1.2105, "9": 1.2051}
    a, b = np.array(list(WORSE.values())), np.array(list(base.values()))
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    diff, se = a.mean() - b.mean(), math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    r = stats.compare(WORSE, base, 0.95, margin_bpb=0.002)
    assert r["test"] == "Welch t" and (r["n_arm"], r["n_baseline"]) == (3, 3)
    assert r["diff"] == pytest.approx(diff) and r["t"] == pytest.approx(diff / se)
    assert r["df"] == pytest.approx(df)
    assert r["p_two_sided"] == pytest.approx(2 * st.t.sf(abs(diff / se), df))
    half = st.t.ppf(0.975, df) * se
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((diff - half, diff + half))
    assert r["verdict"] == "no difference"  # the seed spread hides what pairing shows


def test_a_better_arm_is_better_and_the_margin_is_a_one_sided_test_at_p_001():
    better = {s: v - 0.0102 for s, v in BASE.items()}
    better["2"] -= 0.0004
    r = stats.compare(better, BASE, 0.95, margin_bpb=0.002)
    assert r["verdict"] == "better" and r["diff"] < 0
    d = np.subtract(list(better.values()), list(BASE.values()))
    p = st.ttest_rel(d + 0.002, np.zeros(3), alternative="less").pvalue
    assert r["p_margin"] == pytest.approx(p) and r["meets_margin"] is bool(p < 0.01)
    assert stats.compare(better, BASE, 0.95, margin_bpb=0.02)["meets_margin"] is False


def test_compare_with_one_seed_is_untested():
    r = stats.compare({"1": 1.0}, {"1": 1.1}, 0.95, margin_bpb=0.002)
    assert r["verdict"] == "untested" and r["p_two_sided"] is None and r["diff"] == pytest.approx(-0.1)


# The 2026-04-27 LQER record's three published seeds (its README: 1.05989454, 1.06124613, 1.06208695).
LQER = [1.05989454, 1.06124613, 1.06208695]


def test_progression_rule_is_one_sided_welch_against_the_frontier_row():
    frontier = [1.0619, 1.0628, 1.0612, 1.0624]  # a made-up frontier row, a reproduction pooled in
    a, b = np.array(LQER), np.array(frontier)
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    p = st.t.cdf(t, df)
    assert 0.01 < p < 0.25  # passes the progression cutoff, not the README's p < 0.01
    r = stats.progression(LQER, frontier, alpha=0.25)
    assert r["t"] == pytest.approx(t) and r["df"] == pytest.approx(df) and r["p_less"] == pytest.approx(p)
    assert r["progresses"] is True
    assert stats.progression(LQER, frontier, alpha=0.01)["progresses"] is False
    margin = 0.00228
    p_margin = st.ttest_ind(a + margin, b, equal_var=False, alternative="less").pvalue
    r = stats.progression(LQER, frontier, alpha=0.25, margin_bpb=margin)
    assert r["p_less"] == pytest.approx(p_margin) and r["progresses"] is False


def test_a_difference_constant_up_to_rounding_is_untested():
    base = {"1": 1.1, "2": 1.2, "3": 2.3}
    shifted = {s: v - 0.05 for s, v in base.items()}  # exact in decimals, not in binary
    assert np.ptp(np.subtract(list(shifted.values()), list(base.values()))) > 0
    r = stats.compare(shifted, base, 0.95, margin_bpb=0.002)
    assert r["t"] is None and r["verdict"] == "untested" and r["p_margin"] is None
