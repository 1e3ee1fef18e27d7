import math
from dataclasses import replace


import pytest
import torch

import blockprune as bp
from bert import BertConfig, BertForQuestionAnswering


def tiny(heads=4, ffn=48, layers=3, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=32)
    model = BertForQuestionAnswering(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def inputs():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    return ids, mask, (torch.arange(16) >= 6).long().expand(3, 16)


def test_threshold_zero_prunes_nothing():
    model = tiny()
    masked = bp.MaskedBert(model, bp.PruneConfig(block="16x16")).eval()
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 5)  # very negative scores too: sigmoid > 0 still holds
    masked.threshold = 0.0
    assert all(bool((m == 1).all()) for m in masked.masks(0.0).values())
    torch.testing.assert_close(masked(*inputs()), model(*inputs()), atol=0, rtol=0)


def test_scores_get_gradients_through_the_straight_through_estimator():
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="16x16"))
    masked.threshold = 0.3  # sigmoid(0) = 0.5 > 0.3: all kept, yet every score must learn
    start, end = masked(*inputs())
    (start.logsumexp(-1) + end[:, 3]).sum().backward()
    for name, s in masked.scores.items():
        assert s.grad is not None and s.grad.abs().sum() > 0, name
    # straight-through: d mask / d score = 1
    s = torch.zeros(4, requires_grad=True)
    m = bp.binarize(s, 0.6)
    assert m.tolist() == [0, 0, 0, 0]
    (m * torch.arange(4.0)).sum().backward()
    assert s.grad.tolist() == [0, 1, 2, 3]


def test_topk_keeps_exactly_k():
    scores = torch.randn(12, 12)
    for threshold in (0.0, 0.25, 0.9):
        m = bp.binarize(scores, threshold, "topk")
        k = math.ceil((1 - threshold) * 144)
        assert int(m.sum()) == k
        assert m[scores >= scores.flatten().topk(k).values[-1]].all()


@pytest.mark.parametrize("block, shape", [("32x32", (2, 2)), ("1x1", (64, 64)), ("row", (64, 1)),
                                          ("col", (1, 64)), ("head", (4, 1))])
def test_block_shapes_give_one_score_per_block(block, shape):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block=block))
    assert masked.scores["layer0_query"].shape == shape
    assert masked.scores["layer0_attn_out"].shape == ((1, 4) if block == "head" else shape)
    assert masked.scores["layer0_ffn"].shape == (48,)


def test_block_that_does_not_divide_the_matrix_is_refused():
    with pytest.raises(ValueError, match="--block 24x24: blocks of 24x24 do not divide the query matrix 64x64"):
        bp.MaskedBert(tiny(), bp.PruneConfig(block="24x24"))


def test_schedule_warmup_ramp_and_cooldown():
    c = bp.PruneConfig(final_threshold=0.1, final_lambda=20, warmup_steps=10, ramp_steps=100)
    assert bp.threshold_schedule(0, c) == 0 and bp.threshold_schedule(10, c) == 0
    assert bp.threshold_schedule(60, c) == pytest.approx(0.1 * (1 - 0.5 ** 3))
    assert bp.threshold_schedule(110, c) == pytest.approx(0.1)
    assert bp.threshold_schedule(500, c) == pytest.approx(0.1)
    assert bp.lambda_schedule(60, c) == pytest.approx(20 * (1 - 0.5 ** 3))
    assert bp.lambda_schedule(0, c) == 0 and bp.lambda_schedule(110, c) == pytest.approx(20)
    c = replace(c, target_density=0.3)
    final = bp.keep_fraction(c, tiny().config)
    assert final == 0.3 and bp.density_schedule(10, c, final) == 1
    assert bp.density_schedule(110, c, final) == pytest.approx(0.3)
    assert bp.density_schedule(60, c, final) == pytest.approx(1 - 0.7 * (1 - 0.5 ** 3))
    c = replace(c, target_density=None, target_speedup=2.5)  # the kept FLOP fraction ramps from 1 to 1 / 2.5
    final = bp.keep_fraction(c, tiny().config)
    assert final == pytest.approx(0.4, rel=1e-12) and bp.density_schedule(10, c, final) == 1
    assert bp.density_schedule(110, c, final) == pytest.approx(0.4)
    assert bp.density_schedule(60, c, final) == pytest.approx(1 - 0.6 * (1 - 0.5 ** 3))
    with pytest.raises(ValueError, match="--target_density and --target_speedup exclude each other"):
        replace(c, target_density=0.3)


