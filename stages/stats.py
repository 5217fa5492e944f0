"""The statistics of a report, each a thin, checked wrapper of scipy.

Every spread is a sample std (ddof=1); every interval is a t-interval with n − 1 degrees of freedom.
A statistic that is undefined (one seed, zero variance) is None, never NaN, so it reads as null in JSON.
"""
import contextlib
import math
import warnings

import numpy as np
from scipy import stats as st

# The challenge accepts a record that beats the previous one by 0.005 nats per token at p < 0.01.
THRESHOLD_NATS = 0.005
THRESHOLD_P = 0.01


def finite_or_none(x):
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@contextlib.contextmanager
def _quiet_scipy():
    """scipy warns on a constant sample, yet Welch's t is still defined when only one side is."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def summarize(values, confidence):
    """n, mean, sample std (ddof=1) and the t-based confidence interval of the mean."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    mean = float(v.mean())
    out = {"n": n, "mean": mean, "std": None, "ci_half_width": None, "ci_low": None, "ci_high": None}
    if n >= 2:
        std = float(v.std(ddof=1))
        half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        out.update(std=std, ci_half_width=half, ci_low=mean - half, ci_high=mean + half)
    return out


def paired_t(pre, post):
    """Paired t-test of post vs pre; t = mean(d) / (std(d, ddof=1) / sqrt(n))."""
    n = len(pre)
    d = np.asarray(post, dtype=float) - np.asarray(pre, dtype=float)
    if n < 2 or np.ptp(d) == 0:
        return {"t": None, "df": n - 1 if n >= 2 else None, "p_two_sided": None,
                "p_one_sided_greater": None}
    with _quiet_scipy():
        two = st.ttest_rel(post, pre)
        one = st.ttest_rel(post, pre, alternative="greater")
    return {"t": finite_or_none(two.statistic), "df": n - 1,
            "p_two_sided": finite_or_none(two.pvalue), "p_one_sided_greater": finite_or_none(one.pvalue)}


def welch_less(arm_values, base_values):
    """One-sided Welch t-test for mean(arm) < mean(baseline): (t, p)."""
    arm_values, base_values = np.asarray(arm_values, float), np.asarray(base_values, float)
    if len(arm_values) < 2 or len(base_values) < 2:
        return None, None
    if np.ptp(arm_values) == 0 and np.ptp(base_values) == 0:
        return None, None
    with _quiet_scipy():
        r = st.ttest_ind(arm_values, base_values, equal_var=False, alternative="less")
    return finite_or_none(r.statistic), finite_or_none(r.pvalue)


def one_sample_less(values, reference):
    """One-sided one-sample t-test for mean(values) < reference (df = n − 1): (t, p)."""
    values = np.asarray(values, float)
    if len(values) < 2 or np.ptp(values) == 0:
        return None, None
    r = st.ttest_1samp(values, reference, alternative="less")
    return finite_or_none(r.statistic), finite_or_none(r.pvalue)


def threshold_bpb(val_bpb, loss_nats, nats=THRESHOLD_NATS):
    """A per-token nat margin in bits per byte at the run's own tokens per byte: bpb/nats is that ratio
    over ln 2, so the same formula serves caddie's evals and published logs, which print only the two."""
    return nats * val_bpb / loss_nats


def is_constant(d) -> bool:
    """Equal up to float rounding (e.g. (x − 0.05) − x over seeds): the t statistic is undefined, not huge."""
    d = np.asarray(d, float)
    return bool(np.allclose(d, d.mean(), rtol=1e-9, atol=1e-12))


