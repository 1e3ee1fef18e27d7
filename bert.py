"""
BERT (Devlin et al. 2019) from scratch in plain PyTorch: the whole model, and nothing else.

- BertConfig: the sizes, as Hugging Face's config.json gives them; heads and FFN width may differ from layer to
  layer (0 allowed), which is what a pruned and compacted BERT needs.
- Layer: one post-LayerNorm encoder layer. Bert: the embeddings and the layers (the encoder), with BERT's pooler
  when a task wants it.
- BertForQuestionAnswering: the encoder and a start/end logit per token (SQuAD). A classifier is the same few
  lines with another head (docs/forking.md).
- Hugging Face's tensor names in and out (load_hf_state_dict, hf_state_dict), so that checkpoints move between
  this model and transformers'. Reading and writing the files is files.py's job.

Imports nothing of this project.
"""
import math
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int | list = 12  # an int for every layer, or one count per layer (0 allowed)
    intermediate_size: int | list = 3072  # FFN width, likewise (0 allowed)
    attention_head_size: int = 0  # 0: hidden_size // num_attention_heads (must then be an int)
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    pad_token_id: int = 0  # [PAD]: its embedding gets no gradient (as in BERT and transformers)

    def __post_init__(self):
        # every field checked here, so that a config.json that lies fails in one line when it is read, not as a
        # shape error (or garbage) at the first forward pass
        def check(name, ok, expected):
            if not ok(getattr(self, name)):
                raise ValueError(f"BertConfig: {name} must be {expected}, got {getattr(self, name)!r}")
        integer, number = (lambda v: type(v) is int), (lambda v: type(v) in (int, float) and math.isfinite(v))
        for name in ("vocab_size", "hidden_size", "max_position_embeddings", "type_vocab_size"):
            check(name, lambda v: integer(v) and v > 0, "an integer above 0")
        for name in ("num_hidden_layers", "attention_head_size"):
            check(name, lambda v: integer(v) and v >= 0, "an integer >= 0")
        check("pad_token_id", lambda v: integer(v) and 0 <= v < self.vocab_size,
              f"an id below vocab_size {self.vocab_size}")
        check("layer_norm_eps", lambda v: number(v) and v > 0, "a number above 0")
        check("initializer_range", lambda v: number(v) and v >= 0, "a number >= 0")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check(name, lambda v: number(v) and 0 <= v < 1, "a probability in [0, 1)")
        if not self.attention_head_size:
            check("num_attention_heads", lambda v: integer(v) and v > 0 and self.hidden_size % v == 0,
                  f"a divisor of hidden_size {self.hidden_size} (or give attention_head_size and one count per layer)")
            self.attention_head_size = self.hidden_size // self.num_attention_heads
        # from here on both are per-layer lists
        for name in ("num_attention_heads", "intermediate_size"):
            v = getattr(self, name)
            v = [v] * self.num_hidden_layers if isinstance(v, int) else list(v)
            if len(v) != self.num_hidden_layers or any(type(x) is not int or x < 0 for x in v):
                raise ValueError(f"BertConfig: {name} must be an int or {self.num_hidden_layers} ints >= 0, got {v}")
            setattr(self, name, v)

    @classmethod
    def from_dict(cls, d):
        """From a Hugging Face or blockprune config.json; unknown keys are ignored."""
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config: only hidden_act 'gelu' and absolute positions are supported, got "
                             f"{d.get('hidden_act')!r} / {d.get('position_embedding_type')!r}")
        if pruned := d.get("pruned_heads"):  # transformers 4.x prune_heads(): {"layer": [heads]}, narrowed tensors
            n = d["num_attention_heads"]
            d = {**d, "attention_head_size": d["hidden_size"] // n, "num_attention_heads": [
                n - len(set(pruned.get(str(i), []))) for i in range(d["num_hidden_layers"])]}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def to_dict(self):
        d = asdict(self)
        if (len(set(self.num_attention_heads)) == 1
                and self.num_attention_heads[0] * self.attention_head_size == self.hidden_size):
            d["num_attention_heads"] = self.num_attention_heads[0]  # uniform: stays readable by transformers
        if len(set(self.intermediate_size)) == 1:
            d["intermediate_size"] = self.intermediate_size[0]
        return {"model_type": "bert", "hidden_act": "gelu", **d}


