"""tokenize: documents -> SentencePiece tokenizer + challenge-format shards + manifest.json.

The val split is a fixed set of documents chosen by a salted hash of their text (not "the first N"),
and the tokenizer is trained on train documents only. Every document starts with BOS; val and train
never share a shard. With `source: challenge`, existing shards and their tokenizer are validated and
linked as they are.
"""
import argparse
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

from stages import corpus
from stages.io import sha256_file, write_bytes, write_json
from stages.shards import ShardError, read_shard, shard_name, write_shard

BOS_ID = 1
# The challenge's SentencePiece settings (data/download_hf_docs_and_tokenize.py).
SP_SETTINGS = dict(model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
                   normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1,
                   eos_id=2, unk_id=3, hard_vocab_limit=False)


def doc_hash(text: str, salt: str) -> str:
    return hashlib.sha256((salt + "\0" + text).encode("utf-8")).hexdigest()


def clean_documents(docs, min_chars: int, max_docs: int) -> list[str]:
    """Drop short documents and exact duplicates, keeping first-seen order; cap at max_docs (0 = all)."""
    kept = dict.fromkeys(d for d in docs if len(d) >= min_chars)
    docs = list(kept)
    return docs[:max_docs] if max_docs else docs


def split_val(docs: list[str], val_docs: int, salt: str) -> tuple[list[str], list[str]]:
    """The `val_docs` documents with the smallest salted hash are val; order is preserved in both."""
    if val_docs >= len(docs):
        raise ValueError(f"tokenize.val_docs: {val_docs} held-out documents leave none of the "
                         f"{len(docs)} documents for training")
    ranked = sorted(range(len(docs)), key=lambda i: doc_hash(docs[i], salt))
    val_ids = set(ranked[:val_docs])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def train_tokenizer(train_docs: list[str], vocab_size: int, out_model: Path) -> None:
    """Train SentencePiece BPE with the challenge's settings on train documents only."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(train_docs), model_writer=model,
                                   vocab_size=vocab_size, max_sentence_length=1 << 16,
                                   num_threads=os.cpu_count() or 1, minloglevel=2, **SP_SETTINGS)
    write_bytes(out_model, model.getvalue())


def encode_documents(sp, docs: list[str]) -> np.ndarray:
    ids = sp.encode(docs)
    return np.fromiter((t for doc in ids for t in (BOS_ID, *doc)), dtype=np.int64)


def write_split(tokens: np.ndarray, split: str, shard_tokens: int, out_dir: Path) -> list[dict]:
    """Cut one split's stream into shards (documents may span shards, as in the challenge)."""
    entries = []
    for index, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        chunk = tokens[start:start + shard_tokens]
        path = out_dir / shard_name(split, index)
        write_shard(path, chunk)
        entries.append(shard_entry(path, split, chunk))
    return entries


def shard_entry(path: Path, split: str, tokens) -> dict:
    return {"name": path.name, "split": split, "tokens": int(len(tokens)),
            "bos": int(np.count_nonzero(np.asarray(tokens) == BOS_ID)), "sha256": sha256_file(path)}


def remove_stale_shards(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.glob("fineweb_*.bin"):
        if path.name not in keep:
            path.unlink()


def tokenize_documents(cfg: dict, docs: list[str], out_dir: Path, tokenizer_out: Path) -> dict:
    docs = clean_documents(docs, cfg["min_doc_chars"], cfg["max_docs"])
    train, val = split_val(docs, cfg["val_docs"], cfg["val_salt"])
    if cfg["tokenizer_model"]:
        shutil.copyfile(cfg["tokenizer_model"], tokenizer_out)
    else:
        train_tokenizer(train, cfg["vocab_size"], tokenizer_out)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_out))
    shards = []
    for split, split_docs in (("val", val), ("train", train)):
        shards += write_split(encode_documents(sp, split_docs), split, cfg["shard_tokens"], out_dir)
    return {
        "documents": {"train": len(train), "val": len(val)},
        "val_raw_bytes": sum(len(d.encode("utf-8")) for d in val),
        "val_doc_sha256": sorted(doc_hash(d, "") for d in val),
        "shards": shards,
        "vocab_size": sp.vocab_size(),
    }


def link_or_copy(src: Path, dst: Path) -> None:
    if dst.exists() and dst.samefile(src):
        return
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def import_challenge(cfg: dict, out_dir: Path, tokenizer_out: Path) -> dict:
    """Validate existing challenge shards and their tokenizer, and link them into out_dir."""
    src = Path(cfg["challenge"]["dir"] or "")
    model = Path(cfg["challenge"]["tokenizer"] or "")
    if not src.is_dir():
        raise FileNotFoundError(f"tokenize.challenge.dir: {src} is not a directory")
    if not model.is_file():
        raise FileNotFoundError(f"tokenize.challenge.tokenizer: {model} is not a file")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    shards = []
    for split in ("val", "train"):
        paths = sorted(src.glob(f"fineweb_{split}_*.bin"))
        if not paths:
            raise FileNotFoundError(f"{src}: no fineweb_{split}_*.bin shards")
        for path in paths:
            tokens = read_shard(path, vocab_size=sp.vocab_size())
            link_or_copy(path, out_dir / path.name)
            shards.append(shard_entry(out_dir / path.name, split, tokens))
    val_bos = sum(s["bos"] for s in shards if s["split"] == "val")
    if val_bos == 0:
        raise ShardError(f"{src}: val shards hold no BOS token; documents must start with BOS ({BOS_ID})")
    shutil.copyfile(model, tokenizer_out)
    return {"documents": {"train": sum(s["bos"] for s in shards if s["split"] == "train"), "val": val_bos},
            "val_raw_bytes": cfg["challenge"]["raw_val_bytes"], "shards": shards,
            "vocab_size": sp.vocab_size()}


def load_source(cfg: dict, files: list[Path]):
    if cfg["source"] == "python-docs":
        return list(corpus.python_docs())
    return list(corpus.file_docs(files, cfg["files"]["txt_split"], cfg["files"]["text_field"]))


def run(cfg: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    tokenizer_tmp = out_dir / ".tokenizer.model.tmp"
    if cfg["source"] == "challenge":
        info = import_challenge(cfg, out_dir, tokenizer_tmp)
    else:
        files = corpus.expand_paths(cfg["files"]["paths"]) if cfg["source"] == "files" else []
        info = tokenize_documents(cfg, load_source(cfg, files), out_dir, tokenizer_tmp)
    os.replace(tokenizer_tmp, out_dir / "tokenizer.model")
    remove_stale_shards(out_dir, {s["name"] for s in info["shards"]})
    tokens = {split: sum(s["tokens"] for s in info["shards"] if s["split"] == split)
              for split in ("train", "val")}
    manifest = {**info, "tokens": tokens, "bos_id": BOS_ID, "source": cfg["source"],
                "tokenizer": {"file": "tokenizer.model", "sha256": sha256_file(out_dir / "tokenizer.model"),
                              "settings": "given" if cfg["source"] == "challenge" or cfg["tokenizer_model"]
                              else SP_SETTINGS},
                "config": cfg, "seconds": round(time.time() - start, 3)}
    write_json(out_dir / "manifest.json", manifest)
    write_json(out_dir / "summary.json", {k: manifest[k] for k in (
        "config", "source", "documents", "tokens", "vocab_size", "val_raw_bytes", "seconds")})
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
