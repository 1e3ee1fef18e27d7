"""cost_model.py: the costs that --target_speedup prunes by (FLOPs counted, or seconds measured and fitted), and a
target speed-up as a target density of that cost."""
from dataclasses import replace

import pytest
import torch

import blockprune as bp
import cost_model as cm
import report
from bert import BertConfig
from test_blockprune import tiny


def pruned_at(masked, speedup, cost):
    """masked at the end of a one-step ramp to the target speed-up under a cost model: the target itself."""
    masked.config = bp.PruneConfig(block=masked.config.block, target_density=cm.keep_fraction(
        speedup, masked.model.config, cost), cost=cost)
    return report.structure(masked, bp.schedule(1, masked)[0])

def test_encoder_flops_of_bert_base_and_d26_are_methods_figures():
    # docs/paper.md: 19.5 GFLOP per sequence at length 384 against 70.7 for BERT-base, a ratio of 3.62x
    base = BertConfig()
    d26 = replace(base, num_attention_heads=[4, 4, 6, 7, 7, 5, 6, 7, 5, 5, 5, 3], attention_head_size=64,
                  intermediate_size=[552, 717, 795, 789, 833, 792, 620, 466, 283, 112, 96, 238])
    assert cm.encoder_flops(base, 384) / 1e9 == pytest.approx(70.7, abs=0.05)
    assert cm.encoder_flops(d26, 384) / 1e9 == pytest.approx(19.5, abs=0.05)
    assert cm.encoder_flops(base, 384) / cm.encoder_flops(d26, 384) == pytest.approx(3.62, abs=0.005)


@pytest.mark.parametrize("block", ["16x8", "head"])  # blocks within a head: no two heads die together
def test_target_speedup_keeps_the_flops_of_the_speedup_within_half_a_head(block):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block=block))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
    c, T = masked.model.config, 128
    dense, head = cm.encoder_flops(c, T), cm.head_and_unit_flops(c, T)[0]
    for speedup in (1.0, 1.3, 1.8, 3.6, 10.0):
        s = pruned_at(masked, speedup, cm.flop_costs(c, T))
        flops = cm.encoder_flops(replace(c, num_attention_heads=s["heads"], intermediate_size=s["ffn"]), T)
        assert abs(flops - dense / speedup) <= head / 2, (speedup, s)


# ---- the cost models of --target_speedup: FLOPs counted, or seconds measured ------------------------------------

def synthetic_table(config, head=2e-3, unit=1e-4, fixed=0.05):
    """A measured cost table of known costs, as measure_costs returns it."""
    return {"cost_model": "measured", "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "attention_head_size": config.attention_head_size, "head": head, "unit": unit, "fixed": fixed}


def test_the_flop_cost_model_is_the_flop_count():
    c = tiny().config
    small = replace(c, num_attention_heads=[1, 2, 0], intermediate_size=[8, 16, 40])
    flops = cm.flop_costs(c, 128)
    assert flops["fixed"] == 0 and (flops["head"], flops["unit"]) == cm.head_and_unit_flops(c, 128)
    assert cm.model_cost(small, flops) == cm.encoder_flops(small, 128)
    assert cm.predicted_speedup(small, c, flops) == cm.encoder_flops(c, 128) / cm.encoder_flops(small, 128)


def test_fit_recovers_known_costs_from_synthetic_timings():
    base, attention, ffn, head, unit, outside = 0.2, 0.1, 0.08, 0.12, 0.0011, 0.3
    grid = [(0, 0), (3, 0), (6, 0), (12, 0), (0, 384), (0, 768), (0, 1536), (12, 1536)]
    seconds = {(h, n): base + attention * (h > 0) + ffn * (n > 0) + head * h + unit * n for h, n in grid}
    fit = cm.fit_costs({**seconds, "outside": outside}, layers=6)
    assert fit["head"] == pytest.approx(head) and fit["unit"] == pytest.approx(unit)
    assert fit["layer"] == pytest.approx(base + attention + ffn)
    assert fit["fixed"] == pytest.approx(outside + 6 * (base + attention + ffn))
    assert [tuple(g[:2]) for g in fit["grid"]] == grid
    faster = {(h, n): t - 0.2 * h for (h, n), t in seconds.items()}  # with more heads: not a measurement to prune by
    with pytest.raises(ValueError, match="does not grow with its heads and units"):
        cm.fit_costs({**faster, "outside": outside}, layers=6)


def test_a_fit_whose_layers_cost_less_than_nothing_is_refused_as_noise():
    # measure_costs' grid for MiniLM (12 heads, 1,536 units), timings of known costs, then the dense layer timed slow
    # (as in docs/speed.md's d25 miss): the fit's slopes go up, its constants below zero, the fixed cost below the
    # embeddings' alone
    grid = [(0, 0), (1, 0), (3, 0), (6, 0), (12, 0), (0, 192), (0, 384), (0, 768), (0, 1536), (1, 192), (3, 384),
            (6, 768), (12, 1536)]
    seconds = {(h, n): 0.1 + 0.06 * h + 5e-4 * n for h, n in grid}
    assert cm.fit_costs({**seconds, "outside": 0.12}, layers=6)["layer"] == pytest.approx(0.1)
    seconds[12, 1536] += 0.9
    with pytest.raises(ValueError, match=r"^cost model: a layer's fixed cost came out negative \(-0.0\d+ s\): time"):
        cm.fit_costs({**seconds, "outside": 0.12}, layers=6)


def test_measured_costs_time_the_grid_and_make_a_table_that_fits_the_model(monkeypatch):
    timed, fit = {}, cm.fit_costs

    def known_costs(seconds, layers):  # what the clock said, then costs known: a test of timings would be flaky
        timed.update(seconds)
        return fit({k: 1 if k == "outside" else 0.1 + 0.01 * k[0] + 0.001 * k[1] for k in seconds}, layers)
    monkeypatch.setattr(cm, "fit_costs", known_costs)
    ran = []

    class Recorded(cm.Layer):  # which layer each timing ran: (heads, FFN units)
        def forward(self, x, attend):
            ran.append((self.heads, self.ffn_in.out_features))
            return super().forward(x, attend)
    monkeypatch.setattr(cm, "Layer", Recorded)
    c = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100)
    table = cm.measure_costs(c, torch.device("cpu"), torch.float32, batch=4, seq_len=16)
    assert list(timed) == ["outside", (0, 0), (1, 0), (2, 0), (4, 0), (0, 16), (0, 32), (0, 56), (0, 104),
                           (1, 32), (2, 56), (4, 104)]  # (heads, units): both parts where pruned layers are
    grid = list(timed)[1:]  # each key timed a layer of its own shape: rounds 0 .. rounds, every other one reversed
    assert ran == [k for r in range(table["rounds"] + 1) for k in (grid if r % 2 else grid[::-1])]
    assert all(0 < t < 10 for t in timed.values())  # FFN widths multiples of 8 as compact leaves them, and the dense
    assert cm.check_cost_table(table, c) is table and table["fixed"] == pytest.approx(1 + 2 * 0.1)
    assert (table["batch"], table["seq_len"], table["dtype"], table["head"]) == (4, 16, "float32", pytest.approx(0.01))
    with pytest.raises(ValueError, match="measured for a model of hidden_size 64, this model has 32"):
        cm.check_cost_table(table, replace(c, hidden_size=32))
    with pytest.raises(ValueError, match="not a cost table: expected a JSON object with the finite numbers"):
        cm.check_cost_table({"head": 1}, c)


