import copy
import json

import numpy as np
import pytest

from conftest import default_config
from stages import records, submission
from stages import config as caddie
from stages.io import sha256_file, write_json
from stages.shards import write_shard


def rows(**overrides):
    base = {"seed": 1, "point": "quant", "mode": "sliding", "val_loss": 2.0, "val_bpb": 1.2, "eval_seconds": 30.0,
            "steps": 100, "train_seconds": 500.0, "device": "cpu", "artifact_bytes": 15_000_000,
            "code_bytes": 50_000, "cap_bytes": 16_000_000, "calibration_source": "train", "resumed": False,
            "hessian_seconds": 0.0, "val_tokens": 1000, "pre_quant_bpb": 1.1, "post_quant_bpb": 1.25}
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
                           "score_first_eval", "three_seeds", "no_resumed_runs"}


@pytest.mark.parametrize("overrides, overlap, failed", [
    ({"train_seconds": 600.5}, CLEAN, "train_under_600s"),
    ({"eval_seconds": 601.0}, CLEAN, "eval_under_600s"),
    ({"artifact_bytes": 16_000_001}, CLEAN, "artifact_under_16mb"),
    ({}, {"val_docs": 40, "val_docs_in_train": 1}, "no_val_in_training"),
    ({"calibration_source": "val"}, CLEAN, "no_val_in_training"),
    ({"train_seconds": 590.0, "hessian_seconds": 11.0}, CLEAN, "train_under_600s"),  # GPTQ inside the budget
    ({"resumed": True}, CLEAN, "no_resumed_runs"),
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


def test_the_frontier_item_follows_the_progression_test():
    row = {"progresses": False, "p_less": 0.4, "alpha": 0.25, "margin_bpb": 0.0021, "diff": -0.001}
    checks = submission.compliance(rows(), CLEAN, SCORE, row)
    assert [k for k, c in checks.items() if not c["ok"]] == ["beats_frontier"]
    assert "p = 0.4 (threshold 0.25)" in checks["beats_frontier"]["detail"]
    assert submission.compliance(rows(), CLEAN, SCORE, {**row, "progresses": True})["beats_frontier"]["ok"]


def fake_seed(tmp_path, spec, seed, resumed=False):
    """A seed's artifacts as the stages write them: train summary and metrics, eval results, quantize summary and
    the artifact's size."""
    folder = tmp_path / f"seed{seed}"
    iterations = spec["train"]["train"]["iterations"]
    metrics = [{"step": i, "loss": 6.0 - i / iterations, "lr_mul": 1.0, "tokens": i * 1024, "ms": 12.5 * i,
                "step_ms": 12.5} for i in range(1, iterations + 1)]
    (folder).mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    write_json(folder / "train.json", {"steps": iterations, "train_seconds": 12.5 * iterations / 1000, "params": 1234,
                                       "world_size": 1, "device": "cpu", "resumed": resumed,
                                       "stopped_by": "iterations", "run": {"log_every": 7, "checkpoint_every": 0}})
    write_json(folder / "quant.json", {"compressor": "zlib", "model_bytes": 90_000, "cap_bytes": 16_000_000,
                                       "hessian_seconds": 0.5, "config": {"calibration": {"source": "train"}}})
    write_json(folder / "size.json", {"model_bytes": 90_000, "code_bytes": 41_000, "total_bytes": 131_000,
                                      "cap_bytes": 16_000_000, "headroom_bytes": 15_869_000,
                                      "code": {"accounting": "minified", "raw_bytes": 160_000, "bytes": 41_000}})
    runs = []
    for i, ev in enumerate(spec["evaluations"]):
        result = {"point": ev["point"], "mode": ev["mode"], "loss_nats": 3.1 - i / 7 + seed / 1e5,
                  "val_bpb": 1.4 - i / 9 + seed / 1e6, "seconds": 2.25 + i, "tokens": 5000}
        write_json(folder / f"{ev['point']}_{ev['mode']}.json", result)
        runs.append({"seed": seed, "point": ev["point"], "mode": ev["mode"],
                     "eval": str(folder / f"{ev['point']}_{ev['mode']}.json"),
                     "train_summary": str(folder / "train.json"), "train_metrics": str(folder / "metrics.jsonl"),
                     "quantize_summary": None if ev["point"] == "prequant" else str(folder / "quant.json"),
                     "size": None if ev["point"] == "prequant" else str(folder / "size.json"),
                     "calibration_summary": str(folder / "quant.json")})
    return runs


def test_the_published_log_parser_reads_the_exported_logs_back_to_the_seed_results(tmp_path):
    cfg = copy.deepcopy(default_config()["defaults"])
    cfg["train"]["iterations"] = 30
    spec = caddie.export_spec(cfg)
    manifest = tmp_path / "data" / "manifest.json"
    write_json(manifest, {"shards": [{"name": "fineweb_train_000000.bin", "split": "train"},
                                     {"name": "fineweb_val_000000.bin", "split": "val"}],
                          "tokens": {"train": 9000, "val": 5001}, "tokenizer": {"file": "tokenizer.model"}})
    runs = [r for seed in (42, 7) for r in fake_seed(tmp_path, spec, seed)]
    score = {"point": "quant", "mode": "ttt"}
    chosen = submission.seed_rows(runs, score)
    results = {r["seed"]: submission.seed_result(r) for r in chosen}
    for seed, result in results.items():
        path = tmp_path / f"train_seed{seed}.log"
        path.write_text(submission.seed_log(spec, runs, seed, manifest))
        log = records.parse_log(path)
        assert log["seed"] == seed and log["record"] == tmp_path.name
        assert log["final"] == {"point": "quant", "mode": "ttt", "val_loss": result["val_loss"],
                                "val_bpb": result["val_bpb"]}
        assert (log["train_steps"], log["train_seconds"], log["artifact_bytes"]) == (
            result["steps"], result["train_time_s"], result["artifact_bytes"])
        evals = {(e["point"], e["mode"]): e for e in log["evals"]}
        assert evals[("prequant", "standard")]["val_bpb"] == result["pre_quant_bpb"]
        assert evals[("quant", "standard")]["val_bpb"] == result["post_quant_bpb"]
        assert evals[("quant", "ttt")]["seconds"] == result["eval_time_s"]
        assert [c["step"] for c in log["curve"]] == [1, 7, 14, 21, 28, 30]
        text = path.read_text()
        assert text.startswith("Hyperparameters:\n") and "  seed: " + str(seed) in text
        assert "train_shards: 1\nval_tokens: 5001\n" in text and "Code size (compressed): 41000 bytes" in text


def test_a_resumed_run_is_flagged_in_its_log(tmp_path):
    spec = caddie.export_spec(default_config()["defaults"])
    manifest = tmp_path / "manifest.json"
    write_json(manifest, {"shards": [], "tokens": {"train": 1, "val": 1}, "tokenizer": {"file": "t.model"}})
    runs = fake_seed(tmp_path, spec, 1, resumed=True)
    assert "resumed_from_checkpoint: True" in submission.seed_log(spec, runs, 1, manifest)
    assert submission.seed_rows(runs, {"point": "quant", "mode": "ttt"})[0]["resumed"]
