"""tokenize: cleaning, the hashed val split, the sources, shards + manifest, and the trained tokenizer."""
import hashlib
import json
import os
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from conftest import default_config, tiny_tokenize_config

from stages import config as caddie
from stages import corpus, tokenize
from stages.shards import ShardError, load_tokens, manifest_shards, read_header, read_shard

BOS = 1

SUBJECTS = ["The gardener", "A tired pilot", "My neighbour", "The old librarian", "Every student", "Our cat"]
VERBS = ["painted", "carried", "forgot", "discovered", "repaired", "described", "sold", "borrowed",
         "cleaned", "measured"]
OBJECTS = ["a blue bicycle", "the broken clock", "seven apples", "an unusual map", "the kitchen window",
           "two heavy boxes"]


def sentences(n=60):
    """n distinct, varied English sentences."""
    return [f"{SUBJECTS[i % 6]} {VERBS[i % 10]} {OBJECTS[(i // 3) % 6]} on day {i * 37 % 101}, "
            f"and nobody asked why." for i in range(n)]


def files_config(paths, txt_split="file", text_field="text", **overrides):
    cfg = caddie.tokenize_section({**default_config()["defaults"]["tokenize"], "source": "files"})
    cfg.update(files={"paths": [str(p) for p in paths], "txt_split": txt_split, "text_field": text_field},
               min_doc_chars=5, val_docs=2, vocab_size=320, max_docs=0)
    cfg.update(overrides)
    return cfg


def split_streams(tokens):
    """Documents of a BOS-led token stream, without their BOS."""
    starts = np.flatnonzero(np.asarray(tokens) == BOS)
    return [tokens[s + 1:e].tolist() for s, e in zip(starts, list(starts[1:]) + [len(tokens)])]


# --- clean_documents ------------------------------------------------------------------------------

def test_clean_documents_drops_short_ones_keeping_those_exactly_at_the_limit():
    docs = ["tiny", "exactly10!", "long enough document", "123456789"]
    assert tokenize.clean_documents(docs, min_chars=10, max_docs=0) == ["exactly10!", "long enough document"]


def test_clean_documents_drops_exact_duplicates_keeping_first_seen_order():
    docs = ["bravo document", "alpha document", "bravo document", "charlie document", "alpha document",
            "alpha document "]
    assert tokenize.clean_documents(docs, min_chars=1, max_docs=0) == [
        "bravo document", "alpha document", "charlie document", "alpha document "]


def test_clean_documents_caps_at_max_docs_after_removing_duplicates_and_short_ones():
    docs = ["same text here", "same text here", "no", "second document", "third document", "fourth doc"]
    assert tokenize.clean_documents(docs, min_chars=5, max_docs=3) == [
        "same text here", "second document", "third document"]
    assert len(tokenize.clean_documents(docs, min_chars=5, max_docs=0)) == 4


def test_clean_documents_accepts_a_generator():
    assert tokenize.clean_documents((d for d in ["abcdef", "abcdef", "ghijkl"]), 1, 0) == ["abcdef", "ghijkl"]


# --- split_val ------------------------------------------------------------------------------------

DOCS = [f"Document {i}: {s}" for i, s in enumerate(sentences(50))]


def test_split_val_is_deterministic_disjoint_and_of_the_requested_size():
    train, val = tokenize.split_val(DOCS, 7, "salt")
    assert (train, val) == tokenize.split_val(DOCS, 7, "salt")
    assert len(val) == 7 and len(train) == len(DOCS) - 7
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)


def test_split_val_keeps_input_order_within_each_split():
    train, val = tokenize.split_val(DOCS, 7, "salt")
    assert val == [d for d in DOCS if d in set(val)]
    assert train == [d for d in DOCS if d in set(train)]


def test_split_val_chooses_by_hash_not_position():
    shuffled = list(DOCS)
    random.Random(1234).shuffle(shuffled)
    assert shuffled != DOCS
    train, val = tokenize.split_val(DOCS, 7, "salt")
    train2, val2 = tokenize.split_val(shuffled, 7, "salt")
    assert set(val2) == set(val) and set(train2) == set(train)
    assert val != DOCS[:7] and val != DOCS[-7:]


def test_split_val_depends_on_the_salt():
    _, val_a = tokenize.split_val(DOCS, 7, "salt-a")
    _, val_b = tokenize.split_val(DOCS, 7, "salt-b")
    assert set(val_a) != set(val_b)


