"""deploy.py and --stage export: the compacted model in onnxruntime (fp32 and int8) and in transformers."""
import importlib.util
import json

import pytest
import torch

import deploy
import files
import train_squad as ts
from bert import BertConfig, BertForQuestionAnswering
from test_bert import batch, random_weights


def uneven():
    """A compacted model's shapes: a layer of 0 heads, one of 0 FFN units, the rest uneven."""
    return random_weights(BertForQuestionAnswering(BertConfig(
        vocab_size=99, hidden_size=48, num_hidden_layers=3, num_attention_heads=[2, 0, 3], attention_head_size=12,
        intermediate_size=[0, 40, 24], max_position_embeddings=64)))


def test_onnxruntime_gives_the_models_logits_at_any_batch_and_length_with_0_head_and_0_ffn_layers(tmp_path):
    pytest.importorskip("onnxruntime")
    model = uneven()
    deploy.export_onnx(model, tmp_path / "m.onnx", batch(99, B=3, T=16))
    runtime = deploy.OnnxQA(tmp_path / "m.onnx")
    for B, T in ((5, 40), (1, 7)):  # other shapes than the example's: the axes are dynamic
        ids, types = torch.randint(0, 99, (B, T)), (torch.arange(T) > T // 3).long().expand(B, T)
        mask = (torch.arange(T) < T - torch.arange(B)[:, None]).long()  # each row padded differently
        with torch.no_grad():
            for got, want in zip(runtime(ids, mask, types), model(ids, mask, types)):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # no mask (a batch without padding, as train_squad.batches gives it): all attended
        torch.testing.assert_close(runtime(ids)[0], model(ids)[0], atol=1e-5, rtol=0)


def test_export_stage_writes_both_graphs_checked_and_evaluated(tmp_path):
    pytest.importorskip("onnxruntime")
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(model, tmp_path / "model", vocab, True)
    r = ts.main(["--preset", "small", "--stage", "export", "--model_name_or_path", str(tmp_path / "model"),
                 "--output_dir", str(tmp_path / "onnx")])
    assert json.loads((tmp_path / "onnx/export.json").read_text()) == r
    fp32, int8 = r["model.onnx"], r["model-int8.onnx"]
    assert fp32["max_logit_difference"] < 1e-4 < int8["max_logit_difference"]  # int8 really is quantized
    assert int8["bytes"] < fp32["bytes"] / 2 and all(0 <= x["f1"] <= 100 for x in (fp32, int8))
    assert fp32["f1"] == ts.main(["--preset", "small", "--stage", "eval", "--model_name_or_path",
                                  str(tmp_path / "model"), "--output_dir", str(tmp_path / "eval")])["f1"]


def test_transformers_loads_a_compacted_checkpoint_by_hand_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = uneven()
    files.save_pretrained(model, tmp_path)
    with pytest.raises(Exception):  # what a user meets first: per-layer sizes are no transformers config
        transformers.BertForQuestionAnswering.from_pretrained(tmp_path)
    hf = deploy.transformers_model(tmp_path)
    ids, mask, types = batch(99)
    with torch.no_grad():
        out, (start, end) = hf(input_ids=ids, attention_mask=mask, token_type_ids=types), model(ids, mask, types)
    torch.testing.assert_close(out.start_logits, start, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.end_logits, end, atol=1e-5, rtol=0)


def test_a_missing_onnxruntime_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else
                        find_spec(name, *a))
    with pytest.raises(SystemExit, match="^error: onnxruntime not installed: pip install onnxruntime$"):
        ts.cli(["--preset", "small", "--stage", "export", "--model_name_or_path", "tiny", "--output_dir",
                str(tmp_path)])
