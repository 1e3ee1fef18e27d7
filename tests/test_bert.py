import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import bert
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
    blockprune.py, train_squad.py): item, bool, int, float, formatting, cpu... On a GPU each makes the host wait
    for the device. What torch does inside its own functions is not counted (AdamW reads its step counts, CPU
    tensors, on the host)."""
    ours = {str(Path(bert.__file__).with_name(f)) for f in ("bert.py", "blockprune.py", "train_squad.py")}
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
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    ids, mask, types = batch(99)
    masked = bp.MaskedBert(model, bp.PruneConfig(block="4x4"))
    masked.threshold = torch.tensor(0.3)  # as the target-density schedule leaves it: a tensor
    with host_syncs() as calls:
        model(ids, mask, types), model(ids, None, types), masked.train()(ids, mask, types), masked.eval()(ids)
    assert calls == []
    with host_syncs() as calls:  # the counter sees our code's reads: structure() counts heads with int(...)
        masked.structure()
    assert calls and all(f.startswith("MaskedBert.structure") for f, _ in calls)


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
    ours = BertForQuestionAnswering.from_pretrained(path).eval()
    assert ours.config.attention_head_size == 32  # 384 / 12, not 64
    hf = transformers.BertForQuestionAnswering.from_pretrained(path).eval()
    hf.qa_outputs.load_state_dict(ours.qa_outputs.state_dict())  # neither checkpoint has a QA head
    assert_same_logits(ours, hf, ours.config.vocab_size)


def test_layers_without_attention_or_ffn_keep_bias_residual_and_layernorm():
    model = random_weights(BertForQuestionAnswering(tiny_config(
        num_attention_heads=[0, 4, 0], intermediate_size=[0, 80, 5], attention_head_size=12)))
    layer = model.layers[0]
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


def test_uneven_checkpoint_round_trips(tmp_path):
    model = random_weights(BertForQuestionAnswering(tiny_config(
        num_attention_heads=[0, 3, 4], intermediate_size=[12, 0, 80], attention_head_size=12)))
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n")
    model.save_pretrained(tmp_path / "ck", vocab_file=tmp_path / "v.txt")
    back = BertForQuestionAnswering.from_pretrained(tmp_path / "ck").eval()
    assert back.config == model.config
    assert (tmp_path / "ck" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_even_checkpoint_is_readable_by_transformers(tmp_path):
    from safetensors import safe_open  # a dependency of transformers
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 4
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # transformers 4.x fails without format "pt"
        assert f.metadata() == {"format": "pt"}
    assert_same_logits(model, transformers.BertForQuestionAnswering.from_pretrained(tmp_path).eval(), 99)


def test_written_safetensors_header_carries_the_format_metadata(tmp_path):
    bert.write_safetensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    data = (tmp_path / "t.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}
    assert set(bert.read_safetensors(tmp_path / "t.safetensors")) == {"a"}


def test_pytorch_bin_and_tf_era_names_load(tmp_path):
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    state = {bert.to_hf_name(k).replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in model.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(48, 48)  # skipped, not an error
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    back = BertForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_checkpoint_mismatch_names_the_tensors(tmp_path):
    model = BertForQuestionAnswering(tiny_config())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64, "num_hidden_layers": 4}))
    with pytest.raises(ValueError) as e:
        BertForQuestionAnswering.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "9 tensors of another shape (e.g. bert.encoder.layer.0.intermediate.dense.weight: (80, 48) in the file, " \
           "(64, 48) expected" in msg
    assert "16 missing (e.g. bert.encoder.layer.3.attention.self.query.weight)" in msg
    assert "config says num_hidden_layers 4, the weights 3" in msg and "intermediate_size 64, the weights 80" in msg


def test_config_of_another_size_is_reported_in_a_few_lines_naming_the_value(tmp_path):
    BertForQuestionAnswering(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError) as e:
        BertForQuestionAnswering.from_pretrained(tmp_path)
    message = str(e.value)
    assert "42 tensors of another shape" in message and "config says hidden_size 64, the weights 48" in message
    assert len(message) < 500 and message.count("\n") <= 3


def test_checkpoint_without_weights_names_both_accepted_files(tmp_path):
    BertForQuestionAnswering(tiny_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or pytorch_model.bin"):
        BertForQuestionAnswering.from_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"<html>")  # an error page saved as the weights
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        BertForQuestionAnswering.from_pretrained(tmp_path)


def test_sequences_longer_than_the_positions_are_refused_in_one_line():
    with pytest.raises(ValueError, match="65 tokens, more than the model's max_position_embeddings 64") as e:
        BertForQuestionAnswering(tiny_config())(torch.zeros(1, 65, dtype=torch.long))
    assert "\n" not in str(e.value)


def test_safetensors_round_trip_and_truncation_is_reported(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16),
               "empty": torch.zeros(4, 0)}
    bert.write_safetensors(tmp_path / "t.safetensors", tensors)
    back = bert.read_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(tensors[k], back[k]) and tensors[k].dtype == back[k].dtype for k in tensors)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="cut.safetensors: truncated"):
        bert.read_safetensors(tmp_path / "cut.safetensors")


def test_safetensors_header_length_past_the_end_is_corrupt_not_empty(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="bad.safetensors: corrupt or truncated safetensors file"):
        bert.read_safetensors(tmp_path / "bad.safetensors")


def test_missing_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        BertForQuestionAnswering.from_pretrained(tmp_path / "nope")


def test_config_rejects_wrong_per_layer_lengths():
    with pytest.raises(ValueError, match="num_attention_heads must be"):
        tiny_config(num_attention_heads=[4, 4], attention_head_size=12)


def hub_files(tmp_path, fmt="safetensors"):
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    model.save_pretrained(tmp_path / "src", vocab_file=None)
    files = {"config.json": (tmp_path / "src" / "config.json").read_bytes(), "vocab.txt": b"[PAD]\n[UNK]\n"}
    if fmt == "safetensors":
        files["model.safetensors"] = (tmp_path / "src" / "model.safetensors").read_bytes()
    else:
        import io
        buf = io.BytesIO()
        torch.save({bert.to_hf_name(k): v for k, v in model.state_dict().items()}, buf)
        files["pytorch_model.bin"] = buf.getvalue()
    return model, {f"/org/tiny-bert/resolve/main/{k}": v for k, v in files.items()}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_name_is_downloaded_once_into_the_cache(tmp_path, http_server, monkeypatch, fmt):
    model, files = hub_files(tmp_path, fmt)
    monkeypatch.setenv("HF_ENDPOINT", http_server(files))
    back = BertForQuestionAnswering.from_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache").eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    asked = list(http_server.requests)
    BertForQuestionAnswering.from_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert http_server.requests == asked  # the second load reads the cache
    cached = sorted(p.name for p in (tmp_path / "cache" / "org--tiny-bert").iterdir())
    weights = f"model.{fmt}" if fmt == "safetensors" else "pytorch_model.bin"
    assert cached == sorted(["config.json", "vocab.txt", weights])


def test_hub_download_cut_off_leaves_no_file(tmp_path, http_server, monkeypatch):
    _, files = hub_files(tmp_path)
    body = files["/org/tiny-bert/resolve/main/model.safetensors"]

    def cut_off(handler):  # promise the whole file, send half, hang up
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:len(body) // 2])

    files["/org/tiny-bert/resolve/main/model.safetensors"] = cut_off
    monkeypatch.setenv("HF_ENDPOINT", http_server(files))
    with pytest.raises(OSError, match=r"model.safetensors cut off after \d+ of \d+ bytes; nothing saved$"):
        BertForQuestionAnswering.from_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert not any(r.endswith("pytorch_model.bin") for r in http_server.requests)  # no fallback past the failure
    left = [p.name for p in (tmp_path / "cache" / "org--tiny-bert").iterdir()]
    assert "model.safetensors" not in left and not any("tmp" in n for n in left)


def test_a_download_reset_midway_is_no_network_error_and_no_reason_to_fall_back(tmp_path, http_server, monkeypatch):
    _, files = hub_files(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", http_server(files))
    urlopen = bert.urllib.request.urlopen

    def reset_after_a_chunk(url, timeout):  # the server's answer, then the connection reset inside the weights
        r = urlopen(url, timeout=timeout)
        if url.endswith("model.safetensors"):
            first = [r.read(100)]

            def read(n):
                if first:
                    return first.pop()
                raise ConnectionResetError(104, "Connection reset by peer")
            r.read = read
        return r
    monkeypatch.setattr(bert.urllib.request, "urlopen", reset_after_a_chunk)
    with pytest.raises(OSError, match=r"model.safetensors stopped after 100 bytes \(ConnectionResetError.*; nothing "
                                      r"saved$") as e:
        BertForQuestionAnswering.from_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert not isinstance(e.value, ConnectionError) and "no network" not in str(e.value)
    assert not any(r.endswith("pytorch_model.bin") for r in http_server.requests)
    assert not (tmp_path / "cache/org--tiny-bert/model.safetensors").exists()


def test_a_name_not_on_the_hub_is_said_so_not_blamed_on_the_network(tmp_path, http_server, monkeypatch):
    endpoint = http_server({})  # every path 404
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(FileNotFoundError, match=rf"^could not download {endpoint}/org/bert-base-uncasd/resolve/main/"
                                                rf"config.json: HTTP 404 .*: is 'org/bert-base-uncasd' a checkpoint's "
                                                rf"name on {endpoint}\? or pass a checkpoint directory$"):
        BertForQuestionAnswering.from_pretrained("org/bert-base-uncasd", cache_dir=tmp_path)


def test_offline_hub_name_names_the_url_and_the_way_out(tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(OSError) as e:
        BertForQuestionAnswering.from_pretrained("bert-base-uncased", cache_dir=tmp_path)
    assert f"http://127.0.0.1:{port}/bert-base-uncased/resolve/main/config.json" in str(e.value)
    assert "instead of 'bert-base-uncased'" in str(e.value)


def test_training_steps_match_transformers_from_the_same_qa_head(shared):
    # the teacher-parity question (does our BERT train as well as transformers'?) without seed noise: the
    # same start (QA head copied), dropout off, the same real SQuAD windows, 5 AdamW steps: the same losses
    import squad
    import train_squad as ts
    path = shared / "models/paraphrase-MiniLM-L3-v2"
    ours = BertForQuestionAnswering.from_pretrained(path).eval()  # eval: no dropout, both still learn
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


def test_transformers_4_checkpoint_with_pruned_heads_loads_as_the_heads_it_kept(tmp_path):
    # transformers 4.x prune_heads() narrows the tensors and records {"layer": [heads]} in config.pruned_heads;
    # the oracle: the dense transformers model with those heads' Q, K, V rows (biases too) and output columns zeroed
    hf = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=64)).eval()
    pruned, hs = {"0": [1, 2], "1": [3]}, 12
    state = {}
    for k, v in hf.state_dict().items():
        for layer, heads in pruned.items():
            keep = torch.tensor([h * hs + i for h in range(4) if h not in heads for i in range(hs)])
            gone = torch.tensor([h * hs + i for h in heads for i in range(hs)])
            if f"layer.{layer}.attention.self." in k:
                with torch.no_grad():
                    v[gone] = 0
                v = v[keep]
            elif f"layer.{layer}.attention.output.dense.weight" in k:
                with torch.no_grad():
                    v[:, gone] = 0
                v = v[:, keep]
        state[k] = v.contiguous()
    hf.config.pruned_heads = pruned
    hf.config.save_pretrained(tmp_path)
    bert.write_safetensors(tmp_path / "model.safetensors", state)
    ours = BertForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert ours.config.num_attention_heads == [2, 3] and ours.config.attention_head_size == 12
    assert_same_logits(ours, hf, 99)


def test_imports_run_one_way():
    # bert.py imports nothing of ours; blockprune.py and squad.py only bert.py (the method knows nothing of SQuAD)
    import ast
    ours = {"bert", "blockprune", "squad", "train_squad", "bench"}
    root = Path(__file__).resolve().parents[1]

    def imports(name):
        tree = ast.parse((root / f"{name}.py").read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names & ours
    assert imports("bert") == set()
    assert imports("blockprune") == imports("squad") == {"bert"}
    assert imports("train_squad") == {"bert", "blockprune", "squad"}
