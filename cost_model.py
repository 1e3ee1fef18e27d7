"""
(ours) The cost model of --target_speedup: what a head, an FFN unit and the rest of a BERT cost, counted in FLOPs
(flop_costs) or timed on a device (measure_costs, fit by fit_costs). Pruning to a speed-up S is pruning to a
target density of this cost (keep_fraction): blockprune.py weighs each head and unit by its cost instead of its
parameters, and the report predicts the speed-up by it (predicted_speedup).

A cost table is a dict {"head": ..., "unit": ..., "fixed": ...} in one unit (FLOPs, or seconds per batch), with
the sizes of the model it was measured for. docs/design.md says why, docs/speed.md how well it predicts.

Imports bert.py (the layers it times).
"""
import math
import time
from dataclasses import replace

import torch

from bert import Bert, Layer

COST_KEYS = ("hidden_size", "attention_head_size", "num_hidden_layers", "head", "unit", "fixed")  # of a measured table


def keep_fraction(speedup, dense, cost):
    """What a target speed-up S keeps: the fraction of the prunable cost (the heads' and units' cost in the dense
    model of config `dense`) for which the whole model, fixed costs included, costs 1 / S of the dense one:
    fixed + kept = (fixed + prunable) / S, i.e. 1 / S with FLOPs (fixed 0). blockprune.PruneConfig's target_density,
    with this cost. A target the fixed costs leave out of reach (S >= total / fixed) is refused, with the largest
    S there is."""
    total, fixed = model_cost(dense, cost), cost["fixed"]
    if speedup * fixed >= total:
        raise ValueError(f"--target_speedup {speedup:g}: what no pruning removes (embeddings, LayerNorms, the "
                         f"task's head, each layer's constant) takes {100 * fixed / total:.1f} % of the dense model's "
                         f"measured time: the reachable speed-ups are below {total / fixed:.2f}x")
    return (total / speedup - fixed) / (total - fixed)


def model_cost(config, cost):
    """A model's cost under a cost model: fixed + head x its heads + unit x its FFN units."""
    heads, units = sum(config.num_attention_heads), sum(config.intermediate_size)
    return cost["fixed"] + cost["head"] * heads + cost["unit"] * units


def predicted_speedup(config, dense, cost):
    """The dense model's cost over the cost of the model of `config`, under a cost model."""
    return model_cost(dense, cost) / max(1e-30, model_cost(config, cost))


# ---- FLOPs counted -------------------------------------------------------------------------------------------------

def head_and_unit_flops(config, T):
    """(FLOPs of one attention head, of one FFN unit) for one sequence of T tokens, a FLOP being half a
    multiply-add. A head: its rows of Q, K, V and its columns of the output projection (4 T hs h multiply-adds),
    QK^T and attention x V (2 T^2 hs); a unit: its FFN-in row and FFN-out column (2 T h). Biases, softmax, GELU,
    LayerNorms, embeddings and a task's head are left out (under 1 % of BERT-base's at T = 384): every FLOP counted
    belongs to a head or a unit, so pruning can remove all of them and the predicted speed-up is the ratio."""
    h, hs = config.hidden_size, config.attention_head_size
    return 2 * (4 * T * hs * h + 2 * T * T * hs), 2 * 2 * T * h


def flop_costs(config, T):
    """The FLOP cost model at length T: head_and_unit_flops, and no fixed cost."""
    head, unit = head_and_unit_flops(config, T)
    return {"cost_model": "flops", "head": head, "unit": unit, "fixed": 0}


def encoder_flops(config, T):
    """The encoder's FLOPs for one sequence of T tokens: 70.7 G for BERT-base at T = 384, 19.5 G for the
    paper's d26 structure (3.62x fewer, against the 2.44x the paper measured on a GPU)."""
    return model_cost(config, flop_costs(config, T))


# ---- seconds measured ----------------------------------------------------------------------------------------------

