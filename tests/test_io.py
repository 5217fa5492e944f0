import builtins
import json

import pytest
import torch

from stages import io


def test_a_full_disk_is_named_with_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    target = tmp_path / "model.pt"
    real_open = builtins.open
    monkeypatch.setattr(io, "open", lambda path, mode="r", *a, **k:
                        real_open("/dev/full", mode) if "w" in mode else real_open(path, mode, *a, **k), raising=False)
    with pytest.raises(OSError, match=f"no space left on device while writing {target}"):
        io.save_torch(target, {"w": torch.zeros(100_000)})
    assert list(tmp_path.iterdir()) == []


def test_verify_recorded_names_the_file_and_the_summary(tmp_path):
    data, summary = tmp_path / "artifact.bin", tmp_path / "summary.json"
    data.write_bytes(b"abc")
    summary.write_text(json.dumps({"artifact_sha256": io.sha256_file(data)}))
    io.verify_recorded(data, summary, "artifact_sha256")
    data.write_bytes(b"abd")
    with pytest.raises(io.IntegrityError, match=rf"{data}: sha256 .* recorded in {summary}"):
        io.verify_recorded(data, summary, "artifact_sha256")
    with pytest.raises(io.IntegrityError, match=rf"{summary}: no 'model_sha256' recorded"):
        io.verify_recorded(data, summary, "model_sha256")
