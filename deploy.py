"""
(ours) A pruned model, deployed: compaction leaves a dense BERT with fewer heads and FFN units per layer, which
runs anywhere a BERT runs, once it gets there. This is how: ONNX for onnxruntime (fp32, and int8 by dynamic
quantization), and transformers' BertForQuestionAnswering, which cannot read per-layer sizes from config.json and
is built by hand. docs/deploying.md has the commands, the figures and the traps.

onnx, onnxruntime and transformers stay optional, as matplotlib is: a missing one is said in one line.
Imports bert.py and files.py.
"""
import importlib.util
import warnings

import numpy as np
import torch

from bert import BertConfig
from files import read_safetensors, resolve_checkpoint

INPUTS, OUTPUTS = ("input_ids", "attention_mask", "token_type_ids"), ("start_logits", "end_logits")


def need(*modules):
    """Refuse (OSError, one line) when an optional package is missing, saying what to install."""
    if missing := [m for m in modules if importlib.util.find_spec(m) is None]:
        raise OSError(f"{' and '.join(missing)} not installed: pip install {' '.join(missing)}")


def export_onnx(model, path, example):
    """The model as an ONNX graph in `path`, its batch and sequence axes dynamic, through torch.onnx's TorchScript
    exporter (opset 17). `example`: (input_ids, attention_mask, token_type_ids) of a batch with padding, so that
    the graph holds the attention mask's path. A layer of 0 heads or 0 FFN units exports as it runs: without them."""
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS + OUTPUTS}
    with warnings.catch_warnings(), torch.no_grad():  # the exporter warns of the checks traced as constants
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), tuple(example), str(path), input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes, opset_version=17, dynamo=False)


def quantize_int8(path, out):
    """onnxruntime's dynamic int8 quantization of an exported graph (weights int8, activations quantized as they
    come). Quantize the plain exported graph: the transformer optimizer's output fails shape inference here."""
    need("onnx", "onnxruntime")
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing before quantization": not for this
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)


class OnnxQA(torch.nn.Module):
    """An ONNX graph run by onnxruntime behind the model's interface, (ids, mask, types) -> (start, end), so that
    train_squad.predict and evaluate take it as they take the model it came from."""

    def __init__(self, path, threads=0):
        super().__init__()
        need("onnxruntime")
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the threads PyTorch runs on here
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        ids = input_ids.cpu().numpy()
        mask = np.ones_like(ids) if attention_mask is None else attention_mask.cpu().numpy()
        types = np.zeros_like(ids) if token_type_ids is None else token_type_ids.cpu().numpy()
        start, end = self.session.run(list(OUTPUTS), dict(zip(INPUTS, (ids, mask.astype(ids.dtype), types))))
        return torch.from_numpy(start), torch.from_numpy(end)


def transformers_bert(config, state):
    """transformers' BertForQuestionAnswering holding a BERT of these sizes and tensors (Hugging Face names): its
    config with every layer's full head count and the widest FFN, then each layer's Linears replaced by ones of
    that layer's sizes (transformers 5 takes a layer's head count from its Linears' width), then the weights. SDPA
    attention; a layer of 0 heads or 0 FFN units included."""
    need("transformers")
    import transformers
    c = config
    hf = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.hidden_size // c.attention_head_size, intermediate_size=max(c.intermediate_size),
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        layer_norm_eps=c.layer_norm_eps, pad_token_id=c.pad_token_id, attn_implementation="sdpa"))
    for layer, heads, ffn in zip(hf.bert.encoder.layer, c.num_attention_heads, c.intermediate_size):
        h, d = c.hidden_size, heads * c.attention_head_size
        att = layer.attention
        att.self.query, att.self.key, att.self.value = (torch.nn.Linear(h, d) for _ in range(3))
        att.output.dense = torch.nn.Linear(d, h)
        layer.intermediate.dense, layer.output.dense = torch.nn.Linear(h, ffn), torch.nn.Linear(ffn, h)
    hf.load_state_dict(state)
    return hf.eval()


def transformers_model(name_or_dir):
    """A compacted or filled checkpoint of ours, with per-layer sizes, as transformers' BertForQuestionAnswering."""
    import json
    d = resolve_checkpoint(name_or_dir)
    config = BertConfig.from_dict(json.loads((d / "config.json").read_text(encoding="utf-8")))
    return transformers_bert(config, read_safetensors(d / "model.safetensors"))
