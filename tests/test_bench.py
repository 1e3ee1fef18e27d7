"""bench.py: the d26 structure it times and the way it judges its targets (the timings themselves are
bench.py's job, not the tests')."""
import pytest
import torch

import bench


def test_d26_is_the_released_models_structure():
    # docs/paper.md: 22,248,960 linear parameters, 19.5 GFLOP per sequence at length 384 (70.7 for BERT-base: 3.62x)
    from blockprune import encoder_flops, linear_params
    assert linear_params(bench.BASE) == 84_934_656 and linear_params(bench.D26) == 22_248_960
    assert encoder_flops(bench.BASE, 384) / encoder_flops(bench.D26, 384) == pytest.approx(3.62, abs=0.005)


def test_targets_are_judged_on_the_right_rows():
    rows = [{"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 8, "d26 speed-up": 3.5,
             "ours over transformers, dense": 0.97},
            {"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 1, "d26 speed-up": 2.0},
            {"what": "training step", "device": "cpu", "dtype": "fp32", "batch": 8, "prune over dense": 1.2}]
    v = bench.verdicts(rows)
    assert v == ["met    inference cpu fp32 batch 8: d26 speed-up 3.500 (target >= 3.4)",
                 "MISSED inference cpu fp32 batch 8: ours over transformers, dense 0.970 (target >= 1.0)",
                 "MISSED training step cpu fp32 batch 8: prune over dense 1.200 (target <= 1.15)"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU this runs the GPU's rows")
def test_gpu_rows_without_a_gpu_are_refused_in_one_line():
    with pytest.raises(SystemExit, match="^error: --device cuda: no GPU here$"):
        bench.main(["--device", "cuda"])
