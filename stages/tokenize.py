"""tokenize: documents -> SentencePiece tokenizer + challenge-format shards + manifest.json.

The val split is a fixed set of documents chosen by a salted hash of their text (not "the first N"),
and the tokenizer is trained on train documents only: a bounded, deterministic sample of them, the
`tokenizer_sample_docs` documents whose hashes rank next after val's (SentencePiece's
`input_sentence_size`). Every document starts with BOS; val and train never share a shard, and no train
document equals a val document token for token. With `source: challenge`, existing shards and their
tokenizer are validated and linked as they are.

A corpus of any size streams through in passes, each reading the documents afresh: the first ranks them
by hash to find val and the tokenizer's sample, the second (only when a tokenizer is trained) feeds the
sample to SentencePiece, the third encodes and writes val, the fourth train. Worker processes encode
batches of documents, each loading the model once; their results are taken in input order, so the shards
are byte-identical for any number of workers, and each shard is written as soon as it fills. Memory grows
with the corpus only in the exact-duplicate filter: a 16-byte digest per document, O(documents x 16 B)
(about 100 bytes each in a Python set). The rest is bounded by the settings: the hash ranks of val_docs +
tokenizer_sample_docs documents, the sample inside SentencePiece, one shard being filled (shard_tokens x
2 bytes, copied twice while it is written) and a few batches of text per worker.

Whatever the source, the tokenizer must belong to the shards: sampled documents, read back from the
written shards, decode and re-encode to the same ids. New outputs are written into a staging folder and
replace the previous run's only when every shard and check has succeeded, so a failing run leaves the
last good outputs as they were.
"""
import argparse
import functools
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm

from stages import caseops, corpus
from stages.documents import doc_hash, cleaned, select_documents, documents_at, documents_outside, TokenizerSample
from stages.io import sha256_file, write_bytes, write_json
from stages.shards import ShardError, check_splits_apart, read_shard, shard_name, split_shards, write_shard

BOS_ID = 1
# The challenge's SentencePiece settings (data/download_hf_docs_and_tokenize.py).
SP_SETTINGS = dict(model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
                   normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
                   eos_id=2, unk_id=3, hard_vocab_limit=False)
STAGING = ".staging"  # inside out_dir: the new outputs, until every check has passed
ROUND_TRIP_SAMPLE = 64  # documents per split
# A tokenizer re-encodes its own decoded documents to the same ids; measured on python-docs with the
# challenge's 1024 and 8192 models and five tokenizers trained here (512/1024/8192): 100% of every
# sample for the tokenizer that made the shards, at most 31% for any other one (same vocab size and
# settings, trained on other data, included).
ROUND_TRIP_MIN = 0.9
# Decoded val text / raw_val_bytes. nmt_nfkc normalisation (whitespace runs and newlines become one
# space, NFKC) and <unk> pieces only remove bytes: the tokenizer that made the shards decodes to 94-100%
# of the original text (web-like prose 99.7%, hard-wrapped licences 96.3%, python docs 96.0%, and 94.4%
# with the 1024 model, which has no byte fallback); another tokenizer lands at 72-78% or above 103%,
# except near twins, which the round trip rejects.
DECODED_BYTES_RANGE = (0.92, 1.01)
# One encoding task: enough text to outweigh a task's overhead, little enough to keep workers even.
BATCH_CHARS = 1 << 20
BATCH_DOCS = 1024
TASKS_PER_WORKER = 2  # in flight: every worker stays busy, and the reader never runs ahead of them


# SentencePiece records its thread count in the model file: a fixed count makes the file the same on every
# machine (the pieces do not depend on it).
TOKENIZER_THREADS = 4


def sp_settings(cfg: dict) -> dict:
    """The challenge's settings; with CaseOps, the records': its operators as user-defined symbols 4..7."""
    return {**SP_SETTINGS, "user_defined_symbols": list(caseops.OPERATORS)} if cfg.get("caseops") else SP_SETTINGS


