"""Nothing written is lost, nothing is silently wrong: checkpoints as units, outputs checked before any work,
--resume that checks what it resumes. A tiny random BERT on the hand-made sample, a few steps each."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bert
import blockprune as bp
import bookkeeping as bk
import cost_model as cm
import files
import squad
import train_squad as ts
from bert import BertForQuestionAnswering
from conftest import ctrl_c_in_call

FEW = ["--preset", "small", "--num_train_epochs", "2", "--initial_warmup", "0.5", "--final_warmup", "0.5",
       "--fill_epochs", "1", "--finetune_epochs", "1", "--save_steps", "5"]


def run(out, *flags):
    return ts.main([*FEW, "--output_dir", str(out), *flags])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The small preset's tiny BERT, untrained, as a checkpoint: a teacher for distillation's mechanics."""
    d = tmp_path_factory.mktemp("teacher")
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(model, d, vocab, True)
    return d


def weights(d):
    return files.load_pretrained(d).state_dict()


# ---- a checkpoint directory is one unit ------------------------------------------------------------

@pytest.mark.parametrize("crash_in", ["the writing", "the moving into place"])
def test_a_save_killed_midway_leaves_the_old_checkpoint_or_the_new_one(tmp_path, monkeypatch, crash_in):
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(bp.MaskedBert(model, bp.PruneConfig(block="8x8")), tmp_path, vocab, True)  # the old one
    old = weights(tmp_path)
    small = BertForQuestionAnswering(bert.BertConfig(**{**vars(model.config), "intermediate_size": 8}))
    write, move = files.atomic_write, os.replace

    def kill_at_weights(path, data):  # kill -9 while model.safetensors is written: before the commit point
        if Path(path).name == "model.safetensors":
            raise KeyboardInterrupt
        write(path, data)

    moved = []

    def kill_at_second_move(src, dst):  # kill -9 after the commit point, with one file moved into place
        if Path(src).parent.name == ".commit":
            if moved:
                raise KeyboardInterrupt
            moved.append(src)
        move(src, dst)
    if crash_in == "the writing":
        monkeypatch.setattr(files, "atomic_write", kill_at_weights)
    else:
        monkeypatch.setattr(files.os, "replace", kill_at_second_move)
    with pytest.raises(KeyboardInterrupt):
        ts.save_checkpoint(small, tmp_path, vocab, True)  # a compacted model over the pruned one
    monkeypatch.undo()
    got, _, _ = ts.load_checkpoint(str(tmp_path))  # the reader finishes (or drops) the interrupted write
    if crash_in == "the writing":
        assert isinstance(got, bp.MaskedBert) and all(torch.equal(old[k], v) for k, v in weights(tmp_path).items())
    else:  # the new one whole: its config and weights, and no scores of the old one beside them
        assert got.config.intermediate_size == [8, 8] and not (tmp_path / "scores.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_write_that_fails_names_the_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match=rf"^{tmp_path / 'metrics.json'}: cannot write it \(No space left on device\)$"):
        files.atomic_write(tmp_path / "metrics.json", b"{}")
    assert list(tmp_path.iterdir()) == []


# ---- outputs and inputs, checked before any work -------------------------------------------------------

def test_a_stage_that_would_write_over_its_input_is_refused(teacher, tmp_path):
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    with pytest.raises(ValueError, match=f"would write over --model_name_or_path {teacher}"):
        run(teacher, "--stage", "prune", "--model_name_or_path", str(teacher), "--teacher", str(tmp_path / "t"))
    with pytest.raises(ValueError, match=f"would write over --teacher {teacher}"):
        run(teacher, "--stage", "prune", "--teacher", str(teacher))
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before  # nothing lost


def test_an_output_that_cannot_be_written_is_refused_before_any_work(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("trained before the outputs were checked"))
    (tmp_path / "pruned").write_text("in the way")
    with pytest.raises(OSError, match=f"{tmp_path / 'pruned'} is a file, expected a directory"):
        run(tmp_path, "--teacher", str(teacher))


def test_an_output_directory_that_cannot_be_made_is_refused_naming_the_flag(tmp_path):
    (tmp_path / "file").write_text("in the way")
    out = tmp_path / "file" / "run"  # under a file: mkdir fails as it would on a read-only disk
    with pytest.raises(OSError, match=rf"^--output_dir {out}: cannot write there \(.+\)$"):
        run(out)


def test_temporary_files_of_a_killed_process_are_cleaned_up(tmp_path):
    dead, alive = tmp_path / ".training_state.pt.tmp999999999", tmp_path / f".metrics.json.tmp{os.getpid()}"
    dead.write_bytes(b"half"), alive.write_bytes(b"being written")
    bk.check_outputs(ts.parse_args(["--preset", "small", "--stage", "eval"]), tmp_path)
    assert not dead.exists() and alive.exists()


def test_a_stage_from_a_masked_checkpoint_says_to_compact_first(teacher, tmp_path):
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(bp.MaskedBert(model, bp.PruneConfig(block="8x8")), tmp_path / "pruned", vocab, True)
    with pytest.raises(ValueError, match="a pruned \\(masked\\) checkpoint; .* compact it first"):
        run(tmp_path / "filled", "--stage", "fill", "--model_name_or_path", str(tmp_path / "pruned"),
            "--teacher", str(teacher))


# ---- resume checks what it resumes ---------------------------------------------------------------------

@pytest.fixture
def stopped(teacher, tmp_path):
    """A pruning run stopped by Ctrl-C after its training state of step 10 was saved."""
    with ctrl_c_in_call(12):
        run(tmp_path, "--stage", "prune", "--teacher", str(teacher))
    assert (tmp_path / "training_state.pt").exists()
    return tmp_path


def test_every_flag_is_checked_on_resume_or_named_as_one_that_may_change():
    args = ts.parse_args(["--preset", "small"])
    settings = {s: bk.stage_settings(args, s) for s in ("finetune", "prune", "fill", "eval")}
    may_change = {"save_steps", "logging_steps", "device", "per_device_eval_batch_size", "no_teacher_cache",
                  "speed_windows", "compile"}  # a new flag must go into stage_settings or, said so, here
    assert set(vars(args)) - set().union(*settings.values()) == may_change | {"output_dir", "preset", "resume", "stage",
                                                                              "overwrite_output_dir"}
    assert all(f"--{k}" in bk.stage_settings.__doc__ for k in may_change)
    for k in settings["prune"]:  # each one changed is refused, naming it
        with pytest.raises(ValueError, match=f"^{'torchrun processes' if k == 'processes' else '--' + k}: x was made"):
            bk.same_settings("x", {**settings["prune"], k: "another"}, settings["prune"])


@pytest.mark.parametrize("flag, value, saved, given", [("--learning_rate", "1e-3", "0.002", "0.001"),
                                                       ("--num_train_epochs", "3", "2.0", "3.0"),
                                                       ("--target_density", "0.5", "None", "0.5"),
                                                       ("--cost_model", "measured", "'flops'", "'measured'")])
def test_resume_with_other_settings_is_refused_naming_the_flag(teacher, stopped, flag, value, saved, given):
    with pytest.raises(ValueError, match=rf"^{flag}: {stopped / 'training_state.pt'} was made with {saved}, this run "
                                         rf"gives {given}; --resume goes on only with the same settings") as e:
        run(stopped, "--stage", "prune", "--teacher", str(teacher), "--resume", flag, value)
    assert "\n" not in str(e.value)


def test_resume_under_another_number_of_torchrun_processes_is_refused(stopped):
    saved = bk.read_state(stopped / "training_state.pt", mmap=True)["settings"]
    assert saved["processes"] == 1  # saved as the flags are (its refusal under torchrun itself: not run here)
    with pytest.raises(ValueError, match=r"^torchrun processes: .* was made with 1, this run gives 2; --resume"):
        bk.same_settings(stopped / "training_state.pt", saved, {**saved, "processes": 2})


class Planted:
    """What a hostile training_state.pt could hold: an object whose unpickling runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_training_state_that_would_run_code_is_refused_not_run(teacher, stopped, tmp_path):
    torch.save({"step": 3, "payload": Planted(tmp_path / "ran")}, stopped / "training_state.pt")
    with pytest.raises(ValueError, match=rf"^{stopped / 'training_state.pt'}: not a training state of this stage"):
        run(stopped, "--stage", "prune", "--teacher", str(teacher), "--resume")
    assert not (tmp_path / "ran").exists()


def test_a_stopped_run_is_never_overwritten_without_resume(teacher, stopped):
    state = (stopped / "training_state.pt").read_bytes()
    with pytest.raises(ValueError, match="the training state of a stopped run: --resume continues it"):
        run(stopped, "--stage", "prune", "--teacher", str(teacher))
    assert (stopped / "training_state.pt").read_bytes() == state


def test_a_new_run_into_a_directory_that_holds_results_is_refused_unless_told_to_overwrite(teacher, tmp_path):
    first = run(tmp_path, "--stage", "finetune")
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    model, vocab, _ = ts.load_checkpoint("tiny")
    pruned = tmp_path.parent / f"{tmp_path.name}-pruned"
    ts.save_checkpoint(bp.MaskedBert(model, bp.PruneConfig(block="8x8")), pruned, vocab, True)
    for flags in (["--stage", "finetune", "--seed", "3"],  # the same stage with another flag
                  ["--stage", "eval", "--model_name_or_path", str(teacher)],  # records beside another model
                  ["--stage", "eval", "--model_name_or_path", str(tmp_path)],  # records over the stage's own
                  ["--stage", "compact", "--model_name_or_path", str(pruned)],
                  ["--stage", "compact", "--model_name_or_path", str(pruned), "--resume"]):
        with pytest.raises(ValueError, match=rf"^--output_dir {tmp_path}: holds an earlier run's results \({tmp_path}/"
                                             r"\S+\): --resume goes on with them, --overwrite_output_dir replaces "
                                             "them, or give another --output_dir$"):
            run(tmp_path, *flags)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept  # nothing lost
    assert run(tmp_path, "--stage", "finetune", "--resume") == first  # --resume goes on (here: nothing to do)
    other = run(tmp_path, "--stage", "finetune", "--seed", "3", "--overwrite_output_dir")  # told to: replaced, whole
    assert other["settings"]["seed"] == 3 and bk.saved_metrics(tmp_path) == other
    assert not bk.changed_output(tmp_path, other)  # the model, vocab, predictions... are the new run's
    run(tmp_path / "eval", "--stage", "eval", "--model_name_or_path", str(tmp_path))  # elsewhere, as the README says


def test_the_quick_start_run_again_with_another_flag_is_refused_not_merged(teacher, tmp_path):
    run(tmp_path, "--teacher", str(teacher))
    results = (tmp_path / "results.json").read_bytes()
    with pytest.raises(ValueError, match=rf"^--output_dir {tmp_path}: holds an earlier run's results"):
        run(tmp_path, "--teacher", str(teacher), "--target_density", "0.5")
    assert (tmp_path / "results.json").read_bytes() == results


def test_eval_into_a_stopped_runs_directory_keeps_its_training_state(teacher, stopped):
    run(stopped, "--stage", "eval", "--model_name_or_path", str(teacher))
    assert (stopped / "training_state.pt").exists() and (stopped / "metrics.json").exists()


def test_resume_of_a_finished_stage_skips_it_and_may_change_only_what_does_not_matter(teacher, tmp_path, monkeypatch):
    first = run(tmp_path, "--stage", "prune", "--teacher", str(teacher))
    monkeypatch.setattr(ts, "train", lambda *a, **k: pytest.fail("a finished stage was trained again"))
    again = run(tmp_path, "--stage", "prune", "--teacher", str(teacher), "--resume", "--logging_steps", "3",
                "--save_steps", "7", "--per_device_eval_batch_size", "5", "--no_teacher_cache", "--speed_windows", "9",
                "--device", "cpu")
    assert again == first
    with pytest.raises(ValueError, match=rf"^--final_lambda: {tmp_path / 'metrics.json'} was made with 20.0"):
        run(tmp_path, "--stage", "prune", "--teacher", str(teacher), "--resume", "--final_lambda", "10")


def test_stage_all_resume_with_another_target_is_refused_not_skipped(teacher, tmp_path):
    run(tmp_path, "--teacher", str(teacher), "--target_density", "0.6")
    with pytest.raises(ValueError, match=rf"^--target_density: {tmp_path / 'pruned' / 'metrics.json'} was made "
                                         r"with 0.6, this run gives 0.3"):
        run(tmp_path, "--teacher", str(teacher), "--target_density", "0.3", "--resume")


# ---- a measured cost model: saved beside the run, reused on resume, another model's refused ----------------

def table_of(config, **costs):
    return {"cost_model": "measured", "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "attention_head_size": config.attention_head_size, "head": 2e-3, "unit": 1e-4, "fixed": 0.01, **costs}


def test_a_measured_cost_table_is_saved_and_a_resumed_run_prunes_by_the_same(tmp_path, monkeypatch):
    config, calls = ts.load_checkpoint("tiny")[0].config, []
    monkeypatch.setattr(cm, "measure_costs", lambda c, device, dtype, batch, seq_len: calls.append(
        (device.type, dtype, batch, seq_len)) or table_of(c))
    args = ts.parse_args([*FEW, "--cost_model", "measured"])
    assert ts.cost_table(args, config, tmp_path) == table_of(config) == json.loads(
        (tmp_path / "cost_table.json").read_text())
    assert calls == [("cpu", torch.float32, 64, 128)]  # the small preset's eval batch and length, fp32 on CPU
    args.resume = True  # no training state: nothing to go on from, so a fresh start is timed afresh
    assert ts.cost_table(args, config, tmp_path) == table_of(config) and len(calls) == 2
    (tmp_path / "training_state.pt").touch()  # timed again, the table would differ, and so would the thresholds
    assert ts.cost_table(args, config, tmp_path) == table_of(config) and len(calls) == 2  # of the resumed steps
    assert ts.cost_table(ts.parse_args(FEW), config, tmp_path) is None  # --cost_model flops
    args = ts.parse_args([*FEW, "--cost_model", "measured", "--cost_table", str(tmp_path / "cost_table.json")])
    assert ts.cost_table(args, config, tmp_path / "run/pruned") == table_of(config) and len(calls) == 2  # a new dir
    assert (tmp_path / "run/pruned/cost_table.json").read_text() == (tmp_path / "cost_table.json").read_text()
    other = tmp_path / "other.json"  # a resumed state goes on only by the table it started with
    other.write_text(json.dumps(table_of(config, head=3e-3)))
    args = ts.parse_args([*FEW, "--cost_model", "measured", "--cost_table", str(other), "--resume"])
    with pytest.raises(ValueError, match=f"^--cost_table {other}: not the table {tmp_path / 'cost_table.json'} this"):
        ts.cost_table(args, config, tmp_path)


def test_timings_too_noisy_to_fit_are_refused_naming_the_flag_and_write_no_table(tmp_path, monkeypatch):
    noisy = {(0, 0): 0.5, (2, 0): 0.3, (4, 0): 0.5, (0, 8): 0.4, (0, 16): 0.6, (2, 8): 0.2, (4, 16): 0.9}
    monkeypatch.setattr(cm, "measure_costs", lambda *a: cm.fit_costs({**noisy, "outside": 0.1}, 2))
    with pytest.raises(ValueError, match=r"^--cost_model measured: cost model: a layer's fixed cost came out negative"):
        ts.cost_table(ts.parse_args([*FEW, "--cost_model", "measured"]), ts.load_checkpoint("tiny")[0].config, tmp_path)
    assert not (tmp_path / "cost_table.json").exists()


def test_pruning_by_a_given_cost_table_meets_its_target_under_it(teacher, tmp_path):
    table = tmp_path / "table.json"
    config = ts.load_checkpoint("tiny")[0].config
    table.write_text(json.dumps(table_of(config, head=4e-3)))
    run(tmp_path / "pruned", "--stage", "prune", "--teacher", str(teacher), "--target_speedup", "1.5",
        "--cost_model", "measured", "--cost_table", str(table))
    assert json.loads((tmp_path / "pruned/cost_table.json").read_text()) == json.loads(table.read_text())
    run(tmp_path / "compact", "--stage", "compact", "--model_name_or_path", str(tmp_path / "pruned"))
    r = json.loads((tmp_path / "compact/report.json").read_text())
    cost = table_of(config, head=4e-3)
    kept = sum(x["heads"] * cost["head"] + x["ffn"] * cost["unit"] for x in r["layers"]) + cost["fixed"]
    assert abs(kept - cm.model_cost(config, cost) / 1.5) <= cost["head"] / 2  # FFN padding apart
    padded = cm.model_cost(files.load_pretrained(tmp_path / "compact").config, cost)
    assert r["cost_model"] == "measured" and r["predicted_speedup"] == cm.model_cost(config, cost) / padded
    assert r["predicted_speedup_flops"] == r["flops_dense"] / r["flops"] != r["predicted_speedup"]


@pytest.mark.parametrize("content, message", [
    ("{not JSON", "Expecting property name"),
    ('{"head": 1}', "not a cost table: expected a JSON object with the finite numbers hidden_size"),
    *[(json.dumps(table_of(bert.BertConfig(), **bad)), "not a cost table")  # NaN and Infinity: json reads them
      for bad in ({"head": float("nan")}, {"fixed": float("inf")}, {"unit": True}, {"layer": None})],
    (json.dumps(table_of(bert.BertConfig(hidden_size=64, num_attention_heads=4))),
     "measured for a model of hidden_size 64, this model has 128"),
    (json.dumps({**table_of(bert.BertConfig()), "layer": -0.02}), "its layer cost is -0.02: expected head and unit"),
    (json.dumps(table_of(bert.BertConfig(), unit=0)), "its unit cost is 0: expected head and unit costs above 0")])
def test_a_cost_table_not_of_this_model_is_refused_in_one_line_naming_the_file(tmp_path, content, message):
    table = tmp_path / "table.json"
    table.write_text(content)
    with pytest.raises(SystemExit) as e:  # before any training: the teacher's fine-tuning has not begun
        ts.cli([*FEW, "--output_dir", str(tmp_path / "run"), "--cost_model", "measured", "--cost_table", str(table)])
    error = str(e.value)
    assert error.startswith(f"error: --cost_table {table}: ") and message in error and "\n" not in error
    assert not (tmp_path / "run/teacher").exists()
    with pytest.raises(SystemExit, match="^error: --cost_table: a measured table, for --cost_model measured$"):
        ts.parse_args([*FEW, "--cost_table", str(table)])


# ---- the minilm preset anywhere: the checkpoint from the hub, the official train file cut -------------

def test_minilm_preset_without_the_shared_folder_downloads_its_files(tmp_path, monkeypatch, http_server):
    model, vocab, _ = ts.load_checkpoint("tiny")  # stands in for all-MiniLM-L6-v2 on the local "hub"
    files.save_pretrained(model, tmp_path / "hub-model", vocab)
    hub = {f"/sentence-transformers/all-MiniLM-L6-v2/resolve/main/{f}": (tmp_path / "hub-model" / f).read_bytes()
           for f in ("config.json", "vocab.txt", "model.safetensors")}
    squad_files = {"/train-v1.1.json": (ts.DATA_DIR / "sample-train.json").read_bytes(),
             "/dev-v1.1.json": (ts.DATA_DIR / "sample-dev.json").read_bytes()}
    base = http_server({**hub, **squad_files})
    for split, name in (("train", "/train-v1.1.json"), ("dev", "/dev-v1.1.json")):
        monkeypatch.setitem(squad.SQUAD_URLS, split, (f"https://example.invalid{name}",
                                                   hashlib.md5(squad_files[name]).hexdigest()))
    monkeypatch.setenv("BLOCKPRUNE_SHARED", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_ENDPOINT", base)
    monkeypatch.setenv("SQUAD_URL_BASE", base)
    for module in (ts, squad, files):
        monkeypatch.setattr(module, "DATA_DIR", tmp_path / "data")
    args = ts.parse_args(["--preset", "minilm"])
    assert (args.model_name_or_path, args.train_file, args.dev_file, args.max_train_questions) == (
        "sentence-transformers/all-MiniLM-L6-v2", "train", "dev", 4370)
    with pytest.raises(ValueError, match=r"--max_train_questions 4370: .*train-v1.1.json has only 240 questions"):
        ts.main(["--preset", "minilm", "--stage", "finetune", "--output_dir", str(tmp_path / "out")])
    m = ts.main(["--preset", "minilm", "--stage", "finetune", "--output_dir", str(tmp_path / "out"),
                 "--max_train_questions", "100", "--max_seq_length", "128", "--doc_stride", "32",
                 "--finetune_epochs", "0.5"])
    assert sorted(set(http_server.requests)) == sorted([*hub, *squad_files]) and m["f1"] >= 0
    examples, features = ts.features_for(ts.parse_args(["--preset", "minilm", "--max_train_questions", "100",
                                                        "--max_seq_length", "128", "--doc_stride", "32"]),
                                         tmp_path / "out" / "vocab.txt", True, "train")
    every = squad.load_squad(tmp_path / "data" / "squad" / "train-v1.1.json")
    assert examples == every[:100] and features["example_index"].max() == 99  # the file's first 100, in order


@pytest.mark.parametrize("content", ['{"f1": ', "[]", '{"f1": 1, "settings": []}'])  # cut off; JSON, not a dict
def test_a_broken_metrics_file_on_resume_is_named_in_one_line(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'metrics.json'}: (not a metrics file|made by an older)") as e:
        run(tmp_path, "--stage", "finetune", "--resume")
    assert "\n" not in str(e.value)


# ---- a run owns its directory; a result and its files are one unit; --resume checks what they are -----------------

def test_a_directory_in_use_is_refused_naming_the_process_and_a_killed_runs_lock_is_not(tmp_path):
    p = subprocess.Popen([sys.executable, ts.__file__, *FEW, "--stage", "finetune", "--finetune_epochs", "300",
                          "--save_steps", "0", "--logging_steps", "1", "--output_dir", str(tmp_path / "pruned")],
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stderr:  # training: the directory is held
            if line.startswith("finetune step"):
                break
        held = rf"in use by process {p.pid} \(python \S*train_squad.py --preset small .*, since [-\d]+ [:\d]+\): wait "
        with pytest.raises(ValueError, match=rf"^--output_dir {tmp_path / 'pruned'}: {held}"):
            run(tmp_path / "pruned", "--stage", "finetune")  # the same directory
        with pytest.raises(ValueError, match=rf"^--output_dir {tmp_path / 'pruned'}: {held}"):
            run(tmp_path)  # --stage all, one of whose stages it is
    finally:
        p.kill()  # kill -9: no chance to let go of anything
        p.wait()
    assert run(tmp_path / "pruned", "--stage", "finetune")["steps"] > 0  # the killed run's lock blocks nothing


@pytest.mark.parametrize("stage", ["finetune", "compact"])
@pytest.mark.parametrize("crash_in", ["the writing", "the moving into place"])
def test_a_kill_between_a_stages_files_leaves_a_model_with_its_own_records_or_none(tmp_path, monkeypatch, stage,
                                                                                      crash_in):
    model, vocab, _ = ts.load_checkpoint("tiny")
    masked = bp.MaskedBert(model, bp.PruneConfig(block="8x8"))
    ts.save_checkpoint(masked, tmp_path / "pruned", vocab, True)
    with torch.no_grad():
        masked.scores["layer0_query"].fill_(-5)  # another structure: layer 0 loses its heads
    ts.save_checkpoint(masked, tmp_path / "pruned2", vocab, True)
    ts.save_checkpoint(model, tmp_path / "start", vocab, True)
    start = {"compact": ["pruned", "pruned2"], "finetune": ["start", "start"]}[stage]
    run(tmp_path / "out", "--stage", stage, "--model_name_or_path", str(tmp_path / start[0]))

    def contents():
        return {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()
                if p.is_file() and p.name not in (".lock", "training_state.pt")}  # (the state: --resume's to go on)
    before = contents()
    write, move, moved = files.atomic_write, os.replace, []

    def kill_in_writing(path, data):  # before the commit point: between the unit's model and its records
        if Path(path).parent.name == ".incoming" and Path(path).name in ("metrics.json", "report.json"):
            raise KeyboardInterrupt
        write(path, data)

    def kill_in_moving(src, dst):  # after it: some of the new unit's files in place, some not
        if Path(src).parent.name == ".commit" and len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(src) if Path(src).parent.name == ".commit" else None
        move(src, dst)
    monkeypatch.setattr(*(files, "atomic_write", kill_in_writing) if crash_in == "the writing" else
                        (files.os, "replace", kill_in_moving))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "out", "--stage", stage, "--model_name_or_path", str(tmp_path / start[1]), "--seed", "5",
            "--overwrite_output_dir")
    monkeypatch.undo()
    files.finish_write(tmp_path / "out")  # what every reader of a checkpoint does first
    after = contents()
    if crash_in == "the writing":  # the old model; its records were removed by --overwrite_output_dir, not replaced
        assert {k: v for k, v in after.items() if k not in bk.RECORDS} == {
            k: v for k, v in before.items() if k not in bk.RECORDS} and not set(after) & set(bk.RECORDS)
    else:  # the new unit whole: its model with its own records
        assert after != before and (stage == "compact" or not bk.changed_output(tmp_path / "out", bk.saved_metrics(
            tmp_path / "out")))
        if stage == "compact":
            assert json.loads(after["report.json"])["heads"] == sum(files.load_pretrained(tmp_path / "out")
                                                                    .config.num_attention_heads)


def test_resume_refuses_a_finished_stage_whose_files_changed_and_redoes_one_whose_inputs_changed(teacher, tmp_path,
                                                                                                  capsys):
    run(tmp_path / "run", "--teacher", str(teacher))
    model = files.load_pretrained(tmp_path / "run/pruned")
    files.save_pretrained(model, tmp_path / "run/filled")  # a model written over a finished stage's, by hand
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'run/filled/model.safetensors'}: not the file the stage "
                                         r"wrote \(its metrics.json records another\): run without --resume"):
        run(tmp_path / "run", "--teacher", str(teacher), "--resume")
    # the given teacher trained on: the stages made from it are made again, not reported as they were
    run(tmp_path / "run", "--teacher", str(teacher), "--overwrite_output_dir")
    t, vocab, _ = ts.load_checkpoint(str(teacher))
    with torch.no_grad():
        t.qa_outputs.weight.mul_(2)
    ts.save_checkpoint(t, teacher, vocab, True)
    capsys.readouterr()
    run(tmp_path / "run", "--teacher", str(teacher), "--resume")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run/pruned'}: its input (teacher) changed since the stage ran: it runs again" in err
    assert f"{tmp_path / 'run/filled'}: its input (model, teacher) changed since the stage ran: it runs again" in err
