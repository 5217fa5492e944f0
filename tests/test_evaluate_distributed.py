"""evaluate on 2 gloo processes (CPU): the ranks share the work and give the 1-process result in every mode,
score first, and the torchrun entry writes one result that records nproc."""
import json
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from files import save_checkpoint, summary_of
from stages import evaluate, scoring
from stages.ngram_tilt import build_tilt
from test_evaluate import MODES, eval_config, flat_tables, tiny_model

ROOT = Path(__file__).resolve().parent.parent
IDS = [f"{m}{'' if t == 'sgd' else '-' + t}{'+ogd' if o else ''}" for m, t, o in MODES]
CHANGED_FROM = (37, 150)


def mode_config(method, ogd):
    """Small batches, so that every chunk and OGD round has work for both ranks; a TTT chunk trains on 4
    sequences, in a step of 3 (pieces: 2 on rank 0, 1 on rank 1) and a step of 1 (rank 1 has none). Phased TTT
    (with the n-gram tilt): global SGD after the first 8 and 16 documents, on 1 and 2 chunks."""
    ttt = {**eval_config(method)["ttt"], "chunk_tokens": 128, "batch_seqs": 3}
    if method == "phased":
        ttt["phased"] = {**ttt["phased"], "prefix_docs": 16}
    return eval_config(method, ogd={"enabled": ogd, "lr": 0.5}, batch_seqs=2, ttt=ttt)


def documents(n, seed):
    tokens = np.random.default_rng(seed).integers(2, 64, n)
    tokens[::23] = 1
    return tokens


def jobs():
    """(name, tokens, mode, config) of every run: a 600-token val stream scored in each mode, and the 200-token
    stream of the perturbation test, as is and with its tokens changed from each of CHANGED_FROM on."""
    runs, val, short = [], documents(600, 8), documents(200, 2)
    for name, (mode, method, ogd) in zip(IDS, MODES):
        cfg = {**mode_config(method, ogd), "doc_isolation": mode == "ttt"}
        runs.append((f"{name}/val", val, mode, cfg))
        runs.append((f"{name}/before", short, mode, cfg))
        for p in CHANGED_FROM:
            changed = short.copy()
            changed[p:] = np.random.default_rng(3).integers(2, 64, len(short) - p)
            runs.append((f"{name}/after{p}", changed, mode, cfg))
    return runs


def evaluate_jobs(runs, ranks, device) -> dict:
    """Each run's rank-local target losses and its score (the sums over all ranks)."""
    out = {}
    for name, tokens, mode, cfg in runs:
        tilt = build_tilt(tokens, cfg, device)
        out[name] = evaluate.token_losses(tiny_model(), tokens, mode, cfg, device, ranks, tilt)
        if name.endswith("/val"):
            out[name + "/score"] = evaluate.score(tiny_model(), tokens, flat_tables(64), cfg, mode, device, ranks,
                                                  tilt)
    return out


def _worker(rank, world, port, runs, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks, device = scoring.start_ranks("cpu")
    assert ranks == scoring.Ranks(rank, world)
    torch.save(evaluate_jobs(runs, ranks, device), Path(out_dir) / f"rank{rank}.pt")
    ranks.close()


@contextmanager
def one_thread():
    """As each rank runs (OMP_NUM_THREADS=1), so that the 1-process reference computes the same numbers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The results of every run in 1 process and in 2 (the 2 ranks' losses merged, each target from the one
    rank that scored it)."""
    runs = jobs()
    with one_thread():
        one = evaluate_jobs(runs, scoring.ONE, torch.device("cpu"))
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(2, free_port(), runs, str(out)), nprocs=2)
    parts = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    two = {}
    for name, value in parts[0].items():
        if name.endswith("/score"):
            assert parts[1][name] == value  # every rank holds the reduced sums
            two[name] = value
            continue
        scored = [~np.isnan(part[name]) for part in parts]
        assert not (scored[0] & scored[1]).any(), f"{name}: a target scored by both ranks"
        if "/after" not in name:  # (a changed stream has no BOS after p: fewer documents)
            assert scored[0][1:].any() and scored[1][1:].any(), f"{name}: a rank had no work"
        two[name] = np.where(scored[0], parts[0][name], parts[1][name])
    return one, two


@pytest.mark.parametrize("name", IDS)
def test_two_processes_give_the_one_process_val_bpb(one_and_two, name):
    one, two = one_and_two
    a, b = one[f"{name}/val/score"], two[f"{name}/val/score"]
    assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"]) == (599, 599)
    bpb_one, bpb_two = (s["loss_sum"] / (np.log(2) * s["bytes"]) for s in (a, b))
    assert bpb_two == pytest.approx(bpb_one, rel=1e-12, abs=0)
    np.testing.assert_allclose(two[f"{name}/val"][1:], one[f"{name}/val"][1:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", IDS)
def test_two_processes_score_first(one_and_two, name):
    """As test_evaluate's perturbation test, on 2 ranks: changing tokens at positions >= p leaves the losses
    of targets < p unchanged; every target is scored exactly once, by one rank."""
    _, two = one_and_two
    before = two[f"{name}/before"]
    assert np.isnan(before[0]) and not np.isnan(before[1:]).any()
    for p in CHANGED_FROM:
        after = two[f"{name}/after{p}"]
        assert np.array_equal(before[1:p], after[1:p])
        assert not np.array_equal(before[p:], after[p:])


def test_torchrun_writes_one_result_that_records_nproc(tiny_data, tmp_path):
    model = tiny_model(vocab=json.loads(tiny_data["manifest"].read_text())["vocab_size"])
    ckpt = save_checkpoint(tmp_path / "train", model.state_dict(), model.config.to_dict())
    cfg = eval_config(seq_len=64, stride=16, batch_seqs=4, ogd={"enabled": True, "lr": 0.5})
    with one_thread():
        one = evaluate.run({**cfg, "nproc": 1}, "sliding", ckpt, summary_of(ckpt), tiny_data["manifest"],
                           tmp_path / "one.json")
    args = ["--config", json.dumps({**cfg, "nproc": 2}), "--mode", "sliding", "--model", str(ckpt),
            "--model-summary", str(summary_of(ckpt)), "--manifest", str(tiny_data["manifest"]),
            "--out", str(tmp_path / "two.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.evaluate", *args]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert (one["nproc"], two["nproc"]) == (1, 2)
    assert (two["tokens"], two["bytes"]) == (one["tokens"], one["bytes"])
    assert two["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-12)
    assert done.stdout.count('"val_bpb"') == 1  # rank 0's summary line only
    assert "(rank 0 of 2)" in done.stdout and "rank 1" not in done.stdout
    with pytest.raises(ValueError, match=r"evaluate\.nproc: 2, but this eval runs in 1 process"):
        evaluate.run({**cfg, "nproc": 2}, "sliding", ckpt, summary_of(ckpt), tiny_data["manifest"],
                     tmp_path / "three.json")
