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
from stages import corpus, documents, submission, tokenize
from stages.shards import ShardError, load_tokens, manifest_shards, read_header, read_shard, write_shard

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
    assert documents.clean_documents(docs, min_chars=10, max_docs=0) == ["exactly10!", "long enough document"]


def test_clean_documents_drops_exact_duplicates_keeping_first_seen_order():
    docs = ["bravo document", "alpha document", "bravo document", "charlie document", "alpha document",
            "alpha document "]
    assert documents.clean_documents(docs, min_chars=1, max_docs=0) == [
        "bravo document", "alpha document", "charlie document", "alpha document "]


def test_clean_documents_caps_at_max_docs_after_removing_duplicates_and_short_ones():
    docs = ["same text here", "same text here", "no", "second document", "third document", "fourth doc"]
    assert documents.clean_documents(docs, min_chars=5, max_docs=3) == [
        "same text here", "second document", "third document"]
    assert len(documents.clean_documents(docs, min_chars=5, max_docs=0)) == 4


def test_clean_documents_accepts_a_generator():
    assert documents.clean_documents((d for d in ["abcdef", "abcdef", "ghijkl"]), 1, 0) == ["abcdef", "ghijkl"]


# --- split_val ------------------------------------------------------------------------------------

DOCS = [f"Document {i}: {s}" for i, s in enumerate(sentences(50))]


def test_split_val_is_deterministic_disjoint_and_of_the_requested_size():
    train, val = documents.split_val(DOCS, 7, "salt")
    assert (train, val) == documents.split_val(DOCS, 7, "salt")
    assert len(val) == 7 and len(train) == len(DOCS) - 7
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(DOCS)


def test_split_val_keeps_input_order_within_each_split():
    train, val = documents.split_val(DOCS, 7, "salt")
    assert val == [d for d in DOCS if d in set(val)]
    assert train == [d for d in DOCS if d in set(train)]


def test_split_val_chooses_by_hash_not_position():
    shuffled = list(DOCS)
    random.Random(1234).shuffle(shuffled)
    assert shuffled != DOCS
    train, val = documents.split_val(DOCS, 7, "salt")
    train2, val2 = documents.split_val(shuffled, 7, "salt")
    assert set(val2) == set(val) and set(train2) == set(train)
    assert val != DOCS[:7] and val != DOCS[-7:]


def test_split_val_depends_on_the_salt():
    _, val_a = documents.split_val(DOCS, 7, "salt-a")
    _, val_b = documents.split_val(DOCS, 7, "salt-b")
    assert set(val_a) != set(val_b)


def test_a_val_set_grows_by_adding_documents_not_replacing_them():
    """The smallest hashes: 8 held out contain the 7 held out, so val stays stable as val_docs grows."""
    _, val7 = documents.split_val(DOCS, 7, "salt")
    _, val8 = documents.split_val(DOCS, 8, "salt")
    assert set(val7) < set(val8)


@pytest.mark.parametrize("val_docs", [50, 51])
def test_too_many_val_docs_raise_naming_the_setting(val_docs):
    with pytest.raises(ValueError, match="tokenize.val_docs"):
        documents.split_val(DOCS, val_docs, "salt")


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
    docs = documents.clean_documents(python_docs, cfg["min_doc_chars"], cfg["max_docs"])
    train, val = documents.split_val(docs, cfg["val_docs"], cfg["val_salt"])
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
    assert val_hashes == sorted(documents.doc_hash(d, "") for d in tiny_split["val"])
    assert not set(val_hashes) & {documents.doc_hash(d, "") for d in tiny_split["train"]}


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

    def spy(train_docs, vocab_size, out_model, *settings):
        seen.append(list(train_docs))
        return real(train_docs, vocab_size, out_model, *settings)

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