def test_regularizer_weights_attention_and_ffn():
    masked = bp.MaskedBert(tiny(layers=2), bp.PruneConfig(block="16x16"))
    with torch.no_grad():
        for name, s in masked.scores.items():
            s.fill_(0.0 if name.endswith("_ffn") else 100.0)  # sigmoid: 0.5 FFN, 1 attention
    assert bp.regularization(masked).item() == pytest.approx((1.0 * 1 + 0.25 * 0.5) / 2)


def test_distillation_loss_is_the_papers_mix_of_kl_and_ce_over_start_and_end():
    torch.manual_seed(0)
    s, e, ts_, te = (torch.randn(4, 10, dtype=torch.float64) for _ in range(4))  # four different logits
    sp, ep = torch.tensor([1, 2, 3, 0]), torch.tensor([5, 6, 7, 9])

    def kl(teacher, student, T=2.0):  # KL(teacher || student) at temperature T, by hand, averaged over the batch
        p, q = (teacher / T).softmax(-1), (student / T).softmax(-1)
        return (p * (p / q).log()).sum(-1).mean()

    def ce(logits, pos):
        return -logits.log_softmax(-1)[torch.arange(4), pos].mean()
    want = 0.9 * (kl(ts_, s) + kl(te, e)) / 2 * 2.0 ** 2 + 0.1 * (ce(s, sp) + ce(e, ep)) / 2
    assert float(bp.distillation_loss(s, e, ts_, te, sp, ep, 2.0, 0.9, 0.1)) == pytest.approx(float(want), rel=1e-12)
    assert float(bp.distillation_loss(s, e, s, e, sp, ep, 2.0, 0.9, 0.1)) == pytest.approx(  # a teacher that agrees
        0.1 * float(ce(s, sp) + ce(e, ep)) / 2, abs=1e-12)


def test_param_groups_give_scores_their_own_lr_and_no_decay():
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="16x16"))
    groups = bp.param_groups(masked, 3e-5, 1e-2, weight_decay=0.01)
    assert [g["lr"] for g in groups] == [3e-5, 1e-2] and groups[1]["weight_decay"] == 0
    assert len(groups[1]["params"]) == len(masked.scores) == 3 * 5


def random_masks(masked):
    """Scores that leave a mix: live and dead heads (dead through Q, K, V or the output), layers with
    no attention and with no FFN, half-dead FFNs, and partly pruned blocks inside live heads."""
    with torch.no_grad():
        for s in masked.scores.values():
            s.copy_(torch.where(torch.rand(s.shape) < 0.3, -5.0, 5.0))
        masked.scores["layer0_query"][0].fill_(-5)  # head 0 has no query left
        masked.scores["layer0_key"][1].fill_(-5)  # head 1 has no key left
        masked.scores["layer0_value"][2].fill_(-5)  # head 2 has no value left
        masked.scores["layer0_attn_out"][:, 6:8].fill_(5)  # 16x8 blocks: head 3 owns score columns 6, 7
        for name in ("query", "key", "value"):
            masked.scores[f"layer0_{name}"][3].fill_(5)  # head 3 lives
        masked.scores["layer1_value"].fill_(-5)  # layer 1: no attention at all
        masked.scores["layer2_ffn"].fill_(-5)  # layer 2: no FFN at all
        masked.scores["layer1_ffn"][:20].fill_(-5)
    masked.threshold = masked.config.final_threshold


