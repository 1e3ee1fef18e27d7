import contextlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

import bert
import files
from bench import transformers_twin
from bert import BertConfig, BertForQuestionAnswering

transformers = pytest.importorskip("transformers")


def tiny_config(**kw):
    return BertConfig(**{"vocab_size": 99, "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                         "intermediate_size": 80, "max_position_embeddings": 64, **kw})


def random_weights(model):
    # non-trivial biases and LayerNorms too, so that a swapped or dropped tensor shows
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() < 2 else p.normal_(0, 0.05)
    return model.eval()


def batch(vocab_size, B=3, T=24):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 17:] = 0  # padding
    mask[2, 5:] = 0
    types = torch.zeros(B, T, dtype=torch.long)
    types[:, 9:] = 1
    return ids, mask, types


def assert_same_logits(ours, hf, vocab_size, padding=True):
    ids, mask, types = batch(vocab_size)
    if not padding:  # no padding: transformers gets a mask of ones, our model None (train_squad.batches' way)
        mask = torch.ones_like(mask)
    with torch.no_grad():
        s, e = ours(ids, mask if padding else None, types)
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(s, out.start_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(e, out.end_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("padding", [True, False])
def test_logits_match_transformers_random_config(padding):
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    assert_same_logits(model, transformers_twin(model), 99, padding)


def test_logits_match_pruned_transformers_with_uneven_layers():
    model = random_weights(BertForQuestionAnswering(tiny_config(
        num_attention_heads=[4, 1, 2], intermediate_size=[80, 7, 33], attention_head_size=12)))
    assert_same_logits(model, transformers_twin(model), 99)


@contextlib.contextmanager
def host_syncs():
    """Yields a list that collects (function, line) for each read of a tensor's value by our own code (bert.py,
    blockprune.py, report.py, bookkeeping.py, train_squad.py): item, bool, int, float, formatting, cpu... On a GPU
    each makes the host wait for the device. What torch does inside its own functions is not counted (AdamW reads
    its step counts, CPU tensors, on the host)."""
    ours = {str(Path(bert.__file__).with_name(f))
            for f in ("bert.py", "blockprune.py", "report.py", "bookkeeping.py", "train_squad.py")}
    names = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__format__")
    originals, calls = {name: getattr(torch.Tensor, name) for name in names}, []

    def counted(f):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename in ours:
                calls.append((caller.co_qualname, sys._getframe(1).f_lineno))
            return f(self, *args, **kwargs)
        return read
    try:
        for name, f in originals.items():
            setattr(torch.Tensor, name, counted(f))
        yield calls
    finally:
        for name, f in originals.items():
            setattr(torch.Tensor, name, f)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_on_cpu_is_sdpa_within_rounding(dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 24, 16, generator=g) for _ in range(3))
    ids, mask, types = batch(99)
    attend = mask[:, None, None, :].bool()
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attend)
    want = want.transpose(1, 2).reshape(3, 24, 64)  # the heads side by side
    got = bert.attention(q.to(dtype), k.to(dtype), v.to(dtype), attend, 0.0)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.02)
    assert torch.equal(bert.attention(q, k, v, attend, 0.0), want)  # fp32: SDPA itself


def test_forward_never_waits_for_the_device():
    import blockprune as bp
    import report
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    ids, mask, types = batch(99)
    masked = bp.MaskedBert(model, bp.PruneConfig(block="4x4"))
    masked.threshold = torch.tensor(0.3)  # as the target-density schedule leaves it: a tensor
    with host_syncs() as calls:
        model(ids, mask, types), model(ids, None, types), masked.train()(ids, mask, types), masked.eval()(ids)
    assert calls == []
    with host_syncs() as calls:  # the counter sees our code's reads: structure() counts heads with int(...)
        report.structure(masked)
    assert calls and all(f.startswith("structure") for f, _ in calls)


@pytest.mark.skipif(not shutil.which("cc") and not shutil.which("gcc"), reason="torch.compile needs a C compiler")
def test_compiled_model_gives_the_eager_logits():
    model = random_weights(BertForQuestionAnswering(tiny_config(num_hidden_layers=1)))
    ids, mask, types = batch(99)
    with torch.no_grad():
        want, got = model(ids, mask, types), torch.compile(model)(ids, mask, types)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"])
def test_logits_match_transformers_on_real_checkpoints(shared, name):
    path = shared / "models" / name
    ours = files.load_pretrained(path).eval()
    assert ours.config.attention_head_size == 32  # 384 / 12, not 64
    hf = transformers.BertForQuestionAnswering.from_pretrained(path).eval()
    hf.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())  # neither checkpoint has a QA head
    assert_same_logits(ours, hf, ours.config.vocab_size)


