"""Plan-time checks: settings a stage would reject at run time, often hours into a run, found when the plan is made.

Each check reads one stage configuration (`defaults`, or an arm merged over them) that the schema has
accepted, and yields problems that start with the key path they are about; `config.validate` prefixes them
with `defaults.` or `arms.<arm>.` and raises them together. The stages keep their own run-time checks.

`python -m stages.checks [CONFIGFILE ...]` checks config.yaml merged with the given files as snakemake
merges `--configfile`, naming the file and line of a YAML syntax error (snakemake's own message names
neither, and comes before any workflow code runs).
"""
import sys
from pathlib import Path

import yaml

from stages import layout
from stages.config import ConfigError, deep_merge, validate

SMEAR_GATE_DIMS = 12  # stages.model.SMEAR_GATE_DIMS (stages.model imports torch, too slow for every plan)


def load_yaml(path) -> dict:
    """A config file's mapping; a YAML syntax error is a ConfigError with the file, line and column."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = ""
        if e.context and e.context_mark and e.context_mark is not mark:
            context = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError(f"{path}{where}: {e.problem or e.context}{context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def require_yaml(path) -> None:
    """Fail with the file and line if an existing config file is not valid YAML (the Snakefile calls this
    before its configfile directive; a missing file is left to snakemake)."""
    if Path(path).exists():
        load_yaml(path)


def linear_layers(model: dict) -> list[str]:
    """Module names of the nn.Linear layers of stages.model.GPT, in its order (what targets patterns match)."""
    c_q = ["attn.c_q.down", "attn.c_q.up"] if model["q_rank"] else ["attn.c_q"]
    block = [*c_q, "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj"]
    names = [f"blocks.{i}.{name}" for i in range(model["num_layers"]) for name in block]
    return names + ([] if model["tie_embeddings"] else ["lm_head"])


def unmatched_targets(key: str, targets: list, names: list):
    # The stages adapt every layer that some target matches, so a target matching nothing is silently dropped.
    examples = ", ".join(n for n in names if not n.startswith("blocks.") or n.startswith("blocks.0."))
    for target in targets:
        if not any(target in name for name in names):
            yield f"{key}: {target!r} matches no layer of the model (its layers: {examples}, ...)"


def model_shape(cfg: dict):
    """What stages.model.GPTConfig.validate requires of train.model beyond the schema's bounds."""
    m, at = cfg["train"]["model"], "train.model"
    dim, heads, layers = m["model_dim"], m["num_heads"], m["num_layers"]
    head_dim = dim // heads
    if dim % heads:
        yield f"{at}.model_dim: {dim} is not divisible by {at}.num_heads {heads}"
    if heads % m["num_kv_heads"]:
        yield f"{at}.num_heads: {heads} is not divisible by {at}.num_kv_heads {m['num_kv_heads']}"
    if head_dim % 2:
        yield f"{at}.model_dim: head_dim = model_dim // num_heads = {head_dim} must be even for RoPE"
    if m["rope_dims"] % 2 or m["rope_dims"] > head_dim:
        yield f"{at}.rope_dims: {m['rope_dims']} must be even and at most head_dim {head_dim}"
    if m["xsa_layers"] > layers:
        yield f"{at}.xsa_layers: {m['xsa_layers']} exceeds {at}.num_layers {layers}"
    if m["parallel_from"] >= layers:
        yield f"{at}.parallel_from: {m['parallel_from']} is not a layer of {at}.num_layers {layers} (-1 = off)"
    recur = m["recur_layers"]
    if recur and not recur[0] <= recur[1] < layers:
        yield f"{at}.recur_layers: {recur} must be [a, b] with a <= b < {at}.num_layers {layers}"
    elif problem := layout.parallel_problem(layers, m["parallel_from"], recur, m["recur_loops"]):
        yield f"{at}.parallel_from: {problem}"
    for gate in ("smear_gate", "sparse_attn_gate"):
        if m[gate] and dim < SMEAR_GATE_DIMS:
            yield f"{at}.{gate}: needs {at}.model_dim >= {SMEAR_GATE_DIMS}, got {dim}"
    if m["asym_logit"] and not m["logit_softcap"]:
        yield f"{at}.asym_logit: needs {at}.logit_softcap > 0 (the caps start at it)"
    if m["q_rank"] >= dim:
        yield f"{at}.q_rank: {m['q_rank']} must be below {at}.model_dim {dim} (0 = full rank)"
    if m["qat_bits"] == 1:
        yield f"{at}.qat_bits: 1 must be 0 (off) or 2..8"


