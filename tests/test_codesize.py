"""What the challenge counts of the shipped code, and of an artifact with it (stages/codesize.py)."""
import pytest

from stages import codesize
from tests.conftest import ROOT

CODE_FILE = ROOT / "stages" / "model.py"


def test_minified_code_accounting_counts_less_than_raw():
    raw = codesize.measure(CODE_FILE, "raw")
    small = codesize.measure(CODE_FILE, "minified")
    assert raw["bytes"] == raw["raw_bytes"] == len(CODE_FILE.read_bytes())
    assert small["raw_bytes"] == raw["bytes"] and small["bytes"] < raw["bytes"] / 2
    assert small["file"] == raw["file"] == str(CODE_FILE)


def test_a_missing_code_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.py: the arm's exported train_gpt.py is not a file"):
        codesize.measure(tmp_path / "nope.py", "raw")


def test_an_artifact_counts_its_code_and_its_model():
    code = codesize.measure(CODE_FILE, "raw")
    size = codesize.artifact_size(code, {"model_bytes": 1000, "artifact_sha256": "ab"}, 16_000_000, "q.json")
    assert size["total_bytes"] == 1000 + code["bytes"] == size["model_bytes"] + size["code_bytes"]
    assert size["headroom_bytes"] == 16_000_000 - size["total_bytes"] and size["lora_bytes"] is None


def test_an_artifact_over_the_cap_is_an_error_naming_the_summary_and_the_code():
    code = codesize.measure(CODE_FILE, "raw")
    cap = code["bytes"] + 999
    with pytest.raises(codesize.OverCap, match=rf"q.json: artifact is {code['bytes'] + 1000:,} bytes \(model 1,000 "
                                               rf"\+ code {code['bytes']:,} from .*model.py\), over "
                                               rf"quantize.cap_bytes = {cap:,} by 1"):
        codesize.artifact_size(code, {"model_bytes": 1000, "artifact_sha256": "ab"}, cap, "q.json")