class Layer(nn.Module):
    """One post-LayerNorm encoder layer (Vaswani et al. 2017; Devlin et al. 2019).
    With 0 heads (or FFN width 0) the Linears are empty: the matmuls and attention are skipped,
    the output bias, the residual and the LayerNorm stay, as in the masked model it came from."""

    def __init__(self, config, heads, ffn):
        super().__init__()
        h, d = config.hidden_size, heads * config.attention_head_size
        self.heads, self.head_size = heads, config.attention_head_size
        with warnings.catch_warnings():  # "initializing zero-element tensors is a no-op": expected for 0 heads
            warnings.simplefilter("ignore")
            self.query, self.key, self.value = nn.Linear(h, d), nn.Linear(h, d), nn.Linear(h, d)
            self.attn_out = nn.Linear(d, h)
            self.ffn_in = nn.Linear(h, ffn)
            self.ffn_out = nn.Linear(ffn, h)
        self.attn_ln = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_ln = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.attn_dropout = config.attention_probs_dropout_prob
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, attend):
        B, T, _ = x.shape
        if self.heads:
            q, k, v = (lin(x).view(B, T, self.heads, self.head_size).transpose(1, 2)
                       for lin in (self.query, self.key, self.value))  # (B, heads, T, head_size) each
            # softmax(q k^T / sqrt(head_size)) v per head; attend: (B, 1, 1, T) booleans, or None
            a = self.attn_out(attention(q, k, v, attend, self.attn_dropout if self.training else 0.0))
        else:
            a = self.attn_out.bias  # what an all-zero attention output leaves
        x = self.attn_ln(x + self.dropout(a))
        f = self.ffn_out(F.gelu(self.ffn_in(x))) if self.ffn_in.out_features else self.ffn_out.bias
        return self.ffn_ln(x + self.dropout(f))


def attention(q, k, v, attend, dropout_p):
    """Scaled dot-product attention: q, k, v (B, heads, T, head_size) -> (B, T, heads * head_size), the heads side
    by side. PyTorch's fused kernel (flash or memory-efficient on GPU, flash on CPU in fp32), except in bf16 / fp16
    on CPU, where it runs far below the matrix products' speed. There the three plain steps, one sequence at a time
    so that its (heads, T, T) scores stay in the cache, are faster (2 threads, batch 8 x 384, bf16, per layer: 12
    heads 32 -> 18 ms, 5 heads 13 -> 8 ms; all sequences at once 37 ms for 12 heads; a d26 forward cast to bf16
    681 -> 610 ms, dense 1882 -> 1838)."""
    B, H, T, hs = q.shape
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p).transpose(1, 2) \
            .reshape(B, T, H * hs)
    out = q.new_empty(B, T, H, hs)
    for i in range(B):
        s = (q[i] * hs ** -0.5) @ k[i].transpose(-1, -2)  # (heads, T, T)
        if attend is not None:
            s = s.masked_fill(~attend[i], float("-inf"))
        out[i] = (F.dropout(s.softmax(-1), dropout_p) @ v[i]).transpose(0, 1)
    return out.view(B, T, H * hs)


