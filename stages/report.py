"""The aggregate stage's reports: one list of sections rendered twice, as report.md (for reviews) and
as report.html (one self-contained page, figures embedded, no network), plus the figures as PNGs."""
import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.io import atomic_path, write_text  # noqa: E402

POINTS = ("prequant", "quant", "rescue")
MODES = ("standard", "sliding", "ttt")
FIGURES = {"forest": "figures/forest.png", "val_bpb_by_point": "figures/val_bpb_by_point.png",
           "waterfall": "figures/waterfall.png", "train_loss": "figures/train_loss.png",
           "eval_seconds": "figures/eval_seconds.png"}
CAPTIONS = {"forest": "Forest plot: each arm's score minus the baseline arm's score (bpb) with its interval; "
                      "the zero line and the 0.005-nat margin (left of it: beats the baseline by the margin)",
            "val_bpb_by_point": "val_bpb per seed at each point, one panel per eval mode (caddie's arms); "
                                "an eval that several arms share is one row",
            "waterfall": "Damage-gap waterfall: mean change at each step of the decomposition; "
                         "thin lines are the seeds",
            "train_loss": "Training loss against step and against training time, one row per distinct "
                          "training run (arms that share one are named together), a line per seed",
            "eval_seconds": "Eval seconds per seed against the eval budget"}


def _f(x, spec=".4f"):
    return "–" if x is None else format(x, spec)


def _pm(x, spec=".4f"):
    return f"{_f(x['mean'], spec)} ± {_f(x['std'], spec.lstrip('+'))}"


def _p(x):
    return _f(x, ".3g")


def _leaves(tree, depth):
    """Flatten a nested dict `depth` levels deep into (key, ..., leaf) tuples."""
    for key, sub in tree.items():
        if depth == 1:
            yield key, sub
        else:
            yield from ((key, *rest) for rest in _leaves(sub, depth - 1))


def section(title, header=None, rows=None, text=(), level=2):
    return {"title": title, "level": level, "text": list(text), "header": header, "rows": rows}


def _signed_ci(c, suffix="", spec="+.5f"):
    """'Δ [low, high]' of a comparison's difference (suffix '_nats' for nats)."""
    d, lo, hi = c[f"diff{suffix}"], c[f"ci_low{suffix}"], c[f"ci_high{suffix}"]
    return _f(d, spec) + ("" if lo is None else f" [{lo:{spec}}, {hi:{spec}}]")


def _score_cell(s):
    return f"{_pm(s, '.5f')} (n={s['n']})"


def _yes_no(x):
    return "yes" if x else "no"


def headline_order(stats) -> list[str]:
    """The baseline arm, then the other caddie arms, then the published records."""
    arms = list(stats["scores"])
    own = [a for a in arms if stats["scores"][a]["source"] == "caddie" and a != stats["baseline_arm"]]
    return [stats["baseline_arm"], *own, *(a for a in arms if a not in own and a != stats["baseline_arm"])]


def headline_section(stats):
    """The table a researcher reads first: each arm's score against the baseline arm's score."""
    conf = f"{stats['confidence']:.0%}"
    prog = (stats.get("progression") or {}).get("arms", {})
    rows = []
    for arm in headline_order(stats):
        s, c = stats["scores"][arm], stats["vs_baseline"].get(arm)
        g = prog.get(arm)
        progression = [] if not stats.get("progression") else \
            ["–" if g is None else f"{'yes' if g['progresses'] else 'no'} (p = {_p(g['p_less'])})"]
        if c is None:
            verdict = "baseline" if arm == stats["baseline_arm"] else f"{s['source']}: not compared"
            rows.append((arm, f"{s['point']}/{s['mode']}", _score_cell(s), *["–"] * 7, verdict, "–", *progression))
            continue
        rows.append((arm, f"{s['point']}/{s['mode']}", _score_cell(s), _signed_ci(c), _signed_ci(c, "_nats"),
                     c["test"], _p(c["p_two_sided"]), _f(c["delta_artifact_bytes"], "+,.0f"),
                     _f(c["delta_train_seconds"], "+.1f"), _f(c["delta_eval_seconds"], "+.1f"), c["verdict"],
                     f"{_yes_no(c['meets_margin'])} (p = {_p(c['p_margin'])})", *progression))
    header = ["arm", "score at", "val_bpb mean ± std", f"Δ bpb [{conf} CI]", f"Δ nats [{conf} CI]", "test", "p",
              "Δ artifact bytes", "Δ train s", "Δ eval s", "verdict", "0.005-nat margin"]
    if stats.get("progression"):
        f = stats["progression"]["frontier"]
        header.append(f"progresses past {f['name']} (p < {f['alpha']:g})")
    return section(f"Headline: each arm against the baseline arm `{stats['baseline_arm']}`", header, rows, text=[
        f"Each arm's score (its last point and mode) minus the baseline arm's score; paired t-test by seed when "
        f"both arms ran the same seeds, Welch otherwise (p two-sided). The verdict is better/worse when p < "
        f"{1 - stats['confidence']:.2g}; the margin is the challenge's rule: better by 0.005 nats (in bpb at the "
        f"baseline's tokens per byte) at one-sided p < 0.01. Δ nats is Δ bpb at the baseline's nats per bpb; "
        f"the Δ bytes and seconds are differences of means over seeds."])


