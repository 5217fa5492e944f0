"""The aggregate stage's reports: one list of sections rendered twice, as report.md (for reviews) and
as report.html (one self-contained page, figures embedded, no network), plus the figures as PNGs."""
import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stages.io import atomic_path, write_text  # noqa: E402

POINTS = ("prequant", "quant", "rescue")
MODES = ("standard", "sliding", "ttt")
FIGURES = {"val_bpb_by_point": "figures/val_bpb_by_point.png", "waterfall": "figures/waterfall.png",
           "train_loss": "figures/train_loss.png", "eval_seconds": "figures/eval_seconds.png"}
CAPTIONS = {"val_bpb_by_point": "val_bpb per seed at each point, one panel per eval mode (caddie's arms)",
            "waterfall": "Damage-gap waterfall: mean change at each step of the decomposition; "
                         "thin lines are the seeds",
            "train_loss": "Training loss against step and against training time, per arm and seed",
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


def group_section(stats):
    conf = f"{stats['confidence']:.0%}"
    rows = [(a, p, m, s["n"], _pm(s), "–" if s["ci_low"] is None else f"[{s['ci_low']:.4f}, {s['ci_high']:.4f}]")
            for a, p, m, s in _leaves(stats["groups"], 3)]
    return section("val_bpb by group", ["arm", "point", "mode", "n", "mean ± std", f"{conf} CI"], rows,
                   text=[f"Intervals are {conf} t-intervals over seeds (sample std, ddof = 1)."])


def step_sections(stats):
    def rows(name):
        return [(a, m, q["n"], _pm(q), _f(q["t"], ".2f"), _f(q["df"], "d"), _p(q["p_two_sided"]),
                 _p(q["p_one_sided_greater"]), _f(q.get("bytes_added"), "+,.0f"))
                for a, m, q in _leaves(stats[name], 2)]
    header = ["arm", "mode", "n", "mean Δ ± std", "t", "df", "p (two-sided)", "p (Δ > 0)", "bytes added"]
    out = [section("Quantization gap (quant − prequant, paired by seed)", header, rows("quant_gap"))]
    if stats["rescue_gain"]:
        out.append(section("Rescue (rescue − quant, paired by seed; negative = recovered)", header,
                           rows("rescue_gain"), text=["`bytes added` is what the rescue (e.g. LCQ's LoRA) "
                                                      "costs in the artifact, beside what it buys in val_bpb."]))
    return out


def versus_sections(stats):
    versus = [(a, p, m, f"{c['n_arm']}/{c['n_baseline']}", f"{c['diff']:+.5f}", _f(c["t"], ".2f"), _p(c["p_less"]),
               f"{c['threshold_bpb']:.5f}", _p(c["p_margin"]), "yes" if c["meets_threshold"] else "no")
              for a, p, m, c in _leaves(stats["vs_baseline"], 3)]
    out = [section(f"Versus the baseline arm `{stats['baseline_arm']}`",
                   ["arm", "point", "mode", "n (arm/base)", "diff", "t", "p (arm < base)", "margin (bpb)",
                    "p (arm + margin < base)", "meets"], versus,
                   text=["One-sided Welch tests; `meets` is the challenge's rule: the gain exceeds 0.005 nats "
                         "(in bpb at the baseline's tokens per byte) at p < 0.01."])]
    if stats["vs_reference"]:
        ref = stats["reference"]
        rows = [(a, f"{r['mean']:.5f}", f"{r['diff']:+.5f}", f"{r['target_bpb']:.5f}", _f(r["t"], ".2f"),
                 _f(r["df"], "d"), _p(r["p_less"]), "yes" if r["meets_threshold"] else "no")
                for a, r in stats["vs_reference"].items()]
        out.append(section(f"Versus {ref['name']} ({ref['val_bpb']:.5f})",
                           ["arm", "mean", "diff", "target (ref − margin)", "t", "df", "p", "meets"], rows,
                           text=["One-sided one-sample t-test of each arm's score against the published value "
                                 "minus 0.005 nats in bpb at the arm's tokens per byte."]))
    return out


def report_sections(stats):
    return [verdict_section(stats), score_section(stats), *decomposition_sections(stats), group_section(stats),
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


def _seed_colours(seeds):
    return {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sorted(set(seeds)))}


def _seed_legend(ax, colours, extra=()):
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=f"seed {s}") for s, c in colours.items()]
    ax.legend(handles=handles + list(extra), fontsize=7, loc="best")


def _dots(ax, x, seeds, values, colours, spread=0.12):
    jitter = np.linspace(-spread, spread, len(values)) if len(values) > 1 else [0.0]
    for dx, seed, v in zip(jitter, seeds, values):
        ax.scatter(x + dx, v, color=colours[seed], s=25, zorder=3)


