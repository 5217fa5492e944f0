import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_train_config
from stages import curriculum, loader, records, train
from stages.shards import ShardSet, manifest_shards


def train_args(data, out, seed=1, curriculum=False, **overrides):
    config = {"train": tiny_train_config(**overrides),
              "curriculum": {"enabled": curriculum, "buckets": 4, "floor": 0.02}}
    args = ["--config", json.dumps(config), "--manifest", str(data["manifest"]), "--seed", str(seed),
            "--out-dir", str(out), "--resume-dir", str(out / "resume")]
    return args + (["--curriculum", str(data["buckets"]), "--curriculum-summary", str(data["buckets_summary"])]
                   if curriculum else [])


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_outputs_are_complete(tiny_data, tmp_path):
    train.main(train_args(tiny_data, tmp_path))
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 1.0, curve
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 1024
    assert summary["tokens_per_second"] > 0 and summary["final_train_loss"] == curve[-1]
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "resume").exists()


def test_same_seed_same_losses_and_seeds_differ(tiny_data, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        train.main(train_args(tiny_data, tmp_path / name, seed=seed, iterations=10, log_every=1))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_curriculum_training_learns(tiny_data, tmp_path):
    train.main(train_args(tiny_data, tmp_path, curriculum=True))
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 1.0


def curriculum_batches(data, rank, world, seed=1):
    sampler = curriculum.load_sampler(data["buckets"], data["buckets_summary"], 0.02, seed, rank)
    windows = ShardSet(manifest_shards(data["manifest"], "train"))
    return loader.Batches(None, sampler, windows, 64, rank, world), windows


def test_curriculum_batches_are_each_ranks_own_windows_read_from_the_shards(tiny_data):
    """Each rank draws only its own sequences (its (seed, rank) stream), whatever the world size."""
    local_tokens = 4 * 64
    draws = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        batches, windows = curriculum_batches(tiny_data, rank, world)
        replica = curriculum.load_sampler(tiny_data["buckets"], tiny_data["buckets_summary"], 0.02, 1, rank)
        x, y = batches.next(local_tokens, 0.3)
        shard, offset = replica.sample(4, 0.3)
        expected = windows.read(shard, offset, 65)
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.int64
        assert x.tolist() == expected[:, :-1].tolist() and y.tolist() == expected[:, 1:].tolist()
        assert np.all(offset + 65 <= windows.lengths[shard])
        draws[rank, world] = x.tolist()
    assert draws[0, 1] == draws[0, 2] != draws[1, 2]


def test_the_curriculum_loader_keeps_the_shards_as_memmaps(tiny_data, tmp_path):
    trainer = train.Trainer(tiny_train_config(), {"enabled": True, "buckets": 4, "floor": 0.02},
                            tiny_data["manifest"], tiny_data["buckets"], tiny_data["buckets_summary"], seed=1)
    windows = trainer.batches.windows
    assert isinstance(windows, ShardSet) and all(isinstance(t, np.memmap) for t in windows.shards)
    assert trainer.batches.stream is None


def test_killed_run_resumes_to_the_same_result(tiny_data, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    train.main(train_args(tiny_data, straight, curriculum=True, log_every=1, checkpoint_every=10))
    real_step = train.Trainer.train_step

    def crash_at_25(self, **kw):
        if self.step == 25:
            raise KeyboardInterrupt("killed")
        return real_step(self, **kw)

    monkeypatch.setattr(train.Trainer, "train_step", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(tiny_data, broken, curriculum=True, log_every=1, checkpoint_every=10))
    assert (broken / "resume" / "state.pt").exists() and not (broken / "model.pt").exists()
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.main(train_args(tiny_data, broken, curriculum=True, log_every=1, checkpoint_every=10))
    summary = json.loads((broken / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 30
    assert losses(broken) == losses(straight)


def test_non_finite_loss_stops_with_the_step(tiny_data, tmp_path, monkeypatch):
    real_step = train.Trainer.train_step
    monkeypatch.setattr(train.Trainer, "train_step",
                        lambda self, **kw: (float("nan"), []) if self.step == 3 else real_step(self, **kw))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4; last good metrics: \{.*'step': 3"):
        train.main(train_args(tiny_data, tmp_path, log_every=1))
    assert not (tmp_path / "model.pt").exists()


def test_batch_must_split_into_whole_sequences(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="train.batch_tokens"):
        train.main(train_args(tiny_data, tmp_path, batch_tokens=1000))


def test_torchrun_two_cpu_processes_match_one_process(tiny_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(train_args(tiny_data, one, micro_batches=2, iterations=10))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.train", *train_args(tiny_data, two, micro_batches=2, iterations=10),
           "--run-settings", json.dumps({"log_every": 5})]  # as rules/train.smk passes them
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["grad_accum_steps"] == 1
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_lr_multiplier_warmdown():
    cfg = {"warmdown_iters": 10, "iterations": 100, "max_seconds": 0, "gptq_reserve_seconds": 0}
    assert train.lr_multiplier(50, 0, cfg) == 1.0
    assert train.lr_multiplier(95, 0, cfg) == pytest.approx(0.5)
    wall = {"warmdown_iters": 10, "iterations": 10**6, "max_seconds": 10, "gptq_reserve_seconds": 0}
    # 100 ms/step: the warmdown covers the last 1 s of the 10 s cap
    assert train.lr_multiplier(50, 5000, wall) == 1.0
    assert train.lr_multiplier(95, 9500, wall) == pytest.approx(0.5)


def test_a_model_that_learned_nothing_is_an_error(tiny_data, tmp_path):
    """matrix_lr 1e6 leaves the loss at ln(vocab) (or non-finite): no model.pt, whatever the step losses."""
    with pytest.raises(FloatingPointError, match=r"ln\(vocab\)|non-finite|loss is nan"):
        train.main(train_args(tiny_data, tmp_path, optimizer={**tiny_train_config()["optimizer"], "matrix_lr": 1e6}))
    assert not (tmp_path / "model.pt").exists()


def test_final_loss_near_uniform_fails_naming_ln_vocab(tiny_data, tmp_path, monkeypatch):
    real_step = train.Trainer.train_step

    def uniform_loss(self, **kw):
        loss, batch = real_step(self, **kw)
        return 6.2, batch  # ln(512) = 6.238: within 0.1 nats

    monkeypatch.setattr(train.Trainer, "train_step", uniform_loss)
    with pytest.raises(FloatingPointError, match=r"final loss 6.2000 nats .* not 0.1 below ln\(vocab\) = 6.2383"):
        train.main(train_args(tiny_data, tmp_path, iterations=5))
    assert not (tmp_path / "model.pt").exists()


def test_non_finite_exported_weight_is_named(tiny_data, tmp_path, monkeypatch):
    real_final = train.Trainer.final_weights

    def poisoned(self):
        weights, source = real_final(self)
        weights = dict(weights)
        weights["blocks.0.mlp.fc.weight"] = weights["blocks.0.mlp.fc.weight"].clone().fill_(float("inf"))
        return weights, source

    monkeypatch.setattr(train.Trainer, "final_weights", poisoned)
    with pytest.raises(FloatingPointError, match=r"blocks.0.mlp.fc.weight has \d+ non-finite values"):
        train.main(train_args(tiny_data, tmp_path, iterations=5))
    assert not (tmp_path / "model.pt").exists()


def cap_at_step(n):
    """A wallclock cap that this machine's speed cannot move: reached once `n` steps are done."""
    return lambda self: self.step >= n


def test_capped_run_resumes_from_an_unlogged_checkpoint(tiny_data, tmp_path, monkeypatch):
    """The cap is reached right after a checkpoint at a step that was not logged: the resumed run has no
    step left to take and must still finish (it raised UnboundLocalError)."""
    def killed_at_the_cap(self):
        if self.step >= 25:
            raise KeyboardInterrupt("killed at the cap")
        return False

    args = train_args(tiny_data, tmp_path, iterations=10**6, max_seconds=600, log_every=10**6, checkpoint_every=1)
    monkeypatch.setattr(train.Trainer, "reached_cap", killed_at_the_cap)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train.Trainer, "reached_cap", cap_at_step(25))
    train.main(args)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed"] and summary["stopped_by"] == "wallclock" and summary["steps"] == 25
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 25


def test_train_log_keeps_every_attempt_and_marks_the_resume(tiny_data, tmp_path, monkeypatch):
    real_step = train.Trainer.train_step

    def crash_at_25(self, **kw):
        if self.step == 25:
            raise KeyboardInterrupt("killed")
        return real_step(self, **kw)

    args = train_args(tiny_data, tmp_path, log_every=1, checkpoint_every=10)
    monkeypatch.setattr(train.Trainer, "train_step", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.main(args)
    lines = (tmp_path / "train.log").read_text().splitlines()
    steps = [int(m[1]) for line in lines if (m := records.TRAIN_STEP.match(line))]
    assert steps[:25] == list(range(1, 26))  # the first attempt, up to the kill
    assert "# resumed at step 20" in "\n".join(lines)
    assert set(range(1, 31)) <= set(steps) and steps[-1] == 30


def test_trainer_refuses_to_run_beside_a_live_trainer(tiny_data, tmp_path):
    import socket
    (tmp_path / "resume").mkdir()
    lock = tmp_path / "resume" / "train.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # this test process: alive
    with pytest.raises(RuntimeError, match=rf"another trainer \(pid {os.getpid()} .*is writing these outputs"):
        train.main(train_args(tiny_data, tmp_path, iterations=5))
    assert not (tmp_path / "model.pt").exists() and lock.exists()


def test_a_stale_lock_is_taken_over(tiny_data, tmp_path):
    import socket
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "train.lock").write_text(f"{socket.gethostname()} {dead.pid}")
    train.main(train_args(tiny_data, tmp_path, iterations=5))
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "resume").exists()


def test_run_settings_do_not_change_what_is_trained(tiny_data, tmp_path):
    """log_every and checkpoint_every are run settings (not in the train key): same metrics, same weights."""
    import hashlib
    for name, run in (("a", {"log_every": 1, "checkpoint_every": 0}), ("b", {"log_every": 7, "checkpoint_every": 3})):
        train.main(train_args(tiny_data, tmp_path / name, iterations=10) + ["--run-settings", json.dumps(run)])
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 10
    digest = [json.loads((tmp_path / n / "summary.json").read_text())["model_sha256"] for n in "ab"]
    assert digest[0] == digest[1] == hashlib.sha256((tmp_path / "a" / "model.pt").read_bytes()).hexdigest()


def test_train_log_is_in_the_records_format_with_tok_s_and_the_time_left(tiny_data, tmp_path):
    train.main(train_args(tiny_data, tmp_path, iterations=20, log_every=5))
    lines = [line for line in (tmp_path / "train.log").read_text().splitlines() if line.startswith("step:")]
    assert [int(records.TRAIN_STEP.match(line)[1]) for line in lines] == [1, 5, 10, 15, 20]
    assert all(re.search(r"step_avg:[\d.]+ms tok/s:\d+ eta:\d+s$", line) for line in lines), lines
    assert lines[-1].endswith("eta:0s")


def test_a_capped_run_logs_that_it_stopped_early(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train.Trainer, "reached_cap", cap_at_step(25))
    train.main(train_args(tiny_data, tmp_path, iterations=10**6, max_seconds=600, log_every=10**6))
    last = (tmp_path / "train.log").read_text().splitlines()[-1]
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert records.STOPPING.match(last)[2] == str(steps)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_resume_state_is_set_aside_and_the_run_starts_again(tiny_data, tmp_path, monkeypatch, damage):
    real_step = train.Trainer.train_step

    def crash_at_25(self, **kw):
        if self.step == 25:
            raise KeyboardInterrupt("killed")
        return real_step(self, **kw)

    straight = tmp_path / "straight"
    train.main(train_args(tiny_data, straight))
    broken = tmp_path / "broken"
    args = train_args(tiny_data, broken, checkpoint_every=10)
    monkeypatch.setattr(train.Trainer, "train_step", crash_at_25)
    with pytest.raises(KeyboardInterrupt):
        train.main(args)
    state = broken / "resume" / "state.pt"
    data = bytearray(state.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[:len(data) // 3]
    state.write_bytes(bytes(data))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.main(args)
    summary = json.loads((broken / "summary.json").read_text())
    assert not summary["resumed"] and losses(broken) == losses(straight)
    log = (broken / "train.log").read_text()
    assert f"# resume state {state} is corrupt" in log and log.count("# started at step 0") == 2


GROWTH = {"lengths": [16, 32], "until": [0.25, 0.5], "rewarm_steps": 4}


@pytest.mark.parametrize("use_curriculum", [False, True])
def test_context_growth_changes_the_sequence_length_at_its_fractions_with_the_tokens_fixed(
        tiny_data, tmp_path, monkeypatch, use_curriculum):
    shapes, real_next = [], loader.Batches.next

    def spy(self, local_tokens, progress, seq_len=None):
        x, y = real_next(self, local_tokens, progress, seq_len)
        shapes.append(tuple(x.shape))
        return x, y

    monkeypatch.setattr(loader.Batches, "next", spy)
    train.main(train_args(tiny_data, tmp_path, curriculum=use_curriculum, iterations=20, warmdown_iters=0,
                          log_every=1, seq_growth=GROWTH))
    # step k (0-based) runs at progress k / 20: 16 while <= 0.25, 32 while <= 0.5, then seq_len 64
    assert shapes == [(64, 16)] * 6 + [(32, 32)] * 5 + [(16, 64)] * 9  # 1024 tokens every step
    lr = [json.loads(line)["lr_mul"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # after each change the LR warms up again over 4 steps (#2014's SEQ_CHANGE_WARMUP_STEPS)
    assert lr == [1.0] * 6 + [0.25, 0.5, 0.75, 1.0, 1.0] + [0.25, 0.5, 0.75] + [1.0] * 6
    log = (tmp_path / "train.log").read_text()
    assert "# seq_len 32 from step 7 (progress 0.300)" in log and "# seq_len 64 from step 12 (progress 0.550)" in log


def test_a_run_killed_during_context_growth_resumes_to_the_same_result(tiny_data, tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = dict(iterations=14, warmdown_iters=0, log_every=1, checkpoint_every=7, seq_growth=GROWTH)
    train.main(train_args(tiny_data, straight, **args))
    real_step = train.Trainer.train_step

    def crash_at_9(self, **kw):  # the checkpoint at 7 is inside the LR rewarm that began at step 6
        if self.step == 9:
            raise KeyboardInterrupt("killed")
        return real_step(self, **kw)

    monkeypatch.setattr(train.Trainer, "train_step", crash_at_9)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(tiny_data, broken, **args))
    monkeypatch.setattr(train.Trainer, "train_step", real_step)
    train.main(train_args(tiny_data, broken, **args))
    assert losses(broken) == losses(straight)
    lr = lambda out: [json.loads(line)["lr_mul"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lr(broken) == lr(straight)


@pytest.mark.parametrize("growth", [{"lengths": [48], "until": [0.5]},  # 1024 tokens are not rows of 48
                                    {"lengths": [128], "until": [0.5]},  # longer than seq_len
                                    {"lengths": [16, 32], "until": [0.5, 0.25]},
                                    {"lengths": [16, 32], "until": [0.5]}])
def test_context_growth_must_fit_the_batch_and_the_schedule(tiny_data, tmp_path, growth):
    with pytest.raises(ValueError, match="train.seq_growth"):
        train.main(train_args(tiny_data, tmp_path, iterations=2, seq_growth={**growth, "rewarm_steps": 0}))


def records_stack(**overrides):
    """Every training option of the records on, with phases at fractions of a 24-step run."""
    cfg = tiny_train_config(iterations=24, warmdown_iters=0, warmdown_frac=0.5, min_lr=0.1, log_every=1,
                            seq_growth={"lengths": [16, 32], "until": [0.2, 0.45], "rewarm_steps": 3},
                            grow={"depths": [1], "until": [0.1]}, recur_start=0.3, qat_start=0.6,
                            ema={"enabled": True, "decay": 0.9})
    cfg["model"].update(recur_layers=[0, 1], qat_bits=6)
    cfg["optimizer"].update(newton_schulz="polar_express", muon_row_normalize=True, muon_weight_decay=0.095,
                            embed_weight_decay=0.085, scalar_weight_decay=0.02, grad_clip_norm=0.3)
    cfg.update(overrides)
    return cfg


def test_the_records_training_options_together_learn_and_the_warmup_primes_every_phase_undone(tiny_data, tmp_path):
    runs = {}
    for name, warmup in (("cold", 0), ("primed", 2)):
        out = tmp_path / name
        config = {"train": records_stack(warmup_steps=warmup),
                  "curriculum": {"enabled": False, "buckets": 4, "floor": 0.02}}
        train.main(["--config", json.dumps(config), "--manifest", str(tiny_data["manifest"]), "--seed", "1",
                    "--out-dir", str(out), "--resume-dir", str(out / "resume")])
        runs[name] = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    curve = losses(tmp_path / "cold")
    assert curve[-1] < curve[0] - 1.0, curve
    # The warmup's steps are undone: the same losses and weights as without it.
    assert losses(tmp_path / "primed") == curve
    assert all(torch.equal(runs["primed"][k], runs["cold"][k]) for k in runs["cold"])
    warmups = [line for line in (tmp_path / "primed" / "train.log").read_text().splitlines()
               if line.startswith("# warmup:")]
    assert warmups == [  # each phase of the run, in its order: growth at 0.1, 32 after 0.2, recurrence at 0.3, ...
        "# warmup: 2 steps at seq_len 16, 1 layers, recurrence off, QAT off",
        "# warmup: 2 steps at seq_len 16, 2 layers, recurrence off, QAT off",
        "# warmup: 2 steps at seq_len 32, 2 layers, recurrence off, QAT off",
        "# warmup: 2 steps at seq_len 32, 2 layers, recurrence on, QAT off",
        "# warmup: 2 steps at seq_len 64, 2 layers, recurrence on, QAT off",
        "# warmup: 2 steps at seq_len 64, 2 layers, recurrence on, QAT on"]


def test_without_phases_the_warmup_is_the_baselines_warmup_steps(tiny_data, tmp_path, monkeypatch):
    calls, real_step = [], train.Trainer.train_step

    def spy(self, **kw):
        calls.append(kw.get("phase"))
        return real_step(self, **kw)

    monkeypatch.setattr(train.Trainer, "train_step", spy)
    train.main(train_args(tiny_data, tmp_path, iterations=3, warmup_steps=4))
    assert len(calls) == 4 + 3 and calls[-3:] == [None] * 3
    assert "# warmup:" not in (tmp_path / "train.log").read_text()


def test_torchrun_with_per_rank_clipping_that_never_binds_matches_one_process(tiny_data, tmp_path):
    """Without DDP (each rank clips, then averages by hand) and with one clock across the ranks (max_seconds
    set, never reached): the same training as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    optimizer = {**tiny_train_config()["optimizer"], "grad_clip_norm": 1e6, "grad_clip_per_rank": True}
    common = dict(micro_batches=2, iterations=8, max_seconds=3600, optimizer=optimizer)
    train.main(train_args(tiny_data, one, **common))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "stages.train", *train_args(tiny_data, two, nproc=2, **common)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
