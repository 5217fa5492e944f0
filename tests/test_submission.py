import json

import numpy as np
import pytest

from stages import submission
from stages.io import sha256_file
from stages.shards import write_shard


def rows(**overrides):
    base = {"seed": 1, "point": "quant", "mode": "sliding", "val_loss": 2.0, "val_bpb": 1.2, "eval_seconds": 30.0,
            "steps": 100, "train_seconds": 500.0, "device": "cpu", "artifact_bytes": 15_000_000,
            "code_bytes": 50_000, "cap_bytes": 16_000_000, "calibration_source": "train"}
    return [dict(base, seed=s, **overrides) for s in (1, 2, 3)]


SCORE = {"point": "quant", "mode": "sliding"}
CLEAN = {"val_docs": 40, "val_docs_in_train": 0}


def test_document_hashes_split_at_bos():
    tokens = np.array([5, 6, 1, 7, 8, 1, 9, 1, 1, 7, 8])
    expected = {submission.document_hashes(np.array(d), 1).pop() for d in ([5, 6], [7, 8], [9])}
    assert submission.document_hashes(tokens, 1) == expected  # [7, 8] twice is one document; empty docs dropped


def manifest_with(tmp_path, train, val):
    tmp_path.mkdir()
    for name, tokens in (("fineweb_train_000000.bin", train), ("fineweb_val_000000.bin", val)):
        write_shard(tmp_path / name, np.array(tokens, dtype=np.uint16))
    shards = [{"name": name, "split": split, "sha256": sha256_file(tmp_path / name)}
              for name, split in (("fineweb_train_000000.bin", "train"), ("fineweb_val_000000.bin", "val"))]
    (tmp_path / "manifest.json").write_text(json.dumps({"bos_id": 1, "shards": shards}))
    return tmp_path / "manifest.json"


def test_val_overlap_finds_a_val_document_copied_into_train(tmp_path):
    clean = manifest_with(tmp_path / "a", [1, 5, 6, 1, 7, 8], [1, 9, 9, 1, 5, 6, 7])
    leaked = manifest_with(tmp_path / "b", [1, 5, 6, 1, 9, 9], [1, 9, 9, 1, 5, 6, 7])
    assert submission.val_overlap(clean) == {"val_docs": 2, "val_docs_in_train": 0}
    assert submission.val_overlap(leaked) == {"val_docs": 2, "val_docs_in_train": 1}


def test_compliance_passes_a_clean_run():
    checks = submission.compliance(rows(), CLEAN, SCORE)
    assert all(c["ok"] for c in checks.values()), checks
    assert set(checks) == {"train_under_600s", "eval_under_600s", "artifact_under_16mb", "no_val_in_training",
                           "score_first_eval", "three_seeds"}


@pytest.mark.parametrize("overrides, overlap, failed", [
    ({"train_seconds": 600.5}, CLEAN, "train_under_600s"),
    ({"eval_seconds": 601.0}, CLEAN, "eval_under_600s"),
    ({"artifact_bytes": 16_000_001}, CLEAN, "artifact_under_16mb"),
    ({}, {"val_docs": 40, "val_docs_in_train": 1}, "no_val_in_training"),
    ({"calibration_source": "val"}, CLEAN, "no_val_in_training"),
])
def test_compliance_fails_exactly_the_broken_item(overrides, overlap, failed):
    checks = submission.compliance(rows(**overrides), overlap, SCORE)
    assert [k for k, c in checks.items() if not c["ok"]] == [failed]


def test_two_seeds_fail_the_seed_count():
    checks = submission.compliance(rows()[:2], CLEAN, SCORE)
    assert not checks["three_seeds"]["ok"] and "2 seeds" in checks["three_seeds"]["detail"]


def test_submission_json_has_the_challenge_fields_and_sample_std():
    r = rows()
    for row, v in zip(r, (1.20, 1.21, 1.23)):
        row["val_bpb"] = v
    stats = {"vs_reference": {"arm": {"reference": "PR #1", "reference_bpb": 1.3, "diff": -0.08, "t": -9.0,
                                      "p_less": 0.006}}}
    sub = submission.submission_json("arm", {"author": "A", "github_id": "a", "track": "10min_16mb"}, r, stats,
                                     submission.compliance(r, CLEAN, SCORE))
    for key in ("author", "github_id", "name", "blurb", "date", "val_loss", "val_bpb", "val_bpb_std", "seeds",
                "seed_results", "bytes_total", "bytes_code", "compliance", "p_value"):
        assert key in sub
    assert sub["val_bpb"] == pytest.approx(np.mean([1.20, 1.21, 1.23]))
    assert sub["val_bpb_std"] == pytest.approx(np.std([1.20, 1.21, 1.23], ddof=1), abs=1e-8)
    assert sub["seed_results"]["2"]["val_bpb"] == 1.21 and sub["name"] == "arm"
    assert sub["compliance"]["three_seeds"] is True


def test_val_overlap_streams_documents_across_shards_and_confirms_matches_by_hash(tmp_path):
    """A leaked val document cut by a train shard boundary is still found; a train document with the same
    length, sum and sum of squares but other tokens ([6, 5] against [5, 6]) is not a leak."""
    tmp_path.mkdir(exist_ok=True)
    files = {"fineweb_train_000000.bin": [1, 6, 5, 1, 9], "fineweb_train_000001.bin": [9, 3, 1, 2],
             "fineweb_val_000000.bin": [1, 5, 6, 1, 9, 9, 3, 1, 4]}
    for name, tokens in files.items():
        write_shard(tmp_path / name, np.array(tokens, dtype=np.uint16))
    shards = [{"name": n, "split": n.split("_")[1], "sha256": sha256_file(tmp_path / n)} for n in files]
    (tmp_path / "manifest.json").write_text(json.dumps({"bos_id": 1, "shards": shards}))
    assert submission.val_overlap(tmp_path / "manifest.json") == {"val_docs": 3, "val_docs_in_train": 1}
