"""The report's figures and tables at the size of a real study: 10 arms sharing one training run per seed.
Figures are checked as drawn: no text overlaps other text or leaves the canvas, shared evals are one row,
one loss curve per distinct training run and seed, a seed has one colour in every figure."""
import itertools
import json
import math

import numpy as np
import pytest
from matplotlib import pyplot as plt
from matplotlib.colors import to_hex

from stages import aggregate as agg
from stages import report

SEEDS = (1337, 42, 2025)
ARMS = ["baseline", *(f"arm-{i}-with-a-long-name" for i in range(1, 10))]


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


def study(tmp_path):
    """Ten arms over three seeds: one training run per seed shared by all (so one prequant eval), a quant
    eval per arm at standard and sliding; the last arm also rescues."""
    runs = []
    for seed in SEEDS:
        train = tmp_path / f"train{seed}"
        train.mkdir()
        metrics = train / "metrics.jsonl"
        metrics.write_text("".join(json.dumps({"step": s, "loss": 6 - s / 50, "ms": 10.0 * s}) + "\n"
                                   for s in range(1, 101)))
        summary = _write(train / "summary.json", {"steps": 100, "train_seconds": 1.0, "tokens_per_second": 1e5})

        def run(arm, point, mode, bpb, name):
            ev = _write(tmp_path / f"{name}_{seed}.json",
                        {"point": point, "mode": mode, "tokens": 10**5, "bytes": 4 * 10**5, "raw_bytes": None,
                         "loss_nats": bpb * math.log(2) * 4, "val_bpb": bpb, "seconds": 2.0 + len(name) / 10})
            quant = None if point == "prequant" else _write(tmp_path / f"q_{name}_{seed}.json",
                                                              {"total_bytes": 10**6, "model_bytes": 9 * 10**5})
            return {"arm": arm, "seed": seed, "point": point, "mode": mode, "eval": ev, "train_summary": summary,
                    "train_metrics": str(metrics), "quantize_summary": quant, "size": quant, "budget_seconds": 600}
        jitter = SEEDS.index(seed) * 0.001
        for i, arm in enumerate(ARMS):
            for mode in ("standard", "sliding"):
                runs.append(run(arm, "prequant", mode, 1.30 + jitter, f"pre_{mode}"))  # the same files
                runs.append(run(arm, "quant", mode, 1.35 - i * 0.002 + jitter, f"quant_{arm}_{mode}"))
        runs.append(run(ARMS[-1], "rescue", "standard", 1.32 + jitter, "rescue"))
        runs.append(run(ARMS[-1], "rescue", "sliding", 1.31 + jitter, "rescue_sliding"))
    return runs


@pytest.fixture
def drawn(tmp_path):
    runs = study(tmp_path)
    df = agg.load_results(runs)
    stats = agg.build_stats(df, "baseline", 0.95, runs=runs)
    curves = agg.load_curves(runs)
    figures = report.figures(stats, df, curves)
    yield stats, df, curves, figures
    for fig in figures.values():
        plt.close(fig)


def shown_ticks(labels, locs, limits):
    """The tick labels inside the view limits: matplotlib keeps ticks beyond them, but does not draw them."""
    lo, hi = sorted(limits)
    return [t for t, loc in zip(labels, locs) if lo - 1e-9 <= loc <= hi + 1e-9]


def texts_of(fig):
    """(where, text artist) of every visible non-empty text: tick labels, titles, axis labels, legends."""
    out = []
    for n, ax in enumerate(fig.axes):
        items = [("ytick", t) for t in shown_ticks(ax.get_yticklabels(), ax.get_yticks(), ax.get_ylim())]
        items += [("xtick", t) for t in shown_ticks(ax.get_xticklabels(), ax.get_xticks(), ax.get_xlim())]
        items += [("title", ax.title), ("xlabel", ax.xaxis.label), ("ylabel", ax.yaxis.label)]
        if ax.get_legend():
            items += [("legend", ax.get_legend())]
        out += [(f"axes {n} {kind}", t) for kind, t in items if t.get_visible() and
                (kind == "legend" or t.get_text().strip())]
    out += [("figure legend", lg) for lg in fig.legends]
    out += [(f"row {n} title", t) for n, sub in enumerate(fig.subfigs) for t in sub.texts if t.get_text().strip()]
    return out