class Pooled(torch.nn.Module):
    """The encoder and its pooler: transformers' BertModel's pooler_output."""

    def __init__(self, config):
        super().__init__()
        self.config, self.bert = config, bert.Bert(config, pooler=True)
        self.apply(self.bert.init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.bert.pool(self.bert(input_ids, attention_mask, token_type_ids))


def test_the_pooler_is_loaded_when_the_model_has_one_and_pools_as_transformers(shared):
    path = shared / "models" / "all-MiniLM-L6-v2"  # a checkpoint with pooler weights
    ours = files.load_pretrained(path, Pooled).eval()
    hf = transformers.BertModel.from_pretrained(path).eval()
    torch.testing.assert_close(ours.bert.pooler.weight, hf.pooler.dense.weight, atol=0, rtol=0)
    ids, mask, types = batch(ours.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).pooler_output
        torch.testing.assert_close(ours(ids, mask, types), want, atol=1e-5, rtol=0)
    assert "pooler" not in str(list(files.load_pretrained(path).state_dict()))  # a QA model has none: skipped


def test_layers_without_attention_or_ffn_keep_bias_residual_and_layernorm():
    model = random_weights(BertForQuestionAnswering(tiny_config(
        num_attention_heads=[0, 4, 0], intermediate_size=[0, 80, 5], attention_head_size=12)))
    layer = model.bert.layers[0]
    x = torch.randn(2, 5, 48)
    y = layer(x, None)
    a = layer.attn_ln(x + layer.attn_out.bias)
    torch.testing.assert_close(y, layer.ffn_ln(a + layer.ffn_out.bias))
    s, _ = model(*batch(99)[:2])
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("hidden, attention", [(0.1, 0.0), (0.0, 0.1)])
def test_dropout_acts_in_training_only_on_the_hidden_states_and_the_attention(hidden, attention):
    model = random_weights(BertForQuestionAnswering(tiny_config(hidden_dropout_prob=hidden,
                                                                attention_probs_dropout_prob=attention)))
    ids, mask, types = batch(99)
    with torch.no_grad():
        evaluated = [model.eval()(ids, mask, types)[0] for _ in range(2)]
        trained = [model.train()(ids, mask, types)[0] for _ in range(2)]
    assert torch.equal(*evaluated) and not torch.equal(*trained) and not torch.equal(trained[0], evaluated[0])


def test_sequences_longer_than_the_positions_are_refused_in_one_line():
    with pytest.raises(ValueError, match="65 tokens, more than the model's max_position_embeddings 64") as e:
        BertForQuestionAnswering(tiny_config())(torch.zeros(1, 65, dtype=torch.long))
    assert "\n" not in str(e.value)


def test_config_rejects_wrong_per_layer_lengths():
    with pytest.raises(ValueError, match="num_attention_heads must be"):
        tiny_config(num_attention_heads=[4, 4], attention_head_size=12)


def test_training_steps_match_transformers_from_the_same_qa_head(shared):
    # the teacher-parity question (does our BERT train as well as transformers'?) without seed noise: the
    # same start (QA head copied), dropout off, the same real SQuAD windows, 5 AdamW steps: the same losses
    import squad
    import train_squad as ts
    path = shared / "models/paraphrase-MiniLM-L3-v2"
    ours = files.load_pretrained(path).eval()  # eval: no dropout, both still learn
    hf = transformers.BertForQuestionAnswering.from_pretrained(path, attn_implementation="sdpa").eval()
    hf.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())
    examples = squad.load_squad(shared / "squad/train-v1.1-head4370.json")[:40]
    f = squad.featurize(examples, squad.load_tokenizer(path / "vocab.txt"), 128, 32, train=True)
    losses = {}
    for name, model, call in (("ours", ours, lambda *x: ours(*x)),
                              ("hf", hf, lambda i, m, t: tuple(hf(input_ids=i, attention_mask=m, token_type_ids=t)
                                                              .to_tuple()[:2]))):
        opt, losses[name] = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-8, weight_decay=0.0), []
        for step in range(5):
            ids, mask, types, s_pos, e_pos = ts.batches(f, torch.arange(8 * step, 8 * step + 8), "cpu", (
                "input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"))
            s, e = call(ids, mask, types)
            loss = (torch.nn.functional.cross_entropy(s, s_pos) + torch.nn.functional.cross_entropy(e, e_pos)) / 2
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
    assert losses["ours"] == pytest.approx(losses["hf"], rel=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]  # it learns


def test_imports_run_one_way():
    # the model imports nothing of ours, the method nothing either (it knows nothing of SQuAD, of files, of costs);
    # what is ours beside them imports them, the scripts import the rest
    import ast
    root = Path(__file__).resolve().parents[1]
    ours = {p.stem for p in root.glob("*.py")}

    def imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names & ours
    assert imports("bert") == imports("blockprune") == set()
    assert imports("cost_model") == {"bert"} and imports("report") == {"blockprune", "cost_model"}
    assert imports("files") == {"bert", "blockprune"} and imports("squad") == {"files"}
    assert imports("bookkeeping") == {"blockprune", "files", "report", "squad"}
    assert imports("deploy") == {"bert", "files"}
    assert imports("train_squad") == {"bert", "blockprune", "bookkeeping", "cost_model", "deploy", "files", "report",
                                      "squad"}


def test_the_pruner_names_no_task():
    # the method and what is ours beside it prune any model built on bert.Bert: no QA model, no start and end logits
    root = Path(__file__).resolve().parents[1]
    for name in ("blockprune.py", "cost_model.py", "report.py"):
        text = (root / name).read_text()
        for word in ("BertForQuestionAnswering", "qa_outputs", "QA head", "start_positions", "start_logits"):
            assert word not in text, (name, word)
