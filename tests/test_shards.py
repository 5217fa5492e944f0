"""The challenge's shard format: byte-exact header, validation errors that name the file, atomic writes."""
import json
import os
import re

import numpy as np
import pytest

from stages import shards
from stages.shards import ShardError, load_tokens, manifest_shards, read_shard, write_shard


def expected_header(n: int) -> bytes:
    return np.array([20240520, 1, n] + [0] * 253, dtype="<i4").tobytes()


def corrupt(path, offset: int, value: int):
    """Overwrite one little-endian int32 of a shard's header."""
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.array([value], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


# --- round trip and byte layout -------------------------------------------------------------------

def test_round_trip_keeps_every_id_including_0_and_65535(tmp_path):
    tokens = np.array([0, 1, 2, 255, 256, 1024, 8191, 65534, 65535], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, tokens)
    back = read_shard(path)
    assert back.dtype == np.uint16
    assert back.tolist() == tokens.tolist()


def test_round_trip_of_a_python_list_and_a_uint16_array(tmp_path):
    write_shard(tmp_path / "a.bin", [5, 4, 3])
    write_shard(tmp_path / "b.bin", np.array([5, 4, 3], dtype=np.uint16))
    assert read_shard(tmp_path / "a.bin").tolist() == [5, 4, 3]
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_empty_shard_is_a_bare_header_and_reads_back_empty(tmp_path):
    path = tmp_path / "empty.bin"
    write_shard(path, np.zeros(0, dtype=np.int64))
    assert path.read_bytes() == expected_header(0)
    back = read_shard(path)
    assert len(back) == 0 and back.dtype == np.uint16
    assert shards.read_header(path) == 0


def test_header_is_byte_exact_and_payload_is_little_endian_uint16(tmp_path):
    tokens = [1, 258, 65535, 7, 0x1234]
    path = tmp_path / "s.bin"
    write_shard(path, tokens)
    data = path.read_bytes()
    assert data[:1024] == expected_header(len(tokens))
    assert len(data) == 1024 + 2 * len(tokens)
    assert data[1024:] == np.array(tokens, dtype="<u2").tobytes()
    assert data[1024 + 2 * 4:] == b"\x34\x12"  # low byte first


def test_header_bytes_helper_matches_the_challenge_layout():
    assert shards.header_bytes(123456) == expected_header(123456)


def test_shard_name_is_zero_padded_to_six_digits():
    assert shards.shard_name("train", 3) == "fineweb_train_000003.bin"
    assert shards.shard_name("val", 123456) == "fineweb_val_123456.bin"


# --- malformed files ------------------------------------------------------------------------------

@pytest.fixture
def good_shard(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100))
    return path


def test_truncated_file_raises_naming_the_file_and_the_size(good_shard):
    good_shard.write_bytes(good_shard.read_bytes()[:-3])
    with pytest.raises(ShardError) as err:
        read_shard(good_shard)
    message = str(err.value)
    assert str(good_shard) in message
    assert "truncated" in message and str(1024 + 200) in message


def test_padded_file_raises(good_shard):
    good_shard.write_bytes(good_shard.read_bytes() + b"\0\0")
    with pytest.raises(ShardError, match="truncated or padded"):
        read_shard(good_shard)


@pytest.mark.parametrize("size", [0, 10, 1023])
def test_file_shorter_than_the_header_raises(tmp_path, size):
    path = tmp_path / "short.bin"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(ShardError) as err:
        read_shard(path)
    assert str(path) in str(err.value)
    assert "shorter than the 1024-byte header" in str(err.value)


def test_wrong_magic_raises(good_shard):
    corrupt(good_shard, 0, 20240521)
    with pytest.raises(ShardError) as err:
        read_shard(good_shard)
    assert str(good_shard) in str(err.value)
    assert "magic 20240521" in str(err.value)


def test_wrong_version_raises(good_shard):
    corrupt(good_shard, 4, 2)
    with pytest.raises(ShardError) as err:
        read_shard(good_shard)
    assert str(good_shard) in str(err.value)
    assert "version 2" in str(err.value)


def test_header_count_disagreeing_with_the_size_raises(good_shard):
    corrupt(good_shard, 8, 101)
    with pytest.raises(ShardError, match=re.escape(str(good_shard))):
        read_shard(good_shard)


def test_shard_error_is_a_value_error():
    assert issubclass(ShardError, ValueError)


# --- out-of-range ids -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [70000, 65536, -1])
def test_write_refuses_ids_outside_uint16_naming_the_file_and_id(tmp_path, bad):
    path = tmp_path / "fineweb_train_000000.bin"
    with pytest.raises(ShardError) as err:
        write_shard(path, [1, 2, bad, 3])
    assert str(path) in str(err.value)
    assert str(bad) in str(err.value)
    assert not path.exists()


