"""files.py: checkpoints read and written (Hugging Face names, safetensors by hand, whole or not at all), the hub's
downloads and their failures, each said in one line."""
import json

import pytest
import torch

import bert
import files
from bert import BertForQuestionAnswering
from test_bert import assert_same_logits, random_weights, tiny_config

transformers = pytest.importorskip("transformers")


def test_uneven_checkpoint_round_trips(tmp_path):
    model = random_weights(BertForQuestionAnswering(tiny_config(
        num_attention_heads=[0, 3, 4], intermediate_size=[12, 0, 80], attention_head_size=12)))
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\n")
    files.save_pretrained(model, tmp_path / "ck", vocab_file=tmp_path / "v.txt")
    back = files.load_pretrained(tmp_path / "ck").eval()
    assert back.config == model.config
    assert (tmp_path / "ck" / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_even_checkpoint_is_readable_by_transformers(tmp_path):
    from safetensors import safe_open  # a dependency of transformers
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    files.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_attention_heads"] == 4
    with safe_open(tmp_path / "model.safetensors", "pt") as f:  # transformers 4.x fails without format "pt"
        assert f.metadata() == {"format": "pt"}
    assert_same_logits(model, transformers.BertForQuestionAnswering.from_pretrained(tmp_path).eval(), 99)


def test_written_safetensors_header_carries_the_format_metadata(tmp_path):
    files.write_safetensors(tmp_path / "t.safetensors", {"a": torch.zeros(2)})
    data = (tmp_path / "t.safetensors").read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}
    assert set(files.read_safetensors(tmp_path / "t.safetensors")) == {"a"}


def test_pytorch_bin_and_tf_era_names_load(tmp_path):
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    state = {bert.to_hf_name(k).replace("LayerNorm.weight", "LayerNorm.gamma")
             .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in model.state_dict().items()}
    state["bert.pooler.dense.weight"] = torch.zeros(48, 48)  # skipped, not an error
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    back = files.load_pretrained(tmp_path).eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


def test_checkpoint_mismatch_names_the_tensors(tmp_path):
    model = BertForQuestionAnswering(tiny_config())
    files.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 64, "num_hidden_layers": 4}))
    with pytest.raises(ValueError) as e:
        files.load_pretrained(tmp_path)
    msg = str(e.value)
    assert "9 tensors of another shape (e.g. bert.encoder.layer.0.intermediate.dense.weight: (80, 48) in the file, " \
           "(64, 48) expected" in msg
    assert "16 missing (e.g. bert.encoder.layer.3.attention.self.query.weight)" in msg
    assert "config says num_hidden_layers 4, the weights 3" in msg and "intermediate_size 64, the weights 80" in msg


def test_config_of_another_size_is_reported_in_a_few_lines_naming_the_value(tmp_path):
    files.save_pretrained(BertForQuestionAnswering(tiny_config()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(ValueError) as e:
        files.load_pretrained(tmp_path)
    message = str(e.value)
    assert "42 tensors of another shape" in message and "config says hidden_size 64, the weights 48" in message
    assert len(message) < 500 and message.count("\n") <= 3


def test_checkpoint_without_weights_names_both_accepted_files(tmp_path):
    files.save_pretrained(BertForQuestionAnswering(tiny_config()), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or pytorch_model.bin"):
        files.load_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"<html>")  # an error page saved as the weights
    with pytest.raises(ValueError, match="pytorch_model.bin: not a readable PyTorch checkpoint"):
        files.load_pretrained(tmp_path)


def test_safetensors_round_trip_and_truncation_is_reported(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16),
               "empty": torch.zeros(4, 0)}
    files.write_safetensors(tmp_path / "t.safetensors", tensors)
    back = files.read_safetensors(tmp_path / "t.safetensors")
    assert all(torch.equal(tensors[k], back[k]) and tensors[k].dtype == back[k].dtype for k in tensors)
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"cut.safetensors: corrupt or truncated safetensors file \(tensor b: "
                                         r"data_offsets \[48, 88\], expected \[start, end\] within the 82 bytes"):
        files.read_safetensors(tmp_path / "cut.safetensors")


def safetensors_with(tmp_path, header, data):
    body = json.dumps(header).encode()
    (tmp_path / "t.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + data)
    return tmp_path / "t.safetensors"


@pytest.mark.parametrize("header, data, message", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8), r"tensor a: data_offsets \[0, 16\], "
     r"expected \[start, end\] within the 8 bytes of data"),  # out of range
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, bytes(8), r"tensor a: data_offsets \[8, 0\]"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2],
      "data_offsets": [4, 12]}}, bytes(12), "tensor b starts at byte 4 of the data, the one before it ends at 8: "
     "tensors overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 0]}}, b"", r"tensor a: 0 bytes, its shape \[2\] of F32 "
     "needs 8"),  # zero-length
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "tensor a: 8 bytes, its shape"),
    ({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8), "tensor a: dtype None, expected one of F64"),
    ({"a": {"dtype": "F8_E9", "shape": [2], "data_offsets": [0, 2]}}, bytes(2), "tensor a: dtype 'F8_E9'"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, bytes(8), "tensor a: shape '2', expected a list"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "tensor a starts at byte 4 of the "
     "data, the one before it ends at 0"),  # a gap before it
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(12), "the tensors end at byte 8 of the "
     "data, the file holds 12"),  # bytes no tensor owns
    ({"a": "F32"}, b"", "tensor a: dtype None"),
])
def test_a_safetensors_header_that_lies_is_refused_naming_the_tensor(tmp_path, header, data, message):
    with pytest.raises(ValueError, match=rf"^{tmp_path / 't.safetensors'}: corrupt or truncated safetensors file "
                                         rf"\(.*{message}") as e:
        files.read_safetensors(safetensors_with(tmp_path, header, data))
    assert "\n" not in str(e.value)
    bad = tmp_path / "t.safetensors"  # and a header that is no JSON at all
    bad.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(ValueError, match="the header is not JSON"):
        files.read_safetensors(bad)