def train_tokenizer(train_docs, vocab_size: int, out_model: Path, settings: dict = SP_SETTINGS) -> None:
    """Train SentencePiece BPE with `settings` on `train_docs` (a sized iterable of train documents only), all
    of which, and no more, SentencePiece loads (its input_sentence_size)."""
    model = io.BytesIO()
    # SentencePiece refuses 1..100 here; 0 (all) is the same for it is given exactly these documents.
    limit = len(train_docs) if len(train_docs) > 100 else 0
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train_docs), model_writer=model,
                                   input_sentence_size=limit, vocab_size=vocab_size,
                                   max_sentence_length=1 << 16, num_threads=TOKENIZER_THREADS,
                                   minloglevel=2, **settings)
    write_bytes(out_model, model.getvalue())


# --- encoding, in worker processes ----------------------------------------------------------------

@dataclass
class Encoded:
    """A batch of documents encoded: their ids in one array, each document led by BOS; each document's
    length (BOS included); and a 16-byte digest of each document's ids, which stands for them when
    documents are compared token for token; with CaseOps val, each id's original bytes (BOS: 0)."""
    tokens: np.ndarray
    lengths: np.ndarray
    digests: list
    byte_counts: np.ndarray | None = None

    def select(self, keep: np.ndarray) -> "Encoded":
        if keep.all():
            return self
        tokens = np.repeat(keep, self.lengths)
        return Encoded(self.tokens[tokens], self.lengths[keep], [d for d, k in zip(self.digests, keep) if k],
                       None if self.byte_counts is None else self.byte_counts[tokens])

    def document_ids(self) -> list[list[int]]:
        """Each document's ids, without its BOS."""
        ends = np.cumsum(self.lengths)
        return [self.tokens[end - length + 1:end].tolist() for end, length in zip(ends, self.lengths)]


def encode_batch(sp, docs: list[str], with_bytes: bool = False) -> Encoded:
    """The documents encoded by `sp`, in one array (ids fit uint16: the schema caps vocab_size at 65536);
    `with_bytes`: and each id's original bytes (CaseOps documents)."""
    ids, counts = caseops.encode_with_bytes(sp, docs) if with_bytes else (sp.encode(docs), None)
    lengths = np.array([len(doc) for doc in ids], dtype=np.int64)
    body = np.fromiter(itertools.chain.from_iterable(ids), dtype="<u2", count=int(lengths.sum()))
    starts = np.cumsum(lengths) - lengths
    digests = [hashlib.blake2b(body[a:a + n].tobytes(), digest_size=16).digest() for a, n in zip(starts, lengths)]
    if counts is not None:
        counts = np.insert(np.fromiter(itertools.chain.from_iterable(counts), dtype="<u2", count=len(body)),
                           starts, 0)
    return Encoded(np.insert(body, starts, BOS_ID), lengths + 1, digests, counts)