@torch.no_grad()
def measure_costs(config, device, dtype=torch.float32, batch=128, seq_len=384, reps=3):
    """The measured cost model, as latency-aware pruning builds it (a table of measured latencies per structure:
    Kwon et al. 2022; ZipLM, Kurtic et al. 2023): on `device`, in `dtype` (the modules cast to it, as evaluation
    runs a model: train_squad.predict), the seconds of one forward of batch x seq_len tokens, padded as the dev
    evaluation's batches are, through an encoder layer of config's sizes with h heads and n FFN units over a grid:
    h = 0, H/8, H/4, H/2, H without FFN, n = N/8 .. N (multiples of 8, as compact() leaves the widths) without
    attention, and both together (H/8 with N/8 .. H with N), denser at the narrow end where pruned models live (on
    this repository's CPU an FFN unit costs less there); and through the parts outside the layers (the embeddings:
    an encoder of 0 layers; a task's head, a few outputs per token, is left out). Least squares fits, over the grid,
    seconds = base + (h > 0) attention + h x head + (n > 0) ffn + n x unit: a slope per head and per unit, and per
    layer a constant (LayerNorms, residuals: base) plus one for attention and one for the FFN (what they cost whatever
    their width: narrow matrix products run below the speed of wide ones). The per-layer constant base + attention
    + ffn, a layer keeping some heads and some units, and the outside make the fixed cost that no pruning removes
    (a layer left with no heads or no units is then predicted slower than it is, by attention or ffn). The points
    with both parts pin that constant where pruned layers are: with the dense layer the only one, an error there
    moved a 6-layer model's fixed cost six-fold (docs/speed.md, "A miss"). The structures take turns, reversed every
    other round; the fastest of `reps` rounds after a warm-up round counts (a busy machine only adds time), and
    while fit_costs refuses the timings as noise, one round more, up to 3 x reps."""
    H, N = max(config.num_attention_heads), max(config.intermediate_size)
    heads, units = [H * k // 8 for k in (1, 2, 4, 8)], [-(-k * N // 64) * 8 for k in (1, 2, 4, 8)]
    grid = dict.fromkeys([(0, 0)] + [(h, 0) for h in heads] + [(0, n) for n in units]  # (heads, units), each once
                         + [(h, n) for h, n in zip(heads, units) if h])
    torch.manual_seed(0)
    ids = torch.randint(config.vocab_size, (batch, seq_len), device=device)
    lengths = seq_len - torch.arange(batch, device=device) % (seq_len // 2)  # from seq_len down: a padded batch
    attend = torch.arange(seq_len, device=device) < lengths[:, None]  # (B, T)
    x = torch.randn(batch, seq_len, config.hidden_size, device=device, dtype=dtype)  # the hidden states between layers
    outside = Bert(replace(config, num_hidden_layers=0, num_attention_heads=[], intermediate_size=[]))
    outside = outside.to(device, dtype).eval()
    mask = attend.long()
    runs = {"outside": lambda: outside(ids, mask)}
    attend = attend[:, None, None, :]  # (B, 1, 1, T), as Bert passes it to its layers
    for h, n in grid:
        runs[h, n] = lambda layer=Layer(config, h, n).to(device, dtype).eval(): layer(x, attend)
    seconds = {k: float("inf") for k in runs}
    for r in range(3 * reps + 1):  # a warm-up round, `reps` rounds, and more while the fit is refused as noise
        for k, run in list(runs.items())[::1 if r % 2 else -1]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if r:
                seconds[k] = min(seconds[k], time.perf_counter() - t)
        if r < reps:
            continue
        try:
            costs = fit_costs(seconds, config.num_hidden_layers)
            break
        except ValueError:  # noise: a round more, whose fastest can only come closer to the quiet machine's times
            if r == 3 * reps:
                raise
    return {"cost_model": "measured", "hidden_size": config.hidden_size,
            "attention_head_size": config.attention_head_size, "num_hidden_layers": config.num_hidden_layers,
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "batch": batch, "seq_len": seq_len,
            "unit_of_cost": "seconds per batch", "rounds": r, **costs}


def fit_costs(seconds, layers):
    """The cost model from timings {(heads, FFN units): seconds of a layer, ..., "outside": seconds}: the least
    squares fit of measure_costs, and the fixed cost of a model of that many layers."""
    grid = [k for k in seconds if k != "outside"]
    a = torch.tensor([[1.0, h > 0, n > 0, h, n] for h, n in grid], dtype=torch.float64)
    y = torch.tensor([seconds[k] for k in grid], dtype=torch.float64)[:, None]
    base, attention, ffn, head, unit = torch.linalg.lstsq(a, y).solution[:, 0].tolist()
    if not (head > 0 and unit > 0):  # noise larger than what a head or a unit costs
        raise ValueError(f"cost model: the layer's time does not grow with its heads and units ({head:.3g} s a head, "
                         f"{unit:.3g} s a unit): time it on a quieter machine or at a larger batch")
    layer = base + attention + ffn
    if layer < 0:  # a fixed cost below the outside's: the noise of the timings, not a layer that costs nothing
        raise ValueError(f"cost model: a layer's fixed cost came out negative ({layer:.3g} s): time it on a quieter "
                         "machine or at a larger batch")
    return {"head": head, "unit": unit, "fixed": seconds["outside"] + layers * layer, "layer": layer,
            "layer_parts": {"base": base, "attention": attention, "ffn": ffn}, "outside": seconds["outside"],
            "grid": [[h, n, seconds[h, n]] for h, n in grid]}


def check_cost_table(cost, config=None):
    """Refuses (ValueError) a cost table that is not one, or (given the model's config) was measured for a model
    of other sizes."""
    def number(x):  # json reads NaN and Infinity, under which every comparison below would pass
        return type(x) in (int, float) and math.isfinite(x)
    if not (isinstance(cost, dict) and all(number(cost.get(k)) for k in COST_KEYS) and number(cost.get("layer", 0))):
        raise ValueError(f"not a cost table: expected a JSON object with the finite numbers {', '.join(COST_KEYS)} "
                         "(as train_squad.py --cost_model measured saves it)")
    bad = [k for k in ("head", "unit") if cost[k] <= 0] + [k for k in ("fixed", "layer") if cost.get(k, 0) < 0]
    if bad:  # what fit_costs refuses, in a table edited or fitted elsewhere: no target could be met by it
        raise ValueError(f"its {bad[0]} cost is {cost[bad[0]]}: expected head and unit costs above 0, fixed and "
                         "layer costs not below 0")
    for k in COST_KEYS[:3] if config is not None else ():
        if cost[k] != getattr(config, k):
            raise ValueError(f"measured for a model of {k} {cost[k]}, this model has {getattr(config, k)}")
    return cost
