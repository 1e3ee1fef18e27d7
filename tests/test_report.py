"""report.py: the structure pruning left, the report of a compacted model, and the pictures (never skipped in
silence)."""
import builtins

import pytest
import torch

import blockprune as bp
import cost_model as cm
import report
import train_squad as ts
from bert import BertConfig, BertForQuestionAnswering
from test_blockprune import random_masks, tiny
from test_cost_model import synthetic_table


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
    s = report.head_pruning_stats(masked)
    assert s["alive"] == [[False, True, True, True], [True, True, True, False]]
    assert s["ffn"] == [40, 48]
    assert [sum(a) for a in s["alive"]] == report.structure(masked)["heads"]
    assert [sum(a) for a in s["alive"]] == bp.compact(masked).config.num_attention_heads
    assert (s["heads_removed"], s["heads_total"]) == (2, 8)
    head, block = 4 * 16 * 64, 16 * 16  # a head's weights in Q, K, V and the output; one block
    assert s["attention_pruned_in_removed_heads"] == 2 * head
    assert s["attention_pruned"] == 2 * head + 3 * block
    assert s["fraction_in_removed_heads"] == pytest.approx(32 / 35)


def test_plot_masks_draws_a_png():
    pytest.importorskip("matplotlib")
    assert report.plot_masks(pruned_by_hand())[:4] == b"\x89PNG"


def test_plot_masks_is_skipped_without_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert report.plot_masks(pruned_by_hand()) is None


def test_compaction_without_matplotlib_says_which_pictures_were_not_drawn(tmp_path, monkeypatch, capsys):
    model, vocab, _ = ts.load_checkpoint("tiny")
    ts.save_checkpoint(bp.MaskedBert(model, bp.PruneConfig(block="8x8")), tmp_path / "pruned", vocab, True)
    monkeypatch.setattr(report, "pyplot", lambda: None)  # as without matplotlib
    ts.main(["--preset", "small", "--stage", "compact", "--model_name_or_path", str(tmp_path / "pruned"),
             "--output_dir", str(tmp_path / "compact")])
    said = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert said == [f"compact: matplotlib is not installed, so {tmp_path / 'compact/structure.png'} and heads.png "
                    "were not drawn (pip install matplotlib, then run the same command again with --resume for "
                    "--stage all, --overwrite_output_dir for --stage compact)"]
    assert (tmp_path / "compact/report.json").exists() and not (tmp_path / "compact/heads.png").exists()


def test_report_counts_what_the_weights_hold(tmp_path):
    masked = bp.MaskedBert(tiny(), bp.PruneConfig(block="16x16"))
    random_masks(masked)
    small = bp.compact(masked)
    r = report.compact_report(small, tiny().config, seq_len=32)
    held = sum(getattr(l, n).weight.numel() for l in small.bert.layers for n in bp.ATTENTION + ("ffn_in", "ffn_out"))
    pad = sum(x["ffn_padding"] for x in r["layers"])
    assert pad > 0 and r["padding_params"] == 2 * 64 * pad and "padded to multiples of 8" in report.format_report(r)
    assert r["linear_params"] == held - r["padding_params"]
    assert r["linear_params_dense"] == 3 * (4 * 64 * 64 + 2 * 48 * 64)
    assert r["heads"] == sum(small.config.num_attention_heads)
    assert r["total_params"] == sum(p.numel() for p in small.parameters())
    assert r["flops"] + r["flops_padding"] == cm.encoder_flops(small.config, 32)
    assert r["flops_dense"] == cm.encoder_flops(tiny().config, 32)
    assert r["predicted_speedup"] == r["predicted_speedup_flops"] == r["flops_dense"] / r["flops"] > 1
    assert r["cost_model"] == "flops" and "linear params" in report.format_report(r)
    assert "predicted speed-up" in report.format_report(r) and "measured cost model" not in report.format_report(r)
    table = synthetic_table(tiny().config)
    m = report.compact_report(small, tiny().config, seq_len=32, cost=table)  # measured: the model as it runs, padding
    assert m["cost_model"] == "measured" and m["predicted_speedup_flops"] == r["predicted_speedup"]
    assert m["predicted_speedup"] == cm.model_cost(tiny().config, table) / cm.model_cost(small.config, table)
    assert "(measured cost model)" in report.format_report(m)
    picture = report.plot_report(r, speedup=1.5)
    assert picture is None or picture[:4] == b"\x89PNG"
