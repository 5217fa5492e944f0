"""CaseOps: the transform's exact round trip, the val byte sidecars tokenize writes (and imports beside challenge
shards), and evaluate counting bytes through them."""
import json
import random
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import default_config
from test_evaluate import eval_config, tiny_model

from stages import bpb, caseops, evaluate, tokenize
from stages import config as caddie
from stages.documents import doc_hash
from stages.io import sha256_file, write_json
from stages.scoring import ONE
from stages.shards import ShardError, read_shard, write_shard

TITLE, ALLCAPS, CAPNEXT, ESC = caseops.OPERATORS
RECORD = Path(__file__).resolve().parents[1] / "peers" / "record-2135"

MIXED = [
    "The NASA Launch",
    "iPhone and McDonald's, OK? A B c.",
    "ÉCOLE Zürich naïve Ωmega ＡＢ 東京 ﬁne",
    "2024-05-20: HTTP/2 uses 443 and x86_64 ABC123def",
    f"literal operators {TITLE}{ALLCAPS} {CAPNEXT}x {ESC}{ESC} and Caps{TITLE}After",
    "", "a", "Z", "  leading and trailing  ", "tabs\tand\nnew\n\nlines",
]


@pytest.mark.parametrize("text", MIXED)
def test_the_transform_round_trips_exactly(text):
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert not any("A" <= c <= "Z" for c in encoded)  # every capital became an operator


def test_the_transform_writes_the_records_operators():
    assert caseops.encode("The NASA iPhone McDonald x") == (
        f"{TITLE}the {ALLCAPS}nasa i{CAPNEXT}phone {TITLE}mc{CAPNEXT}donald x")
    assert caseops.encode("A") == f"{TITLE}a"
    assert caseops.encode(f"a{ALLCAPS}b") == f"a{ESC}{ALLCAPS}b"


def test_random_text_round_trips():
    rng = random.Random(0)
    alphabet = "aAbBzZ  ,.\n1É\u3000ﬁxyXY" + "".join(caseops.OPERATORS)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert caseops.decode(caseops.encode(text)) == text


@pytest.mark.parametrize("bad, where", [(f"x{ESC}", "offset 1"), (f"{ESC}a", "offset 0"),
                                         (f"{TITLE} a", "offset 0"), (f"{CAPNEXT}a", "offset 0"),
                                         (f"ab{CAPNEXT}", "offset 2"), (f"a{CAPNEXT}1", "offset 1")])
def test_malformed_text_is_an_error_naming_the_offset(bad, where):
    with pytest.raises(caseops.CaseOpsError, match=where):
        caseops.decode(bad)


def test_original_bytes_count_operators_as_zero_and_escaped_operators_as_themselves():
    assert caseops.original_byte_counts([TITLE, "the", " é"]) == [0, 3, 3]
    assert caseops.original_byte_counts([ESC, ALLCAPS + "x", TITLE]) == [0, 4, 0]
    with pytest.raises(caseops.CaseOpsError, match="escape"):
        caseops.original_byte_counts(["a", ESC])


@pytest.mark.skipif(not (RECORD / "lossless_caps.py").is_file(), reason="peers/record-2135 not fetched")
def test_the_transform_and_byte_counts_equal_the_records():
    sys.path.insert(0, str(RECORD))
    try:
        import lossless_caps as record
    finally:
        sys.path.remove(str(RECORD))
    rng = random.Random(1)
    alphabet = "aAbBzZ  ,.\n1É\u3000ﬁxyXY" + "".join(caseops.OPERATORS)
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        encoded = caseops.encode(text)
        assert encoded == record.encode_lossless_caps_v2(text)
        pieces = [encoded[i:i + 3] for i in range(0, len(encoded), 3)]
        assert caseops.original_byte_counts(pieces) == record.surface_piece_original_byte_counts(
            pieces, text_transform_name=record.LOSSLESS_CAPS_CASEOPS_V1)


# --- tokenize -------------------------------------------------------------------------------------

WORDS = ["The", "NASA", "iPhone", "river", "McDonald", "Zürich", "naïve", "OK", "x86", "2024", "東京", "Ωmega",
         "garden", "LOUD", "quiet", "Berlin", "data", "ＡＢ"]


