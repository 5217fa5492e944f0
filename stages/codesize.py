"""Counted code bytes: what the challenge counts of a submission's train_gpt.py.

`raw` counts the file's bytes, as the baseline does. `minified` counts it as the top records do (#1855's
serialize): pyminify with their options, brotli at quality 11, base85, and the two-line exec wrapper that
would run it; the count is that wrapper's length.
"""
import base64
from pathlib import Path

import brotli

WRAPPER = b'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("%s")))\n'


def minify(source: str, remove_asserts: bool = True) -> str:
    """pyminify --no-rename-locals --no-hoist-literals --remove-literal-statements [--remove-asserts]
    --prefer-single-line, as the records run it."""
    import python_minifier
    return python_minifier.minify(source, rename_locals=False, hoist_literals=False, remove_literal_statements=True,
                                  remove_asserts=remove_asserts, prefer_single_line=True)


def wrapped(source: str) -> bytes:
    """The self-extracting two-line script of the records: brotli(quality 11) + base85 inside exec."""
    return WRAPPER % base64.b85encode(brotli.compress(source.encode("utf-8"), quality=11))


def counted_bytes(source: str, accounting: str) -> dict:
    """{raw_bytes, bytes[, minified_bytes]} of a train_gpt.py's text under `accounting` (raw | minified)."""
    raw = len(source.encode("utf-8"))
    if accounting == "raw":
        return {"accounting": "raw", "raw_bytes": raw, "bytes": raw}
    if accounting != "minified":
        raise ValueError(f"quantize.code_accounting: {accounting!r} is not raw or minified")
    small = minify(source)
    return {"accounting": "minified", "raw_bytes": raw, "minified_bytes": len(small.encode("utf-8")),
            "bytes": len(wrapped(small))}


class OverCap(ValueError):
    """An artifact whose counted code and model bytes together pass the cap."""


def measure(path, accounting: str) -> dict:
    """The counted code of the train_gpt.py at `path`: {file, accounting, raw_bytes, bytes[, minified_bytes]}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the arm's exported train_gpt.py is not a file")
    return {"file": str(path), **counted_bytes(path.read_text(encoding="utf-8"), accounting)}


def artifact_size(code: dict, artifact_summary: dict, cap_bytes: int, where: str) -> dict:
    """What the challenge counts of one artifact: the code that ships plus the compressed model (with its
    rescue, when the summary is a rescue's). Over the cap is an error naming `where`, not a result."""
    model = artifact_summary["model_bytes"]
    total = code["bytes"] + model
    if total > cap_bytes:
        raise OverCap(f"{where}: artifact is {total:,} bytes (model {model:,} + code {code['bytes']:,} from "
                      f"{code['file']}), over quantize.cap_bytes = {cap_bytes:,} by {total - cap_bytes:,}")
    return {"code": code, "code_bytes": code["bytes"], "model_bytes": model,
            "lora_bytes": artifact_summary.get("lora_bytes"), "artifact_sha256": artifact_summary["artifact_sha256"],
            "total_bytes": total, "cap_bytes": cap_bytes, "headroom_bytes": cap_bytes - total}
