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