def test_timings_refused_as_noise_get_more_rounds_then_the_refusal(monkeypatch):
    c = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100)
    fits, noisy = [], [2]

    def fit(seconds, layers):  # refuses the first noisy[0] fits, as fit_costs refuses noise
        fits.append(dict(seconds))
        if len(fits) <= noisy[0]:
            raise ValueError("cost model: noise")
        return {"head": 1, "unit": 1, "fixed": 1}
    monkeypatch.setattr(cm, "fit_costs", fit)
    table = cm.measure_costs(c, torch.device("cpu"), torch.float32, batch=2, seq_len=8, reps=2)
    assert table["rounds"] == 4 and len(fits) == 3  # fitted after rounds 2, 3 and 4 (the warm-up round 0)
    assert all(fits[2][k] <= fits[1][k] <= fits[0][k] for k in fits[0])  # the fastest of more rounds
    fits.clear()
    noisy[0] = 99
    with pytest.raises(ValueError, match="^cost model: noise$"):
        cm.measure_costs(c, torch.device("cpu"), torch.float32, batch=2, seq_len=8, reps=2)
    assert len(fits) == 5  # rounds 2 .. 6: at most 3 x reps


@pytest.mark.parametrize("speedup", [1.0, 1.5, 2.5, 4.0])
def test_a_measured_table_picks_the_structure_that_meets_the_target_under_it(speedup):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="head"))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
    c = masked.model.config
    table = synthetic_table(c, head=4e-3, unit=1e-4, fixed=0.01)  # heads dearer than their FLOPs say
    s = pruned_at(masked, speedup, table)
    kept = cm.model_cost(replace(c, num_attention_heads=s["heads"], intermediate_size=s["ffn"]), table)
    assert abs(kept - cm.model_cost(c, table) / speedup) <= table["head"] / 2, s
    flops = pruned_at(masked, speedup, cm.flop_costs(c, 384))  # the FLOP model keeps another structure
    assert speedup == 1 or flops["heads"] != s["heads"]


def test_a_speedup_beyond_the_fixed_costs_is_refused_with_the_largest_there_is():
    c = tiny().config
    table = synthetic_table(c)
    largest = cm.model_cost(c, table) / table["fixed"]  # 0.05 s fixed of 0.05 + 12 x 2e-3 + 144 x 1e-4 s
    assert 0 < cm.keep_fraction(0.999 * largest, c, table) < 0.002  # nearly every head and unit pruned
    for speedup in (2, largest):
        with pytest.raises(ValueError, match=rf"^--target_speedup {speedup:g}: .* takes 56.6 % of the dense model's "
                                             rf"measured time: the reachable speed-ups are below {largest:.2f}x$"):
            cm.keep_fraction(speedup, c, table)