def reference_headline_section(stats):
    ref, conf = stats["reference"], f"{stats['confidence']:.0%}"
    rows = [(a, _score_cell(stats["scores"][a]), _signed_ci(r), _signed_ci(r, "_nats"), r["test"],
             _p(r["p_two_sided"]), r["verdict"], f"{_yes_no(r['meets_margin'])} (p = {_p(r['p_less'])})")
            for a, r in stats["vs_reference"].items()]
    return section(f"Against the published reference {ref['name']} ({ref['val_bpb']:.5f})",
                   ["arm", "val_bpb mean ± std", f"Δ bpb [{conf} CI]", f"Δ nats [{conf} CI]", "test", "p",
                    "verdict", "0.005-nat margin"], rows,
                   text=["One-sample t-tests of each arm's per-seed scores against the published value (df = n − 1); "
                         "the margin test is against the published value minus 0.005 nats in bpb at the arm's "
                         "tokens per byte, one-sided at p < 0.01, as the records report it."])


def progression_section(stats):
    prog = stats["progression"]
    f = prog["frontier"]
    rows = [(a, f"{g['mean']:.5f}", f"{g['frontier_mean']:.5f}", f"{g['diff']:+.5f}", _f(g["t"], ".2f"),
             _f(g["df"], ".2f"), _p(g["p_less"]), "yes" if g["progresses"] else "no") for a, g in prog["arms"].items()]
    margin = f" plus {f['margin_nats']:g} nats" if f["margin_nats"] else ""
    return section(f"Progression rule against the frontier row {f['name']}",
                   ["arm", "mean", "frontier mean", "diff", "t", "Welch df", "p (arm < frontier)", "progresses"], rows,
                   text=[f"One-sided Welch test of each arm's per-seed scores{margin} against the frontier row's "
                         f"{len(f['values'])} per-seed values ({', '.join(f'{v:.5f}' for v in f['values'])}); "
                         f"an arm progresses at p < {f['alpha']:g}."])


def _value(v):
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def differences_section(stats):
    rows = []
    for arm, d in stats["config_differences"].items():
        keys = list(d["vs_defaults"]) + [k for k in d["vs_baseline"] if k not in d["vs_defaults"]]
        for key in keys:
            entry = d["vs_defaults"].get(key) or d["vs_baseline"][key]
            base = d["vs_baseline"].get(key)
            default = d["vs_defaults"][key]["default"] if key in d["vs_defaults"] else entry["value"]
            rows.append((arm, key, _value(entry["value"]), _value(default),
                         "same" if base is None else _value(base["baseline"])))
    return section("What differs between arms", ["arm", "key", "value", "default", "baseline arm's"], rows,
                   text=["Config keys (dotted paths) where an arm's resolved config differs from the defaults or from "
                         "the baseline arm's; an arm absent here runs the defaults."])