class Bert(nn.Module):
    """The encoder: token, position and segment embeddings, then the layers. (B, T) token ids -> (B, T, hidden)
    states. With pooler=True it also holds BERT's pooler (the [CLS] state through a dense layer and tanh: `pool`),
    which sentence classifiers read (transformers' BertForSequenceClassification); question answering does not.
    A model built on it calls `self.apply(self.bert.init_weights)` once its own head exists."""

    def __init__(self, config, pooler=False):
        super().__init__()
        self.config = config
        h = config.hidden_size
        # padding_idx: the [PAD] row learns nothing from padded positions, whose logits the loss still sees
        self.word_embeddings = nn.Embedding(config.vocab_size, h, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, h)
        self.embeddings_ln = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(config, n, f) for n, f in
                                    zip(config.num_attention_heads, config.intermediate_size))
        self.pooler = nn.Linear(h, h) if pooler else None

    def init_weights(self, m):
        """BERT's initialisation of one module: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(m, (nn.Linear, nn.Embedding)):
            if m.weight.numel():
                nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:  # else a bare IndexError from the embedding lookup
            raise ValueError(f"sequences of {T} tokens, more than the model's max_position_embeddings "
                             f"{self.config.max_position_embeddings}: shorten them (train_squad.py: --max_seq_length)")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        pos = torch.arange(T, device=input_ids.device)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(pos)
             + self.token_type_embeddings(token_type_ids))  # (B, T, hidden)
        x = self.dropout(self.embeddings_ln(x))
        # attention_mask (transformers' name): 1 for tokens, 0 for padding. Every query may attend to the keys
        # that are not padding. A batch without padding should come with None: SDPA then adds no bias to every
        # score and may take its fastest kernels. (The caller knows: asking attention_mask.all() here would make
        # the host wait for the GPU at every forward.)
        attend = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, attend)
        return x

    def pool(self, x):
        """(B, T, hidden) states -> (B, hidden): what BERT's pre-training taught the [CLS] position to sum up."""
        return torch.tanh(self.pooler(x[:, 0]))


