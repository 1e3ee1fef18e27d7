import builtins

import pytest
import torch

import blockprune as bp
from bert import BertConfig, BertForQuestionAnswering


def pruned_by_hand():
    """2 layers of 4 heads of 16 (hidden 64), blocks of 16x16: a block row of Q, K, V or a block column of
    the output is one head. Scores +10 keep a block at threshold 0.5, -10 prune it."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32)
    masked = bp.MaskedBert(BertForQuestionAnswering(config), bp.PruneConfig(block="16x16", final_threshold=0.5))
    with torch.no_grad():
        for s in masked.scores.values():
            s.fill_(10.0)
        s = masked.scores
        s["layer0_query"][0] = -10  # head 0 of layer 0 loses its Q: gated dead, its V masked too
        s["layer0_key"][1, 2] = -10  # head 1 of layer 0 survives without 1 K block
        s["layer0_attn_out"][:2, 1] = -10  # ... and 2 output blocks pruned
        s["layer1_attn_out"][:, 3] = -10  # head 3 of layer 1 loses its output columns: removed whole
        s["layer0_ffn"][:8] = -10
    return masked


def test_head_pruning_stats_count_removed_heads_whole_and_the_zeros_left_in_survivors():
    masked = pruned_by_hand()
    s = bp.head_pruning_stats(masked)
    assert s["alive"] == [[False, True, True, True], [True, True, True, False]]
    assert s["ffn"] == [40, 48]
    assert [sum(a) for a in s["alive"]] == masked.structure()["heads"] == bp.compact(masked).config.num_attention_heads
    assert (s["heads_removed"], s["heads_total"]) == (2, 8)
    head, block = 4 * 16 * 64, 16 * 16  # a head's weights in Q, K, V and the output; one block
    assert s["attention_pruned_in_removed_heads"] == 2 * head
    assert s["attention_pruned"] == 2 * head + 3 * block
    assert s["fraction_in_removed_heads"] == pytest.approx(32 / 35)


def test_plot_masks_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    assert bp.plot_masks(pruned_by_hand(), tmp_path / "heads.png")
    assert (tmp_path / "heads.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_masks_is_skipped_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert bp.plot_masks(pruned_by_hand(), tmp_path / "heads.png") is False
    assert not (tmp_path / "heads.png").exists()