@pytest.mark.parametrize("content", [b"Caf\xe9 au lait, a document in Latin-1.",
                                     b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"])
def test_a_txt_file_that_is_not_utf8_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "latin1.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: not UTF-8 text"):
        list(corpus.file_docs([path], "file", "text"))


def test_a_binary_txt_file_of_valid_utf8_raises_naming_the_file(tmp_path):
    path = tmp_path / "zeros.txt"
    path.write_bytes(b"header" + b"\x00" * 64)
    with pytest.raises(ValueError, match=f"{path}: .*NUL byte at offset 6"):
        list(corpus.file_docs([path], "file", "text"))


def test_a_jsonl_line_that_is_not_utf8_raises_naming_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'{"text": "a fine document"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{path}:2: not UTF-8"):
        list(corpus.file_docs([path], "file", "text"))


@pytest.mark.parametrize("value, kind", [(5, "a number"), (2.5, "a number"), (None, "null"), (True, "a boolean"),
                                         (["a", "b"], "an array"), ({"t": "x"}, "an object")])
def test_a_jsonl_text_field_that_is_not_a_string_raises_naming_file_line_and_key(tmp_path, value, kind):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a fine document"}) + "\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(ValueError) as err:
        list(corpus.file_docs([path], "file", "text"))
    assert str(err.value).startswith(f"{path}:2: 'text' (tokenize.files.text_field) is {kind}")
    assert str(err.value).endswith("not a string")


@pytest.mark.parametrize("line", ["5", "[1, 2]", '"just a string"'])
def test_a_jsonl_line_that_is_not_an_object_raises_naming_file_and_line(tmp_path, line):
    path = tmp_path / "docs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: not a JSON object with a 'text' field "
                                         r"\(tokenize.files.text_field\)"):
        list(corpus.file_docs([path], "file", "text"))


