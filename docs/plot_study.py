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


def plot_speedup(runs, path):
    """F1 lost against the dense teacher, per measured speed-up: our runs, and the paper's for reference (each
    against its own teacher, since the base models differ)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    # speedup_cpu: re-timed on this CPU by bench.py --study (runs trained on a GPU, or several at once)
    ours = sorted((r.get("speedup_cpu", r["speedup"]), r["teacher"]["f1"] - r["filled"]["f1"], name)
                  for name, r in runs.items())
    ax.plot([x for x, _, _ in ours], [y for _, y, _ in ours], "o", label="ours (this study)")
    ax.plot([x for x, _, _ in PAPER_POINTS], [y for _, y, _ in PAPER_POINTS], "s", label="paper, BERT-base (GPU)")
    for x, y, name in ours + PAPER_POINTS:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="speed-up over the dense teacher", ylabel="F1 lost against the dense teacher")
    ax.legend()
    fig.tight_layout()
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
        for steps, _, lost, name in points:
            ax.annotate(name, (steps, lost), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot(*PAPER_BUDGET[:2], "s", label=f"{PAPER_BUDGET[2]} (BERT-base, 88k questions)")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="pruning steps (batch 16)", ylabel="F1 lost against the dense teacher")
    ax.legend(fontsize=8)
    fig.tight_layout()
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
