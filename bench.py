"""
Speed and memory of block-pruned BERT, measured: dense BERT-base against BERT-base cut to the
structure of the paper's released "d26" model (docs/paper.md), our BERT against transformers', and a
pruning training step against a dense one.

    python bench.py                   # everything this machine can run (CPU, and GPU if there is one)
    python bench.py --quick           # about a minute on 2 CPU cores: shorter sequences, fewer repeats
    python bench.py --json bench.json # also save the rows
    python bench.py --device cuda     # only the GPU's rows (the CPU's take minutes of a lent GPU's time)
    python bench.py --study runs/minilm runs/d25-4x-eval   # finished runs' final models, timed on this CPU

Random weights: speed does not depend on them. Variants of a measurement take turns in one loop, so a
slow moment of the machine hits them all; each figure is the median of the repeats after warm-up (the dev
evaluation and --study: the fastest round).
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

import bert
import blockprune as bp
import bookkeeping as bk
import cost_model as cm
import deploy
from bert import BertConfig, BertForQuestionAnswering
from files import atomic_write
from train_squad import POSITIVE

BASE = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072)
# the released x2.44-f87.7-d26 model (docs/paper.md): heads and FFN width kept in layers 0..11
D26 = replace(BASE, num_attention_heads=[4, 4, 6, 7, 7, 5, 6, 7, 5, 5, 5, 3], attention_head_size=64,
              intermediate_size=[552, 717, 795, 789, 833, 792, 620, 466, 283, 112, 96, 238])
# the same with each FFN width rounded up to a multiple of 8 (zero units: the same function), as blockprune.compact
# leaves it: the widths that half-precision tensor-core matrix products want on GPU. The inference and breakdown
# rows' "d26" is this one; the training-step and dev-evaluation rows' is D26, the paper's widths.
D26_FFN8 = replace(D26, intermediate_size=[-(-f // 8) * 8 for f in D26.intermediate_size])
REFERENCE_SPEEDUP = 2.44  # what the paper's implementation measured for d26 on an RTX 3090
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformers_twin(model):
    """transformers' BertForQuestionAnswering holding our model's weights (deploy.transformers_bert: SDPA, narrower
    Linears where a layer has fewer heads or a narrower FFN); None when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    return deploy.transformers_bert(model.config, bert.hf_state_dict(model)).to(next(model.parameters()).device)


def ours(model):  # both models called the same way: (ids, mask, types) -> (start, end)
    return model


def theirs(hf):
    def call(ids, mask, types):
        out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        return out.start_logits, out.end_logits
    return call