def _empty(ax, message):
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_val_bpb_by_point(df, path):
    df = df[df["source"] == "caddie"]
    modes = [m for m in MODES if m in set(df["mode"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    colours = _seed_colours(df["seed"])
    present = set(zip(df["arm"], df["point"]))
    slots = [(a, p) for a in sorted(df["arm"].unique()) for p in POINTS if (a, p) in present]
    for ax, mode in zip(axes[0], modes):
        for x, (arm, point) in enumerate(slots):
            g = df[(df["arm"] == arm) & (df["point"] == point) & (df["mode"] == mode)]
            if len(g):
                _dots(ax, x, g["seed"], g["val_bpb"], colours)
                ax.hlines(g["val_bpb"].mean(), x - 0.25, x + 0.25, color="black", lw=2, zorder=2)
        ax.set(title=f"mode: {mode}", ylabel="val_bpb", xlim=(-0.5, len(slots) - 0.5))
        ax.set_xticks(range(len(slots)), [f"{a}\n{p}" for a, p in slots], fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    _seed_legend(axes[0][-1], colours, [plt.Line2D([], [], color="black", lw=2, label="mean")])
    fig.tight_layout()
    _save(fig, path)


def plot_waterfall(stats, path):
    """Per arm: a bar from the chain's first mean, then each step's mean change floating on the
    running level (red = worse, green = better), the seeds' own paths drawn over it."""
    arms = [a for a, d in stats["decomposition"].items() if len(d["chain"]) >= 2]
    cols = min(3, max(len(arms), 1))
    rows = max(1, -(-len(arms) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(arms):]:
        _empty(ax, "no arm with two points" if not arms else "")
    for ax, arm in zip(flat, arms):
        d = stats["decomposition"][arm]
        seeds = {s: np.array([np.nan if v is None else v for v in vals], float) for s, vals in d["values"].items()}
        colours = _seed_colours(seeds)
        means = np.nanmean(np.stack(list(seeds.values())), axis=0)
        lo = np.nanmin(np.stack(list(seeds.values())))
        hi = np.nanmax(np.stack(list(seeds.values())))
        pad = (hi - lo) * 0.3 + 1e-6
        ax.bar(0, means[0] - (lo - pad), bottom=lo - pad, color="lightsteelblue", width=0.6)
        for i in range(1, len(means)):
            delta = means[i] - means[i - 1]
            ax.bar(i, delta, bottom=means[i - 1], width=0.6, color="indianred" if delta > 0 else "seagreen")
        for s, vals in seeds.items():
            ax.plot(range(len(vals)), vals, color=colours[s], lw=0.8, marker=".", alpha=0.8)
        ax.set_xticks(range(len(d["chain"])), [c.replace("/", "\n") for c in d["chain"]], fontsize=7)
        ax.set(title=arm, ylabel="val_bpb", ylim=(lo - pad, hi + pad))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_train_loss(curves, path):
    sources = [s for s in ("caddie", "published") if s in set(curves["source"])]
    fig, axes = plt.subplots(max(len(sources), 1), 2, figsize=(11, 3.8 * max(len(sources), 1)), squeeze=False)
    if not sources:
        _empty(axes[0][0], "no training metrics")
        _empty(axes[0][1], "")
    for (ax_step, ax_time), source in zip(axes, sources):
        c = curves[curves["source"] == source]
        for (arm, seed), g in c.groupby(["arm", "seed"]):
            g = g.sort_values("step")
            ax_step.plot(g["step"], g["loss"], lw=0.9, label=f"{arm} seed {seed}")
            ax_time.plot(g["ms"] / 1000, g["loss"], lw=0.9, label=f"{arm} seed {seed}")
        ax_step.set(xlabel="step", ylabel="train loss", title=f"{source}: loss vs step")
        ax_time.set(xlabel="training time (s)", ylabel="train loss", title=f"{source}: loss vs time")
        for ax in (ax_step, ax_time):
            ax.grid(alpha=0.3)
        ax_time.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def plot_eval_seconds(df, path):
    df = df[df["seconds"].notna()]
    slots = list(dict.fromkeys(zip(df["arm"], df["point"], df["mode"])))
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(slots) + 2), 4))
    if not slots:
        _empty(ax, "no eval seconds")
    colours = _seed_colours(df["seed"])
    budgets = sorted(set(df["budget_seconds"].dropna()))
    for x, (arm, point, mode) in enumerate(slots):
        g = df[(df["arm"] == arm) & (df["point"] == point) & (df["mode"] == mode)]
        budget = g["budget_seconds"].max()
        over = bool(budget == budget and (g["seconds"] > budget).any())  # NaN budget: none
        ax.bar(x, g["seconds"].mean(), width=0.6, color="indianred" if over else "lightgray", edgecolor="gray")
        _dots(ax, x, g["seed"], g["seconds"], colours)
    for b in budgets:
        ax.axhline(b, color="black", ls="--", lw=1)
        ax.text(len(slots) - 0.5, b, f" budget {b:g} s", va="bottom", ha="right", fontsize=7)
    if slots:
        ax.set_xticks(range(len(slots)), [f"{a}\n{p}/{m}" for a, p, m in slots], fontsize=6, rotation=90)
        _seed_legend(ax, colours)
    ax.set(ylabel="eval seconds", title="eval seconds per seed (red: over budget)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_reports(stats, df, curves, out: Path):
    plot_val_bpb_by_point(df, out / FIGURES["val_bpb_by_point"])
    plot_waterfall(stats, out / FIGURES["waterfall"])
    plot_train_loss(curves, out / FIGURES["train_loss"])
    plot_eval_seconds(df, out / FIGURES["eval_seconds"])
    sections = report_sections(stats)
    write_text(out / "report.md", render_markdown(sections, FIGURES))
    write_text(out / "report.html", render_html(sections, FIGURES, out))
