"""documents: which documents a tokenize run keeps, holds out and samples, decided by their text alone.

Short documents and exact duplicates (a 16-byte digest each) are dropped in stream order; the val split is the
`val_docs` documents with the smallest salted hash and the tokenizer's sample the `tokenizer_sample_docs` after
them, so neither depends on the corpus's order, and both are found in one pass that holds only their hashes.
"""
import hashlib
import heapq
from dataclasses import dataclass


def doc_hash(text: str, salt: str) -> str:
    return hashlib.sha256((salt + "\0" + text).encode("utf-8")).hexdigest()


def text_digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def cleaned(docs, min_chars: int, max_docs: int):
    """The documents of at least `min_chars`, each text at its first occurrence only, in order; at most
    `max_docs` of them (0 = all). Duplicates are found by a 16-byte digest of each kept document: memory
    O(documents x 16 B), about 100 B per document in a Python set."""
    seen, kept = set(), 0
    for doc in docs:
        if len(doc) < min_chars or (digest := text_digest(doc)) in seen:
            continue
        seen.add(digest)
        yield doc
        kept += 1
        if kept == max_docs:
            return


def clean_documents(docs, min_chars: int, max_docs: int) -> list[str]:
    """Drop short documents and exact duplicates, keeping first-seen order; cap at max_docs (0 = all)."""
    return list(cleaned(docs, min_chars, max_docs))


def hash_ranks(docs, count: int, salt: str) -> tuple[list[int], int]:
    """The positions of the `count` documents with the smallest salted hash, smallest first, and how many
    documents there were. Holds `count` hashes however many documents stream past."""
    largest_first = []  # a heap of (-hash, position): its top is the largest hash kept
    total = 0
    for total, doc in enumerate(docs, 1):
        entry = (-int(doc_hash(doc, salt), 16), total - 1)
        if len(largest_first) < count:
            heapq.heappush(largest_first, entry)
        elif count and entry > largest_first[0]:
            heapq.heapreplace(largest_first, entry)
    return [position for _, position in sorted(largest_first, reverse=True)], total


@dataclass(frozen=True)
class Selection:
    """Positions in the cleaned document stream: the val documents and the tokenizer's sample."""
    total: int
    val: frozenset
    sample: frozenset


def select_documents(docs, val_docs: int, sample_docs: int, salt: str) -> Selection:
    """The `val_docs` documents with the smallest salted hash are val; the `sample_docs` with the next
    smallest are the tokenizer's sample: a uniform, deterministic choice of train documents whatever their
    order in the corpus, which grows by adding documents as sample_docs grows."""
    ranked, total = hash_ranks(docs, val_docs + sample_docs, salt)
    if val_docs >= total:
        raise ValueError(f"tokenize.val_docs: {val_docs} held-out documents leave none of the "
                         f"{total} documents for training")
    return Selection(total, frozenset(ranked[:val_docs]), frozenset(ranked[val_docs:]))


def split_val(docs: list[str], val_docs: int, salt: str) -> tuple[list[str], list[str]]:
    """The `val_docs` documents with the smallest salted hash are val; order is preserved in both."""
    val = select_documents(docs, val_docs, 0, salt).val
    return [d for i, d in enumerate(docs) if i not in val], [d for i, d in enumerate(docs) if i in val]


def documents_at(docs, positions):
    """The documents at `positions`, in stream order; reading stops after the last of them."""
    last = max(positions, default=-1)
    for position, doc in zip(range(last + 1), docs):
        if position in positions:
            yield doc


def documents_outside(docs, positions):
    return (doc for position, doc in enumerate(docs) if position not in positions)


class TokenizerSample:
    """The tokenizer's training documents, read afresh from `documents()` each time they are iterated;
    len() is how many."""

    def __init__(self, documents, positions: frozenset):
        self.documents, self.positions = documents, positions

    def __iter__(self):
        return documents_at(self.documents(), self.positions)

    def __len__(self):
        return len(self.positions)