def test_a_val_set_grows_by_adding_documents_not_replacing_them():
    """The smallest hashes: 8 held out contain the 7 held out, so val stays stable as val_docs grows."""
    _, val7 = tokenize.split_val(DOCS, 7, "salt")
    _, val8 = tokenize.split_val(DOCS, 8, "salt")
    assert set(val7) < set(val8)


@pytest.mark.parametrize("val_docs", [50, 51])
def test_too_many_val_docs_raise_naming_the_setting(val_docs):
    with pytest.raises(ValueError, match="tokenize.val_docs"):
        tokenize.split_val(DOCS, val_docs, "salt")


# --- the python-docs corpus -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def python_docs():
    return list(corpus.python_docs())


def test_python_docs_yields_the_same_documents_in_the_same_order(python_docs):
    assert len(python_docs) > 1000
    assert list(corpus.python_docs()) == python_docs


def test_python_docs_includes_pydoc_topics(python_docs):
    from pydoc_data import topics
    assert topics.topics["assert"] in python_docs
    assert topics.topics["with"] in python_docs
    assert all(isinstance(d, str) and d for d in python_docs)


# --- tiny_data: shards and manifest ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_split(tiny_data, python_docs):
    """The fixture's train and val documents, recomputed from the config its manifest records."""
    cfg = tiny_data["info"]["config"]
    docs = tokenize.clean_documents(python_docs, cfg["min_doc_chars"], cfg["max_docs"])
    train, val = tokenize.split_val(docs, cfg["val_docs"], cfg["val_salt"])
    return {"train": train, "val": val}


def read_manifest(tiny_data):
    return json.loads(tiny_data["manifest"].read_text())


def test_manifest_on_disk_is_what_run_returned(tiny_data):
    assert read_manifest(tiny_data) == json.loads(json.dumps(tiny_data["info"]))


@pytest.mark.parametrize("split", ["train", "val"])
def test_each_split_stream_starts_with_bos(tiny_data, split):
    tokens = load_tokens(manifest_shards(tiny_data["manifest"], split))
    assert len(tokens) > 0 and tokens[0] == BOS


def test_val_and_train_never_share_a_shard(tiny_data):
    shards = read_manifest(tiny_data)["shards"]
    names = [s["name"] for s in shards]
    assert len(names) == len(set(names))
    for s in shards:
        assert s["split"] in ("train", "val")
        assert s["name"].startswith(f"fineweb_{s['split']}_")
    assert sorted(p.name for p in tiny_data["dir"].glob("fineweb_*.bin")) == sorted(names)


