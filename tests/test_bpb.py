"""Bits per byte as the challenge computes it, checked on the challenge's own tokenizers."""
import math
import re

import numpy as np
import pytest
import sentencepiece as spm

from stages import bpb

SPACE = "\u2581"
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")

PROSE = [
    "The committee met on Tuesday, 14 March 2023, to review the budget. Nobody expected the numbers "
    "to add up; they rarely did. Still, the chair insisted: \"We will finish by 5 p.m.\"",
    "At the corner café, a naïve tourist ordered a crème brûlée — then another. The waiter smiled, "
    "wrote \u201ctwo\u201d on his pad, and said it would cost \u20ac12.50 (tip not included).",
    "Rain fell over the hills for three days.\nThe river rose by 2.7 metres, and the old bridge, "
    "built in 1887, finally gave way.\n\nNo one was hurt. \U0001F30A The town rebuilt it within a year!",
    "She wrote 1,024 lines of code before lunch... and deleted 999 of them afterwards. \"Less is more,\" "
    "she said, grinning \U0001F600, while her colleagues (all 7 of them) groaned in unison.",
    "Zoë's résumé listed Portuguese, Español and Deutsch; her interview in Zürich lasted 45 minutes "
    "and ended with a handshake \U0001F91D and a promise to call back on Friday.",
]


@pytest.fixture(scope="module", params=["fineweb_1024_bpe.model", "fineweb_8192_bpe.model"])
def tokenizer(request, fixture_tokenizers):
    return spm.SentencePieceProcessor(model_file=str(fixture_tokenizers / request.param))


@pytest.fixture(scope="module")
def sp8192(fixture_tokenizers):
    return spm.SentencePieceProcessor(model_file=str(fixture_tokenizers / "fineweb_8192_bpe.model"))


def reference_entry(sp, i):
    """(base bytes, leading space, boundary) of piece i, straight from the rule's wording."""
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return 0, False, True
    piece = sp.id_to_piece(i)
    if BYTE_PIECE.match(piece):
        assert sp.is_byte(i)
        return 1, False, False
    space = piece.startswith(SPACE)
    text = piece[len(SPACE):] if space else piece
    return len(text.encode("utf-8")), space, False


# --- lookup tables --------------------------------------------------------------------------------

def test_tables_follow_the_rule_piece_by_piece(tokenizer):
    tables = bpb.build_byte_tables(tokenizer)
    n = tokenizer.vocab_size()
    assert len(tables.base_bytes) == len(tables.has_leading_space) == len(tables.is_boundary) == n
    mismatches = []
    for i in range(n):
        got = (int(tables.base_bytes[i]), bool(tables.has_leading_space[i]), bool(tables.is_boundary[i]))
        if got != reference_entry(tokenizer, i):
            mismatches.append((i, tokenizer.id_to_piece(i), got, reference_entry(tokenizer, i)))
    assert mismatches == []


def test_table_dtypes_match_the_challenge(tokenizer):
    tables = bpb.build_byte_tables(tokenizer)
    assert tables.base_bytes.dtype == np.int16
    assert tables.has_leading_space.dtype == bool and tables.is_boundary.dtype == bool


def test_special_ids_are_zero_byte_boundaries(tokenizer):
    tables = bpb.build_byte_tables(tokenizer)
    for i in (0, 1, 2, 3):  # pad, bos, eos, unk
        assert tables.is_boundary[i] and tables.base_bytes[i] == 0 and not tables.has_leading_space[i]
    assert tokenizer.bos_id() == 1 and tokenizer.unk_id() == 3


def test_concrete_pieces_by_hand(sp8192):
    tables = bpb.build_byte_tables(sp8192)
    byte_a = sp8192.piece_to_id("<0x41>")
    assert sp8192.is_byte(byte_a)
    assert (tables.base_bytes[byte_a], tables.has_leading_space[byte_a], tables.is_boundary[byte_a]) == (1, False, False)
    byte_c3 = sp8192.piece_to_id("<0xC3>")  # a lead byte of a 2-byte UTF-8 character still counts 1
    assert tables.base_bytes[byte_c3] == 1
    the = sp8192.piece_to_id(SPACE + "the")
    assert the != sp8192.unk_id()
    assert (tables.base_bytes[the], tables.has_leading_space[the], tables.is_boundary[the]) == (3, True, False)
    dash = sp8192.piece_to_id(SPACE + "\u2014")  # "▁—": the dash is 3 UTF-8 bytes
    assert dash != sp8192.unk_id()
    assert (tables.base_bytes[dash], tables.has_leading_space[dash]) == (3, True)
    lone_space = sp8192.piece_to_id(SPACE)
    assert lone_space != sp8192.unk_id()
    assert (tables.base_bytes[lone_space], tables.has_leading_space[lone_space]) == (0, True)


