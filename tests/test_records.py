"""Parsing the challenge's published train logs (../shared/fixtures/record-logs) into results rows."""
import json
import statistics

import pytest

from stages import records

# Logs and submission.json print val_loss/val_bpb with 8 decimals: equal up to half a unit of the 8th.
PRINTED_8_DECIMALS = 5e-9
BASELINE = "2026-03-17_NaiveBaseline"
RECUR = "2026-04-09_SP8192_3LayerRecur_LegalTTT"
LQER = "2026-04-27_SP8192_LQER_1.0611"


@pytest.fixture(scope="module")
def parsed(record_logs):
    return {p.name: records.parse_log(p) for p in sorted(record_logs.glob("*.log"))}


def logs_of(parsed, record):
    return [log for log in parsed.values() if log["record"] == record]


# --- one regex, one line --------------------------------------------------------------------

@pytest.mark.parametrize("line, seed", [("seed:1337", 1337), ("  seed: 42", 42)])
def test_seed_line(line, seed):
    assert int(records.SEED_LINE.match(line).group(1)) == seed


def test_seed_line_ignores_other_seed_keys():
    assert records.SEED_LINE.match("  data_seed: 7") is None


@pytest.mark.parametrize("line, step, loss, ms", [
    ("step:13750/20000 train_loss:1.9910 train_time:598726ms step_avg:43.54ms", 13750, 1.991, 598726.0),
    ("500/20000 train_loss: 3.3346 train_time: 0.9m tok/s: 7691255", 500, 3.3346, 54000.0),
])
def test_train_step(line, step, loss, ms):
    m = records.TRAIN_STEP.match(line)
    assert (int(m.group(1)), float(m.group(3))) == (step, loss)
    assert records.train_time_ms(m.group(4), m.group(5)) == pytest.approx(ms)


def test_train_step_ignores_warmup_steps():
    assert records.TRAIN_STEP.match("warmup_step: 1/20") is None


@pytest.mark.parametrize("line, step, loss, bpb", [
    ("step:13780/20000 val_loss:2.0606 val_bpb:1.2172 train_time:600038ms step_avg:43.54ms", 13780, 2.0606, 1.2172),
    ("4550/20000 val_loss: 2.8119 val_bpb: 1.0886", 4550, 2.8119, 1.0886),
])
def test_val_step(line, step, loss, bpb):
    m = records.VAL_STEP.match(line)
    assert (int(m.group(1)), float(m.group(3)), float(m.group(4))) == (step, loss, bpb)


@pytest.mark.parametrize("line, ms, step", [
    ("stopping_early: wallclock_cap train_time:600038ms step:13780/20000", 600038, 13780),
    ("stopping_early: wallclock_cap train_time: 588047ms step: 4550/20000", 588047, 4550),
])
def test_stopping_early(line, ms, step):
    m = records.STOPPING.match(line)
    assert (int(m.group(1)), int(m.group(2))) == (ms, step)


def test_submission_size_takes_the_compressed_total_only():
    m = records.SUBMISSION_SIZE.match("Total submission size quantized+pergroup: 15897259 bytes")
    assert int(m.group(2)) == 15897259
    assert records.SUBMISSION_SIZE.match("Total submission size: 67272625 bytes") is None


def test_labelled_eval_and_eval_time():
    line = "quantized_ttt val_loss:2.79180191 val_bpb:1.08079352 eval_time:366525ms"
    m = records.LABELLED_EVAL.match(line)
    assert (m.group(1), float(m.group(2)), float(m.group(3))) == ("quantized_ttt", 2.79180191, 1.08079352)
    assert float(records.EVAL_TIME.search(line).group(1)) == 366525


def test_labelled_eval_does_not_take_step_lines():
    assert records.LABELLED_EVAL.match("step:200/20000 val_loss:2.8397 val_bpb:1.6774") is None
    assert records.LABELLED_EVAL.match("4000/20000 val_loss: 2.8722 val_bpb: 1.1119") is None


def test_eval_time_found_after_other_fields():
    ev = records.parse_labelled_eval("final_int6_sliding_window val_loss:1.9 val_bpb:1.1 stride:64 eval_time:77000ms")
    assert (ev["point"], ev["mode"], ev["seconds"]) == ("quant", "sliding", 77.0)


def test_seed_in_name():
    assert records.SEED_IN_NAME.search("2026-04-27_SP8192_LQER_1.0611_seed1234").group(1) == "1234"