@pytest.mark.parametrize("gate", ["eval", "always"])
def test_dead_heads_are_gated_in_training_only_when_always_and_in_evaluation_either_way(gate):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="16x8", gate_dead_heads=gate))
    random_masks(masked)  # layer 0: head 0 has no query left, head 1 no key
    for training in (True, False):
        v = masked.train(training).masks()["layers.0.value.weight"]
        gated = gate == "always" or not training
        assert (v[:32] == 0).all() == gated  # heads 0, 1: V rows 0 .. 31 (head size 16)
        assert (v[48:64] != 0).any()  # head 3 lives either way


def test_topk_keeps_its_share_of_each_matrix_not_of_the_stack_of_layers():
    masked = bp.MaskedBert(tiny(layers=3), bp.PruneConfig(block="16x16", pruning_method="topk"))
    with torch.no_grad():
        for i in range(3):  # layer 2's scores all above layer 0's: a top-k over the stack would empty layer 0
            masked.scores[f"layer{i}_query"].copy_(torch.randn(4, 4) + 10 * i)
    m = masked.masks(threshold=0.75)
    for i in range(3):
        blocks = m[f"layers.{i}.query.weight"][::16, ::16]  # one entry per 16x16 block
        assert int(blocks.sum()) == math.ceil(0.25 * 16)
        assert torch.equal(blocks.bool(), masked.scores[f"layer{i}_query"] >= masked.scores[f"layer{i}_query"]
                           .flatten().topk(4).values[-1])


def test_compacted_model_gives_the_masked_models_logits():
    model = tiny()
    masked = bp.MaskedBert(model, bp.PruneConfig(block="16x8")).eval()  # 16x8 blocks, head size 16
    random_masks(masked)
    small, unpadded = bp.compact(masked).eval(), bp.compact(masked, multiple=1).eval()
    assert small.config.num_attention_heads[:2] == [1, 0] and small.config.intermediate_size[2] == 0
    assert small.config.intermediate_size[1] <= 32 and all(f % 8 == 0 for f in small.config.intermediate_size)
    with torch.no_grad():
        want, got, got_unpadded = masked(*inputs()), small(*inputs()), unpadded(*inputs())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_unpadded, want, atol=1e-5, rtol=0)
    s = masked.structure()
    assert s["heads"] == small.config.num_attention_heads and s["ffn"] == unpadded.config.intermediate_size
    assert small.config.intermediate_size == [-(-f // 8) * 8 for f in s["ffn"]] != s["ffn"]  # some padding
    r = bp.report(small, model.config)  # the padding counted apart: the report is the unpadded model's
    assert [x["ffn"] for x in r["layers"]] == s["ffn"] and r["linear_params"] == bp.linear_params(unpadded.config)
    assert r["linear_params"] + r["padding_params"] == bp.linear_params(small.config)
    assert s["compact_density"] == pytest.approx(bp.linear_params(unpadded.config) / bp.linear_params(model.config))


def test_report_counts_what_the_weights_hold(tmp_path):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="16x16"))
    random_masks(masked)
    small = bp.compact(masked)
    r = bp.report(small, tiny().config, seq_len=32)
    held = sum(getattr(l, n).weight.numel() for l in small.layers for n in bp.ATTENTION + ("ffn_in", "ffn_out"))
    pad = sum(x["ffn_padding"] for x in r["layers"])
    assert pad > 0 and r["padding_params"] == 2 * 64 * pad and "padded to multiples of 8" in bp.format_report(r)
    assert r["linear_params"] == held - r["padding_params"]
    assert r["linear_params_dense"] == 3 * (4 * 64 * 64 + 2 * 48 * 64)
    assert r["heads"] == sum(small.config.num_attention_heads) and r["total_params"] == small.num_parameters()
    assert r["flops"] + r["flops_padding"] == bp.encoder_flops(small.config, 32)
    assert r["flops_dense"] == bp.encoder_flops(tiny().config, 32)
    assert r["predicted_speedup"] == r["predicted_speedup_flops"] == r["flops_dense"] / r["flops"] > 1
    assert r["cost_model"] == "flops" and "linear params" in bp.format_report(r)
    assert "predicted speed-up" in bp.format_report(r) and "measured cost model" not in bp.format_report(r)
    table = synthetic_table(tiny().config)
    m = bp.report(small, tiny().config, seq_len=32, cost=table)  # measured: the model as it runs, padding included
    assert m["cost_model"] == "measured" and m["predicted_speedup_flops"] == r["predicted_speedup"]
    assert m["predicted_speedup"] == bp.model_cost(tiny().config, table) / bp.model_cost(small.config, table)
    assert "(measured cost model)" in bp.format_report(m)
    if bp.plot_report(r, tmp_path / "structure.png", speedup=1.5):
        assert (tmp_path / "structure.png").read_bytes()[:4] == b"\x89PNG"