def timeit(fns, reps, warmup, device):
    """{name: median seconds}, the functions taking turns, in reverse order every other round (the
    first of a round runs on a cooler cache and a different turbo state)."""
    times = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in list(fns.items())[::1 if r % 2 else -1]:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def inputs(B, T, device, vocab_size=30522):
    """(ids, attention mask, token types): windows without padding, so no mask (None), as train_squad.batches
    passes them."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (B, T), generator=g)
    types = (torch.arange(T) >= T // 4).long().expand(B, T)  # a question, then its context
    return ids.to(device), None, types.contiguous().to(device)


def build(config, device):
    torch.manual_seed(0)
    return BertForQuestionAnswering(replace(config, max_position_embeddings=512)).to(device).eval()


# ---- 1 and 2: inference ---------------------------------------------------------------------------

@torch.no_grad()
def bench_inference(device, dtype, B, T, reps, warmup, cast=False, compiled=False):
    """dense, d26 (FFN widths rounded to 8, as compact leaves them) and d26 at the paper's widths, ours and
    transformers', under autocast to dtype or (cast) with the models cast to dtype: no fp32 LayerNorms then.
    compiled: only ours, dense and d26, through torch.compile (its compilation in the warm-up)."""
    dense, d26 = build(BASE, device), build(D26_FFN8, device)
    fns = {"ours dense": ours(dense), "ours d26": ours(d26), "ours d26, paper's widths": ours(build(D26, device))}
    hf_dense, hf_d26 = (None, None) if compiled else (transformers_twin(dense), transformers_twin(d26))
    if hf_dense is not None:
        fns.update({"transformers dense": theirs(hf_dense), "transformers d26": theirs(hf_d26)})
    for m in (dense, d26, fns["ours d26, paper's widths"], hf_dense, hf_d26):
        if cast and m is not None:
            m.to(DTYPES[dtype])
    if compiled:
        fns = {k: torch.compile(fns[k]) for k in ("ours dense", "ours d26")}
    x = inputs(B, T, device)

    def run(f):
        def go():
            with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32" and not cast):
                f(*x)
        return go
    t = timeit({k: run(f) for k, f in fns.items()}, reps, warmup, device)
    row = {"what": "inference", "device": device.type, "batch": B, "seq": T, "seconds": t,
           "dtype": dtype + (" cast" if cast else "") + (" compiled" if compiled else ""),
           "d26 speed-up": t["ours dense"] / t["ours d26"],
           "flop ratio": cm.encoder_flops(BASE, T) / cm.encoder_flops(D26, T)}
    if "ours d26, paper's widths" in t:
        row["d26 speed-up, paper's widths"] = t["ours dense"] / t["ours d26, paper's widths"]
    if hf_dense is not None:
        row["ours over transformers, dense"] = t["transformers dense"] / t["ours dense"]
        row["ours over transformers, d26"] = t["transformers d26"] / t["ours d26"]
    return row


# What each op or kernel is, from its name (aten ops on CPU, CUDA kernels on GPU); the first match wins
KINDS = (("attention", ("attention", "flash", "fmha", "softmax", "bmm")),  # bmm: only attention's products use it
         ("matmul", ("addmm", "gemm", "xmma", "cutlass", "aten::mm", "matmul")),  # the Linears
         ("layernorm", ("layer_norm", "layernorm")),
         ("casts and copies", ("copy", "cast", "to_copy", "clone", "contiguous")))


def breakdown(device, dtype, B, T, cast=True):
    """Where one forward's time goes, dense and d26: {model: {kind: ms}} from torch.profiler, the self time of each
    aten op on CPU, of each kernel on GPU, in the kinds of KINDS ("elementwise and other": GELU, adds,
    embeddings...). The model cast to dtype (cast), else under autocast."""
    from torch.profiler import ProfilerActivity, profile
    x, out = inputs(B, T, device), {}
    for name, config in (("dense", BASE), ("d26", D26_FFN8)):
        model = build(config, device)
        model = model.to(DTYPES[dtype]) if cast else model
        with torch.no_grad(), torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32" and not cast):
            model(*x), sync(device)  # warm-up
            gpu = device.type == "cuda"
            with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
                model(*x), sync(device)
        ms = dict.fromkeys([k for k, _ in KINDS] + ["elementwise and other"], 0.0)
        for e in prof.key_averages():
            if gpu != ("cuda" in str(e.device_type).lower()):  # CPU ops on CPU, kernels on GPU
                continue
            kind = next((k for k, keys in KINDS if any(w in e.key.lower() for w in keys)), "elementwise and other")
            ms[kind] += (e.self_device_time_total if gpu else e.self_cpu_time_total) / 1000
        out[name] = ms
    return {"what": "forward breakdown", "device": device.type, "dtype": dtype + (" cast" if cast else ""),
            "batch": B, "seq": T, "ms": out}


def show_breakdown(row):
    total = {m: sum(v.values()) for m, v in row["ms"].items()}
    lines = [f"where a forward's time goes: {row['device']} {row['dtype']}, batch {row['batch']}, length {row['seq']}"
             f" (torch.profiler; dense {total['dense']:.0f} ms, d26 {total['d26']:.0f} ms: "
             f"{total['dense'] / total['d26']:.2f}x)"]
    lines += [f"  {k:<22} dense {row['ms']['dense'][k]:8.1f} ms {100 * row['ms']['dense'][k] / total['dense']:5.1f} % |"
              f" d26 {row['ms']['d26'][k]:8.1f} ms {100 * row['ms']['d26'][k] / total['d26']:5.1f} % | "
              f"{row['ms']['dense'][k] / max(1e-9, row['ms']['d26'][k]):5.2f}x" for k in row["ms"]["dense"]]
    print("\n".join(lines), flush=True)

# ---- 3: a training step ---------------------------------------------------------------------------

STEPS = ("ours dense", "transformers dense", "ours d26", "transformers d26", "ours prune", "ours prune + teacher")


def training_step(variant, device, dtype, B, T):
    """One training step (forward, backward, AdamW) of a variant, as a function; None for transformers'
    when it is not installed. Fine-tuning (dense or d26, ours or transformers') takes the usual
    start/end cross-entropy; pruning runs what train_squad.train runs: the target-density schedule (half-way up
    its ramp), masks, regulariser, distillation from the teacher's logits, cached ("ours prune", train_squad.py's
    default) or computed by a teacher forward in the step, and the progress bookkeeping between logging steps."""
    x = inputs(B, T, device)
    pos = torch.randint(0, T, (2, B), generator=torch.Generator().manual_seed(1)).to(device)
    model = build(D26 if "d26" in variant else BASE, device).train()
    if "prune" in variant:
        teacher = build(BASE, device)
        with torch.no_grad():
            t_logits = teacher(*x)
        if "teacher" not in variant:
            del teacher
        masked = bp.MaskedBert(model, bp.PruneConfig(target_density=0.26, ramp_steps=2000)).train()
        with torch.no_grad():
            for s in masked.scores.values():
                s.normal_(0, 2)
        f, params = masked, bp.param_groups(masked, 1e-5, 1e-2)
        with contextlib.redirect_stderr(io.StringIO()):  # its "N steps of B windows" line
            progress = bk.Progress(argparse.Namespace(per_device_train_batch_size=B, gradient_accumulation_steps=1,
                                                      logging_steps=10 ** 9), variant, 10 ** 9, masked)

        def loss_fn(s, e):
            if "teacher" in variant:
                with torch.no_grad():
                    t_start, t_end = teacher(*x)
            else:
                t_start, t_end = t_logits
            return bp.distillation_loss((s, e), (t_start, t_end), (pos[0], pos[1])) + lam * bp.regularization(masked)
    else:
        if variant.startswith("transformers"):
            model = transformers_twin(model)
            if model is None:
                return None
            model.train()
        f, params = (theirs(model) if variant.startswith("transformers") else ours(model)), model.parameters()

        def loss_fn(s, e):
            return (F.cross_entropy(s, pos[0]) + F.cross_entropy(e, pos[1])) / 2
    opt, steps = torch.optim.AdamW(params, lr=1e-5), iter(range(1000, 10 ** 9))  # 1000: half-way up the ramp

    def step():
        nonlocal lam
        n = next(steps)
        if "prune" in variant:
            masked.threshold, lam = bp.schedule(n, masked)
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
            loss = loss_fn(*f(*x))
        if "prune" in variant:
            progress.micro_step(n, loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if "prune" in variant:
            progress.step(n + 1, loss, 1e-5)
    lam = 0.0
    if "prune" in variant:
        step.progress = progress
    return step


# ops that launch no kernel: views, and a no-op `to` (operations() counts the rest)
VIEWS = {"aten::" + n for n in ("view reshape expand expand_as detach t transpose permute as_strided slice select "
                                "alias unsqueeze squeeze flatten split split_with_sizes unbind narrow chunk empty "
                                "empty_strided _reshape_alias _unsafe_view lift_fresh resolve_conj "
                                "resolve_neg").split()}


def operations(fn, device):
    """How many operations one call of fn runs: on GPU the kernels launched, on CPU the aten ops called from Python
    (not the ones they call) that compute something (no views, VIEWS). A GPU waits on each launch about as long as a
    small kernel runs, so a pruning step with many small ops is slow there however few FLOPs they are."""
    from torch.profiler import ProfilerActivity, profile
    gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if gpu else ProfilerActivity.CPU]) as prof:
        fn(), sync(device)
    if gpu:
        return sum("cuda" in str(e.device_type).lower() for e in prof.events())
    return sum(e.name.startswith("aten::") and e.name not in VIEWS and not (
        e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")) for e in prof.events())


def bench_training(device, dtype, B, T, reps, warmup, memory=True):
    fns = {v: training_step(v, device, dtype, B, T) for v in STEPS}
    t = timeit({k: f for k, f in fns.items() if f is not None}, reps, warmup, device)
    ops = {v: operations(fns[v], device) for v in ("ours dense", "transformers dense", "ours prune") if fns[v]}
    del fns
    row = {"what": "training step", "device": device.type, "dtype": dtype, "batch": B, "seq": T, "seconds": t,
           "prune over dense": t["ours prune"] / t["ours dense"],
           "prune + teacher forward over dense": t["ours prune + teacher"] / t["ours dense"],
           "operations per step": ops, "prune over dense, operations": ops["ours prune"] / ops["ours dense"]}
    if "transformers dense" in t:
        row["ours over transformers, dense"] = t["transformers dense"] / t["ours dense"]
        row["ours over transformers, d26"] = t["transformers d26"] / t["ours d26"]
    if memory:
        row["peak memory MB"] = {v: peak_memory(device, dtype, B, T, v) for v in ("ours dense", "ours prune")}
        row["prune over dense, memory"] = row["peak memory MB"]["ours prune"] / row["peak memory MB"]["ours dense"]
    return row


def peak_memory(device, dtype, B, T, variant):
    """Peak memory of two training steps of one variant, in MB: CUDA's allocator statistics on GPU;
    on CPU the peak resident memory of a fresh process that runs only this variant (Linux)."""
    if device.type == "cpu":
        out = subprocess.run([sys.executable, __file__, "--memory_of", variant, "--batch", str(B), "--seq", str(T)],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.split()[-1])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn = training_step(variant, device, dtype, B, T)
    fn(), fn()
    del fn
    return torch.cuda.max_memory_allocated() / 2 ** 20


# ---- 4: the whole dev evaluation ------------------------------------------------------------------

def bench_dev_evaluation(device, dtype, dev_file, vocab, windows, reps):
    """Features to predictions over the dev windows, padded batches of 128 as the paper measured; the
    model's forward time (train_squad.predict) and the wall time of the whole evaluation."""
    import squad
    import train_squad as ts
    examples, features = squad.cached_features(dev_file, vocab, True, 384, 128, False)
    if windows:
        features = {k: v[:windows] for k, v in features.items()}
        examples = examples[:int(features["example_index"].max()) + 1]
    args = argparse.Namespace(device=device, precision=dtype, per_device_eval_batch_size=128)
    models = {"dense": build(BASE, device), "d26": build(D26, device)}
    forward, wall = {k: [] for k in models}, {k: [] for k in models}
    for _ in range(reps):
        for name, model in models.items():
            t = time.perf_counter()
            start, end, seconds = ts.predict(args, model, features, trim=False)
            squad.postprocess(examples, features, start, end)
            forward[name].append(seconds)
            wall[name].append(time.perf_counter() - t)
    fwd, wall = {k: min(v) for k, v in forward.items()}, {k: min(v) for k, v in wall.items()}
    return {"what": "dev evaluation", "device": device.type, "dtype": dtype, "batch": 128, "seq": 384,
            "windows": len(features["input_ids"]), "seconds": fwd, "wall seconds": wall,
            "d26 speed-up": fwd["dense"] / fwd["d26"], "d26 speed-up, wall": wall["dense"] / wall["d26"]}


