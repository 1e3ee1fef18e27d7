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
     on sigmoid(scores) is weighted by lambda, which follows the threshold;
  4. distillation from a fine-tuned teacher (Sec. 4);
  5. compaction: dead heads and FFN units are cut out, giving a smaller dense BERT whose outputs
     equal the masked model's; "filled" fine-tuning then lets the surviving heads use all weights.

Imports only bert.py; knows nothing of SQuAD.
"""
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from bert import BertForQuestionAnswering, atomic_write, read_safetensors, write_safetensors

ATTENTION = ("query", "key", "value", "attn_out")  # the four attention matrices of a layer


@dataclass
class PruneConfig:
    block: str = "32x32"  # attention blocks: "RxC", "1x1" (unstructured), "row", "col" or "head"
    mask: str = "sigmoid"  # "sigmoid": sigmoid(score) > threshold; "topk": keep the top (1 - threshold) of each matrix
    final_threshold: float = 0.1  # tau_f
    final_lambda: float = 20.0  # lambda_f; lambda(t) = lambda_f * tau(t) / tau_f
    attention_lambda: float = 1.0  # weight of the attention masks in the regulariser
    ffn_lambda: float = 0.25  # weight of the FFN masks
    warmup_steps: int = 0  # threshold 0 for these steps (the reference's "initial_warmup")
    ramp_steps: int = 1  # then the cubic rise; the threshold stays at tau_f afterwards ("final_warmup")
    target_density: float | None = None  # instead of tau_f: the threshold that keeps this density of linear params

    def __post_init__(self):
        if self.mask not in ("sigmoid", "topk"):
            raise ValueError(f"--mask: 'sigmoid' or 'topk', got {self.mask!r}")
        if not 0 <= self.final_threshold < 1:
            raise ValueError(f"--final_threshold must be in [0, 1), got {self.final_threshold}")
        if self.target_density is not None:
            if not 0 < self.target_density <= 1:
                raise ValueError(f"--target_density must be in (0, 1], got {self.target_density}")
            if self.mask != "sigmoid":
                raise ValueError("--target_density needs --mask sigmoid")


# ---- 1. blocks and scores --------------------------------------------------------------------

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
    """(R/bh, C/bw) block mask -> (R, C) mask, each value repeated over its block."""
    r, c = block_mask.shape
    R, C = weight_shape
    if not r or not c:  # a matrix of a layer with 0 heads or 0 FFN units
        return block_mask.new_zeros(weight_shape)
    return block_mask[:, None, :, None].expand(r, R // r, c, C // c).reshape(R, C)


# ---- 2. masks --------------------------------------------------------------------------------

def binarize(scores, threshold, mask="sigmoid"):
    """0/1 mask with a straight-through gradient: d mask / d scores = 1 (Sanh et al. 2020, Sec. 4).
    sigmoid: keep where sigmoid(score) > threshold (threshold 0 keeps everything).
    topk: keep the ceil((1 - threshold) * n) highest scores."""
    if mask == "sigmoid":
        hard = (torch.sigmoid(scores) > threshold).to(scores.dtype)
    else:
        k = math.ceil((1 - threshold) * scores.numel())
        hard = torch.zeros_like(scores).view(-1)
        hard[scores.detach().view(-1).topk(k).indices] = 1
        hard = hard.view_as(scores)
    # (scores - scores.detach()) is exactly 0, so the mask holds exact zeros and ones
    return hard.detach() + (scores - scores.detach())


def any_per_head(mask, heads):
    """(heads,) booleans: does each head's band of rows keep any weight?"""
    return (mask.detach() != 0).reshape(heads, -1).any(1)


def heads_alive(m, heads):
    """Per head: does it still change the output? Its Q, K, V rows and its output columns must each
    keep at least one weight. (A head whose Q or K is all zero would attend uniformly and still add
    the mean of V; MaskedBert switches such heads off so that compaction stays exact.)"""
    return (any_per_head(m["query"], heads) & any_per_head(m["key"], heads) & any_per_head(m["value"], heads)
            & any_per_head(m["attn_out"].t(), heads))