def batches(docs):
    """Consecutive documents in lists of at most BATCH_DOCS, cut once they reach BATCH_CHARS characters."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) == BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_sp = None  # an encoding worker's SentencePiece model, loaded once per process


def _load_worker_model(model_file: str) -> None:
    global _worker_sp
    _worker_sp = spm.SentencePieceProcessor(model_file=model_file, num_threads=1)


def _encode_in_worker(docs: list[str], with_bytes: bool = False) -> Encoded:
    return encode_batch(_worker_sp, docs, with_bytes)


def in_order(pool, fn, items, window: int):
    """(item, fn(item)) for each item, computed by the pool, in input order, with at most `window` tasks in
    flight. (Pool.imap reads its input to the end as fast as it can, holding everything it has read.)"""
    pending = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


@contextmanager
def encoder(model: Path, workers: int):
    """A function from batches of documents (and `with_bytes`) to (batch, Encoded) pairs, in order, computed by
    `workers` processes that each load the model once (in this process when `workers` is 1)."""
    if workers == 1:
        sp = spm.SentencePieceProcessor(model_file=str(model), num_threads=1)
        yield lambda items, with_bytes=False: ((batch, encode_batch(sp, batch, with_bytes)) for batch in items)
        return
    with ProcessPoolExecutor(workers, initializer=_load_worker_model, initargs=(str(model),)) as pool:
        yield lambda items, with_bytes=False: in_order(pool, functools.partial(_encode_in_worker, with_bytes=with_bytes),
                                                       items, TASKS_PER_WORKER * workers)


def available_cpus() -> int:
    """The CPUs this process may use, at most OMP_NUM_THREADS where that is set (Snakemake sets it to the
    job's threads)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(cpus, int(limit)) if limit.isdigit() and int(limit) > 0 else cpus


# --- documents that tokenize alike ----------------------------------------------------------------
# Different texts can tokenize alike (nmt_nfkc turns a newline into a space) and the leak check compares
# tokens, not text: a val document whose ids repeat an earlier val document's is dropped, and so is a
# train document whose ids equal a val document's.

def first_by_tokens(encoded, seen: set):
    """For each (batch, Encoded): (the documents whose ids are not yet in `seen`, their Encoded, how many
    documents the batch had); the kept documents' ids join `seen`."""
    for docs, enc in encoded:
        keep = np.zeros(len(docs), dtype=bool)
        for i, digest in enumerate(enc.digests):
            if digest not in seen:
                seen.add(digest)
                keep[i] = True
        yield [d for d, k in zip(docs, keep) if k], enc.select(keep), len(docs)


def absent_by_tokens(encoded, seen: set):
    """For each (batch, Encoded): (the documents whose ids are not in `seen`, their Encoded, how many
    documents the batch had)."""
    for docs, enc in encoded:
        keep = np.array([digest not in seen for digest in enc.digests], dtype=bool)
        yield [d for d, k in zip(docs, keep) if k], enc.select(keep), len(docs)


def encode_without_token_duplicates(sp, val: list[str], train: list[str]):
    """Encode both splits, dropping val documents whose ids repeat an earlier val document's and train
    documents whose ids equal a val document's, as the run does batch by batch.
    Returns (kept val texts, val ids, train ids, {split: documents dropped})."""
    seen = set()
    [(kept_val, val_enc, _)] = first_by_tokens([(val, encode_batch(sp, val))], seen)
    [(_, train_enc, _)] = absent_by_tokens([(train, encode_batch(sp, train))], seen)
    val_ids, train_ids = val_enc.document_ids(), train_enc.document_ids()
    return kept_val, val_ids, train_ids, {"val": len(val) - len(val_ids), "train": len(train) - len(train_ids)}


# --- shards ---------------------------------------------------------------------------------------

class ShardWriter:
    """One split's token stream cut into shards of `shard_tokens` (documents may span shards, as in the
    challenge), each written as soon as it fills: it holds one shard's tokens, never the split's."""

    def __init__(self, split: str, shard_tokens: int, out_dir: Path):
        self.split, self.out_dir = split, out_dir
        self.buffer = np.empty(shard_tokens, dtype="<u2")  # pages are taken as tokens arrive
        self.filled = 0
        self.entries = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + take] = tokens[:take]
            self.filled += take
            tokens = tokens[take:]
            if self.filled == len(self.buffer):
                self._write()

    def close(self) -> list[dict]:
        """Write the last, partly filled shard (a split without tokens still has its one empty shard)."""
        if self.filled or not self.entries:
            self._write()
        return self.entries

    def _write(self) -> None:
        path = self.out_dir / shard_name(self.split, len(self.entries))
        chunk = self.buffer[:self.filled]
        write_shard(path, chunk)
        self.entries.append(shard_entry(path, self.split, chunk))
        self.filled = 0


def shard_entry(path: Path, split: str, tokens) -> dict:
    return {"name": path.name, "split": split, "tokens": int(len(tokens)),
            "bos": int(np.count_nonzero(np.asarray(tokens) == BOS_ID)), "sha256": sha256_file(path)}


def write_val(encoded, writer: ShardWriter, sidecar: ShardWriter | None = None, original=str) -> dict:
    """Write the val documents, each set of ids once (and their ids' original bytes to the `sidecar`); their
    figures, and the digests of their ids. `original` gives a document's original text (CaseOps: decode)."""
    seen, read, kept, raw_bytes, hashes = set(), 0, 0, 0, []
    for docs, enc, count in first_by_tokens(encoded, seen):
        writer.add(enc.tokens)
        if sidecar is not None:
            sidecar.add(enc.byte_counts)
        read, kept = read + count, kept + len(docs)
        texts = [original(d) for d in docs]
        raw_bytes += sum(len(t.encode("utf-8")) for t in texts)
        hashes += [doc_hash(t, "") for t in texts]
    figures = {"shards": writer.close(), "documents": kept, "dropped": read - kept, "raw_bytes": raw_bytes,
               "doc_sha256": sorted(hashes), "digests": seen}
    return {**figures, "byte_sidecars": sidecar_entries(sidecar.close())} if sidecar else figures