@pytest.mark.parametrize("split", ["train", "val"])
def test_split_stream_is_exactly_its_documents_each_led_by_bos(tiny_data, tiny_split, split):
    """So no shard mixes val and train tokens, and documents may span shards of one split."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["dir"] / "tokenizer.model"))
    stream = load_tokens(manifest_shards(tiny_data["manifest"], split))
    expected = [t for ids in sp.encode(tiny_split[split]) for t in [BOS] + ids]
    assert stream.tolist() == expected


def test_manifest_sha256_and_token_counts_match_the_shard_files(tiny_data):
    manifest = read_manifest(tiny_data)
    totals = {"train": 0, "val": 0}
    for entry in manifest["shards"]:
        path = tiny_data["dir"] / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert read_header(path) == entry["tokens"]
        assert int(np.count_nonzero(read_shard(path) == BOS)) == entry["bos"]
        totals[entry["split"]] += entry["tokens"]
    assert manifest["tokens"] == totals
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) >= 2  # the stream is cut


def test_shards_respect_shard_tokens(tiny_data):
    manifest = read_manifest(tiny_data)
    limit = manifest["config"]["shard_tokens"]
    for split in ("train", "val"):
        sizes = [s["tokens"] for s in manifest["shards"] if s["split"] == split]
        assert all(n == limit for n in sizes[:-1]) and 0 < sizes[-1] <= limit


def test_bos_count_per_split_equals_documents(tiny_data, tiny_split):
    manifest = read_manifest(tiny_data)
    for split in ("train", "val"):
        bos = sum(s["bos"] for s in manifest["shards"] if s["split"] == split)
        assert bos == manifest["documents"][split] == len(tiny_split[split])
    assert manifest["documents"]["val"] == manifest["config"]["val_docs"]


def test_val_raw_bytes_is_the_utf8_length_of_the_val_documents(tiny_data, tiny_split):
    expected = sum(len(d.encode("utf-8")) for d in tiny_split["val"])
    assert read_manifest(tiny_data)["val_raw_bytes"] == expected


def test_no_val_document_hash_is_among_train_hashes(tiny_data, tiny_split):
    val_hashes = read_manifest(tiny_data)["val_doc_sha256"]
    assert val_hashes == sorted(tokenize.doc_hash(d, "") for d in tiny_split["val"])
    assert not set(val_hashes) & {tokenize.doc_hash(d, "") for d in tiny_split["train"]}


def test_manifest_records_the_tokenizer_file_hash_and_settings(tiny_data):
    manifest = read_manifest(tiny_data)
    model = tiny_data["dir"] / manifest["tokenizer"]["file"]
    assert hashlib.sha256(model.read_bytes()).hexdigest() == manifest["tokenizer"]["sha256"]
    assert manifest["tokenizer"]["settings"] == tokenize.SP_SETTINGS
    assert manifest["bos_id"] == BOS and manifest["vocab_size"] == 512
    assert not list(tiny_data["dir"].glob(".*tmp"))


# --- the trained tokenizer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sp(tiny_data):
    return spm.SentencePieceProcessor(model_file=str(tiny_data["dir"] / "tokenizer.model"))


def test_tokenizer_special_ids_match_the_challenge(tiny_sp):
    assert (tiny_sp.pad_id(), tiny_sp.bos_id(), tiny_sp.eos_id(), tiny_sp.unk_id()) == (0, 1, 2, 3)


def test_tokenizer_has_the_configured_vocab_size(tiny_sp, tiny_data):
    assert tiny_sp.vocab_size() == tiny_data["info"]["config"]["vocab_size"] == 512


def test_tokenizer_has_byte_fallback_pieces(tiny_sp):
    byte_ids = [i for i in range(tiny_sp.vocab_size()) if tiny_sp.is_byte(i)]
    assert len(byte_ids) == 256
    assert tiny_sp.id_to_piece(tiny_sp.piece_to_id("<0x41>")) == "<0x41>"
    ids = tiny_sp.encode("\u4e2d")  # a character python docs never use: three byte pieces
    assert len(ids) == 3 and all(tiny_sp.is_byte(i) for i in ids)


def test_tokenizer_splits_digits(tiny_sp):
    """One token per digit (a digit rarer than the 0.999 coverage is a byte piece, still alone)."""
    for number in ("12345", "2000", "100"):
        ids = tiny_sp.encode(number)
        assert [tiny_sp.decode([i]) for i in ids] == list(number)


def test_tokenizer_vocab_has_no_multi_digit_piece(tiny_sp):
    pieces = [tiny_sp.id_to_piece(i) for i in range(tiny_sp.vocab_size()) if not tiny_sp.is_byte(i)]
    assert [p for p in pieces if sum(c.isdigit() for c in p) > 1] == []


def test_train_tokenizer_never_merges_digits_even_when_numbers_dominate(tmp_path):
    docs = [f"In 2024 the count was 2024, then 1999 and 2024 again; item {i} of 2024." for i in range(200)]
    model = tmp_path / "digits.model"
    tokenize.train_tokenizer(docs, 300, model)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert [sp.decode([i]) for i in sp.encode("2024")] == ["2", "0", "2", "4"]


def test_tokenizer_adds_no_dummy_prefix(tiny_sp):
    pieces = tiny_sp.encode("hello", out_type=str)
    assert not pieces[0].startswith("\u2581")
    assert any(p.startswith("\u2581") for p in tiny_sp.encode("say hello", out_type=str))  # inner spaces do


def test_tokenizer_is_trained_on_train_documents_only(tmp_path, monkeypatch, tiny_data, tiny_split):
    seen = []
    real = tokenize.train_tokenizer

    def spy(train_docs, vocab_size, out_model):
        seen.append(list(train_docs))
        return real(train_docs, vocab_size, out_model)

    monkeypatch.setattr(tokenize, "train_tokenizer", spy)
    manifest = tokenize.run(tiny_tokenize_config(), tmp_path)
    assert len(seen) == 1
    assert not set(seen[0]) & set(tiny_split["val"])
    assert seen[0] == tiny_split["train"]
    # the same config trains the same tokenizer: training is reproducible
    assert manifest["tokenizer"]["sha256"] == tiny_data["info"]["tokenizer"]["sha256"]


def test_a_given_tokenizer_model_is_copied_not_trained(tmp_path, monkeypatch, tiny_data):
    monkeypatch.setattr(tokenize, "train_tokenizer", lambda *a: pytest.fail("trained a tokenizer"))
    given = tiny_data["dir"] / "tokenizer.model"
    manifest = tokenize.run(tiny_tokenize_config(max_docs=100, val_docs=5, tokenizer_model=str(given)),
                            tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == given.read_bytes()
    assert manifest["tokenizer"]["settings"] == "given"


# --- source: files --------------------------------------------------------------------------------

def write_txt_files(folder, count=3, per_file=20):
    folder.mkdir()
    lines = sentences(count * per_file)
    for f in range(count):
        (folder / f"part{f}.txt").write_text("\n\n".join(lines[f * per_file:(f + 1) * per_file]) + "\n")
    return str(folder / "*.txt")


def test_txt_files_split_by_file_or_by_blank_line(tmp_path):
    pattern = write_txt_files(tmp_path / "txt")
    by_file = tokenize.run(files_config([pattern], txt_split="file"), tmp_path / "by_file")
    by_block = tokenize.run(files_config([pattern], txt_split="blank_line"), tmp_path / "by_block")
    assert by_file["documents"] == {"train": 1, "val": 2}
    assert by_block["documents"] == {"train": 58, "val": 2}
    for out, manifest in ((tmp_path / "by_file", by_file), (tmp_path / "by_block", by_block)):
        assert sum(s["bos"] for s in manifest["shards"]) == sum(manifest["documents"].values())
        assert manifest["source"] == "files"


def write_jsonl(path, docs, drop_field_at=None):
    records = [{"id": i, "text": d} for i, d in enumerate(docs)]
    if drop_field_at is not None:
        del records[drop_field_at]["text"]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_jsonl_text_field_round_trips_through_the_shards(tmp_path):
    docs = [f"{s} Caf\u00e9 na\u00efve \u2014 ok." for s in sentences(60)]  # non-ASCII: bytes != chars
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    manifest = tokenize.run(files_config([path]), tmp_path / "out")
    assert manifest["documents"] == {"train": 58, "val": 2}
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    val = load_tokens(manifest_shards(tmp_path / "out" / "manifest.json", "val"))
    decoded = [sp.decode(ids) for ids in split_streams(val)]
    assert len(decoded) == 2 and set(decoded) <= set(docs)
    assert manifest["val_raw_bytes"] == sum(len(d.encode()) for d in decoded)


def test_jsonl_with_another_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in sentences(60)))
    manifest = tokenize.run(files_config([path], text_field="body"), tmp_path / "out")
    assert sum(manifest["documents"].values()) == 60


def test_jsonl_missing_text_field_raises_naming_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60), drop_field_at=2)
    with pytest.raises(ValueError) as err:
        tokenize.run(files_config([path]), tmp_path / "out")
    assert f"{path}:3" in str(err.value) and "'text'" in str(err.value)


def test_jsonl_invalid_line_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a fine document"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=f"{path}:2"):
        list(corpus.file_docs([path], "file", "text"))


def test_parquet_text_column(tmp_path):
    import pandas as pd
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"id": range(60), "text": sentences(60)}).to_parquet(path)
    manifest = tokenize.run(files_config([path]), tmp_path / "out")
    assert manifest["documents"] == {"train": 58, "val": 2}
    assert list(corpus.file_docs([path], "file", "text")) == sentences(60)


def test_parquet_missing_column_raises_naming_the_file(tmp_path):
    import pandas as pd
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"body": sentences(5)}).to_parquet(path)
    with pytest.raises(ValueError, match="no 'text' column"):
        list(corpus.file_docs([path], "file", "text"))


def test_parquet_row_without_text_raises_naming_the_file_and_row(tmp_path):
    import pandas as pd
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["a document", None, "another"]}).to_parquet(path)
    with pytest.raises(ValueError, match=f"{path}: row 1 has no text"):
        list(corpus.file_docs([path], "file", "text"))


def test_unsupported_file_type_raises(tmp_path):
    path = tmp_path / "docs.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(corpus.file_docs([path], "file", "text"))


def test_a_glob_matching_nothing_raises_naming_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenize.files.paths"):
        tokenize.run(files_config([tmp_path / "nothing*.txt"]), tmp_path / "out")


# --- source: challenge ----------------------------------------------------------------------------

@pytest.fixture
def challenge_dir(tiny_data, tmp_path):
    """A challenge-style folder: the fixture's shards plus their tokenizer."""
    src = tmp_path / "challenge"
    src.mkdir()
    for entry in tiny_data["info"]["shards"]:
        shutil.copyfile(tiny_data["dir"] / entry["name"], src / entry["name"])
    shutil.copyfile(tiny_data["dir"] / "tokenizer.model", src / "fineweb_512_bpe.model")
    return src


