"""
SQuAD v1.1 with block movement pruning: data, training (dense / prune / fill), evaluation, report.

    python train_squad.py                   # the paper's recipe on bert-base-uncased (needs the network, a GPU)
    python train_squad.py --preset small    # the whole pipeline offline on CPU in about a minute
    python train_squad.py --score PREDICTIONS.json --dev_file dev-v1.1.json   # the official metric

Data section, top to bottom:
- squad_file / load_squad: find (or download) a SQuAD v1.1 JSON file and flatten it to one dict per
  question, with clear errors for malformed files.
- load_tokenizer / featurize / cached_features: BERT WordPiece with the tokenizers library and the
  windowing of transformers' run_qa.py (METHOD.md, "Evaluation details to match"), cached on disk.
- postprocess: window logits -> one answer text per question.
- normalize_answer / f1_score / exact_match / squad_evaluate / score_main: the official v1.1 metric.
Then the training loop (train), evaluation (predict, evaluate), the stages (finetune, prune, compact,
fill, eval, all) and the command line. The pruning method itself is all in blockprune.py.
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import signal
import string
import sys
import time
from collections import Counter
from dataclasses import replace
from itertools import chain
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

import bert
import blockprune as bp
from bert import DATA_DIR, BertConfig, BertForQuestionAnswering, atomic_write, download, log

# ---- the SQuAD v1.1 files ------------------------------------------------------------------------

SQUAD_URLS = {
    "train": ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json", "981b29407e0affa3b1b156f72073b945"),
    "dev": ("https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json", "3e85deb501d4e538b6bc56f786231552"),
}


def squad_file(path_or_split):
    """An existing file as it is; "train" / "dev" from DATA_DIR/squad, downloaded once (md5-checked).
    SQUAD_URL_BASE replaces the download site (a mirror, or a local server in the tests)."""
    if Path(path_or_split).is_file():
        return Path(path_or_split)
    if path_or_split not in SQUAD_URLS:
        raise FileNotFoundError(f"{path_or_split}: no such SQuAD file (give a path, 'train' or 'dev')")
    url, md5 = SQUAD_URLS[path_or_split]
    name = url.rsplit("/", 1)[1]
    if base := os.environ.get("SQUAD_URL_BASE"):
        url = f"{base.rstrip('/')}/{name}"
    path = DATA_DIR / "squad" / name
    if not path.exists():
        download(url, path, md5)
    return path


def load_squad(path):
    """One dict per question: id, title, question, context, answers (the spans whose text really is
    context[answer_start:answer_start + len(text)]: training labels come from answers[0]) and
    gold_texts (every gold answer text as the file gives it: what the official metric scores against,
    so dropping a bad span never changes a score). A question whose spans are all bad keeps an empty
    answers list: it is still evaluated, but featurize(train=True) leaves it out rather than teach the
    model a wrong span or a [CLS] "no answer" that SQuAD v1.1 does not have."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    if isinstance(data, dict) and data.get("version", "1.1") != "1.1":
        log(f"{path}: version {data['version']!r}, expected SQuAD v1.1 (every question must have an answer)")
    examples, bad = [], []
    where = "the top level"
    try:
        for i, article in enumerate(data["data"]):
            where = f"data[{i}]"
            title = article.get("title", "")  # unused by the metric: optional
            for j, para in enumerate(article["paragraphs"]):
                where = f"data[{i}].paragraphs[{j}]"
                context = para["context"]
                for k, qa in enumerate(para["qas"]):
                    where = f"data[{i}].paragraphs[{j}].qas[{k}]"
                    gold = [(a["text"], a["answer_start"]) for a in qa["answers"]]
                    ok = [{"text": t, "answer_start": s} for t, s in gold if context[s:s + len(t)] == t]
                    if len(ok) < len(gold):
                        bad.append(qa["id"])
                    examples.append({"id": qa["id"], "title": title, "question": qa["question"],
                                     "context": context, "answers": ok, "gold_texts": [t for t, _ in gold]})
    except KeyError as e:
        raise ValueError(f"{path}: {where}: missing {e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{path}: {where}: not SQuAD format ({e})") from None
    if bad:
        log(f"{path}: {len(bad)} questions have answer texts that do not match their context at "
            f"answer_start (those spans are not used for training), e.g. {', '.join(bad[:5])}")
    return examples


# ---- tokenizer and features --------------------------------------------------------------------