def test_fill_replaces_only_zeros_with_small_noise():
    model = tiny()
    w = model.layers[0].query.weight
    with torch.no_grad():
        w[:8].zero_()
    before = w.clone()
    bp.fill(model, noise=0.01, generator=torch.Generator().manual_seed(0))
    assert torch.equal(w[8:], before[8:])
    assert (w[:8] != 0).all() and w[:8].abs().max() < 0.01 * before.std() * 6


@pytest.mark.parametrize("block", ["16x8", "head", "row"])
def test_threshold_for_density_keeps_the_nearest_density_there_is(block):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block=block))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
    # oracle: the compact density of the masks themselves at every candidate threshold
    candidates = sorted(set(bp.death_thresholds(masked)[0].tolist()) | {0.0})
    densities = [masked.structure(t)["compact_density"] for t in candidates]
    for d in (1.0, 0.7, 0.4, 0.1, 0.001):
        got = masked.structure(bp.threshold_for_density(masked, d))["compact_density"]
        assert abs(got - d) == pytest.approx(min(abs(x - d) for x in densities), abs=1e-12)


def test_encoder_flops_of_bert_base_and_d26_are_methods_figures():
    # docs/paper.md: 19.5 GFLOP per sequence at length 384 against 70.7 for BERT-base, a ratio of 3.62x
    base = BertConfig()
    d26 = replace(base, num_attention_heads=[4, 4, 6, 7, 7, 5, 6, 7, 5, 5, 5, 3], attention_head_size=64,
                  intermediate_size=[552, 717, 795, 789, 833, 792, 620, 466, 283, 112, 96, 238])
    assert bp.encoder_flops(base, 384) / 1e9 == pytest.approx(70.7, abs=0.05)
    assert bp.encoder_flops(d26, 384) / 1e9 == pytest.approx(19.5, abs=0.05)
    assert bp.encoder_flops(base, 384) / bp.encoder_flops(d26, 384) == pytest.approx(3.62, abs=0.005)


@pytest.mark.parametrize("block", ["16x8", "head"])  # blocks within a head: no two heads die together
def test_target_speedup_keeps_the_flops_of_the_speedup_within_half_a_head(block):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block=block))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
    c, T = masked.model.config, 128
    dense, head = bp.encoder_flops(c, T), bp.head_and_unit_flops(c, T)[0]
    for speedup in (1.0, 1.3, 1.8, 3.6, 10.0):
        masked.config = bp.PruneConfig(block=block, target_speedup=speedup, seq_len=T)
        s = masked.structure(bp.schedule(1, masked)[0])  # the end of a one-step ramp: the target itself
        flops = bp.encoder_flops(replace(c, num_attention_heads=s["heads"], intermediate_size=s["ffn"]), T)
        assert abs(flops - dense / speedup) <= head / 2, (speedup, s)


# ---- the cost models of --target_speedup: FLOPs counted, or seconds measured ------------------------------------

def synthetic_table(config, head=2e-3, unit=1e-4, fixed=0.05):
    """A measured cost table of known costs, as measure_costs returns it."""
    return {"cost_model": "measured", "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
            "attention_head_size": config.attention_head_size, "head": head, "unit": unit, "fixed": fixed}


