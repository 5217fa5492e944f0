"""CaseOps ("lossless caps", the records' `lossless_caps_caseops_v1`): a reversible text transform that moves
ASCII capitalisation into four operator characters, and the byte sidecar that keeps BPB on the original text.

Over each maximal run of ASCII letters: a lowercase word stays as it is; an ALLCAPS word (two letters or more)
becomes ALLCAPS + the word in lowercase; a Titlecase word (or a single capital) TITLE + lowercase; any other
mixed-case word TITLE (if its first letter is a capital) + lowercase, with CAPNEXT before each later letter
that was a capital. An operator character already in the text is escaped as ESC + itself. Non-ASCII text is
untouched, so every ASCII letter of the transformed text is lowercase and the transform is exactly invertible.
The operators are the private-use characters U+E001..U+E004, SentencePiece user-defined symbols 4..7 of the
records' tokenizer (`fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model`) and of one trained here.

The val byte sidecar (`fineweb_val_bytes_NNNNNN.bin`, the shard format, one uint16 per val token) gives each
token the UTF-8 bytes of the original text it stands for: its surface in the transformed text, an operator
counting 0 and an escaped operator its own 3 bytes; BOS counts 0. SentencePiece's normalisation drops
whitespace at a document's ends, which no token's surface holds: those bytes count 0, as in the records.
"""
import re
from pathlib import Path

import numpy as np

from stages.io import sha256_file, verify_sha256
from stages.shards import ShardError, read_header, read_shard, shard_name, split_shards

TRANSFORM = "lossless_caps_caseops_v1"
TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)  # SentencePiece's user_defined_symbols, in the records' order
SIDECAR_SPLIT = "val_bytes"  # shard_name(SIDECAR_SPLIT, i) is the sidecar of val shard i

_WORD_OR_OPERATOR = re.compile("[A-Za-z]+|[\ue001-\ue004]")
_OPERATOR = re.compile("[\ue001-\ue004]")


class CaseOpsError(ValueError):
    """Text that is not the CaseOps transform of any text."""


def _encode_word(word: str) -> str:
    lower = word.lower()
    if word == lower:
        return word
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE if word[0].isupper() else ""
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps transform of `text`."""
    return _WORD_OR_OPERATOR.sub(lambda m: ESC + m[0] if m[0] in OPERATORS else _encode_word(m[0]), text)


def decode(text: str) -> str:
    """The text whose CaseOps transform is `text`; malformed operators are a CaseOpsError naming the offset."""
    out, i, n = [], 0, len(text)
    while i < n:
        ch = text[i]
        if ch == ESC:
            if i + 1 == n or text[i + 1] not in OPERATORS:
                raise CaseOpsError(f"offset {i}: ESC is not followed by an operator character")
            out.append(text[i + 1])
            i += 2
        elif ch in (TITLE, ALLCAPS, CAPNEXT) or "a" <= ch <= "z":
            i = _decode_word(text, i, out)
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _decode_word(text: str, i: int, out: list) -> int:
    """Decode the word starting at offset `i` (an optional TITLE or ALLCAPS, then letters, each optionally led by
    CAPNEXT after the first) into `out`; returns the offset after it."""
    start, mode = i, text[i] if text[i] in (TITLE, ALLCAPS) else None
    i += mode is not None
    first = True
    while i < len(text):
        capnext = text[i] == CAPNEXT and not first
        letter = text[i + capnext] if i + capnext < len(text) else ""
        if not "a" <= letter <= "z":
            if capnext or text[i] == CAPNEXT:
                raise CaseOpsError(f"offset {i}: CAPNEXT is not inside a word, before a lowercase letter")
            break
        upper = mode == ALLCAPS or capnext or (first and mode == TITLE)
        out.append(letter.upper() if upper else letter)
        i, first = i + capnext + 1, False
    if first:
        raise CaseOpsError(f"offset {start}: a capitalisation operator is not followed by a lowercase letter")
    return i


def original_byte_counts(surfaces) -> list[int]:
    """The original UTF-8 bytes of each piece of transformed text (SentencePiece surfaces, in order)."""
    counts, escaped = [], False
    for surface in surfaces:
        if not escaped and not _OPERATOR.search(surface):
            counts.append(len(surface.encode("utf-8")))
            continue
        count = 0
        for ch in surface:
            if escaped or ch not in OPERATORS:
                count += len(ch.encode("utf-8"))
                escaped = False
            elif ch == ESC:
                escaped = True
        counts.append(count)
    if escaped:
        raise CaseOpsError("the pieces end inside an escape (ESC without its operator)")
    return counts


def encode_with_bytes(sp, docs: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """Each transformed document's ids (as sp.encode gives them) and each id's original bytes."""
    ids, counts = [], []
    for doc in docs:
        pieces = sp.encode(doc, out_type="proto").pieces
        ids.append([p.id for p in pieces])
        counts.append(original_byte_counts(p.surface for p in pieces))
    return ids, counts


def check_tokenizer(sp, model) -> None:
    """A CaseOps tokenizer holds each operator as one user-defined piece, the ids the records' tokenizer uses."""
    for expected, op in enumerate(OPERATORS, 4):
        got = sp.piece_to_id(op)
        if not sp.is_control(got) and sp.id_to_piece(got) == op and got == expected:
            continue
        raise ValueError(f"{model}: operator U+{ord(op):04X} is piece {got}, not the user-defined symbol "
                         f"{expected} of a CaseOps tokenizer (tokenize.caseops)")