def layout_problems(fig) -> list[str]:
    """Texts that overlap each other (tick labels of one axis; titles, axis labels and legends anywhere)
    or are cut off by the canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    boxes = [(where, t, t.get_window_extent(renderer)) for where, t in texts_of(fig)]
    problems = [f"{where} {getattr(t, 'get_text', lambda: 'legend')()!r} leaves the canvas" for where, t, b in boxes
                if b.x0 < canvas.x0 - 1 or b.y0 < canvas.y0 - 1 or b.x1 > canvas.x1 + 1 or b.y1 > canvas.y1 + 1]
    for (wa, ta, a), (wb, tb, b) in itertools.combinations(boxes, 2):
        same_axis = wa == wb and "tick" in wa
        if (same_axis or ("tick" not in wa and "tick" not in wb)) and a.overlaps(b) and \
                a.intersection(a, b).width > 1 and a.intersection(a, b).height > 1:
            problems.append(f"{wa} {getattr(ta, 'get_text', lambda: '')()!r} overlaps "
                            f"{wb} {getattr(tb, 'get_text', lambda: '')()!r}")
    return problems


def test_no_text_of_any_figure_overlaps_or_is_cut_off_at_ten_arms(drawn):
    figures = drawn[3]
    assert set(figures) == set(report.FIGURES)
    problems = {name: layout_problems(fig) for name, fig in figures.items()}
    assert problems == {name: [] for name in figures}


def test_every_figure_has_a_legend_and_labelled_axes_with_units(drawn):
    for name, fig in drawn[3].items():
        axes = [ax for ax in fig.axes if ax.axison]
        assert axes, name
        assert fig.legends or any(ax.get_legend() for ax in axes), f"{name}: no legend"
        for ax in axes:
            value_label = ax.get_xlabel() if ax.get_yticklabels() and ax.get_ylabel() == "" else ax.get_ylabel()
            assert value_label and ("(" in value_label), f"{name}: axis label without a unit: {value_label!r}"


def test_a_shared_eval_is_one_row(drawn):
    stats, _, _, figures = drawn
    assert stats["groups"]["baseline"]["prequant"]["standard"]["shared_by"] == sorted(ARMS)
    assert stats["groups"]["baseline"]["quant"]["standard"]["shared_by"] == ["baseline"]
    panels = figures["val_bpb_by_point"].axes
    labels = [[t.get_text() for t in ax.get_yticklabels()] for ax in panels]
    assert [ax.get_title() for ax in panels] == ["mode: standard", "mode: sliding"]
    # one prequant row for the ten arms, a quant row per arm, the rescue row of the last arm
    assert [len(rows) for rows in labels] == [1 + 10 + 1, 1 + 10 + 1]
    assert sum("prequant" in row for row in labels[0]) == 1
    assert sum(len(ax.collections) for ax in panels) == 2 * 12 * len(SEEDS)  # a dot per seed and row
    sections = {s["title"]: s for s in report.report_sections(stats)}
    rows = sections["val_bpb by group"]["rows"]
    prequant = [r for r in rows if r[1] == "prequant"]
    assert [(r[0], r[2]) for r in prequant] == [(", ".join(sorted(ARMS)), "standard"),
                                               (", ".join(sorted(ARMS)), "sliding")]
    assert len(rows) == 2 + 2 * 10 + 2


def test_one_loss_curve_per_distinct_training_run_and_seed(drawn):
    _, _, curves, figures = drawn
    assert set(curves["run"]) == {", ".join(ARMS)}
    by_step, by_time = figures["train_loss"].axes
    assert len(by_step.lines) == len(by_time.lines) == len(SEEDS)
    assert figures["train_loss"].subfigs[0].get_suptitle().startswith("training run of arms: baseline, arm-1")


def test_a_seed_has_one_colour_in_every_figure(drawn):
    stats, df, curves, figures = drawn
    colours = {s: to_hex(c) for s, c in report.seed_colours(df, curves).items()}
    assert len(set(colours.values())) == len(SEEDS)
    seen = set()
    for name, fig in figures.items():
        for ax in fig.axes:
            for handle in (ax.get_legend().legend_handles if ax.get_legend() else []):
                if handle.get_label().startswith("seed "):
                    seed = int(handle.get_label().split()[1])
                    assert to_hex(handle.get_color()) == colours[seed], (name, seed)
                    seen.add(name)
        for lg in fig.legends:
            for handle in lg.legend_handles:
                if handle.get_label().startswith("seed "):
                    assert to_hex(handle.get_color()) == colours[int(handle.get_label().split()[1])], name
                    seen.add(name)
    assert seen == {"val_bpb_by_point", "waterfall", "train_loss", "eval_seconds"}
    lines = figures["train_loss"].axes[0].lines
    assert sorted(to_hex(line.get_color()) for line in lines) == sorted(colours.values())
    dots = figures["val_bpb_by_point"].axes[0].collections[:len(SEEDS)]
    assert [to_hex(d.get_facecolor()[0]) for d in dots] == [colours[s] for s in sorted(SEEDS)]


def test_the_seed_colours_do_not_depend_on_which_figure_asks():
    import pandas as pd
    a = report.seed_colours(pd.DataFrame({"seed": [42, 1337]}), pd.DataFrame({"seed": [2025]}))
    b = report.seed_colours(pd.DataFrame({"seed": [2025, 1337, 42]}), pd.DataFrame({"seed": []}))
    assert a == b and len(a) == 3
    assert np.allclose(a[42], b[42])