def test_the_flop_cost_model_is_the_flop_count():
    c = tiny().config
    small = replace(c, num_attention_heads=[1, 2, 0], intermediate_size=[8, 16, 40])
    flops = bp.flop_costs(c, 128)
    assert flops["fixed"] == 0 and (flops["head"], flops["unit"]) == bp.head_and_unit_flops(c, 128)
    assert bp.model_cost(small, flops) == bp.encoder_flops(small, 128)
    assert bp.predicted_speedup(small, c, flops) == bp.encoder_flops(c, 128) / bp.encoder_flops(small, 128)
    assert bp.speed_cost(bp.PruneConfig(target_speedup=2, seq_len=128), c) == flops  # no table: FLOPs


def test_fit_recovers_known_costs_from_synthetic_timings():
    base, attention, ffn, head, unit, outside = 0.2, 0.1, 0.08, 0.12, 0.0011, 0.3
    grid = [(0, 0), (3, 0), (6, 0), (12, 0), (0, 384), (0, 768), (0, 1536), (12, 1536)]
    seconds = {(h, n): base + attention * (h > 0) + ffn * (n > 0) + head * h + unit * n for h, n in grid}
    fit = bp.fit_costs({**seconds, "outside": outside}, layers=6)
    assert fit["head"] == pytest.approx(head) and fit["unit"] == pytest.approx(unit)
    assert fit["layer"] == pytest.approx(base + attention + ffn)
    assert fit["fixed"] == pytest.approx(outside + 6 * (base + attention + ffn))
    assert [tuple(g[:2]) for g in fit["grid"]] == grid
    faster = {(h, n): t - 0.2 * h for (h, n), t in seconds.items()}  # with more heads: not a measurement to prune by
    with pytest.raises(ValueError, match="does not grow with its heads and units"):
        bp.fit_costs({**faster, "outside": outside}, layers=6)


def test_a_fit_whose_layers_cost_less_than_nothing_is_refused_as_noise():
    # measure_costs' grid for MiniLM (12 heads, 1,536 units), timings of known costs, then the dense layer timed slow
    # (as in docs/speed.md's d25 miss): the fit's slopes go up, its constants below zero, the fixed cost below the
    # embeddings' alone
    grid = [(0, 0), (1, 0), (3, 0), (6, 0), (12, 0), (0, 192), (0, 384), (0, 768), (0, 1536), (1, 192), (3, 384),
            (6, 768), (12, 1536)]
    seconds = {(h, n): 0.1 + 0.06 * h + 5e-4 * n for h, n in grid}
    assert bp.fit_costs({**seconds, "outside": 0.12}, layers=6)["layer"] == pytest.approx(0.1)
    seconds[12, 1536] += 0.9
    with pytest.raises(ValueError, match=r"^cost model: a layer's fixed cost came out negative \(-0.0\d+ s\): time"):
        bp.fit_costs({**seconds, "outside": 0.12}, layers=6)


def test_measured_costs_time_the_grid_and_make_a_table_that_fits_the_model(monkeypatch):
    timed, fit = {}, bp.fit_costs

    def known_costs(seconds, layers):  # what the clock said, then costs known: a test of timings would be flaky
        timed.update(seconds)
        return fit({k: 1 if k == "outside" else 0.1 + 0.01 * k[0] + 0.001 * k[1] for k in seconds}, layers)
    monkeypatch.setattr(bp, "fit_costs", known_costs)
    ran = []

    class Recorded(bp.Layer):  # which layer each timing ran: (heads, FFN units)
        def forward(self, x, attend):
            ran.append((self.heads, self.ffn_in.out_features))
            return super().forward(x, attend)
    monkeypatch.setattr(bp, "Layer", Recorded)
    c = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100)
    table = bp.measure_costs(c, torch.device("cpu"), torch.float32, batch=4, seq_len=16)
    assert list(timed) == ["outside", (0, 0), (1, 0), (2, 0), (4, 0), (0, 16), (0, 32), (0, 56), (0, 104),
                           (1, 32), (2, 56), (4, 104)]  # (heads, units): both parts where pruned layers are
    grid = list(timed)[1:]  # each key timed a layer of its own shape: rounds 0 .. rounds, every other one reversed
    assert ran == [k for r in range(table["rounds"] + 1) for k in (grid if r % 2 else grid[::-1])]
    assert all(0 < t < 10 for t in timed.values())  # FFN widths multiples of 8 as compact leaves them, and the dense
    assert bp.check_cost_table(table, c) is table and table["fixed"] == pytest.approx(1 + 2 * 0.1)
    assert (table["batch"], table["seq_len"], table["dtype"], table["head"]) == (4, 16, "float32", pytest.approx(0.01))
    with pytest.raises(ValueError, match="measured for a model of hidden_size 64, this model has 32"):
        bp.check_cost_table(table, replace(c, hidden_size=32))
    with pytest.raises(ValueError, match="not a cost table: expected a JSON object with the finite numbers hidden_size"):
        bp.check_cost_table({"head": 1}, c)


