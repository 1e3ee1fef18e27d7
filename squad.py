"""
SQuAD v1.1 (Rajpurkar et al. 2016), everything about the data and nothing about pruning: the files (found or
downloaded, checked), the questions, the WordPiece windows over the contexts (as transformers' run_qa.py
makes them, cached on disk), the answers read off a model's start and end logits, and the official metric.

    python squad.py dev-v1.1.json PREDICTIONS.json    # score {question id: answer} as evaluate-v1.1.py does

Imports only files.py (for its file helpers).
"""
import hashlib
import json
import os
import re
import string
import sys
from collections import Counter
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

from files import DATA_DIR, download, load_cache, log, save_torch

# ---- the SQuAD v1.1 files ------------------------------------------------------------------------

SQUAD_URLS = {
    "train": ("https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
              "981b29407e0affa3b1b156f72073b945"),
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
        try:
            download(url, path, md5)
        except ConnectionError as e:
            raise ConnectionError(f"{e}; no network? download it elsewhere and give its path instead of "
                          f"'{path_or_split}'") from None
    return path


def load_squad(path, max_questions=None):
    """One dict per question (the file's first max_questions only, when given): id, title, question, context,
    answers (the spans whose text really is context[answer_start:answer_start + len(text)]: training labels
    come from answers[0]) and
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
    examples, bad, where_id = [], [], {}
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
                    if not all(isinstance(x, str) for x in (qa["id"], qa["question"], context)):
                        raise TypeError("id, question and context must be strings")  # else they fail far from here
                    if qa["id"] in where_id:  # predictions are keyed by id: one answer would be scored twice
                        raise ValueError(f"id {qa['id']!r} again (first at {where_id[qa['id']]}): ids must be unique")
                    if qa.get("is_impossible") or not qa["answers"]:  # SQuAD v2.0's unanswerable questions
                        raise ValueError("no answers: every SQuAD v1.1 question has one (a v2.0 file?)")
                    where_id[qa["id"]] = where
                    gold = [(a["text"], a["answer_start"]) for a in qa["answers"]]
                    if not all(isinstance(t, str) and type(s) is int for t, s in gold):
                        raise TypeError("an answer's text must be a string and its answer_start an integer")
                    ok = [{"text": t, "answer_start": s} for t, s in gold if s >= 0 and context[s:s + len(t)] == t]
                    if len(ok) < len(gold):
                        bad.append(qa["id"])
                    examples.append({"id": qa["id"], "title": title, "question": qa["question"],
                                     "context": context, "answers": ok, "gold_texts": [t for t, _ in gold]})
    except KeyError as e:
        raise ValueError(f"{path}: {where}: missing {e}") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: {where}: not SQuAD v1.1 ({e})") from None
    if not examples:  # else it trains on nothing, or scores 0, without a word about the file
        raise ValueError(f"{path}: no questions in it (expected SQuAD v1.1: data[].paragraphs[].qas[])")
    if max_questions:
        if max_questions > len(examples):
            raise ValueError(f"--max_train_questions {max_questions}: {path} has only {len(examples)} questions")
        examples = examples[:max_questions]
    if bad:
        log(f"{path}: {len(bad)} questions have answer texts that do not match their context at "
            f"answer_start (those spans are not used for training), e.g. {', '.join(bad[:5])}")
    return examples


# ---- tokenizer and features --------------------------------------------------------------------

def tokenizer_files(d, vocab_size):
    """(vocab.txt, lowercase) of the checkpoint directory d: its WordPiece vocab, checked against the model's
    vocab_size, and do_lower_case from tokenizer_config.json (true when there is none, as for BERT uncased)."""
    vocab, tc = Path(d) / "vocab.txt", Path(d) / "tokenizer_config.json"
    if not vocab.exists():
        raise FileNotFoundError(f"{d}: no vocab.txt beside the weights")
    try:
        n_tokens = len(vocab.read_text(encoding="utf-8").splitlines())
    except UnicodeDecodeError as e:
        raise ValueError(f"{vocab}: not UTF-8 text ({e})") from None
    if vocab_size < n_tokens:
        raise ValueError(f"{vocab} has more tokens than the model's vocab_size {vocab_size}")
    if n_tokens < vocab_size and vocab_size not in {-(-n_tokens // m) * m for m in (8, 64, 128)}:  # not padding
        raise ValueError(f"{vocab} has {n_tokens} tokens, the model's vocab_size is {vocab_size}: not this model's "
                         "vocab (an embedding table may only round the vocab up to a multiple of 8, 64 or 128)")
    try:
        lowercase = json.loads(tc.read_text(encoding="utf-8")).get("do_lower_case", True) if tc.exists() else True
        if not isinstance(lowercase, bool):  # the tokenizers library takes nothing else
            raise ValueError(f"do_lower_case is {lowercase!r}")
    except (ValueError, AttributeError) as e:  # not JSON, not UTF-8, not an object
        raise ValueError(f"{tc}: expected a JSON object with do_lower_case true or false ({e})") from None
    return vocab, lowercase


def vocab_difference(vocab_a, vocab_b):
    """None when two vocab files give the same token ids, else where they first differ: (line, token of a, token
    of b), the tokens quoted. Compared as the tokenizer reads them (WordPiece.read_file), not as bytes: CRLF line
    endings or a final newline change no token id."""
    a, b = ([t for t, _ in sorted(WordPiece.read_file(str(v)).items(), key=lambda item: item[1])]
            for v in (vocab_a, vocab_b))
    if a == b:
        return None
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return (i + 1, *(repr(t[i]) if i < len(t) else "the end of the file" for t in (a, b)))


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


def cached_features(examples_path, vocab_file, lowercase, max_seq_length, doc_stride, train, cache_dir=None,
                    max_questions=None):
    """(load_squad(examples_path, max_questions), featurize(...)), the features kept in cache_dir (DATA_DIR/cache
    by default) under a hash of everything that changes them."""
    examples_path = squad_file(examples_path)
    examples = load_squad(examples_path, max_questions)
    if train and not any(ex["answers"] for ex in examples):
        raise ValueError(f"{examples_path}: no question has an answer that matches its context: nothing to train on")
    h = hashlib.sha256()
    for part in (examples_path.read_bytes(), Path(vocab_file).read_bytes(),
                 repr((lowercase, max_seq_length, doc_stride, train, FEATURES_VERSION, max_questions)).encode()):
        h.update(hashlib.sha256(part).digest())
    path = Path(cache_dir or DATA_DIR / "cache") / f"squad-features-{h.hexdigest()[:24]}.pt"
    features = load_cache(path, "features")
    if features is None:
        features = featurize(examples, load_tokenizer(vocab_file, lowercase), max_seq_length, doc_stride, train)
        save_torch(path, features)
    return examples, features


# ---- answers -------------------------------------------------------------------------------------

def postprocess(examples, features, start_logits, end_logits, n_best=20, max_answer_length=30):
    """{question id: answer text}: in each window the n_best start and n_best end tokens, every pair
    that lies in the context with start <= end and at most max_answer_length tokens, scored
    start + end logit; the best pair over all windows of a question (docs/paper.md, as run_qa.py)."""
    start_logits, end_logits = start_logits.float().cpu(), end_logits.float().cpu()
    offsets = features["offsets"].cpu()
    k = min(n_best, start_logits.shape[1])
    s_val, s_idx = start_logits.topk(k, dim=1)  # [N, k]
    e_val, e_idx = end_logits.topk(k, dim=1)
    score = s_val[:, :, None] + e_val[:, None, :]  # [N, k, k]: every start with every end
    length = e_idx[:, None, :] - s_idx[:, :, None] + 1
    is_context = offsets[:, :, 0] >= 0
    in_context = is_context.gather(1, s_idx)[:, :, None] & is_context.gather(1, e_idx)[:, None, :]
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


def read_predictions(path):
    """{question id: answer text} from a JSON file, or one line saying what is wrong with it: anything else would
    score 0 without a word (a list) or fail deep in the metric (an answer that is no text)."""
    path = Path(path)
    try:
        predictions = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OSError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{path}: not a JSON file ({e})") from None
    bad = [k for k, a in predictions.items() if not isinstance(a, str)] if isinstance(predictions, dict) else None
    if bad is None or bad:
        got = (f"a JSON {type(predictions).__name__}" if bad is None else
               f"{len(bad)} answers that are not text, e.g. for {bad[0]!r}")
        raise ValueError(f"{path}: expected a JSON object {{question id: answer text}}, got {got}")
    return predictions


def main(argv=None):
    """As the official evaluate-v1.1.py: score a predictions file against a dev file, print one JSON line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python squad.py DEV_FILE PREDICTIONS.json (DEV_FILE: a path, or 'dev' to download it)")
    try:
        result = squad_evaluate(load_squad(squad_file(argv[0])), read_predictions(argv[1]))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
