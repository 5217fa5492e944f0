"""Configuration: schema validation, arm resolution and the content keys that name stage outputs.

Every stage output lives under a key derived from the configuration that affects it (the stage's own
section plus the keys of its inputs). Two arms that differ only downstream therefore share upstream
outputs, and switching a setting back finds its old outputs still there.
"""
import ast
import copy
import functools
import hashlib
import json
import math
import platform
from pathlib import Path

import jsonschema
import yaml

from stages.shards import split_shards

STAGES_DIR = Path(__file__).resolve().parent
SCHEMA_PATH = STAGES_DIR.parent / "schemas" / "config.schema.yaml"
POINTS = ("prequant", "quant", "rescue")
MODES = ("standard", "sliding", "ttt")


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


def _is_integer(checker, instance) -> bool:
    # JSON Schema's integer accepts 30.0; a float where a count belongs is a mistake (seq_len: 32.0).
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def _check(instance, schema, prefix, root_schema):
    validator = _Validator(schema, registry=_registry(root_schema))
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [_error_text(e, prefix) for e in errors]


def _registry(root_schema):
    from referencing import Registry, Resource
    return Registry().with_resource("caddie:config", Resource.from_contents(root_schema))


def selected_arms(config: dict) -> dict:
    """The arms that run: those `only_arms` names, in its order, or all of them when it is null or absent.
    A preset names its own arms this way, since a --configfile can only add arms to config.yaml's."""
    names = config.get("only_arms")
    if names is None:
        return config["arms"]
    unknown = ", ".join(repr(name) for name in names if name not in config["arms"])
    if unknown:
        raise ConfigError(f"only_arms: {unknown} not among the arms ({', '.join(config['arms'])})")
    return {name: config["arms"][name] for name in names}


def validate(config: dict, source: str = "config") -> None:
    """Raise ConfigError listing every problem, each with its key path (e.g. arms.int6.quantize.bitz): the
    schema's, then (on a config the schema accepts) the plan-time checks of the defaults and of every arm
    merged over them, an arm's only where they are not the defaults' own.

    A config that sets `only_arms` is narrowed to those arms here, in place: the rules read `config["arms"]`
    after this call, so the other arms are neither checked nor planned nor reported."""
    from stages import checks  # it imports this module
    schema = load_schema()
    schema.setdefault("$id", "caddie:config")
    problems = _check(config, schema, "", schema) + list(non_finite_numbers(config))
    if not problems:
        try:
            config["arms"] = selected_arms(config)
        except ConfigError as e:
            problems.append(str(e))
    if not problems:
        stage_schema = {"$ref": "caddie:config#/$defs/stages"}
        for arm, override in config["arms"].items():
            merged = deep_merge(config["defaults"], override)
            problems += _check(merged, stage_schema, f"arms.{arm}", schema)
        if config["report"]["baseline_arm"] not in config["arms"]:
            problems.append(f"report.baseline_arm: {config['report']['baseline_arm']!r} is not an arm "
                            f"{'that only_arms selects ' if config.get('only_arms') else ''}"
                            f"(arms: {', '.join(config['arms'])})")
    if not problems:  # the checks read settings whose types the schema has vouched for
        inherited = checks.problems(config["defaults"])
        problems += [f"defaults.{p}" for p in inherited]
        for arm, override in config["arms"].items():
            own = [p for p in checks.problems(deep_merge(config["defaults"], override)) if p not in inherited]
            problems += [f"arms.{arm}.{p}" for p in own]
    if problems:
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(problems))