def budget_sections(stats):
    budgets = stats["artifact_budgets"]
    rows = [(a, b["point"], b["n"], _f(b["model_bytes"], ",.0f"), _f(b["code_bytes"], ",.0f"),
             _f(b["rescue_bytes"], ",.0f"), _f(b["total_bytes_max"], ",d"), _f(b["cap_bytes"], ",d"),
             _f(b["headroom_bytes_min"], ",d")) for a, b in budgets.items()]
    out = [section("Where the bytes go", ["arm", "point", "n", "model bytes (mean)", "code bytes", "rescue bytes",
                                          "total bytes (max)", "cap", "headroom (min)"], rows,
                   text=["Compressed model bytes and counted code bytes of each arm's scored artifact, from its "
                         "quantize (and rescue) summaries; the group and tensor tables give stored bytes before "
                         "compression."])]
    groups = []
    for a, b in budgets.items():
        total = sum(g["stored_bytes"] for g in b["groups"].values()) or None
        groups += [(a, name, _f(g["tensors"], ".0f"), _f(g["numel"], ",.0f"), _f(g["stored_bytes"], ",.0f"),
                    "–" if not total else f"{g['stored_bytes'] / total:.1%}") for name, g in b["groups"].items()]
    if groups:
        out.append(section("Stored bytes by tensor group", ["arm", "group", "tensors", "params", "stored bytes",
                                                            "share"], groups, level=3))
    largest = [(a, t["name"], t["group"], t["kind"], _f(t["bits"], "g"), _f(t["numel"], ",d"),
                _f(t["stored_bytes"], ",d")) for a, b in budgets.items() for t in b["largest_tensors"]]
    if largest:
        out.append(section("Largest tensors", ["arm", "tensor", "group", "kind", "bits", "params", "stored bytes"],
                           largest, level=3))
    return out


def throughput_sections(stats):
    train = [(", ".join(r["arms"]), r["seed"], _f(r["steps"], "d"), _f(r["tokens_per_second"], ",.0f"),
              _f(r["ms_per_step"], ".1f"), _f(r["train_seconds"], ".1f"), _f(r["budget_seconds"], "g"),
              "–" if r["within_budget"] is None else _yes_no(r["within_budget"]))
             for r in stats["training_throughput"]]
    modes = [m for m in MODES if any(m in by_mode for seeds in stats["eval_seconds"].values()
                                     for by_mode in seeds.values())]
    evals = [(a, seed, *(_f(by_mode.get(m), ".1f") for m in modes))
             for a, seeds in stats["eval_seconds"].items() for seed, by_mode in seeds.items()]
    return [section("Throughput: training", ["arms", "seed", "steps", "tokens/s", "ms/step", "train s", "budget s",
                                             "within budget"], train,
                    text=["One row per training run and seed; arms that share a training run are listed together."]),
            section("Throughput: eval seconds at the scored point", ["arm", "seed", *(f"{m} s" for m in modes)],
                    evals, level=3)]


def verdict_section(stats):
    return section("Verdict", text=stats["verdicts"] or ["No arm has a score to judge."])


def score_section(stats):
    conf = f"{stats['confidence']:.0%}"
    rows = [(a, s["source"], f"{s['point']}/{s['mode']}", s["n"], _pm(s),
             "–" if s["ci_low"] is None else f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]",
             _f(s["threshold_bpb"], ".5f"), _f(s["artifact_bytes_max"], ",d"), _f(s["eval_seconds_max"], ".1f"))
            for a, s in stats["scores"].items()]
    return section("Scores (each arm's last point and mode)",
                   ["arm", "source", "point/mode", "n", "val_bpb mean ± std", f"{conf} CI", "0.005 nats in bpb",
                    "max artifact bytes", "max eval s"], rows)


def decomposition_sections(stats):
    out = [section("Decomposition per seed", text=[
        "Each arm's chain runs prequant → quant → rescue at the standard mode, then sliding and TTT at its "
        "last point. Steps are paired by seed (t-test, df = n − 1); negative Δ is a gain."])]
    for arm, d in stats["decomposition"].items():
        if len(d["chain"]) < 2:
            continue
        rows = [(seed, *(_f(v, ".5f") for v in vals),
                 _f(d["total"]["deltas"].get(seed) if d["total"] else None, "+.5f"))
                for seed, vals in d["values"].items()]
        out.append(section(arm, ["seed", *d["chain"], "total Δ"], rows, level=3))
        steps = [(s["name"], f"{s['from']} → {s['to']}", s["n"], _pm(s, "+.5f"), _f(s["t"], ".2f"),
                  _f(s["df"], "d"), _p(s["p_two_sided"])) for s in d["steps"] + [dict(d["total"], name="total")]]
        out.append(section(f"{arm}: steps", ["step", "from → to", "n", "mean Δ ± std", "t", "df",
                                             "p (two-sided)"], steps, level=4))
    return out


