"""Configuration: schema validation, arm resolution and the content keys that name stage outputs.

Every stage output lives under a key derived from the configuration that affects it (the stage's own
section plus the keys of its inputs). Two arms that differ only downstream therefore share upstream
outputs, and switching a setting back finds its old outputs still there.
"""
import ast
import copy
import hashlib
import json
from pathlib import Path

import jsonschema
import yaml

STAGES_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = STAGES_DIR.parent / "schemas" / "config.schema.yaml"
POINTS = ("prequant", "quant", "rescue")


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


def load_schema():
    return yaml.safe_load(SCHEMA_PATH.read_text())


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _error_text(error, prefix) -> str:
    path = ".".join([prefix, *map(str, error.absolute_path)]).strip(".")
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        return "; ".join(f"{path}.{key}: unknown key" for key in extra)
    return f"{path}: {error.message}"


def _check(instance, schema, prefix, root_schema):
    validator = jsonschema.Draft202012Validator(
        schema, registry=_registry(root_schema))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [_error_text(e, prefix) for e in errors]


def _registry(root_schema):
    from referencing import Registry, Resource
    return Registry().with_resource("caddie:config", Resource.from_contents(root_schema))


def validate(config: dict, source: str = "config") -> None:
    """Raise ConfigError listing every problem, each with its key path (e.g. arms.int6.quantize.bitz)."""
    schema = load_schema()
    schema.setdefault("$id", "caddie:config")
    problems = _check(config, schema, "", schema)
    if not problems:
        stage_schema = {"$ref": "caddie:config#/$defs/stages"}
        for arm, override in config["arms"].items():
            merged = deep_merge(config["defaults"], override)
            problems += _check(merged, stage_schema, f"arms.{arm}", schema)
        if config["report"]["baseline_arm"] not in config["arms"]:
            problems.append(f"report.baseline_arm: {config['report']['baseline_arm']!r} is not an arm "
                            f"(arms: {', '.join(config['arms'])})")
    if problems:
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(problems))


def content_key(stage: str, section, inputs: dict) -> str:
    """12 hex digits of the sha256 of the canonical JSON of what determines a stage's output."""
    blob = json.dumps({"stage": stage, "config": section, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def tokenize_section(tok: dict) -> dict:
    """The tokenize settings that matter for the chosen source (the others do not change outputs)."""
    section = {k: v for k, v in tok.items() if k not in ("files", "challenge")}
    if tok["source"] == "files":
        section["files"] = tok["files"]
    if tok["source"] == "challenge":
        section = {"source": "challenge", "challenge": tok["challenge"]}
    return section


def plan(config: dict) -> dict:
    """Resolve every arm into stage configs and keys.

    Returns {"stages": {stage: {key: {"config": ..., "inputs": {stage: key}}}},
             "arms": {arm: {stage: key, "evaluate": {point: key}}}}.
    """
    stages = {s: {} for s in ("tokenize", "curriculum", "train", "quantize", "rescue", "evaluate")}
    arms = {}

    def add(stage, section, inputs):
        key = content_key(stage, section, inputs)
        stages[stage][key] = {"config": section, "inputs": inputs}
        return key

    for arm, override in config["arms"].items():
        cfg = deep_merge(config["defaults"], override)
        keys = {"tokenize": add("tokenize", tokenize_section(cfg["tokenize"]), {})}
        train_inputs = {"tokenize": keys["tokenize"]}
        curriculum = cfg["curriculum"]
        if curriculum["enabled"]:
            section = {"buckets": curriculum["buckets"], "seq_len": cfg["train"]["seq_len"]}
            keys["curriculum"] = add("curriculum", section, {"tokenize": keys["tokenize"]})
            train_inputs["curriculum"] = keys["curriculum"]
        train_section = {"train": cfg["train"], "curriculum": curriculum if curriculum["enabled"]
                         else {"enabled": False}}
        keys["train"] = add("train", train_section, train_inputs)
        keys["quantize"] = add("quantize", cfg["quantize"], {"train": keys["train"]})
        eval_section = {k: v for k, v in cfg["evaluate"].items() if k != "modes"}
        keys["evaluate"] = {
            "prequant": add("evaluate", {**eval_section, "point": "prequant"}, {"train": keys["train"]}),
            "quant": add("evaluate", {**eval_section, "point": "quant"}, {"quantize": keys["quantize"]}),
        }
        rescue = cfg["rescue"]
        if rescue["lcq"]["enabled"] or rescue["calibrate"]["enabled"]:  # else no rescue point at all
            keys["rescue"] = add("rescue", rescue, {"quantize": keys["quantize"]})
            keys["evaluate"]["rescue"] = add("evaluate", {**eval_section, "point": "rescue"},
                                             {"rescue": keys["rescue"]})
        keys["modes"] = list(cfg["evaluate"]["modes"])
        arms[arm] = keys
    return {"stages": stages, "arms": arms}


def stage_sources(module: str) -> list[str]:
    """The stage module and every stages.* module it imports, transitively, as repo-relative paths.

    Rules declare these as inputs, so editing any code a stage runs reruns that stage.
    """
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((STAGES_DIR / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                todo.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")]
    return sorted(f"stages/{name}.py" for name in seen)


def corpus_files(tok: dict) -> list[Path]:
    """The files a `source: files` tokenize reads (so the rule can declare them as inputs)."""
    from stages.corpus import expand_paths
    return expand_paths(tok["files"]["paths"])


def published_logs(report: dict) -> list[str]:
    """The challenge train logs the aggregate stage parses next to caddie's runs."""
    from stages.corpus import expand_paths
    return [str(p) for p in expand_paths(report.get("published_logs", []), "report.published_logs")]


def challenge_files(tok: dict) -> list[str]:
    """The shards and tokenizer a `source: challenge` tokenize links (declared as inputs)."""
    src = tok["challenge"]
    if not src["dir"] or not Path(src["dir"]).is_dir():
        raise ConfigError(f"tokenize.challenge.dir: {src['dir']!r} is not a directory")
    if not src["tokenizer"]:
        raise ConfigError("tokenize.challenge.tokenizer: the SentencePiece model of the shards is required")
    return sorted(str(p) for p in Path(src["dir"]).glob("fineweb_*.bin")) + [src["tokenizer"]]