def documents(n=120, seed=0):
    """Mixed-case documents, single-spaced, without whitespace at their ends (SentencePiece drops that)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) + f" #{i}." for i in range(n)]


def caseops_config(path, **overrides):
    cfg = caddie.tokenize_section({**default_config()["defaults"]["tokenize"], "source": "files"})
    cfg.update(files={"paths": [str(path)], "txt_split": "file", "text_field": "text"}, min_doc_chars=5,
               val_docs=30, vocab_size=400, max_docs=0, shard_tokens=300, caseops=True)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("caseops")
    docs = documents()
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    manifest = tokenize.run(caseops_config(path), root / "out", workers=1)
    return root / "out", manifest, docs


def val_texts(out: Path, manifest: dict):
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    val = [out / s["name"] for s in manifest["shards"] if s["split"] == "val"]
    return sp, [sp.decode(d.tolist()) for d in tokenize.split_documents(val)]


def test_tokenize_with_caseops_writes_a_sidecar_per_val_shard_lined_up_token_for_token(caseops_run):
    out, manifest, _ = caseops_run
    val = [s for s in manifest["shards"] if s["split"] == "val"]
    sidecars = manifest["byte_sidecars"]
    assert len(val) > 1 and [s["name"] for s in sidecars] == [f"fineweb_val_bytes_{i:06d}.bin" for i in range(len(val))]
    for shard, sidecar in zip(val, sidecars):
        tokens, counts = read_shard(out / shard["name"]), read_shard(out / sidecar["name"])
        assert len(tokens) == len(counts) == sidecar["tokens"] and sidecar["sha256"] == sha256_file(out / sidecar["name"])
        assert (counts[tokens == tokenize.BOS_ID] == 0).all()
        assert (counts[(tokens >= 4) & (tokens <= 7)] == 0).all()  # the operators stand for no byte
    assert manifest["tokenizer"]["text_transform"] == caseops.TRANSFORM
    assert manifest["tokenizer"]["settings"]["user_defined_symbols"] == list(caseops.OPERATORS)


def test_sidecar_bytes_sum_to_the_utf8_length_of_the_original_val_documents(caseops_run):
    out, manifest, docs = caseops_run
    sp, texts = val_texts(out, manifest)
    val_docs = [d for d in docs if doc_hash(d, "") in set(manifest["val_doc_sha256"])]
    assert len(val_docs) == len(texts) == manifest["documents"]["val"]
    # decoded through the transform, the val text is the documents' (as SentencePiece normalises them: NFKC)
    assert {caseops.decode(t) for t in texts} == {unicodedata.normalize("NFKC", d) for d in val_docs}
    assert any(d != d.lower() for d in val_docs)
    sidecar = np.concatenate([read_shard(out / s["name"]) for s in manifest["byte_sidecars"]]).astype(np.int64)
    utf8 = sum(len(d.encode("utf-8")) for d in val_docs)
    assert sidecar.sum() == utf8 == manifest["val_raw_bytes"]
    # the tokenizer's byte tables count the transformed text: operators are 3 bytes each there
    tables = bpb.build_byte_tables(sp)
    val = np.concatenate([read_shard(out / s["name"]) for s in manifest["shards"] if s["split"] == "val"])
    assert bpb.stream_bytes(tables, val) > utf8


def test_the_caseops_tokenizer_has_the_records_operator_ids(caseops_run):
    out, _, _ = caseops_run
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [sp.piece_to_id(op) for op in caseops.OPERATORS] == [4, 5, 6, 7]
    caseops.check_tokenizer(sp, out / "tokenizer.model")


def test_a_tokenizer_without_the_operators_is_refused(tmp_path, fixture_tokenizers):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60)))
    given = fixture_tokenizers / "fineweb_1024_bpe.model"
    with pytest.raises(ValueError, match="U\\+E001 .*tokenize.caseops"):
        tokenize.run(caseops_config(path, tokenizer_model=str(given), vocab_size=1024), tmp_path / "out", workers=1)


def test_the_default_writes_no_sidecar(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(60)))
    manifest = tokenize.run(caseops_config(path, caseops=False), tmp_path / "out", workers=1)
    assert "byte_sidecars" not in manifest and manifest["tokenizer"]["settings"] == tokenize.SP_SETTINGS
    assert not list((tmp_path / "out").glob("fineweb_val_bytes_*"))


# --- source: challenge ----------------------------------------------------------------------------

def challenge_config(src: Path, caseops_on: bool) -> dict:
    cfg = {**default_config()["defaults"]["tokenize"], "source": "challenge", "caseops": caseops_on}
    cfg["challenge"] = {"dir": str(src), "tokenizer": str(src / "tokenizer.model"), "raw_val_bytes": None}
    return cfg


def test_challenge_shards_bring_their_sidecars(caseops_run, tmp_path):
    out, made, _ = caseops_run
    manifest = tokenize.run(challenge_config(out, True), tmp_path / "imported")
    assert [(s["name"], s["sha256"]) for s in manifest["byte_sidecars"]] == [
        (s["name"], s["sha256"]) for s in made["byte_sidecars"]]
    assert (tmp_path / "imported" / made["byte_sidecars"][0]["name"]).is_file()


def copy_shards(src: Path, dst: Path, with_sidecars: bool) -> Path:
    dst.mkdir()
    for path in src.glob("*"):
        if path.suffix in (".bin", ".model") and (with_sidecars or "_bytes_" not in path.name):
            (dst / path.name).write_bytes(path.read_bytes())
    return dst


def test_challenge_with_caseops_requires_the_sidecars(caseops_run, tmp_path):
    src = copy_shards(caseops_run[0], tmp_path / "src", with_sidecars=False)
    with pytest.raises(FileNotFoundError, match="tokenize.caseops: .* no fineweb_val_bytes_"):
        tokenize.run(challenge_config(src, True), tmp_path / "out")
    assert "byte_sidecars" not in tokenize.run(challenge_config(src, False), tmp_path / "plain")


def test_a_challenge_sidecar_that_does_not_line_up_is_an_error_naming_it(caseops_run, tmp_path):
    src = copy_shards(caseops_run[0], tmp_path / "src", with_sidecars=True)
    bad = src / "fineweb_val_bytes_000001.bin"
    write_shard(bad, read_shard(bad)[:-1])
    with pytest.raises(ShardError, match=f"{bad}: .* byte counts for the .* tokens of .*fineweb_val_000001.bin"):
        tokenize.run(challenge_config(src, True), tmp_path / "out")


# --- evaluate -------------------------------------------------------------------------------------

def test_evaluate_counts_the_bytes_of_the_sidecar(caseops_run):
    out, manifest, _ = caseops_run
    _, counter, tokens = evaluate.read_val(out / "manifest.json", ONE)
    sidecar = np.concatenate([read_shard(out / s["name"]) for s in manifest["byte_sidecars"]]).astype(np.int64)
    assert isinstance(counter, bpb.SidecarBytes) and (counter.counts == sidecar).all()
    tables = bpb.build_byte_tables(spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")))
    assert bpb.stream_bytes(tables, tokens) != sidecar[1:].sum()
    model = tiny_model(vocab=manifest["vocab_size"])
    for mode in ("standard", "sliding", "ttt"):
        with_sidecar = evaluate.score(model, tokens, counter, eval_config(), mode, torch.device("cpu"))
        with_tables = evaluate.score(model, tokens, tables, eval_config(), mode, torch.device("cpu"))
        assert with_sidecar["bytes"] == sidecar[1:].sum() == manifest["val_raw_bytes"], mode
        assert with_tables["bytes"] == bpb.stream_bytes(tables, tokens), mode
        assert with_sidecar["loss_sum"] == pytest.approx(with_tables["loss_sum"], rel=1e-9)


def test_a_sidecar_that_does_not_line_up_with_its_val_shard_is_an_error_naming_it(caseops_run, tmp_path):
    out = copy_shards(caseops_run[0], tmp_path / "out", with_sidecars=True)
    manifest = json.loads((caseops_run[0] / "manifest.json").read_text())
    bad = out / manifest["byte_sidecars"][0]["name"]
    write_shard(bad, np.r_[read_shard(bad), 5])
    manifest["byte_sidecars"][0]["sha256"] = sha256_file(bad)
    write_json(out / "manifest.json", manifest)
    with pytest.raises(ShardError, match=f"{bad}: .* byte counts for the .* tokens of .*fineweb_val_000000.bin"):
        evaluate.read_val(out / "manifest.json", ONE)


def test_a_changed_sidecar_fails_its_recorded_sha256(caseops_run, tmp_path):
    out = copy_shards(caseops_run[0], tmp_path / "out", with_sidecars=True)
    (out / "manifest.json").write_text((caseops_run[0] / "manifest.json").read_text())
    bad = out / "fineweb_val_bytes_000000.bin"
    counts = np.array(read_shard(bad))
    counts[-1] += 1
    write_shard(bad, counts)
    with pytest.raises(Exception, match="fineweb_val_bytes_000000.bin"):
        evaluate.read_val(out / "manifest.json", ONE)


def test_the_sidecars_are_the_same_for_any_number_of_workers(caseops_run, tmp_path):
    out, manifest, docs = caseops_run
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    again = tokenize.run(caseops_config(path), tmp_path / "out", workers=2)
    assert again["byte_sidecars"] == manifest["byte_sidecars"] and again["shards"] == manifest["shards"]