def _first_sharer(arm, entry) -> bool:
    """Whether `arm` is the row of an entry that several arms share (shown once, under all their names)."""
    return (entry.get("shared_by") or [arm])[0] == arm


def _arms_cell(arm, entry):
    return ", ".join(entry.get("shared_by") or [arm])


def group_section(stats):
    conf = f"{stats['confidence']:.0%}"
    rows = [(_arms_cell(a, s), p, m, s["n"], _pm(s),
             "–" if s["ci_low"] is None else f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]")
            for a, p, m, s in _leaves(stats["groups"], 3) if _first_sharer(a, s)]
    return section("val_bpb by group", ["arm", "point", "mode", "n", "mean ± std", f"{conf} CI"], rows,
                   text=[f"Intervals are {conf} t-intervals over seeds (sample std, ddof = 1). An eval that "
                         "several arms share (the same files) is one row naming them all."])


def step_sections(stats):
    def rows(name):
        return [(_arms_cell(a, q), m, q["n"], _pm(q), _f(q["t"], ".2f"), _f(q["df"], "d"), _p(q["p_two_sided"]),
                 _p(q["p_one_sided_greater"]), _f(q.get("bytes_added"), "+,.0f"))
                for a, m, q in _leaves(stats[name], 2) if _first_sharer(a, q)]
    header = ["arm", "mode", "n", "mean Δ ± std", "t", "df", "p (two-sided)", "p (Δ > 0)", "bytes added"]
    out = [section("Quantization gap (quant − prequant, paired by seed)", header, rows("quant_gap"))]
    if stats["rescue_gain"]:
        out.append(section("Rescue (rescue − quant, paired by seed; negative = recovered)", header,
                           rows("rescue_gain"), text=["`bytes added` is what the rescue (e.g. LCQ's LoRA) "
                                                      "costs in the artifact, beside what it buys in val_bpb."]))
    return out


def versus_sections(stats):
    if not stats["vs_reference"]:
        return []
    ref = stats["reference"]
    rows = [(a, f"{r['mean']:.5f}", f"{r['diff']:+.5f}", f"{r['target_bpb']:.5f}", _f(r["t"], ".2f"),
             _f(r["df"], "d"), _p(r["p_less"]), "yes" if r["meets_margin"] else "no")
            for a, r in stats["vs_reference"].items()]
    return [section(f"Versus {ref['name']} ({ref['val_bpb']:.5f}): the challenge's test",
                    ["arm", "mean", "diff", "target (ref − margin)", "t", "df", "p", "meets"], rows,
                    text=["One-sided one-sample t-test of each arm's score against the published value "
                          "minus 0.005 nats in bpb at the arm's tokens per byte."])]


def report_sections(stats):
    first = [headline_section(stats)]
    if stats["vs_reference"]:
        first.append(reference_headline_section(stats))
    if stats.get("progression"):
        first.append(progression_section(stats))
    if stats.get("config_differences"):
        first.append(differences_section(stats))
    return [*first, verdict_section(stats), score_section(stats), *budget_sections(stats),
            *throughput_sections(stats), *decomposition_sections(stats), group_section(stats),
            *step_sections(stats), *versus_sections(stats)]


def markdown_table(header, rows) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
            *(f"| {' | '.join(map(str, r))} |" for r in rows), ""]


def render_markdown(sections, figures):
    lines = ["# caddie report", ""]
    for s in sections:
        lines += ["#" * s["level"] + " " + s["title"], ""]
        lines += [*(f"- {t}" if s["title"] == "Verdict" else t for t in s["text"]), ""] if s["text"] else []
        if s["header"]:
            lines += markdown_table(s["header"], s["rows"])
    lines += ["## Figures", ""] + [f"![{CAPTIONS[name]}]({rel})\n" for name, rel in figures.items()]
    return "\n".join(lines) + "\n"


