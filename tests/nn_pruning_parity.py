"""
Our block movement pruning against the paper's reference implementation, huggingface/nn_pruning, step by
step. The same tiny BERT (random weights, dropout off, a random teacher) is pruned both ways with the paper's
hybrid settings: one score per block of Q, K, V and the attention output, one per FFN unit shared by its
FFN-in row and FFN-out column, sigmoid threshold with a straight-through gradient, masked biases, the L1
regulariser weighted 1 (attention) and 0.25 (FFN), the cubic threshold schedule with lambda following it,
distillation at T = 2, AdamW with the lr warmed up then decayed (transformers' schedule on both sides). Each
step compares threshold, lambda, regulariser and loss; at the end every score, weight and mask. Exit status 1
when they differ.

    python tests/nn_pruning_parity.py

It needs nn_pruning 0.1.2 and the transformers 4.x it was written for, in an environment of its own
(docs/parity.md gives the commands). Neither is a dependency of this project.
Two settings of the reference are set to ours, because they are known differences, not bugs:
linear_min_parameters = 0 (the reference always keeps 0.5 % of each matrix's blocks; we can prune a matrix to
nothing) and no dead-head gate on our side (--gate_dead_heads eval: the reference never gates in training).
"""
import sys
from pathlib import Path

import torch
import transformers
from nn_pruning.patch_coordinator import ModelPatchingCoordinator, SparseTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import blockprune as bp  # noqa: E402
import report  # noqa: E402
from bert import BertConfig, BertForQuestionAnswering, hf_state_dict, to_hf_name  # noqa: E402

STEPS, WARMUP, BLOCK = 16, 2, 8  # warm-up: 1 x WARMUP steps at threshold 0, the ramp, then 2 x WARMUP at the final
LR, SCORES_LR, THRESHOLD, LAMBDA = 1e-3, 5e-2, 0.44, 0.2


def tiny(seed):
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BertForQuestionAnswering(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() < 2 else p.normal_(0, 0.1)
    return model


def twin(model):
    """transformers' BertForQuestionAnswering (4.x: eager attention) holding the model's weights."""
    c = model.config
    hf = transformers.BertForQuestionAnswering(transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads[0], intermediate_size=c.intermediate_size[0],
        max_position_embeddings=c.max_position_embeddings, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    hf.load_state_dict(hf_state_dict(model))
    return hf.eval()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, 99, (8, 32), generator=g)
    mask = torch.ones(8, 32, dtype=torch.long)
    mask[3, 20:] = mask[5, 9:] = 0
    types = torch.zeros(8, 32, dtype=torch.long)
    types[:, 12:] = 1
    return ids, mask, types, torch.randint(0, 20, (8,), generator=g), torch.randint(0, 20, (8,), generator=g)


def reference(min_parameters=0.0):
    args = SparseTrainingArguments(
        attention_pruning_method="sigmoied_threshold", dense_pruning_method="sigmoied_threshold:1d_alt",
        attention_output_with_dense=False, attention_block_rows=BLOCK, attention_block_cols=BLOCK,
        initial_threshold=0.0, final_threshold=THRESHOLD, initial_warmup=1, final_warmup=2, regularization="l1",
        regularization_final_lambda=LAMBDA, attention_lambda=1.0, dense_lambda=0.25,
        mask_scores_learning_rate=SCORES_LR, distil_alpha_ce=0.1, distil_alpha_teacher=0.9, distil_temperature=2.0,
        linear_min_parameters=min_parameters)
    coordinator = ModelPatchingCoordinator(args, "cpu", None, ["start_logits", "end_logits"], None)
    coordinator.teacher = twin(tiny(1))
    model = twin(tiny(0))
    coordinator.patch_model(model)
    train_args = type("TrainingArguments", (), {"learning_rate": LR, "weight_decay": 0.0})
    opt = torch.optim.AdamW(coordinator.create_optimizer_groups(model, train_args, args), lr=LR, eps=1e-8,
                            weight_decay=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, WARMUP, STEPS)  # the reference's trainer's
    log = []
    for step in range(STEPS):
        coordinator.schedule_threshold(step, STEPS, WARMUP, training=True)
        ids, mask, types, s_pos, e_pos = batch(step)
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, start_positions=s_pos,
                    end_positions=e_pos)
        loss, _ = coordinator.distil_loss_combine(out.loss, {"input_ids": ids, "attention_mask": mask,
                                                             "token_type_ids": types}, out)
        regu, lam, _ = coordinator.regularization_loss(model)
        loss = loss + regu * lam
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        ctx = coordinator.patcher_context
        log.append((ctx.get_context_data("threshold"), lam, float(regu.detach()), loss.item()))
    return model, log


