"""A consumed file that is not what its stage wrote is an error naming it, at every stage that reads it."""
import json

import pytest

from conftest import tiny_quantize_config
from files import change_byte, summary_of
from stages import evaluate, pack, quantize, rescue
from stages.io import IntegrityError, sha256_file, write_json

EVAL = {"seq_len": 64, "stride": 64, "batch_seqs": 8, "device": "cpu", "doc_isolation": False,
        "ogd": {"enabled": False, "lr": 0.5}, "point": "quant"}


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize")
    quantize.run(tiny_quantize_config(compressor="zstd"), tiny_checkpoint, summary_of(tiny_checkpoint),
                 tiny_data["manifest"], 1, out / "artifact.bin", out / "summary.json")
    return out / "artifact.bin"


def changed_copy(artifact, folder, position):
    """artifact.bin and its quantize summary, copied, with one byte of the artifact changed."""
    folder.mkdir()
    (folder / "artifact.bin").write_bytes(artifact.read_bytes())
    (folder / "summary.json").write_text(summary_of(artifact).read_text())
    change_byte(folder / "artifact.bin", position)
    return folder / "artifact.bin"


def test_evaluate_scores_the_artifact_its_summary_records(artifact, tiny_data, tmp_path):
    result = evaluate.run(EVAL, "standard", artifact, summary_of(artifact), tiny_data["manifest"], tmp_path / "q.json")
    recorded = json.loads(summary_of(artifact).read_text())["artifact_sha256"]
    assert result["model_sha256"] == sha256_file(artifact) == recorded


@pytest.mark.parametrize("position", [0, 8, 20, 500, -40, -1])
def test_evaluate_refuses_a_changed_artifact_naming_it(artifact, tiny_data, tmp_path, position):
    changed = changed_copy(artifact, tmp_path / "q", position)
    with pytest.raises(IntegrityError, match=rf"{changed}: sha256 .* recorded in {summary_of(changed)}"):
        evaluate.run(EVAL, "standard", changed, summary_of(changed), tiny_data["manifest"], tmp_path / "q.json")


@pytest.mark.parametrize("position", [8, 20, 500, -40, -1])
def test_the_artifact_s_own_checksum_catches_what_a_rewritten_summary_would_not(artifact, tiny_data, tmp_path,
                                                                                position):
    changed = changed_copy(artifact, tmp_path / "q", position)
    write_json(summary_of(changed), {"artifact_sha256": sha256_file(changed)})
    with pytest.raises(pack.ArtifactError, match=rf"{changed}: .*truncated or corrupt"):
        evaluate.run(EVAL, "standard", changed, summary_of(changed), tiny_data["manifest"], tmp_path / "q.json")


@pytest.mark.parametrize("stage, argv, missing", [
    (quantize, ["--config", "{}", "--checkpoint", "m.pt", "--manifest", "x", "--seed", "1", "--out", "a",
                "--summary", "s"], "--checkpoint-summary"),
    (rescue, ["--config", "{}", "--artifact", "a", "--quantize-summary", "q", "--teacher", "m.pt", "--manifest", "x",
              "--seed", "1", "--out", "o", "--summary", "s"], "--teacher-summary"),
    (evaluate, ["--config", "{}", "--mode", "standard", "--model", "a", "--manifest", "x", "--out", "o"],
     "--model-summary")])
def test_the_summary_that_verifies_a_consumed_file_is_a_required_argument(stage, argv, missing, capsys):
    with pytest.raises(SystemExit):
        stage.main(argv)
    assert missing in capsys.readouterr().err