def test_a_jsonl_number_text_fails_the_run_not_only_the_reader(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60))
    path.write_text(path.read_text() + json.dumps({"text": 12345}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:61: 'text' .* is a number"):
        tokenize.run(files_config([path]), tmp_path / "out")


@pytest.mark.parametrize("column, kind", [([1, 2, 3], "int"), ([1.5, 2.5, 3.5], "float"),
                                          ([b"a", b"b", b"c"], "bytes")])
def test_a_parquet_text_column_that_is_not_strings_raises_naming_file_row_and_key(tmp_path, column, kind):
    import pandas as pd
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": column}).to_parquet(path)
    with pytest.raises(ValueError, match=f"{path}: row 0 of column 'text' \\(tokenize.files.text_field\\) "
                                         f"is {kind} .*, not a string"):
        list(corpus.file_docs([path], "file", "text"))


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
    raw_val_bytes = tiny_data["info"]["val_raw_bytes"]
    manifest = tokenize.run(challenge_config(challenge_dir, raw_val_bytes=raw_val_bytes), out)
    names = sorted(p.name for p in challenge_dir.glob("fineweb_*.bin"))
    assert sorted(s["name"] for s in manifest["shards"]) == names
    assert [(s["name"], s["split"]) for s in manifest["shards"]] == [
        (s["name"], s["split"]) for s in tiny_data["info"]["shards"]]  # val first, then train, in order
    for name in names:
        assert (out / name).read_bytes() == (challenge_dir / name).read_bytes()
    assert (out / "tokenizer.model").read_bytes() == (challenge_dir / "fineweb_512_bpe.model").read_bytes()
    assert manifest["documents"] == tiny_data["info"]["documents"]
    assert manifest["tokens"] == tiny_data["info"]["tokens"]
    assert manifest["vocab_size"] == 512 and manifest["val_raw_bytes"] == raw_val_bytes
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


# --- the tokenizer belongs to the shards ----------------------------------------------------------

def test_split_documents_follow_bos_across_shard_boundaries(tmp_path):
    paths = [tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin",
             tmp_path / "fineweb_train_000002.bin"]
    for path, tokens in zip(paths, ([1, 5, 6, 1, 7], [8, 9, 1, 10], [11])):
        write_shard(path, tokens)
    assert [d.tolist() for d in tokenize.split_documents(paths)] == [[5, 6], [7, 8, 9], [10, 11]]


def test_sample_documents_is_a_fixed_evenly_spaced_choice():
    docs = [np.array([i]) for i in range(100)]
    sample = tokenize.sample_documents(iter(docs), total=100, count=8)
    assert [int(d[0]) for d in sample] == [0, 12, 25, 37, 50, 62, 75, 87]
    assert [int(d[0]) for d in tokenize.sample_documents(iter(docs[:5]), total=5, count=8)] == [0, 1, 2, 3, 4]
    assert tokenize.sample_documents(iter([]), total=0, count=8) == []


def test_round_trip_skips_documents_holding_unk_and_empty_ones(tiny_sp):
    good = np.array(tiny_sp.encode("A document that decodes and encodes back."))
    shuffled = good[::-1].copy()  # decodes to text the tokenizer encodes differently
    with_unk = np.array([*good, tiny_sp.unk_id()])
    figures = tokenize.round_trip(tiny_sp, [good, shuffled, with_unk, np.array([], dtype=int)])
    assert figures == {"documents_sampled": 4, "documents_checked": 2, "round_trip": 0.5}


@pytest.fixture(scope="module")
def other_tokenizer_512(python_docs, tmp_path_factory):
    """A 512-piece tokenizer with the same settings as the tiny one, trained on other documents."""
    model = tmp_path_factory.mktemp("other") / "other_512.model"
    tokenize.train_tokenizer(documents.clean_documents(python_docs, 40, 0)[700:1400], 512, model)
    return model


def assert_names_both_files(message, shards, model):
    assert str(shards) in message and str(model) in message, message


def test_challenge_tokenizer_of_the_same_vocab_trained_on_other_data_raises_naming_both(
        challenge_dir, tmp_path, other_tokenizer_512):
    model = challenge_dir / "fineweb_512_bpe.model"
    shutil.copyfile(other_tokenizer_512, model)
    with pytest.raises(ValueError, match="re-encod") as err:
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")
    assert_names_both_files(str(err.value), challenge_dir / "fineweb_val_*.bin", model)
    assert "of 60 sampled val documents" in str(err.value)


@pytest.mark.parametrize("name", ["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"])
def test_challenge_tokenizer_of_another_vocab_size_raises_naming_both(challenge_dir, tmp_path,
                                                                      fixture_tokenizers, name):
    model = challenge_dir / "fineweb_512_bpe.model"
    shutil.copyfile(fixture_tokenizers / name, model)
    with pytest.raises(ValueError, match="does not belong to the shards") as err:
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")
    assert_names_both_files(str(err.value), challenge_dir / "fineweb_val_*.bin", model)


def test_challenge_val_shards_of_another_tokenizer_raise_though_the_train_shards_match(
        challenge_dir, tmp_path, tiny_split, other_tokenizer_512):
    other = spm.SentencePieceProcessor(model_file=str(other_tokenizer_512))
    write_shard(challenge_dir / "fineweb_val_000000.bin",
                [t for ids in other.encode(tiny_split["val"]) for t in [BOS] + ids])
    with pytest.raises(ValueError, match="does not belong to the shards") as err:
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out")
    assert_names_both_files(str(err.value), challenge_dir / "fineweb_val_*.bin",
                            challenge_dir / "fineweb_512_bpe.model")


def decoded_val_bytes(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["dir"] / "tokenizer.model"))
    val = load_tokens(manifest_shards(tiny_data["manifest"], "val"))
    return sum(len(sp.decode(ids).encode("utf-8")) for ids in split_streams(val))


def test_challenge_manifest_records_the_tokenizer_check(challenge_dir, tmp_path, tiny_data):
    raw = tiny_data["info"]["val_raw_bytes"]
    manifest = tokenize.run(challenge_config(challenge_dir, raw_val_bytes=raw), tmp_path / "out")
    check = manifest["tokenizer_check"]
    assert check["val"] == {"documents_sampled": 60, "documents_checked": 60, "round_trip": 1.0}
    assert check["train"] == {"documents_sampled": 64, "documents_checked": 64, "round_trip": 1.0}
    assert check["val_decoded_bytes"] == decoded_val_bytes(tiny_data)
    assert 0.95 < check["val_decoded_bytes"] / raw <= 1  # normalisation only removes bytes
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tokenizer_check"] == check


def test_challenge_without_raw_val_bytes_does_not_decode_the_whole_val_split(challenge_dir, tmp_path):
    manifest = tokenize.run(challenge_config(challenge_dir), tmp_path / "out")
    assert "val_decoded_bytes" not in manifest["tokenizer_check"]


@pytest.mark.parametrize("ratio", [0.85, 1.05])
def test_challenge_raw_val_bytes_the_decoded_val_disagrees_with_raises(challenge_dir, tmp_path, tiny_data, ratio):
    """raw_val_bytes such that the decoded val text is 85% or 105% of it: outside 92%..101%."""
    raw = round(decoded_val_bytes(tiny_data) / ratio)
    with pytest.raises(ValueError, match="tokenize.challenge.raw_val_bytes") as err:
        tokenize.run(challenge_config(challenge_dir, raw_val_bytes=raw), tmp_path / "out")
    assert_names_both_files(str(err.value), challenge_dir / "fineweb_val_*.bin",
                            challenge_dir / "fineweb_512_bpe.model")
    assert f"{raw:,}" in str(err.value) and f"{decoded_val_bytes(tiny_data):,}" in str(err.value)


@pytest.mark.parametrize("ratio", [0.93, 1.005])
def test_challenge_raw_val_bytes_within_what_normalisation_removes_passes(challenge_dir, tmp_path, tiny_data, ratio):
    raw = round(decoded_val_bytes(tiny_data) / ratio)
    manifest = tokenize.run(challenge_config(challenge_dir, raw_val_bytes=raw), tmp_path / "out")
    assert manifest["val_raw_bytes"] == raw


def test_manifest_records_the_tokenizer_check_of_a_trained_tokenizer(tiny_data):
    check = read_manifest(tiny_data)["tokenizer_check"]
    assert check["val"] == {"documents_sampled": 60, "documents_checked": 60, "round_trip": 1.0}
    assert check["train"] == {"documents_sampled": 64, "documents_checked": 64, "round_trip": 1.0}


def test_a_missing_tokenizer_model_raises_naming_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60))
    missing = tmp_path / "no-such.model"
    with pytest.raises(FileNotFoundError, match=f"tokenize.tokenizer_model: {missing} is not a file"):
        tokenize.run(files_config([path], tokenizer_model=str(missing)), tmp_path / "out")