def challenge_config(src, raw_val_bytes=None):
    return {"source": "challenge", "tokenizer_model": None,
            "challenge": {"dir": str(src), "tokenizer": str(src / "fineweb_512_bpe.model"),
                          "raw_val_bytes": raw_val_bytes}}


def test_challenge_shards_are_imported_byte_identical(challenge_dir, tmp_path, tiny_data):
    out = tmp_path / "out"
    manifest = tokenize.run(challenge_config(challenge_dir, raw_val_bytes=12345), out)
    names = sorted(p.name for p in challenge_dir.glob("fineweb_*.bin"))
    assert sorted(s["name"] for s in manifest["shards"]) == names
    assert [(s["name"], s["split"]) for s in manifest["shards"]] == [
        (s["name"], s["split"]) for s in tiny_data["info"]["shards"]]  # val first, then train, in order
    for name in names:
        assert (out / name).read_bytes() == (challenge_dir / name).read_bytes()
    assert (out / "tokenizer.model").read_bytes() == (challenge_dir / "fineweb_512_bpe.model").read_bytes()
    assert manifest["documents"] == tiny_data["info"]["documents"]
    assert manifest["tokens"] == tiny_data["info"]["tokens"]
    assert manifest["vocab_size"] == 512 and manifest["val_raw_bytes"] == 12345
    assert manifest["tokenizer"]["settings"] == "given"
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in tiny_data["info"]["shards"]]
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]