class MaskedBert(nn.Module):
    """A BertForQuestionAnswering whose encoder matrices are multiplied by masks learnt from scores.
    The model's own parameters are untouched: each forward computes every mask once, multiplies the
    weights by them and runs the model on those products (torch.func.functional_call)."""

    def __init__(self, model, config):
        super().__init__()
        self.model, self.config = model, config
        self.threshold = config.final_threshold  # evaluation always uses tau_f; training sets tau(t) each step
        self.scores = nn.ParameterDict()  # the paper initialises the scores at 0
        for i, layer in enumerate(model.layers):
            for name in ATTENTION:
                w = getattr(layer, name).weight
                bh, bw = block_shape(config.block, name, w.shape, layer.head_size)
                self.scores[f"layer{i}_{name}"] = nn.Parameter(torch.zeros(w.shape[0] // bh, w.shape[1] // bw))
            self.scores[f"layer{i}_ffn"] = nn.Parameter(torch.zeros(layer.ffn_in.out_features))

    def masks(self, threshold=None):
        """{parameter name: mask of its shape} for the weights and biases of every masked Linear."""
        tau = self.threshold if threshold is None else threshold
        out = {}
        for i, layer in enumerate(self.model.layers):
            m = {name: expand(binarize(self.scores[f"layer{i}_{name}"], tau, self.config.mask),
                              getattr(layer, name).weight.shape) for name in ATTENTION}
            if layer.heads:  # switch off heads with no query or key left, by masking their values
                gate = any_per_head(m["query"], layer.heads) & any_per_head(m["key"], layer.heads)
                m["value"] = m["value"] * gate.repeat_interleave(layer.head_size).to(m["value"].dtype)[:, None]
            # hybrid FFN: one score per unit, shared by its FFN-in row and its FFN-out column
            u = binarize(self.scores[f"layer{i}_ffn"], tau, self.config.mask)
            m["ffn_in"] = u[:, None].expand(layer.ffn_in.weight.shape)
            m["ffn_out"] = u[None, :].expand(layer.ffn_out.weight.shape)
            for name, mask in m.items():
                out[f"layers.{i}.{name}.weight"] = mask
                out[f"layers.{i}.{name}.bias"] = (mask.detach() != 0).any(1).to(mask.dtype)  # a row with no weight left gets no bias
        return out

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        params = {name: self.model.get_parameter(name) * mask for name, mask in self.masks().items()}
        return torch.func.functional_call(self.model, params, (input_ids, attention_mask, token_type_ids))

    @torch.no_grad()
    def structure(self, threshold=None):
        """What the masks leave: per layer heads and FFN units alive, and the density of the linear
        weights before compaction (zeros counted out) and after it (zeros inside survivors counted in)."""
        m = self.masks(threshold)
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


# ---- 3. schedule and regulariser ---------------------------------------------------------------

def ramp(step, config):
    """0 during warm-up, then 1 - (1 - p)^3 over the ramp (p: the fraction of it done), then 1: the
    cubic schedule of Zhu & Gupta 2018, as used by the paper. Threshold, lambda and (with
    target_density) the density all follow it."""
    if step < config.warmup_steps:
        return 0.0
    p = min(1.0, (step - config.warmup_steps) / max(1, config.ramp_steps))
    return 1 - (1 - p) ** 3


def threshold_schedule(step, config):
    """tau(t) = tau_f * ramp(t): from 0 (nothing pruned) to tau_f."""
    return config.final_threshold * ramp(step, config)


def lambda_schedule(step, config):
    """lambda(t) = lambda_f * tau(t) / tau_f: the regulariser grows with the threshold."""
    return config.final_lambda * ramp(step, config)


def density_schedule(step, config):
    """With target_density: the density of linear parameters to keep at a step, from 1 down to the target."""
    return 1 - (1 - config.target_density) * ramp(step, config)


@torch.no_grad()
def death_thresholds(masked):
    """(thresholds, sizes): for every head and FFN unit, the threshold above which it is pruned and
    the linear parameters it holds. A head lives while each of its Q, K, V and output matrices keeps
    a block, i.e. while tau is below the smallest of the four matrices' best sigmoid(score) in it."""
    ts, ns = [], []
    for i, layer in enumerate(masked.model.layers):
        hidden, u = layer.ffn_in.in_features, torch.sigmoid(masked.scores[f"layer{i}_ffn"].float())
        if layer.heads:
            h, rows = torch.ones(layer.heads, device=u.device), layer.heads * layer.head_size
            for name in ATTENTION:
                s = torch.sigmoid(masked.scores[f"layer{i}_{name}"].float())
                s = s.t() if name == "attn_out" else s  # a head is a band of columns of the output matrix
                h = torch.minimum(h, s.repeat_interleave(rows // s.shape[0], 0).reshape(layer.heads, -1).amax(1))
            ts.append(h), ns.append(torch.full_like(h, 4 * layer.head_size * hidden))
        ts.append(u), ns.append(torch.full_like(u, 2 * hidden))
    return torch.cat(ts), torch.cat(ns)


def threshold_for_density(masked, density):
    """The threshold at which the compacted model keeps the density of linear parameters closest to
    `density`: heads and units live in the order of their death thresholds (a weighted quantile),
    so it is off by at most half a head's or unit's parameters (of heads sharing a block, when blocks span heads)."""
    t, n = death_thresholds(masked)
    order = t.argsort(descending=True)
    t, n = t[order], n[order]
    kept = torch.cat([n.new_zeros(1), n.cumsum(0)]) / n.sum()  # kept[j]: the density when the top j live
    tau = torch.cat([t, t.new_zeros(1)])  # ... which sigmoid(score) > tau[j] gives, unless t[j] ties t[j - 1]
    possible = torch.cat([t.new_ones(1, dtype=torch.bool), t[1:] < t[:-1], t.new_ones(1, dtype=torch.bool)])
    return tau[(kept - density).abs().masked_fill(~possible, float("inf")).argmin()].item()


def schedule(step, masked):
    """(threshold, lambda) at a training step. With target_density the threshold is not tau_f * ramp
    but the one that keeps the scheduled density, whatever the scores have learnt: lambda then only
    shapes which blocks win, never how many, and needs no tuning."""
    c = masked.config
    tau = threshold_schedule(step, c)
    if c.target_density is not None:
        tau = threshold_for_density(masked, density_schedule(step, c))
    return tau, lambda_schedule(step, c)


def regularization(masked):
    """L1 of the masks' soft values: the mean of sigmoid(scores), averaged over the attention matrices
    and over the FFN layers, weighted (1.0 attention, 0.25 FFN in the paper's hybrid setting)."""
    attn = [torch.sigmoid(s).mean() for k, s in masked.scores.items() if not k.endswith("_ffn")]
    ffn = [torch.sigmoid(s).mean() for k, s in masked.scores.items() if k.endswith("_ffn")]
    c = masked.config
    return (c.attention_lambda * torch.stack(attn).mean() + c.ffn_lambda * torch.stack(ffn).mean()) / 2


# ---- 4. distillation ---------------------------------------------------------------------------

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


# ---- 5. compaction, filling and the report -------------------------------------------------------

@torch.no_grad()
def compact(masked):
    """Bake the masks (at the final threshold) into the weights and cut out what they killed: heads
    that no longer change the output and FFN units whose row and column are masked. The result is a
    plain BertForQuestionAnswering with per-layer head counts and FFN widths; a layer may keep 0 heads."""
    model, m = masked.model, masked.masks(masked.config.final_threshold)
    baked = {k: v * m[k] if k in m else v for k, v in model.state_dict().items()}
    s = masked.structure(masked.config.final_threshold)
    small = BertForQuestionAnswering(replace(model.config, num_attention_heads=s["heads"], intermediate_size=s["ffn"]))
    state = {}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        rows = (heads_alive({n: m[p + n + ".weight"] for n in ATTENTION}, layer.heads)
                if layer.heads else torch.zeros(0, dtype=torch.bool)).repeat_interleave(layer.head_size)
        units = m[p + "ffn_in.bias"] > 0
        for name in ("query", "key", "value"):
            state[p + name + ".weight"] = baked[p + name + ".weight"][rows]
            state[p + name + ".bias"] = baked[p + name + ".bias"][rows]
        state[p + "attn_out.weight"] = baked[p + "attn_out.weight"][:, rows]
        state[p + "ffn_in.weight"] = baked[p + "ffn_in.weight"][units]
        state[p + "ffn_in.bias"] = baked[p + "ffn_in.bias"][units]
        state[p + "ffn_out.weight"] = baked[p + "ffn_out.weight"][:, units]
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


def report(model, dense_config):
    """Per layer heads and FFN width kept, linear parameters kept (of the dense model's), total parameters."""
    c = model.config
    rows = [{"layer": i, "heads": n, "ffn": f,
             "linear_params": 4 * n * c.attention_head_size * c.hidden_size + 2 * f * c.hidden_size}
            for i, (n, f) in enumerate(zip(c.num_attention_heads, c.intermediate_size))]
    kept, dense = linear_params(c), linear_params(dense_config)
    return {"layers": rows, "heads": sum(c.num_attention_heads), "heads_dense": sum(dense_config.num_attention_heads),
            "linear_params": kept, "linear_params_dense": dense, "linear_density": kept / dense,
            "total_params": model.num_parameters()}


def format_report(r):
    lines = ["layer  heads   ffn  linear params"]
    lines += [f"{x['layer']:>5} {x['heads']:>6} {x['ffn']:>5} {x['linear_params']:>14,}" for x in r["layers"]]
    lines.append(f"total {r['heads']:>6}/{r['heads_dense']}  linear params {r['linear_params']:,} of "
                 f"{r['linear_params_dense']:,} ({100 * r['linear_density']:.1f} %), all params {r['total_params']:,}")
    return "\n".join(lines)


def plot_report(r, path):
    """Bars of heads and FFN width per layer, as a PNG; skipped (returns False) without matplotlib."""
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
    fig.suptitle(f"{100 * r['linear_density']:.1f} % of linear parameters kept")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- checkpoints of a masked model: the BERT as bert.py saves it, plus the scores -----------------

def save_masked(masked, out_dir, vocab_file=None):
    masked.model.save_pretrained(out_dir, vocab_file)
    write_safetensors(Path(out_dir) / "scores.safetensors", {k: v.detach() for k, v in masked.scores.items()})
    atomic_write(Path(out_dir) / "prune_config.json", json.dumps(asdict(masked.config), indent=2).encode())


def load_masked(path):
    path = Path(path)
    if not (path / "scores.safetensors").exists():
        raise FileNotFoundError(f"{path}: no scores.safetensors: not a pruned (masked) checkpoint")
    config = PruneConfig(**json.loads((path / "prune_config.json").read_text()))
    masked = MaskedBert(BertForQuestionAnswering.from_pretrained(path), config)
    scores = read_safetensors(path / "scores.safetensors")
    if scores.keys() != masked.scores.keys():
        raise ValueError(f"{path / 'scores.safetensors'}: scores {sorted(set(scores) ^ set(masked.scores))} "
                         f"do not fit the model")
    with torch.no_grad():
        for k, v in scores.items():
            masked.scores[k].copy_(v)
    return masked