def test_write_refuses_a_2d_array(tmp_path):
    with pytest.raises(ShardError, match="1-D"):
        write_shard(tmp_path / "x.bin", np.zeros((2, 3), dtype=np.int64))


def test_read_with_vocab_size_refuses_an_id_outside_the_vocabulary(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, [1, 5, 1023, 1024, 7])
    with pytest.raises(ShardError) as err:
        read_shard(path, vocab_size=1024)
    assert str(path) in str(err.value)
    assert "1024" in str(err.value)


def test_read_with_vocab_size_accepts_ids_just_inside(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [0, 1023, 1])
    assert read_shard(path, vocab_size=1024).tolist() == [0, 1023, 1]


def test_vocab_error_reports_an_id_together_with_its_real_position(tmp_path):
    """The message says 'token id X at position P': tokens[P] must be X (here: 7 at 1, or 10 at 2)."""
    path = tmp_path / "s.bin"
    tokens = [0, 7, 10, 2]
    write_shard(path, tokens)
    with pytest.raises(ShardError) as err:
        read_shard(path, vocab_size=6)
    found = re.search(r"token id (\d+) at position (\d+)", str(err.value))
    assert found, str(err.value)
    token_id, position = int(found[1]), int(found[2])
    assert token_id >= 6
    assert tokens[position] == token_id, str(err.value)


def test_load_tokens_applies_the_vocab_check(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2])
    write_shard(tmp_path / "b.bin", [1, 600])
    with pytest.raises(ShardError, match="b.bin"):
        load_tokens([tmp_path / "a.bin", tmp_path / "b.bin"], vocab_size=512)


# --- several shards -------------------------------------------------------------------------------

def test_load_tokens_concatenates_in_the_order_given(tmp_path):
    parts = {"a.bin": [1, 2, 3], "b.bin": [], "c.bin": [9, 8]}
    for name, tokens in parts.items():
        write_shard(tmp_path / name, tokens)
    assert load_tokens([tmp_path / "c.bin", tmp_path / "a.bin"]).tolist() == [9, 8, 1, 2, 3]
    assert load_tokens([tmp_path / n for n in parts]).tolist() == [1, 2, 3, 9, 8]
    assert len(load_tokens([])) == 0


def test_manifest_shards_lists_one_split_in_manifest_order(tmp_path):
    entries = [{"name": "fineweb_val_000000.bin", "split": "val"},
               {"name": "fineweb_train_000002.bin", "split": "train"},
               {"name": "fineweb_val_000001.bin", "split": "val"},
               {"name": "fineweb_train_000000.bin", "split": "train"}]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": entries}))
    assert manifest_shards(manifest, "train", verify=False) == [tmp_path / "fineweb_train_000002.bin",
                                                                tmp_path / "fineweb_train_000000.bin"]
    assert manifest_shards(manifest, "val", verify=False) == [tmp_path / "fineweb_val_000000.bin",
                                                              tmp_path / "fineweb_val_000001.bin"]
    assert manifest_shards(manifest, "test") == []


def test_a_scrambled_shard_is_an_error_naming_it_and_its_manifest(tmp_path):
    from stages.io import IntegrityError, sha256_file
    path = tmp_path / "fineweb_val_000000.bin"
    write_shard(path, np.arange(100) % 50)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": [{"name": path.name, "split": "val", "sha256": sha256_file(path)}]}))
    assert manifest_shards(manifest, "val") == [path]
    tokens = np.fromfile(path, dtype="<u2", offset=1024)
    write_shard(path, tokens[::-1])  # same tokens, same size, another order
    with pytest.raises(IntegrityError, match=rf"{path}: sha256 .* recorded in {manifest}"):
        manifest_shards(manifest, "val")


# --- atomic writes --------------------------------------------------------------------------------

def test_a_refused_write_leaves_the_previous_good_shard_and_no_temp_files(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [1, 2, 3])
    before = path.read_bytes()
    with pytest.raises(ShardError):
        write_shard(path, [1, 70000])
    assert path.read_bytes() == before
    assert read_shard(path).tolist() == [1, 2, 3]
    assert os.listdir(tmp_path) == [path.name]


def test_a_write_failing_midway_leaves_the_previous_good_shard_and_no_temp_files(tmp_path, monkeypatch):
    """Simulate a full disk: the first write lands partly, then raises."""
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, [1, 2, 3])
    before = path.read_bytes()
    real_open = open

    class DiskFull:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shards, "open", lambda p, mode="r", *a, **k: DiskFull(real_open(p, mode)),
                        raising=False)
    with pytest.raises(OSError, match=f"no space left on device while writing {path}"):
        write_shard(path, np.arange(1000))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_a_successful_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])
    write_shard(path, [4, 5])
    assert read_shard(path).tolist() == [4, 5]
    assert os.listdir(tmp_path) == ["s.bin"]


