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
