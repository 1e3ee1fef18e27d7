"""
Block movement pruning (Lagunas, Charlaix, Sanh, Rush, "Block Pruning For Faster Transformers",
EMNLP 2021, arXiv 2109.04838), in one file.

The method, top to bottom:
  1. scores: one learnable score per block of each attention matrix (Q, K, V, output; 32x32
     blocks by default) and one per FFN unit, shared by its FFN-in row and FFN-out column
     ("hybrid", Sec. 3 of the paper);
  2. masks: a block is kept while sigmoid(score) > threshold, with a straight-through estimator
     so that the scores learn from the task loss (movement pruning, Sanh et al. 2020);
  3. schedule: the threshold rises cubically from 0 to its final value and the L1 regulariser
     on sigmoid(scores) is weighted by lambda, which rises on the same ramp;
  4. distillation from a fine-tuned teacher (Sec. 4);
  5. compaction: dead heads and FFN units are cut out, giving a smaller dense BERT whose outputs
     equal the masked model's; "filled" fine-tuning then lets the surviving heads use all weights.
Then what is ours, not the paper's:
  6. a target density (or speed-up) instead of a final threshold: the threshold that keeps the scheduled
     fraction of the linear parameters (or of a cost model's time: FLOPs counted, or seconds measured per head
     and FFN unit), and what training reports (heads alive, the scores' spread).
  Three more pieces of ours sit where they act, each marked "(ours)": the dead-head gate in
  MaskedBert.group_masks (section 2), the layers' scores stacked per group of one shape (layer_groups, section 1:
  fewer operations per step, same values) and the FFN widths rounded up to multiples of 8 in compact (section 5);
and last the report, the pictures and the checkpoints of a masked model.

Imports only bert.py; knows nothing of SQuAD.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert import BertForQuestionAnswering, Layer, finish_write, read_safetensors, safetensors_bytes

ATTENTION = ("query", "key", "value", "attn_out")  # the four attention matrices of a layer
COST_KEYS = ("hidden_size", "attention_head_size", "num_hidden_layers", "head", "unit", "fixed")  # of a cost table


@dataclass
class PruneConfig:
    block: str = "32x32"  # attention blocks: "RxC", "1x1" (unstructured), "row", "col" or "head"
    # "sigmoid": keep a block while sigmoid(score) > threshold; "topk": the top (1 - threshold) of each matrix
    pruning_method: str = "sigmoid"
    final_threshold: float = 0.1  # tau_f
    final_lambda: float = 20.0  # lambda_f; lambda(t) = lambda_f * ramp(t), the paper's lambda_f * tau(t) / tau_f
    attention_lambda: float = 1.0  # weight of the attention masks in the regulariser
    ffn_lambda: float = 0.25  # weight of the FFN masks
    warmup_steps: int = 0  # threshold 0 for these steps (the reference's "initial_warmup")
    # then the cubic rise (the reference's total steps - initial_warmup - final_warmup); then tau_f to the end
    # (the reference's "final_warmup" steps)
    ramp_steps: int = 1
    target_density: float | None = None  # instead of tau_f: the threshold that keeps this density of linear params
    target_speedup: float | None = None  # instead of tau_f: the threshold that makes the cost model's time 1 / this
    seq_len: int = 384  # the sequence length at which target_speedup counts FLOPs (--max_seq_length)
    cost: dict | None = None  # the cost model: None counts FLOPs; a measure_costs table weighs by measured time
    # A head whose Q or K is all pruned gets its V masked too: "eval" only when not training (as the reference,
    # where such a head attends uniformly while training, its scores keep learning and it can come back; it
    # kept 0.3 to 0.7 more F1 in docs/study.md), "always" in training too (no task gradient reaches the
    # head, which cannot come back). Evaluation, compaction and the saved model always gate.
    gate_dead_heads: str = "eval"

    def __post_init__(self):
        if self.pruning_method not in ("sigmoid", "topk"):
            raise ValueError(f"--pruning_method: 'sigmoid' or 'topk', got {self.pruning_method!r}")
        if self.gate_dead_heads not in ("always", "eval"):
            raise ValueError(f"--gate_dead_heads: 'always' or 'eval', got {self.gate_dead_heads!r}")
        if not 0 <= self.final_threshold < 1:
            raise ValueError(f"--final_threshold must be in [0, 1), got {self.final_threshold}")
        if self.target_density is not None:
            if not 0 < self.target_density <= 1:
                raise ValueError(f"--target_density must be in (0, 1], got {self.target_density}")
            if self.pruning_method != "sigmoid":
                raise ValueError("--target_density needs --pruning_method sigmoid")
        if self.target_speedup is not None:
            if not self.target_speedup >= 1:
                raise ValueError(f"--target_speedup must be at least 1, got {self.target_speedup}")
            if self.target_density is not None:
                raise ValueError("--target_density and --target_speedup exclude each other: give one")
            if self.pruning_method != "sigmoid":
                raise ValueError("--target_speedup needs --pruning_method sigmoid")
        if self.cost is not None:
            check_cost_table(self.cost)


# ---- 1. blocks and scores ------------------------------------------------------------------------

def block_shape(block, name, weight_shape, head_size):
    """The (rows, cols) of one block of a weight matrix; a weight is (out_features, in_features)."""
    R, C = weight_shape
    if block == "head":  # a head is a band of rows of Q, K, V and a band of columns of the output
        shape = (R, head_size) if name == "attn_out" else (head_size, C)
    elif block == "row":
        shape = (1, C)
    elif block == "col":
        shape = (R, 1)
    else:
        try:
            shape = tuple(int(x) for x in block.split("x"))
            assert len(shape) == 2 and min(shape) > 0
        except (ValueError, AssertionError):
            raise ValueError(f"--block: 'RxC' (e.g. 32x32), 'row', 'col' or 'head'; got {block!r}") from None
    if R % shape[0] or C % shape[1]:
        raise ValueError(f"--block {block}: blocks of {shape[0]}x{shape[1]} do not divide the {name} matrix {R}x{C}")
    return shape


def expand(block_mask, weight_shape):
    """(..., R/bh, C/bw) block mask -> (..., R, C) mask, each value repeated over its block (... : layers stacked)."""
    *n, r, c = block_mask.shape
    R, C = weight_shape
    if not r or not c:  # a matrix of a layer with 0 heads or 0 FFN units
        return block_mask.new_zeros((*n, R, C))
    return block_mask[..., :, None, :, None].expand(*n, r, R // r, c, C // c).reshape(*n, R, C)


def layer_groups(masked):
    """(ours) The layers in groups of one shape (the same heads and FFN width; a dense model's layers are one
    group). The pruning code works on each group's scores stacked (`stacked`): a training step then runs each
    operation of the masks, the regulariser and the threshold once for all layers instead of once per layer. Same
    values; what it saves is launches: a GPU waits about as long for each launch as a small kernel runs, and the
    per-layer loop made a pruning step 4x the operations of a dense step (bench.py counts them)."""
    groups = {}
    for i, layer in enumerate(masked.model.layers):
        groups.setdefault((layer.heads, layer.ffn_in.out_features), []).append(i)
    return list(groups.values())


def stacked(masked, layers, name):
    """The scores of matrix `name` ("query" ... "attn_out", "ffn") of these layers: (layers, *one layer's shape)."""
    return torch.stack([masked.scores[f"layer{i}_{name}"] for i in layers])


# ---- 2. masks ------------------------------------------------------------------------------------

def binarize(scores, threshold, pruning_method="sigmoid"):
    """0/1 mask with a straight-through gradient: d mask / d scores = 1 (Sanh et al. 2020, Sec. 4).
    This is what makes it *movement* pruning: a score's gradient is then the sum over its block of
    W * dL/d(W * M), so a block's score grows while its weights move away from zero, and shrinks otherwise.
    sigmoid: keep where sigmoid(score) > threshold (threshold 0 keeps everything).
    topk: keep the ceil((1 - threshold) * n) highest scores."""
    if pruning_method == "sigmoid":
        hard = (torch.sigmoid(scores) > threshold).to(scores.dtype)
    else:
        k = math.ceil((1 - threshold) * scores.numel())
        hard = torch.zeros_like(scores).view(-1)
        hard[scores.detach().view(-1).topk(k).indices] = 1
        hard = hard.view_as(scores)
    # (scores - scores.detach()) is exactly 0, so the mask holds exact zeros and ones
    return hard.detach() + (scores - scores.detach())


def any_per_head(mask, heads):
    """(..., R, C) mask -> (..., heads) booleans: does each head's band of rows keep any weight?"""
    return (mask.detach() != 0).reshape(*mask.shape[:-2], heads, -1).any(-1)


def heads_alive(m, heads):
    """Per head: does it still change the output? Its Q, K, V rows and its output columns must each
    keep at least one weight. (A head whose Q or K is all zero would attend uniformly and still add
    the mean of V; MaskedBert switches such heads off so that compaction stays exact.)"""
    return (any_per_head(m["query"], heads) & any_per_head(m["key"], heads) & any_per_head(m["value"], heads)
            & any_per_head(m["attn_out"].transpose(-1, -2), heads))


class MaskedBert(nn.Module):
    """A BertForQuestionAnswering whose encoder matrices are multiplied by masks learnt from scores.
    The model's own parameters are untouched: each forward computes every mask once, multiplies the
    weights by them and runs the model on those products (torch.func.functional_call)."""

    def __init__(self, model, config):
        super().__init__()
        self.model, self.config = model, config
        # training sets tau(t) each step; evaluation uses the schedule's end (end_of_schedule writes it into the config)
        self.threshold = config.final_threshold
        self.scores = nn.ParameterDict()  # the paper initialises the scores at 0; on the weights' device
        for i, layer in enumerate(model.layers):
            for name in ATTENTION:
                w = getattr(layer, name).weight
                bh, bw = block_shape(config.block, name, w.shape, layer.head_size)
                self.scores[f"layer{i}_{name}"] = nn.Parameter(torch.zeros(w.shape[0] // bh, w.shape[1] // bw,
                                                                           device=w.device))
            w = layer.ffn_in.weight
            self.scores[f"layer{i}_ffn"] = nn.Parameter(torch.zeros(w.shape[0], device=w.device))
        keep_fraction(config, model.config)  # a speed-up beyond what the fixed costs allow: refused before training

    def group_masks(self, threshold=None, gate=None):
        """The masks of the weights and biases of every masked Linear, for each group of layers of one shape
        (layer_groups), stacked: [(layers, {"query.weight": (n, R, C) masks, "query.bias": (n, R), ...})].
        The V rows of heads with no Q or K left are masked when `gate` (default: per config.gate_dead_heads) and always
        before the biases are masked, so that their biases go too and compaction can drop such heads."""
        tau = self.threshold if threshold is None else threshold
        gating = (self.config.gate_dead_heads == "always" or not self.training) if gate is None else gate
        out = []
        for group in layer_groups(self):
            layer = self.model.layers[group[0]]
            m = {name: expand(self.binarize_stacked(stacked(self, group, name), tau), getattr(layer, name).weight.shape)
                 for name in ATTENTION}  # (n, R, C)
            if layer.heads and gating:  # (ours) switch off heads with no query or key left, by masking their values
                alive = any_per_head(m["query"], layer.heads) & any_per_head(m["key"], layer.heads)  # (n, heads)
                m["value"] = m["value"] * alive.repeat_interleave(layer.head_size, -1).to(m["value"].dtype)[..., None]
            # hybrid FFN: one score per unit, shared by its FFN-in row and its FFN-out column
            u = self.binarize_stacked(stacked(self, group, "ffn"), tau)  # (n, units)
            m["ffn_in"] = u[:, :, None].expand(-1, *layer.ffn_in.weight.shape)
            m["ffn_out"] = u[:, None, :].expand(-1, *layer.ffn_out.weight.shape)
            masks = {}
            for name, mask in m.items():
                masks[name + ".weight"] = mask
                masks[name + ".bias"] = (mask.detach() != 0).any(-1).to(mask.dtype)  # (n, R): no weight left, no bias
            out.append((group, masks))
        return out

    def masks(self, threshold=None, gate=None):
        """{parameter name: mask of its shape}: group_masks, layer by layer."""
        return {f"layers.{i}.{key}": mask for group, m in self.group_masks(threshold, gate)
                for key, stack in m.items() for i, mask in zip(group, stack.unbind())}

    def binarize_stacked(self, scores, tau):
        """binarize() of a stack of score matrices (n, ...): elementwise for the sigmoid; topk: the top of each."""
        if self.config.pruning_method == "sigmoid":
            return binarize(scores, tau)
        return torch.stack([binarize(s, tau, "topk") for s in scores])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        params = {}
        # each weight times its mask, one product per group of layers (at the price of a copy of the weights, kept for
        # the backward: 340 MB in fp32 for BERT-base)
        for group, m in self.group_masks():
            for key, mask in m.items():
                names = [f"layers.{i}.{key}" for i in group]
                w = torch.stack([self.model.get_parameter(n) for n in names]) * mask  # (n, R, C) or (n, R)
                params.update(zip(names, w.unbind()))
        return torch.func.functional_call(self.model, params, (input_ids, attention_mask, token_type_ids))

    @torch.no_grad()
    def structure(self, threshold=None):
        """What the masks leave: per layer heads and FFN units alive, and the density of the linear
        weights before compaction (zeros counted out) and after it (zeros inside survivors counted in)."""
        m = self.masks(threshold, gate=True)
        heads, units, attn, ffn = [], [], 0, 0
        for i, layer in enumerate(self.model.layers):
            heads.append(int(heads_alive({n: m[f"layers.{i}.{n}.weight"] for n in ATTENTION}, layer.heads).sum())
                         if layer.heads else 0)
            units.append(int(m[f"layers.{i}.ffn_in.bias"].sum()))
            attn += sum(int(m[f"layers.{i}.{n}.weight"].sum()) for n in ATTENTION)
            ffn += 2 * units[-1] * layer.ffn_in.in_features
        c = self.model.config
        attn_total = 4 * sum(c.num_attention_heads) * c.attention_head_size * c.hidden_size
        ffn_total = 2 * sum(c.intermediate_size) * c.hidden_size
        compact = linear_params(replace(c, num_attention_heads=heads, intermediate_size=units))
        return {"heads": heads, "ffn": units, "attention_density": attn / max(1, attn_total),
                "ffn_density": ffn / max(1, ffn_total), "density": (attn + ffn) / (attn_total + ffn_total),
                "compact_density": compact / (attn_total + ffn_total)}


def linear_params(config):
    """The weights of the encoder's Q, K, V, attention-output, FFN-in and FFN-out matrices: the
    paper's count of 'linear parameters' (84,934,656 for BERT-base). No embeddings, biases, LayerNorms."""
    h, hs = config.hidden_size, config.attention_head_size
    return sum(4 * n * hs * h + 2 * f * h for n, f in zip(config.num_attention_heads, config.intermediate_size))


# ---- 3. schedule and regulariser -----------------------------------------------------------------

def ramp(step, config):
    """0 during warm-up, then 1 - (1 - p)^3 over the ramp (p: the fraction of it done), then 1: the
    cubic schedule of Zhu & Gupta 2018, as used by the paper. Threshold, lambda and (with
    target_density or target_speedup) the fraction kept all follow it."""
    if step < config.warmup_steps:
        return 0.0
    p = min(1.0, (step - config.warmup_steps) / max(1, config.ramp_steps))
    return 1 - (1 - p) ** 3


def threshold_schedule(step, config):
    """tau(t) = tau_f * ramp(t): from 0 (nothing pruned) to tau_f."""
    return config.final_threshold * ramp(step, config)


def lambda_schedule(step, config):
    """lambda(t) = lambda_f * ramp(t): the regulariser grows on the threshold's ramp (the paper's
    lambda_f * tau(t) / tau_f under its schedule; with a target density the threshold follows the density instead,
    and lambda still the ramp)."""
    return config.final_lambda * ramp(step, config)


def schedule(step, masked):
    """(threshold, lambda) at a training step. With target_density (target_speedup) the threshold is not
    tau_f * ramp but the one that keeps the scheduled density (fraction of the prunable cost), whatever the scores
    have learnt: lambda then only shapes which blocks win, never how many, and needs no tuning."""
    c, dense = masked.config, masked.model.config
    tau = threshold_schedule(step, c)
    if c.target_density is not None or c.target_speedup is not None:
        tau = threshold_for_density(masked, density_schedule(step, c, keep_fraction(c, dense)),
                                    None if c.target_speedup is None else speed_cost(c, dense))
    return tau, lambda_schedule(step, c)


def end_of_schedule(masked, total_steps):
    """After the last step the threshold of the schedule's end becomes the final one, in the config saved
    with the scores, so that evaluation and compaction use it (with target_density: the threshold found
    for the target, not tau_f)."""
    masked.threshold = float(schedule(total_steps, masked)[0])
    masked.config = replace(masked.config, final_threshold=masked.threshold)


def regularization(masked):
    """L1 of the masks' soft values: the mean of sigmoid(scores), averaged over the attention matrices
    and over the FFN layers, weighted (1.0 attention, 0.25 FFN in the paper's hybrid setting) and the two terms
    averaged (the / 2): the reference implementation's formula (docs/paper.md)."""
    groups = layer_groups(masked)
    attn = torch.cat([torch.sigmoid(stacked(masked, g, n)).flatten(1).mean(1) for g in groups for n in ATTENTION])
    ffn = torch.cat([torch.sigmoid(stacked(masked, g, "ffn")).mean(1) for g in groups])  # (layers,): a mean each
    c = masked.config
    return (c.attention_lambda * attn.mean() + c.ffn_lambda * ffn.mean()) / 2


# ---- 4. distillation -----------------------------------------------------------------------------

def distillation_loss(start, end, teacher_start, teacher_end, start_positions, end_positions,
                      temperature=2.0, alpha_distil=0.9, alpha_ce=0.1):
    """alpha_distil * KL(teacher || student) at temperature T, times T^2 (Hinton et al. 2015), averaged
    over start and end, plus alpha_ce * the usual start/end cross-entropy."""
    T = temperature
    kd = sum(F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
             for s, t in ((start, teacher_start), (end, teacher_end))) * T ** 2 / 2
    ce = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
    return alpha_distil * kd + alpha_ce * ce


def param_groups(masked, lr, scores_lr, weight_decay=0.0):
    """AdamW groups: the model's weights at lr, the scores at their own (much larger) lr, never decayed."""
    return [{"params": list(masked.model.parameters()), "lr": lr, "weight_decay": weight_decay},
            {"params": list(masked.scores.parameters()), "lr": scores_lr, "weight_decay": 0.0}]


# ---- 5. compaction and filling -------------------------------------------------------------------

@torch.no_grad()
def compact(masked, multiple=8):
    """Bake the masks (at the final threshold) into the weights and cut out what they killed: heads
    that no longer change the output and FFN units whose row and column are masked. The result is a
    plain BertForQuestionAnswering with per-layer head counts and FFN widths; a layer may keep 0 heads.
    (ours) Each FFN width is rounded up to a multiple of `multiple` with all-zero units (GELU(0) = 0: they add
    nothing), the widths that half-precision matrix products want (tensor cores; on an H200 in bf16 d26 ran
    1.67x dense with them, 1.22x without: docs/speed.md). report() counts them apart; fill() gives them noise, so
    that the filled model trains them as units of its own.
    Why its outputs equal the masked model's exactly: a head with no Q or K left would attend uniformly
    and add the mean of its V, so `group_masks` gates it off through its V (and must do so before it masks
    the biases, so that the V biases go too); a head with no V or no output columns adds nothing; and
    the biases of removed rows are already zero in the masked model. An FFN unit's row and column
    share one mask, bias included, so a dead unit adds nothing either."""
    model, m = masked.model, masked.masks(masked.config.final_threshold, gate=True)  # the masks, built once
    baked = {k: v * m[k] if k in m else v for k, v in model.state_dict().items()}
    state, heads, widths = {}, [], []
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        alive = (heads_alive({n: m[p + n + ".weight"] for n in ATTENTION}, layer.heads)
                 if layer.heads else torch.zeros(0, dtype=torch.bool))  # (heads,)
        rows = alive.repeat_interleave(layer.head_size)  # (heads x head_size,): the Q, K, V rows kept
        units = m[p + "ffn_in.bias"] > 0  # (ffn,)
        heads.append(int(alive.sum()))
        widths.append(-(-int(units.sum()) // multiple) * multiple)
        for name in ("query", "key", "value"):
            state[p + name + ".weight"] = baked[p + name + ".weight"][rows]
            state[p + name + ".bias"] = baked[p + name + ".bias"][rows]
        state[p + "attn_out.weight"] = baked[p + "attn_out.weight"][:, rows]
        pad = widths[i] - int(units.sum())  # zero units after the live ones
        state[p + "ffn_in.weight"] = F.pad(baked[p + "ffn_in.weight"][units], (0, 0, 0, pad))
        state[p + "ffn_in.bias"] = F.pad(baked[p + "ffn_in.bias"][units], (0, pad))
        state[p + "ffn_out.weight"] = F.pad(baked[p + "ffn_out.weight"][:, units], (0, pad))
    small = BertForQuestionAnswering(replace(model.config, num_attention_heads=heads, intermediate_size=widths))
    small.load_state_dict({**baked, **state})
    return small


@torch.no_grad()
def fill(model, noise=0.01, generator=None):
    """The "filled" stage's start: the zeros that block pruning left inside surviving heads and units
    get small noise (noise x the matrix's std), so that fine-tuning can use every weight again."""
    for layer in model.layers:
        for name in ATTENTION + ("ffn_in", "ffn_out"):
            w = getattr(layer, name).weight
            if w.numel():
                r = torch.randn(w.shape, generator=generator).to(w) * noise * w.std()
                w.copy_(torch.where(w == 0, r, w))
    return model


# ---- 6. ours: a target density or speed-up instead of a final threshold, cost models, what training reports

def density_schedule(step, config, final):
    """The fraction to keep at a step, from 1 down to `final` (keep_fraction) on the cubic ramp: with target_density
    of the linear parameters, with target_speedup of the cost model's prunable cost. The cost removed follows the
    ramp, as the parameters do with target_density; with FLOPs the scheduled speed-up, 1 / that fraction, thus
    goes from 1x to S, and half-way up the ramp S = 3 is at 2.4x."""
    return 1 - (1 - final) * ramp(step, config)


def keep_fraction(config, dense):
    """What the end of the ramp keeps: target_density; with target_speedup S the fraction of the prunable cost (of
    the dense model of config `dense`) for which the whole model, fixed costs included, costs 1 / S of the dense
    one: fixed + kept = (fixed + prunable) / S, i.e. 1 / S with FLOPs (fixed 0). A target beyond what the fixed
    costs allow (S > total / fixed) is refused, with the largest S there is."""
    if config.target_speedup is None:
        return config.target_density
    cost = speed_cost(config, dense)
    total, fixed = model_cost(dense, cost), cost["fixed"]
    if config.target_speedup * fixed > total:
        raise ValueError(f"--target_speedup {config.target_speedup:g}: what no pruning removes (embeddings, "
                         f"LayerNorms, the QA head, each layer's constant) takes {100 * fixed / total:.1f} % of the "
                         f"dense model's measured time: the largest reachable speed-up is {total / fixed:.2f}x")
    return (total / config.target_speedup - fixed) / (total - fixed)


@torch.no_grad()
def death_thresholds(masked, cost=None):
    """(thresholds, sizes): for every head and FFN unit, the threshold above which it is pruned and its
    size: the linear parameters it holds, or with a cost model (flop_costs, measure_costs) its cost. A head lives
    while each of its Q, K, V and output matrices keeps a block, i.e. while tau is below the smallest of the
    four matrices' best sigmoid(score) in it."""
    c = masked.model.config
    head, unit = (cost["head"], cost["unit"]) if cost else (4 * c.attention_head_size * c.hidden_size,
                                                             2 * c.hidden_size)
    heads, units = head_death_thresholds(masked), unit_death_thresholds(masked)
    return torch.cat([heads, units]), torch.cat([torch.full_like(heads, head, dtype=torch.float64),
                                                 torch.full_like(units, unit, dtype=torch.float64)])


@torch.no_grad()
def head_death_thresholds(masked):
    """(all heads,), layer after layer: the threshold above which each head is pruned: the smallest of its four
    matrices' best sigmoid(score). (The sigmoid is taken of the same stacks as in the masks, to the last bit.)"""
    per_layer = {}
    for group in layer_groups(masked):
        layer = masked.model.layers[group[0]]
        if not layer.heads:
            continue
        h = None
        for name in ATTENTION:
            s = torch.sigmoid(stacked(masked, group, name).float())  # (n, r, c)
            s = s.transpose(1, 2) if name == "attn_out" else s  # a head is a band of columns of the output matrix
            # (n, rows, c), a row per Q/K/V row: one block may span several heads
            s = s.repeat_interleave(layer.heads * layer.head_size // s.shape[1], 1)
            best = s.reshape(len(group), layer.heads, -1).amax(-1)  # (n, heads)
            h = best if h is None else torch.minimum(h, best)
        per_layer.update(zip(group, h))
    return torch.cat([per_layer[i] for i in sorted(per_layer)]) if per_layer else torch.zeros(0)


@torch.no_grad()
def unit_death_thresholds(masked):
    """(all FFN units,), layer after layer: sigmoid(score), above which each unit is pruned."""
    return torch.sigmoid(torch.cat([masked.scores[f"layer{i}_ffn"] for i in range(len(masked.model.layers))]).float())


def threshold_for_density(masked, density, cost=None):
    """The threshold at which the compacted model keeps the density of linear parameters closest to
    `density` (with a cost model: that fraction of the prunable cost): heads and units live in the order of their
    death thresholds (a weighted quantile), so it is off by at most half a head's or unit's parameters or cost
    (of heads sharing a block, when blocks span heads). A 0-dim tensor on the scores' device: training then never
    waits for it (torch.take: an index that stays on the device)."""
    t, n = death_thresholds(masked, cost)
    order = t.argsort(descending=True)
    t, n = t[order], n[order]
    kept = torch.cat([n.new_zeros(1), n.cumsum(0)]) / n.sum()  # kept[j]: the density when the top j live
    tau = torch.cat([t, t.new_zeros(1)])  # ... which sigmoid(score) > tau[j] gives, unless t[j] ties t[j - 1]
    possible = torch.cat([t.new_ones(1, dtype=torch.bool), t[1:] < t[:-1], t.new_ones(1, dtype=torch.bool)])
    return torch.take(tau, (kept - density).abs().masked_fill(~possible, float("inf")).argmin())


# The cost model of --target_speedup: a cost per head, per FFN unit, and a fixed cost, in one unit, from one of two
# sources: FLOPs counted (flop_costs) or seconds measured on the device (measure_costs). Pruning weighs heads and
# units by it (death_thresholds), and the report predicts the speed-up by it.

def head_and_unit_flops(config, T):
    """(FLOPs of one attention head, of one FFN unit) for one sequence of T tokens, a FLOP being half a
    multiply-add. A head: its rows of Q, K, V and its columns of the output projection (4 T hs h multiply-adds),
    QK^T and attention x V (2 T^2 hs); a unit: its FFN-in row and FFN-out column (2 T h). Biases, softmax, GELU,
    LayerNorms, embeddings and the QA head are left out (under 1 % of BERT-base's at T = 384): every FLOP counted
    belongs to a head or a unit, so pruning can remove all of them and the predicted speed-up is the ratio."""
    h, hs = config.hidden_size, config.attention_head_size
    return 2 * (4 * T * hs * h + 2 * T * T * hs), 2 * 2 * T * h


def encoder_flops(config, T):
    """The encoder's FLOPs for one sequence of T tokens: 70.7 G for BERT-base at T = 384, 19.5 G for the
    paper's d26 structure (3.62x fewer, against the 2.44x the paper measured on a GPU)."""
    return model_cost(config, flop_costs(config, T))


def flop_costs(config, T):
    """The FLOP cost model at length T: head_and_unit_flops, and no fixed cost."""
    head, unit = head_and_unit_flops(config, T)
    return {"cost_model": "flops", "head": head, "unit": unit, "fixed": 0}


def speed_cost(config, dense):
    """The cost model that target_speedup prunes by: the measured table of the PruneConfig, or FLOPs at seq_len."""
    return config.cost or flop_costs(dense, config.seq_len)


def model_cost(config, cost):
    """A model's cost under a cost model: fixed + head x its heads + unit x its FFN units."""
    heads, units = sum(config.num_attention_heads), sum(config.intermediate_size)
    return cost["fixed"] + cost["head"] * heads + cost["unit"] * units


def predicted_speedup(config, dense, cost):
    """The dense model's cost over the cost of the model of `config`, under a cost model."""
    return model_cost(dense, cost) / max(1e-30, model_cost(config, cost))


@torch.no_grad()
def measure_costs(config, device, dtype=torch.float32, batch=128, seq_len=384, reps=3):
    """The measured cost model, as latency-aware pruning builds it (a table of measured latencies per structure:
    Kwon et al. 2022; ZipLM, Kurtic et al. 2023): on `device`, in `dtype` (the modules cast to it, as evaluation
    runs a model: train_squad.predict), the seconds of one forward of batch x seq_len tokens, padded as the dev
    evaluation's batches are, through an encoder layer of config's sizes with h heads and n FFN units over a grid:
    h = 0, H/8, H/4, H/2, H without FFN, n = N/8 .. N (multiples of 8, as compact() leaves the widths) without
    attention, and both together (H/8 with N/8 .. H with N), denser at the narrow end where pruned models live (on
    this repository's CPU an FFN unit costs less there); and through the parts outside the layers (embeddings, the
    QA head: a model of 0 layers). Least squares fits, over the grid,
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
    outside = BertForQuestionAnswering(replace(config, num_hidden_layers=0, num_attention_heads=[],
                                               intermediate_size=[])).to(device, dtype).eval()
    mask = attend.long()
    runs = {"outside": lambda: outside(ids, mask)}
    attend = attend[:, None, None, :]  # (B, 1, 1, T), as BertForQuestionAnswering passes it to its layers
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


@torch.no_grad()
def heads_alive_at(masked, threshold):
    """(all heads,) booleans, layer after layer: the heads that compaction would keep at this threshold."""
    if masked.config.pruning_method == "sigmoid":
        return head_death_thresholds(masked) > threshold
    m = masked.masks(threshold, gate=False)  # topk: the top of each matrix, whatever the scores' values
    return torch.cat([heads_alive({n: m[f"layers.{i}.{n}.weight"] for n in ATTENTION}, layer.heads)
                      for i, layer in enumerate(masked.model.layers) if layer.heads] or [torch.zeros(0, dtype=bool)])


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
    s, (attn, ffn) = masked.structure(), score_stats(masked)
    return (f"threshold {masked.threshold:.4f} lambda {lambda_schedule(step - 1, masked.config):.3g}"
            f" | density attn {100 * s['attention_density']:.1f}% ffn {100 * s['ffn_density']:.1f}%"
            f" compact {100 * s['compact_density']:.1f}% | heads {sum(s['heads'])}/"
            f"{sum(masked.model.config.num_attention_heads)} (died {died}, came back {revived})"
            f" | scores attn {attn[0]:+.3f}±{attn[1]:.3f} ffn {ffn[0]:+.3f}±{ffn[1]:.3f}")


# ---- the report and the pictures -----------------------------------------------------------------

def zero_units(layer):
    """FFN units whose row, bias and column are all zero: compact()'s padding to a multiple of 8."""
    live = (layer.ffn_in.weight != 0).any(1) | (layer.ffn_in.bias != 0) | (layer.ffn_out.weight != 0).any(0)
    return int((~live).sum())


def report(model, dense_config, seq_len=384, cost=None):
    """Per layer heads and FFN units kept, linear parameters kept (of the dense model's), total parameters, and
    the encoder's FLOPs for one sequence of seq_len tokens: the dense model's over these is the FLOP model's
    predicted speed-up. Units and FLOPs are those of the structure pruning left: the all-zero units that round each
    FFN width up to a multiple of 8 are counted apart (ffn_padding, padding_params), and so are their FLOPs
    (flops_padding). predicted_speedup is the run's cost model's (cost_model): the FLOPs', or with a measured cost
    table (measure_costs) its time, of the model as it runs, padding included (it takes time)."""
    c = model.config
    pad = [zero_units(layer) for layer in model.layers]
    real = replace(c, intermediate_size=[f - p for f, p in zip(c.intermediate_size, pad)])
    rows = [{"layer": i, "heads": n, "ffn": f, "ffn_padding": p,
             "linear_params": 4 * n * c.attention_head_size * c.hidden_size + 2 * f * c.hidden_size}
            for i, (n, f, p) in enumerate(zip(c.num_attention_heads, real.intermediate_size, pad))]
    kept, dense = linear_params(real), linear_params(dense_config)
    flops, flops_dense = encoder_flops(real, seq_len), encoder_flops(dense_config, seq_len)
    speedup_flops = flops_dense / max(1, flops)
    return {"layers": rows, "heads": sum(c.num_attention_heads), "heads_dense": sum(dense_config.num_attention_heads),
            "linear_params": kept, "linear_params_dense": dense, "linear_density": kept / dense,
            "padding_params": linear_params(c) - kept, "flops_padding": encoder_flops(c, seq_len) - flops,
            "total_params": model.num_parameters(), "seq_len": seq_len, "flops": flops, "flops_dense": flops_dense,
            "cost_model": "measured" if cost else "flops", "predicted_speedup_flops": speedup_flops,
            "predicted_speedup": predicted_speedup(c, dense_config, cost) if cost else speedup_flops}


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


def plot_report(r, path, speedup=None):
    """Bars of heads and FFN width per layer, as a PNG, titled with the predicted speed-up (and the measured
    one, when given); skipped (returns False) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = [x["layer"] for x in r["layers"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3))
    a.bar(layers, [x["heads"] for x in r["layers"]], color="tab:blue")
    a.set(title="attention heads kept", xlabel="layer")
    b.bar(layers, [x["ffn"] for x in r["layers"]], color="tab:orange")
    b.set(title="FFN units kept", xlabel="layer")
    fig.suptitle(f"{100 * r['linear_density']:.1f} % of linear parameters kept; speed-up {r['predicted_speedup']:.2f}x"
                 f" predicted ({r['cost_model']})" + (f", {speedup:.2f}x measured" if speedup else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


@torch.no_grad()
def head_pruning_stats(masked):
    """Does block pruning remove whole heads (the paper's Sec. 5 finding)? At the final threshold, gated: per layer
    which heads live and the FFN units kept, the heads removed whole, and the attention weights pruned: those whose
    mask is 0 plus every weight of a removed head (compaction cuts it all, even blocks its masks kept), and how
    many of these lie in removed heads rather than in the zeros left inside surviving ones."""
    m = masked.masks(masked.config.final_threshold, gate=True)
    alive, ffn, pruned, in_removed = [], [], 0, 0
    for i, layer in enumerate(masked.model.layers):
        p = f"layers.{i}."
        ffn.append(int(m[p + "ffn_in.bias"].sum()))
        if not layer.heads:
            alive.append([])
            continue
        w = {n: m[p + n + ".weight"] for n in ATTENTION}
        live = heads_alive(w, layer.heads)
        head = 4 * layer.head_size * masked.model.config.hidden_size  # one head's weights in Q, K, V and output
        zeros = sum((w[n].t() if n == "attn_out" else w[n]).reshape(layer.heads, -1).eq(0).sum(1) for n in ATTENTION)
        pruned += int(zeros[live].sum()) + head * int((~live).sum())
        in_removed += head * int((~live).sum())
        alive.append(live.tolist())
    removed = sum(not a for layer in alive for a in layer)
    return {"alive": alive, "ffn": ffn, "heads_removed": removed, "heads_total": sum(map(len, alive)),
            "attention_pruned": pruned, "attention_pruned_in_removed_heads": in_removed,
            "fraction_in_removed_heads": in_removed / max(1, pruned)}


@torch.no_grad()
def plot_masks(masked, path):
    """The head-pruning picture, as a PNG: per layer (rows) the Q, K, V and output masks at the final threshold,
    head boundaries drawn (a head is a band of rows of Q, K, V and a band of columns of the output), blocks kept
    in surviving heads, blocks kept in removed heads (compaction cuts them) and pruned blocks in three colours,
    and a strip of the FFN units kept. Skipped (returns False) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError:
        return False
    s, m = head_pruning_stats(masked), masked.masks(masked.config.final_threshold, gate=True)
    colours = ["white", "#f4a582", "#2166ac"]  # 0 pruned, 1 kept in a removed head, 2 kept
    cmap, layers = ListedColormap(colours), masked.model.layers
    fig, axes = plt.subplots(len(layers), 5, figsize=(11, 2.1 * len(layers) + 1.2), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.6]})
    for i, layer in enumerate(layers):
        p, live = f"layers.{i}.", torch.tensor(s["alive"][i], dtype=torch.bool)
        for j, (name, title) in enumerate(zip(ATTENTION, ("Q", "K", "V", "output"))):
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- checkpoints of a masked model: the BERT as bert.py saves it, plus the scores ----------------

def save_masked(masked, out_dir, vocab_file=None, extra_files=None):
    """The BERT's checkpoint with scores.safetensors and prune_config.json, written as one unit."""
    masked.model.save_pretrained(out_dir, vocab_file, {
        "scores.safetensors": safetensors_bytes({k: v.detach() for k, v in masked.scores.items()}),
        "prune_config.json": json.dumps(asdict(masked.config), indent=2).encode(), **(extra_files or {})})


def load_masked(path):
    path = Path(path)
    finish_write(path)  # a save that a crash cut short after its commit point
    if not (path / "scores.safetensors").exists():
        raise FileNotFoundError(f"{path}: no scores.safetensors: not a pruned (masked) checkpoint")
    try:
        config = PruneConfig(**json.loads((path / "prune_config.json").read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:  # not JSON, not an object, a key this version does not know
        raise ValueError(f"{path / 'prune_config.json'}: not a usable prune config ({e})") from None
    masked = MaskedBert(BertForQuestionAnswering.from_pretrained(path), config)
    scores = read_safetensors(path / "scores.safetensors")
    # another model's scores, or another --block's, would fail in copy_ below, or list every name
    ours, theirs = ({k: tuple(v.shape) for k, v in s.items()} for s in (masked.scores, scores))
    if bad := sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)):
        raise ValueError(f"{path / 'scores.safetensors'}: {len(bad)} scores do not fit the model and "
                         f"prune_config.json (e.g. {bad[0]}: {theirs.get(bad[0], 'missing')} in the file, "
                         f"{ours.get(bad[0], 'none')} expected)")
    with torch.no_grad():
        for k, v in scores.items():
            masked.scores[k].copy_(v)
    return masked