def test_a_tokenizer_model_that_is_not_sentencepiece_raises_naming_the_setting(tmp_path, challenge_dir):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60))
    garbage = tmp_path / "garbage.model"
    garbage.write_text("not a model")
    with pytest.raises(ValueError, match=f"tokenize.tokenizer_model: {garbage} is not a SentencePiece model"):
        tokenize.run(files_config([path], tokenizer_model=str(garbage)), tmp_path / "out")
    (challenge_dir / "fineweb_512_bpe.model").write_text("not a model")
    with pytest.raises(ValueError, match="tokenize.challenge.tokenizer: .*fineweb_512_bpe.model is not a Sentence"):
        tokenize.run(challenge_config(challenge_dir), tmp_path / "out2")


def test_a_given_tokenizer_model_whose_bos_is_not_the_shards_bos_raises_naming_it(tmp_path):
    model = tmp_path / "bos2.model"
    docs = sentences(200)
    settings = {**tokenize.SP_SETTINGS, "bos_id": 2, "eos_id": 1}
    with open(model, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=f, vocab_size=400, minloglevel=2,
                                       **settings)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    with pytest.raises(ValueError, match=f"{model}: BOS id 2 is not 1"):
        tokenize.run(files_config([path], tokenizer_model=str(model)), tmp_path / "out")


# --- documents that tokenize identically ----------------------------------------------------------

def test_documents_that_tokenize_alike_are_dropped_from_train_and_repeated_val(tiny_sp):
    assert tiny_sp.encode("alpha beta\ngamma delta") == tiny_sp.encode("alpha beta gamma delta")  # nmt_nfkc
    val = ["alpha beta gamma delta", "epsilon zeta", "alpha beta\ngamma delta"]
    train = ["eta theta iota", "epsilon\nzeta", "kappa lambda", "epsilon  zeta"]
    kept_val, val_ids, train_ids, dropped = tokenize.encode_without_token_duplicates(tiny_sp, val, train)
    assert kept_val == ["alpha beta gamma delta", "epsilon zeta"]
    assert val_ids == tiny_sp.encode(kept_val)
    assert train_ids == tiny_sp.encode(["eta theta iota", "kappa lambda"])
    assert dropped == {"val": 1, "train": 2}