def train_batch(cfg: dict):
    """The global batch splits into micro-batches of whole sequences, and the micro-batches over the processes
    (stages.train.Trainer)."""
    t = cfg["train"]
    tokens, micro = t["batch_tokens"], t["micro_batches"]
    if micro % t["nproc"]:
        yield f"train.micro_batches: {micro} is not divisible by train.nproc {t['nproc']}"
    if tokens % micro:
        yield f"train.batch_tokens: {tokens} is not divisible by train.micro_batches {micro}"
    elif (tokens // micro) % t["seq_len"]:
        yield (f"train.batch_tokens: {tokens} / {micro} micro-batches = {tokens // micro} tokens is not a whole "
               f"number of train.seq_len {t['seq_len']} sequences")


def train_grow(cfg: dict):
    grow, layers = cfg["train"]["grow"], cfg["train"]["model"]["num_layers"]
    if len(grow["depths"]) != len(grow["until"]):
        yield f"train.grow: depths {grow['depths']} and until {grow['until']} must pair up"
    if any(depth > layers for depth in grow["depths"]):
        yield f"train.grow.depths: {grow['depths']} exceed train.model.num_layers {layers}"


def train_budget(cfg: dict):
    # stages.train.budget_seconds: a reserve that eats the whole cap leaves a budget of 0, which means no cap.
    t = cfg["train"]
    if t["max_seconds"] and t["gptq_reserve_seconds"] >= t["max_seconds"]:
        yield (f"train.gptq_reserve_seconds: {t['gptq_reserve_seconds']} leaves no training time within "
               f"train.max_seconds {t['max_seconds']} (the cap would be ignored)")


def tokenize_split(cfg: dict):
    tok = cfg["tokenize"]
    if tok["source"] != "challenge" and tok["max_docs"] and tok["val_docs"] >= tok["max_docs"]:
        yield (f"tokenize.val_docs: {tok['val_docs']} held-out documents leave none of tokenize.max_docs "
               f"{tok['max_docs']} for training")


def quantize_storage(cfg: dict):
    q = cfg["quantize"]
    high = q["storage"]["mixed_rows"]["high_bits"]
    if q["storage"]["form"] == "mixed_rows" and high <= q["bits"]:
        yield f"quantize.storage.mixed_rows.high_bits: {high} must exceed quantize.bits {q['bits']}"


def quantize_bytes(cfg: dict):
    """The size target fits under the cap. (The counted code is the arm's exported train_gpt.py, known once the
    export is generated: the quantize stage checks that it leaves room for a model.)"""
    q = cfg["quantize"]
    target = q["size_target"]["bytes"] if q["size_target"]["enabled"] else None
    if target and target > q["cap_bytes"]:
        yield f"quantize.size_target.bytes: {target} exceeds quantize.cap_bytes {q['cap_bytes']}"


def rescue_targets(cfg: dict):
    """stages.rescue.lcq corrects the row-quantized weights whose names a target matches."""
    lcq = cfg["rescue"]["lcq"]
    if lcq["enabled"]:
        weights = ["tok_emb.weight"] + [f"{name}.weight" for name in linear_layers(cfg["train"]["model"])]
        yield from unmatched_targets("rescue.lcq.targets", lcq["targets"], weights)


def evaluate_windows(cfg: dict):
    ev = cfg["evaluate"]
    if ev["stride"] > ev["seq_len"]:
        yield f"evaluate.stride: {ev['stride']} exceeds evaluate.seq_len {ev['seq_len']}"


def evaluate_lora(cfg: dict):
    """stages.ttt.lora_losses and DocumentLoRA, when mode ttt runs with method lora."""
    ev = cfg["evaluate"]
    if "ttt" not in ev["modes"] or ev["ttt"]["method"] != "lora":
        return
    lora = ev["ttt"]["lora"]
    if lora["chunk_tokens"] > ev["seq_len"]:
        yield f"evaluate.ttt.lora.chunk_tokens: {lora['chunk_tokens']} exceeds evaluate.seq_len {ev['seq_len']}"
    yield from unmatched_targets("evaluate.ttt.lora.targets", lora["targets"], linear_layers(cfg["train"]["model"]))


CHECKS = (tokenize_split, model_shape, train_batch, train_grow, train_budget, quantize_storage, quantize_bytes,
          rescue_targets, evaluate_windows, evaluate_lora)


def problems(cfg: dict) -> list[str]:
    """Every problem of one stage configuration, each starting with its key path."""
    return [problem for check in CHECKS for problem in check(cfg)]


def main(argv=None) -> int:
    files = list(sys.argv[1:] if argv is None else argv)
    paths = ["config.yaml", *files]
    try:
        config = {}
        for path in paths:
            config = deep_merge(config, load_yaml(path))
        validate(config, source=", ".join(files + ["config.yaml"]))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"valid: {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
