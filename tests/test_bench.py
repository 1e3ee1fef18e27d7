"""bench.py: the d26 structure it times and the way it judges its targets (the timings themselves are
bench.py's job, not the tests')."""
import pytest
import torch

import bench
import blockprune as bp
import cost_model as cm
import report


def test_d26_is_the_released_models_structure():
    # docs/paper.md: 22,248,960 linear parameters, 19.5 GFLOP per sequence at length 384 (70.7 for BERT-base: 3.62x)
    from blockprune import linear_params
    from cost_model import encoder_flops
    assert linear_params(bench.BASE) == 84_934_656 and linear_params(bench.D26) == 22_248_960
    assert encoder_flops(bench.BASE, 384) / encoder_flops(bench.D26, 384) == pytest.approx(3.62, abs=0.005)


def test_targets_are_judged_on_the_right_rows():
    rows = [{"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 8, "d26 speed-up": 3.5,
             "ours over transformers, dense": 0.97},
            {"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 1, "d26 speed-up": 2.0},
            {"what": "training step", "device": "cpu", "dtype": "fp32", "batch": 8, "prune over dense": 1.2},
            {"what": "inference", "device": "cuda", "dtype": "fp32", "batch": 128, "d26 speed-up": 2.9},
            {"what": "inference", "device": "cuda", "dtype": "bf16 cast", "batch": 128, "d26 speed-up": 2.5},
            {"what": "inference", "device": "cuda", "dtype": "fp16", "batch": 128, "d26 speed-up": 1.0}]
    v = bench.verdicts(rows)
    assert v == ["met    inference cpu fp32 batch 8: d26 speed-up 3.500 (target >= 3.4)",
                 "MISSED inference cuda fp32 batch 128: d26 speed-up 2.900 (target >= 3.0)",  # fp32: the FLOP bound
                 "met    inference cuda bf16 cast batch 128: d26 speed-up 2.500 (target >= 2.44)",  # bf16: the paper's
                 "MISSED inference cpu fp32 batch 8: ours over transformers, dense 0.970 (target >= 1.0)",
                 "MISSED training step cpu fp32 batch 8: prune over dense 1.200 (target <= 1.15)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this runs the GPU's rows")
def test_gpu_rows_without_a_gpu_are_refused_in_one_line():
    with pytest.raises(SystemExit, match="^error: --device cuda: no GPU here$"):
        bench.main(["--device", "cuda"])


def test_study_times_each_finished_run_on_this_cpu_and_records_it(tmp_path, monkeypatch):
    import json
    from dataclasses import replace
    from pathlib import Path
    from bert import BertConfig
    data = Path(__file__).resolve().parents[1] / "data"
    dense = BertConfig(vocab_size=452, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    final = replace(dense, num_attention_heads=[1, 0], intermediate_size=[16, 8], attention_head_size=8)
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense/config.json").write_text(json.dumps(dense.to_dict()))
    run = tmp_path / "runs/d25"
    (run / "filled").mkdir(parents=True)
    (run / "filled/config.json").write_text(json.dumps(final.to_dict()))
    layers = [{"heads": 1, "ffn": 16}, {"heads": 0, "ffn": 8}]
    (run / "results.json").write_text(json.dumps({"args": {"max_seq_length": 64, "doc_stride": 16}, "f1": 1.0,
                                                  "structure": {"layers": layers, "predicted_speedup": 5.0}}))
    argv = ["--study", str(tmp_path / "runs"), "--dense", str(tmp_path / "dense"), "--eval_windows", "4",
            "--dev_file", str(data / "sample-dev.json"), "--vocab", str(data / "sample-vocab.txt")]
    table, timed = {"head": 2e-3, "unit": 1e-4, "fixed": 0.01}, []  # known costs: timings would make it flaky
    monkeypatch.setattr(cm, "measure_costs", lambda *a: timed.append(a[1:]) or table)
    rows = bench.main(argv)
    r = json.loads((run / "results.json").read_text())
    assert r["f1"] == 1.0 and r["speedup_cpu"] > 0 and len(rows) == 2  # added; the rest kept
    assert rows[0] == {"what": "study cost model", **table}
    assert (rows[1]["heads"], rows[1]["ffn"], rows[1]["speed-up"]) == ([1, 0], [16, 8], r["speedup_cpu"])
    assert timed == [(torch.device("cpu"), torch.float32, 128, 64)]  # at the study's batch and length
    assert rows[1]["predicted speed-up, measured cost"] == cm.predicted_speedup(final, dense, table)
    assert rows[1]["predicted speed-up"] == 5.0  # the run's own, from its results.json
    with pytest.raises(SystemExit, match=r"^error: --study: no results.json under \S+$"):
        bench.main(argv[:1] + [str(tmp_path / "dense")] + argv[2:])
    monkeypatch.setattr(cm, "measure_costs", lambda *a: cm.fit_costs({(0, 0): 1, (1, 0): 0.5, "outside": 0}, 2))
    with pytest.raises(SystemExit, match=r"^error: --study: cost model: the layer's time does not grow with its heads"):
        bench.main(argv)
    long_question = tmp_path / "dev.json"  # longer than the runs' 64-token windows allow
    long_question.write_text(json.dumps({"data": [{"paragraphs": [{"context": "a b", "qas": [
        {"id": "q1", "question": "why " * 70, "answers": [{"text": "a", "answer_start": 0}]}]}]}]}))
    with pytest.raises(SystemExit, match=rf"^error: --study: --dev_file {long_question}: question q1 has \d+ tokens"):
        bench.main([*argv[:-4], "--dev_file", str(long_question), *argv[-2:]])
    (run / "filled/config.json").unlink()  # an unfinished run
    with pytest.raises(SystemExit, match=r"^error: --study: \S+/filled/config.json: expected a model's config.json"):
        bench.main(argv)


def test_pruning_step_runs_what_training_runs():
    # the target-density schedule (its threshold a tensor, found from the scores), the progress bookkeeping
    step = bench.training_step("ours prune", torch.device("cpu"), "fp32", 1, 8)
    step(), step()
    masked = step.progress.masked
    assert torch.is_tensor(masked.threshold) and 0 < masked.threshold < 1
    assert step.progress.alive is not None and step.progress.bad_step == 0


def test_breakdown_puts_every_op_of_a_forward_in_one_kind():
    row = bench.breakdown(torch.device("cpu"), "fp32", 1, 8)
    kinds = [k for k, _ in bench.KINDS] + ["elementwise and other"]
    assert list(row["ms"]) == ["dense", "d26"] and all(list(ms) == kinds for ms in row["ms"].values())
    assert all(ms["matmul"] > 0 and ms["attention"] > 0 and ms["layernorm"] > 0 for ms in row["ms"].values())


def test_compiled_inference_row_times_ours_only(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)  # compiling takes minutes on CPU: the row's logic only
    row = bench.bench_inference(torch.device("cpu"), "fp32", 1, 8, reps=1, warmup=0, cast=True, compiled=True)
    assert list(row["seconds"]) == ["ours dense", "ours d26"] and row["dtype"] == "fp32 cast compiled"
    assert row["d26 speed-up"] > 0 and "ours over transformers, dense" not in row


def test_a_pruning_step_runs_its_own_ops_once_for_all_layers():
    # what a pruning step adds to a dense one (the masks and the masked products, forward and backward), the
    # regulariser, the target-density threshold and the heads alive: as many ops for 6 layers as for 2 (one per layer
    # made a pruning step 4x a dense step's ops)
    from bert import BertConfig, BertForQuestionAnswering
    cpu, x, ops = torch.device("cpu"), torch.randint(0, 50, (1, 8)), {}
    for layers in (2, 6):
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=16)
        prune = bp.PruneConfig(block="8x8", target_density=0.5)
        masked = bp.MaskedBert(BertForQuestionAnswering(config), prune).train()

        def step(model):
            masked.zero_grad(set_to_none=True)
            sum(model(x)).sum().backward()
        ops[layers] = (bench.operations(lambda: step(masked), cpu) - bench.operations(lambda: step(masked.model), cpu),
                       bench.operations(lambda: bp.regularization(masked), cpu),
                       bench.operations(lambda: bp.schedule(1, masked), cpu),
                       bench.operations(lambda: report.heads_alive_at(masked, 0.5), cpu))
    assert ops[6] == ops[2] and min(ops[2]) > 0


@pytest.mark.parametrize("content", ['{"args": {"max_seq_length": 64', "[]", '{"args": {"max_seq_length": 64}}',
                                     '{"args": {"max_seq_length": 64, "doc_stride": 16}, "structure": {"layers": '
                                     '[{"heads": "1", "ffn": 8}], "predicted_speedup": 2}}'])
def test_study_refuses_a_results_file_it_cannot_use_in_one_line(tmp_path, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/results.json").write_text(content)  # cut off; not an object; keys missing; a count as text
    with pytest.raises(SystemExit, match=rf"^error: --study: {tmp_path / 'run/results.json'}: not the results.json of "
                                         r"a finished --stage all run \(expected args.max_seq_length"):
        bench.main(["--study", str(tmp_path)])


@pytest.mark.parametrize("value", ["0", "-5"])
def test_eval_windows_must_be_a_count_of_windows(value):
    with pytest.raises(SystemExit, match=f"^error: argument --eval_windows: expected a positive integer, got "
                                         f"'{value}'$"):
        bench.main(["--study", "runs", "--eval_windows", value])


def test_onnx_rows_time_each_structure_in_pytorch_and_onnxruntime_fp32_and_int8():
    pytest.importorskip("onnxruntime")
    from dataclasses import replace
    dense = bench.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64)
    row = bench.bench_onnx(1, 8, 1, 0, dense, replace(dense, num_attention_heads=[1, 0], attention_head_size=16,
                                                      intermediate_size=[16, 8]), "small")
    assert list(row["seconds"]) == [f"{k} {m}" for m in ("dense", "small") for k in
                                    ("pytorch", "onnxruntime fp32", "onnxruntime int8")]
    assert row["small speed-up, onnxruntime int8"] == (row["seconds"]["onnxruntime int8 dense"] /
                                                       row["seconds"]["onnxruntime int8 small"])