@pytest.mark.parametrize("label, kind", [
    ("pre-quantization post-ema", ("prequant", "standard")),
    ("diagnostic pre-quantization post-ema", ("prequant", "standard")),
    ("DIAGNOSTIC post_ema", ("prequant", "standard")),
    ("final_int8_zlib_roundtrip", ("quant", "standard")),
    ("quantized", ("quant", "standard")),
    ("diagnostic quantized", ("quant", "standard")),
    ("quantized_sliding_window", ("quant", "sliding")),
    ("final_int6_sliding_window", ("quant", "sliding")),
    ("quantized_ttt", ("quant", "ttt")),
    ("quantized_ttt_phased", ("quant", "ttt")),
    ("legal_ttt", ("quant", "ttt")),
    ("rescued_quantized", ("rescue", "standard")),  # caddie's exports (stages/recordlog.py)
    ("rescued_quantized_ttt", ("rescue", "ttt")),
    ("some_probe", None),
])
def test_eval_point_mode(label, kind):
    assert records.eval_point_mode(label) == kind


@pytest.mark.parametrize("name, record", [
    ("2026-03-17_NaiveBaseline_train.log", BASELINE),
    ("2026-04-27_SP8192_LQER_1.0611_seed0.log", LQER),
    ("2026-04-27_SP8192_LQER_1.0611_submission.json", LQER),
    ("records/2026-04-09_X/train_seed42.log", "2026-04-09_X"),
    ("records/2026-04-09_X/submission.json", "2026-04-09_X"),
])
def test_record_name(name, record):
    assert records.record_name(name) == record


# --- synthetic logs -------------------------------------------------------------------------

