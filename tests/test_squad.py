"""squad.py: files, features, answers and the official metric."""
import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import squad

ROOT = Path(__file__).resolve().parents[1]
LEADERBOARD = {"bert-ensemble-google": (86.206, 92.196), "logistic-regression-baseline": (40.142, 50.982)}


@pytest.fixture(scope="module")
def vocab(shared):
    return shared / "models/all-MiniLM-L6-v2/vocab.txt"


@pytest.fixture(scope="module")
def tokenizer(vocab):
    return squad.load_tokenizer(vocab)


@pytest.fixture(scope="module")
def dev(shared):
    return squad.load_squad(shared / "squad/dev-v1.1.json")


@pytest.fixture(scope="module")
def head(shared):
    return squad.load_squad(shared / "squad/train-v1.1-head4370.json")


@pytest.fixture(scope="module")
def head_features(head, tokenizer):
    return squad.featurize(head, tokenizer, 384, 128, train=True)


def squad_json(paragraphs, title="T"):
    """A SQuAD v1.1 file body from [(context, [(qid, question, [(text, start), ...]), ...]), ...]."""
    return {"version": "1.1", "data": [{"title": title, "paragraphs": [
        {"context": c, "qas": [{"id": i, "question": q, "answers": [{"text": t, "answer_start": s} for t, s in a]}
                               for i, q, a in qas]} for c, qas in paragraphs]}]}


# ---- the official metric ------------------------------------------------------------------------

@pytest.mark.parametrize("name", LEADERBOARD)
def test_leaderboard_predictions_score_as_published(name, shared, dev):
    predictions = json.loads((shared / f"squad/leaderboard/{name}.dev.predictions.json").read_text())
    r = squad.squad_evaluate(dev, predictions)
    assert (round(r["exact_match"], 3), round(r["f1"], 3)) == LEADERBOARD[name]