def test_timings_refused_as_noise_get_more_rounds_then_the_refusal(monkeypatch):
    c = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=100)
    fits, noisy = [], [2]

    def fit(seconds, layers):  # refuses the first noisy[0] fits, as fit_costs refuses noise
        fits.append(dict(seconds))
        if len(fits) <= noisy[0]:
            raise ValueError("cost model: noise")
        return {"head": 1, "unit": 1, "fixed": 1}
    monkeypatch.setattr(bp, "fit_costs", fit)
    table = bp.measure_costs(c, torch.device("cpu"), torch.float32, batch=2, seq_len=8, reps=2)
    assert table["rounds"] == 4 and len(fits) == 3  # fitted after rounds 2, 3 and 4 (the warm-up round 0)
    assert all(fits[2][k] <= fits[1][k] <= fits[0][k] for k in fits[0])  # the fastest of more rounds
    fits.clear()
    noisy[0] = 99
    with pytest.raises(ValueError, match="^cost model: noise$"):
        bp.measure_costs(c, torch.device("cpu"), torch.float32, batch=2, seq_len=8, reps=2)
    assert len(fits) == 5  # rounds 2 .. 6: at most 3 x reps


@pytest.mark.parametrize("speedup", [1.0, 1.5, 2.5, 4.0])
def test_a_measured_table_picks_the_structure_that_meets_the_target_under_it(speedup):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="head"))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
    c = masked.model.config
    table = synthetic_table(c, head=4e-3, unit=1e-4, fixed=0.01)  # heads dearer than their FLOPs say
    masked.config = bp.PruneConfig(block="head", target_speedup=speedup, cost=table)
    s = masked.structure(bp.schedule(1, masked)[0])  # the end of a one-step ramp: the target itself
    kept = bp.model_cost(replace(c, num_attention_heads=s["heads"], intermediate_size=s["ffn"]), table)
    assert abs(kept - bp.model_cost(c, table) / speedup) <= table["head"] / 2, s
    flops = replace(masked.config, cost=None)  # the FLOP model at the same target keeps another structure
    assert speedup == 1 or masked.structure(bp.threshold_for_density(
        masked, bp.keep_fraction(flops, c), bp.speed_cost(flops, c)))["heads"] != s["heads"]


def test_a_speedup_beyond_the_fixed_costs_is_refused_with_the_largest_there_is():
    c = tiny().config
    table = synthetic_table(c)
    largest = bp.model_cost(c, table) / table["fixed"]  # 0.05 s fixed of 0.05 + 12 x 2e-3 + 144 x 1e-4 s
    assert bp.keep_fraction(bp.PruneConfig(target_speedup=largest, cost=table), c) == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match=rf"^--target_speedup 2: .* takes 56.6 % of the dense model's measured time: "
                                         rf"the largest reachable speed-up is {largest:.2f}x$"):
        bp.MaskedBert(tiny(), bp.PruneConfig(target_speedup=2, cost=table))
