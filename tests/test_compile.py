"""`train.compile: true` on CPU, so graph breaks, recompiles and compiled-vs-eager drift show up in CI before
a GPU is lent. Dynamo's graph capture (breaks, guards, recompiles) does not depend on the backend, so the
run that switches QAT, recurrence and growth on mid-run uses the fast aot_eager backend; one short run
goes through inductor itself."""
import functools
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import tiny_train_config
from stages import train

PHASES = {"qat_start": 0.3, "recur_start": 0.6, "grow": {"depths": [1], "until": [0.2]}}
# Graphs the phased run may compile: the grown-to-1 model, all layers, all layers with recurrence.
# QAT switches through a tensor, not a guard, so it compiles nothing new.
PHASED_GRAPHS = 3


def run(data, out, compile_, iterations, **overrides):
    cfg = tiny_train_config(compile=compile_, iterations=iterations, warmup_steps=0, log_every=1, **overrides)
    config = {"train": cfg, "curriculum": {"enabled": False, "buckets": 4, "floor": 0.02}}
    train.main(["--config", json.dumps(config), "--manifest", str(data["manifest"]), "--seed", "1",
                "--out-dir", str(out), "--resume-dir", str(out / "resume")])
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def phased_model():
    model = tiny_train_config()["model"]
    return dict(model, qat_bits=6, recur_layers=[0, 1])


def test_compiled_training_with_phase_switches_matches_eager_without_breaks_or_extra_recompiles(
        tiny_data, tmp_path, monkeypatch, fresh_dynamo):
    eager = run(tiny_data, tmp_path / "eager", False, 12, model=phased_model(), **PHASES)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run(tiny_data, tmp_path / "compiled", True, 12, model=phased_model(), **PHASES)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert dict(fresh_dynamo["graph_break"]) == {}, "graph breaks in the compiled training step"
    graphs = fresh_dynamo["stats"]["unique_graphs"]
    assert 1 <= graphs <= PHASED_GRAPHS, f"{graphs} graphs compiled for {PHASED_GRAPHS} model phases"


def test_inductor_on_cpu_matches_eager(tiny_data, tmp_path, fresh_dynamo):
    eager = run(tiny_data, tmp_path / "eager", False, 4)
    compiled = run(tiny_data, tmp_path / "compiled", True, 4)
    assert compiled == pytest.approx(eager, rel=1e-3)
    assert fresh_dynamo["stats"]["unique_graphs"] == 1 and dict(fresh_dynamo["graph_break"]) == {}


def test_compiled_training_on_packed_documents_matches_eager_without_breaks(tiny_data, tmp_path, monkeypatch,
                                                                             fresh_dynamo):
    packed = dict(doc_isolation=True, document_packing=True)
    eager = run(tiny_data, tmp_path / "eager", False, 6, **packed)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    compiled = run(tiny_data, tmp_path / "compiled", True, 6, **packed)
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert dict(fresh_dynamo["graph_break"]) == {}, "graph breaks in the compiled packed step"
    # The segment count is padded to a bucket, so the batches' varying document counts compile one graph.
    assert fresh_dynamo["stats"]["unique_graphs"] == 1
