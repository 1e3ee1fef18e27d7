"""The training script end to end on the small preset (tiny random BERT, hand-made sample in data/)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blockprune as bp
import bookkeeping as bk
import files
import report
import squad
import train_squad as ts
from bert import BertForQuestionAnswering
from conftest import ctrl_c_in_call


def run(tmp, *flags):
    return ts.main(["--preset", "small", "--output_dir", str(tmp), *flags])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The whole small preset once: finetune -> prune -> compact -> fill -> eval."""
    out = tmp_path_factory.mktemp("small")
    return out, run(out)


def test_small_preset_runs_finetune_prune_compact_fill_eval(small_run):
    out, results = small_run
    for stage in ("teacher", "pruned", "filled"):
        metrics = json.loads((out / stage / "metrics.json").read_text())
        predictions = json.loads((out / stage / "predictions.json").read_text())
        assert metrics["f1"] == results[stage]["f1"] and set(predictions) == {q["id"] for q in squad.load_squad(
            ts.DATA_DIR / "sample-dev.json")}
    assert results["teacher"]["f1"] > 15  # a tiny BERT from scratch learns the sample: well above chance
    assert results["filled"]["f1"] > 10
    assert json.loads((out / "results.json").read_text())["speedup"] == results["speedup"]
    r = results["structure"]
    assert r["max_logit_difference_from_masked"] < 1e-5
    assert r["linear_density"] < 0.9  # something was pruned
    h = r["head_pruning"]  # the paper's pattern, at toy scale: some heads removed whole, holding some of the pruning
    assert h["heads_total"] == 16 and h["heads_removed"] > 0 and 0 < h["fraction_in_removed_heads"] < 1
    if importlib.util.find_spec("matplotlib"):
        assert (out / "compact" / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_report_densities_equal_what_the_weights_hold(small_run):
    out, results = small_run
    filled = files.load_pretrained(out / "filled")
    held = sum(getattr(layer, n).weight.numel()
               for layer in filled.bert.layers for n in bp.ATTENTION + ("ffn_in", "ffn_out"))
    r = results["structure"]  # the compacted model's: its FFN padding (zero units, multiples of 8) counted apart
    assert r["linear_params"] + r["padding_params"] == held
    dense = bp.linear_params(ts.load_checkpoint("tiny")[0].config)
    assert r["linear_density"] == pytest.approx(r["linear_params"] / dense)
    masked = files.load_masked(out / "pruned")
    s = report.structure(masked, masked.config.final_threshold)
    assert s["heads"] == filled.config.num_attention_heads and s["ffn"] == [x["ffn"] for x in r["layers"]]
    assert filled.config.intermediate_size == [-(-f // 8) * 8 for f in s["ffn"]]
    hidden = filled.config.hidden_size  # a padding unit: a row of ffn_in and a column of ffn_out
    assert r["padding_params"] == 2 * hidden * sum(filled.config.intermediate_size) - 2 * hidden * sum(s["ffn"])


def test_large_lambda_removes_whole_heads_and_ffn_units(small_run, tmp_path):
    out, _ = small_run
    run(tmp_path, "--stage", "prune", "--teacher", str(out / "teacher"), "--num_train_epochs", "12",
        "--initial_warmup", "1", "--final_warmup", "4", "--final_lambda", "100", "--mask_scores_learning_rate", "0.1")
    s = report.structure(files.load_masked(tmp_path))
    assert sum(s["heads"]) < 16 and all(f < 256 for f in s["ffn"])


def test_teacher_with_another_vocab_is_refused(small_run, tmp_path, shared):
    with pytest.raises(ValueError, match="differs from the student's"):
        run(tmp_path, "--stage", "prune", "--teacher", str(shared / "models" / "paraphrase-MiniLM-L3-v2"))


@pytest.mark.parametrize("flag, value, message", [
    ("--per_device_train_batch_size", "0", "argument --per_device_train_batch_size: expected a positive integer"),
    ("--doc_stride", "100", "--doc_stride must be in"),
    ("--final_threshold", "1.2", "--final_threshold must be in"),
    ("--block", "24x24", "do not divide"),
    ("--target_density", "1.5", "--target_density must be in (0, 1]"),
    ("--target_speedup", "0.5", "--target_speedup must be at least 1"),
    ("--target_speedup", "2 --target_density 0.5", "--target_density and --target_speedup exclude each other"),
    ("--output_dir", str(ts.DATA_DIR / "sample-dev.json"), "is a file, expected a directory"),
    ("--learning_rate", "-1", "argument --learning_rate: expected a number >= 0, got '-1'"),
    ("--learning_rate", "nan", "argument --learning_rate: expected a number >= 0, got 'nan'"),
    ("--n_best_size", "0", "argument --n_best_size: expected a positive integer, got '0'"),
    ("--device", "meta", "argument --device: expected 'cpu', or 'cuda' / 'cuda:N' of a GPU this machine "
                         "has, got 'meta'"),
    ("--max_train_questions", "0", "argument --max_train_questions: expected a positive integer"),
    ("--max_train_questions", "1000", "--max_train_questions 1000: "),
    ("--device", "bogus", "argument --device: expected 'cpu', or 'cuda' / 'cuda:N' of a GPU"),
    ("--device", "cuda:99", "argument --device: expected 'cpu', or 'cuda' / 'cuda:N' of a GPU"),
    ("--max_seq_length", "256", "256 tokens, more than the model's max_position_embeddings 128: shorten them "
                                "(train_squad.py: --max_seq_length)"),
    ("--per_device_train_batch_size", "1000", "--per_device_train_batch_size 1000 x --gradient_accumulation_steps "
                                              "1 x 1 processes is larger than the"),
    ("--block", "32", "--block: 'RxC' (e.g. 32x32), 'row', 'col' or 'head'; got '32'"),
    ("--pruning_method", "topk --target_density 0.5", "--target_density needs --pruning_method sigmoid"),
    ("--pruning_method", "magnitude", "--pruning_method: 'sigmoid' or 'topk', got 'magnitude'"),
    ("--gate_dead_heads", "never", "--gate_dead_heads: 'always' or 'eval', got 'never'"),
    ("--cost_table", "nosuch.json --cost_model measured", "--cost_table nosuch.json: [Errno 2] No such file"),
    # numbers that would mean something other than their names: nothing rounded or clipped in silence
    ("--num_train_epochs", "0.01", "--num_train_epochs 0.01: no training step (an epoch is 15 steps): give at least "
                                   "0.0667, one step"),
    ("--num_train_epochs", "0", "--num_train_epochs 0: no training step"),
    ("--initial_warmup", "15", "--initial_warmup 15 and --final_warmup 6 epochs leave no step for the threshold's "
                               "ramp in --num_train_epochs 20 (300 steps)"),
    ("--warmup_ratio", "1.5", "argument --warmup_ratio: expected a fraction in [0, 1], got '1.5'"),
    ("--output_dir", "", "argument --output_dir: expected a directory or name, not '', got ''"),  # not the current
    ("--model_name_or_path", "", "argument --model_name_or_path: expected a directory or name"),  # directory
])
def test_invalid_flags_are_refused_in_one_line_naming_the_flag(small_run, tmp_path, flag, value, message, capsys):
    out, _ = small_run
    with pytest.raises(SystemExit) as e:  # cli: what the command line does with main's errors
        ts.cli(["--preset", "small", "--output_dir", str(tmp_path), "--stage", "prune", "--teacher",
                str(out / "teacher"), flag, *(value.split() or [value])])
    error = str(e.value) if e.value.code != 2 else capsys.readouterr().err.splitlines()[-1]  # 2: argparse's
    assert re.match(r"^(\S+: )?error: ", error) and message in error and "\n" not in error


def test_the_pruning_schedule_in_steps_follows_the_epoch_flags():
    args = ts.parse_args(["--preset", "small", "--num_train_epochs", "5", "--initial_warmup", "1",
                          "--final_warmup", "1.5", "--per_device_train_batch_size", "16"])
    c = ts.prune_config(args, features={"input_ids": torch.zeros(170, 1)})  # 10 steps an epoch (10 windows left out)
    assert (c.warmup_steps, c.ramp_steps) == (10, 50 - 10 - 15)  # tau 0 for an epoch; the cubic ramp; 1.5 at the end
    ramp = [bp.ramp(t, c) for t in (9, 10, 10 + 25 // 2, 35, 49)]
    assert ramp[:2] == [0, 0] and 0.8 < ramp[2] < 0.9 and ramp[3:] == [1, 1]  # cubic: 1 - (1 - 12/25)^3 = 0.86


def test_compacting_a_checkpoint_that_was_not_pruned_is_refused(small_run, tmp_path):
    teacher = small_run[0] / "teacher"
    with pytest.raises(ValueError, match=f"^--model_name_or_path {teacher}: compaction needs a pruned checkpoint"):
        run(tmp_path, "--stage", "compact", "--model_name_or_path", str(teacher))


def heads_counted(err):
    """(died, came back) of the last progress line."""
    return re.findall(r"\(died (\d+), came back (\d+)\)", err)[-1]


def assert_same_bits(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def assert_same_steps(a, b):
    """The weights of two runs that took the same steps, up to the order of the sums. (Biases with no effect on the
    loss, like the key biases, get pure rounding noise as gradient, which Adam scales up: they are left out.)"""
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        if x.dim() == 2:
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4, msg=k)


def dropout_free_start(tmp_path):
    """The small preset's tiny BERT without dropout (whose random draws differ with the batch's split), saved in
    tmp_path/start; returns it and its vocab file."""
    from dataclasses import replace
    model, vocab, _ = ts.load_checkpoint("tiny")
    start = BertForQuestionAnswering(replace(model.config, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    start.load_state_dict(model.state_dict())
    files.save_pretrained(start, tmp_path / "start", vocab)
    return start, vocab


def test_killed_pruning_run_resumes_as_if_never_stopped(small_run, tmp_path, monkeypatch, capsys):
    flags = ["--stage", "prune", "--teacher", str(small_run[0] / "teacher"), "--num_train_epochs", "3",
             "--initial_warmup", "1", "--final_warmup", "1", "--save_steps", "10"]
    get_batch, steps = ts.get_batch, []  # one call a step
    monkeypatch.setattr(ts, "get_batch", lambda *a: steps.append(1) or get_batch(*a))
    run(tmp_path / "whole", *flags)
    whole, whole_steps = heads_counted(capsys.readouterr().err), len(steps)
    with ctrl_c_in_call(17):  # in the middle of a step, past a saved state
        run(tmp_path / "killed", *flags)
    assert (tmp_path / "killed" / "training_state.pt").exists()
    steps.clear()
    capsys.readouterr()
    run(tmp_path / "killed", *flags, "--resume")
    err = capsys.readouterr().err
    saved = int(re.search(f"prune: resumed from {re.escape(str(tmp_path / 'killed' / 'training_state.pt'))} at step "
                          r"(\d+)", err)[1])
    assert saved > 0 and saved % 10 == 0  # a state of --save_steps 10
    assert len(steps) == whole_steps - saved  # it went on from there: not a rerun from 0, which would end the same
    assert heads_counted(err) == whole  # the heads' counts went on from the saved state
    a, b = files.load_masked(tmp_path / "whole"), files.load_masked(tmp_path / "killed")
    assert_same_bits(a, b)


def test_default_recipe_without_network_fails_fast_naming_the_url(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    p = subprocess.run([sys.executable, str(ts.Path(ts.__file__)), "--output_dir", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    error = [line for line in p.stderr.splitlines() if line.startswith("error: ")]  # one line, after the warning
    assert len(error) == 1 and "pass its directory" in error[0]
    assert f"127.0.0.1:{port}/bert-base-uncased/resolve/main/config.json" in error[0]  # the student, checked first
    assert "weeks on a CPU" in p.stderr and "--preset small" in p.stderr  # said at once, before anything else


def test_a_long_evaluation_says_how_far_it_is(monkeypatch, capsys):
    monkeypatch.setattr(ts, "PROGRESS_SECONDS", 0)  # a line before every batch
    model, vocab, _ = ts.load_checkpoint("tiny")
    _, dev = squad.cached_features(ts.DATA_DIR / "sample-dev.json", vocab, True, 128, 32, False)
    args = ts.parse_args(["--preset", "small", "--per_device_eval_batch_size", "100"])
    ts.predict(args, model, dev, name="eval")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eval: ")]
    assert lines[0].startswith(f"eval: 100/{len(dev['input_ids'])} windows | ") and lines[0].endswith(" left")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training_path_runs(tmp_path, precision, monkeypatch):
    # on GPU these are the defaults (bf16) or a flag (fp16 with a gradient scaler); CPU autocast runs the same code
    dtypes, scaled, qa_loss, scale = set(), [], ts.qa_loss, torch.amp.GradScaler.scale
    monkeypatch.setattr(ts, "qa_loss", lambda *a: dtypes.add(torch.is_autocast_enabled("cpu") and
                                                             torch.get_autocast_dtype("cpu")) or qa_loss(*a))
    monkeypatch.setattr(torch.amp.GradScaler, "scale",
                        lambda self, x: scaled.append(self.is_enabled()) or scale(self, x))
    m = run(tmp_path, "--stage", "finetune", "--finetune_epochs", "1", "--precision", precision)
    assert dtypes == {ts.DTYPES[precision]} and set(scaled) == {precision == "fp16"}  # under autocast; fp16 scaled
    assert m["steps"] > 0 and (tmp_path / "model.safetensors").exists()


def test_target_density_lands_within_two_points(small_run, tmp_path, capsys):
    out, _ = small_run
    run(tmp_path, "--stage", "prune", "--teacher", str(out / "teacher"), "--target_density", "0.4")
    masked = files.load_masked(tmp_path)  # evaluated, saved and loaded at the threshold found for the target
    s = report.structure(masked)
    assert s["compact_density"] == pytest.approx(0.4, abs=0.02)
    last = [line for line in capsys.readouterr().err.splitlines() if "prune step" in line][-1]
    assert f"compact {100 * s['compact_density']:.1f}% | heads {sum(s['heads'])}/" in last  # the model saved
    assert report.compact_report(bp.compact(masked), masked.model.config)["linear_density"] == pytest.approx(
        0.4, abs=0.02)


def test_another_target_from_a_given_teacher_is_pruned_without_evaluating_the_teacher_again(small_run, tmp_path):
    out, _ = small_run
    results = run(tmp_path, "--teacher", str(out / "teacher"), "--target_density", "0.3", "--num_train_epochs", "6",
                  "--initial_warmup", "1", "--final_warmup", "2", "--fill_epochs", "1")
    assert results["structure"]["linear_density"] == pytest.approx(0.3, abs=0.02) and results["speedup"] > 1
    assert json.loads((tmp_path / "results.json").read_text())["speedup"] == results["speedup"]
    # the given teacher's own metrics.json (same dev file and settings) served: it was not evaluated again
    assert not (tmp_path / "teacher").exists() and results["teacher"] == small_run[1]["teacher"]
    # the settings and steps behind each row, for docs/plot_study.py
    assert results["args"]["target_density"] == 0.3 and results["args"]["num_train_epochs"] == 6
    assert results["pruned"]["steps"] == 6 * results["filled"]["steps"] > 0
    script = Path(ts.__file__).parent / "docs" / "plot_study.py"
    plots = subprocess.run([sys.executable, script, tmp_path, small_run[0], "--out", tmp_path],
                           capture_output=True, text=True)
    if importlib.util.find_spec("matplotlib"):  # installed: the study's pictures are drawn
        assert plots.returncode == 0, plots.stderr
        for png in ("f1-speedup.png", "budget.png"):
            assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    else:
        assert "error: matplotlib is not installed" in plots.stderr


def test_a_given_teacher_is_evaluated_again_only_for_another_dev_set_or_settings(small_run, tmp_path):
    teacher = small_run[0] / "teacher"
    assert bk.evaluated(ts.parse_args(["--preset", "small"]), teacher) == small_run[1]["teacher"]
    assert bk.evaluated(ts.parse_args(["--preset", "small", "--max_answer_length", "10"]), teacher) is None
    other = tmp_path / "dev.json"
    other.write_text((ts.DATA_DIR / "sample-dev.json").read_text()[:-1] + " ")  # the same questions, other bytes
    assert bk.evaluated(ts.parse_args(["--preset", "small", "--dev_file", str(other)]), teacher) is None
    assert bk.evaluated(ts.parse_args(["--preset", "small"]), tmp_path) is None  # no metrics.json


def test_target_speedup_lands_on_its_flops_and_is_measured(small_run, tmp_path):
    out, _ = small_run
    run(tmp_path, "--teacher", str(out / "teacher"), "--target_speedup", "1.8", "--num_train_epochs", "4",
        "--initial_warmup", "1", "--final_warmup", "1", "--fill_epochs", "1")
    results = json.loads((tmp_path / "results.json").read_text())
    r = results["structure"]  # the compact stage's report.json, FLOPs counted at the small preset's length 128
    assert r["predicted_speedup"] == pytest.approx(1.8, rel=0.05) and results["speedup"] > 1
    assert r["predicted_speedup"] == r["flops_dense"] / r["flops"] and r["seq_len"] == 128


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])  # SIGINT: Ctrl-C
def test_stop_signal_saves_the_state_and_resume_finishes_as_if_never_stopped(small_run, tmp_path, signal_name,
                                                                             capsys):
    flags = ["--stage", "prune", "--teacher", str(small_run[0] / "teacher"), "--num_train_epochs", "3",
             "--initial_warmup", "1", "--final_warmup", "1", "--save_steps", "0", "--logging_steps", "5"]
    run(tmp_path / "whole", *flags)
    p = subprocess.Popen([sys.executable, str(ts.Path(ts.__file__)), "--preset", "small", "--output_dir",
                          str(tmp_path / "stopped"), *flags], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:  # the first progress line: training is under way, no state saved yet (--save_steps 0)
        if line.startswith("prune step"):
            p.send_signal(getattr(subprocess.signal, signal_name))
            break
    err = p.stderr.read()
    assert p.wait(timeout=120) == 1 and f"stopped by {signal_name} after step" in err and "--resume" in err
    stopped = tmp_path / "stopped"
    assert (stopped / "training_state.pt").exists() and not (stopped / "scores.safetensors").exists()
    step = re.search(rf"stopped by {signal_name} after step (\d+)", err)[1]
    capsys.readouterr()
    run(tmp_path / "stopped", *flags, "--resume")
    assert f"resumed from {stopped / 'training_state.pt'} at step {step}" in capsys.readouterr().err
    a, b = files.load_masked(tmp_path / "whole"), files.load_masked(tmp_path / "stopped")
    assert_same_bits(a, b)


def test_transformers_teacher_runs_through_our_training_loop(tmp_path, shared):
    pytest.importorskip("transformers")
    import teacher_parity
    m = teacher_parity.main(["--preset", "small", "--model_name_or_path",
                             str(shared / "models/paraphrase-MiniLM-L3-v2"), "--output_dir", str(tmp_path),
                             "--finetune_epochs", "1"])
    assert m["steps"] > 0 and (tmp_path / "predictions.json").exists()
    import transformers  # the model that was trained and saved is transformers', its weights moved by the steps
    before, after = (transformers.BertForQuestionAnswering.from_pretrained(d).state_dict()
                     for d in (shared / "models/paraphrase-MiniLM-L3-v2", tmp_path))
    k = "bert.encoder.layer.0.attention.self.query.weight"
    assert after.keys() == before.keys() and not torch.equal(after[k], before[k])


def test_pruning_steps_never_wait_for_the_device_between_logging_steps(small_run, tmp_path, monkeypatch):
    from test_bert import host_syncs
    get_batch = ts.get_batch
    with host_syncs() as calls:
        def marked(args, features, step, micro):  # marks in the list where each step's reads begin
            calls.append(("step", step))
            return get_batch(args, features, step, micro)
        monkeypatch.setattr(ts, "get_batch", marked)
        run(tmp_path, "--stage", "prune", "--teacher", str(small_run[0] / "teacher"), "--target_density", "0.5",
            "--logging_steps", "1000", "--save_steps", "0")
    step, reads = None, {}
    for f, line in calls:
        if f == "step":
            step = line
        elif step is not None:
            reads.setdefault(step, []).append(f)
    last = max(s for f, s in calls if f == "step")  # the one logging step, then saving and evaluating
    # batches() reads the windows on the host, before they go to the device: no wait
    assert {s: r for s, r in reads.items() if s < last and set(r) != {"batches"}} == {}
    assert "check_finite" in reads[last] and last > 10  # the counter sees the logging step's reads


def test_compile_that_cannot_run_warns_in_one_line_and_predicts_without_it(monkeypatch, capsys):
    import argparse
    model = BertForQuestionAnswering(ts.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=8)).eval()
    ids = torch.randint(1, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    args = argparse.Namespace(device=torch.device("cpu"), precision="fp32", per_device_eval_batch_size=2)
    want = ts.predict(args, model, features)[:2]

    def no_compiler(m, **kwargs):
        def fail(*a):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(a page of advice)")
        return fail
    monkeypatch.setattr(torch, "compile", no_compiler)
    got = ts.predict(argparse.Namespace(**vars(args), compile=True), model, features)[:2]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    err = capsys.readouterr().err
    assert err.count("warning: --compile: torch.compile cannot run here (RuntimeError: InvalidCxxCompiler") == 1
    assert "a page of advice" not in err


def test_half_precision_evaluation_runs_a_cast_copy_close_to_fp32(monkeypatch):
    import argparse
    model = BertForQuestionAnswering(ts.BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128)).eval()
    torch.nn.init.normal_(model.qa_outputs.weight, std=1.0)  # logits of order 1, not 0.02
    ids = torch.randint(1, 50, (6, 24), generator=torch.Generator().manual_seed(0))
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    features["attention_mask"][0, 20:] = 0  # one window with padding: the mask path too
    args = argparse.Namespace(device=torch.device("cpu"), precision="fp32", per_device_eval_batch_size=4)
    want = ts.predict(args, model, features)[0]
    layer_norm, dtypes = torch.nn.functional.layer_norm, set()
    monkeypatch.setattr(torch.nn.functional, "layer_norm",
                        lambda x, *a, **k: dtypes.add(x.dtype) or layer_norm(x, *a, **k))
    got = ts.predict(argparse.Namespace(**{**vars(args), "precision": "bf16"}), model, features)[0]
    assert dtypes == {torch.bfloat16}  # LayerNorms in bf16 too: no fp32 round trips as under autocast
    assert next(model.parameters()).dtype == torch.float32  # the model given is left in fp32
    seen = want > float("-inf")
    diff = (got - want)[seen].abs().max().item()
    assert 0 < diff < 0.05 * want[seen].abs().max().item()  # it ran in bf16 (not fp32), close to fp32


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_state(small_run, tmp_path, monkeypatch, capsys):
    regularization, calls = bp.regularization, []

    def diverge(masked):
        calls.append(1)
        return regularization(masked) * (float("nan") if len(calls) == 25 else 1)
    monkeypatch.setattr(bp, "regularization", diverge)
    with pytest.raises(SystemExit) as e:
        ts.cli(["--preset", "small", "--output_dir", str(tmp_path), "--stage", "prune", "--teacher",
                str(small_run[0] / "teacher"), "--save_steps", "10", "--initial_warmup", "0"])
    # lambda is 0 in the first step, so the 25th call of the regulariser is in step 26 (counted from 1, as the log)
    assert "loss is nan in step 26" in str(e.value) and str(tmp_path / "training_state.pt") in str(e.value)
    assert torch.load(tmp_path / "training_state.pt", weights_only=False)["step"] == 20  # the last good state


def test_out_of_memory_names_the_flags_to_lower(tmp_path, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ts, "train", oom)
    with pytest.raises(SystemExit) as e:
        ts.cli(["--preset", "small", "--output_dir", str(tmp_path), "--stage", "finetune"])
    assert "out of memory (CUDA out of memory." in str(e.value) and "--per_device_train_batch_size" in str(e.value)


def test_vocab_larger_than_the_model_is_refused(tmp_path):
    model, vocab, _ = ts.load_checkpoint("tiny")
    files.save_pretrained(model, tmp_path, vocab)
    (tmp_path / "vocab.txt").write_text(vocab.read_text() + "extra1\nextra2\n")
    with pytest.raises(ValueError, match=r"vocab.txt has more tokens than the model's vocab_size 452"):
        ts.load_checkpoint(str(tmp_path))


def test_teacher_vocab_is_compared_token_by_token_naming_the_first_difference(tmp_path):
    import re
    model, vocab, _ = ts.load_checkpoint("tiny")
    files.save_pretrained(model, tmp_path, vocab)
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    (tmp_path / "vocab.txt").write_bytes("\r\n".join(tokens).encode())  # CRLF, no final newline: the same tokens
    assert ts.load_teacher(str(tmp_path), vocab) is not None
    (tmp_path / "vocab.txt").write_text("\n".join(tokens[:5] + ["other"] + tokens[6:]))
    with pytest.raises(ValueError, match=re.escape(f"{vocab} at line 6: 'other' in the teacher's, {tokens[5]!r} in")):
        ts.load_teacher(str(tmp_path), vocab)


@pytest.mark.parametrize("name, body, message", [
    ("config.json", "[]", "config.json: not a usable BERT config"),
    ("vocab.txt", b"[PAD]\n\xff\n", "vocab.txt: not UTF-8 text"),
    ("tokenizer_config.json", '{"do_lower_case": "no"}', "expected a JSON object with do_lower_case true or false"),
    ("prune_config.json", '{"block": "8x8", "bogus": 1}', "prune_config.json: not a usable prune config"),
    ("prune_config.json", '{"block": "16x16"}', "scores.safetensors: 8 scores do not fit the model and prune_config"),
    ("scores.safetensors", b"", "scores.safetensors: corrupt or truncated safetensors file"),
    # files that parse, and lie: checked field by field when read, before any work
    ("config.json", {"vocab_size": 0}, "config.json: not a usable BERT config (BertConfig: vocab_size must be an "
                                       "integer above 0, got 0)"),
    ("config.json", {"pad_token_id": 452}, "BertConfig: pad_token_id must be an id below vocab_size 452, got 452"),
    ("config.json", {"hidden_size": "128"}, "BertConfig: hidden_size must be an integer above 0, got '128'"),
    ("config.json", {"num_attention_heads": 3, "attention_head_size": 0},
     "BertConfig: num_attention_heads must be a divisor of hidden_size 128"),
    ("config.json", {"layer_norm_eps": None}, "BertConfig: layer_norm_eps must be a number above 0, got None"),
    ("prune_config.json", {"final_lambda": "20"}, "PruneConfig: final_lambda must be a number >= 0, got '20'"),
    ("prune_config.json", {"ramp_steps": 2.5}, "PruneConfig: ramp_steps must be an integer >= 0, got 2.5"),
    ("vocab.txt", lambda text: "\n".join(text.splitlines()[:226]), "vocab.txt has 226 tokens, the model's vocab_size "
                                                                    "is 452: not this model's vocab"),
])
def test_broken_checkpoint_file_is_named_in_one_line(tmp_path, name, body, message):
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(bp.MaskedBert(model, bp.PruneConfig(block="8x8")), tmp_path, vocab, True)
    if isinstance(body, dict):  # one field of the file changed
        body = json.dumps({**json.loads((tmp_path / name).read_text()), **body})
    elif callable(body):
        body = body((tmp_path / name).read_text())
    (tmp_path / name).write_bytes(body.encode() if isinstance(body, str) else body)
    with pytest.raises(ValueError) as e:
        ts.load_checkpoint(str(tmp_path))
    assert f"{tmp_path}/" in str(e.value) and message in str(e.value) and "\n" not in str(e.value)


def test_teacher_left_empty_outside_stage_all_is_refused_naming_the_flag():
    with pytest.raises(ValueError, match="--teacher: give the fine-tuned checkpoint"):
        ts.load_teacher("", ts.DATA_DIR / "sample-vocab.txt")


def test_unreadable_training_state_is_named_and_kept(tmp_path):
    (tmp_path / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="training_state.pt: not a training state of this stage and model"):
        run(tmp_path, "--stage", "finetune", "--resume")
    assert (tmp_path / "training_state.pt").read_bytes() == b"garbage"  # nothing written is lost


def torchrun(*flags):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ts.Path(ts.__file__)), "--device", "cpu", *flags], stderr=subprocess.PIPE,
                            text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_a_first_signal_asks_to_stop_and_a_second_ctrl_c_stops_at_once():
    import signal
    before = signal.getsignal(signal.SIGINT)
    with bk.stop_signals("prune") as stop:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # SIGTERM again: still the step's end
        assert stop == ["SIGTERM", "SIGTERM"]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # Ctrl-C after a request to stop: now
    with bk.stop_signals("prune") as stop:
        signal.raise_signal(signal.SIGINT)  # a first Ctrl-C only asks
        assert stop == ["SIGINT"]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_two_processes_under_torchrun_train_as_one_with_the_same_global_batch(tmp_path):
    _, vocab = dropout_free_start(tmp_path)
    flags = ["--preset", "small", "--stage", "finetune", "--model_name_or_path", str(tmp_path / "start"),
             "--finetune_epochs", "2"]
    m = ts.main([*flags, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "16"])
    p = torchrun(*flags, "--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "8")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    one, two = (files.load_pretrained(tmp_path / d).eval() for d in ("one", "two"))
    assert_same_steps(one, two)  # only the order of the gradient sums differs
    _, dev = squad.cached_features(ts.DATA_DIR / "sample-dev.json", vocab, True, 128, 32, False)
    x = [dev[k][:32] for k in ("input_ids", "attention_mask", "token_type_ids")]
    with torch.no_grad():
        for a, b in zip(one(*x), two(*x)):  # logits up to a shift of the whole row, which softmax ignores
            torch.testing.assert_close(b - b.mean(1, keepdim=True), a - a.mean(1, keepdim=True), atol=1e-4, rtol=0)
    got = json.loads((tmp_path / "two" / "metrics.json").read_text())  # the first process evaluated every question
    questions = len(squad.load_squad(ts.DATA_DIR / "sample-dev.json"))
    assert abs(got["f1"] - m["f1"]) <= 100 / questions and abs(got["exact_match"] - m["exact_match"]) <= 100 / questions


def test_max_grad_norm_0_means_no_clipping_as_in_transformers(tmp_path):
    start, _ = dropout_free_start(tmp_path)
    flags = ["--stage", "finetune", "--model_name_or_path", str(tmp_path / "start"), "--finetune_epochs", "0.5"]
    run(tmp_path / "zero", *flags, "--max_grad_norm", "0")
    run(tmp_path / "huge", *flags, "--max_grad_norm", "1e30")  # a bound no gradient reaches: no clipping either
    zero, huge = (files.load_pretrained(tmp_path / d) for d in ("zero", "huge"))
    assert not torch.equal(zero.qa_outputs.weight, start.qa_outputs.weight)  # it trained
    assert_same_bits(zero, huge)


def test_gradient_accumulation_takes_the_steps_of_the_whole_batch(tmp_path):
    start, _ = dropout_free_start(tmp_path)
    flags = ["--stage", "finetune", "--model_name_or_path", str(tmp_path / "start"), "--finetune_epochs", "1"]
    run(tmp_path / "one", *flags, "--per_device_train_batch_size", "16")
    run(tmp_path / "accum", *flags, "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
    one, accum = (files.load_pretrained(tmp_path / d) for d in ("one", "accum"))
    assert not torch.equal(one.qa_outputs.weight, start.qa_outputs.weight)  # it trained
    assert_same_steps(one, accum)


def test_two_processes_stopped_by_sigterm_resume_exactly(tmp_path):
    model, vocab, _ = ts.load_checkpoint("tiny")  # with dropout: each process's generator must come back
    files.save_pretrained(model, tmp_path / "start", vocab)
    flags = ["--preset", "small", "--stage", "finetune", "--model_name_or_path", str(tmp_path / "start"),
             "--finetune_epochs", "8", "--per_device_train_batch_size", "8", "--logging_steps", "1",
             "--save_steps", "0"]
    assert torchrun(*flags, "--output_dir", str(tmp_path / "whole")).wait(timeout=300) == 0
    p = torchrun(*flags, "--output_dir", str(tmp_path / "stopped"))
    for line in p.stderr:
        if line.startswith("finetune step"):
            p.send_signal(__import__("signal").SIGTERM)  # in step 2 of 120; torchrun passes it on to both processes
            break
    err = p.stderr.read()
    assert p.wait(timeout=300) != 0 and (step := re.search(r"stopped by SIGTERM after step (\d+)", err))
    resume = torchrun(*flags, "--output_dir", str(tmp_path / "stopped"), "--resume")
    err = resume.communicate(timeout=300)[1]
    assert resume.returncode == 0 and f"at step {step[1]}" in err  # resumed, not retrained from step 0
    a, b = (files.load_pretrained(tmp_path / d) for d in ("whole", "stopped"))
    assert_same_bits(a, b)


def test_more_processes_than_gpus_are_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with one GPU, two processes on it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in (("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=r"^torchrun: 2 processes on this machine but 1 GPU\(s\): one process per "
                                         r"GPU \(--nproc_per_node\), or --device cpu$"):
        run(tmp_path, "--device", "cuda")


def test_whole_recipe_runs_under_torchrun(tmp_path):
    p = torchrun("--preset", "small", "--output_dir", str(tmp_path), "--per_device_train_batch_size", "8",
                 "--finetune_epochs", "1", "--num_train_epochs", "2", "--initial_warmup", "0.5",
                 "--final_warmup", "0.5", "--fill_epochs", "1", "--target_density", "0.5")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["structure"]["linear_density"] == pytest.approx(0.5, abs=0.02) and results["speedup"] > 1


def test_cached_teacher_logits_give_the_live_teachers_losses_scores_and_f1(small_run, tmp_path, monkeypatch):
    flags = ["--stage", "prune", "--teacher", str(small_run[0] / "teacher"), "--num_train_epochs", "2",
             "--initial_warmup", "0.5", "--final_warmup", "0.5", "--device", "cpu"]  # fp32: bf16 rounds apart
    distillation_loss, losses, f1 = bp.distillation_loss, {}, {}
    for name, extra in (("cached", []), ("live", ["--no_teacher_cache"])):
        losses[name] = []
        monkeypatch.setattr(bp, "distillation_loss", lambda *a, **k: losses[name].append(distillation_loss(*a, **k))
                            or losses[name][-1])
        f1[name] = run(tmp_path / name, *flags, *extra)["f1"]
    assert len(losses["cached"]) == len(losses["live"]) == 30
    for a, b in zip(losses["cached"], losses["live"]):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    a, b = files.load_masked(tmp_path / "cached"), files.load_masked(tmp_path / "live")
    for k in a.scores:
        assert torch.allclose(a.scores[k], b.scores[k], atol=1e-5), k
    assert f1["cached"] == f1["live"]


def test_unreadable_teacher_logit_cache_is_computed_again(small_run, tmp_path, monkeypatch, capsys):
    args = ts.parse_args(["--preset", "small"])  # the sample files in data/
    monkeypatch.setattr(ts, "DATA_DIR", tmp_path)  # the caches go to tmp_path/cache
    teacher = str(small_run[0] / "teacher")
    vocab = ts.load_checkpoint(teacher)[1]
    first = ts.features_for(args, vocab, True, "train")[1]
    assert ts.teacher_logits(args, teacher, vocab, first) is None  # cached: no teacher to run live
    [path] = (tmp_path / "cache").glob("teacher-logits-*.pt")
    path.write_bytes(path.read_bytes()[:100])  # a truncated file
    again = ts.features_for(args, vocab, True, "train")[1]
    ts.teacher_logits(args, teacher, vocab, again)
    assert "unreadable cache" in capsys.readouterr().err
    assert torch.equal(first["teacher_start"], again["teacher_start"])


def test_none_switches_a_presets_target_off():
    assert ts.parse_args(["--preset", "minilm"]).target_density == 0.25
    assert ts.parse_args(["--preset", "minilm", "--target_density", "none"]).target_density is None