def test_no_val_document_occurs_token_for_token_in_train_when_texts_differ_in_newlines(tmp_path):
    docs = sentences(60) + [s.replace(" ", "\n") for s in sentences(60)]
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    manifest = tokenize.run(files_config([path], val_docs=10), tmp_path / "out")
    overlap = submission.val_overlap(tmp_path / "out" / "manifest.json")
    dropped = manifest["token_duplicates_dropped"]
    assert overlap == {"val_docs": manifest["documents"]["val"], "val_docs_in_train": 0}
    assert dropped["train"] + 2 * dropped["val"] == 10  # each val document's twin is gone from train
    assert manifest["documents"] == {"val": 10 - dropped["val"], "train": 110 - dropped["train"]}
    assert len(manifest["val_doc_sha256"]) == manifest["documents"]["val"]


def test_the_demo_corpus_has_no_val_document_in_train(tmp_path, python_docs):
    """The demo's settings (config.yaml): before token-level duplicates were dropped, one val docstring
    occurred in train with its line breaks moved (mimetypes.guess_extension)."""
    section = caddie.tokenize_section(default_config()["defaults"]["tokenize"])
    manifest = tokenize.run(section, tmp_path)
    assert submission.val_overlap(tmp_path / "manifest.json") == {"val_docs": 400, "val_docs_in_train": 0}
    dropped = manifest["token_duplicates_dropped"]
    assert manifest["documents"] == {"val": 400 - dropped["val"],
                                     "train": len(documents.clean_documents(python_docs, 40, 0)) - 400 - dropped["train"]}


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


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_rerun_that_fails_after_writing_shards_keeps_the_previous_outputs_byte_identical(
        tmp_path, tiny_data, monkeypatch):
    given = str(tiny_data["dir"] / "tokenizer.model")
    out = tmp_path / "out"
    tokenize.run(tiny_tokenize_config(max_docs=150, val_docs=10, tokenizer_model=given, shard_tokens=2_000), out)
    before = snapshot(out)
    real, written = tokenize.write_shard, []

    def write_then_fail(path, tokens):
        written.append(path)
        if len(written) == 3:
            raise OSError(f"{path}: simulated failure")
        real(path, tokens)

    monkeypatch.setattr(tokenize, "write_shard", write_then_fail)
    with pytest.raises(OSError, match="simulated failure"):
        tokenize.run(tiny_tokenize_config(max_docs=150, val_docs=10, tokenizer_model=given, shard_tokens=1_500), out)
    assert len(written) == 3
    assert snapshot(out) == before


def test_a_rerun_that_fails_its_tokenizer_check_keeps_the_previous_outputs(challenge_dir, tmp_path,
                                                                           other_tokenizer_512):
    out = tmp_path / "out"
    tokenize.run(challenge_config(challenge_dir), out)
    before = snapshot(out)
    shutil.copyfile(other_tokenizer_512, challenge_dir / "fineweb_512_bpe.model")
    with pytest.raises(ValueError, match="does not belong"):
        tokenize.run(challenge_config(challenge_dir), out)
    assert snapshot(out) == before


def test_a_run_after_a_killed_one_clears_its_staging_folder(tmp_path, tiny_data):
    out = tmp_path / "out"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "fineweb_train_000007.bin").write_bytes(b"left by a killed run")
    given = str(tiny_data["dir"] / "tokenizer.model")
    manifest = tokenize.run(tiny_tokenize_config(max_docs=100, val_docs=5, tokenizer_model=given), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [s["name"] for s in manifest["shards"]] + ["manifest.json", "summary.json", "tokenizer.model"])


def test_a_val_shard_copied_among_the_challenge_train_shards_is_refused(challenge_dir, tmp_path):
    leak = tmp_path / "leak"
    shutil.copytree(challenge_dir, leak)
    shutil.copy(leak / "fineweb_val_000000.bin", leak / "fineweb_train_000099.bin")
    with pytest.raises(ShardError, match=r"train shard fineweb_train_000099.bin has the same bytes as val shard "
                                         r"fineweb_val_000000.bin"):
        tokenize.run(challenge_config(leak), tmp_path / "out")