class BertForQuestionAnswering(nn.Module):
    """The encoder and a start and an end logit per token: (B, T) ids -> (B, T) start, (B, T) end."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.bert = Bert(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.apply(self.bert.init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = self.qa_outputs(self.bert(input_ids, attention_mask, token_type_ids)).float().unbind(-1)
        return start, end


# ---- Hugging Face names: ours <-> transformers' ---------------------------------------------------------------
# Ours: bert.word_embeddings.weight, bert.layers.3.query.weight, qa_outputs.weight. Transformers': bert.embeddings.
# word_embeddings.weight, bert.encoder.layer.3.attention.self.query.weight, qa_outputs.weight (sentence-transformers
# checkpoints leave out the "bert."). A task's head (qa_outputs, classifier) has the same name in both.

_HF_NAMES = [  # (transformers' name fragment, ours), most specific first
    ("embeddings.word_embeddings.", "word_embeddings."),
    ("embeddings.position_embeddings.", "position_embeddings."),
    ("embeddings.token_type_embeddings.", "token_type_embeddings."),
    ("embeddings.LayerNorm.", "embeddings_ln."),
    ("attention.self.query.", "query."),
    ("attention.self.key.", "key."),
    ("attention.self.value.", "value."),
    ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_ln."),
    ("intermediate.dense.", "ffn_in."),
    ("output.dense.", "ffn_out."),
    ("output.LayerNorm.", "ffn_ln."),
    ("pooler.dense.", "pooler."),
]


def from_hf_name(k):
    """'bert.encoder.layer.3.attention.self.query.weight' -> 'bert.layers.3.query.weight'. None for what no model
    here uses (pretraining heads, position_ids); a name that is neither comes back as it is (a task's head)."""
    if k.startswith("cls.") or k.endswith("position_ids"):
        return None
    rest = k.removeprefix("bert.")
    if not rest.startswith(("embeddings.", "encoder.", "pooler.")):
        return k
    rest = rest.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")  # TF-era
    rest = rest.replace("encoder.layer.", "layers.")
    for hf, ours in _HF_NAMES:
        if hf in rest:
            return "bert." + rest.replace(hf, ours)
    return k


def to_hf_name(k):
    """The inverse of from_hf_name, so that transformers can read the checkpoints we write."""
    if not k.startswith("bert."):
        return k
    prefix, rest = "", k.removeprefix("bert.")
    if rest.startswith("layers."):
        i, rest = rest.removeprefix("layers.").split(".", 1)
        prefix = f"encoder.layer.{i}."
    for hf, ours in _HF_NAMES:
        if rest.startswith(ours):
            return "bert." + prefix + hf + rest[len(ours):]
    raise KeyError(f"no transformers name for {k}")


def hf_state_dict(model):
    """The model's tensors under transformers' names."""
    return {to_hf_name(k): v for k, v in model.state_dict().items()}


@torch.no_grad()
def load_hf_state_dict(model, state, source="state dict"):
    """Copy tensors named as in transformers' BertModel / BertFor... into a model built on Bert. Returns the names
    of the tensors the checkpoint lacks that are the task's head's (a pretrained BERT has none: they keep their
    initialisation); any other mismatch is a ValueError with counts, an example or two, and the config values
    the shapes contradict."""
    ours = model.state_dict()
    loaded, unexpected, misshapen = set(), [], {}
    for k, v in state.items():
        name = from_hf_name(k)
        if name is None or name.startswith("bert.pooler.") and name not in ours:
            continue  # pretraining heads, position_ids; the pooler, when the model has none
        if name not in ours:
            unexpected.append(k)
        elif ours[name].shape != v.shape:
            misshapen[name] = (k, tuple(v.shape))
        else:
            ours[name].copy_(v)
            loaded.add(name)
    missing = [to_hf_name(k) for k in ours if k not in loaded and k not in misshapen]
    head = [k for k in missing if not k.startswith("bert.")]
    if len(head) == len(missing) and not (unexpected or misshapen):
        return head
    # a config of another model differs in most tensors: count them, show one or two, and name the config values
    # behind the dimensions that differ (the layer count from the layer indices)
    c, hints = model.config, {}
    n = 1 + max((int(m.split(".")[2]) for m in map(from_hf_name, state) if m and m.startswith("bert.layers.")),
                default=-1)
    if n and n != c.num_hidden_layers:
        hints["num_hidden_layers"] = (c.num_hidden_layers, n)
    for name, (_, shape) in misshapen.items():
        for dim, (want, got) in enumerate(zip(ours[name].shape, shape)):
            if want != got and (field := _config_field(name, dim)):
                hints.setdefault(field, (want, got))
    hints = sorted(hints.items(), key=lambda h: h[0] != "hidden_size")[:3]  # hidden_size changes all others
    parts = []
    if misshapen:
        ex = [f"{k}: {got} in the file, {tuple(ours[m].shape)} expected" for m, (k, got) in misshapen.items()]
        parts.append(f"{len(ex)} tensors of another shape (e.g. {'; '.join(ex[:2])})")
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            parts.append(f"{len(names)} {what} (e.g. {names[0]})")
    raise ValueError(f"{source} does not fit the model of its config: {', '.join(parts)}" + "".join(
        f"; config says {f} {a}, the weights {b}" for f, (a, b) in hints))


def _config_field(name, dim):
    """The config value behind dimension dim of our tensor name (None for a task head's outputs)."""
    kind = name.split(".")[-2]  # word_embeddings, query, ffn_in, qa_outputs...
    heads = "num_attention_heads x attention_head_size"
    if not name.startswith("bert."):
        return "hidden_size" if dim == 1 else None
    if dim == 0:
        return {"word_embeddings": "vocab_size", "position_embeddings": "max_position_embeddings",
                "token_type_embeddings": "type_vocab_size", "query": heads, "key": heads, "value": heads,
                "ffn_in": "intermediate_size"}.get(kind, "hidden_size")
    return {"attn_out": heads, "ffn_out": "intermediate_size"}.get(kind, "hidden_size")