# ---- onnxruntime (--onnx) -------------------------------------------------------------------------

MINILM = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536)
# the MiniLM study's d25 run on this CPU (docs/study.md, "A CPU rerun of d25-4x-eval"), FFN widths rounded to 8
D25 = replace(MINILM, num_attention_heads=[4, 3, 5, 5, 5, 2], attention_head_size=32,
              intermediate_size=[336, 384, 384, 312, 240, 288])


def bench_onnx(B, T, reps, warmup, dense_config, pruned_config, name):
    """The pruned structure over the dense one, exported to ONNX (deploy.py) and run by onnxruntime in fp32 and
    after dynamic int8 quantization, beside PyTorch eager, all taking turns in one loop on this CPU."""
    import tempfile
    cpu, x = torch.device("cpu"), inputs(B, T, torch.device("cpu"))
    x = (x[0], torch.ones_like(x[0]), x[2])  # the graph's inputs: a mask of ones where PyTorch gets None
    fns = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which, config in (("dense", dense_config), (name, pruned_config)):
            model = build(config, cpu)
            path = Path(tmp) / f"{which}.onnx"
            deploy.export_onnx(model, path, x)
            deploy.quantize_int8(path, path.with_suffix(".int8.onnx"))
            fns[f"pytorch {which}"] = lambda m=model: m(x[0], None, x[2])
            for dtype, p in (("fp32", path), ("int8", path.with_suffix(".int8.onnx"))):
                fns[f"onnxruntime {dtype} {which}"] = lambda r=deploy.OnnxQA(p): r(*x)
        t = timeit({k: torch.no_grad()(f) for k, f in fns.items()}, reps, warmup, cpu)
    row = {"what": "onnxruntime", "device": "cpu", "dtype": "fp32, int8", "batch": B, "seq": T, "seconds": t}
    for kind in ("pytorch", "onnxruntime fp32", "onnxruntime int8"):
        row[f"{name} speed-up, {kind}"] = t[f"{kind} dense"] / t[f"{kind} {name}"]
    row[f"{name} int8 over dense fp32, onnxruntime"] = t["onnxruntime fp32 dense"] / t[f"onnxruntime int8 {name}"]
    return row