def ours():
    config = bp.PruneConfig(block=f"{BLOCK}x{BLOCK}", final_threshold=THRESHOLD, final_lambda=LAMBDA,
                            warmup_steps=WARMUP, ramp_steps=STEPS - 3 * WARMUP, gate_dead_heads="eval")
    net = bp.MaskedBert(tiny(0), config).train()
    teacher = tiny(1).eval()
    opt = torch.optim.AdamW(bp.param_groups(net, LR, SCORES_LR), eps=1e-8)
    sched = transformers.get_linear_schedule_with_warmup(opt, WARMUP, STEPS)  # the reference's trainer's
    log = []
    for step in range(STEPS):
        net.threshold, lam = bp.schedule(step, net)
        ids, mask, types, s_pos, e_pos = batch(step)
        start, end = net(ids, mask, types)
        with torch.no_grad():
            t_start, t_end = teacher(ids, mask, types)
        loss = bp.distillation_loss((start, end), (t_start, t_end), (s_pos, e_pos), 2.0, 0.9, 0.1)
        regu = bp.regularization(net)
        loss = loss + lam * regu
        loss.backward()
        opt.step(), sched.step(), opt.zero_grad()
        log.append((net.threshold, lam, regu.item(), loss.item()))
    return net, log


def their_scores(model, i, name):
    prefix = f"bert.encoder.layer.{i}."
    module = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
              "attn_out": "attention.output.dense", "ffn": "intermediate.dense"}[name]
    return model.get_submodule(prefix + module).mask_module.context_modules[0].mask_scores


def mask_difference(theirs, masks):
    """How many weights one side keeps and the other prunes."""
    differ = 0
    for i, layer in enumerate(theirs.bert.encoder.layer):
        for name, module in (("query", layer.attention.self.query), ("key", layer.attention.self.key),
                             ("value", layer.attention.self.value), ("attn_out", layer.attention.output.dense),
                             ("ffn_in", layer.intermediate.dense), ("ffn_out", layer.output.dense)):
            w, _ = module.get_masked_weights_bias()
            differ += int(((w != 0) != (masks[f"bert.layers.{i}.{name}.weight"].detach() != 0)).sum())
    return differ


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    theirs, their_log = reference()
    net, our_log = ours()
    worst = 0.0
    print("step | threshold ours / nn_pruning | lambda | regulariser | loss")
    for step, (a, b) in enumerate(zip(our_log, their_log)):
        print(f"{step:>4} | {a[0]:.4f} / {b[0]:.4f} | {a[1]:.3f} / {b[1]:.3f} | {a[2]:.6f} / {b[2]:.6f} | "
              f"{a[3]:.6f} / {b[3]:.6f}")
        worst = max(worst, *(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)))
    scores = max((net.scores[f"layer{i}_{n}"] - their_scores(theirs, i, n)).abs().max().item()
                 for i in range(2) for n in bp.ATTENTION + ("ffn",))
    # The QA head's bias and the last LayerNorm's bias add the same to every position's logit, and a softmax over
    # positions ignores that: their gradients are rounding noise, which Adam scales up to whole lr-sized steps.
    noise = ("qa_outputs.bias", f"bert.layers.{len(net.layers) - 1}.ffn_ln.bias")
    their_state = theirs.state_dict()
    weights = max((v - their_state[to_hf_name(k)]).abs().max().item()
                  for k, v in net.model.state_dict().items() if k not in noise)
    masks = net.masks(THRESHOLD)
    weights_masks = [m.detach() for k, m in masks.items() if k.endswith(".weight")]
    kept, total = sum(int(m.sum()) for m in weights_masks), sum(m.numel() for m in weights_masks)
    differ = mask_difference(theirs, masks)
    print(f"largest relative difference of threshold, lambda, regulariser, loss over {STEPS} steps: {worst:.2e}")
    print(f"largest difference of a score: {scores:.2e}; of a weight: {weights:.2e} (not counting "
          f"{', '.join(noise)})")
    empty = sum(int(m.sum()) == 0 for m in weights_masks)
    s = report.structure(net, THRESHOLD)
    print(f"masks at the final threshold: {differ} of {total} weights differ; {100 * kept / total:.1f} % of the "
          f"linear weights kept, heads alive per layer {s['heads']} of 4, FFN units {s['ffn']} of 128, {empty} of "
          f"{len(weights_masks)} matrices empty")
    # the one setting left at ours: with the reference's default (keep 0.5 % of every matrix), the same run
    differ_default = mask_difference(reference(0.005)[0], masks)
    print(f"with the reference's default linear_min_parameters 0.005 instead: {differ_default} weights differ")
    ok = worst < 1e-5 and scores < 1e-4 and weights < 1e-5 and differ == 0 and kept < total
    print("same" if ok else "DIFFERENT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