def test_challenge_source_runs_with_the_config_section_the_pipeline_passes(challenge_dir, tmp_path):
    """The Snakefile hands tokenize the output of config.tokenize_section; for `challenge` that has
    only `source` and `challenge` (no tokenizer_model), and tokenize.run must accept it."""
    tok = {**default_config()["defaults"]["tokenize"], **challenge_config(challenge_dir)}
    section = caddie.tokenize_section(tok)
    manifest = tokenize.run(section, tmp_path / "out")
    assert manifest["source"] == "challenge"
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_challenge_truncated_shard_raises_naming_it(challenge_dir, tmp_path):
    bad = challenge_dir / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-2])
    with pytest.raises(ShardError, match=str(bad)):
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")


def test_challenge_id_outside_the_tokenizer_vocab_raises(challenge_dir, tmp_path):
    from stages.shards import write_shard
    write_shard(challenge_dir / "fineweb_train_000001.bin", [1, 5, 600])
    with pytest.raises(ShardError, match="fineweb_train_000001.bin"):
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")


def test_challenge_val_shards_without_bos_raise(challenge_dir, tmp_path):
    from stages.shards import write_shard
    write_shard(challenge_dir / "fineweb_val_000000.bin", [5, 6, 7])
    with pytest.raises(ShardError, match="BOS"):
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")


def test_challenge_missing_dir_raises_naming_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenize.challenge.dir"):
        tokenize.run(challenge_config(tmp_path / "no-such-dir"), tmp_path / "out")


def test_challenge_missing_tokenizer_raises_naming_the_setting(challenge_dir, tmp_path):
    os.remove(challenge_dir / "fineweb_512_bpe.model")
    with pytest.raises(FileNotFoundError, match="tokenize.challenge.tokenizer"):
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")


# --- re-runs --------------------------------------------------------------------------------------

def test_rerun_removes_stale_shards_not_in_the_new_manifest(tmp_path, tiny_data):
    given = str(tiny_data["dir"] / "tokenizer.model")
    out = tmp_path / "out"
    first = tokenize.run(tiny_tokenize_config(max_docs=150, val_docs=10, tokenizer_model=given,
                                              shard_tokens=2_000), out)
    assert len(first["shards"]) > 4
    (out / "fineweb_train_000999.bin").write_bytes(b"stray")
    second = tokenize.run(tiny_tokenize_config(max_docs=150, val_docs=10, tokenizer_model=given,
                                               shard_tokens=1_000_000), out)
    names = {s["name"] for s in second["shards"]}
    assert names == {"fineweb_val_000000.bin", "fineweb_train_000000.bin"}
    assert {p.name for p in out.glob("fineweb_*.bin")} == names
    assert json.loads((out / "manifest.json").read_text())["shards"] == second["shards"]
    # the re-cut streams hold the same tokens
    assert second["tokens"] == first["tokens"]
