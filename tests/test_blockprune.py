import math
from dataclasses import replace


import pytest
import torch

import blockprune as bp
import report
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
    assert bp.density_schedule(10, c) == 1 and bp.density_schedule(110, c) == pytest.approx(0.3)
    assert bp.density_schedule(60, c) == pytest.approx(1 - 0.7 * (1 - 0.5 ** 3))


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
    got = bp.distillation_loss((s, e), (ts_, te), (sp, ep), 2.0, 0.9, 0.1)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    assert float(bp.distillation_loss((s, e), (s, e), (sp, ep), 2.0, 0.9, 0.1)) == pytest.approx(  # a teacher that
        0.1 * float(ce(s, sp) + ce(e, ep)) / 2, abs=1e-12)  # agrees
    # one output (a classifier's logits over its classes): the same terms, not averaged with anything
    want = 0.9 * kl(ts_, s) * 2.0 ** 2 + 0.1 * ce(s, sp)
    assert float(bp.distillation_loss(s, ts_, sp, 2.0, 0.9, 0.1)) == pytest.approx(float(want), rel=1e-12)


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
        v = masked.train(training).masks()["bert.layers.0.value.weight"]
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
        blocks = m[f"bert.layers.{i}.query.weight"][::16, ::16]  # one entry per 16x16 block
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
    s = report.structure(masked)
    assert s["heads"] == small.config.num_attention_heads and s["ffn"] == unpadded.config.intermediate_size
    assert small.config.intermediate_size == [-(-f // 8) * 8 for f in s["ffn"]] != s["ffn"]  # some padding
    r = report.compact_report(small, model.config)  # the padding counted apart: the report is the unpadded model's
    assert [x["ffn"] for x in r["layers"]] == s["ffn"] and r["linear_params"] == bp.linear_params(unpadded.config)
    assert r["linear_params"] + r["padding_params"] == bp.linear_params(small.config)
    assert s["compact_density"] == pytest.approx(bp.linear_params(unpadded.config) / bp.linear_params(model.config))


def test_fill_replaces_only_zeros_with_small_noise():
    model = tiny()
    w = model.bert.layers[0].query.weight
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
    densities = [report.structure(masked, t)["compact_density"] for t in candidates]
    for d in (1.0, 0.7, 0.4, 0.1, 0.001):
        got = report.structure(masked, bp.threshold_for_density(masked, d))["compact_density"]
        assert abs(got - d) == pytest.approx(min(abs(x - d) for x in densities), abs=1e-12)


@pytest.mark.parametrize("method, gate", [("sigmoid", "eval"), ("sigmoid", "always"), ("topk", "eval")])
def test_masks_by_group_are_the_masks_layer_by_layer(method, gate):
    # the products the model runs on (score_groups: here layers 0 and 2 stacked, layer 1 alone) are each weight
    # times its layer-by-layer mask, to the bit, dead heads gated or not
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=3, num_attention_heads=[4, 2, 4],
                        intermediate_size=[48, 24, 48], attention_head_size=16, max_position_embeddings=32)
    masked = bp.MaskedBert(BertForQuestionAnswering(config), bp.PruneConfig(
        block="16x8", pruning_method=method, gate_dead_heads=gate))
    with torch.no_grad():
        for s in masked.scores.values():
            s.normal_(0, 2)
        masked.scores["layer0_query"][0] = -5  # head 0 of layer 0 has no query left
    masked.threshold = 0.5
    assert [g for g, _ in bp.score_groups(masked)] == [[0, 2], [1]]
    for training in (True, False):
        masked.train(training)
        want = {k: masked.model.get_parameter(k) * m for k, m in masked.masks().items()}
        got = bp.masked_weights(masked)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert (want["bert.layers.0.value.weight"][:16] == 0).all()  # gated in evaluation
