"""
Block movement pruning (Lagunas, Charlaix, Sanh, Rush, "Block Pruning For Faster Transformers", EMNLP 2021,
arXiv 2109.04838): the paper's method, in one file, top to bottom.

  1. scores: one learnable score per block of each attention matrix (Q, K, V, output; 32x32 blocks by default)
     and one per FFN unit, shared by its FFN-in row and FFN-out column ("hybrid", Sec. 3);
  2. masks: a block is kept while sigmoid(score) > threshold; per matrix, mask = expand(binarize(score)). The
     straight-through gradient makes a score grow while its block's weights move away from zero (movement
     pruning, Sanh et al. 2020), so the blocks that training needs are the ones that stay;
  3. schedule and regulariser: the threshold rises from 0 on a cubic ramp, and an L1 penalty on sigmoid(scores),
     weighted by lambda on the same ramp, pushes every score down: only blocks the task pulls up survive;
  4. distillation from a fine-tuned teacher (Sec. 4);
  5. compaction: the dead heads and FFN units are cut out, leaving a smaller dense BERT whose outputs equal the
     masked model's; "filled" fine-tuning then lets the surviving heads use all their weights again.
Ours, not the paper's, each marked "(ours)" where it acts: a target density instead of a final threshold (the
threshold that keeps the scheduled fraction of the linear parameters, or of any cost per head and FFN unit:
cost_model.py prunes to a speed-up this way); the gate that switches off a head with no Q or K left, which makes
compaction exact; the layers' scores stacked per group of one shape, for speed (score_groups); and the FFN widths
rounded up to multiples of 8 at compaction.

The model is any network built on bert.Bert (as `model.bert`): only its encoder's Linears are masked, and a task's
head is left as it is. Imports nothing of this project; knows nothing of SQuAD.
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

ATTENTION = ("query", "key", "value", "attn_out")  # the four attention matrices of a layer


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
    # (ours) instead of tau_f: the threshold that keeps this fraction of the linear parameters, or with `cost` of
    # the cost of the heads and FFN units ({"head": what one head costs, "unit": what one FFN unit costs, ...})
    target_density: float | None = None
    cost: dict | None = None
    # (ours) A head whose Q or K is all pruned gets its V masked too: "eval" only when not training (as the
    # reference, where such a head attends uniformly while training, its scores keep learning and it can come
    # back; it kept 0.3 to 0.7 more F1 in docs/study.md), "always" in training too (no task gradient reaches the
    # head, which cannot come back). Evaluation, compaction and the saved model always gate.
    gate_dead_heads: str = "eval"

    def __post_init__(self):  # the flags, or a prune_config.json read back: each field checked before use
        for k in ("final_threshold", "final_lambda", "attention_lambda", "ffn_lambda", "warmup_steps", "ramp_steps"):
            v, steps = getattr(self, k), k.endswith("_steps")
            if not (type(v) in ((int,) if steps else (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"PruneConfig: {k} must be {'an integer' if steps else 'a number'} >= 0, got {v!r}")
        if not isinstance(self.block, str):
            raise ValueError(f"--block: 'RxC' (e.g. 32x32), 'row', 'col' or 'head'; got {self.block!r}")
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
        if self.cost is not None and not all(type(self.cost.get(k)) in (int, float) and 0 < self.cost[k] < math.inf
                                             for k in ("head", "unit")):
            raise ValueError(f"cost: expected a head's and an FFN unit's cost, numbers above 0, got {self.cost}")


# ---- 1. blocks and scores ------------------------------------------------------------------------------------------

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
    """(..., R/bh, C/bw) block mask -> (..., R, C) mask, each value repeated over its block."""
    *n, r, c = block_mask.shape
    R, C = weight_shape
    if not r or not c:  # a matrix of a layer with 0 heads or 0 FFN units
        return block_mask.new_zeros((*n, R, C))
    return block_mask[..., :, None, :, None].expand(*n, r, R // r, c, C // c).reshape(*n, R, C)


# ---- 2. masks ------------------------------------------------------------------------------------------------------

def binarize(scores, threshold, pruning_method="sigmoid", dims=None):
    """0/1 mask with a straight-through gradient: d mask / d scores = 1 (Sanh et al. 2020, Sec. 4).
    This is what makes it *movement* pruning: a score's gradient is then the sum over its block of
    W * dL/d(W * M), so a block's score grows while its weights move away from zero, and shrinks otherwise.
    sigmoid: keep where sigmoid(score) > threshold (threshold 0 keeps everything).
    topk: keep the ceil((1 - threshold) * n) highest scores of each matrix: of the last `dims` dimensions (all of
    them by default; scores stacked over layers keep a share of each layer's)."""
    if pruning_method == "sigmoid":
        hard = (torch.sigmoid(scores) > threshold).to(scores.dtype)
    else:
        flat = scores.detach().flatten(-(dims or scores.dim()))  # (..., n): one matrix a row
        k = math.ceil((1 - threshold) * flat.shape[-1])
        hard = torch.zeros_like(flat).scatter_(-1, flat.topk(k, -1).indices, 1).view_as(scores)
    # (scores - scores.detach()) is exactly 0, so the mask holds exact zeros and ones
    return hard.detach() + (scores - scores.detach())


def any_per_head(mask, heads):
    """(..., R, C) mask -> (..., heads) booleans: does each head's band of rows keep any weight?"""
    return (mask.detach() != 0).reshape(*mask.shape[:-2], heads, -1).any(-1)


def heads_alive(m, heads):
    """Per head: does it still change the output? Its Q, K, V rows and its output columns must each
    keep at least one weight. (A head whose Q or K is all zero would attend uniformly and still add
    the mean of V; layer_masks switches such heads off so that compaction stays exact.)"""
    return (any_per_head(m["query"], heads) & any_per_head(m["key"], heads) & any_per_head(m["value"], heads)
            & any_per_head(m["attn_out"].transpose(-1, -2), heads))


def layer_masks(layer, scores, threshold, pruning_method="sigmoid", gate=True):
    """The masks of one layer's six Linears, {"query.weight": (R, C), "query.bias": (R,), ...}, from its scores
    {"query": (R/bh, C/bw) block scores, ..., "ffn": (units,)}. Scores stacked over n layers of one shape give the
    masks stacked, (n, R, C) and (n, R) (score_groups)."""
    m = {name: expand(binarize(scores[name], threshold, pruning_method, dims=2), getattr(layer, name).weight.shape)
         for name in ATTENTION}  # (R, C) each
    if layer.heads and gate:  # (ours) switch off heads with no query or key left, by masking their values
        alive = any_per_head(m["query"], layer.heads) & any_per_head(m["key"], layer.heads)  # (heads,)
        m["value"] = m["value"] * alive.repeat_interleave(layer.head_size, -1).to(m["value"].dtype)[..., None]
    # hybrid FFN: one score per unit, shared by its FFN-in row and its FFN-out column
    u = binarize(scores["ffn"], threshold, pruning_method, dims=1)  # (units,)
    m["ffn_in"] = u[..., :, None].expand(*u.shape, layer.ffn_in.in_features)  # (units, hidden)
    m["ffn_out"] = u[..., None, :].expand(*u.shape[:-1], layer.ffn_out.out_features, u.shape[-1])  # (hidden, units)
    masks = {}
    for name, mask in m.items():  # the V gate comes before the biases, so that a gated head's V biases go too
        masks[name + ".weight"] = mask
        masks[name + ".bias"] = (mask.detach() != 0).any(-1).to(mask.dtype)  # (R,): no weight left, no bias
    return masks


class MaskedBert(nn.Module):
    """A model built on bert.Bert (`model.bert`: a question-answering model, a classifier...) whose encoder
    matrices are multiplied by masks learnt from scores. The model's own parameters are untouched: each forward
    computes the masks, multiplies the weights by them and runs the model on those products."""

    def __init__(self, model, config):
        super().__init__()
        self.model, self.config = model, config
        # training sets tau(t) each step; evaluation uses the schedule's end (end_of_schedule writes it into the config)
        self.threshold = config.final_threshold
        self.scores = nn.ParameterDict()  # the paper initialises the scores at 0; on the weights' device
        for i, layer in enumerate(self.layers):
            for name in ATTENTION:
                w = getattr(layer, name).weight
                bh, bw = block_shape(config.block, name, w.shape, layer.head_size)
                self.scores[f"layer{i}_{name}"] = nn.Parameter(torch.zeros(w.shape[0] // bh, w.shape[1] // bw,
                                                                           device=w.device))
            w = layer.ffn_in.weight
            self.scores[f"layer{i}_ffn"] = nn.Parameter(torch.zeros(w.shape[0], device=w.device))

    @property
    def layers(self):
        return self.model.bert.layers

    def gate(self):
        """Is the dead-head gate on now? Always in evaluation; while training with gate_dead_heads "always"."""
        return self.config.gate_dead_heads == "always" or not self.training

    def masks(self, threshold=None, gate=None):
        """{parameter name: mask of its shape} for every masked weight and bias, layer by layer, at `threshold`
        (default: self.threshold) and with the dead-head gate `gate` (default: self.gate())."""
        tau = self.threshold if threshold is None else threshold
        gate = self.gate() if gate is None else gate
        out = {}
        for i, layer in enumerate(self.layers):
            scores = {name: self.scores[f"layer{i}_{name}"] for name in ATTENTION + ("ffn",)}
            for key, mask in layer_masks(layer, scores, tau, self.config.pruning_method, gate).items():
                out[f"bert.layers.{i}.{key}"] = mask
        return out

    def forward(self, *inputs):
        # the model on {name: weight * mask for name, mask in self.masks().items()}, computed faster (masked_weights)
        return torch.func.functional_call(self.model, masked_weights(self), inputs)


def score_groups(masked):
    """(ours, for speed) The layers in groups of one shape (the same heads and FFN width; a dense model's layers are
    one group), each with its scores stacked: [(layer indices, {"query": (n, r, c), ..., "ffn": (n, units)})].
    The masks, the masked products, the regulariser and the heads' death thresholds work on these stacks, so that
    each of their operations runs once per group instead of once per layer, with the same values
    (test_masks_by_group_are_the_masks_layer_by_layer). What it saves is operations, which a GPU waits for one by
    one: layer by layer, a BERT-base pruning step ran 4,970 of them against a dense step's 2,608; by groups 3,285
    (bench.py's count on CPU, docs/speed.md)."""
    groups = {}
    for i, layer in enumerate(masked.layers):
        groups.setdefault((layer.heads, layer.ffn_in.out_features), []).append(i)
    return [(g, {name: torch.stack([masked.scores[f"layer{i}_{name}"] for i in g]) for name in ATTENTION + ("ffn",)})
            for g in groups.values()]


def masked_weights(masked):
    """{parameter name: weight * mask} for every masked weight and bias: masked.masks() applied, one product per
    group of layers (score_groups), at the price of a copy of the weights kept for the backward (340 MB in fp32 for
    BERT-base)."""
    params, method = {}, masked.config.pruning_method
    for group, scores in score_groups(masked):
        layer = masked.layers[group[0]]
        for key, mask in layer_masks(layer, scores, masked.threshold, method, masked.gate()).items():
            names = [f"bert.layers.{i}.{key}" for i in group]
            w = torch.stack([masked.model.get_parameter(n) for n in names]) * mask  # (n, R, C) or (n, R)
            params.update(zip(names, w.unbind()))
    return params


def linear_params(config):
    """The weights of the encoder's Q, K, V, attention-output, FFN-in and FFN-out matrices: the
    paper's count of 'linear parameters' (84,934,656 for BERT-base). No embeddings, biases, LayerNorms."""
    h, hs = config.hidden_size, config.attention_head_size
    return sum(4 * n * hs * h + 2 * f * h for n, f in zip(config.num_attention_heads, config.intermediate_size))


# ---- 3. schedule and regulariser -----------------------------------------------------------------------------------

def ramp(step, config):
    """0 during warm-up, then 1 - (1 - p)^3 over the ramp (p: the fraction of it done), then 1: the
    cubic schedule of Zhu & Gupta 2018, as used by the paper. Threshold, lambda and (with
    target_density) the fraction kept all follow it."""
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


def density_schedule(step, config):
    """(ours) The fraction to keep at a step, from 1 down to target_density on the cubic ramp."""
    return 1 - (1 - config.target_density) * ramp(step, config)


def schedule(step, masked):
    """(threshold, lambda) at a training step. With target_density the threshold is not tau_f * ramp but the one
    that keeps the scheduled density, whatever the scores have learnt: lambda then only shapes which blocks win,
    never how many, and needs no tuning."""
    c = masked.config
    tau = threshold_schedule(step, c)
    if c.target_density is not None:
        tau = threshold_for_density(masked, density_schedule(step, c), c.cost)
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
    attn, ffn = [], []
    for _, scores in score_groups(masked):
        attn += [torch.sigmoid(scores[name]).flatten(1).mean(1) for name in ATTENTION]  # (n,): a mean per matrix
        ffn.append(torch.sigmoid(scores["ffn"]).mean(1))  # (n,)
    c = masked.config
    return (c.attention_lambda * torch.cat(attn).mean() + c.ffn_lambda * torch.cat(ffn).mean()) / 2


# ---- 4. distillation -----------------------------------------------------------------------------------------------

def distillation_loss(logits, teacher_logits, labels, temperature=2.0, alpha_distil=0.9, alpha_ce=0.1):
    """alpha_distil * KL(teacher || student) at temperature T, times T^2 (Hinton et al. 2015), plus alpha_ce * the
    usual cross-entropy, each averaged over the model's outputs: a tuple of (B, classes) logits with one label
    tensor each (question answering: (start, end) logits over the positions, with the answer's start and end) or a
    single one (a classifier)."""
    if torch.is_tensor(logits):
        logits, teacher_logits, labels = (logits,), (teacher_logits,), (labels,)
    T = temperature
    kd = sum(F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
             for s, t in zip(logits, teacher_logits)) * T ** 2 / len(logits)
    ce = sum(F.cross_entropy(s, y) for s, y in zip(logits, labels)) / len(logits)
    return alpha_distil * kd + alpha_ce * ce


def param_groups(masked, lr, scores_lr, weight_decay=0.0):
    """AdamW groups: the model's weights at lr, the scores at their own (much larger) lr, never decayed."""
    return [{"params": list(masked.model.parameters()), "lr": lr, "weight_decay": weight_decay},
            {"params": list(masked.scores.parameters()), "lr": scores_lr, "weight_decay": 0.0}]


# ---- 5. compaction and filling -------------------------------------------------------------------------------------

@torch.no_grad()
def compact(masked, multiple=8, build=None):
    """Bake the masks (at the final threshold) into the weights and cut out what they killed: heads
    that no longer change the output and FFN units whose row and column are masked. The result is the model
    given, rebuilt by build(config) (default: its class) with per-layer head counts and FFN widths; a layer may
    keep 0 heads. (ours) Each FFN width is rounded up to a multiple of `multiple` with all-zero units (GELU(0) = 0:
    they add nothing), the widths that half-precision matrix products want (tensor cores; on an H200 in bf16 d26
    ran 1.67x dense with them, 1.22x without: docs/speed.md). fill() gives them noise, so that the filled model
    trains them as units of its own.
    Why its outputs equal the masked model's exactly: a head with no Q or K left would attend uniformly
    and add the mean of its V, so layer_masks gates it off through its V (and must do so before it masks
    the biases, so that the V biases go too); a head with no V or no output columns adds nothing; and
    the biases of removed rows are already zero in the masked model. An FFN unit's row and column
    share one mask, bias included, so a dead unit adds nothing either."""
    model, m = masked.model, masked.masks(masked.config.final_threshold, gate=True)  # the masks, built once
    baked = {k: v * m[k] if k in m else v for k, v in model.state_dict().items()}
    state, heads, widths = {}, [], []
    for i, layer in enumerate(masked.layers):
        p = f"bert.layers.{i}."
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
    small = (build or type(model))(replace(model.bert.config, num_attention_heads=heads, intermediate_size=widths))
    small.load_state_dict({**baked, **state})
    return small


@torch.no_grad()
def fill(model, noise=0.01, generator=None):
    """The "filled" stage's start: the zeros that block pruning left inside surviving heads and units
    get small noise (noise x the matrix's std), so that fine-tuning can use every weight again."""
    for layer in model.bert.layers:
        for name in ATTENTION + ("ffn_in", "ffn_out"):
            w = getattr(layer, name).weight
            if w.numel():
                r = torch.randn(w.shape, generator=generator).to(w) * noise * w.std()
                w.copy_(torch.where(w == 0, r, w))
    return model


# ---- (ours) the threshold of a target density ----------------------------------------------------------------------

@torch.no_grad()
def death_thresholds(masked, cost=None):
    """(thresholds, sizes): for every head and FFN unit, the threshold above which it is pruned and its
    size: the linear parameters it holds, or with a cost ({"head": ..., "unit": ...}) its cost. A head lives
    while each of its Q, K, V and output matrices keeps a block, i.e. while tau is below the smallest of the
    four matrices' best sigmoid(score) in it."""
    c = masked.model.bert.config
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
    for group, scores in score_groups(masked):
        layer = masked.layers[group[0]]
        if not layer.heads:
            continue
        h = None
        for name in ATTENTION:
            s = torch.sigmoid(scores[name].float())  # (n, r, c)
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
    return torch.sigmoid(torch.cat([masked.scores[f"layer{i}_ffn"] for i in range(len(masked.layers))]).float())


def threshold_for_density(masked, density, cost=None):
    """The threshold at which the compacted model keeps the density of linear parameters closest to
    `density` (with a cost: that fraction of the heads' and units' cost): heads and units live in the order of
    their death thresholds (a weighted quantile), so it is off by at most half a head's or unit's parameters or
    cost (of heads sharing a block, when blocks span heads). A 0-dim tensor on the scores' device: training then
    never waits for it (torch.take: an index that stays on the device)."""
    t, n = death_thresholds(masked, cost)
    order = t.argsort(descending=True)
    t, n = t[order], n[order]
    kept = torch.cat([n.new_zeros(1), n.cumsum(0)]) / n.sum()  # kept[j]: the density when the top j live
    tau = torch.cat([t, t.new_zeros(1)])  # ... which sigmoid(score) > tau[j] gives, unless t[j] ties t[j - 1]
    possible = torch.cat([t.new_ones(1, dtype=torch.bool), t[1:] < t[:-1], t.new_ones(1, dtype=torch.bool)])
    return torch.take(tau, (kept - density).abs().masked_fill(~possible, float("inf")).argmin())
