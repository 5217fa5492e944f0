"""Atomic file output and small I/O helpers shared by every stage.

A stage never leaves a half-written output: it writes to a temporary file beside the target and
renames it into place, so a failure keeps the previous good file.
"""
import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path


_UMASK = os.umask(0)
os.umask(_UMASK)


class IntegrityError(ValueError):
    """A file that is not what its stage recorded (corrupt, truncated or replaced); the message names it."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs should look like any other file
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path}") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path, data: bytes):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path, text: str):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def save_torch(path, obj):
    """torch.save, atomically, through a Python file so that a full disk is an OSError naming the path."""
    import torch
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def read_json(path):
    """A JSON file's content; a truncated or corrupt file is an error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{path}: not valid JSON ({e}); the file is truncated or corrupt") from None


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path, expected: str, recorded_in) -> None:
    """Fail unless `path` still has the sha256 its producing stage recorded in `recorded_in`."""
    if not Path(path).is_file():
        raise IntegrityError(f"{path}: missing (recorded in {recorded_in})")
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{path}: sha256 {actual[:16]}… differs from {expected[:16]}… recorded in "
                             f"{recorded_in}: the file was modified or corrupted after it was written")


def verify_recorded(path, summary_path, field: str) -> dict:
    """Verify `path` against the sha256 in the `field` of the stage summary that produced it; the summary."""
    summary = read_json(summary_path)
    if field not in summary:
        raise IntegrityError(f"{summary_path}: no {field!r} recorded; rerun the stage that wrote {path}")
    verify_sha256(path, summary[field], summary_path)
    return summary


def _jsonable(value):
    """numpy scalars and paths in summaries."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
