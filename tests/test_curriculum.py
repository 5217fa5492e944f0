"""curriculum: window scores shard by shard, quantile buckets, PR #1818's crossfade weights and the seeded
sampler of (shard, offset) windows."""
import json
import math
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from stages import curriculum
from stages.io import sha256_file
from stages.shards import ShardError, ShardSet, manifest_shards, write_shard


def naive_scores(tokens, starts, seq_len, surprisal) -> np.ndarray:
    """The definition, window by window: the mean surprisal of tokens[s + 1 : s + seq_len + 1]."""
    per_token = surprisal[np.asarray(tokens, dtype=np.int64)]
    return np.array([per_token[s + 1:s + seq_len + 1].mean() for s in starts], dtype=np.float32)


def shard_set(tmp_path, *parts) -> ShardSet:
    paths = []
    for i, tokens in enumerate(parts):
        paths.append(tmp_path / f"fineweb_train_{i:06d}.bin")
        write_shard(paths[-1], tokens)
    return ShardSet(paths)


def write_manifest(folder, parts, vocab_size) -> Path:
    """Train shards and a manifest as stages.tokenize lists them (name, split, tokens, sha256)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, tokens in enumerate(parts):
        path = folder / f"fineweb_train_{i:06d}.bin"
        write_shard(path, tokens)
        entries.append({"name": path.name, "split": "train", "tokens": len(tokens), "sha256": sha256_file(path)})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"shards": entries, "vocab_size": vocab_size, "bos_id": 1}))
    return manifest


def zipf_tokens(n, vocab_size, seed):
    rng = np.random.default_rng(seed)
    return np.minimum(rng.zipf(1.3, n), vocab_size - 1).astype(np.int64)


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


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 1 << 22])
def test_unigram_counts_add_up_over_shards_and_chunks(tmp_path, chunk_tokens):
    parts = [np.array([0, 1, 1, 2, 0]), np.array([1, 2, 2, 1]), np.array([], dtype=np.int64)]
    counts = curriculum.unigram_counts(shard_set(tmp_path, *parts), vocab_size=4, chunk_tokens=chunk_tokens)
    assert counts.tolist() == [2, 4, 3, 0]


def test_a_token_outside_the_vocabulary_is_an_error_naming_the_shard(tmp_path):
    shards = shard_set(tmp_path, [0, 1, 2], [1, 9, 0])
    with pytest.raises(ShardError, match=rf"{shards.paths[1]}: token id 9 is outside the vocabulary of 4"):
        curriculum.unigram_counts(shards, vocab_size=4)


def test_unigram_surprisal_is_add_one_smoothed_over_the_whole_vocab():
    surprisal = curriculum.unigram_surprisal(np.array([2, 4, 3, 0]))
    # counts 2, 4, 3, 0 -> 3, 5, 4, 1 out of 13
    assert surprisal == pytest.approx([-math.log(3 / 13), -math.log(5 / 13), -math.log(4 / 13),
                                       -math.log(1 / 13)])


def test_window_scores_are_the_mean_surprisal_of_each_windows_targets():
    tokens = np.array([0, 1, 1, 2, 0, 1, 2, 2, 1])
    s0, s1, s2 = -math.log(3 / 12), -math.log(5 / 12), -math.log(4 / 12)  # counts 2, 4, 3 plus one
    surprisal = curriculum.unigram_surprisal(np.bincount(tokens))
    assert surprisal == pytest.approx([s0, s1, s2])
    offsets, scores = curriculum.shard_window_scores(tokens, 4, surprisal)
    # window 0: inputs tokens[0:4], targets tokens[1:5] = 1 1 2 0; window 4: targets 1 2 2 1
    assert offsets.tolist() == [0, 4]
    assert scores == pytest.approx([(s1 + s1 + s2 + s0) / 4, (s1 + s2 + s2 + s1) / 4], rel=1e-6)
    assert scores.dtype == np.float32


def test_window_scores_ignore_each_windows_first_input_token():
    surprisal = np.array([10.0, 1.0])
    assert curriculum.shard_window_scores(np.array([0, 1, 1, 1, 1]), 4, surprisal)[1].tolist() == [1.0]


@pytest.mark.parametrize("chunk_tokens", [1, 64, 100, 1000, 1 << 22])
def test_chunking_does_not_change_the_scores(chunk_tokens):
    tokens = zipf_tokens(10_000, 200, seed=chunk_tokens)
    surprisal = curriculum.unigram_surprisal(np.bincount(tokens, minlength=200))
    offsets, scores = curriculum.shard_window_scores(tokens, 64, surprisal, chunk_tokens)
    assert offsets.tolist() == curriculum.window_starts(len(tokens), 64).tolist()
    assert scores == pytest.approx(naive_scores(tokens, offsets, 64, surprisal), rel=1e-6)


def test_windows_stay_inside_their_shard(tmp_path):
    parts = [zipf_tokens(n, 50, seed=n) for n in (300, 100, 40, 129, 65)]  # 40 < seq_len + 1: no window
    shards = shard_set(tmp_path, *parts)
    surprisal = curriculum.unigram_surprisal(curriculum.unigram_counts(shards, 50))
    shard, offset, scores = curriculum.window_scores(shards, 64, surprisal)
    assert shard.dtype == np.int32 and offset.dtype == np.int64 and scores.dtype == np.float32
    assert shard.tolist() == [0, 0, 0, 0, 1, 3, 3, 4]
    assert offset.tolist() == [0, 64, 128, 192, 0, 0, 64, 0]
    assert np.all(offset + 64 + 1 <= shards.lengths[shard])
    assert curriculum.window_count(shards, 64) == len(shard)
    for s, tokens in enumerate(parts):
        rows = shard == s
        assert scores[rows] == pytest.approx(naive_scores(tokens, offset[rows], 64, surprisal), rel=1e-6)


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
WINDOW = np.arange(1000)                                 # window i: shard i % 3, offset (i // 3) * SEQ
SHARD, OFFSET = (WINDOW % 3).astype(np.int32), (WINDOW // 3) * SEQ
BUCKET_IDS = (WINDOW // 100).astype(np.int8)             # 10 buckets of 100 windows


def sampler(seed=1337, rank=0, floor=0.02, bucket_ids=BUCKET_IDS):
    return curriculum.BucketSampler(SHARD, OFFSET, bucket_ids, 10, floor, seed, rank)


def window_of(draw):
    shard, offset = draw
    return offset // SEQ * 3 + shard


def bucket_of(draw):
    return window_of(draw) // 100


def as_list(draw):
    return [draw[0].tolist(), draw[1].tolist()]


def test_same_seed_gives_the_same_draws():
    a, b = sampler(seed=7), sampler(seed=7)
    for progress in (0.0, 0.4, 1.0):
        assert as_list(a.sample(50, progress)) == as_list(b.sample(50, progress))


def test_different_seeds_or_ranks_give_different_draws():
    base = as_list(sampler(seed=7).sample(50, 0.5))
    assert as_list(sampler(seed=8).sample(50, 0.5)) != base
    assert as_list(sampler(seed=7, rank=1).sample(50, 0.5)) != base


def test_draws_are_windows_of_the_bucket_file():
    shard, offset = sampler().sample(500, 0.5)
    assert len(shard) == len(offset) == 500 and offset.dtype == np.int64
    drawn = set(zip(shard.tolist(), offset.tolist()))
    assert drawn <= set(zip(SHARD.tolist(), OFFSET.tolist()))


def test_bucket_frequencies_follow_the_weights():
    n = 20_000
    for progress in (0.0, 0.3, 1.0):
        counts = np.bincount(bucket_of(sampler(seed=3).sample(n, progress)), minlength=10) / n
        expected = curriculum.bucket_weights(progress, ALL, 0.02)
        assert np.abs(counts - expected).max() < 0.015, (progress, counts.round(3))


def test_members_of_a_bucket_are_drawn_uniformly():
    """100 members, 50,000 draws: a chi-square of 99 degrees of freedom, mean 99 and sd 14."""
    one_bucket = np.zeros(1000, dtype=np.int8)
    one_bucket[100:] = 1 + (WINDOW[100:] % 9)   # bucket 0: windows 0..99
    s = curriculum.BucketSampler(SHARD, OFFSET, one_bucket, 10, 0.0, seed=4)
    draws = window_of(s.sample(200_000, 0.0))   # floor 0 at progress 0: bucket 0 gets 1/5 of the draws
    counts = np.bincount(draws[draws < 100], minlength=100)
    expected = counts.sum() / 100
    assert ((counts - expected) ** 2 / expected).sum() < 99 + 5 * 14
    assert counts.min() > 0


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
    drawn = ids[window_of(sampler(seed=5, bucket_ids=ids).sample(2000, 0.0))]
    assert 0 not in set(drawn.tolist())
    assert np.bincount(drawn, minlength=10)[1] > 0


def test_buckets_need_not_be_stored_in_order():
    """A bucket file lists windows in shard order; the sampler's members must still be each bucket's own."""
    order = np.random.default_rng(0).permutation(1000)
    s = curriculum.BucketSampler(SHARD[order], OFFSET[order], BUCKET_IDS[order], 10, 0.02, seed=6)
    for progress in (0.0, 1.0):
        counts = np.bincount(bucket_of(s.sample(20_000, progress)), minlength=10) / 20_000
        assert np.abs(counts - curriculum.bucket_weights(progress, ALL, 0.02)).max() < 0.015


def test_a_draw_of_zero_sequences_is_empty():
    shard, offset = sampler().sample(0, 0.5)
    assert len(shard) == len(offset) == 0


def test_state_dict_resumes_the_exact_stream():
    a = sampler(seed=21)
    a.sample(100, 0.1)
    state = pickle.loads(pickle.dumps(a.state_dict()))   # as a checkpoint would store it
    expected = [as_list(a.sample(32, p)) for p in (0.2, 0.5, 0.9)]
    b = sampler(seed=999)
    b.load_state_dict(state)
    assert [as_list(b.sample(32, p)) for p in (0.2, 0.5, 0.9)] == expected


def test_state_dict_is_a_snapshot_not_a_live_view():
    a = sampler(seed=21)
    state = a.state_dict()
    first = as_list(a.sample(16, 0.5))
    a.load_state_dict(state)
    assert as_list(a.sample(16, 0.5)) == first


# --- curriculum.run on the tiny corpus ------------------------------------------------------------

@pytest.fixture(scope="module")
def run_outputs(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("curriculum")
    cfg = {"buckets": 4, "seq_len": 64}
    summary = curriculum.run(cfg, tiny_data["manifest"], out / "buckets.npz", out / "curriculum.json")
    return {"summary": summary, "npz": out / "buckets.npz", "json": out / "curriculum.json", "cfg": cfg}


def test_run_writes_the_npz_with_every_key(run_outputs):
    data = np.load(run_outputs["npz"])
    assert set(data.files) == {"shard", "offset", "scores", "bucket_ids", "edges", "num_buckets", "seq_len"}
    assert int(data["num_buckets"]) == 4 and int(data["seq_len"]) == 64
    assert len(data["shard"]) == len(data["offset"]) == len(data["scores"]) == len(data["bucket_ids"])
    assert len(data["edges"]) == 3


def test_run_scores_the_windows_of_each_train_shard(run_outputs, tiny_data):
    data = np.load(run_outputs["npz"])
    train = ShardSet(manifest_shards(tiny_data["manifest"], "train"))
    assert len(train.paths) > 1   # windows must restart at every shard
    vocab_size = tiny_data["info"]["vocab_size"]
    everything = np.concatenate([np.asarray(t, dtype=np.int64) for t in train.shards])
    surprisal = curriculum.unigram_surprisal(np.bincount(everything, minlength=vocab_size))
    for s, tokens in enumerate(train.shards):
        rows = data["shard"] == s
        starts = curriculum.window_starts(len(tokens), 64)
        assert data["offset"][rows].tolist() == starts.tolist()
        assert data["scores"][rows] == pytest.approx(naive_scores(tokens, starts, 64, surprisal), rel=1e-6)
    assert np.all(data["offset"] + 64 + 1 <= train.lengths[data["shard"]])
    ids, edges = curriculum.quantile_buckets(data["scores"], 4)
    assert data["bucket_ids"].tolist() == ids.tolist()
    assert data["edges"] == pytest.approx(edges)


def test_run_on_one_shard_matches_the_global_starts_computation(tmp_path):
    """One shard: the windows and scores of the format that concatenated the split (global starts)."""
    tokens = zipf_tokens(50_000, 300, seed=1)
    manifest = write_manifest(tmp_path / "data", [tokens], vocab_size=300)
    curriculum.run({"buckets": 5, "seq_len": 128}, manifest, tmp_path / "b.npz", tmp_path / "c.json")
    data = np.load(tmp_path / "b.npz")
    starts = curriculum.window_starts(len(tokens), 128)
    surprisal = -np.log((np.bincount(tokens, minlength=300) + 1.0) / (len(tokens) + 300))
    cumulative = np.concatenate([[0.0], np.cumsum(surprisal[tokens])])
    old = ((cumulative[starts + 129] - cumulative[starts + 1]) / 128).astype(np.float32)
    assert data["shard"].tolist() == [0] * len(starts) and data["offset"].tolist() == starts.tolist()
    assert data["scores"] == pytest.approx(old, rel=1e-6)
    assert data["bucket_ids"].tolist() == curriculum.quantile_buckets(old, 5)[0].tolist()


def test_run_memory_does_not_grow_with_the_tokens(tmp_path):
    """numpy reports its arrays to tracemalloc (memmapped shard pages are not allocations): scoring three
    shards of 2M tokens peaks near one shard's peak, far below the 32 bytes per token of a concatenation."""
    peaks = {}
    for shards in (1, 3):
        manifest = write_manifest(tmp_path / f"d{shards}", [zipf_tokens(2_000_000, 1024, seed=s) for s in
                                                           range(shards)], vocab_size=1024)
        tracemalloc.start()
        curriculum.run({"buckets": 8, "seq_len": 256}, manifest, tmp_path / f"b{shards}.npz",
                       tmp_path / f"c{shards}.json")
        peaks[shards] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[3] < peaks[1] + 4_000_000, peaks     # 3 x 7,812 windows: per-window arrays only
    assert peaks[3] < 10 * 6_000_000, peaks           # < 10 bytes per token (the concatenation: 32)


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
    assert summary["sequences"] == len(data["offset"]) and summary["seq_len"] == 64
    assert summary["config"] == run_outputs["cfg"]
    assert [b["bucket"] for b in summary["buckets"]] == [0, 1, 2, 3]
    assert sum(b["sequences"] for b in summary["buckets"]) == summary["sequences"]
    assert summary["edges"] == pytest.approx(data["edges"].tolist())
    assert summary["buckets_sha256"] == sha256_file(run_outputs["npz"])


