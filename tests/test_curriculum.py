"""curriculum: window scores, quantile buckets, PR #1818's crossfade weights and the seeded sampler."""
import json
import math
import pickle

import numpy as np
import pytest

from stages import curriculum
from stages.shards import load_tokens, manifest_shards

# --- windows and scores ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, seq_len, expected", [
    (9, 4, [0, 4]),      # the last window needs tokens 4..8: exactly 9 tokens
    (8, 4, [0]),         # 8 tokens: a second window would lack its last target
    (13, 4, [0, 4, 8]),
    (5, 4, [0]),
    (4, 4, []),
    (0, 4, []),
])
def test_window_starts_fit_seq_len_plus_one_tokens(num_tokens, seq_len, expected):
    starts = curriculum.window_starts(num_tokens, seq_len)
    assert starts.tolist() == expected
    assert starts.dtype == np.int64
    assert all(s + seq_len + 1 <= num_tokens for s in starts)


def test_unigram_surprisal_is_add_one_smoothed_over_the_whole_vocab():
    tokens = np.array([0, 1, 1, 2, 0, 1, 2, 2, 1])
    surprisal = curriculum.unigram_surprisal(tokens, vocab_size=4)
    # counts 2, 4, 3, 0 -> 3, 5, 4, 1 out of 13
    assert surprisal == pytest.approx([-math.log(3 / 13), -math.log(5 / 13), -math.log(4 / 13),
                                       -math.log(1 / 13)])


def test_sequence_scores_are_the_mean_surprisal_of_each_windows_targets():
    tokens = np.array([0, 1, 1, 2, 0, 1, 2, 2, 1])
    s0, s1, s2 = -math.log(3 / 12), -math.log(5 / 12), -math.log(4 / 12)  # counts 2, 4, 3 plus one
    surprisal = curriculum.unigram_surprisal(tokens, vocab_size=3)
    assert surprisal == pytest.approx([s0, s1, s2])
    starts = curriculum.window_starts(len(tokens), 4)
    scores = curriculum.sequence_scores(tokens, starts, 4, surprisal)
    # window 0: inputs tokens[0:4], targets tokens[1:5] = 1 1 2 0; window 4: targets 1 2 2 1
    assert scores == pytest.approx([(s1 + s1 + s2 + s0) / 4, (s1 + s2 + s2 + s1) / 4], rel=1e-6)
    assert scores.dtype == np.float32


def test_sequence_scores_ignore_each_windows_first_input_token():
    surprisal = np.array([10.0, 1.0])
    tokens = np.array([0, 1, 1, 1, 1])
    assert curriculum.sequence_scores(tokens, np.array([0]), 4, surprisal).tolist() == [1.0]


# --- quantile buckets -----------------------------------------------------------------------------

@pytest.mark.parametrize("n, k", [(100, 4), (1003, 7), (50, 8), (10, 3), (64, 1)])
def test_quantile_buckets_have_near_equal_sizes(n, k):
    scores = np.random.default_rng(n).random(n).astype(np.float32)
    ids, edges = curriculum.quantile_buckets(scores, k)
    sizes = np.bincount(ids, minlength=k)
    assert len(sizes) == k and sizes.sum() == n
    assert sizes.max() - sizes.min() <= 1
    assert len(edges) == k - 1 and np.all(np.diff(edges) >= 0)


def test_bucket_zero_holds_the_lowest_scores_and_buckets_are_monotone():
    scores = np.random.default_rng(0).permutation(200).astype(np.float32)
    ids, _ = curriculum.quantile_buckets(scores, 5)
    order = np.argsort(scores)
    assert np.all(np.diff(ids[order]) >= 0)
    assert set(scores[ids == 0]) == set(np.arange(40, dtype=np.float32))
    assert set(scores[ids == 4]) == set(np.arange(160, 200, dtype=np.float32))
    means = [scores[ids == b].mean() for b in range(5)]
    assert means == sorted(means)


# --- PR #1818's crossfade -------------------------------------------------------------------------

ALL = np.ones(10, dtype=bool)


def test_weights_at_the_start_favour_the_easiest_bucket():
    w = curriculum.bucket_weights(0.0, ALL, 0.02)
    assert w[0] == pytest.approx(1 / 5.02)                 # ~0.199
    assert w[-1] == pytest.approx(0.02 / 5.02)             # ~0.004: the floor
    assert w[1] == pytest.approx((8 / 9) / 5.02)
    assert np.all(np.diff(w) < 0)
    assert w.sum() == pytest.approx(1.0)


