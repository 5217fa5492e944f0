"""The main() of an exported train_gpt.py: one arm's whole path in one process, as a record's file runs it.

    python train_gpt.py                                         # CPU, or one GPU
    torchrun --standalone --nproc_per_node=8 train_gpt.py       # 8 GPUs (gloo ranks on CPU)

It calls the stage functions the pipeline's rules call, with the arm's resolved stage configurations (the
export's spec, stages/export.py) and the same files between them, so its numbers are the pipeline's: curriculum
(when on) -> train -> quantize -> rescue (when the arm has one), each artifact counted with this very file as
its code -> the evaluations of the arm's decomposition chain, its score last. The records' environment
variables override the data, seed, run id and the hyperparameters in ENV. Every output lands under
runs/<RUN_ID>/ and the log, in the records' format (stages/recordlog.py), in logs/<RUN_ID>.txt.
"""
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import sentencepiece as spm
import torch.distributed as dist

from stages import codesize, curriculum, evaluate, quantize, recordlog, rescue, train
from stages.attention import BOS_ID
from stages.io import read_json, sha256_file, write_json, write_text
from stages.shards import read_header, split_shards

RUN_DEFAULTS = {"log_every": 100, "checkpoint_every": 0}  # a records run logs every 100 steps and never resumes

# The records' environment variables and the setting each overrides (section, key path).
ENV = {
    "ITERATIONS": ("train", "iterations"), "MAX_WALLCLOCK_SECONDS": ("train", "max_seconds"),
    "TRAIN_BATCH_TOKENS": ("train", "batch_tokens"), "TRAIN_SEQ_LEN": ("train", "seq_len"),
    "WARMUP_STEPS": ("train", "warmup_steps"), "WARMDOWN_ITERS": ("train", "warmdown_iters"),
    "WARMDOWN_FRAC": ("train", "warmdown_frac"), "MIN_LR": ("train", "min_lr"),
    "GPTQ_RESERVE_SECONDS": ("train", "gptq_reserve_seconds"), "TRAIN_LOG_EVERY": ("run", "log_every"),
    "NUM_LAYERS": ("train", "model", "num_layers"), "MODEL_DIM": ("train", "model", "model_dim"),
    "NUM_HEADS": ("train", "model", "num_heads"), "NUM_KV_HEADS": ("train", "model", "num_kv_heads"),
    "MLP_MULT": ("train", "model", "mlp_mult"), "LOGIT_SOFTCAP": ("train", "model", "logit_softcap"),
    "ROPE_BASE": ("train", "model", "rope_base"), "QK_GAIN_INIT": ("train", "model", "qk_gain_init"),
    "EMBED_LR": ("train", "optimizer", "embed_lr"), "TIED_EMBED_LR": ("train", "optimizer", "tied_embed_lr"),
    "MATRIX_LR": ("train", "optimizer", "matrix_lr"), "SCALAR_LR": ("train", "optimizer", "scalar_lr"),
    "MUON_MOMENTUM": ("train", "optimizer", "muon_momentum"), "GRAD_CLIP_NORM": ("train", "optimizer", "grad_clip_norm"),
    "MUON_WD": ("train", "optimizer", "muon_weight_decay"), "EMA_DECAY": ("train", "ema", "decay"),
    "MATRIX_BITS": ("quantize", "bits"), "EMBED_BITS": ("quantize", "embed_bits"),
    "COMPRESSOR": ("quantize", "compressor"), "EVAL_SEQ_LEN": ("evaluate", "seq_len"),
    "EVAL_STRIDE": ("evaluate", "stride"), "TTT_LR": ("evaluate", "ttt", "lr"),
    "TTT_EPOCHS": ("evaluate", "ttt", "epochs"), "TTT_CHUNK_TOKENS": ("evaluate", "ttt", "chunk_tokens"),
}


def parsed(name: str, text: str, default):
    """An environment value in the type of the setting it overrides; a bad one is an error naming both."""
    try:
        if isinstance(default, bool):
            if text.lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return text.lower() in ("1", "true")
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if default is None:
            return json.loads(text)
    except ValueError:
        raise ValueError(f"environment {name}={text!r}: not a {type(default).__name__} like its default "
                         f"{default!r}") from None
    return text


def sections_of(spec: dict, section: str) -> list[dict]:
    """Where a section's settings live in the spec (the evaluate settings: in every evaluation)."""
    return {"train": [spec["train"]["train"]], "run": [spec["run"]], "quantize": [spec["quantize"]],
            "evaluate": spec["evaluations"]}[section]


def with_environment(spec: dict, environ) -> dict:
    """The spec with the ENV variables that are set applied wherever their setting exists."""
    spec = copy.deepcopy(spec)
    for name, (section, *path) in ENV.items():
        if name not in environ:
            continue
        for tree in sections_of(spec, section):
            for key in path[:-1]:
                tree = tree.get(key, {})
            if path[-1] in tree:
                tree[path[-1]] = parsed(name, environ[name], tree[path[-1]])
    return spec


