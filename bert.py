"""
BERT for extractive question answering, from scratch in plain PyTorch.

One file holds the whole model: a dataclass config, the embeddings, post-LayerNorm encoder
layers whose head count and FFN width may differ from layer to layer (what a pruned and
compacted model needs), the QA head, and loading/saving of Hugging Face BERT checkpoints
(safetensors read and written without the safetensors package). Its last section is the
project's file plumbing (atomic writes, downloads, the hub cache), here because this file imports
nothing else from the project and the others import it: skip it on a first read.
"""
import hashlib
import http.client
import io
import json
import os
import shutil
import struct
import sys
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent / "data"


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
        if not self.attention_head_size:
            if not isinstance(self.num_attention_heads, int) or self.num_attention_heads <= 0:
                raise ValueError("BertConfig: attention_head_size is needed when num_attention_heads is a list")
            self.attention_head_size = self.hidden_size // self.num_attention_heads
        # from here on both are per-layer lists
        for name in ("num_attention_heads", "intermediate_size"):
            v = getattr(self, name)
            v = [v] * self.num_hidden_layers if isinstance(v, int) else list(v)
            if len(v) != self.num_hidden_layers or any(not isinstance(x, int) or x < 0 for x in v):
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
        return {"model_type": "bert", "architectures": ["BertForQuestionAnswering"], "hidden_act": "gelu", **d}


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
                       for lin in (self.query, self.key, self.value))
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


class BertForQuestionAnswering(nn.Module):

    def __init__(self, config):
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
        self.qa_outputs = nn.Linear(h, 2)  # start and end logit per token
        self.apply(self._init_weights)

    def _init_weights(self, m):
        # BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm
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
             + self.token_type_embeddings(token_type_ids))
        x = self.dropout(self.embeddings_ln(x))
        # attention_mask (transformers' name): 1 for tokens, 0 for padding. Every query may attend to the keys
        # that are not padding. A batch without padding should come with None: SDPA then adds no bias to every
        # score and may take its fastest kernels. (The caller knows: asking attention_mask.all() here would make
        # the host wait for the GPU at every forward.)
        attend = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        for layer in self.layers:
            x = layer(x, attend)
        start, end = self.qa_outputs(x).float().unbind(-1)
        return start, end

    # ---- checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_dir, cache_dir=None):
        """Load a Hugging Face BERT checkpoint (or one of ours) from a directory or a hub name."""
        d = resolve_checkpoint(name_or_dir, cache_dir)
        config_path = d / "config.json"
        try:  # a list, strings or negative sizes surface as TypeError, AttributeError or RuntimeError
            model = cls(BertConfig.from_dict(json.loads(config_path.read_text())))
        except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as e:
            raise ValueError(f"{config_path}: not a usable BERT config ({e})") from None
        weights = d / "model.safetensors"
        if weights.exists():
            state = read_safetensors(weights)
        else:
            weights = d / "pytorch_model.bin"
            if not weights.exists():
                raise FileNotFoundError(f"{d}: no weights (expected model.safetensors or pytorch_model.bin)")
            try:
                state = torch.load(weights, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several kinds, some a page long that advise weights_only=False
                raise ValueError(f"{weights}: not a readable PyTorch checkpoint (torch.load: {type(e).__name__}); "
                                 f"cut off, or more than tensors in it?") from None
        model.load_hf_state_dict(state, source=str(weights))
        return model

    def load_hf_state_dict(self, state, source="state dict"):
        """Copy tensors named as in transformers' BertModel / BertForQuestionAnswering into this model;
        a mismatch is reported with counts, an example or two, and the config values the shapes contradict."""
        ours = self.state_dict()
        loaded, unexpected, misshapen = set(), [], {}
        for k, v in state.items():
            name = from_hf_name(k)
            if name is None:
                continue  # pooler, position_ids, pretraining heads: not part of a QA model
            if name not in ours:
                unexpected.append(k)
            elif ours[name].shape != v.shape:
                misshapen[name] = (k, tuple(v.shape))
            else:
                ours[name].copy_(v)
                loaded.add(name)
        missing = [to_hf_name(k) for k in ours if k not in loaded and k not in misshapen]
        if missing == ["qa_outputs.weight", "qa_outputs.bias"]:
            log(f"{source}: no QA head in the checkpoint; qa_outputs initialised at random")
            missing = []
        if missing or unexpected or misshapen:
            # a config of another model differs in most tensors: count them, show one or two, and name the
            # config values behind the dimensions that differ (the layer count from the layer indices)
            c, hints = self.config, {}
            n = 1 + max((int(m.split(".")[1]) for m in map(from_hf_name, state) if m and m.startswith("layers.")),
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

    def save_pretrained(self, out_dir, vocab_file=None, extra_files=None):
        """config.json + model.safetensors (Hugging Face names) + vocab.txt (+ extra_files, {name: bytes}),
        written as one unit (write_files): a crash leaves the old checkpoint or the new one, never a mix."""
        files = {"config.json": json.dumps(self.config.to_dict(), indent=2).encode(),
                 "model.safetensors": safetensors_bytes({to_hf_name(k): v for k, v in self.state_dict().items()}),
                 **({"vocab.txt": Path(vocab_file).read_bytes()} if vocab_file is not None else {}),
                 **(extra_files or {})}
        # an older checkpoint's files that would otherwise lie beside the new weights: pickled weights, and a pruned
        # checkpoint's scores (blockprune.save_masked), which would make the new one load as a masked model
        write_files(out_dir, files, remove=("pytorch_model.bin", "scores.safetensors", "prune_config.json"))

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())


# ---- names: ours <-> transformers' -----------------------------------------------------------

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
]