def test_weights_halfway_are_uniform():
    assert curriculum.bucket_weights(0.5, ALL, 0.02) == pytest.approx(np.full(10, 0.1))


def test_weights_at_the_end_mirror_the_start():
    start = curriculum.bucket_weights(0.0, ALL, 0.02)
    end = curriculum.bucket_weights(1.0, ALL, 0.02)
    assert end == pytest.approx(start[::-1])
    assert end[-1] == pytest.approx(1 / 5.02)


def test_progress_outside_zero_one_is_clamped():
    assert curriculum.bucket_weights(-3.0, ALL, 0.02) == pytest.approx(curriculum.bucket_weights(0.0, ALL, 0.02))
    assert curriculum.bucket_weights(7.0, ALL, 0.02) == pytest.approx(curriculum.bucket_weights(1.0, ALL, 0.02))


@pytest.mark.parametrize("progress", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_empty_buckets_get_zero_and_weights_sum_to_one(progress):
    nonempty = np.array([True, False, True, True, False, True, True, True, True, False])
    w = curriculum.bucket_weights(progress, nonempty, 0.02)
    assert np.all(w[~nonempty] == 0)
    assert np.all(w[nonempty] > 0)
    assert w.sum() == pytest.approx(1.0)


def test_single_bucket_gets_all_the_weight():
    assert curriculum.bucket_weights(0.7, np.array([True]), 0.02).tolist() == [1.0]


# --- the sampler ----------------------------------------------------------------------------------

SEQ = 64
STARTS = np.arange(1000, dtype=np.int64) * SEQ
BUCKET_IDS = (np.arange(1000) // 100).astype(np.int8)   # 10 buckets of 100, bucket = start // 6400


def sampler(seed=1337, rank=0, floor=0.02):
    return curriculum.BucketSampler(STARTS, BUCKET_IDS, 10, floor, seed, rank)


def bucket_of(starts):
    return np.asarray(starts) // (100 * SEQ)


def test_same_seed_gives_the_same_draws():
    a, b = sampler(seed=7), sampler(seed=7)
    for progress in (0.0, 0.4, 1.0):
        assert a.sample(50, progress).tolist() == b.sample(50, progress).tolist()


def test_different_seeds_or_ranks_give_different_draws():
    base = sampler(seed=7).sample(50, 0.5).tolist()
    assert sampler(seed=8).sample(50, 0.5).tolist() != base
    assert sampler(seed=7, rank=1).sample(50, 0.5).tolist() != base


def test_draws_are_valid_sequence_starts():
    draws = sampler().sample(500, 0.5)
    assert draws.dtype == np.int64
    assert set(draws.tolist()) <= set(STARTS.tolist())


def test_bucket_frequencies_follow_the_weights():
    n = 20_000
    for progress in (0.0, 1.0):
        counts = np.bincount(bucket_of(sampler(seed=3).sample(n, progress)), minlength=10) / n
        expected = curriculum.bucket_weights(progress, ALL, 0.02)
        assert np.abs(counts - expected).max() < 0.015, (progress, counts.round(3))


def test_early_draws_favour_easy_buckets_and_late_draws_hard_ones():
    s = sampler(seed=11)
    steps = 100
    mean_bucket = [bucket_of(s.sample(64, step / (steps - 1))).mean() for step in range(steps)]
    early, late = np.mean(mean_bucket[:20]), np.mean(mean_bucket[-20:])
    assert early < 3.5 < 5.5 < late
    assert np.corrcoef(np.arange(steps), mean_bucket)[0, 1] > 0.9


def test_empty_buckets_are_never_drawn():
    ids = BUCKET_IDS.copy()
    ids[ids == 0] = 1   # bucket 0 (the one favoured at the start) is empty
    s = curriculum.BucketSampler(STARTS, ids, 10, 0.02, seed=5)
    drawn = ids[s.sample(2000, 0.0) // SEQ]
    assert 0 not in set(drawn.tolist())
    assert np.bincount(drawn, minlength=10)[1] > 0


def test_state_dict_resumes_the_exact_stream():
    a = sampler(seed=21)
    a.sample(100, 0.1)
    state = pickle.loads(pickle.dumps(a.state_dict()))   # as a checkpoint would store it
    expected = [a.sample(32, p).tolist() for p in (0.2, 0.5, 0.9)]
    b = sampler(seed=999)
    b.load_state_dict(state)
    assert [b.sample(32, p).tolist() for p in (0.2, 0.5, 0.9)] == expected


def test_state_dict_is_a_snapshot_not_a_live_view():
    a = sampler(seed=21)
    state = a.state_dict()
    first = a.sample(16, 0.5).tolist()
    a.load_state_dict(state)
    assert a.sample(16, 0.5).tolist() == first


# --- curriculum.run on the tiny corpus ------------------------------------------------------------

@pytest.fixture(scope="module")
def run_outputs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    cfg = {"buckets": 4, "seq_len": 64}
    summary = curriculum.run(cfg, tiny_data["manifest"], out / "buckets.npz", out / "curriculum.json")
    return {"summary": summary, "npz": out / "buckets.npz", "json": out / "curriculum.json", "cfg": cfg}


def test_run_writes_the_npz_with_every_key(run_outputs):
    data = np.load(run_outputs["npz"])
    assert set(data.files) == {"starts", "scores", "bucket_ids", "edges", "num_buckets", "seq_len"}
    assert int(data["num_buckets"]) == 4 and int(data["seq_len"]) == 64
    assert len(data["starts"]) == len(data["scores"]) == len(data["bucket_ids"])
    assert len(data["edges"]) == 3


def test_run_scores_windows_of_the_train_split_only(run_outputs, tiny_data):
    data = np.load(run_outputs["npz"])
    train = load_tokens(manifest_shards(tiny_data["manifest"], "train")).astype(np.int64)
    starts = curriculum.window_starts(len(train), 64)
    assert data["starts"].tolist() == starts.tolist()
    surprisal = curriculum.unigram_surprisal(train, tiny_data["info"]["vocab_size"])
    assert data["scores"] == pytest.approx(curriculum.sequence_scores(train, starts, 64, surprisal))
    ids, edges = curriculum.quantile_buckets(data["scores"], 4)
    assert data["bucket_ids"].tolist() == ids.tolist()
    assert data["edges"] == pytest.approx(edges)


def test_run_buckets_are_balanced_and_ordered(run_outputs):
    data = np.load(run_outputs["npz"])
    sizes = np.bincount(data["bucket_ids"], minlength=4)
    assert sizes.max() - sizes.min() <= 1
    means = [data["scores"][data["bucket_ids"] == b].mean() for b in range(4)]
    assert means == sorted(means)


def test_run_writes_a_summary(run_outputs):
    summary = json.loads(run_outputs["json"].read_text())
    assert summary == json.loads(json.dumps(run_outputs["summary"]))
    data = np.load(run_outputs["npz"])
    assert summary["sequences"] == len(data["starts"]) and summary["seq_len"] == 64
    assert summary["config"] == run_outputs["cfg"]
    assert [b["bucket"] for b in summary["buckets"]] == [0, 1, 2, 3]
    assert sum(b["sequences"] for b in summary["buckets"]) == summary["sequences"]
    assert summary["edges"] == pytest.approx(data["edges"].tolist())


def test_fixture_buckets_load_into_a_sampler(tiny_data):
    data = np.load(tiny_data["buckets"])
    s = curriculum.load_sampler(tiny_data["buckets"], tiny_data["buckets_summary"], floor=0.02, seed=1)
    draws = s.sample(200, 0.0)
    index = {int(start): int(b) for start, b in zip(data["starts"], data["bucket_ids"])}
    assert all(int(d) in index for d in draws)
    assert np.mean([index[int(d)] for d in draws]) < 1.5   # start of training: mostly the easy buckets


def test_more_buckets_than_sequences_raise_naming_the_setting(tiny_data, tmp_path):
    train_tokens = tiny_data["info"]["tokens"]["train"]
    cfg = {"buckets": 3, "seq_len": train_tokens // 2}   # at most 2 windows
    with pytest.raises(ValueError, match="curriculum.buckets"):
        curriculum.run(cfg, tiny_data["manifest"], tmp_path / "b.npz", tmp_path / "c.json")
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "c.json").exists()


def test_a_changed_bucket_file_is_refused_naming_it(tiny_data, tmp_path):
    """Every window set to one start would train on a single repeated sequence, with rc 0."""
    import shutil
    from stages.io import IntegrityError
    npz, summary = tmp_path / "buckets.npz", tmp_path / "curriculum.json"
    shutil.copy(tiny_data["buckets"], npz)
    shutil.copy(tiny_data["buckets_summary"], summary)
    data = dict(np.load(npz))
    data["starts"] = np.zeros_like(data["starts"])
    with open(npz, "wb") as f:
        np.savez(f, **data)
    with pytest.raises(IntegrityError, match=rf"{npz}: sha256 .* recorded in {summary}"):
        curriculum.load_sampler(npz, summary, floor=0.02, seed=1)
