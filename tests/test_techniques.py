import json

import pytest
import torch

from conftest import tiny_train_config
from stages import rowquant, techniques, train
from test_train import losses, train_args


def run_train(data, out, **overrides):
    train.main(train_args(data, out, **overrides))
    return json.loads((out / "summary.json").read_text()), torch.load(out / "model.pt", weights_only=True)


def test_ema_is_what_gets_exported(tiny_data, tmp_path):
    summary, ckpt = run_train(tiny_data, tmp_path / "ema", ema={"enabled": True, "decay": 0.9})
    _, plain = run_train(tiny_data, tmp_path / "plain")
    assert summary["exported"] == "ema"
    w = "blocks.0.mlp.fc.weight"
    assert not torch.equal(ckpt["state_dict"][w], plain["state_dict"][w])
    assert losses(tmp_path / "ema") == losses(tmp_path / "plain")  # EMA does not change training itself


def test_ema_update_is_a_moving_average():
    model = torch.nn.Linear(3, 2)
    ema = techniques.EMA(model, decay=0.75)
    start = ema.shadow["weight"].clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], start + 1.0)


def test_muon_weight_decay_shrinks_and_row_normalize_still_learns(tiny_data, tmp_path):
    opt = tiny_train_config()["optimizer"]
    _, plain = run_train(tiny_data, tmp_path / "plain")
    _, decayed = run_train(tiny_data, tmp_path / "wd", optimizer={**opt, "muon_weight_decay": 5.0})
    w = "blocks.1.attn.c_q.weight"
    assert decayed["state_dict"][w].norm() < 0.9 * plain["state_dict"][w].norm()
    run_train(tiny_data, tmp_path / "rn", optimizer={**opt, "muon_row_normalize": True})
    curve = losses(tmp_path / "rn")
    assert curve[-1] < curve[0] - 1.0 and curve != losses(tmp_path / "plain")


def test_quantization_noise_is_within_half_a_step_and_restored_exactly():
    p = torch.nn.Parameter(torch.randn(8, 64))
    before = p.detach().clone()
    originals = techniques.add_quantization_noise([p], 6, 100.0, 1.0, torch.Generator().manual_seed(0))
    step = rowquant.percentile_scale(before, 100.0, 31).float()[:, None]
    delta = p.detach() - before
    assert (delta.abs() <= step / 2 + 1e-6).all() and delta.abs().max() > step.min() / 10
    techniques.restore([p], originals)
    assert torch.equal(p.detach(), before)


def test_qna_changes_training_only_above_its_threshold(tiny_data, tmp_path):
    qna = {"enabled": True, "bits": 6, "clip_percentile": 100.0, "magnitude": 1.0, "threshold": 0.15}
    run_train(tiny_data, tmp_path / "plain", log_every=1)
    run_train(tiny_data, tmp_path / "qna", qna=qna, log_every=1)
    run_train(tiny_data, tmp_path / "off", qna={**qna, "threshold": 1.01}, log_every=1)
    assert losses(tmp_path / "qna") != losses(tmp_path / "plain")
    assert losses(tmp_path / "off") == losses(tmp_path / "plain")  # LR multiplier never above 1.01


def test_sqwa_exports_the_average_of_quantized_snapshots_without_stalling(tiny_data, tmp_path):
    sqwa = {"enabled": True, "every": 2, "below_lr": 0.5, "bits": 6, "clip_percentile": 100.0}
    summary, ckpt = run_train(tiny_data, tmp_path, sqwa=sqwa)
    # warmdown over the last 10 of 30 steps: the step that ends as step n ran at lr (31 - n) / 10,
    # below 0.5 for n >= 27; every 2 steps -> snapshots after steps 28 and 30
    assert summary["exported"] == "sqwa" and summary["sqwa_snapshots"] == 2
    assert summary["sqwa_loop_ms"] < 1000 * summary["train_seconds"] / 10  # a copy, not a quantization
    w = ckpt["state_dict"]["blocks.0.mlp.fc.weight"]
    scale = rowquant.percentile_scale(w, 100.0, 31).float()[:, None]
    off_grid = ((w / scale) - torch.round(w / scale)).abs()
    assert off_grid.max() > 0.05  # an average of grid points is generally not on the grid