def sidecar_entries(entries: list[dict]) -> list[dict]:
    return [{k: e[k] for k in ("name", "tokens", "sha256")} for e in entries]


def write_train(encoded, writer: ShardWriter, val_digests: set) -> dict:
    """Write the train documents whose ids are no val document's; their figures."""
    read = kept = 0
    for docs, enc, count in absent_by_tokens(encoded, val_digests):
        writer.add(enc.tokens)
        read, kept = read + count, kept + len(docs)
    return {"shards": writer.close(), "documents": kept, "read": read, "dropped": read - kept}


def remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.glob("fineweb_*.bin"):
        if path.name not in keep:
            path.unlink()


# --- the tokenizer belongs to the shards ----------------------------------------------------------

def split_documents(paths):
    """Each document of a split (its ids after BOS), in order, read shard by shard; a document may run on
    into the next shard."""
    pending = None  # the last document seen, which may continue in the next shard
    for path in paths:
        tokens = read_shard(path)
        starts = np.flatnonzero(tokens == BOS_ID)
        first = starts[0] if len(starts) else len(tokens)
        if pending is not None:
            pending = np.concatenate([pending, tokens[:first]])
        for start, end in zip(starts, [*starts[1:], len(tokens)]):
            if pending is not None:
                yield pending
            pending = tokens[start + 1:end]
    if pending is not None:
        yield pending


def sample_documents(documents, total: int, count: int = ROUND_TRIP_SAMPLE) -> list:
    """`count` of a split's `total` documents, evenly spaced (all of them when there are fewer): a fixed
    rule, so every run checks the same documents. Copies, so that no shard they came from stays mapped."""
    picks = {i * total // count for i in range(count)} if total > count else set(range(total))
    if not picks:
        return []
    return [np.array(doc) for i, doc in enumerate(itertools.islice(documents, max(picks) + 1)) if i in picks]


def round_trip(sp, documents) -> dict:
    """How many documents decode to text that encodes back to the same ids. An empty document proves
    nothing and one holding <unk> cannot round-trip (the text it stood for is lost): neither is checked."""
    checked = [ids for ids in (np.asarray(d).tolist() for d in documents) if ids and sp.unk_id() not in ids]
    exact = sum(sp.encode(sp.decode(ids)) == ids for ids in checked)
    return {"documents_sampled": len(documents), "documents_checked": len(checked),
            "round_trip": exact / len(checked) if checked else 0.0}


def check_bos(sp, model: Path, shard_dir: Path) -> None:
    if sp.bos_id() != BOS_ID:
        raise ValueError(f"{model}: BOS id {sp.bos_id()} is not {BOS_ID}, the id that starts every document "
                         f"in the shards ({shard_dir})")


def check_round_trip(sp, model: Path, splits: dict, shard_dir: Path) -> dict:
    """Require the round trip to hold for almost all of each split's sampled documents; `splits` maps a
    split to (its documents, how many). Returns the figures per split."""
    check_bos(sp, model, shard_dir)
    figures = {}
    for split, (documents, total) in splits.items():
        figures[split] = fig = round_trip(sp, sample_documents(documents, total))
        if fig["round_trip"] < ROUND_TRIP_MIN:
            raise ValueError(
                f"{model} does not belong to the shards {shard_dir}/fineweb_{split}_*.bin: decoding and "
                f"re-encoding reproduces the ids of {round(fig['round_trip'] * fig['documents_checked'])} of "
                f"{fig['documents_checked']} sampled {split} documents ({fig['round_trip']:.0%}; the tokenizer "
                f"that made the shards reproduces at least {ROUND_TRIP_MIN:.0%}; "
                f"{fig['documents_sampled'] - fig['documents_checked']} more were empty or held <unk>)")
    return figures


def decoded_bytes(sp, documents, original=str) -> int:
    """UTF-8 length of the documents' decoded text (`original` of it: CaseOps decode), one document at a time;
    <unk> pieces count 0 bytes, as in the byte tables of val_bpb (the text they stood for is unknown)."""
    unk = sp.unk_id()
    return sum(len(original(sp.decode(d[d != unk].tolist())).encode("utf-8")) for d in documents)


def check_raw_val_bytes(decoded: int, raw: int, model: Path, shard_dir: Path) -> None:
    low, high = DECODED_BYTES_RANGE
    if not low <= decoded / raw <= high:
        raise ValueError(
            f"{shard_dir}/fineweb_val_*.bin decoded with {model} is {decoded:,} bytes of UTF-8 text, "
            f"{decoded / raw:.1%} of tokenize.challenge.raw_val_bytes = {raw:,}; the val documents and their "
            f"tokenizer decode to {low:.0%}-{high:.0%} of it (normalisation only removes bytes)")


# --- the sources ----------------------------------------------------------------------------------

def load_tokenizer(path: Path, key: str):
    """The SentencePiece model at `path`, given by the config `key`; a missing or unreadable file is an
    error naming both."""
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} is not a file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as e:
        raise ValueError(f"{key}: {path} is not a SentencePiece model ({e})") from None