def render_html(sections, figures, out_dir: Path):
    """One page with every figure inlined as a data: URI, so it opens anywhere with no network."""
    esc = html.escape
    body = ["<h1>caddie report</h1>"]
    for s in sections:
        tag = f"h{s['level']}"
        body.append(f"<{tag}>{esc(s['title'])}</{tag}>")
        body += [f"<p>{esc(t)}</p>" for t in s["text"]]
        if s["header"]:
            head = "".join(f"<th>{esc(h)}</th>" for h in s["header"])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in s["rows"])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
    body.append("<h2>Figures</h2>")
    for name, rel in figures.items():
        data = base64.b64encode((out_dir / rel).read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{esc(CAPTIONS[name])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;font-variant-numeric:tabular-nums}td:first-child,th{text-align:left}"
             "img{max-width:100%}figure{margin:1em 0}")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>caddie report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _save(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def seed_colours(*frames) -> dict:
    """{seed: colour}, one map for every figure, so a seed has the same colour everywhere."""
    seeds = sorted({int(s) for f in frames for s in f["seed"]})
    cmap = plt.get_cmap("tab10" if len(seeds) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(seeds)}


def _seed_handles(colours, seeds=None):
    return [plt.Line2D([], [], marker="o", ls="", color=c, label=f"seed {s}")
            for s, c in colours.items() if seeds is None or s in seeds]


def _legend_right(ax, handles):
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _empty(ax, message):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def arms_label(arms, most=1) -> str:
    """The arms a row stands for, short: 'a +9 more' when many arms share it."""
    return ", ".join(arms[:most]) + (f" +{len(arms) - most} more" if len(arms) > most else "")


def eval_slots(stats, mode, sources=("caddie",)) -> list[tuple[str, str, list[str]]]:
    """[(first arm, point, arms)] of the evals at `mode`, in headline order; evals that several arms share
    (the same files, e.g. the prequant point of one training run) appear once."""
    slots, seen, order = [], set(), headline_order(stats)
    for arm in order:
        if stats["scores"][arm]["source"] not in sources:
            continue
        for point in POINTS:
            g = stats["groups"].get(arm, {}).get(point, {}).get(mode)
            if g is None:
                continue
            arms = sorted(g.get("shared_by") or [arm], key=order.index)
            if (point, *arms) not in seen:
                seen.add((point, *arms))
                slots.append((arm, point, arms))
    return slots


def _strip(ax, y, values, colours, spread=0.15):
    """Per-seed dots on row y (jittered up and down), and their mean as a black bar."""
    seeds = list(values)
    jitter = np.linspace(-spread, spread, len(seeds)) if len(seeds) > 1 else [0.0]
    for dy, seed in zip(jitter, seeds):
        ax.scatter(values[seed], y + dy, color=colours[int(seed)], s=22, zorder=3)
    ax.plot([np.mean(list(values.values()))] * 2, [y - 0.3, y + 0.3], color="black", lw=2, zorder=2)


def figure_val_bpb_by_point(stats, colours):
    """One panel per eval mode, stacked; a row per (arm, point), each shared eval once."""
    modes = [m for m in MODES if eval_slots(stats, m)]
    slots = {m: eval_slots(stats, m) for m in modes}
    heights = [max(len(slots[m]), 1) for m in modes] or [1]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 1.2 * len(heights) + 0.32 * sum(heights)),
                             squeeze=False, gridspec_kw={"height_ratios": heights})
    if not modes:
        _empty(axes[0][0], "no caddie evaluations")
        return fig
    for ax, mode in zip(axes[:, 0], modes):
        for y, (arm, point, arms) in enumerate(slots[mode]):
            _strip(ax, y, stats["groups"][arm][point][mode]["values"], colours)
        ax.set_yticks(range(len(slots[mode])), [f"{arms_label(arms)} · {point}" for _, point, arms in slots[mode]],
                      fontsize=8)
        ax.set_ylim(len(slots[mode]) - 0.5, -0.5)
        ax.set(title=f"mode: {mode}", xlabel="val_bpb (bits per byte)")
        ax.grid(axis="x", alpha=0.3)
    _legend_right(axes[0][0], _seed_handles(colours) + [plt.Line2D([], [], color="black", lw=2, label="mean")])
    fig.tight_layout()
    return fig