def from_hf_name(k):
    """'bert.encoder.layer.3.attention.self.query.weight' -> 'layers.3.query.weight'. None for the
    tensors a QA model has no use for (pooler, pretraining heads, position_ids); a name that is
    neither comes back as it is, and is then reported as unexpected."""
    k = k.removeprefix("bert.")
    if k.startswith(("pooler.", "cls.")) or k.endswith("position_ids"):
        return None
    k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")  # TF-era names
    k = k.replace("encoder.layer.", "layers.")
    for hf, ours in _HF_NAMES:
        if hf in k:
            return k.replace(hf, ours)
    return k


def to_hf_name(k):
    """The inverse of from_hf_name, so that transformers can read the checkpoints we write."""
    if k.startswith("qa_outputs."):
        return k
    prefix, rest = "", k
    if k.startswith("layers."):
        i, rest = k.removeprefix("layers.").split(".", 1)
        prefix = f"encoder.layer.{i}."
    for hf, ours in _HF_NAMES:
        if rest.startswith(ours):
            return "bert." + prefix + hf + rest[len(ours):]
    raise KeyError(f"no transformers name for {k}")


def _config_field(name, dim):
    """The config value behind dimension dim of our tensor name (None for the QA head's 2 outputs)."""
    kind = name.split(".")[-2]  # word_embeddings, query, ffn_in, qa_outputs...
    heads = "num_attention_heads x attention_head_size"
    if dim == 0:
        return {"word_embeddings": "vocab_size", "position_embeddings": "max_position_embeddings",
                "token_type_embeddings": "type_vocab_size", "query": heads, "key": heads, "value": heads,
                "ffn_in": "intermediate_size", "qa_outputs": None}.get(kind, "hidden_size")
    return {"attn_out": heads, "ffn_out": "intermediate_size"}.get(kind, "hidden_size")


# ---- safetensors without the package: 8-byte header length, JSON header, raw little-endian bytes ----

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path):
    path = Path(path)
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n > len(data):  # else a cut-off header that is still valid JSON ('{}') reads as no tensors
            raise ValueError(f"the header length {n} runs past the end of the file, {len(data)} bytes")
        header = json.loads(data[8:8 + n])
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    out, base = {}, 8 + n
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {t['dtype']}")
        lo, hi = t["data_offsets"]
        if base + hi > len(data):
            raise ValueError(f"{path}: truncated (tensor {name} ends at byte {base + hi}, file has {len(data)})")
        buf = bytearray(data[base + lo:base + hi])
        out[name] = torch.frombuffer(buf, dtype=_DTYPES[t["dtype"]]).reshape(t["shape"]) if buf else \
            torch.empty(t["shape"], dtype=_DTYPES[t["dtype"]])
    return out


def write_safetensors(path, tensors):
    atomic_write(path, safetensors_bytes(tensors))


def safetensors_bytes(tensors):
    names = {v: k for k, v in _DTYPES.items()}
    # as the safetensors package writes it: transformers 4.x reads metadata.get("format") and fails without it
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


# ---- files: atomic writes, downloads, the hub ---------------------------------------------------

def log(msg):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process speaks for all
        print(msg, file=sys.stderr, flush=True)


def atomic_write(path, data):
    """Write bytes to a temporary file beside path and rename it over path: a crash leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, no permission: name the file meant, not the temporary one
        raise OSError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(d):
    """Delete the temporary files (.NAME.tmpPID) that atomic_write left in d when its process was killed; a live
    process's are its own."""
    for tmp in Path(d).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)  # raises if no such process; PermissionError: alive, someone else's
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass


def save_torch(path, obj):
    """torch.save into a file written atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def load_cache(path, what, fits=lambda obj: True):
    """A cache file's contents; None (with a line saying why) when it is missing, unreadable or does not fit."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=True)
        if fits(obj):
            return obj
        log(f"{path}: cached {what} that do not fit these windows; computing them again")
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        log(f"{path}: unreadable cache ({e!r}); computing the {what} again")
    return None


def write_files(d, files, remove=()):
    """Write {file name: bytes} into directory d as one unit, so that a crash (kill -9, a full disk) leaves
    the old files or the new ones, never a config.json beside another model's weights. The files go into
    d/.incoming; renaming it to d/.commit is the commit point; then the names in `remove` that the new files
    lack are deleted and each file is moved into place. finish_write completes a commit that a crash cut
    short; every reader of a checkpoint calls it first (resolve_checkpoint). Other files in d are left alone."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    finish_write(d)
    new = d / ".incoming"
    new.mkdir()
    for name, data in files.items():
        atomic_write(new / name, data)  # fsynced
    atomic_write(new / ".remove", json.dumps([r for r in remove if r not in files]).encode())
    os.replace(new, d / ".commit")
    finish_write(d)


def finish_write(d):
    """Drop a write_files unit that never reached its commit point; complete one that did."""
    d = Path(d)
    if (d / ".incoming").is_dir():
        shutil.rmtree(d / ".incoming")
    commit = d / ".commit"
    if commit.is_dir():
        remove = commit / ".remove"  # written before the commit point, deleted last
        for name in json.loads(remove.read_text()) if remove.exists() else []:
            (d / name).unlink(missing_ok=True)
        for f in commit.iterdir():
            if f != remove:
                os.replace(f, d / f.name)
        remove.unlink(missing_ok=True)
        commit.rmdir()


def download(url, path, md5=None):
    """Download url to path (atomically), checking the length and, if given, the md5. A file the server does not
    have raises FileNotFoundError; a server that cannot be reached, ConnectionError (the callers suggest a manual
    download); a download cut off, corrupt or that cannot be written, OSError. Nothing is saved then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    log(f"downloading {url} -> {path}")
    try:
        try:
            r = urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as e:  # the server answered: no such file (404), or it refuses
            raise (FileNotFoundError if e.code == 404 else ConnectionError)(
                f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError (no route, refused), a timeout
            raise ConnectionError(f"could not download {url}: {getattr(e, 'reason', None) or e}") from None
        got, h = 0, hashlib.md5()
        with r, open(tmp, "wb") as f:
            expected = int(r.headers.get("Content-Length") or -1)
            try:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
            except (OSError, http.client.HTTPException) as e:  # reset or timed out mid-way, IncompleteRead, disk full
                raise OSError(f"download of {url} stopped after {got} bytes ({e!r}); nothing saved") from None
        if expected >= 0 and got != expected:
            raise OSError(f"download of {url} cut off after {got} of {expected} bytes; nothing saved")
        if md5 is not None and h.hexdigest() != md5:
            raise OSError(f"download of {url} has md5 {h.hexdigest()}, expected {md5}; nothing saved")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_checkpoint(name_or_dir, cache_dir=None):
    """A local directory as it is; a hub name ('bert-base-uncased') downloaded once into the cache."""
    p = Path(name_or_dir)
    if p.is_dir():
        finish_write(p)  # a checkpoint whose writing a crash cut short after its commit point
        return p
    if p.exists() or str(name_or_dir).startswith((".", "/")) or str(name_or_dir).count("/") > 1:
        raise FileNotFoundError(f"{name_or_dir}: not a checkpoint directory (expected config.json and "
                                f"model.safetensors or pytorch_model.bin in it)")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    d = Path(cache_dir or DATA_DIR / "hub") / str(name_or_dir).replace("/", "--")
    try:
        for f in ("config.json", "vocab.txt"):
            if not (d / f).exists():
                download(f"{endpoint}/{name_or_dir}/resolve/main/{f}", d / f)
        if not ((d / "model.safetensors").exists() or (d / "pytorch_model.bin").exists()):
            try:
                download(f"{endpoint}/{name_or_dir}/resolve/main/model.safetensors", d / "model.safetensors")
            except FileNotFoundError:  # older checkpoints have only the pickled weights
                download(f"{endpoint}/{name_or_dir}/resolve/main/pytorch_model.bin", d / "pytorch_model.bin")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: is '{name_or_dir}' a checkpoint's name on {endpoint}? or pass a checkpoint "
                                "directory") from None
    except ConnectionError as e:
        raise ConnectionError(f"{e}; no network? download the checkpoint elsewhere and pass its directory "
                              f"(config.json, vocab.txt, model.safetensors) instead of '{name_or_dir}'") from None
    return d