# --- streaming: passes, workers, shards as they fill, the tokenizer's sample ----------------------

def output_bytes(folder):
    """Every output file's bytes, the manifest's without the run's duration."""
    files = snapshot(folder)
    manifest = json.loads(files.pop("manifest.json"))
    summary = json.loads(files.pop("summary.json"))
    del manifest["seconds"], summary["seconds"]
    return files, manifest, summary


def test_the_worker_count_does_not_change_a_byte_of_the_outputs(tmp_path, monkeypatch):
    docs = sentences(300) + [s.replace(" ", "\n") for s in sentences(40)]  # token twins to drop
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    cfg = files_config([path], val_docs=20, shard_tokens=700, tokenizer_sample_docs=200)
    monkeypatch.setattr(tokenize, "BATCH_DOCS", 8)  # many batches, spread over the workers
    for workers in (1, 2, 3):
        tokenize.run(cfg, tmp_path / f"w{workers}", workers=workers)
    outputs = [output_bytes(tmp_path / f"w{workers}") for workers in (1, 2, 3)]
    assert outputs[0] == outputs[1] == outputs[2]
    files, manifest, _ = outputs[0]
    assert len([n for n in files if n.startswith("fineweb_train_")]) > 3
    assert sum(manifest["token_duplicates_dropped"].values()) > 0


def test_in_order_keeps_the_order_and_reads_at_most_a_window_ahead():
    from concurrent.futures import ThreadPoolExecutor
    read = []

    def items():
        for i in range(50):
            read.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        for taken, (item, result) in enumerate(tokenize.in_order(pool, lambda x: x * x, items(), window=3), 1):
            assert (item, result) == (taken - 1, (taken - 1) ** 2)
            assert len(read) <= taken + 2  # the one just taken and at most window - 1 more in flight


def test_a_shard_is_written_as_it_fills_before_the_corpus_is_read_to_the_end(tmp_path, monkeypatch):
    docs = sentences(400)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    reads, real_docs = [], corpus.file_docs

    def counted(*args):  # each pass over the corpus counts the documents it has read
        reads.append(0)
        for doc in real_docs(*args):
            reads[-1] += 1
            yield doc

    written, real_write = [], tokenize.write_shard

    def recorded(path, tokens):
        written.append((path.name, len(tokens), len(reads), reads[-1]))
        real_write(path, tokens)

    monkeypatch.setattr(corpus, "file_docs", counted)
    monkeypatch.setattr(tokenize, "write_shard", recorded)
    monkeypatch.setattr(tokenize, "BATCH_DOCS", 16)
    manifest = tokenize.run(files_config([path], val_docs=10, shard_tokens=1000), tmp_path / "out", workers=2)
    assert len(reads) == 4  # select, tokenizer sample, val, train
    train = [w for w in written if w[0].startswith("fineweb_train_")]
    assert [w[0] for w in train] == [f"fineweb_train_{i:06d}.bin" for i in range(len(train))]
    assert all(size == 1000 for _, size, _, _ in train[:-1]) and 0 < train[-1][1] <= 1000
    assert train[0][2] == 4 and train[0][3] < len(docs)  # in the last pass, with documents still unread
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "out" / "tokenizer.model"))
    kept = documents.clean_documents(docs, 5, 0)
    train_docs, _ = documents.split_val(kept, 10, manifest["config"]["val_salt"])
    stream = load_tokens(manifest_shards(tmp_path / "out" / "manifest.json", "train"))
    assert stream.tolist() == [t for ids in sp.encode(train_docs) for t in [BOS] + ids]  # cut, not lost