def figure_forest(stats):
    """Each arm's Δ vs the baseline arm with its interval, coloured by verdict; the zero line and the
    0.005-nat margin (to its left an arm beats the baseline by the margin)."""
    comps = stats["vs_baseline"]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.4 * max(len(comps), 1)))
    if not comps:
        _empty(ax, "no arm to compare with the baseline")
        return fig
    colours = {"better": "seagreen", "worse": "indianred", "no difference": "gray", "untested": "gray"}
    arms = list(comps)
    for y, arm in enumerate(arms):
        c = comps[arm]
        if c["ci_low"] is not None:
            ax.hlines(y, c["ci_low"], c["ci_high"], color=colours[c["verdict"]], lw=2)
        ax.plot(c["diff"], y, "o", color=colours[c["verdict"]])
    margin = next(iter(comps.values()))["margin_bpb"]
    ax.axvline(0, color="black", lw=1, label="no change")
    ax.axvline(-margin, color="black", ls="--", lw=1, label=f"−0.005 nats ({margin:.5f} bpb)")
    ax.set_yticks(range(len(arms)), [f"{a} ({comps[a]['test']})" for a in arms], fontsize=8)
    ax.set(xlabel=f"Δ val_bpb vs {stats['baseline_arm']} (bits per byte; {stats['confidence']:.0%} interval)",
           title="Δ vs the baseline arm (negative = better)")
    handles = [plt.Line2D([], [], color=c, marker="o", lw=2, label=v) for v, c in colours.items()
               if v != "untested" and any(x["verdict"] == v for x in comps.values())]
    ax.set_ylim(len(arms) - 0.4, -0.6)
    _legend_right(ax, handles + ax.get_legend_handles_labels()[0])
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def figure_waterfall(stats, colours):
    """Per arm: a bar from the chain's first mean, then each step's mean change floating on the
    running level (red = worse, green = better), the seeds' own paths drawn over it."""
    arms = [a for a in headline_order(stats) if len(stats["decomposition"].get(a, {}).get("chain", [])) >= 2]
    cols = min(3, max(len(arms), 1))
    rows = max(1, -(-len(arms) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(arms):]:
        _empty(ax, "no arm with two points" if not arms else "")
    for ax, arm in zip(flat, arms):
        d = stats["decomposition"][arm]
        seeds = {s: np.array([np.nan if v is None else v for v in vals], float) for s, vals in d["values"].items()}
        means = np.nanmean(np.stack(list(seeds.values())), axis=0)
        lo = np.nanmin(np.stack(list(seeds.values())))
        hi = np.nanmax(np.stack(list(seeds.values())))
        pad = (hi - lo) * 0.3 + 1e-6
        ax.bar(0, means[0] - (lo - pad), bottom=lo - pad, color="lightsteelblue", width=0.6)
        for i in range(1, len(means)):
            delta = means[i] - means[i - 1]
            ax.bar(i, delta, bottom=means[i - 1], width=0.6, color="indianred" if delta > 0 else "seagreen")
        for s, vals in seeds.items():
            ax.plot(range(len(vals)), vals, color=colours[int(s)], lw=0.8, marker=".", alpha=0.8)
        ax.set_xticks(range(len(d["chain"])), [c.replace("/", "\n") for c in d["chain"]], fontsize=7)
        ax.set(title=arm, ylabel="val_bpb (bits per byte)", ylim=(lo - pad, hi + pad))
        ax.grid(axis="y", alpha=0.3)
    if arms:
        bars = [plt.Rectangle((0, 0), 1, 1, color=c, label=label) for c, label in
                (("lightsteelblue", "first point (mean)"), ("indianred", "step worsens"),
                 ("seagreen", "step improves"))]
        seeds = {int(s) for a in arms for s in stats["decomposition"][a]["values"]}
        fig.legend(handles=bars + _seed_handles(colours, seeds), fontsize=7, loc="upper center",
                   ncol=len(bars) + len(seeds), bbox_to_anchor=(0.5, 1.0), frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.6 * rows)))
    return fig