def non_finite_numbers(value, path=""):
    """Key paths of NaN or infinite numbers (YAML's .nan, .inf): no setting means them, and NaN fails no
    comparison a check or a stage makes."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite_numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from non_finite_numbers(item, f"{path}.{i}")
    elif isinstance(value, float) and not math.isfinite(value):
        yield f"{path}: {value} is not a finite number"


def content_key(stage: str, section, inputs: dict, code: str) -> str:
    """12 hex digits of the sha256 of the canonical JSON of what determines a stage's output: its settings,
    the keys of its inputs and the digest of the code it runs."""
    blob = json.dumps({"stage": stage, "config": section, "inputs": inputs, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.cache
def code_digest(stage: str) -> str:
    """sha256 of the source of every stages/ module the stage runs: new code writes beside the old outputs,
    so a failing edit never touches them and reverting it finds them again."""
    h = hashlib.sha256()
    for path in stage_sources(stage):
        h.update(path.encode() + b"\0" + (STAGES_DIR.parent / path).read_bytes() + b"\0")
    return h.hexdigest()


# Settings that change how a stage runs but not what it computes: they are not part of any key.
RUN_SETTINGS = {"train": ("log_every", "checkpoint_every")}


def tokenize_section(tok: dict) -> dict:
    """The tokenize settings that matter for the chosen source (the others do not change outputs)."""
    section = {k: v for k, v in tok.items() if k not in ("files", "challenge")}
    if tok["source"] == "python-docs":  # the corpus is the installed standard library's documentation
        section["python_version"] = platform.python_version()
    if tok["source"] == "files":
        section["files"] = tok["files"]
    if tok["tokenizer_model"]:  # no tokenizer is trained: its sample does not matter
        del section["tokenizer_sample_docs"]
    if not tok.get("caseops"):  # off keys as before the option existed
        section.pop("caseops", None)
    if tok["source"] == "challenge":
        section = {"source": "challenge", "challenge": tok["challenge"], **({"caseops": True} if tok["caseops"] else {})}
    return section


def train_section(cfg: dict) -> dict:
    """The train settings that can change what is trained: a technique that is off keys only as off."""
    train = {k: v for k, v in cfg["train"].items() if k not in RUN_SETTINGS["train"]}
    for technique in ("ema", "qna", "sqwa"):
        if not train[technique]["enabled"]:
            train[technique] = {"enabled": False}
    if not train["replay"]["every"]:
        train["replay"] = {"every": 0}
    if not train["max_seconds"]:  # the reserve only shortens a wallclock budget
        train["gptq_reserve_seconds"] = 0
    if train["warmdown_frac"]:  # a warmdown by fraction replaces the one by iterations
        train["warmdown_iters"] = 0
    if not train["warmdown_frac"] and not train["warmdown_iters"]:  # no warmdown: nothing to floor
        train["min_lr"] = 0.0
    if not train["seq_growth"]["lengths"]:
        train["seq_growth"] = {"lengths": [], "until": [], "rewarm_steps": 0}
    opt = train["optimizer"]
    if not opt["grad_clip_norm"] or train["nproc"] == 1:  # one rank: its gradient is the average
        train["optimizer"] = {**opt, "grad_clip_per_rank": False}
    curriculum = cfg["curriculum"] if cfg["curriculum"]["enabled"] else {"enabled": False}
    return {"train": train, "curriculum": curriculum}


def quantize_section(quantize: dict) -> dict:
    """The quantize settings that can change the artifact: those of the method, clip, storage form and
    calibration source in use; an option that is off keys only as off."""
    q = copy.deepcopy(quantize)
    if q["method"] != "gptq":
        del q["gptq"]
    del q["clip_percentile" if q["clip"] == "sdclip" else "clip_sigmas"]
    q["storage"] = {k: v for k, v in q["storage"].items() if k in ("form", q["storage"]["form"])}
    if not q["lqer"]["rank"]:
        q["lqer"] = {"rank": 0}
    if not q["awq"]["top_k"]:
        q["awq"] = {"top_k": 0}
    if q["calibration"]["source"] != "generated":
        del q["calibration"]["temperature"]
    if not q["size_target"]["enabled"]:
        q["size_target"] = {"enabled": False}
    return q


def evaluate_section(cfg: dict, point: str, mode: str) -> dict:
    """What one (point, mode) evaluation depends on: TTT settings only for mode ttt; the budget is judged
    by the report, not here."""
    ev = cfg["evaluate"]
    section = {k: v for k, v in ev.items()
               if k not in ("modes", "budget_seconds", "ttt", "stride", "ogd", "ngram_tilt")}
    if mode != "standard":  # standard windows do not overlap: stride = seq_len
        section["stride"] = ev["stride"]
    section["ogd"] = ev["ogd"] if ev["ogd"]["enabled"] else {"enabled": False}
    if ev.get("ngram_tilt", {}).get("enabled"):  # absent when off: the keys of runs without it stay as they were
        section["ngram_tilt"] = ev["ngram_tilt"]
    if mode == "ttt":
        ttt = ev["ttt"]  # each method reads its own settings: lora its sub-tree, sgd the others, phased all
        section["ttt"] = ({"method": "lora", "lora": ttt["lora"]} if ttt["method"] == "lora"
                          else dict(ttt) if ttt["method"] == "phased"
                          else {k: v for k, v in ttt.items() if k not in ("lora", "phased")})
    elif ev["ogd"]["enabled"]:  # the OGD bias learns chunk by chunk in every mode
        section["ttt"] = {"chunk_tokens": ev["ttt"]["chunk_tokens"]}
    return {**section, "point": point, "mode": mode}


def plan(config: dict) -> dict:
    """Resolve every arm into stage configs and keys.

    Returns {"stages": {stage: {key: {"config": ..., "inputs": {stage: key}, "run": {...}}}},
             "arms": {arm: {stage: key, "export": key, "evaluate": {point: {mode: key}}, "modes": [...]}},
             "exports": {key: the export spec of stages.export}}.
    "run" holds a stage's run settings (RUN_SETTINGS), taken from the first arm that uses the key.
    """
    stages = {s: {} for s in ("tokenize", "curriculum", "train", "quantize", "rescue", "evaluate")}
    arms, exports = {}, {}

    def add(stage, section, inputs, run=None):
        key = content_key(stage, section, inputs, code_digest(stage))
        stages[stage].setdefault(key, {"config": section, "inputs": inputs, "run": run or {}})
        return key

    for arm, override in selected_arms(config).items():
        cfg = deep_merge(config["defaults"], override)
        keys = {"tokenize": add("tokenize", tokenize_section(cfg["tokenize"]), {})}
        train_inputs = {"tokenize": keys["tokenize"]}
        if cfg["curriculum"]["enabled"]:
            section = {"buckets": cfg["curriculum"]["buckets"], "seq_len": cfg["train"]["seq_len"]}
            keys["curriculum"] = add("curriculum", section, {"tokenize": keys["tokenize"]})
            train_inputs["curriculum"] = keys["curriculum"]
        run = {k: cfg["train"][k] for k in RUN_SETTINGS["train"]}
        keys["train"] = add("train", train_section(cfg), train_inputs, run)
        spec = export_spec(cfg)
        keys["export"] = content_key("export", spec, {}, "".join(map(code_digest, EXPORT_CODE)))
        exports.setdefault(keys["export"], spec)
        section, quantize_inputs = quantize_section(cfg["quantize"]), {"train": keys["train"]}
        if section["size_target"]["enabled"]:  # pruning leaves room for the shipped file: it must exist first
            section["code_file"], quantize_inputs["export"] = export_file(keys["export"]), keys["export"]
        keys["quantize"] = add("quantize", section, quantize_inputs)
        point_inputs = {"prequant": {"train": keys["train"]}, "quant": {"quantize": keys["quantize"]}}
        rescue = cfg["rescue"]
        if rescue_enabled(rescue):  # else no rescue point at all
            keys["rescue"] = add("rescue", rescue, {"quantize": keys["quantize"]})
            point_inputs["rescue"] = {"rescue": keys["rescue"]}
        keys["modes"] = list(cfg["evaluate"]["modes"])
        keys["evaluate"] = {point: {mode: add("evaluate", evaluate_section(cfg, point, mode), inputs)
                                    for mode in keys["modes"]}
                            for point, inputs in point_inputs.items()}
        arms[arm] = keys
    return {"stages": stages, "arms": arms, "exports": exports}


# The generator and the entry of the code it ships (stages.export.ENTRY): their code keys an export.
EXPORT_CODE = ("export", "recordrun")
EXPORT_DIR = "artifacts/export"


def export_file(key: str) -> str:
    return f"{EXPORT_DIR}/{key}/train_gpt.py"


def rescue_enabled(rescue: dict) -> bool:
    return rescue["lcq"]["enabled"] or rescue["calibrate"]["enabled"]


def chain_of(pairs) -> list[tuple[str, str]]:
    """The decomposition chain of the (point, mode) pairs an arm has (stages/aggregate.py's docstring): each
    point at the first mode, then the other modes at the last point; its last pair is the arm's score."""
    pairs = set(pairs)
    modes = [m for m in MODES if any(pm[1] == m for pm in pairs)]
    if not modes:
        return []
    base = modes[0]
    chain = [(p, base) for p in POINTS if (p, base) in pairs]
    last = chain[-1][0] if chain else next(p for p in reversed(POINTS) if any(pm[0] == p for pm in pairs))
    return chain + [(last, m) for m in modes[1:] if (last, m) in pairs]


def export_spec(cfg: dict) -> dict:
    """What an arm's exported train_gpt.py runs (stages.recordrun): the stage configurations the plan gives its
    stages, and the evaluations of its decomposition chain, its score last. Run settings are not in it (they
    key nothing): the export logs and checkpoints by its own defaults."""
    rescue = cfg["rescue"] if rescue_enabled(cfg["rescue"]) else None
    points = ["prequant", "quant", *(["rescue"] if rescue else [])]
    curriculum = ({"buckets": cfg["curriculum"]["buckets"], "seq_len": cfg["train"]["seq_len"]}
                  if cfg["curriculum"]["enabled"] else None)
    return {"data": {"vocab_size": cfg["tokenize"]["vocab_size"]}, "curriculum": curriculum,
            "train": train_section(cfg), "quantize": quantize_section(cfg["quantize"]), "rescue": rescue,
            "evaluations": [evaluate_section(cfg, p, m)
                            for p, m in chain_of((p, m) for p in points for m in cfg["evaluate"]["modes"])]}


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


def tokenize_input_files(tok: dict) -> list[str]:
    """Every file a tokenize of these settings reads (declared as the rule's inputs): corpus files or
    challenge shards with their tokenizer, and a given tokenizer_model. Problems raise ConfigError."""
    from stages.corpus import expand_paths
    files = []
    if tok["source"] == "files":
        if not tok["files"]["paths"]:
            raise ConfigError("tokenize.files.paths: source files needs at least one glob")
        try:
            files = [str(p) for p in expand_paths(tok["files"]["paths"])]
        except FileNotFoundError as e:
            raise ConfigError(str(e)) from None
    if tok["source"] == "challenge":
        files = challenge_files(tok)
    if tok["source"] != "challenge" and tok["tokenizer_model"]:
        if not Path(tok["tokenizer_model"]).is_file():
            raise ConfigError(f"tokenize.tokenizer_model: {tok['tokenizer_model']!r} is not a file")
        files.append(tok["tokenizer_model"])
    return files


def published_logs(report: dict) -> list[str]:
    """The challenge train logs the aggregate stage parses next to caddie's runs."""
    from stages.corpus import expand_paths
    try:
        return [str(p) for p in expand_paths(report.get("published_logs", []), "report.published_logs")]
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None


def challenge_files(tok: dict) -> list[str]:
    """The shards and tokenizer a `source: challenge` tokenize links (declared as inputs)."""
    src = tok["challenge"]
    if not src["dir"] or not Path(src["dir"]).is_dir():
        raise ConfigError(f"tokenize.challenge.dir: {src['dir']!r} is not a directory")
    if not src["tokenizer"] or not Path(src["tokenizer"]).is_file():
        raise ConfigError(f"tokenize.challenge.tokenizer: {src['tokenizer']!r} is not a file (the SentencePiece "
                          "model of the shards is required)")
    shards = {split: split_shards(src["dir"], split) for split in ("train", "val")}
    for split, paths in shards.items():
        if not paths:
            raise ConfigError(f"tokenize.challenge.dir: {src['dir']!r} holds no fineweb_{split}_*.bin shards")
    sidecars = split_shards(src["dir"], "val_bytes")  # CaseOps' byte sidecars: a changed one re-runs tokenize
    return [str(p) for p in shards["val"] + sidecars + shards["train"]] + [src["tokenizer"]]


def resolve_inputs(config: dict, plan: dict) -> dict:
    """The input files of every tokenize key, resolved when the plan is made, so that a missing corpus,
    shard folder or code file fails the invocation whatever outputs already exist. Raises one ConfigError
    naming each problem's key and the arms it affects."""
    files, problems = {}, {}
    for arm, keys in plan["arms"].items():
        cfg = deep_merge(config["defaults"], config["arms"][arm])
        try:
            files[keys["tokenize"]] = tokenize_input_files(cfg["tokenize"])
        except ConfigError as e:
            problems.setdefault(str(e), []).append(arm)
    try:
        published_logs(config["report"])
    except ConfigError as e:
        problems[str(e)] = []
    if problems:
        lines = [f"{text} (arms: {', '.join(arms)})" if arms else text for text, arms in problems.items()]
        raise ConfigError("missing inputs:\n  " + "\n  ".join(lines))
    return files