@pytest.mark.parametrize("name", LEADERBOARD)
def test_score_command_prints_one_json_line(name, shared):
    out = subprocess.run([sys.executable, str(ROOT / "squad.py"), str(shared / "squad/dev-v1.1.json"),
                          str(shared / f"squad/leaderboard/{name}.dev.predictions.json")],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1
    r = json.loads(out)
    assert (round(r["exact_match"], 3), round(r["f1"], 3)) == LEADERBOARD[name]


@pytest.mark.parametrize("body, message", [
    ("<html>", "not a JSON file (Expecting value: line 1 column 1"),
    ('["Denver Broncos"]', "expected a JSON object {question id: answer text}, got a JSON list"),
    ('{"q1": ["Denver Broncos"]}', "got 1 answers that are not text, e.g. for 'q1'"),
])
def test_score_refuses_predictions_that_are_not_an_id_to_answer_object(tmp_path, body, message):
    (tmp_path / "p.json").write_text(body)
    with pytest.raises(SystemExit) as e:
        squad.main([str(squad.DATA_DIR / "sample-dev.json"), str(tmp_path / "p.json")])
    assert str(e.value).startswith(f"error: {tmp_path / 'p.json'}: ") and "\n" not in str(e.value)
    assert message in str(e.value)


def test_metric_normalizes_like_the_official_script():
    assert squad.normalize_answer("  The  Cat's, an apple!  ") == "cats apple"
    assert squad.normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert squad.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert squad.f1_score("x b c", "b c d") == pytest.approx(2 / 3)
    assert squad.f1_score("a b c", "b c d") == pytest.approx(0.8)  # "a" is dropped: precision 1, recall 2/3
    assert squad.f1_score("the", "a") == 0.0  # both normalize to nothing


def test_unanswered_questions_score_zero_and_are_counted(capsys):
    examples = [{"id": "q1", "gold_texts": ["x"]}, {"id": "q2", "gold_texts": ["y"]}]
    assert squad.squad_evaluate(examples, {"q1": "x"}) == {"exact_match": 50.0, "f1": 50.0}
    assert "1 unanswered questions will receive score 0" in capsys.readouterr().err


# ---- reading SQuAD files ------------------------------------------------------------------------

def test_malformed_json_names_file_and_position(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('{"data": [\n  {"title": "x",, }\n]}')
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON \(line 2, column 17"):
        squad.load_squad(p)


def test_missing_key_names_where(tmp_path):
    d = squad_json([("ctx a", [("a", "q?", [("ctx", 0)])]), ("ctx b", [("b", "q?", [("ctx", 0)])])])
    del d["data"][0]["paragraphs"][1]["qas"][0]["question"]
    p = tmp_path / "missing.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"missing\.json: data\[0\]\.paragraphs\[1\]\.qas\[0\]: missing 'question'"):
        squad.load_squad(p)


@pytest.mark.parametrize("body, message", [
    ({"version": "1.1", "data": []}, "no questions in it"),
    (squad_json([("ctx", [("a", None, [("ctx", 0)])])]), "qas[0]: not SQuAD v1.1 (id, question and context must"),
    (squad_json([("ctx", [("a", "q?", [("nope", 0)])])]), "no question has an answer that matches its context"),
])
def test_squad_file_with_nothing_to_train_on_is_refused_naming_it(tmp_path, body, message):
    (tmp_path / "s.json").write_text(json.dumps(body))
    with pytest.raises(ValueError) as e:
        squad.cached_features(tmp_path / "s.json", squad.DATA_DIR / "sample-vocab.txt", True, 64, 16, True, tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 's.json'}: ") and message in str(e.value)


@pytest.mark.parametrize("body, message", [
    (squad_json([("ctx a", [("x", "q?", [("ctx", 0)])]), ("ctx b", [("x", "r?", [("ctx", 0)])])]),
     "data[0].paragraphs[1].qas[0]: not SQuAD v1.1 (id 'x' again (first at data[0].paragraphs[0].qas[0])"),
    (squad_json([("ctx", [("a", "q?", [])])]), "qas[0]: not SQuAD v1.1 (no answers: every SQuAD v1.1 question"),
    (squad_json([("ctx", [("a", "q?", [("ctx", "0")])])]),
     "qas[0]: not SQuAD v1.1 (an answer's text must be a string and its answer_start an integer"),
])
def test_squad_file_that_is_not_v1_1_in_a_subtle_way_is_refused_naming_where(tmp_path, body, message):
    (tmp_path / "s.json").write_text(json.dumps(body))
    with pytest.raises(ValueError) as e:
        squad.load_squad(tmp_path / "s.json")
    assert str(e.value).startswith(f"{tmp_path / 's.json'}: ") and message in str(e.value)


def test_shipped_samples_have_unique_ids():
    for name in ("sample-train.json", "sample-dev.json"):
        ids = [q["id"] for q in squad.load_squad(squad.DATA_DIR / name)]  # load_squad refuses a repeated id
        assert len(ids) == len(set(ids)) > 200


def test_a_negative_answer_start_is_not_a_training_label(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(squad_json([("ab ctx", [("a", "q?", [("ctx", -3)])])])))
    assert squad.load_squad(tmp_path / "s.json")[0]["answers"] == []


def test_mismatched_answers_dropped_for_training_kept_for_scoring(tmp_path, capsys, tokenizer):
    ctx = "Paris is the capital of France."
    d = squad_json([(ctx, [("good", "Capital?", [("Paris", 0)]),
                           ("half", "Country?", [("Frence", 24), ("France", 24)]),
                           ("none", "What?", [("Berlin", 0)])])])
    p = tmp_path / "mismatch.json"
    p.write_text(json.dumps(d))
    ex = squad.load_squad(p)
    err = capsys.readouterr().err
    assert "2 questions" in err and "half, none" in err
    assert [e["answers"] for e in ex] == [[{"text": "Paris", "answer_start": 0}],
                                          [{"text": "France", "answer_start": 24}], []]
    assert ex[1]["gold_texts"] == ["Frence", "France"]  # the metric still sees every gold text
    assert squad.squad_evaluate(ex, {"good": "Paris", "half": "Frence", "none": "Berlin"})["exact_match"] == 100.0
    f = squad.featurize(ex, tokenizer, train=True)
    assert f["example_index"].tolist() == [0, 1]  # no training label for "none"
    assert squad.featurize(ex, tokenizer)["example_index"].tolist() == [0, 1, 2]


# ---- tokenizer and features ---------------------------------------------------------------------

def test_vocab_without_special_tokens_is_refused(tmp_path):
    p = tmp_path / "vocab.txt"
    p.write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"vocab\.txt: not a BERT vocab, \['\[CLS\]', '\[SEP\]'\] missing"):
        squad.load_tokenizer(p)


def run_qa_features(hf, examples, max_len, stride):
    """transformers' run_qa.py prepare_train_features, labels included, as the oracle."""
    enc = hf([e["question"].lstrip() for e in examples], [e["context"] for e in examples],
             truncation="only_second", max_length=max_len, stride=stride, return_overflowing_tokens=True,
             return_offsets_mapping=True, padding="max_length")
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        input_ids, seq = enc["input_ids"][i], enc.sequence_ids(i)
        cls_index = input_ids.index(hf.cls_token_id)
        answer = examples[enc["overflow_to_sample_mapping"][i]]["answers"][0]
        start_char = answer["answer_start"]
        end_char = start_char + len(answer["text"])
        token_start_index = 0
        while seq[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while seq[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            starts.append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            ends.append(token_end_index + 1)
    return enc, starts, ends


@pytest.mark.parametrize("max_len,stride", [(384, 128), (128, 32)])
def test_features_match_transformers_run_qa(max_len, stride, shared, head, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertTokenizerFast.from_pretrained(shared / "models/all-MiniLM-L6-v2")
    assert hf("hello world")["input_ids"] == [101, 7592, 2088, 102]  # docs/paper.md: check the oracle itself
    examples = head[::3]  # ~1,460 questions spread over all 12 articles
    enc, starts, ends = run_qa_features(hf, examples, max_len, stride)
    f = squad.featurize(examples, tokenizer, max_len, stride, train=True)
    assert len(f["input_ids"]) > len(examples)  # overflowing windows are part of the test
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert f[k].tolist() == enc[k], k
    assert f["example_index"].tolist() == enc["overflow_to_sample_mapping"]
    seq = [enc.sequence_ids(i) for i in range(len(starts))]
    context = torch.tensor([[s == 1 for s in ids] for ids in seq])
    expected = torch.tensor(enc["offset_mapping"]).masked_fill(~context[..., None], -1)
    assert torch.equal(f["offsets"], expected)
    assert f["end_positions"].tolist() == ends
    # run_qa.py's start loop runs on past the context when the answer starts in the window's last
    # context token and labels the [SEP] after it; we label that last context token. Nowhere else differ.
    ours = f["start_positions"].tolist()
    differ = [i for i in range(len(starts)) if ours[i] != starts[i]]
    for i in differ:
        last = max(t for t, s in enumerate(seq[i]) if s == 1)
        assert seq[i][starts[i]] is None and ours[i] == last == ends[i]
    assert len(differ) == {384: 0, 128: 4}[max_len]


def test_question_too_long_for_the_stride_is_refused(tokenizer):
    ex = [{"id": "long", "question": "why " * 21, "context": "because " * 50, "answers": []}]
    with pytest.raises(ValueError, match="question long has 21 tokens: max_seq_length 48 with doc_stride 24"):
        squad.featurize(ex, tokenizer, 48, 24)
    assert len(squad.featurize(ex, tokenizer, 48, 16)["input_ids"]) > 1


def test_featurize_leaves_callers_tokenizer_alone(tokenizer, head):
    squad.featurize(head[:3], tokenizer, 128, 32)
    assert tokenizer.truncation is None and tokenizer.padding is None


def test_window_counts_match_method(dev, head_features, tokenizer):
    assert len(squad.featurize(dev, tokenizer, 384, 128)["input_ids"]) == 10_784
    assert len(head_features["input_ids"]) == 4_457


# ---- answers ------------------------------------------------------------------------------------

def test_perfect_logits_give_back_the_labelled_spans(head, head_features):
    f = head_features
    L = f["input_ids"].shape[1]
    start = torch.nn.functional.one_hot(f["start_positions"], L).float()
    end = torch.nn.functional.one_hot(f["end_positions"], L).float()
    t = time.perf_counter()
    pred = squad.postprocess(head, f, start, end)
    assert time.perf_counter() - t < 5
    # every question with a labelled span of at most 30 tokens gets exactly that span's text back
    expected = {}
    labels = zip(f["example_index"].tolist(), f["start_positions"].tolist(), f["end_positions"].tolist())
    for w, (i, s, e) in enumerate(labels):
        if s > 0 and e - s < 30:
            expected[head[i]["id"]] = head[i]["context"][f["offsets"][w, s, 0]:f["offsets"][w, e, 1]]
    assert len(expected) > 0.99 * len(head)
    assert {q: pred[q] for q in expected} == expected
    # spans are whole WordPiece tokens ("sixth" for "six"), so EM stops a little short of 100
    assert squad.squad_evaluate(head, pred)["exact_match"] > 99.0


def answer(start, end, n_windows=1, **kw):
    """postprocess on ten context words "w0 ... w9" at tokens 3..12 of 16-token windows, all of one
    question; start and end logits are 0 but for {(window, token): value}."""
    context = " ".join(f"w{i}" for i in range(10))
    offsets = torch.full((n_windows, 16, 2), -1)
    for i in range(10):
        offsets[:, 3 + i] = torch.tensor([3 * i, 3 * i + 2])
    s, e = torch.zeros(n_windows, 16), torch.zeros(n_windows, 16)
    for logits, values in ((s, start), (e, end)):
        for (w, tok), v in values.items():
            logits[w, tok] = v
    features = {"offsets": offsets, "example_index": torch.zeros(n_windows, dtype=torch.int64)}
    return squad.postprocess([{"id": "q", "context": context}], features, s, e, **kw)["q"]


def test_postprocess_respects_context_order_length_and_n_best():
    assert answer({(0, 4): 5}, {(0, 6): 5}) == "w1 w2 w3"  # tokens 4..6
    assert answer({(0, 0): 9, (0, 4): 5}, {(0, 0): 9, (0, 6): 5}) == "w1 w2 w3"  # [CLS] is not context
    assert answer({(0, 8): 9, (0, 4): 5}, {(0, 5): 9, (0, 6): 5}) == "w1 w2"  # end before start: skipped
    # 10 tokens (3..12) is too long for max_answer_length=3; 3 tokens (10..12) is not
    assert answer({(0, 3): 9, (0, 10): 5}, {(0, 12): 9}, max_answer_length=3) == "w7 w8 w9"
    # with n_best=2 only the two best starts (both outside the context) are tried: no answer
    assert answer({(0, 0): 9, (0, 1): 8, (0, 5): 7}, {(0, 6): 9}, n_best=2) == ""
    assert answer({(0, 0): 9, (0, 1): 8, (0, 5): 7}, {(0, 6): 9}, n_best=3) == "w2 w3"
    # the best pair over all windows of the question
    assert answer({(0, 4): 5, (1, 7): 6}, {(0, 4): 5, (1, 8): 6}, n_windows=2) == "w4 w5"


# ---- the feature cache --------------------------------------------------------------------------

@pytest.fixture
def small_squad(tmp_path, shared):
    d = json.loads((shared / "squad/train-v1.1-head4370.json").read_text())
    d["data"] = d["data"][:1]
    p = tmp_path / "small.json"
    p.write_text(json.dumps(d))
    return p


def test_cache_second_call_hits_and_rebuilds_when_corrupt(small_squad, vocab, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    args = (small_squad, vocab, True, 384, 128, True)
    ex, f = squad.cached_features(*args, cache_dir=cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and len(f["input_ids"]) > len(ex) > 100
    with monkeypatch.context() as m:
        m.setattr(squad, "featurize", lambda *a, **kw: pytest.fail("the cache was not used"))
        ex2, f2 = squad.cached_features(*args, cache_dir=cache)
    assert ex2 == ex and f2.keys() == f.keys() and all(torch.equal(f[k], f2[k]) for k in f)
    files[0].write_bytes(files[0].read_bytes()[:1000])  # a cut-off file
    _, f3 = squad.cached_features(*args, cache_dir=cache)
    assert all(torch.equal(f[k], f3[k]) for k in f)
    _, f4 = squad.cached_features(*args, cache_dir=cache)  # rebuilt file is good again
    assert all(torch.equal(f[k], f4[k]) for k in f)
    squad.cached_features(small_squad, vocab, True, 384, 64, True, cache_dir=cache)
    assert len(list(cache.iterdir())) == 2  # another doc_stride, another key


# ---- downloading SQuAD --------------------------------------------------------------------------

SMALL = json.dumps(squad_json([("Paris is the capital of France.", [("q1", "Capital?", [("Paris", 0)])])])).encode()


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(squad, "DATA_DIR", tmp_path)
    return tmp_path


def test_squad_file_downloads_once_with_md5(http_server, data_dir, monkeypatch):
    monkeypatch.setitem(squad.SQUAD_URLS, "dev",
                        ("https://example.invalid/dev-v1.1.json", hashlib.md5(SMALL).hexdigest()))
    monkeypatch.setenv("SQUAD_URL_BASE", http_server({"/dev-v1.1.json": SMALL}))
    path = squad.squad_file("dev")
    assert path == data_dir / "squad/dev-v1.1.json" and path.read_bytes() == SMALL
    assert squad.squad_file("dev") == path and http_server.requests == ["/dev-v1.1.json"]  # not fetched again
    assert squad.load_squad(path)[0]["id"] == "q1"


def test_squad_download_with_wrong_md5_leaves_nothing(http_server, data_dir, monkeypatch):
    monkeypatch.setitem(squad.SQUAD_URLS, "dev", ("https://example.invalid/dev-v1.1.json", "0" * 32))
    monkeypatch.setenv("SQUAD_URL_BASE", http_server({"/dev-v1.1.json": SMALL}))
    with pytest.raises(OSError, match="md5 [0-9a-f]{32}, expected 0{32}; nothing saved$"):  # no "no network?"
        squad.squad_file("dev")
    assert list((data_dir / "squad").iterdir()) == []


def test_squad_download_cut_off_leaves_nothing(http_server, data_dir, monkeypatch):
    def cut_off(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(SMALL)))
        handler.end_headers()
        handler.wfile.write(SMALL[:len(SMALL) // 2])
        handler.close_connection = True

    monkeypatch.setenv("SQUAD_URL_BASE", http_server({"/dev-v1.1.json": cut_off}))
    monkeypatch.setitem(squad.SQUAD_URLS, "dev", (squad.SQUAD_URLS["dev"][0], None))  # no md5: the length tells
    with pytest.raises(OSError, match=f"dev-v1.1.json cut off after {len(SMALL) // 2} of {len(SMALL)} bytes; nothing saved$"):
        squad.squad_file("dev")
    assert list((data_dir / "squad").iterdir()) == []


def test_squad_download_without_server_names_url(data_dir, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SQUAD_URL_BASE", f"http://127.0.0.1:{port}")
    url = f"http://127.0.0.1:{port}/train-v1.1.json"
    with pytest.raises(OSError, match=f"^could not download {url}: .*; no network\\? .* instead of 'train'$"):
        squad.squad_file("train")


def test_squad_file_unknown_name_is_not_found(data_dir):
    with pytest.raises(FileNotFoundError, match="nosuch.json"):
        squad.squad_file("nosuch.json")
