"""
The study's two plots (docs/study.md), from the results.json of runs made by `train_squad.py --stage all`:

    python docs/plot_study.py runs/minilm/d50 runs/minilm/d25 runs/d25-4x-eval ...   # -> docs/*.png

- f1-speedup.png: F1 lost against the dense teacher per measured speed-up, every run given, with the paper's
  BERT-base points;
- budget.png: F1 lost per pruning steps (log scale) for the runs of one target density, masked and filled,
  with the paper's d26 run (20 epochs of 5,400 steps): how far more steps close the gap.
Needs matplotlib (not a dependency of the project: `pip install matplotlib`).
"""
import argparse
import json
import sys
from pathlib import Path

# the paper's BERT-base points (docs/paper.md), each against its own teacher: (speed-up, F1 lost, label) and
# (pruning steps: 20 epochs of 5,400, F1 lost, label)
PAPER_POINTS = [(2.44, 88.5 - 87.71, "hybrid filled, d26"), (1.84, 88.5 - 88.72, "hybrid filled, d41"),
                (3.64, 88.5 - 85.52, "struct, d14")]
PAPER_BUDGET = (20 * 5400, 88.5 - 87.71, "paper, d26 filled")


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        sys.exit("error: matplotlib is not installed (pip install matplotlib)")


def series(r):
    """Which of our series a run belongs to, by what it pruned to."""
    a = r.get("args") or {}
    d = a.get("target_density")
    d = d[0] if isinstance(d, list) else d  # results.json of runs made when --target_density took several values
    if a.get("target_speedup"):
        return f"ours, target speed-up {a['target_speedup']:g}x"
    if d:
        return f"ours, target density {100 * d:g} %"
    return "ours, the paper's fixed threshold"


def label(name, r):
    """A point's label: the run's name, or for the paper's fixed threshold its lambda (not 'paper': they are ours)."""
    a = r.get("args") or {}
    return f"lambda {a['final_lambda']:g}" if series(r).endswith("fixed threshold") and "final_lambda" in a else name


def place_labels(fig, ax, points):
    """Each label beside its point, at the first of a few offsets where it covers no label placed before and no
    point, inside the axes: points close together get their labels stacked instead of printed over each other."""
    renderer, inside = fig.canvas.get_renderer(), ax.get_window_extent()
    dots = [ax.transData.transform((x, y)) for x, y, _ in points]
    offsets = [(5, 3), (5, -11), (-5, 3), (-5, -11), (5, 13), (5, -21), (-5, 13), (-5, -21), (5, 23), (5, -31)]
    placed = []
    for x, y, text in points:
        for dx, dy in offsets:
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8,
                            ha="left" if dx > 0 else "right")
            box = t.get_window_extent(renderer)
            if (inside.x0 < box.x0 and box.x1 < inside.x1 and not any(box.overlaps(b) for b in placed)
                    and not any(box.contains(*d) for d in dots)):
                break
            t.remove()
        else:  # no free place: the first one
            t = ax.annotate(text, (x, y), textcoords="offset points", xytext=offsets[0], fontsize=8)
            box = t.get_window_extent(renderer)
        placed.append(box)


def plot_speedup(runs, path):
    """F1 lost against the dense teacher, per measured speed-up: our runs by what they pruned to, and the paper's
    for reference (each against its own teacher, since the base models differ)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {}
    for name, r in runs.items():  # speedup_cpu: re-timed on this CPU by bench.py --study
        groups.setdefault(series(r), []).append((r.get("speedup_cpu", r["speedup"]),
                                                 r["teacher"]["f1"] - r["filled"]["f1"], label(name, r)))
    groups["paper, BERT-base (GPU)"] = PAPER_POINTS
    markers = {"paper, BERT-base (GPU)": "s"}
    for key, points in sorted(groups.items(), key=lambda g: g[0].startswith("paper")):
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], markers.get(key, "o"), label=key)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="speed-up over the dense teacher", ylabel="F1 lost against the dense teacher")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.canvas.draw()  # the axes' final size, which the labels' places depend on
    place_labels(fig, ax, [p for points in groups.values() for p in points])
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_budget(runs, path):
    """F1 lost against the dense teacher per pruning steps, one line per target density (masked: hollow, filled:
    solid). Runs without a target density or without steps in their metrics are left out."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    by_density = {}  # one line per target density and dead-head gate
    for name, r in runs.items():
        a = r.get("args") or {}
        d, steps = a.get("target_density"), r["pruned"].get("steps")
        if isinstance(d, list):  # results.json of runs made when --target_density took several values
            d = d[0]
        if d and steps:
            key = (d, "" if a.get("gate_dead_heads", "always") == "always" else ", gated at eval only")
            by_density.setdefault(key, []).append((steps, r["teacher"]["f1"] - r["pruned"]["f1"],
                                                   r["teacher"]["f1"] - r["filled"]["f1"], name))
    for (d, gate), points in sorted(by_density.items()):
        points.sort()
        x = [p[0] for p in points]
        line, = ax.plot(x, [p[2] for p in points], "o-", label=f"ours, {100 * d:g} %{gate}, filled")
        ax.plot(x, [p[1] for p in points], "o--", mfc="none", color=line.get_color(),
                label=f"ours, {100 * d:g} %{gate}, masked")
    ax.plot(*PAPER_BUDGET[:2], "s", label=f"{PAPER_BUDGET[2]} (BERT-base, 88k questions)")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="pruning steps (batch 16)", ylabel="F1 lost against the dense teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    place_labels(fig, ax, [(steps, lost, name) for points in by_density.values() for steps, _, lost, name in points])
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output directories of finished --stage all runs")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where the PNGs go")
    args = p.parse_args(argv)
    out, runs = args.out, {}
    short = len({d.name for d in args.runs}) == len(args.runs)  # label by the directory's name when that is unique
    for d in args.runs:
        try:
            name = d.name if short else f"{d.parent.name}/{d.name}"
            runs[name] = json.loads((d / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {d / 'results.json'}: expected the results of a finished --stage all run ({e})")
    plot_speedup(runs, out / "f1-speedup.png")
    plot_budget(runs, out / "budget.png")
    print(f"wrote {out / 'f1-speedup.png'} and {out / 'budget.png'}")


if __name__ == "__main__":
    main()
