"""
(ours) What pruning left, in numbers and pictures: the structure the masks keep, the pruning part of a training
log line, the report of a compacted model (report.json: heads, FFN units, parameters, FLOPs, predicted speed-up),
and the head-pruning picture (heads.png) that shows the paper's finding: blocks remove whole heads.

Imports blockprune.py and cost_model.py; matplotlib, for the pictures, only where it is installed.
"""
import io
from dataclasses import replace

import torch

import blockprune as bp
import cost_model as cm

@torch.no_grad()
def structure(masked, threshold=None):
    """What the masks leave: per layer heads and FFN units alive, and the density of the linear weights before
    compaction (zeros counted out) and after it (zeros inside survivors counted in)."""
    m = masked.masks(threshold, gate=True)
    heads, units, attn, ffn = [], [], 0, 0
    for i, layer in enumerate(masked.layers):
        p = f"bert.layers.{i}."
        heads.append(int(bp.heads_alive({n: m[p + n + ".weight"] for n in bp.ATTENTION}, layer.heads).sum())
                     if layer.heads else 0)
        units.append(int(m[p + "ffn_in.bias"].sum()))
        attn += sum(int(m[p + n + ".weight"].sum()) for n in bp.ATTENTION)
        ffn += 2 * units[-1] * layer.ffn_in.in_features
    c = masked.model.bert.config
    attn_total = 4 * sum(c.num_attention_heads) * c.attention_head_size * c.hidden_size
    ffn_total = 2 * sum(c.intermediate_size) * c.hidden_size
    compact = bp.linear_params(replace(c, num_attention_heads=heads, intermediate_size=units))
    return {"heads": heads, "ffn": units, "attention_density": attn / max(1, attn_total),
            "ffn_density": ffn / max(1, ffn_total), "density": (attn + ffn) / (attn_total + ffn_total),
            "compact_density": compact / (attn_total + ffn_total)}


@torch.no_grad()
def heads_alive_at(masked, threshold):
    """(all heads,) booleans, layer after layer: the heads that compaction would keep at this threshold."""
    if masked.config.pruning_method == "sigmoid":
        return bp.head_death_thresholds(masked) > threshold
    m = masked.masks(threshold, gate=False)  # topk: the top of each matrix, whatever the scores' values
    return torch.cat([bp.heads_alive({n: m[f"bert.layers.{i}.{n}.weight"] for n in bp.ATTENTION}, layer.heads)
                      for i, layer in enumerate(masked.layers) if layer.heads] or [torch.zeros(0, dtype=bool)])


@torch.no_grad()
def score_stats(masked):
    """((mean, std) of the attention scores, (mean, std) of the FFN scores): whether the regulariser or the
    task gradient has the upper hand shows in how far and how unevenly the scores move from 0."""
    out = []
    for ffn in (False, True):
        s = [v.flatten() for k, v in masked.scores.items() if k.endswith("_ffn") == ffn]
        s = torch.cat(s) if s else torch.zeros(1)
        out.append((s.mean().item(), s.std(correction=0).item()))
    return out


def pruning_state(masked, step, died=0, revived=0):
    """What a training log line says of the pruning after `step` steps: threshold, lambda, densities, heads alive
    (and how many died or came back, counted by the caller), and the scores' spread (score_stats)."""
    s, (attn, ffn) = structure(masked), score_stats(masked)
    return (f"threshold {masked.threshold:.4f} lambda {bp.lambda_schedule(step - 1, masked.config):.3g}"
            f" | density attn {100 * s['attention_density']:.1f}% ffn {100 * s['ffn_density']:.1f}%"
            f" compact {100 * s['compact_density']:.1f}% | heads {sum(s['heads'])}/"
            f"{sum(masked.model.bert.config.num_attention_heads)} (died {died}, came back {revived})"
            f" | scores attn {attn[0]:+.3f}±{attn[1]:.3f} ffn {ffn[0]:+.3f}±{ffn[1]:.3f}")


# ---- the report of a compacted model --------------------------------------------------------------------------------

def zero_units(layer):
    """FFN units whose row, bias and column are all zero: compact()'s padding to a multiple of 8."""
    live = (layer.ffn_in.weight != 0).any(1) | (layer.ffn_in.bias != 0) | (layer.ffn_out.weight != 0).any(0)
    return int((~live).sum())