def hyperparameters(spec: dict, run: dict) -> dict:
    """What the log's Hyperparameters block shows: the run's data, seed and id, and every ENV setting."""
    values = dict(run)
    for name, (section, *path) in ENV.items():
        tree = sections_of(spec, section)[-1]
        for key in path:
            tree = tree.get(key) if isinstance(tree, dict) else None
        if tree is not None:
            values[name.lower()] = tree
    return values


def run_settings(spec: dict, environ) -> dict:
    vocab = spec["data"]["vocab_size"]
    seed = parsed("SEED", environ.get("SEED", "1337"), 0)
    return {"data_path": environ.get("DATA_PATH", f"./data/datasets/fineweb10B_sp{vocab}"),
            "tokenizer_path": environ.get("TOKENIZER_PATH", f"./data/tokenizers/fineweb_{vocab}_bpe.model"),
            "seed": seed, "run_id": environ.get("RUN_ID", f"seed{seed}"),
            "world_size": int(environ.get("WORLD_SIZE", 1)), "rank": int(environ.get("RANK", 0))}


def on_ranks(spec: dict, world: int) -> dict:
    """Train and evaluate on the launched processes (quantize and rescue run on rank 0, as in the pipeline)."""
    spec = copy.deepcopy(spec)
    spec["train"]["train"]["nproc"] = world
    for ev in spec["evaluations"]:
        ev["nproc"] = world
    return spec


class Rendezvous:
    """Each stage opens and closes its own process group; a group opened again on torchrun's store meets the
    keys of the last one, so every group gets a store of its own, on the next port after torchrun's."""

    def __init__(self, environ):
        self.environ, self.opened = environ, 0
        self.base = int(environ.get("MASTER_PORT", 29500))

    def next_group(self) -> None:
        self.opened += 1
        self.environ["MASTER_PORT"] = str(self.base + self.opened)
        self.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # rank 0 serves the new store

    def barrier(self, world: int) -> None:
        """Wait for every rank."""
        if world > 1:
            self.next_group()
            dist.init_process_group(backend="gloo")
            dist.barrier()
            dist.destroy_process_group()


def linked_shard(path: Path, split: str, folder: Path) -> dict:
    """A shard linked into the run folder under its own name (the manifest names shards beside it)."""
    (folder / path.name).symlink_to(path.resolve())
    return {"name": path.name, "split": split, "tokens": read_header(path), "sha256": sha256_file(path)}


def manifest_path(data_path: Path, folder: Path) -> Path:
    """caddie's own manifest beside its shards, else the one written into the run folder."""
    own = data_path / "manifest.json"
    return own if own.is_file() else folder / "manifest.json"


def write_manifest(data_path: Path, tokenizer_path: Path, folder: Path) -> None:
    """The manifest the stages read, for the challenge's shards and tokenizer: linked into the run folder, with
    their sha256s, so that the stages verify what they read."""
    shards = {split: split_shards(data_path, split) for split in ("val", "train")}
    for split, paths in shards.items():
        if not paths:
            raise FileNotFoundError(f"DATA_PATH {data_path}: no fineweb_{split}_*.bin shards")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"TOKENIZER_PATH {tokenizer_path}: not a file")
    entries = [linked_shard(p, split, folder) for split, paths in shards.items() for p in paths]
    (folder / "tokenizer.model").symlink_to(tokenizer_path.resolve())
    write_json(folder / "manifest.json", {
        "shards": entries, "vocab_size": spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size(),
        "bos_id": BOS_ID, "val_raw_bytes": None,
        "tokens": {split: sum(e["tokens"] for e in entries if e["split"] == split) for split in ("train", "val")},
        "tokenizer": {"file": "tokenizer.model", "sha256": sha256_file(tokenizer_path)}})


def train_args(spec: dict, manifest: Path, seed: int, folder: Path) -> list[str]:
    args = ["--config", json.dumps(spec["train"]), "--run-settings", json.dumps(spec["run"]),
            "--manifest", str(manifest), "--seed", str(seed), "--out-dir", str(folder / "train"),
            "--resume-dir", str(folder / "train" / "resume")]
    if spec["curriculum"] is not None:
        args += ["--curriculum", str(folder / "buckets.npz"), "--curriculum-summary",
                 str(folder / "curriculum.json")]
    return args


def model_of(point: str, folder: Path) -> tuple[Path, Path]:
    """The model file a point scores and the summary that records its sha256."""
    stage = {"prequant": "train", "quant": "quantize", "rescue": "rescue"}[point]
    name = "model.pt" if point == "prequant" else "artifact.bin"
    return folder / stage / name, folder / stage / "summary.json"