def test_fixture_buckets_load_into_a_sampler(tiny_data):
    data = np.load(tiny_data["buckets"])
    s = curriculum.load_sampler(tiny_data["buckets"], tiny_data["buckets_summary"], floor=0.02, seed=1)
    shard, offset = s.sample(200, 0.0)
    index = {(int(a), int(o)): int(b) for a, o, b in zip(data["shard"], data["offset"], data["bucket_ids"])}
    drawn = list(zip(shard.tolist(), offset.tolist()))
    assert all(d in index for d in drawn)
    assert np.mean([index[d] for d in drawn]) < 1.5   # start of training: mostly the easy buckets


def test_more_buckets_than_sequences_raise_naming_the_setting(tiny_data, tmp_path):
    train_tokens = tiny_data["info"]["tokens"]["train"]
    cfg = {"buckets": 3, "seq_len": train_tokens // 2}   # at most 2 windows
    with pytest.raises(ValueError, match=rf"{tiny_data['manifest']} cannot fill 3 buckets \(curriculum.buckets\)"):
        curriculum.run(cfg, tiny_data["manifest"], tmp_path / "b.npz", tmp_path / "c.json")
    assert not (tmp_path / "b.npz").exists() and not (tmp_path / "c.json").exists()


def test_a_changed_bucket_file_is_refused_naming_it(tiny_data, tmp_path):
    """Every window set to one offset would train on a few repeated sequences, with rc 0."""
    import shutil
    from stages.io import IntegrityError
    npz, summary = tmp_path / "buckets.npz", tmp_path / "curriculum.json"
    shutil.copy(tiny_data["buckets"], npz)
    shutil.copy(tiny_data["buckets_summary"], summary)
    data = dict(np.load(npz))
    data["offset"] = np.zeros_like(data["offset"])
    with open(npz, "wb") as f:
        np.savez(f, **data)
    with pytest.raises(IntegrityError, match=rf"{npz}: sha256 .* recorded in {summary}"):
        curriculum.load_sampler(npz, summary, floor=0.02, seed=1)


def test_a_bucket_file_of_global_starts_is_refused_naming_the_missing_keys(tmp_path):
    from stages.io import IntegrityError, write_json
    npz, summary = tmp_path / "buckets.npz", tmp_path / "curriculum.json"
    with open(npz, "wb") as f:
        np.savez(f, starts=np.arange(4) * 64, scores=np.zeros(4, np.float32), bucket_ids=np.zeros(4, np.int8),
                 edges=np.zeros(0), num_buckets=1, seq_len=64)
    write_json(summary, {"buckets_sha256": sha256_file(npz)})
    with pytest.raises(IntegrityError, match=rf"{npz}: bucket file lacks \['shard', 'offset'\]; rerun"):
        curriculum.load_sampler(npz, summary, floor=0.02, seed=1)