# ---- 5: finished runs, timed on this machine ----------------------------------------------------

def bench_study(run_dirs, dense_dir, dev_file, vocab, windows, reps=3):
    """The speed-up of each finished run's final model (filled/config.json beside its results.json: heads and
    FFN width per layer) over the dense model of dense_dir, timed here as train_squad.py times it: padded dev
    windows in batches of 128, the models taking turns after a warm-up, the fastest of 3 rounds; random
    weights. For runs trained elsewhere (on a GPU, or beside other runs): the speed-up on this machine's CPU,
    written into each results.json as speedup_cpu. Beside it, two predictions: the FLOP ratio, and the measured cost
    model's (cost_model.measure_costs), timed here first at the same batch and length, of the model as it runs."""
    import squad
    import train_squad as ts
    cpu = torch.device("cpu")
    paths = sorted(p for d in run_dirs for p in Path(d).glob("**/results.json"))
    if not paths:
        sys.exit(f"error: --study: no results.json under {' '.join(run_dirs)}")

    def config(d):
        try:
            return bert.BertConfig.from_dict(json.loads((Path(d) / "config.json").read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"error: --study: {Path(d) / 'config.json'}: expected a model's config.json ({e})")
    results = {p: study_results(p) for p in paths}
    models = {"dense": build(config(dense_dir), cpu)} | {str(p.parent): build(config(p.parent / "filled"), cpu)
                                                          for p in paths}
    windowing = {(r["args"]["max_seq_length"], r["args"]["doc_stride"]) for r in results.values()}
    if len(windowing) > 1:
        sys.exit(f"error: --study: the runs differ in --max_seq_length or --doc_stride ({sorted(windowing)}): "
                 "time them apart")
    (T, stride), = windowing
    try:
        _, dev = squad.cached_features(dev_file, vocab, True, T, stride, False)
    except (OSError, ValueError) as e:  # no such file, not SQuAD, a question longer than the runs' windows
        sys.exit(f"error: --study: --dev_file {dev_file}: {e}")
    dev = {k: v[:windows] for k, v in dev.items()}
    args = argparse.Namespace(device=cpu, precision="fp32", per_device_eval_batch_size=128)
    t = time.perf_counter()
    try:
        cost = cm.measure_costs(models["dense"].config, cpu, torch.float32, 128, T)
    except ValueError as e:  # timings too noisy to fit
        sys.exit(f"error: --study: {e}")
    print(f"cost model measured in {time.perf_counter() - t:.0f} s: {1e3 * cost['head']:.2f} ms a head, "
          f"{1e3 * cost['unit']:.4f} ms an FFN unit, {1e3 * cost['fixed']:.0f} ms fixed, per batch of 128", flush=True)
    seconds = ts.race(args, models, dev, reps)  # as train_squad.py --stage all times its final model
    rows = [{"what": "study cost model", **cost}]  # the table the predictions come from, its grid's timings too
    for p, r in results.items():
        r["speedup_cpu"] = seconds["dense"] / seconds[str(p.parent)]
        atomic_write(p, json.dumps(r, indent=2).encode())
        s, final = r["structure"], models[str(p.parent)].config
        rows.append({"what": "study run", "run": str(p.parent), "device": "cpu", "windows": len(dev["input_ids"]),
                     "heads": [x["heads"] for x in s["layers"]], "ffn": [x["ffn"] for x in s["layers"]],
                     "predicted speed-up": s.get("predicted_speedup_flops", s["predicted_speedup"]),
                     "predicted speed-up, measured cost": cm.predicted_speedup(final, models["dense"].config, cost),
                     "speed-up": r["speedup_cpu"]})
        print(f"{rows[-1]['run']}: heads {rows[-1]['heads']}, FFN {rows[-1]['ffn']}: {r['speedup_cpu']:.2f}x "
              f"measured, {rows[-1]['predicted speed-up, measured cost']:.2f}x predicted by the measured cost model, "
              f"{rows[-1]['predicted speed-up']:.2f}x by FLOPs", flush=True)
    return rows


def study_results(path):
    """A finished run's results.json, with what --study reads of it checked (one line naming the file, else)."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
        a, s = r["args"], r["structure"]
        ok = (type(a["max_seq_length"]) is int and a["max_seq_length"] > 0 and type(a["doc_stride"]) is int
              and all(type(x["heads"]) is int and type(x["ffn"]) is int for x in s["layers"])
              and type(s.get("predicted_speedup_flops", s["predicted_speedup"])) in (int, float))
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, cut off, not JSON, keys missing
        ok = f"{type(e).__name__}: {e}"
    if ok is not True:
        sys.exit(f"error: --study: {path}: not the results.json of a finished --stage all run (expected args."
                 f"max_seq_length, args.doc_stride, structure.layers[].heads and .ffn, structure.predicted_speedup"
                 f"{'; ' + ok if ok else ''})")
    return r


# ---- the report -----------------------------------------------------------------------------------

TARGETS = [  # (what, device, dtype, key, at least / at most, value, batch): the speed targets set for this project
    ("inference", "cpu", None, "d26 speed-up", ">=", 3.4, 8),  # dtype None: any; "bf16": bf16, cast or not
    ("inference", "cuda", "fp32", "d26 speed-up", ">=", 3.0, 128),
    ("inference", "cuda", "bf16", "d26 speed-up", ">=", REFERENCE_SPEEDUP, 128),  # the paper's, on a slower GPU
    ("inference", None, None, "ours over transformers, dense", ">=", 1.0, None),
    ("inference", None, None, "ours over transformers, d26", ">=", 1.0, None),
    ("training step", None, None, "ours over transformers, dense", ">=", 1.0, None),
    ("training step", None, None, "ours over transformers, d26", ">=", 1.0, None),
    ("training step", None, None, "prune over dense", "<=", 1.15, None),
    ("training step", None, None, "prune over dense, memory", "<=", 1.2, None),
]


def verdicts(rows):
    out = []
    for what, device, dtype, key, op, value, batch in TARGETS:
        for r in rows:
            if (r["what"] == what and key in r and device in (None, r["device"]) and batch in (None, r["batch"])
                    and r["dtype"].startswith(dtype or "")):
                met = r[key] >= value if op == ">=" else r[key] <= value
                out.append(f"{'met   ' if met else 'MISSED'} {what} {r['device']} {r['dtype']} batch {r['batch']}: "
                           f"{key} {r[key]:.3f} (target {op} {value})")
    return out


def show(row):
    head = f"{row['what']}: {row['device']} {row['dtype']}, batch {row['batch']}, length {row['seq']}"
    lines = [head] + [f"  {k:<26} {1000 * v:10.1f} ms" for k, v in row["seconds"].items()]
    lines += [f"  {k}: {v:.2f}" + ("x" if "memory" not in k else "") for k, v in row.items() if isinstance(v, float)]
    if "operations per step" in row:
        lines += [f"  operations per step, {k}: {v}" for k, v in row["operations per step"].items()]
    if "peak memory MB" in row:
        lines += [f"  peak memory, {k}: {v:.0f} MB" for k, v in row["peak memory MB"].items()]
    print("\n".join(lines), flush=True)


def main(argv=None):
    global BASE, D26, D26_FFN8  # --tiny replaces them
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, as train_squad.py's
    p.add_argument("--quick", action="store_true", help="length 128, small batches, fewer repeats, no memory: "
                   "about a minute on 2 CPU cores")
    p.add_argument("--tiny", action="store_true", help="a toy BERT and toy d26 (hidden 64, 2 layers) in place of "
                   "the real ones: every row in seconds, for a smoke run of the script (the figures mean nothing)")
    p.add_argument("--json", metavar="PATH", help="save the rows as JSON")
    p.add_argument("--onnx", action="store_true", help="only onnxruntime's rows (CPU): d26 over BERT-base and the "
                   "MiniLM study's d25 over MiniLM, fp32 and int8 beside PyTorch (needs onnx, onnxruntime)")
    p.add_argument("--device", choices=["all", "cpu", "cuda"], default="all",
                   help="which rows: all (CPU, and GPU if there is one), or only the CPU's or the GPU's")
    # the data files are not in the repository (README.md says where to get them); without them the dev
    # evaluation is skipped
    shared = Path(os.environ.get("BLOCKPRUNE_SHARED", Path(__file__).resolve().parent.parent / "shared"))
    p.add_argument("--dev_file", default=str(shared / "squad/dev-v1.1.json"), help="SQuAD v1.1 dev JSON")
    p.add_argument("--vocab", default=str(shared / "models/all-MiniLM-L6-v2/vocab.txt"),
                   help="bert-base-uncased's vocab.txt (the MiniLM checkpoint's is the same file)")
    p.add_argument("--eval_windows", type=POSITIVE, help="dev windows to evaluate (default: all on GPU, 256 on CPU, "
                   "16 with --quick)")
    p.add_argument("--study", nargs="+", metavar="RUN_DIR", help="only time the final models of finished runs "
                   "(every results.json under these) against --dense on this CPU; adds speedup_cpu to each")
    p.add_argument("--dense", default=str(shared / "models/all-MiniLM-L6-v2"), help="--study's dense model")
    p.add_argument("--memory_of", help=argparse.SUPPRESS)  # the child process of peak_memory on CPU
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_of:
        fn = training_step(args.memory_of, torch.device("cpu"), "fp32", args.batch, args.seq)
        fn(), fn()
        # VmHWM: this process's peak resident memory (ru_maxrss would count the parent's, inherited at fork)
        return print(int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())[1]) / 1024)
    if args.study:
        rows = bench_study(args.study, args.dense, args.dev_file, Path(args.vocab), args.eval_windows or 256)
        if args.json:
            atomic_write(Path(args.json), json.dumps(rows, indent=2).encode())
        return rows
    if args.onnx:
        deploy.need("onnx", "onnxruntime")
        B, T = (1, 128) if args.quick else (8, 384)
        rows = [bench_onnx(B, T, 2 if args.quick else 3, 1, BASE, D26_FFN8, "d26"),
                bench_onnx(B, T, 2 if args.quick else 3, 1, MINILM, D25, "d25")]
        for row in rows:
            show(row)
        if args.json:
            atomic_write(Path(args.json), json.dumps(rows, indent=2).encode())
        return rows
    if args.tiny:
        BASE = replace(BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        D26 = replace(BASE, num_attention_heads=[2, 1], attention_head_size=16, intermediate_size=[40, 21])
        D26_FFN8 = replace(D26, intermediate_size=[40, 24])
    T = 128 if args.quick else 384
    reps, warmup = (2, 1) if args.quick else (5, 1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"), flush=True)
    print(f"FLOP ratio of d26 at length 384: {cm.encoder_flops(BASE, 384) / cm.encoder_flops(D26, 384):.2f}x "
          f"({cm.encoder_flops(D26, 384) / 1e9:.1f} of {cm.encoder_flops(BASE, 384) / 1e9:.1f} GFLOP); "
          f"the reference implementation measured {REFERENCE_SPEEDUP}x", flush=True)
    rows = []
    cpu = torch.device("cpu")
    devices = [d for d in ("cpu", "cuda") if args.device in ("all", d) and (d == "cpu" or torch.cuda.is_available())]
    if not devices:
        sys.exit("error: --device cuda: no GPU here")
    if "cpu" in devices:  # bf16 where the CPU has it natively (avx512_bf16, AMX): autocast and the models cast
        precisions = [("fp32", False)] + [("bf16", c) for c in (False, True) if torch.backends.mkldnn.is_available()
                                          and torch.ops.mkldnn._is_mkldnn_bf16_supported()]
        for B, (dtype, cast) in [(1, ("fp32", False))] + [(8, p) for p in precisions]:
            rows.append(bench_inference(cpu, dtype, B, T, reps, warmup, cast))
            show(rows[-1])
        for dtype, _ in precisions[:2]:
            rows.append(bench_training(cpu, dtype, 1 if args.quick else 8, T, min(reps, 3), warmup,
                                       memory=not args.quick and dtype == "fp32"))
            show(rows[-1])
        if len(precisions) > 1:
            fp32, bf16 = rows[-2]["seconds"]["ours dense"], rows[-1]["seconds"]["ours dense"]
            rows[-1]["bf16 over fp32, dense step"] = fp32 / bf16
            print(f"  training step, bf16 over fp32 (dense): {rows[-1]['bf16 over fp32, dense step']:.2f}x")
        for dtype, cast in precisions[::2]:  # fp32, and bf16 cast where the CPU has it
            rows.append(breakdown(cpu, dtype, 1 if args.quick else 8, T, cast))
            show_breakdown(rows[-1])
    if "cuda" in devices:  # fp32 as the paper timed it (TF32 off: PyTorch's default), then half precision
        gpu = torch.device("cuda")
        for dtype, cast in (("fp32", False), ("bf16", False), ("bf16", True), ("fp16", False)):
            rows.append(bench_inference(gpu, dtype, 128, T, reps, warmup, cast))
            show(rows[-1])
        rows.append(bench_training(gpu, "bf16", 16, T, reps, warmup))
        show(rows[-1])
        for dtype in ("fp32", "bf16"):
            rows.append(breakdown(gpu, dtype, 128, T))
            show_breakdown(rows[-1])
        try:  # last: compiling takes a minute or two
            rows.append(bench_inference(gpu, "bf16", 128, T, reps, warmup, cast=True, compiled=True))
            show(rows[-1])
        except Exception as e:  # torch.compile fails at its first call where it cannot run (no compiler, triton)
            print(f"bf16 cast compiled: skipped, torch.compile cannot run here ({type(e).__name__}: "
                  f"{str(e).strip().splitlines()[0][:150]})", flush=True)
    vocab = Path(args.vocab)
    if Path(args.dev_file).exists() and vocab.exists():
        for device in map(torch.device, devices):
            windows = args.eval_windows or (0 if device.type == "cuda" else 16 if args.quick else 256)
            rows.append(bench_dev_evaluation(device, "fp32" if device.type == "cpu" else "fp16", args.dev_file,
                                             vocab, windows, 1 if args.quick else 2))
            show(rows[-1])
    else:
        print(f"dev evaluation skipped: no {args.dev_file} or {vocab}: pass --dev_file (dev-v1.1.json, from "
              "https://rajpurkar.github.io/SQuAD-explorer/dataset/) and --vocab (bert-base-uncased's vocab.txt, "
              "from the Hugging Face hub)")
    note = " (for length 384 and batch 8 on CPU: --quick only shows the way)" if args.quick else ""
    print("\n".join([f"targets{note}:"] + verdicts(rows)))
    if args.json:
        atomic_write(Path(args.json), json.dumps(rows, indent=2).encode())
    return rows


if __name__ == "__main__":
    main()