def tokenize_documents(cfg: dict, source, staging: Path, workers: int) -> dict:
    """Tokenize the documents `source()` streams, afresh for each pass (see the module docstring)."""
    on = cfg.get("caseops", False)  # absent: a section keyed without the option, which is off

    def documents():
        docs = cleaned(source(), cfg["min_doc_chars"], cfg["max_docs"])
        return map(caseops.encode, docs) if on else docs

    given = Path(cfg["tokenizer_model"]) if cfg["tokenizer_model"] else None
    sp = load_tokenizer(given, "tokenize.tokenizer_model") if given else None  # before reading the corpus
    selection = select_documents(documents(), cfg["val_docs"], 0 if given else cfg["tokenizer_sample_docs"],
                                 cfg["val_salt"])
    model = staging / "tokenizer.model"
    if given:
        shutil.copyfile(given, model)
        named = given
    else:
        train_tokenizer(TokenizerSample(documents, selection.sample), cfg["vocab_size"], model, sp_settings(cfg))
        sp = spm.SentencePieceProcessor(model_file=str(model))
        named = staging.parent / "tokenizer.model"  # where it will be, not the staged copy
    check_bos(sp, named, staging.parent)
    if on:
        caseops.check_tokenizer(sp, named)
    sidecar = ShardWriter(caseops.SIDECAR_SPLIT, cfg["shard_tokens"], staging) if on else None
    with encoder(model, workers) as encode:
        val = write_val(encode(batches(documents_at(documents(), selection.val)), with_bytes=on),
                        ShardWriter("val", cfg["shard_tokens"], staging), sidecar,
                        caseops.decode if on else str)
        train = write_train(encode(batches(documents_outside(documents(), selection.val))),
                            ShardWriter("train", cfg["shard_tokens"], staging), val["digests"])
    if train["read"] != selection.total - len(selection.val):
        raise ValueError(f"tokenize.files.paths: the documents changed while they were read ({selection.total} "
                         f"in the first pass, {train['read'] + len(selection.val)} in the last)")
    splits = {"val": val, "train": train}
    written = {split: (split_documents(staging / s["name"] for s in figures["shards"]), figures["documents"])
               for split, figures in splits.items()}
    return {
        **({"byte_sidecars": val["byte_sidecars"]} if on else {}),
        "documents": {split: figures["documents"] for split, figures in splits.items()},
        "token_duplicates_dropped": {split: figures["dropped"] for split, figures in splits.items()},
        "tokenizer_check": check_round_trip(sp, named, written, staging.parent),
        "val_raw_bytes": val["raw_bytes"],
        "val_doc_sha256": val["doc_sha256"],
        "shards": val["shards"] + train["shards"],
        "vocab_size": sp.vocab_size(),
    }


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def import_challenge(cfg: dict, staging: Path) -> dict:
    """Validate existing challenge shards and their tokenizer, and link them into the staging folder."""
    src = Path(cfg["challenge"]["dir"] or "")
    model = Path(cfg["challenge"]["tokenizer"] or "")
    raw_val_bytes = cfg["challenge"]["raw_val_bytes"]
    if not src.is_dir():
        raise FileNotFoundError(f"tokenize.challenge.dir: {src} is not a directory")
    sp = load_tokenizer(model, "tokenize.challenge.tokenizer")
    shards, paths = [], {}
    for split in ("val", "train"):
        paths[split] = split_shards(src, split)
        if not paths[split]:
            raise FileNotFoundError(f"{src}: no fineweb_{split}_*.bin shards")
        for path in paths[split]:
            tokens = read_shard(path, vocab_size=sp.vocab_size())
            link_or_copy(path, staging / path.name)
            shards.append(shard_entry(staging / path.name, split, tokens))
    check_splits_apart(shards, src)
    sidecars = caseops.import_sidecars(src, paths["val"], staging, cfg.get("caseops", False), link_or_copy)
    if cfg.get("caseops"):
        caseops.check_tokenizer(sp, model)
    documents = {split: sum(s["bos"] for s in shards if s["split"] == split) for split in ("train", "val")}
    if documents["val"] == 0:
        raise ShardError(f"{src}: val shards hold no BOS token; documents must start with BOS ({BOS_ID})")
    check = check_round_trip(sp, model, {split: (split_documents(paths[split]), documents[split])
                                         for split in ("val", "train")}, src)
    if raw_val_bytes is not None:
        check["val_decoded_bytes"] = decoded_bytes(sp, split_documents(paths["val"]),
                                                   caseops.decode if cfg.get("caseops") else str)
        check_raw_val_bytes(check["val_decoded_bytes"], raw_val_bytes, model, src)
    shutil.copyfile(model, staging / "tokenizer.model")
    return {**({"byte_sidecars": sidecars} if sidecars else {}), "documents": documents, "tokenizer_check": check,
            "val_raw_bytes": raw_val_bytes, "shards": shards, "vocab_size": sp.vocab_size()}


