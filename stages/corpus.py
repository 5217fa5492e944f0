"""Document sources for the tokenize stage: the built-in python-docs corpus and text/jsonl/parquet files.

A source yields documents (strings) in a deterministic order; the tokenize stage removes duplicates
and short documents and splits off the held-out val set by hash. Files are read as streams (a .txt file in
1 MiB pieces, a .jsonl file line by line, a .parquet file in record batches of its text column), so
reading holds one document or one batch at a time, never a whole file of documents; a .txt file read with
`txt_split: file` is one document and is held whole.
"""
import codecs
import contextlib
import glob
import importlib
import inspect
import io
import json
import pkgutil
import sys
import warnings
from pathlib import Path

# Modules whose import has side effects (opening a browser, printing, GUI) or that are test suites.
SKIP_MODULES = {"antigravity", "this", "idlelib", "turtledemo", "turtle", "tkinter", "test",
                "lib2to3", "ensurepip", "pydoc_data", "__hello__", "__phello__", "xxlimited"}


def _quiet_import(name):
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except BaseException:  # a module may raise SystemExit or anything on import; it is just skipped
        return None


def stdlib_modules():
    """Importable public standard-library modules and their public submodules, sorted by name."""
    names = set()
    for name in sys.stdlib_module_names:
        if name.startswith("_") or name in SKIP_MODULES:
            continue
        module = _quiet_import(name)
        if module is None:
            continue
        names.add(name)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=name + "."):
            parts = info.name.split(".")
            if any(p.startswith("_") or p in SKIP_MODULES or p.startswith("test") for p in parts):
                continue
            names.add(info.name)
    return [(n, m) for n in sorted(names) if (m := _quiet_import(n)) is not None]


def _docstrings_of(module_name, module):
    yield inspect.getdoc(module)
    for attr in sorted(vars(module)):
        value = getattr(module, attr, None)
        if attr.startswith("_") or getattr(value, "__module__", None) != module_name:
            continue
        yield inspect.getdoc(value)
        if inspect.isclass(value):
            for member_name, member in sorted(vars(value).items()):
                if not member_name.startswith("_") and (callable(member) or isinstance(member, property)):
                    yield inspect.getdoc(member)


def python_docs():
    """English prose every Python install carries: stdlib docstrings, then pydoc_data's topics."""
    for name, module in stdlib_modules():
        with warnings.catch_warnings():  # deprecated attributes warn when read
            warnings.simplefilter("ignore")
            docs = [doc for doc in _docstrings_of(name, module) if doc]
        yield from docs
    from pydoc_data import topics
    for key in sorted(topics.topics):
        yield topics.topics[key]


def _text_pieces(path: Path, piece_bytes: int = 1 << 20):
    """A text file's content, decoded piece by piece; a file that is not UTF-8 text (or is binary: NUL bytes)
    is an error naming it and the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file read before `data`
    with open(path, "rb") as f:
        while True:
            data = f.read(piece_bytes)
            held = len(decoder.getstate()[0])  # the start of a character cut by the previous piece
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text (byte {offset - held + e.start}: {e.reason}); "
                                 "tokenize.files.paths must name UTF-8 text files") from None
            if "\0" in text:
                raise ValueError(f"{path}: a binary file, not text (NUL byte at offset {offset + data.index(0)})")
            if not data:
                return
            offset += len(data)
            yield text


def _blocks(pieces, separator: str = "\n\n"):
    """The text of `pieces` cut at each separator, exactly as str.split cuts their concatenation."""
    rest = ""  # the text after the last separator: the start of a block that may continue
    for piece in pieces:
        blocks = (rest + piece).split(separator)
        rest = blocks.pop()
        yield from blocks
    yield rest


def _txt_docs(path: Path, split: str):
    if split == "file":
        yield "".join(_text_pieces(path))
    else:
        yield from (block.strip() for block in _blocks(_text_pieces(path)))


JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", type(None): "null", list: "an array",
              dict: "an object"}


def _jsonl_docs(path: Path, field: str):
    with open(path, "rb") as f:  # bytes, so that a line that is not UTF-8 can be named
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not UTF-8 (byte {e.start} of the line: {e.reason})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: not a JSON object with a '{field}' field "
                                 "(tokenize.files.text_field)")
            if field not in record:
                raise ValueError(f"{path}:{line_no}: no '{field}' field (tokenize.files.text_field)")
            text = record[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: '{field}' (tokenize.files.text_field) is "
                                 f"{JSON_KINDS[type(text)]} ({json.dumps(text)[:40]}), not a string")
            yield text


def _parquet_docs(path: Path, field: str, batch_rows: int = 1024):
    import pyarrow.parquet as pq
    with pq.ParquetFile(path) as table:
        columns = table.schema_arrow.names
        if field not in columns:
            raise ValueError(f"{path}: no '{field}' column (tokenize.files.text_field); columns are {columns}")
        row = 0
        for batch in table.iter_batches(batch_size=batch_rows, columns=[field]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise ValueError(f"{path}: row {row} has no text in column '{field}'")
                if not isinstance(text, str):
                    raise ValueError(f"{path}: row {row} of column '{field}' (tokenize.files.text_field) is "
                                     f"{type(text).__name__} {text!r:.40}, not a string")
                yield text
                row += 1


def expand_paths(patterns, key="tokenize.files.paths") -> list[Path]:
    """Files named by the globs, sorted within each pattern; a pattern that matches nothing is an error
    naming the config `key` it came from."""
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"{key}: {pattern!r} matches no file")
        paths += [Path(m) for m in matches]
    return paths


def file_docs(paths, txt_split: str, text_field: str):
    readers = {".txt": lambda p: _txt_docs(p, txt_split), ".jsonl": lambda p: _jsonl_docs(p, text_field),
               ".parquet": lambda p: _parquet_docs(p, text_field)}
    for path in paths:
        reader = readers.get(path.suffix)
        if reader is None:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)")
        yield from reader(path)