def compact_report(model, dense_config, seq_len=384, cost=None):
    """Per layer heads and FFN units kept, linear parameters kept (of the dense model's), total parameters, and
    the encoder's FLOPs for one sequence of seq_len tokens: the dense model's over these is the FLOP model's
    predicted speed-up. Units and FLOPs are those of the structure pruning left: the all-zero units that round each
    FFN width up to a multiple of 8 are counted apart (ffn_padding, padding_params), and so are their FLOPs
    (flops_padding). predicted_speedup is the run's cost model's (cost_model): the FLOPs', or with a measured cost
    table (measure_costs) its time, of the model as it runs, padding included (it takes time)."""
    c = model.bert.config
    pad = [zero_units(layer) for layer in model.bert.layers]
    real = replace(c, intermediate_size=[f - p for f, p in zip(c.intermediate_size, pad)])
    rows = [{"layer": i, "heads": n, "ffn": f, "ffn_padding": p,
             "linear_params": 4 * n * c.attention_head_size * c.hidden_size + 2 * f * c.hidden_size}
            for i, (n, f, p) in enumerate(zip(c.num_attention_heads, real.intermediate_size, pad))]
    kept, dense = bp.linear_params(real), bp.linear_params(dense_config)
    flops, flops_dense = cm.encoder_flops(real, seq_len), cm.encoder_flops(dense_config, seq_len)
    speedup_flops = flops_dense / max(1, flops)
    measured = cost is not None and cost.get("cost_model") == "measured"
    return {"layers": rows, "heads": sum(c.num_attention_heads), "heads_dense": sum(dense_config.num_attention_heads),
            "linear_params": kept, "linear_params_dense": dense, "linear_density": kept / dense,
            "padding_params": bp.linear_params(c) - kept, "flops_padding": cm.encoder_flops(c, seq_len) - flops,
            "total_params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len, "flops": flops,
            "flops_dense": flops_dense, "cost_model": "measured" if measured else "flops",
            "predicted_speedup_flops": speedup_flops,
            "predicted_speedup": cm.predicted_speedup(c, dense_config, cost) if measured else speedup_flops}


def format_report(r):
    lines = ["layer  heads   ffn   pad  linear params"]
    lines += [f"{x['layer']:>5} {x['heads']:>6} {x['ffn']:>5} {x.get('ffn_padding', 0):>5} {x['linear_params']:>14,}"
              for x in r["layers"]]
    lines.append(f"total {r['heads']:>6}/{r['heads_dense']}  linear params {r['linear_params']:,} of "
                 f"{r['linear_params_dense']:,} ({100 * r['linear_density']:.1f} %), all params {r['total_params']:,}")
    if r.get("padding_params"):
        lines.append(f"FFN widths padded to multiples of 8 with zero units: {r['padding_params']:,} more linear "
                     f"params, {r['flops_padding'] / max(1, r['flops']):.1%} more FLOPs (counted apart)")
    lines.append(f"encoder at length {r['seq_len']}: {r['flops'] / 1e9:.3g} of {r['flops_dense'] / 1e9:.3g} GFLOP, "
                 f"predicted speed-up {r['predicted_speedup_flops']:.2f}x (FLOPs)")
    if r["cost_model"] == "measured":
        lines.append(f"predicted speed-up {r['predicted_speedup']:.2f}x (measured cost model)")
    return "\n".join(lines)


@torch.no_grad()
def head_pruning_stats(masked):
    """Does block pruning remove whole heads (the paper's Sec. 5 finding)? At the final threshold, gated: per layer
    which heads live and the FFN units kept, the heads removed whole, and the attention weights pruned: those whose
    mask is 0 plus every weight of a removed head (compaction cuts it all, even blocks its masks kept), and how
    many of these lie in removed heads rather than in the zeros left inside surviving ones."""
    m = masked.masks(masked.config.final_threshold, gate=True)
    alive, ffn, pruned, in_removed = [], [], 0, 0
    for i, layer in enumerate(masked.layers):
        p = f"bert.layers.{i}."
        ffn.append(int(m[p + "ffn_in.bias"].sum()))
        if not layer.heads:
            alive.append([])
            continue
        w = {n: m[p + n + ".weight"] for n in bp.ATTENTION}
        live = bp.heads_alive(w, layer.heads)
        head = 4 * layer.head_size * masked.model.bert.config.hidden_size  # one head's weights in Q, K, V and output
        zeros = sum((w[n].t() if n == "attn_out" else w[n]).reshape(layer.heads, -1).eq(0).sum(1)
                    for n in bp.ATTENTION)
        pruned += int(zeros[live].sum()) + head * int((~live).sum())
        in_removed += head * int((~live).sum())
        alive.append(live.tolist())
    removed = sum(not a for layer in alive for a in layer)
    return {"alive": alive, "ffn": ffn, "heads_removed": removed, "heads_total": sum(map(len, alive)),
            "attention_pruned": pruned, "attention_pruned_in_removed_heads": in_removed,
            "fraction_in_removed_heads": in_removed / max(1, pruned)}