def test_safetensors_header_length_past_the_end_is_corrupt_not_empty(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((10 ** 6).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="bad.safetensors: corrupt or truncated safetensors file"):
        files.read_safetensors(tmp_path / "bad.safetensors")


def test_missing_directory_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        files.load_pretrained(tmp_path / "nope")


def hub_files(tmp_path, fmt="safetensors"):
    model = random_weights(BertForQuestionAnswering(tiny_config()))
    files.save_pretrained(model, tmp_path / "src", vocab_file=None)
    served = {"config.json": (tmp_path / "src" / "config.json").read_bytes(), "vocab.txt": b"[PAD]\n[UNK]\n"}
    if fmt == "safetensors":
        served["model.safetensors"] = (tmp_path / "src" / "model.safetensors").read_bytes()
    else:
        import io
        buf = io.BytesIO()
        torch.save({bert.to_hf_name(k): v for k, v in model.state_dict().items()}, buf)
        served["pytorch_model.bin"] = buf.getvalue()
    return model, {f"/org/tiny-bert/resolve/main/{k}": v for k, v in served.items()}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_name_is_downloaded_once_into_the_cache(tmp_path, http_server, monkeypatch, fmt):
    model, served = hub_files(tmp_path, fmt)
    monkeypatch.setenv("HF_ENDPOINT", http_server(served))
    back = files.load_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache").eval()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    asked = list(http_server.requests)
    files.load_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert http_server.requests == asked  # the second load reads the cache
    cached = sorted(p.name for p in (tmp_path / "cache" / "org--tiny-bert").iterdir())
    weights = f"model.{fmt}" if fmt == "safetensors" else "pytorch_model.bin"
    assert cached == sorted(["config.json", "vocab.txt", weights])


def test_hub_download_cut_off_leaves_no_file(tmp_path, http_server, monkeypatch):
    _, served = hub_files(tmp_path)
    body = served["/org/tiny-bert/resolve/main/model.safetensors"]

    def cut_off(handler):  # promise the whole file, send half, hang up
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body[:len(body) // 2])

    served["/org/tiny-bert/resolve/main/model.safetensors"] = cut_off
    monkeypatch.setenv("HF_ENDPOINT", http_server(served))
    with pytest.raises(OSError, match=r"model.safetensors cut off after \d+ of \d+ bytes; nothing saved$"):
        files.load_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert not any(r.endswith("pytorch_model.bin") for r in http_server.requests)  # no fallback past the failure
    left = [p.name for p in (tmp_path / "cache" / "org--tiny-bert").iterdir()]
    assert "model.safetensors" not in left and not any("tmp" in n for n in left)


def test_a_download_reset_midway_is_no_network_error_and_no_reason_to_fall_back(tmp_path, http_server, monkeypatch):
    _, served = hub_files(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", http_server(served))
    urlopen = files.urllib.request.urlopen

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
    monkeypatch.setattr(files.urllib.request, "urlopen", reset_after_a_chunk)
    with pytest.raises(OSError, match=r"model.safetensors stopped after 100 bytes \(ConnectionResetError.*; nothing "
                                      r"saved$") as e:
        files.load_pretrained("org/tiny-bert", cache_dir=tmp_path / "cache")
    assert not isinstance(e.value, ConnectionError) and "no network" not in str(e.value)
    assert not any(r.endswith("pytorch_model.bin") for r in http_server.requests)
    assert not (tmp_path / "cache/org--tiny-bert/model.safetensors").exists()


def test_a_name_not_on_the_hub_is_said_so_not_blamed_on_the_network(tmp_path, http_server, monkeypatch):
    endpoint = http_server({})  # every path 404
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(FileNotFoundError, match=rf"^could not download {endpoint}/org/bert-base-uncasd/resolve/main/"
                                                rf"config.json: HTTP 404 .*: is 'org/bert-base-uncasd' a checkpoint's "
                                                rf"name on {endpoint}\? or pass a checkpoint directory$"):
        files.load_pretrained("org/bert-base-uncasd", cache_dir=tmp_path)


def test_offline_hub_name_names_the_url_and_the_way_out(tmp_path, monkeypatch):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(OSError) as e:
        files.load_pretrained("bert-base-uncased", cache_dir=tmp_path)
    assert f"http://127.0.0.1:{port}/bert-base-uncased/resolve/main/config.json" in str(e.value)
    assert "instead of 'bert-base-uncased'" in str(e.value)


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
    files.write_safetensors(tmp_path / "model.safetensors", state)
    ours = files.load_pretrained(tmp_path).eval()
    assert ours.config.num_attention_heads == [2, 3] and ours.config.attention_head_size == 12
    assert_same_logits(ours, hf, 99)
