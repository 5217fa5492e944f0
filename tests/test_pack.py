"""The artifact container: its checksums make every corruption or truncation an ArtifactError naming the file."""
import hashlib
import lzma

import numpy as np
import pytest

from stages import pack

SOURCE = "runs/seed1/artifact.bin"


def small_payload() -> bytes:
    rng = np.random.default_rng(0)
    tensors = [{"name": "w", "kind": "rows", "shape": [64, 96], "bits": 6, "container": "bytes",
                "data": rng.integers(-31, 32, (64, 96)).astype(np.int8),
                "scale": rng.uniform(1e-3, 1e-2, 64).astype(np.float16)},
               {"name": "g", "kind": "float", "shape": [64], "data": rng.normal(size=64).astype(np.float32)}]
    return pack.pack_tensors(tensors, {"vocab_size": 64}, {"method": "rtn"})


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("compressor", sorted(pack.COMPRESSORS))
def test_every_flipped_byte_is_an_artifact_error_naming_the_file(compressor, shuffle):
    payload = small_payload()
    blob = pack.compress(payload, compressor, shuffle)
    assert pack.decompress(blob, SOURCE) == payload
    for position in range(len(blob)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(blob)
            flipped[position] ^= mask
            with pytest.raises(pack.ArtifactError, match=SOURCE):
                pack.decompress(bytes(flipped), SOURCE)


@pytest.mark.parametrize("compressor", sorted(pack.COMPRESSORS))
def test_a_truncated_artifact_is_an_artifact_error_saying_so(compressor):
    blob = pack.compress(small_payload(), compressor)
    for length in sorted({0, 1, 6, 7, 9, 40, 41, len(blob) // 2, len(blob) - 33, len(blob) - 32, len(blob) - 1}):
        with pytest.raises(pack.ArtifactError, match=f"{SOURCE}: .*truncated or corrupt"):
            pack.decompress(blob[:length], SOURCE)


def test_an_old_format_artifact_is_named_as_such(tmp_path):
    old = tmp_path / "artifact.bin"
    old.write_bytes(b"CADDIE\x01" + bytes([2, 0]) + b"\x28\xb5\x2f\xfd" + bytes(20))  # v1: MAGIC, tag, flags, zstd
    with pytest.raises(pack.ArtifactError, match=r"artifact.bin: .*old format \(v1\).*rerun quantize"):
        pack.load_artifact(old)


def test_the_payload_checksum_catches_a_decoder_that_returns_other_bytes(monkeypatch):
    blob = pack.compress(small_payload(), "zlib")
    name, decode = pack._BY_TAG[1]
    monkeypatch.setitem(pack._BY_TAG, 1, (name, lambda b: decode(b)[:-1] + b"\x00"))
    with pytest.raises(pack.ArtifactError, match=f"{SOURCE}: the decompressed payload's sha256"):
        pack.decompress(blob, SOURCE)


def test_the_layout_is_magic_tag_flags_digest_stream_digest():
    payload = small_payload()
    blob = pack.compress(payload, "lzma", shuffle=True)
    assert blob[:7] == pack.MAGIC == b"CADDIE\x02" and blob[7] == 4 and blob[8] == 1
    assert blob[9:41] == hashlib.sha256(payload).digest()
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()
    assert pack.byte_unshuffle(lzma.decompress(blob[41:-32])) == payload