# ---- pictures --------------------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing into files; None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def png(plt, fig):
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def plot_report(r, speedup=None):
    """Bars of heads and FFN width per layer, as PNG bytes, titled with the predicted speed-up (and the measured
    one, when given); None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    layers = [x["layer"] for x in r["layers"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.bar(layers, [x["heads"] for x in r["layers"]], color="tab:blue")
    a.set(title="attention heads kept", xlabel="layer")
    b.bar(layers, [x["ffn"] for x in r["layers"]], color="tab:orange")
    b.set(title="FFN units kept", xlabel="layer")
    fig.suptitle(f"{100 * r['linear_density']:.1f} % of linear parameters kept; speed-up {r['predicted_speedup']:.2f}x"
                 f" predicted ({r['cost_model']})" + (f", {speedup:.2f}x measured" if speedup else ""))
    fig.tight_layout()
    return png(plt, fig)


@torch.no_grad()
def plot_masks(masked):
    """The head-pruning picture, as a PNG: per layer (rows) the Q, K, V and output masks at the final threshold,
    head boundaries drawn (a head is a band of rows of Q, K, V and a band of columns of the output), blocks kept
    in surviving heads, blocks kept in removed heads (compaction cuts them) and pruned blocks in three colours,
    and a strip of the FFN units kept. As PNG bytes; None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    s, m = head_pruning_stats(masked), masked.masks(masked.config.final_threshold, gate=True)
    colours = ["white", "#f4a582", "#2166ac"]  # 0 pruned, 1 kept in a removed head, 2 kept
    cmap, layers = ListedColormap(colours), masked.layers
    fig, axes = plt.subplots(len(layers), 5, figsize=(11, 2.1 * len(layers) + 1.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.6]})
    for i, layer in enumerate(layers):
        p, live = f"bert.layers.{i}.", torch.tensor(s["alive"][i], dtype=torch.bool)
        for j, (name, title) in enumerate(zip(bp.ATTENTION, ("Q", "K", "V", "output"))):
            w = m[p + name + ".weight"].float()  # (out_features, in_features)
            out = name == "attn_out"
            band = live.repeat_interleave(layer.head_size).float() + 1  # per head row (column of the output)
            a = axes[i, j]
            a.imshow((w * (band[None, :] if out else band[:, None])).numpy(), cmap=cmap, vmin=0, vmax=2,
                     interpolation="nearest", aspect="auto")
            for h in range(1, layer.heads):  # head boundaries
                (a.axvline if out else a.axhline)(h * layer.head_size - 0.5, color="black", lw=0.6)
            a.set_xticks([]), a.set_yticks([])
            a.set_title(f"{title} (heads = {'columns' if out else 'rows'})" if i == 0 else title, fontsize=9)
        axes[i, 0].set_ylabel(f"layer {i}\n{int(live.sum())}/{layer.heads} heads", fontsize=9)
        units = m[p + "ffn_in.bias"].float()  # (ffn,) one mask per unit
        a = axes[i, 4]
        a.imshow(2 * units[:, None].numpy(), cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        a.set_xticks([]), a.set_yticks([])
        a.set_title(f"FFN units: {s['ffn'][i]}/{units.numel()}", fontsize=9)
    fig.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=t) for c, t in
                        zip(colours[::-1], ("kept", "kept, but its head is removed whole", "pruned"))],
               loc="lower center", ncol=3, fontsize=9, frameon=False)
    f = s["fraction_in_removed_heads"]
    fig.suptitle(f"{s['heads_removed']}/{s['heads_total']} heads removed whole; of the attention weights pruned, "
                 f"{100 * f:.1f} % lie in removed heads, {100 * (1 - f):.1f} % in surviving ones", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    return png(plt, fig)