def test_byte_fallback_tokenizer_has_256_one_byte_pieces_and_the_1024_one_none(fixture_tokenizers):
    for name, count in (("fineweb_8192_bpe.model", 256), ("fineweb_1024_bpe.model", 0)):
        sp = spm.SentencePieceProcessor(model_file=str(fixture_tokenizers / name))
        tables = bpb.build_byte_tables(sp)
        byte_ids = [i for i in range(sp.vocab_size()) if sp.is_byte(i)]
        assert len(byte_ids) == count
        assert all(tables.base_bytes[i] == 1 for i in byte_ids)


def test_tables_padded_to_a_larger_model_vocab_are_zero_byte_boundaries(sp8192):
    tables = bpb.build_byte_tables(sp8192, vocab_size=8192 + 64)
    assert len(tables.base_bytes) == 8192 + 64
    assert tables.is_boundary[8192:].all()
    assert (tables.base_bytes[8192:] == 0).all() and not tables.has_leading_space[8192:].any()


# --- per-target bytes -----------------------------------------------------------------------------

def test_leading_space_counts_one_byte_unless_the_previous_token_is_a_boundary(sp8192):
    tables = bpb.build_byte_tables(sp8192)
    the = sp8192.piece_to_id(SPACE + "the")
    word = sp8192.piece_to_id("the")      # same text, no leading space
    byte = sp8192.piece_to_id("<0x41>")
    bos, unk, pad = 1, 3, 0
    prev = [bos, unk, pad, word, byte, the, bos, word]
    target = [the, the, the, the, the, the, word, word]
    assert bpb.target_bytes(tables, prev, target).tolist() == [3, 3, 3, 4, 4, 4, 3, 3]
    assert bpb.target_bytes(tables, prev, target).dtype == np.int64


def test_stream_bytes_scores_each_token_after_the_one_before(sp8192):
    tables = bpb.build_byte_tables(sp8192)
    the = sp8192.piece_to_id(SPACE + "the")
    word = sp8192.piece_to_id("the")
    # BOS (not a target), "the" (3), "▁the" after a word (4), BOS (0), "▁the" after BOS (3)
    assert bpb.stream_bytes(tables, [1, word, the, 1, the]) == 3 + 4 + 0 + 3
    assert bpb.stream_bytes(tables, [1]) == 0


@pytest.mark.parametrize("doc", PROSE, ids=[f"doc{i}" for i in range(len(PROSE))])
def test_bytes_from_tables_equal_decoded_utf8_length_with_byte_fallback(sp8192, doc):
    tables = bpb.build_byte_tables(sp8192)
    ids = [sp8192.bos_id()] + sp8192.encode(doc)
    assert bpb.stream_bytes(tables, ids) == len(sp8192.decode(ids).encode("utf-8"))


def test_prose_documents_exercise_byte_pieces_and_leading_spaces(sp8192):
    """Guard for the test above: the documents do reach the interesting cases."""
    ids = [i for doc in PROSE for i in sp8192.encode(doc)]
    assert any(sp8192.is_byte(i) for i in ids)
    assert any(sp8192.id_to_piece(i).startswith(SPACE) for i in ids)


def test_a_stream_of_several_documents_sums_the_per_document_bytes(sp8192):
    tables = bpb.build_byte_tables(sp8192)
    docs = [[sp8192.bos_id()] + sp8192.encode(d) for d in PROSE]
    stream = [t for d in docs for t in d]
    assert bpb.stream_bytes(tables, stream) == sum(bpb.stream_bytes(tables, d) for d in docs)


# --- the metric -----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_sum, nbytes", [(1.0, 1), (12345.678, 40_000), (math.log(2) * 10, 10)])
def test_bits_per_byte_is_loss_sum_over_ln2_times_bytes(loss_sum, nbytes):
    assert bpb.bits_per_byte(loss_sum, nbytes) == pytest.approx(loss_sum / (math.log(2) * nbytes), rel=1e-15)


def test_bits_per_byte_of_ln2_nats_per_byte_is_one():
    assert bpb.bits_per_byte(math.log(2) * 1000, 1000) == pytest.approx(1.0, rel=1e-15)