def source_documents(cfg: dict, files: list[Path]):
    """A function that streams the source's documents from the start, once per pass."""
    if cfg["source"] == "python-docs":
        # Small (2.4 MB) and built from live modules: read once, so that every pass sees the same documents.
        docs = list(corpus.python_docs())
        return lambda: iter(docs)
    return lambda: corpus.file_docs(files, cfg["files"]["txt_split"], cfg["files"]["text_field"])


def publish(staging: Path, out_dir: Path, shard_names: list[str]) -> None:
    """Move the staged shards and tokenizer into out_dir, then remove the shards of an earlier run."""
    for name in [*shard_names, "tokenizer.model"]:
        os.replace(staging / name, out_dir / name)
    remove_stale_shards(out_dir, set(shard_names))


def run(cfg: dict, out_dir: Path, workers: int | None = None) -> dict:
    """Tokenize into out_dir; `workers` encoding processes (default: the CPUs this process may use) do not
    change the outputs, only how fast they come."""
    start = time.time()
    staging = out_dir / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    staging.mkdir(parents=True)
    try:
        if cfg["source"] == "challenge":
            info = import_challenge(cfg, staging)
        else:
            files = corpus.expand_paths(cfg["files"]["paths"]) if cfg["source"] == "files" else []
            info = tokenize_documents(cfg, source_documents(cfg, files), staging, workers or available_cpus())
        tokenizer_sha256 = sha256_file(staging / "tokenizer.model")
        publish(staging, out_dir, [s["name"] for s in info["shards"] + info.get("byte_sidecars", [])])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tokens = {split: sum(s["tokens"] for s in info["shards"] if s["split"] == split)
              for split in ("train", "val")}
    manifest = {**info, "tokens": tokens, "bos_id": BOS_ID, "source": cfg["source"],
                "tokenizer": {"file": "tokenizer.model", "sha256": tokenizer_sha256,
                              "settings": "given" if cfg["source"] == "challenge" or cfg["tokenizer_model"]
                              else sp_settings(cfg),
                              **({"text_transform": caseops.TRANSFORM} if cfg.get("caseops") else {})},
                "config": cfg, "seconds": round(time.time() - start, 3)}
    write_json(out_dir / "manifest.json", manifest)
    write_json(out_dir / "summary.json", {k: manifest[k] for k in (
        "config", "source", "documents", "token_duplicates_dropped", "tokens", "vocab_size", "val_raw_bytes",
        "tokenizer_check", "seconds") if k in manifest})
    return manifest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the tokenize section, as JSON")
    parser.add_argument("--out-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    manifest = run(json.loads(args.config), args.out_dir)
    print(json.dumps({k: manifest[k] for k in ("documents", "tokens", "vocab_size", "seconds")}))


if __name__ == "__main__":
    sys.exit(main())
