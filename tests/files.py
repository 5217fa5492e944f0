"""Test helpers that write stage files as their stages do (with the summary recording their sha256) and
corrupt them the way a disk or a hand edit would."""
from pathlib import Path

import torch

from stages.io import sha256_file, write_json


def save_checkpoint(folder: Path, state: dict, model_config: dict) -> Path:
    """model.pt and the train summary.json that records its sha256, as the train stage writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "model_config": model_config}, folder / "model.pt")
    write_json(folder / "summary.json", {"model_sha256": sha256_file(folder / "model.pt")})
    return folder / "model.pt"


def summary_of(path: Path) -> Path:
    """The summary.json of the stage that wrote `path` (it lies beside it)."""
    return Path(path).parent / "summary.json"


def flip_mantissa_bit(checkpoint: Path, tensor: torch.Tensor) -> None:
    """Flip the lowest mantissa bit of the first element of `tensor` (fp32) where model.pt stores it:
    torch.load still reads the file, with one weight changed by one ulp."""
    data = bytearray(checkpoint.read_bytes())
    at = data.find(tensor.detach().float().contiguous().numpy().tobytes()[:64])
    assert at >= 0, "tensor bytes not found in the checkpoint"
    data[at] ^= 0x01  # little-endian: the first byte holds the lowest mantissa bits
    checkpoint.write_bytes(bytes(data))


def change_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