def test_the_shard_writer_rolls_over_at_shard_tokens_and_writes_no_empty_tail(tmp_path):
    writer = tokenize.ShardWriter("train", 4, tmp_path)
    for tokens in ([1, 5, 6], [1, 7, 8, 9, 1], []):
        writer.add(np.array(tokens, dtype=np.uint16))
    entries = writer.close()
    assert [(e["name"], e["tokens"], e["bos"]) for e in entries] == [
        ("fineweb_train_000000.bin", 4, 2), ("fineweb_train_000001.bin", 4, 1)]
    assert np.concatenate([read_shard(tmp_path / e["name"]) for e in entries]).tolist() == [1, 5, 6, 1, 7, 8, 9, 1]
    empty = tokenize.ShardWriter("val", 4, tmp_path).close()
    assert [(e["name"], e["tokens"]) for e in empty] == [("fineweb_val_000000.bin", 0)]


def test_select_documents_takes_the_sample_from_the_hashes_after_val_whatever_the_order():
    selection = documents.select_documents(DOCS, 7, 10, "salt")
    ranked = sorted(range(len(DOCS)), key=lambda i: documents.doc_hash(DOCS[i], "salt"))
    assert (selection.total, selection.val, selection.sample) == (len(DOCS), set(ranked[:7]), set(ranked[7:17]))
    shuffled = list(DOCS)
    random.Random(7).shuffle(shuffled)
    again = documents.select_documents(shuffled, 7, 10, "salt")
    assert {shuffled[i] for i in again.sample} == {DOCS[i] for i in selection.sample}
    assert selection.sample < documents.select_documents(DOCS, 7, 11, "salt").sample  # grows by adding


def capture_sentencepiece_input(monkeypatch):
    """What SentencePiece is given: (its documents, input_sentence_size) per training."""
    seen, real = [], spm.SentencePieceTrainer.train

    def spy(**kwargs):
        docs = list(kwargs["sentence_iterator"])
        seen.append((docs, kwargs["input_sentence_size"]))
        return real(**{**kwargs, "sentence_iterator": iter(docs)})

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", staticmethod(spy))
    return seen


def test_the_tokenizer_sees_only_tokenizer_sample_docs_train_documents_deterministically(tmp_path, monkeypatch):
    docs = sentences(400)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    seen = capture_sentencepiece_input(monkeypatch)
    cfg = files_config([path], val_docs=10, tokenizer_sample_docs=150)
    first = tokenize.run(cfg, tmp_path / "a")
    second = tokenize.run(cfg, tmp_path / "b", workers=1)
    ranked = sorted(docs, key=lambda d: documents.doc_hash(d, cfg["val_salt"]))
    val, sample = set(ranked[:10]), set(ranked[10:160])
    assert seen[0] == ([d for d in docs if d in sample], 150)  # in corpus order, and no more than that
    assert seen[1] == seen[0] and not set(seen[0][0]) & val
    assert output_bytes(tmp_path / "a")[0] == output_bytes(tmp_path / "b")[0]  # tokenizer and shards
    assert first["documents"] == second["documents"] == {"val": 10, "train": 390}  # all train is encoded


def test_a_sample_larger_than_the_train_set_trains_on_all_of_it(tmp_path, monkeypatch):
    docs = sentences(200)
    path = write_jsonl(tmp_path / "docs.jsonl", docs)
    seen = capture_sentencepiece_input(monkeypatch)
    cfg = files_config([path], val_docs=10, tokenizer_sample_docs=10_000)
    tokenize.run(cfg, tmp_path / "out")
    train, _ = documents.split_val(docs, 10, cfg["val_salt"])
    assert seen == [(train, 190)]


def test_the_schema_requires_tokenizer_sample_docs_as_a_positive_integer():
    config = default_config()
    for value, message in ((0, "less than the minimum"), (2.5, "is not of type 'integer'")):
        config["defaults"]["tokenize"]["tokenizer_sample_docs"] = value
        with pytest.raises(caddie.ConfigError, match=f"defaults.tokenize.tokenizer_sample_docs: .*{message}"):
            caddie.validate(config)
    del config["defaults"]["tokenize"]["tokenizer_sample_docs"]
    with pytest.raises(caddie.ConfigError, match="'tokenizer_sample_docs' is a required property"):
        caddie.validate(config)


def test_tokenizer_sample_docs_is_part_of_the_tokenize_key():
    config = default_config()
    keys = set()
    for value in (200_000, 1000):
        config["defaults"]["tokenize"]["tokenizer_sample_docs"] = value
        keys.add(caddie.plan(config)["arms"]["baseline"]["tokenize"])
    assert len(keys) == 2


