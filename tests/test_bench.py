"""bench.py: the FLOP bound it prints and the way it judges its targets (the timings themselves are
bench.py's job, not the tests')."""
import pytest

import bench


def test_flop_bound_of_d26_is_methods_figure():
    # METHOD.md: 19.5 GFLOP per sequence at length 384 against 70.7 for BERT-base, a ratio of 3.62x
    assert bench.encoder_flops(bench.BASE, 384) / 1e9 == pytest.approx(70.7, abs=0.05)
    assert bench.encoder_flops(bench.D26, 384) / 1e9 == pytest.approx(19.5, abs=0.05)
    assert bench.encoder_flops(bench.BASE, 384) / bench.encoder_flops(bench.D26, 384) == pytest.approx(3.62, abs=0.005)


def test_d26_keeps_the_released_models_linear_parameters():
    from blockprune import linear_params
    assert linear_params(bench.BASE) == 84_934_656 and linear_params(bench.D26) == 22_248_960


def test_targets_are_judged_on_the_right_rows():
    rows = [{"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 8, "d26 speed-up": 3.5,
             "ours over transformers, dense": 0.97},
            {"what": "inference", "device": "cpu", "dtype": "fp32", "batch": 1, "d26 speed-up": 2.0},
            {"what": "training step", "device": "cpu", "dtype": "fp32", "batch": 8, "prune over dense": 1.2}]
    v = bench.verdicts(rows)
    assert v == ["met    inference cpu fp32 batch 8: d26 speed-up 3.500 (target >= 3.4)",
                 "MISSED inference cpu fp32 batch 8: ours over transformers, dense 0.970 (target >= 1.0)",
                 "MISSED training step cpu fp32 batch 8: prune over dense 1.200 (target <= 1.15)"]