def test_write_creates_missing_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "s.bin"
    write_shard(path, [1])
    assert read_shard(path).tolist() == [1]


@pytest.mark.parametrize("edit, message", [
    (lambda shards: shards.append({**shards[0], "split": "train"}), "is listed under split 'train'"),
    (lambda shards: shards.append(dict(shards[1])), "is listed more than once"),
    (lambda shards: shards[1].update(sha256=shards[0]["sha256"]), "has the same bytes as val shard"),
])
def test_a_manifest_that_lists_val_as_train_is_refused(tmp_path, edit, message):
    from stages.io import sha256_file
    shards = []
    for name, split, tokens in (("fineweb_val_000000.bin", "val", [1, 5, 6]), ("fineweb_train_000000.bin", "train", [1, 7])):
        write_shard(tmp_path / name, tokens)
        shards.append({"name": name, "split": split, "sha256": sha256_file(tmp_path / name)})
    edit(shards)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"shards": shards}))
    with pytest.raises(ShardError, match=message):
        manifest_shards(manifest, "train")


def test_shard_set_reads_windows_by_shard_and_offset_without_crossing_shards(tmp_path):
    from stages.shards import ShardSet
    a, b = np.arange(0, 10, dtype=np.uint16), np.arange(100, 104, dtype=np.uint16)
    write_shard(tmp_path / "a.bin", a)
    write_shard(tmp_path / "b.bin", b)
    write_shard(tmp_path / "empty.bin", np.zeros(0, dtype=np.uint16))
    shards = ShardSet([tmp_path / "a.bin", tmp_path / "empty.bin", tmp_path / "b.bin"])
    assert shards.num_tokens == 14
    assert shards.window_counts(5).tolist() == [6, 0, 0]
    assert shards.read([2, 0, 0], [1, 3, 0], 3).tolist() == [[101, 102, 103], [3, 4, 5], [0, 1, 2]]
    shard, offset = shards.random_windows(np.random.default_rng(0), 2000, 4)
    assert set(shard.tolist()) == {0, 2}  # never the empty shard
    assert ((offset >= 0) & (offset + 4 <= shards.lengths[shard])).all()
    assert sorted(set(zip(shard.tolist(), offset.tolist()))) == [(0, o) for o in range(7)] + [(2, 0)]
    with pytest.raises(ValueError, match="window of 11 tokens"):
        shards.random_windows(np.random.default_rng(0), 1, 11)


def test_document_chunks_equal_splitting_the_concatenated_split(tmp_path):
    """Documents cut by chunk and shard boundaries come out whole, as if the shards were concatenated."""
    from stages.shards import ShardSet, document_chunks, document_spans
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 6, size=n).astype(np.uint16) for n in (37, 1, 0, 50, 23)]  # 1 = BOS, often
    parts[3][:20] = 4  # a long document across a chunk boundary
    for i, p in enumerate(parts):
        write_shard(tmp_path / f"s{i}.bin", p)
    whole = np.concatenate(parts).astype(np.int64)
    expected = [whole[a:b].tolist() for a, b in zip(*document_spans(whole, 1))]
    shards = ShardSet([tmp_path / f"s{i}.bin" for i in range(len(parts))])
    for chunk in (1, 4, 7, 1000):
        got = [t[a:b].tolist() for t, starts, ends in document_chunks(shards, 1, chunk) for a, b in zip(starts, ends)]
        assert got == expected, chunk


def test_windows_outside_the_shards_are_an_error_naming_their_source(tmp_path):
    from stages.shards import ShardSet
    write_shard(tmp_path / "a.bin", np.arange(10, dtype=np.uint16))
    shards = ShardSet([tmp_path / "a.bin"])
    shards.check_windows([0, 0], [0, 5], 5, "buckets.npz")
    with pytest.raises(ShardError, match=r"buckets.npz: window 1 \(shard 0, offset 6, 5 tokens\)"):
        shards.check_windows([0, 0], [0, 6], 5, "buckets.npz")
    with pytest.raises(ShardError, match=r"window 0 \(shard 1"):
        shards.check_windows([1], [0], 5, "buckets.npz")


def test_split_shards_leave_out_the_caseops_byte_sidecars(tmp_path):
    from stages.shards import split_shards
    for name in ("fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "fineweb_train_000001.bin",
                 "fineweb_train_000000.bin", "fineweb_train_bytes_000000.bin"):
        write_shard(tmp_path / name, np.zeros(3, dtype=np.uint16))
    assert [p.name for p in split_shards(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    assert [p.name for p in split_shards(tmp_path, "train")] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