def paired_difference(arm, base, confidence):
    """arm − baseline per seed (same seeds, same order): mean, sample std, t-interval with df = n − 1,
    and scipy's paired t-test (ttest_rel, two-sided)."""
    arm, base = np.asarray(arm, float), np.asarray(base, float)
    d = arm - base
    n = len(d)
    out = {"test": "paired t", "n": n, "n_arm": n, "n_baseline": n, "diff": float(d.mean()), "std": None,
           "t": None, "df": n - 1 if n >= 2 else None, "p_two_sided": None, "ci_low": None, "ci_high": None}
    if n < 2:
        return out
    std = float(d.std(ddof=1))
    half = float(st.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    out.update(std=std, ci_low=out["diff"] - half, ci_high=out["diff"] + half)
    if not is_constant(d):
        r = st.ttest_rel(arm, base)
        out.update(t=finite_or_none(r.statistic), p_two_sided=finite_or_none(r.pvalue))
    return out


def welch_df(arm, base):
    """The Welch–Satterthwaite degrees of freedom of mean(arm) − mean(base)."""
    va, vb = arm.var(ddof=1) / len(arm), base.var(ddof=1) / len(base)
    return (va + vb) ** 2 / (va**2 / (len(arm) - 1) + vb**2 / (len(base) - 1))


def welch_difference(arm, base, confidence):
    """mean(arm) − mean(baseline) of two unpaired samples: Welch's t-interval and scipy's
    ttest_ind(equal_var=False), two-sided."""
    arm, base = np.asarray(arm, float), np.asarray(base, float)
    out = {"test": "Welch t", "n": None, "n_arm": len(arm), "n_baseline": len(base),
           "diff": float(arm.mean() - base.mean()), "std": None, "t": None, "df": None, "p_two_sided": None,
           "ci_low": None, "ci_high": None}
    se = math.sqrt(arm.var(ddof=1) / len(arm) + base.var(ddof=1) / len(base)) \
        if len(arm) >= 2 and len(base) >= 2 else 0.0
    if se == 0:
        return out
    df = welch_df(arm, base)
    half = float(st.t.ppf(0.5 + confidence / 2, df)) * se
    r = st.ttest_ind(arm, base, equal_var=False)
    out.update(t=finite_or_none(r.statistic), df=float(df), p_two_sided=finite_or_none(r.pvalue),
               ci_low=out["diff"] - half, ci_high=out["diff"] + half)
    return out


def verdict_word(diff, p, confidence):
    """Lower bpb is better: 'better' or 'worse' when the two-sided test rejects at 1 − confidence."""
    if p is None:
        return "untested"
    if p < 1 - confidence:
        return "better" if diff < 0 else "worse"
    return "no difference"


def margin_test(arm, base, margin_bpb, paired):
    """One-sided p that the arm beats the baseline by at least the margin (arm + margin < baseline)."""
    arm, base = np.asarray(arm, float) + margin_bpb, np.asarray(base, float)
    if paired:
        if len(arm) < 2 or is_constant(arm - base):
            return None
        return finite_or_none(st.ttest_rel(arm, base, alternative="less").pvalue)
    return welch_less(arm, base)[1]


def compare(arm: dict, base: dict, confidence, margin_bpb):
    """Compare two per-seed samples ({seed: val_bpb}): paired by seed when both have the same seeds,
    Welch otherwise; the verdict in both directions at the confidence level, and the challenge's margin
    rule (beats the baseline by margin_bpb at one-sided p < THRESHOLD_P, by the same pairing)."""
    seeds = sorted(arm)
    paired = set(arm) == set(base) and len(seeds) >= 2
    if paired:
        a, b = [arm[s] for s in seeds], [base[s] for s in seeds]
        out = paired_difference(a, b, confidence)
    else:
        a, b = list(arm.values()), list(base.values())
        out = welch_difference(a, b, confidence)
    p_margin = margin_test(a, b, margin_bpb, paired)
    out.update(verdict=verdict_word(out["diff"], out["p_two_sided"], confidence), margin_bpb=margin_bpb,
               p_margin=p_margin, meets_margin=p_margin is not None and p_margin < THRESHOLD_P)
    return out


def progression(arm_values, frontier_values, alpha, margin_bpb=0.0):
    """The maintainers' progression rule: a one-sided Welch test that the arm's per-seed values (plus an
    optional margin) are below the frontier row's per-seed values, passed at p < alpha."""
    t, p = welch_less(np.asarray(arm_values, float) + margin_bpb, frontier_values)
    df = None
    if t is not None:
        df = float(welch_df(np.asarray(arm_values, float), np.asarray(frontier_values, float)))
    return {"t": t, "df": df, "p_less": p, "alpha": alpha, "margin_bpb": margin_bpb,
            "progresses": p is not None and p < alpha}


def one_sample_two_sided(values, reference):
    """Two-sided one-sample t-test p of mean(values) against reference (df = n − 1)."""
    values = np.asarray(values, float)
    if len(values) < 2 or np.ptp(values) == 0:
        return None
    return finite_or_none(st.ttest_1samp(values, reference).pvalue)