def figure_train_loss(curves, colours):
    """One row per distinct training run (the arms that share it named once) and per published record:
    loss against step and against training time, a line per seed."""
    runs = list(dict.fromkeys(zip(curves["source"], curves["run"])))
    fig = plt.figure(figsize=(11, 0.4 + 2.8 * max(len(runs), 1)), layout="constrained")
    if not runs:
        _empty(fig.add_subplot(), "no training metrics")
        return fig
    for row, (source, run) in zip(np.atleast_1d(fig.subfigures(len(runs), 1)), runs):
        ax_step, ax_time = row.subplots(1, 2)
        c = curves[(curves["source"] == source) & (curves["run"] == run)]
        for seed, g in c.groupby("seed"):
            g = g.sort_values("step")
            ax_step.plot(g["step"], g["loss"], lw=0.9, color=colours[int(seed)])
            ax_time.plot(g["ms"] / 1000, g["loss"], lw=0.9, color=colours[int(seed)])
        row.suptitle(f"published: {run}" if source == "published" else
                     f"training run of arms: {arms_label(run.split(', '), 6)}", fontsize=9)
        ax_step.set(xlabel="step", ylabel="train loss (nats per token)", title="loss vs step")
        ax_time.set(xlabel="training time (s)", ylabel="train loss (nats per token)", title="loss vs time")
        for ax in (ax_step, ax_time):
            ax.title.set_fontsize(8)
            ax.grid(alpha=0.3)
        _legend_right(ax_time, _seed_handles(colours, {int(s) for s in c["seed"]}))
    return fig


def figure_eval_seconds(stats, df, colours):
    """A row per eval (each shared eval once), seconds per seed against the eval budget."""
    df = df[df["seconds"].notna()]
    slots = [(arm, point, mode, arms) for mode in MODES
             for arm, point, arms in eval_slots(stats, mode, sources=("caddie", "published"))
             if ((df["arm"] == arm) & (df["point"] == point) & (df["mode"] == mode)).any()]
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.32 * max(len(slots), 1)))
    if not slots:
        _empty(ax, "no eval seconds")
        return fig
    for y, (arm, point, mode, _) in enumerate(slots):
        g = df[(df["arm"] == arm) & (df["point"] == point) & (df["mode"] == mode)]
        budget = g["budget_seconds"].max()
        over = bool(budget == budget and (g["seconds"] > budget).any())  # NaN budget: none
        ax.barh(y, g["seconds"].mean(), height=0.6, color="indianred" if over else "lightgray", edgecolor="gray")
        _strip(ax, y, dict(zip(g["seed"], g["seconds"])), colours)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=c, edgecolor="gray", label=label)
               for c, label in (("lightgray", "mean"), ("indianred", "mean, a seed over budget"))]
    handles += _seed_handles(colours, {int(s) for s in df["seed"]})
    budgets = sorted(set(df["budget_seconds"].dropna()))
    for b in budgets:
        handles.append(ax.axvline(b, color="black", ls="--", lw=1, label=f"budget {b:g} s"))
    ax.set_yticks(range(len(slots)), [f"{arms_label(arms)} · {p}/{m}" for _, p, m, arms in slots], fontsize=8)
    ax.set_ylim(len(slots) - 0.5, -0.5)
    longest = df["seconds"].max()
    if budgets and longest > 0 and max(budgets) / longest > 10:  # else the seconds all sit at the zero line
        ax.set_xscale("log")
        ax.set_xlim(df.loc[df["seconds"] > 0, "seconds"].min() / 2, max(budgets) * 1.5)
    ax.set(xlabel=f"eval seconds (s{', log scale' if ax.get_xscale() == 'log' else ''})",
           title="eval seconds per seed")
    ax.grid(axis="x", alpha=0.3)
    _legend_right(ax, handles)
    fig.tight_layout()
    return fig


def figures(stats, df, curves) -> dict:
    """{name: matplotlib figure} of every figure in FIGURES, with one seed colour map for all."""
    colours = seed_colours(df, curves)
    return {"forest": figure_forest(stats), "val_bpb_by_point": figure_val_bpb_by_point(stats, colours),
            "waterfall": figure_waterfall(stats, colours), "train_loss": figure_train_loss(curves, colours),
            "eval_seconds": figure_eval_seconds(stats, df, colours)}


def write_reports(stats, df, curves, out: Path):
    for name, fig in figures(stats, df, curves).items():
        _save(fig, out / FIGURES[name])
    sections = report_sections(stats)
    write_text(out / "report.md", render_markdown(sections, FIGURES))
    write_text(out / "report.html", render_html(sections, FIGURES, out))