def write_log(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_log_without_final_metric_raises_naming_the_file(tmp_path):
    path = write_log(tmp_path, "broken_seed3.log", "seed:3", "step:1/10 train_loss:6.9 train_time:24ms",
                     "step:10/10 val_loss:5.0 val_bpb:3.0 train_time:240ms", "Traceback (most recent call last):")
    with pytest.raises(ValueError, match="broken_seed3.log"):
        records.parse_log(path)


def test_seed_comes_from_the_file_name_when_the_log_prints_none(tmp_path):
    path = write_log(tmp_path, "X_seed7.log", "quantized val_loss:2.0 val_bpb:1.2 eval_time:1000ms")
    assert records.parse_log(path)["seed"] == 7


def test_exact_line_refines_its_eval_and_keeps_the_eval_time(tmp_path):
    path = write_log(tmp_path, "X_seed1.log",
                     "final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:1.2244 eval_time:1401ms",
                     "final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:1.22436570")
    (ev,) = records.parse_log(path)["evals"]
    assert (ev["val_bpb"], ev["seconds"]) == (1.2243657, 1.401)


def test_rows_keep_the_last_eval_of_a_kind(tmp_path):
    path = write_log(tmp_path, "X_seed1.log",
                     "quantized_sliding_window val_loss:2.1 val_bpb:1.10 eval_time:1000ms",
                     "quantized_sliding_window val_loss:2.0 val_bpb:1.09 eval_time:2000ms")
    (row,) = records.results_rows([path])
    assert (row["mode"], row["val_bpb"], row["seconds"]) == ("sliding", 1.09, 2.0)


def test_single_seed_submission_needs_exactly_one_matching_log(tmp_path):
    sub = tmp_path / "R_submission.json"
    sub.write_text(json.dumps({"val_bpb": 1.5}))
    with pytest.raises(ValueError, match="R_submission.json"):
        records.submission_seed_bpb(sub)
    write_log(tmp_path, "R_train.log", "seed:9")
    write_log(tmp_path, "Other_train.log", "seed:8")
    assert records.submission_seed_bpb(sub) == {"9": 1.5}


# --- the published records ------------------------------------------------------------------

@pytest.mark.parametrize("record", [BASELINE, LQER])
def test_final_equals_submission_per_seed(record_logs, parsed, record):
    expected = records.submission_seed_bpb(record_logs / f"{record}_submission.json")
    got = {str(log["seed"]): log["final"]["val_bpb"] for log in logs_of(parsed, record)}
    assert got.keys() == expected.keys()
    for seed, bpb in expected.items():
        assert got[seed] == pytest.approx(bpb, abs=PRINTED_8_DECIMALS)


def test_baseline_final_is_the_int8_zlib_roundtrip(parsed):
    (log,) = logs_of(parsed, BASELINE)
    assert log["seed"] == 1337
    assert log["final"] == pytest.approx({"point": "quant", "mode": "standard", "val_loss": 2.07269931,
                                          "val_bpb": 1.2243657}, abs=PRINTED_8_DECIMALS)
    assert (log["train_steps"], log["train_seconds"], log["artifact_bytes"]) == (13780, 600.038, 15863489)


def test_lqer_matches_its_submission_details(record_logs, parsed):
    sub = json.loads((record_logs / f"{LQER}_submission.json").read_text())
    logs = logs_of(parsed, LQER)
    for log in logs:
        r = sub["seed_results"][str(log["seed"])]
        assert log["final"]["val_loss"] == pytest.approx(r["val_loss"], abs=PRINTED_8_DECIMALS)
        assert (log["artifact_bytes"], log["train_steps"]) == (r["artifact_bytes"], r["steps"])
        ttt = next(e for e in log["evals"] if e["mode"] == "ttt")
        assert round(ttt["seconds"], 1) == r["eval_time_s"]
    mean = statistics.mean(log["final"]["val_bpb"] for log in logs)
    assert mean == pytest.approx(sub["val_bpb"], abs=PRINTED_8_DECIMALS)


def test_three_layer_recur_has_three_seeds_with_ttt_finals(parsed):
    logs = logs_of(parsed, RECUR)
    assert sorted(log["seed"] for log in logs) == [42, 314, 999]
    for log in logs:
        assert (log["final"]["point"], log["final"]["mode"]) == ("quant", "ttt")
        assert {(e["point"], e["mode"]) for e in log["evals"]} == {
            ("prequant", "standard"), ("quant", "standard"), ("quant", "sliding"), ("quant", "ttt")}
    seed42 = next(log for log in logs if log["seed"] == 42)
    assert seed42["final"]["val_bpb"] == 1.08079352


def test_curves_are_non_empty_with_increasing_steps(parsed):
    for name, log in parsed.items():
        steps = [c["step"] for c in log["curve"]]
        assert steps, name
        assert all(a < b for a, b in zip(steps, steps[1:])), name
        assert steps[-1] <= log["train_steps"], name


RESULT_KEYS = ["arm", "seed", "point", "mode", "tokens", "bytes", "raw_bytes", "loss_nats", "val_bpb", "seconds",
               "train_steps", "train_seconds", "artifact_bytes", "source"]


def test_rows_have_exactly_the_results_table_keys(record_logs):
    from stages.aggregate import COLUMNS
    # aggregate may carry more columns (filled with NA for published rows), never fewer of ours
    assert set(RESULT_KEYS) <= set(COLUMNS)
    rows = records.results_rows(sorted(record_logs.glob("*.log")))
    assert rows
    assert all(list(row) == RESULT_KEYS for row in rows)
    assert all(row["source"] == "published" for row in rows)
    keys = [(r["arm"], r["seed"], r["point"], r["mode"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(r["artifact_bytes"] is None for r in rows if r["point"] == "prequant")
    # 1 baseline log x 2 kinds + 3 recur logs x 4 kinds + 3 LQER logs x 3 kinds
    assert len(rows) == 2 + 12 + 9


def test_a_rescued_artifact_is_its_own_point_and_the_final(tmp_path):
    path = write_log(tmp_path, "X_seed1.log",
                     "quantized val_loss:2.10000000 val_bpb:1.20000000 eval_time:1000ms",
                     "rescued_quantized val_loss:2.05000000 val_bpb:1.15000000 eval_time:1100ms",
                     "rescued_quantized_ttt val_loss:2.00000000 val_bpb:1.10000000 eval_time:5000ms")
    log = records.parse_log(path)
    assert log["final"] == {"point": "rescue", "mode": "ttt", "val_loss": 2.0, "val_bpb": 1.1}
    assert {(r["point"], r["mode"]) for r in records.results_rows([path])} == {
        ("quant", "standard"), ("rescue", "standard"), ("rescue", "ttt")}


def test_every_label_an_export_writes_reads_back_as_its_point_and_mode():
    from stages import recordlog
    for point in recordlog.POINT_LABELS:
        for mode in recordlog.MODE_SUFFIXES:
            assert records.eval_point_mode(recordlog.eval_label(point, mode)) == (point, mode)