def test_sqwa_average_of_round_trips():
    avg = techniques.SQWA(bits=4, clip_percentile=100.0, keep_float_max_numel=0)
    states = [{"w": torch.randn(4, 16), "b": torch.randn(4)} for _ in range(3)]
    for s in states:
        avg.add(s)
    result = avg.average()
    expected = sum(techniques.round_trip(s, 4, 100.0, 0)["w"] for s in states) / 3
    assert torch.allclose(result["w"], expected) and torch.allclose(result["b"], sum(s["b"] for s in states) / 3)


def test_hard_batch_replay_retrains_the_hardest_batches(tiny_data, tmp_path):
    summary, _ = run_train(tiny_data, tmp_path, replay={"every": 10, "batches": 2, "lr_mult": 2.0})
    assert summary["replay_steps"] == 3 * 2 and summary["steps"] == 30
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 1.0
    hard = techniques.HardBatches(keep=2)
    for loss in (1.0, 5.0, 3.0, 0.5):
        hard.offer(loss, [(torch.full((1, 2), int(loss)), torch.zeros(1, 2))])
    assert [int(b[0][0][0, 0]) for b in hard.hardest()] == [5, 3]


def test_gptq_reserve_shortens_the_training_budget():
    cfg = {"max_seconds": 600, "gptq_reserve_seconds": 12, "warmdown_iters": 100, "iterations": 10**6}
    assert train.budget_seconds(cfg) == 588
    # 100 ms/step: the warmdown is the last 10 s of the 588 s budget
    assert train.lr_multiplier(5830, 583_000, cfg) == pytest.approx(0.5)
    assert train.budget_seconds({**cfg, "max_seconds": 0}) == 0


def test_qat_switches_on_at_its_start_fraction(tiny_data, tmp_path):
    model = {**tiny_train_config()["model"], "qat_bits": 4}
    run_train(tiny_data, tmp_path / "plain", log_every=1)
    run_train(tiny_data, tmp_path / "qat", log_every=1, model=model, qat_start=0.5)
    plain, qat = losses(tmp_path / "plain"), losses(tmp_path / "qat")
    assert qat[:15] == plain[:15]  # QAT off for the first half of the 30 steps
    assert qat[15:] != plain[15:]


def test_depth_recurrence_switches_on_and_learns(tiny_data, tmp_path):
    model = {**tiny_train_config()["model"], "recur_layers": [0, 1], "recur_loops": 1}
    summary, ckpt = run_train(tiny_data, tmp_path, log_every=1, model=model, recur_start=0.5)
    curve = losses(tmp_path)
    assert curve[-1] < curve[0] - 1.0
    assert ckpt["model_config"]["recur_layers"] == [0, 1]


def test_document_isolation_changes_training(tiny_data, tmp_path):
    run_train(tiny_data, tmp_path / "plain", log_every=1, iterations=5)
    run_train(tiny_data, tmp_path / "iso", log_every=1, iterations=5, doc_isolation=True)
    assert losses(tmp_path / "iso") != losses(tmp_path / "plain")


def test_grown_layers_join_as_identities():
    from stages.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1))
    with torch.no_grad():  # train-like weights in the first two blocks; blocks 2 and 3 stay at their init
        for name, p in model.named_parameters():
            if name.startswith(("blocks.0.", "blocks.1.")) and p.ndim == 2:
                p.normal_(0, 0.1)
    x = torch.randint(0, 64, (2, 16))
    model.active_layers = 2
    shallow = model.forward_logits(x)
    model(x, x).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(("blocks.2.", "blocks.3.")))
    model.active_layers = 4
    assert torch.allclose(model.forward_logits(x), shallow, atol=1e-6)


def test_progressive_growth_trains_new_layers_only_after_they_join(tiny_data, tmp_path):
    model = {**tiny_train_config()["model"], "num_layers": 4}
    summary, ckpt = run_train(tiny_data, tmp_path / "grow", model=model, grow={"depths": [2], "until": [0.5]})
    curve = losses(tmp_path / "grow")
    assert curve[-1] < curve[0] - 1.0
    assert ckpt["state_dict"]["blocks.3.mlp.proj.weight"].abs().sum() > 0  # trained after joining
    with pytest.raises(ValueError, match="train.grow"):
        run_train(tiny_data, tmp_path / "bad", model=model, grow={"depths": [2, 3], "until": [0.5]})