def test_a_corpus_that_changes_between_passes_fails_the_run_naming_the_setting(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60))
    calls, real = [], corpus.file_docs

    def growing(*args):
        calls.append(1)
        yield from real(*args)
        if len(calls) > 1:
            yield "A document that appeared after the first pass had counted them."

    monkeypatch.setattr(corpus, "file_docs", growing)
    with pytest.raises(ValueError, match="tokenize.files.paths: the documents changed while they were read"):
        tokenize.run(files_config([path]), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_too_many_val_docs_fail_the_run_naming_the_setting(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(20))
    with pytest.raises(ValueError, match="tokenize.val_docs: 20 held-out documents leave none of the 20"):
        tokenize.run(files_config([path], val_docs=20), tmp_path / "out")


def test_a_missing_tokenizer_model_is_reported_before_the_corpus_is_read(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", sentences(60))
    path.write_text(path.read_text() + "{broken\n")
    with pytest.raises(FileNotFoundError, match="tokenize.tokenizer_model"):
        tokenize.run(files_config([path], tokenizer_model=str(tmp_path / "no-such.model")), tmp_path / "out")


# --- streaming readers ----------------------------------------------------------------------------

def test_blocks_cut_pieces_exactly_as_str_split_cuts_their_concatenation():
    text = "a\n\nb\n\n\n\nc\n \nd\n\n\n"
    rng = random.Random(3)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, 6)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert list(corpus._blocks(pieces)) == text.split("\n\n")
    assert list(corpus._blocks([])) == [""] == "".split("\n\n")


def big_text(tmp_path, tail: bytes):
    """A .txt file of blank-line separated sentences past the first 1 MiB piece, a character cut by the piece
    boundary, then `tail`."""
    body = "\n\n".join(sentences(60) * 300).encode()
    body = body[:(1 << 20) - 1] + "\u00e9".encode() + b"\n\nlast block, long enough.\n\n"
    path = tmp_path / "big.txt"
    path.write_bytes(body + tail)
    return path, len(body)


def test_a_large_txt_file_streams_in_pieces_keeping_characters_cut_by_a_piece_boundary(tmp_path):
    path, _ = big_text(tmp_path, b"")
    blocks = list(corpus.file_docs([path], "blank_line", "text"))
    assert blocks == [b.strip() for b in path.read_text().split("\n\n")]
    assert list(corpus.file_docs([path], "file", "text")) == [path.read_text()]


@pytest.mark.parametrize("tail, message", [(b"caf\xe9 au lait", "not UTF-8 text \\(byte {at}: invalid continuation"),
                                           (b"ab\x00", "a binary file, not text \\(NUL byte at offset {at}\\)")])
def test_a_bad_byte_after_the_first_piece_is_named_by_its_offset_in_the_file(tmp_path, tail, message):
    path, offset = big_text(tmp_path, tail)
    at = offset + (3 if tail.startswith(b"caf") else 2)
    with pytest.raises(ValueError, match=f"{path}: " + message.format(at=at)):
        list(corpus.file_docs([path], "blank_line", "text"))
    with pytest.raises(ValueError, match=str(path)):
        tokenize.run(files_config([path], txt_split="blank_line"), tmp_path / "out")


def test_a_parquet_row_without_text_in_a_later_batch_fails_the_run_naming_file_and_row(tmp_path):
    import pandas as pd
    texts = [f"{s} (copy {i})" for i, s in enumerate(sentences(60) * 50)]
    texts[2500] = None
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"text": texts}).to_parquet(path, row_group_size=1000)
    with pytest.raises(ValueError, match=f"{path}: row 2500 has no text in column 'text'"):
        tokenize.run(files_config([path]), tmp_path / "out")


def test_the_default_worker_count_is_the_jobs_threads_when_snakemake_sets_them(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert tokenize.available_cpus() == cpus
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Snakemake exports for a job of `threads: 1`
    assert tokenize.available_cpus() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(cpus + 5))
    assert tokenize.available_cpus() == cpus