# --- the sidecar files ------------------------------------------------------------------------------

def sidecar_name(index: int) -> str:
    return shard_name(SIDECAR_SPLIT, index)


def check_lines_up(sidecar: Path, count: int, val_shard: Path, val_count: int) -> None:
    if count != val_count:
        raise ShardError(f"{sidecar}: {count} byte counts for the {val_count} tokens of {val_shard}; a byte "
                         "sidecar gives one count per val token")


def manifest_sidecar_bytes(manifest_path: Path, manifest: dict, val_paths: list[Path], verify: bool):
    """Each val token's original bytes, from the sidecars the manifest lists (None when it lists none), each
    verified against its recorded sha256 and lined up, token for token, with its val shard."""
    entries = manifest.get("byte_sidecars")
    if not entries:
        return None
    if len(entries) != len(val_paths):
        raise ShardError(f"{manifest_path}: {len(entries)} byte sidecars for {len(val_paths)} val shards")
    parts = []
    for entry, val_path in zip(entries, val_paths):
        path = manifest_path.parent / entry["name"]
        if verify:
            verify_sha256(path, entry["sha256"], manifest_path)
        counts = read_shard(path)
        check_lines_up(path, len(counts), val_path, len(read_shard(val_path)))
        parts.append(np.asarray(counts, dtype=np.int64))
    return np.concatenate(parts)


def import_sidecars(src: Path, val_paths: list[Path], staging: Path, required: bool, link) -> list[dict]:
    """The byte sidecars beside challenge val shards (`required` with tokenize.caseops), each lined up token for
    token with its val shard and `link`ed into the staging folder; their manifest entries."""
    paths = split_shards(src, SIDECAR_SPLIT)
    if not paths and required:
        raise FileNotFoundError(f"tokenize.caseops: {src} holds no fineweb_{SIDECAR_SPLIT}_*.bin byte sidecars "
                                "beside its val shards")
    if paths and [p.name for p in paths] != [sidecar_name(i) for i in range(len(val_paths))]:
        raise ShardError(f"{src}: byte sidecars {[p.name for p in paths]} are not one per val shard "
                         f"{[p.name for p in val_paths]}")
    entries = []
    for path, val_path in zip(paths, val_paths):
        count = read_header(path)
        check_lines_up(path, count, val_path, read_header(val_path))
        link(path, staging / path.name)
        entries.append({"name": path.name, "tokens": count, "sha256": sha256_file(staging / path.name)})
    return entries