def load_tokenizer(vocab_file, lowercase=True):
    """BERT's WordPiece tokenizer as transformers' BertTokenizerFast builds it from vocab.txt."""
    vocab = WordPiece.read_file(str(vocab_file))  # raises if the file cannot be read
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_file}: not a BERT vocab, {missing} missing")
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    # strip_accents follows lowercase, as in BERT uncased (strip_accents=None in BertTokenizer)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=lowercase, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    # as in transformers: "[SEP]" written in a text is the special token, not "[", "sep", "]"
    tok.add_special_tokens([t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]") if t in vocab])
    return tok


def featurize(examples, tokenizer, max_seq_length=384, doc_stride=128, train=False):
    """Windows over the contexts as transformers' run_qa.py makes them: question (leading white space
    stripped) then context, only the context truncated, doc_stride tokens shared by consecutive
    windows, every window padded to max_seq_length. offsets: the character span of each context
    token in its context, -1 elsewhere (question, specials, padding), for postprocess.
    train=True adds start/end_positions from the first valid answer: [CLS] (0) for a window that does
    not hold the whole answer; questions with no valid answer are left out (see load_squad)."""
    if train:
        keep = [i for i, ex in enumerate(examples) if ex["answers"]]
        if len(keep) < len(examples):
            log(f"featurize: {len(examples) - len(keep)} questions without a valid answer left out of training")
    else:
        keep = range(len(examples))
    tok = Tokenizer.from_str(tokenizer.to_str())  # a copy: truncation and padding are our settings only
    tok.no_truncation()
    tok.no_padding()
    questions = [examples[i]["question"].lstrip() for i in keep]
    # a question that leaves no more than doc_stride tokens for the context makes the tokenizers
    # library panic: refuse it here with a message that says why
    room = max_seq_length - 3 - doc_stride  # [CLS] question [SEP] context [SEP]
    for i, enc in zip(keep, tok.encode_batch(questions, add_special_tokens=False)):
        if len(enc.ids) >= room:
            raise ValueError(f"question {examples[i]['id']} has {len(enc.ids)} tokens: max_seq_length "
                             f"{max_seq_length} with doc_stride {doc_stride} allows fewer than {room}")
    tok.enable_truncation(max_seq_length, stride=doc_stride, strategy="only_second")
    tok.enable_padding(length=max_seq_length, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    encodings = tok.encode_batch([(q, examples[i]["context"]) for q, i in zip(questions, keep)])
    windows, example_index = [], []
    for i, enc in zip(keep, encodings):
        windows += [enc] + enc.overflowing  # the first window, then the rest in order
        example_index += [i] * (1 + len(enc.overflowing))
    N, L = len(windows), max_seq_length
    f = {k: _int64([getattr(w, a) for w in windows], N, L)
         for k, a in (("input_ids", "ids"), ("token_type_ids", "type_ids"), ("attention_mask", "attention_mask"))}
    f["example_index"] = torch.tensor(example_index, dtype=torch.int64)
    special = _int64([w.special_tokens_mask for w in windows], N, L).bool()
    context = (f["token_type_ids"] == 1) & ~special  # the second sequence minus its final [SEP]
    offsets = _int64([chain.from_iterable(w.offsets) for w in windows], N, L, 2)
    f["offsets"] = offsets.masked_fill(~context[..., None], -1)
    if train:
        # first answer's character span; the window holds it if its first context token starts at or
        # before start_char and its last one ends at or after end_char (run_qa.py's test). Offsets grow
        # along the context, so counting tokens finds the start token (the last one starting at or
        # before start_char) and the end token (the first one ending at or after end_char). This is
        # run_qa.py's labelling, except where its start loop steps past the context onto [SEP] (an
        # answer starting in the window's last context token): we stay on that last context token.
        ans = [examples[i]["answers"][0] for i in example_index]
        start_char = torch.tensor([a["answer_start"] for a in ans])[:, None]
        end_char = start_char + torch.tensor([len(a["text"]) for a in ans])[:, None]
        first = context.int().argmax(1)
        last = first + context.sum(1) - 1
        rows = torch.arange(N)
        inside = (offsets[rows, first, 0] <= start_char[:, 0]) & (offsets[rows, last, 1] >= end_char[:, 0])
        start = first + (context & (offsets[..., 0] <= start_char)).sum(1) - 1
        end = last - (context & (offsets[..., 1] >= end_char)).sum(1) + 1
        f["start_positions"] = torch.where(inside, start, 0)
        f["end_positions"] = torch.where(inside, end, 0)
    return f


def _int64(rows, *shape):
    """Equal-length rows of ints -> an int64 tensor; np.fromiter is several times faster than
    np.array or torch.tensor on millions of Python ints."""
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(np.prod(shape)))
    return torch.from_numpy(flat).view(*shape)


FEATURES_VERSION = 1  # bump when featurize changes what it returns: old cache files are then ignored


def cached_features(examples_path, vocab_file, lowercase, max_seq_length, doc_stride, train, cache_dir=None):
    """(load_squad(examples_path), featurize(...)), the features kept in cache_dir (DATA_DIR/cache by
    default) under a hash of everything that changes them."""
    examples_path = squad_file(examples_path)
    examples = load_squad(examples_path)
    h = hashlib.sha256()
    for part in (examples_path.read_bytes(), Path(vocab_file).read_bytes(),
                 repr((lowercase, max_seq_length, doc_stride, train, FEATURES_VERSION)).encode()):
        h.update(hashlib.sha256(part).digest())
    path = Path(cache_dir or DATA_DIR / "cache") / f"squad-features-{h.hexdigest()[:24]}.pt"
    if path.exists():
        try:
            return examples, torch.load(path, weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises several kinds
            log(f"{path}: unreadable cache ({e!r}); rebuilding it")
    features = featurize(examples, load_tokenizer(vocab_file, lowercase), max_seq_length, doc_stride, train)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(features, buf)
    atomic_write(path, buf.getvalue())
    return examples, features


# ---- answers -------------------------------------------------------------------------------------

def postprocess(examples, features, start_logits, end_logits, n_best=20, max_answer_length=30):
    """{question id: answer text}: in each window the n_best start and n_best end tokens, every pair
    that lies in the context with start <= end and at most max_answer_length tokens, scored
    start + end logit; the best pair over all windows of a question (METHOD.md, as run_qa.py)."""
    start_logits, end_logits = start_logits.float().cpu(), end_logits.float().cpu()
    offsets = features["offsets"].cpu()
    k = min(n_best, start_logits.shape[1])
    s_val, s_idx = start_logits.topk(k, dim=1)  # [N, k]
    e_val, e_idx = end_logits.topk(k, dim=1)
    score = s_val[:, :, None] + e_val[:, None, :]  # [N, k, k]: every start with every end
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1
    in_context = (offsets[:, :, 0] >= 0).gather(1, s_idx)[:, :, None] & (offsets[:, :, 0] >= 0).gather(1, e_idx)[:, None, :]
    score = score.masked_fill(~in_context | (length < 1) | (length > max_answer_length), float("-inf"))
    best, flat = score.flatten(1).max(1)  # best pair of each window
    s_best, e_best = s_idx.gather(1, flat[:, None] // k)[:, 0], e_idx.gather(1, flat[:, None] % k)[:, 0]
    rows = torch.arange(len(best))
    start_char, end_char = offsets[rows, s_best, 0].tolist(), offsets[rows, e_best, 1].tolist()
    predictions, best_score = {ex["id"]: "" for ex in examples}, {}  # "" when no pair is valid
    for w, (i, b) in enumerate(zip(features["example_index"].tolist(), best.tolist())):
        qid = examples[i]["id"]
        if b > best_score.get(qid, float("-inf")):  # strictly: the first window wins a tie
            best_score[qid] = b
            predictions[qid] = examples[i]["context"][start_char[w]:end_char[w]]
    return predictions


# ---- the official SQuAD v1.1 metric (evaluate-v1.1.py, Rajpurkar et al. 2016) ---------------------

_PUNCTUATION = set(string.punctuation)  # ASCII only, as the official script: "“" and "–" stay


def normalize_answer(s):
    """Lower case, drop punctuation, drop the articles a/an/the, collapse white space (in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(prediction, ground_truth):
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    same = sum((Counter(pred) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction, ground_truth):
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_evaluate(examples, predictions):
    """EM and F1 x100, each the max over all gold answer texts (gold_texts: unfiltered, as the official
    script scores), averaged over every question; a question with no prediction scores 0."""
    em = f1 = 0.0
    missing = [ex["id"] for ex in examples if ex["id"] not in predictions]
    if missing:
        log(f"{len(missing)} unanswered questions will receive score 0, e.g. {', '.join(missing[:5])}")
    for ex in examples:
        if ex["id"] in predictions:
            p = predictions[ex["id"]]
            em += max((exact_match(p, g) for g in ex["gold_texts"]), default=0.0)
            f1 += max((f1_score(p, g) for g in ex["gold_texts"]), default=0.0)
    n = max(len(examples), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def score_main(predictions_path, dev_file):
    """As the official evaluate-v1.1.py: score a {question id: answer} JSON file, print one JSON line."""
    predictions = json.loads(Path(predictions_path).read_text(encoding="utf-8"))
    result = squad_evaluate(load_squad(squad_file(dev_file)), predictions)
    print(json.dumps(result))
    return result


# ---- models ----------------------------------------------------------------------------------------

def load_checkpoint(name):
    """(model, vocab file, lowercase) from a checkpoint directory or hub name. A pruned checkpoint
    (with scores.safetensors) comes back as a MaskedBert. "tiny" is the small preset's randomly
    initialised 2-layer BERT over data/sample-vocab.txt."""
    if name == "tiny":
        vocab = DATA_DIR / "sample-vocab.txt"
        n = len(vocab.read_text(encoding="utf-8").splitlines())
        torch.manual_seed(0)
        config = BertConfig(vocab_size=n, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                            intermediate_size=256, max_position_embeddings=128)
        return BertForQuestionAnswering(config), vocab, True
    d = bert.resolve_checkpoint(name)
    model = bp.load_masked(d) if (d / "scores.safetensors").exists() else BertForQuestionAnswering.from_pretrained(d)
    vocab = d / "vocab.txt"
    if not vocab.exists():
        raise FileNotFoundError(f"{d}: no vocab.txt beside the weights")
    vocab_size = (model.model if isinstance(model, bp.MaskedBert) else model).config.vocab_size
    if vocab_size < len(vocab.read_text(encoding="utf-8").splitlines()):
        raise ValueError(f"{vocab} has more tokens than the model's vocab_size {vocab_size}")
    tc = d / "tokenizer_config.json"
    lowercase = json.loads(tc.read_text()).get("do_lower_case", True) if tc.exists() else True
    return model, vocab, lowercase


# ---- training --------------------------------------------------------------------------------------

def steps_per_epoch(args, features):
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    return len(features["input_ids"]) // global_batch


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def autocast(args):
    """bf16 (or fp16) autocast on GPU; plain fp32 on CPU."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return torch.autocast(args.device.type, dtype=dtype, enabled=dtype is not None)


def batches(features, idx, device, keys=("input_ids", "attention_mask", "token_type_ids"), trim=True, like=None):
    """The windows idx, cut to the longest of them (or of the windows `like`: the global batch under
    torchrun). Padding holds no answer and attention never looks at it; SQuAD windows average 175 of
    384 tokens, so cutting it halves the work."""
    out = [features[k][idx] for k in keys]
    if trim:
        n = int(features["attention_mask"][idx if like is None else like].sum(1).max())
        out = [t[:, :n] if t.dim() == 2 and t.shape[1] == features["input_ids"].shape[1] else t for t in out]
    return [t.to(device, non_blocking=True) for t in out]


def train(args, stage, model, features, epochs, lr, warmup_steps, out_dir, teacher=None, prune=None, dev=None):
    """One training stage: plain fine-tuning (no teacher), distillation (a teacher), or pruning
    (a teacher and a PruneConfig). Returns the model, or the MaskedBert when pruning.
    The state needed to resume (weights, scores, optimiser, step, RNG) is saved every --save_steps;
    dev = (examples, features) is evaluated every --eval_steps."""
    device, B, accum = args.device, args.per_device_train_batch_size, args.gradient_accumulation_steps
    world, rank = world_size(), get_rank()  # under torchrun each process takes B windows of a global batch
    N = len(features["input_ids"])
    epoch_steps = N // (B * accum * world)
    if epoch_steps == 0:
        raise ValueError(f"--per_device_train_batch_size {B} x --gradient_accumulation_steps {accum} x {world} "
                         f"processes is larger than the {N} training windows")
    total = max(1, round(epochs * epoch_steps))
    model.to(device)
    net = model
    if prune is not None:  # the schedule in steps: warm-up epochs, cubic ramp, cool-down epochs
        prune = replace(prune, warmup_steps=round(args.initial_warmup * epoch_steps),
                        ramp_steps=max(1, total - round((args.initial_warmup + args.final_warmup) * epoch_steps)))
        net = bp.MaskedBert(model, prune).to(device)
        groups = bp.param_groups(net, lr, args.mask_scores_learning_rate, args.weight_decay)
    else:
        groups = [{"params": list(model.parameters()), "lr": lr, "weight_decay": args.weight_decay}]
    # DistributedDataParallel averages the gradients (scores included) over the processes after backward;
    # a layer without heads or FFN units leaves its empty Linears out of the forward
    unused = world > 1 and 0 in model.config.num_attention_heads + model.config.intermediate_size
    forward = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=unused) if world > 1 else net
    opt = torch.optim.AdamW(groups, eps=1e-8)
    # linear warm-up then linear decay to 0, every group alike
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(1, warmup_steps),
                                                                 max(0.0, (total - s) / max(1, total - warmup_steps))))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if teacher is not None:
        teacher.to(device).eval()
    step = 0
    state_path = out_dir / "training_state.pt"
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=False)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step = state["step"]
        rng, cuda_rng = state["rng"], state["cuda_rng"]
        if world > 1 and len(state.get("rng_per_process", [])) == world:
            rng, cuda_rng = state["rng_per_process"][rank]
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        log(f"{stage}: resumed from {state_path} at step {step}")

    def save_state():  # called by every process at the same step; the first one writes
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
        per_process = [None] * world
        if world > 1:  # dropout draws differ per process: keep each one's generator
            torch.distributed.all_gather_object(per_process, rng)
        if rank:
            return
        buf = io.BytesIO()
        torch.save({"net": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "rng": rng[0], "cuda_rng": rng[1],
                    **({"rng_per_process": per_process} if world > 1 else {})}, buf)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(state_path, buf.getvalue())

    net.train()
    t0, seen, lam, tau = time.time(), 0, 0.0, 0.0
    log(f"{stage}: {N} windows, {epochs} epochs, {total} steps of {B * accum * world}")
    with stop_signals(stage) as stop:
        while step < total:
            epoch, i = divmod(step, epoch_steps)
            # the data order is a function of (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed + epoch))
            if prune is not None:
                tau, lam = bp.schedule(step, net)
                net.threshold = tau
            for micro in range(accum):
                batch = order[(i * accum + micro) * B * world:(i * accum + micro + 1) * B * world]
                ids, mask, types, start_pos, end_pos = batches(
                    features, batch[rank * B:(rank + 1) * B], device,
                    ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"), like=batch)
                with autocast(args):
                    start, end = forward(ids, mask, types)
                    if teacher is None:
                        loss = (F.cross_entropy(start, start_pos) + F.cross_entropy(end, end_pos)) / 2
                    else:
                        with torch.no_grad():
                            t_start, t_end = teacher(ids, mask, types)
                        loss = bp.distillation_loss(start, end, t_start, t_end, start_pos, end_pos, args.temperature,
                                                    args.alpha_distil, args.alpha_ce)
                    if prune is not None and lam > 0:
                        loss = loss + lam * bp.regularization(net)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{stage}: loss is {loss.item()} in step {step + 1}; the last good state is "
                                             f"{state_path if state_path.exists() else 'not saved yet'}")
                scaler.scale(loss / accum).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += B * accum * world
            if step % args.logging_steps == 0 or step == total:
                rate = seen / (time.time() - t0)  # over the steps since the last line: a pause or an evaluation
                t0, seen = time.time(), 0          # in between does not skew it for long
                line = (f"{stage} step {step}/{total} | loss {loss.item():.4f} | lr {sched.get_last_lr()[0]:.2e}")
                if prune is not None:
                    s = net.structure()
                    line += (f" | threshold {tau:.4f} lambda {lam:.3g} | density attn {100 * s['attention_density']:.1f}%"
                             f" ffn {100 * s['ffn_density']:.1f}% compact {100 * s['compact_density']:.1f}% | "
                             f"heads {sum(s['heads'])}/{sum(net.model.config.num_attention_heads)}")
                left = round((total - step) * B * accum * world / rate)
                log(f"{line} | {rate:.1f} ex/s | {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
            if args.save_steps and step % args.save_steps == 0:
                save_state()
            if dev is not None and args.eval_steps and step % args.eval_steps == 0 and step < total and not rank:
                start, end, _ = predict(args, net, dev[1])
                m = squad_evaluate(dev[0], postprocess(dev[0], dev[1], start, end, args.n_best_size, args.max_answer_length))
                log(f"{stage} step {step}: dev EM {m['exact_match']:.2f} F1 {m['f1']:.2f}")
                net.train()
            stopping = bool(stop)  # SIGTERM or Ctrl-C: keep this step's state, then leave
            if world > 1:  # the processes decide together (a signal may reach one during this very check)
                flag = torch.tensor([float(stopping)], device=device)
                torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
                stopping = bool(flag.item())
            if stopping:
                save_state()
                raise SystemExit(f"{stage}: stopped by {stop[0] if stop else 'a signal to another process'} "
                                 f"after step {step}; the state is saved in "
                                 f"{state_path}: run the same command with --resume to continue")
    if args.save_steps:
        save_state()
    if prune is not None:  # evaluation always uses the final threshold: tau_f, or the one that keeps target_density
        net.threshold = bp.schedule(total, net)[0]
        net.config = replace(net.config, final_threshold=net.threshold)
    net.eval()
    return net


@contextlib.contextmanager
def stop_signals(stage):
    """While training, SIGTERM or a first Ctrl-C only asks to stop: the step in progress finishes and its
    state is saved before the run exits. A second Ctrl-C stops at once."""
    stop = []

    def handler(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
        log(f"{stage}: {stop[-1]}: saving the training state after this step (Ctrl-C again to stop now)")
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def predict(args, model, features, trim=True):
    """Start and end logits for every window, and the seconds spent in the model's forward passes
    (synchronised on GPU). trim=True batches windows of similar length and cuts the padding (fast);
    trim=False runs full padded batches in file order, the paper's way of timing the dev evaluation."""
    model.to(args.device).eval()
    N, L, B = *features["input_ids"].shape, args.per_device_eval_batch_size
    order = features["attention_mask"].sum(1).argsort() if trim else torch.arange(N)
    start, end = torch.full((N, L), float("-inf")), torch.full((N, L), float("-inf"))  # padding: never an answer
    seconds = 0.0
    for i in range(0, N, B):
        idx = order[i:i + B]
        ids, mask, types = batches(features, idx, args.device, trim=trim)
        sync(args.device)
        t = time.perf_counter()
        with autocast(args):
            s, e = model(ids, mask, types)
        sync(args.device)
        seconds += time.perf_counter() - t
        start[idx, :s.shape[1]], end[idx, :e.shape[1]] = s.float().cpu(), e.float().cpu()
    return start, end, seconds


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluate(args, model, examples, features, out_dir, name):
    """Dev EM/F1 with the official metric; predictions.json and metrics.json into out_dir (by the first
    process only, under torchrun)."""
    if get_rank():
        return None
    start, end, seconds = predict(args, model, features)
    predictions = postprocess(examples, features, start, end, args.n_best_size, args.max_answer_length)
    metrics = {**squad_evaluate(examples, predictions), "eval_seconds": seconds, "windows": len(start)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "predictions.json", json.dumps(predictions).encode())
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    # metrics.json marks the stage as finished: its training state (weights + AdamW, large) is no longer needed
    (out_dir / "training_state.pt").unlink(missing_ok=True)
    log(f"{name}: EM {metrics['exact_match']:.2f} F1 {metrics['f1']:.2f} ({seconds:.1f} s in the model)")
    return metrics


# ---- the stages ------------------------------------------------------------------------------------
# Each stage reads its inputs from checkpoint directories and writes its own, so that any stage can be
# run alone, and --stage all can skip the stages a killed run had already finished.

def save_checkpoint(model, out, vocab, lowercase):
    if isinstance(model, bp.MaskedBert):
        bp.save_masked(model, out, vocab)
    else:
        model.save_pretrained(out, vocab)
    atomic_write(out / "tokenizer_config.json", json.dumps({"do_lower_case": lowercase}).encode())


def features_for(args, vocab, lowercase, split):
    path = args.train_file if split == "train" else args.dev_file
    return cached_features(path, vocab, lowercase, args.max_seq_length, args.doc_stride, split == "train")


def stage_finetune(args, model_path, out):
    model, vocab, lowercase = load_checkpoint(model_path)
    _, features = features_for(args, vocab, lowercase, "train")
    dev = features_for(args, vocab, lowercase, "dev")
    steps = args.finetune_epochs * steps_per_epoch(args, features)
    model = train(args, "finetune", model, features, args.finetune_epochs, args.learning_rate,
                  round(args.warmup_ratio * steps), out, dev=dev)
    if get_rank():
        return None  # under torchrun the first process saves and evaluates
    save_checkpoint(model, out, vocab, lowercase)
    return evaluate(args, model, *dev, out, "finetune")


def load_teacher(teacher_path, vocab):
    teacher, t_vocab, _ = load_checkpoint(teacher_path)
    if Path(t_vocab).read_bytes() != Path(vocab).read_bytes():
        raise ValueError(f"--teacher {teacher_path}: its vocab {t_vocab} differs from the student's {vocab}")
    return teacher


def stage_prune(args, model_path, teacher_path, out):
    model, vocab, lowercase = load_checkpoint(model_path)
    teacher = load_teacher(teacher_path, vocab)
    _, features = features_for(args, vocab, lowercase, "train")
    dev = features_for(args, vocab, lowercase, "dev")
    masked = train(args, "prune", model, features, args.num_train_epochs, args.learning_rate,
                   round(args.initial_warmup * steps_per_epoch(args, features)), out, teacher=teacher, prune=prune_config(args), dev=dev)
    if get_rank():
        return None
    save_checkpoint(masked, out, vocab, lowercase)
    return evaluate(args, masked, *dev, out, "prune (masked)")


def stage_compact(args, masked_path, out):
    masked, vocab, lowercase = load_checkpoint(masked_path)
    if not isinstance(masked, bp.MaskedBert):
        raise ValueError(f"--model_name_or_path {masked_path}: compaction needs a pruned checkpoint (scores.safetensors)")
    small = bp.compact(masked)
    # the compacted model must answer as the masked one: check it on real dev windows
    _, dev = features_for(args, vocab, lowercase, "dev")
    few = {k: v[:8] for k, v in dev.items()}
    fp32 = argparse.Namespace(**{**vars(args), "precision": "fp32"})
    (a, b, _), (c, d, _) = predict(fp32, masked, few, trim=False), predict(fp32, small, few, trim=False)
    diff = max((a - c).abs().max().item(), (b - d).abs().max().item())
    save_checkpoint(small, out, vocab, lowercase)
    r = bp.report(small, masked.model.config)
    r["max_logit_difference_from_masked"] = diff
    atomic_write(out / "report.json", json.dumps(r, indent=2).encode())
    bp.plot_report(r, out / "structure.png")
    log(bp.format_report(r) + f"\ncompacted vs masked logits: max difference {diff:.2e}")
    return r


def stage_fill(args, compact_path, teacher_path, out):
    model, vocab, lowercase = load_checkpoint(compact_path)
    teacher = load_teacher(teacher_path, vocab)
    bp.fill(model, noise=0.01, generator=torch.Generator().manual_seed(args.seed))
    _, features = features_for(args, vocab, lowercase, "train")
    dev = features_for(args, vocab, lowercase, "dev")
    model = train(args, "fill", model, features, args.fill_epochs, args.learning_rate, 10, out, teacher=teacher, dev=dev)
    if get_rank():
        return None
    save_checkpoint(model, out, vocab, lowercase)
    return evaluate(args, model, *dev, out, "fill")


def stage_eval(args, model_path, out):
    model, vocab, lowercase = load_checkpoint(model_path)
    return evaluate(args, model, *features_for(args, vocab, lowercase, "dev"), out, "eval")


def stage_all(args, out):
    """METHOD.md's recipe end to end: teacher (fine-tuned here unless --teacher is given), prune with
    distillation, compact, fill, evaluate; then the speed-up of the final model over the teacher.
    Several --target_density values prune the same start once per density, into output_dir/d<D>."""
    teacher = args.teacher
    if not teacher:
        teacher_metrics = once(args, out / "teacher", stage_finetune, args.model_name_or_path)
        teacher = str(out / "teacher")
    else:
        teacher_metrics = once(args, out / "teacher", stage_eval, teacher)
    densities = args.target_density or [None]
    runs = {}
    for d in densities:
        sub = out if len(densities) == 1 else out / f"d{100 * d:g}"
        runs[sub.name] = prune_compact_fill(argparse.Namespace(**{**vars(args), "target_density": d and [d]}), sub,
                                            teacher, teacher_metrics)
    if len(densities) > 1 and not get_rank():
        plot_study(runs, out / "f1-speedup.png")
    return runs[out.name] if len(densities) == 1 else runs


# the paper's BERT-base points (METHOD.md): (speed-up, F1 lost against its teacher, label)
PAPER_POINTS = [(2.44, 88.5 - 87.71, "hybrid filled, d26"), (1.84, 88.5 - 88.72, "hybrid filled, d41"),
                (3.64, 88.5 - 85.52, "struct, d14")]


def plot_study(runs, path):
    """F1 lost against the dense teacher, per speed-up: our pruned models, and the paper's for reference
    (each against its own teacher, since the base models differ). PNG; skipped without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ours = sorted((r["speedup"], r["teacher"]["f1"] - r["filled"]["f1"], name) for name, r in runs.items())
    ax.plot([x for x, _, _ in ours], [y for _, y, _ in ours], "o-", label="ours (this study)")
    ax.plot([x for x, _, _ in PAPER_POINTS], [y for _, y, _ in PAPER_POINTS], "s", label="paper, BERT-base (GPU)")
    for x, y, name in ours + PAPER_POINTS:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="speed-up over the dense teacher", ylabel="F1 lost against the dense teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def once(args, d, fn, *a):
    """Run a stage into d, unless --resume and its metrics.json says an earlier run finished it."""
    if (d / "metrics.json").exists() and args.resume:
        log(f"{d}: done already, skipped")
        return json.loads((d / "metrics.json").read_text())
    result = fn(args, *a, d)
    barrier()  # under torchrun: the first process has written d before the others read it
    return result


def prune_compact_fill(args, out, teacher, teacher_metrics):
    results = {"teacher": teacher_metrics}
    results["pruned"] = once(args, out / "pruned", stage_prune, args.model_name_or_path, teacher)
    if not get_rank():
        results["structure"] = stage_compact(args, out / "pruned", out / "compact")
    barrier()
    results["filled"] = once(args, out / "filled", stage_fill, str(out / "compact"), teacher)
    if get_rank():
        return None
    dense, vocab, lowercase = load_checkpoint(teacher)
    final = load_checkpoint(str(out / "filled"))[0]
    _, dev = features_for(args, vocab, lowercase, "dev")
    if args.speed_windows:
        dev = {k: v[:args.speed_windows] for k, v in dev.items()}
    # the two models take turns over the same padded dev windows; the fastest of 3 rounds each (machines are noisy)
    t_dense, t_final = (min(ts) for ts in zip(*[(predict(args, dense, dev, trim=False)[2],
                                                 predict(args, final, dev, trim=False)[2])
                                                for _ in range(3)]))
    results["speedup"] = t_dense / t_final
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    s, r = results["filled"], results["structure"]
    log(f"final ({out}): F1 {s['f1']:.2f} EM {s['exact_match']:.2f} (teacher F1 {results['teacher']['f1']:.2f}), "
        f"heads {r['heads']}/{r['heads_dense']}, linear params {100 * r['linear_density']:.1f} %, "
        f"speed-up {results['speedup']:.2f}x over the teacher on {len(dev['input_ids'])} dev windows ({args.device.type})")
    return results


def prune_config(args):
    return bp.PruneConfig(block=args.block, mask=args.mask, final_threshold=args.final_threshold,
                          final_lambda=args.final_lambda, attention_lambda=args.attention_lambda,
                          ffn_lambda=args.ffn_lambda,
                          target_density=args.target_density[0] if args.target_density else None)


# ---- command line ----------------------------------------------------------------------------------

SHARED = Path(os.environ.get("BLOCKPRUNE_SHARED", Path(__file__).resolve().parent.parent / "shared"))

# The paper's recipe (METHOD.md) is the default. Presets change the defaults; flags still win.
PRESETS = {
    "paper": {},
    "small": dict(  # offline, about a minute on CPU: a tiny random BERT on the hand-made sample in data/
        model_name_or_path="tiny", teacher="", train_file=str(DATA_DIR / "sample-train.json"),
        dev_file=str(DATA_DIR / "sample-dev.json"), output_dir="runs/small", max_seq_length=128, doc_stride=32,
        block="8x8",  # half a 16-wide head, as the paper's 32x32 blocks are of its 64-wide heads
        learning_rate=2e-3, mask_scores_learning_rate=2e-2, finetune_epochs=20, num_train_epochs=20,
        fill_epochs=5, initial_warmup=2, final_warmup=6, per_device_eval_batch_size=64, logging_steps=50,
        save_steps=100),
    # issue 5's study on real data: a pretrained 6-layer MiniLM, the first 4,370 train questions, the whole
    # dev set; the files of ../shared (or $BLOCKPRUNE_SHARED)
    "minilm": dict(
        model_name_or_path=str(SHARED / "models/all-MiniLM-L6-v2"), teacher="",
        train_file=str(SHARED / "squad/train-v1.1-head4370.json"), dev_file=str(SHARED / "squad/dev-v1.1.json"),
        output_dir="runs/minilm", learning_rate=1e-4, finetune_epochs=3, target_density=[0.5, 0.25],
        num_train_epochs=2, initial_warmup=0.25, final_warmup=0.5, fill_epochs=1, speed_windows=1024,
        logging_steps=20, save_steps=50),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--preset", choices=PRESETS, default="paper", help="a set of defaults: the paper's recipe, 'small' or 'minilm'")
    a("--stage", choices=["finetune", "prune", "compact", "fill", "eval", "all"], default="all")
    a("--score", metavar="PREDICTIONS.json", help="only score a predictions file against --dev_file, print JSON")
    a("--do_eval", action="store_true", help="only evaluate --model_name_or_path (= --stage eval)")
    a("--model_name_or_path", default="bert-base-uncased",
      help="pretrained checkpoint (finetune, prune, all), pruned one (compact), compacted one (fill), any (eval)")
    a("--teacher", default="csarron/bert-base-uncased-squad-v1", help="fine-tuned QA model to distil from; "
      "'' with --stage all fine-tunes one first")
    a("--train_file", default="train", help="SQuAD v1.1 train JSON, or 'train' to download the official file")
    a("--dev_file", default="dev", help="SQuAD v1.1 dev JSON, or 'dev' to download the official file")
    a("--output_dir", default="runs/bert-base-uncased")
    a("--resume", action="store_true", help="continue from the training state and finished stages in output_dir")
    a("--max_seq_length", type=int, default=384)
    a("--doc_stride", type=int, default=128, help="tokens of overlap between the windows of a long context")
    a("--n_best_size", type=int, default=20)
    a("--max_answer_length", type=int, default=30)
    a("--per_device_train_batch_size", type=int, default=16)
    a("--per_device_eval_batch_size", type=int, default=128)
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--learning_rate", type=float, default=3e-5)
    a("--mask_scores_learning_rate", type=float, default=1e-2)
    a("--weight_decay", type=float, default=0.0)
    a("--max_grad_norm", type=float, default=1.0)
    a("--warmup_ratio", type=float, default=0.1, help="fraction of fine-tuning steps with a rising lr")
    a("--finetune_epochs", type=float, default=2.0, help="dense fine-tuning of a teacher")
    a("--num_train_epochs", type=float, default=20.0, help="pruning epochs")
    a("--fill_epochs", type=float, default=4.0, help="fine-tuning of the compacted model")
    a("--initial_warmup", type=float, default=1.0, help="epochs at threshold 0 (and of lr warm-up) before pruning")
    a("--final_warmup", type=float, default=10.0, help="epochs at the final threshold at the end of pruning")
    a("--block", default="32x32", help="attention blocks: RxC, 'row', 'col' or 'head'")
    a("--mask", choices=["sigmoid", "topk"], default="sigmoid")
    a("--final_threshold", type=float, default=0.1)
    a("--final_lambda", type=float, default=20.0)
    a("--target_density", type=float, nargs="+", help="instead of --final_threshold: prune to this fraction of "
      "the linear parameters (e.g. 0.26); the threshold follows it down the cubic ramp. Several values (with "
      "--stage all): one pruned model each, from the same teacher")
    a("--speed_windows", type=int, default=0, help="time the speed-up on the first N dev windows (0: all)")
    a("--attention_lambda", type=float, default=1.0)
    a("--ffn_lambda", type=float, default=0.25)
    a("--temperature", type=float, default=2.0)
    a("--alpha_distil", type=float, default=0.9)
    a("--alpha_ce", type=float, default=0.1)
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=int, default=17)
    a("--logging_steps", type=int, default=100)
    a("--save_steps", type=int, default=1000, help="training state every N steps (0: only at the end of a stage)")
    a("--eval_steps", type=int, default=0, help="evaluate on the dev set every N steps (0: at the end only)")
    args, _ = p.parse_known_args(argv)
    p.set_defaults(**PRESETS[args.preset])
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.do_eval:
        args.stage = "eval"
    if args.precision == "auto":
        args.precision = "bf16" if args.device.type == "cuda" else "fp32"
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "max_seq_length", "logging_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(args, name)}")
    if not 0 <= args.doc_stride < args.max_seq_length // 2:
        p.error(f"--doc_stride must be in [0, max_seq_length / 2), got {args.doc_stride}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.score:
        return score_main(args.score, args.dev_file)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: one process per GPU (or CPU process, gloo)
        # the others wait while the first evaluates: allow for a whole dev evaluation on CPU
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=6))
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.target_density and len(args.target_density) > 1 and args.stage != "all":
        raise ValueError("--target_density: several values need --stage all")
    if args.stage == "all":
        return stage_all(args, out)
    if args.stage == "finetune":
        return stage_finetune(args, args.model_name_or_path, out)
    if args.stage == "prune":
        return stage_prune(args, args.model_name_or_path, args.teacher, out)
    if args.stage == "compact":
        return stage_compact(args, args.model_name_or_path, out)
    if args.stage == "fill":
        return stage_fill(args, args.model_name_or_path, args.teacher, out)
    return stage_eval(args, args.model_name_or_path, out)


def cli(argv=None):
    """main() with the errors a user can fix said in one line, not a traceback."""
    try:
        result = main(argv)
        if torch.distributed.is_initialized():  # under torchrun: leave together, and at once: with gloo,
            barrier()  # torch's own teardown at interpreter exit sometimes aborts ("terminate called
            torch.distributed.destroy_process_group()  # without an active exception", exit -6) after
            sys.stdout.flush(), sys.stderr.flush()  # all the work is done and saved
            os._exit(0)
        return result
    except torch.OutOfMemoryError as e:
        sys.exit(f"error: out of memory ({str(e).splitlines()[0]}). Lower --per_device_train_batch_size "
                 f"(raise --gradient_accumulation_steps to keep the batch size), --per_device_eval_batch_size "
                 f"or --max_seq_length")
    except (OSError, ValueError, FloatingPointError) as e:  # bad input, no network, a diverging loss
        sys.exit(f"error: {e}")
    finally:  # a process group left open can abort the process at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    cli()