def compress_and_count(spec: dict, manifest: Path, seed: int, folder: Path, script: Path) -> None:
    """Quantize and rescue on rank 0, as the pipeline runs them, then count each artifact with this very file as
    its code (stages/codesize.py, as the pipeline's artifact_size rule)."""
    teacher, teacher_summary = model_of("prequant", folder)
    quantize_cfg = {**spec["quantize"], **({"code_file": str(script)} if spec["quantize"]["size_target"]["enabled"]
                                           else {})}
    quantize.main(["--config", json.dumps(quantize_cfg),
                   "--checkpoint", str(teacher), "--checkpoint-summary", str(teacher_summary),
                   "--manifest", str(manifest), "--seed", str(seed), "--out", str(folder / "quantize" / "artifact.bin"),
                   "--summary", str(folder / "quantize" / "summary.json")])
    if spec["rescue"] is not None:
        rescue.main(["--config", json.dumps(spec["rescue"]), "--artifact", str(folder / "quantize" / "artifact.bin"),
                     "--quantize-summary", str(folder / "quantize" / "summary.json"), "--teacher", str(teacher),
                     "--teacher-summary", str(teacher_summary), "--manifest", str(manifest), "--seed", str(seed),
                     "--out", str(folder / "rescue" / "artifact.bin"),
                     "--summary", str(folder / "rescue" / "summary.json")])
    code = codesize.measure(script, spec["quantize"]["code_accounting"])
    for point in ["quant"] + (["rescue"] if spec["rescue"] is not None else []):
        summary = model_of(point, folder)[1]
        size = codesize.artifact_size(code, read_json(summary), spec["quantize"]["cap_bytes"], where=str(summary))
        write_json(size_path(point, folder), size)


def size_path(point: str, folder: Path) -> Path:
    return folder / f"size_{point}.json"


def evaluation_path(ev: dict, folder: Path) -> Path:
    return folder / "evaluate" / f"{ev['point']}_{ev['mode']}.json"


def collect_log(spec: dict, run: dict, manifest: Path, folder: Path) -> str:
    """The records-format log of this run, from its outputs (the same builder as a submission's logs)."""
    evals = [(ev["point"], ev["mode"], read_json(evaluation_path(ev, folder))) for ev in spec["evaluations"]]
    metrics = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
    sizes = {point: read_json(size_path(point, folder)) for point in ("quant", "rescue")
             if size_path(point, folder).exists()}
    return recordlog.run_log(hyperparameters(spec, run), read_json(manifest), spec["train"]["train"],
                             spec["run"]["log_every"], metrics, read_json(folder / "train" / "summary.json"), evals,
                             spec["quantize"]["compressor"], sizes)


def main(spec: dict, script, environ=None) -> int:
    environ = os.environ if environ is None else environ
    run = run_settings(spec, environ)
    world, rank, seed = run["world_size"], run["rank"], run["seed"]
    spec = on_ranks(with_environment({**spec, "run": dict(RUN_DEFAULTS)}, environ), world)
    groups = Rendezvous(os.environ)
    folder, data_path = Path("runs") / run["run_id"], Path(run["data_path"])
    manifest = manifest_path(data_path, folder)
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        if manifest.parent == folder:
            write_manifest(data_path, Path(run["tokenizer_path"]), folder)
    groups.barrier(world)
    header = recordlog.hyperparameter_lines(hyperparameters(spec, run))
    if rank == 0:
        print("\n".join(header), flush=True)
    start = time.time()
    if spec["curriculum"] is not None and rank == 0:
        curriculum.main(["--config", json.dumps(spec["curriculum"]), "--manifest", str(manifest),
                         "--out", str(folder / "buckets.npz"), "--summary", str(folder / "curriculum.json")])
    groups.barrier(world)
    groups.next_group()
    train.main(train_args(spec, manifest, seed, folder))
    if rank == 0:
        compress_and_count(spec, manifest, seed, folder, Path(script).resolve())
    groups.barrier(world)
    for ev in spec["evaluations"]:
        model, summary = model_of(ev["point"], folder)
        groups.next_group()
        evaluate.main(["--config", json.dumps(ev), "--mode", ev["mode"], "--model", str(model),
                       "--model-summary", str(summary), "--manifest", str(manifest),
                       "--out", str(evaluation_path(ev, folder))])
    if rank == 0:
        text = collect_log(spec, run, manifest, folder)
        write_text(Path("logs") / f"{run['run_id']}.txt", text)
        live = set(header)  # and the trainer's own step and stop lines, printed as it ran
        print("\n".join(line for line in text.splitlines()
                        if line not in live and not line.startswith(("step:", "stopping_early:"))))
        print(f"wall_time:{time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit("stages.recordrun runs inside an exported train_gpt.py (python -m stages.export writes one)")
