"""
Block movement pruning on SQuAD v1.1: the paper's recipe. The method is blockprune.py, the model bert.py, the data
squad.py; a run's bookkeeping (its directory, resume, progress, torchrun, stop signals) is bookkeeping.py.

    python train_squad.py                   # the paper's recipe on bert-base-uncased (needs the network, a GPU)
    python train_squad.py --preset small    # the whole pipeline, offline, in about half a minute on 2 CPU cores

Top to bottom:
- train: the training loop shared by fine-tuning, pruning (with distillation) and filling; qa_loss.
- the stages: finetune, prune (with the teacher's logits cached), compact, fill, eval, and all (the paper's recipe
  end to end); prune_config, where the schedule is set in steps, and cost_table (--cost_model measured).
- predict / evaluate: logits for every window, then answers and the official EM/F1; load_checkpoint.
- the command line (presets, flags), then batches: what train() feeds the model.
"""
import argparse
import contextlib
import copy
import datetime
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import blockprune as bp
import cost_model as cm
import deploy
import files
import report
from bert import BertConfig, BertForQuestionAnswering
from bookkeeping import (RESUMABLE, Progress, TrainingState, all_stopping, barrier, check_finite, check_outputs, ddp,
                         eval_key, evaluated, get_rank, hms, once, stop_signals, sync, world_size, write_unit)
from files import DATA_DIR, atomic_write, load_cache, log, save_torch
from squad import cached_features, postprocess, squad_evaluate, tokenizer_files, vocab_difference

# ---- the training loop -----------------------------------------------------------------------------

def train(args, stage, model, features, total, lr, warmup_steps, out_dir, teacher=None, prune=None):
    """One training stage: fine-tuning (no teacher), distillation (the teacher's logits in `features`, or
    a teacher model) or pruning (and a PruneConfig, its schedule already in steps). Returns the model,
    or the MaskedBert when pruning. Resuming, torchrun and stop signals live in small helpers in
    bookkeeping.py."""
    accum = args.gradient_accumulation_steps
    net = bp.MaskedBert(model, prune) if prune else model
    net.to(args.device).train()
    groups = (bp.param_groups(net, lr, args.mask_scores_learning_rate, args.weight_decay) if prune else
              [{"params": list(net.parameters()), "lr": lr, "weight_decay": args.weight_decay}])
    opt = torch.optim.AdamW(groups, eps=1e-8)
    # linear warm-up (from lr/W: one step ahead of transformers', docs/design.md) then linear decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / max(1, warmup_steps),
                                                                 max(0.0, (total - s) / max(1, total - warmup_steps))))
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.precision == "fp16")
    progress = Progress(args, stage, total, net if prune else None, out_dir / "training_state.pt")
    state = TrainingState(out_dir / "training_state.pt", net, opt, sched, scaler, getattr(args, "settings", None))
    state.parts["progress"] = progress  # the heads that died or came back, counted across a --resume
    step = state.load(args.device, stage) if args.resume else 0
    forward = ddp(net)  # under torchrun: each process takes its share of a batch, gradients are averaged
    if teacher is not None:
        teacher.to(args.device).eval()
    with stop_signals(stage) as stop:
        while step < total:
            if prune:  # the threshold tau(t) and lambda(t) of this step (Sec. 3)
                net.threshold, lam = bp.schedule(step, net)
            for micro in range(accum):
                batch = get_batch(args, features, step, micro)
                with autocast(args):
                    start, end = forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                    loss = qa_loss(args, start, end, batch, teacher)
                    if prune and lam > 0:
                        loss = loss + lam * bp.regularization(net)
                progress.micro_step(step, loss)  # kept on the device: checked at logging steps and saves
                scaler.scale(loss / accum).backward()
            scaler.unscale_(opt)
            if args.max_grad_norm > 0:  # 0: no clipping, as in transformers
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if prune and step == total:  # the last line then describes the model that is saved
                bp.end_of_schedule(net, total)
            progress.step(step, loss, sched.get_last_lr()[0])
            if args.save_steps and step % args.save_steps == 0:
                check_finite(progress)
                state.save(step)
            if all_stopping(stop, args.device):  # SIGTERM or Ctrl-C: keep this step's state, then leave
                check_finite(progress)
                state.save(step)
                raise SystemExit(f"{stage}: stopped by {stop[0] if stop else 'a signal to another process'} after "
                                 f"step {step}; the state is in {state.path}: run the same command with --resume")
    check_finite(progress)
    if args.save_steps:
        state.save(step)
    if prune:  # evaluation and compaction use the threshold of the end of the schedule
        bp.end_of_schedule(net, total)
    return net.eval()


def qa_loss(args, start, end, batch, teacher=None):
    """Cross-entropy of the answer's start and end (fine-tuning), or, with a teacher, the distillation loss
    of Sec. 4 against the teacher's logits: cached in the batch (the teacher is frozen, so they never change),
    else computed here."""
    start_pos, end_pos = batch["start_positions"], batch["end_positions"]
    if "teacher_start" in batch:
        t_start, t_end = batch["teacher_start"], batch["teacher_end"]
    elif teacher is not None:
        with torch.no_grad():
            t_start, t_end = teacher(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    else:
        return (F.cross_entropy(start, start_pos) + F.cross_entropy(end, end_pos)) / 2
    return bp.distillation_loss((start, end), (t_start, t_end), (start_pos, end_pos), args.temperature,
                                args.alpha_distil, args.alpha_ce)


# ---- the stages ------------------------------------------------------------------------------------
# Each stage reads its inputs from checkpoint directories and writes its own, so that any stage can be
# run alone, and --resume can skip the stages a killed run had already finished (once).

def save_checkpoint(model, out, vocab, lowercase, records=None):
    """The model (pruned or not), its vocab and tokenizer_config.json, with the stage's records ({name: bytes or a
    dict}), into out as one unit (write_unit)."""
    write_unit(out, {**files.checkpoint_files(model, vocab), **(records or {}),
                     "tokenizer_config.json": json.dumps({"do_lower_case": lowercase}).encode()})


def finish(args, model, out, vocab, lowercase, dev, name, steps):
    """The end of a training stage: evaluate the model, save it with its metrics.json (which marks the stage as
    finished) and its predictions, then delete the training state the stage wrote (weights + AdamW: large). The
    first process only."""
    if get_rank():
        return None
    metrics, predictions = evaluate(args, model, *dev, name, steps)
    save_checkpoint(model, out, vocab, lowercase, {"metrics.json": metrics, "predictions.json": predictions})
    (out / "training_state.pt").unlink(missing_ok=True)
    return metrics


def features_for(args, vocab, lowercase, split):
    if split == "train":
        return cached_features(args.train_file, vocab, lowercase, args.max_seq_length, args.doc_stride, True,
                               max_questions=args.max_train_questions)
    return cached_features(args.dev_file, vocab, lowercase, args.max_seq_length, args.doc_stride, False)


def stage_finetune(args, model_path, out):
    model, vocab, lowercase = load_checkpoint(model_path, dense="--model_name_or_path")
    _, features = features_for(args, vocab, lowercase, "train")
    dev = features_for(args, vocab, lowercase, "dev")
    steps = total_steps(args, features, "finetune_epochs")
    model = train(args, "finetune", model, features, steps, args.learning_rate,
                  round(args.warmup_ratio * steps), out)
    return finish(args, model, out, vocab, lowercase, dev, "finetune", steps)


def load_teacher(teacher_path, vocab):
    if not teacher_path:  # '' (the small preset's) would read the current directory as a checkpoint
        raise ValueError("--teacher: give the fine-tuned checkpoint to distil from ('' fine-tunes one only with "
                         "--stage all)")
    teacher, t_vocab, _ = load_checkpoint(teacher_path)
    if difference := vocab_difference(t_vocab, vocab):
        raise ValueError(f"--teacher {teacher_path}: its vocab {t_vocab} differs from the student's {vocab} at line "
                         "{}: {} in the teacher's, {} in the student's".format(*difference))
    return teacher


def teacher_logits(args, teacher_path, vocab, features):
    """Distillation's targets. The teacher is frozen (eval mode, no dropout), so its start and end logits
    for a training window never change: they are computed once, over the full padded windows, at the run's
    precision, and kept beside the feature cache under a hash of the teacher's weights and the windows. A
    trimmed batch takes their first n positions: a token's logits do not depend on the padding after it.
    Adds them to `features` and returns None; with --no_teacher_cache returns the teacher, to run live."""
    teacher = load_teacher(teacher_path, vocab)
    if args.no_teacher_cache:
        return teacher
    windows = [features[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    # ("cast": predict runs a half-precision teacher cast, since logits made under autocast differ in the last bits)
    h = hashlib.sha256(repr((args.precision, "cast", type(teacher).__name__, windows[0].shape)).encode())
    for t in [*teacher.state_dict().values(), *windows]:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    path = DATA_DIR / "cache" / f"teacher-logits-{h.hexdigest()[:24]}.pt"
    fits = lambda logits: all(logits[k].shape == windows[0].shape for k in ("teacher_start", "teacher_end"))  # noqa
    if not get_rank() and load_cache(path, "teacher logits", fits) is None:
        log(f"teacher logits: running {teacher_path} over the {len(windows[0])} training windows once")
        start, end, seconds = predict(args, teacher, features, trim=False, name="teacher logits")
        save_torch(path, {"teacher_start": start, "teacher_end": end})
        log(f"teacher logits: {seconds:.0f} s in the model, kept in {path}")
    barrier()  # under torchrun: the first process has written them
    features.update(load_cache(path, "teacher logits", fits))
    return None


def stage_prune(args, model_path, teacher_path, out):
    model, vocab, lowercase = load_checkpoint(model_path, dense="--model_name_or_path")
    cost = cost_table(args, model.config, out)
    bp.MaskedBert(model, prune_config(args, model.config, table=cost))  # --block fits, the target is reachable
    _, features = features_for(args, vocab, lowercase, "train")
    teacher = teacher_logits(args, teacher_path, vocab, features)
    dev = features_for(args, vocab, lowercase, "dev")
    prune = prune_config(args, model.config, features, cost)
    steps = total_steps(args, features, "num_train_epochs")
    masked = train(args, "prune", model, features, steps, args.learning_rate, prune.warmup_steps, out,
                   teacher, prune)
    return finish(args, masked, out, vocab, lowercase, dev, "prune (masked)", steps)


def stage_compact(args, masked_path, out):
    masked, vocab, lowercase = load_checkpoint(masked_path)
    if not isinstance(masked, bp.MaskedBert):
        raise ValueError(f"--model_name_or_path {masked_path}: compaction needs a pruned checkpoint "
                         "(scores.safetensors)")
    small = bp.compact(masked)
    # the compacted model must answer as the masked one: check it on real dev windows
    _, dev = features_for(args, vocab, lowercase, "dev")
    few = {k: v[:8] for k, v in dev.items()}
    fp32 = argparse.Namespace(**{**vars(args), "precision": "fp32"})
    (a, b, _), (c, d, _) = predict(fp32, masked, few, trim=False), predict(fp32, small, few, trim=False)
    r = {**report.compact_report(small, masked.model.config, args.max_seq_length, masked.config.cost),
         "max_logit_difference_from_masked": max((a - c).abs().max().item(), (b - d).abs().max().item()),
         "head_pruning": report.head_pruning_stats(masked)}  # how much of the pruning removed whole heads
    pictures = {"structure.png": report.plot_report(r), "heads.png": report.plot_masks(masked)}
    if None in pictures.values():
        log(f"compact: matplotlib is not installed, so {out / 'structure.png'} and heads.png were not drawn "
            "(pip install matplotlib, then run the same command again with --resume for --stage all, "
            "--overwrite_output_dir for --stage compact)")
    save_checkpoint(small, out, vocab, lowercase, {"report.json": json.dumps(r, indent=2).encode(),
                                                   **{k: v for k, v in pictures.items() if v}})
    h, diff = r["head_pruning"], r["max_logit_difference_from_masked"]
    log(report.format_report(r) + f"\ncompacted vs masked logits: max difference {diff:.2e}"
        f"\n{h['heads_removed']}/{h['heads_total']} heads removed whole, holding "
        f"{100 * h['fraction_in_removed_heads']:.1f} % of the attention weights pruned")
    return r


def stage_fill(args, compact_path, teacher_path, out):
    model, vocab, lowercase = load_checkpoint(compact_path, dense="--model_name_or_path")
    _, features = features_for(args, vocab, lowercase, "train")
    teacher = teacher_logits(args, teacher_path, vocab, features)
    bp.fill(model, noise=0.01, generator=torch.Generator().manual_seed(args.seed))
    dev = features_for(args, vocab, lowercase, "dev")
    steps = total_steps(args, features, "fill_epochs")
    model = train(args, "fill", model, features, steps, args.learning_rate, 10, out, teacher)
    return finish(args, model, out, vocab, lowercase, dev, "fill", steps)


def stage_eval(args, model_path, out):
    model, vocab, lowercase = load_checkpoint(model_path)
    metrics, predictions = evaluate(args, model, *features_for(args, vocab, lowercase, "dev"), "eval")
    if not get_rank():
        write_unit(out, {"metrics.json": metrics, "predictions.json": predictions})
    return metrics


def stage_export(args, model_path, out):
    """(ours) A compacted or filled model as ONNX for onnxruntime (deploy.py): model.onnx, its batch and length
    dynamic, and model-int8.onnx, quantized (dynamic int8). Each is checked as compaction is, its logits against
    PyTorch's on dev windows, and evaluated as the stages evaluate: export.json. On the CPU, in fp32."""
    deploy.need("onnx", "onnxruntime")
    model, vocab, lowercase = load_checkpoint(model_path, dense="--model_name_or_path")
    examples, dev = features_for(args, vocab, lowercase, "dev")
    few = {k: v[:8] for k, v in dev.items()}  # padded: the graph holds the attention mask's path
    cpu = argparse.Namespace(**{**vars(args), "device": torch.device("cpu"), "precision": "fp32"})
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"model.onnx": Path(tmp) / "model.onnx", "model-int8.onnx": Path(tmp) / "model-int8.onnx"}
        deploy.export_onnx(model, graphs["model.onnx"], [few[k] for k in deploy.INPUTS])
        deploy.quantize_int8(graphs["model.onnx"], graphs["model-int8.onnx"])
        want, r = predict(cpu, model, few, trim=False)[:2], {}
        for name, path in graphs.items():
            runtime = deploy.OnnxQA(path)
            got = predict(cpu, runtime, few, trim=False)[:2]
            metrics, _ = evaluate(cpu, runtime, examples, dev, f"export {name}")
            r[name] = {"max_logit_difference": max((a - b).abs().max().item() for a, b in zip(got, want)),
                       **{k: metrics[k] for k in ("exact_match", "f1", "eval_seconds")}, "bytes": path.stat().st_size}
            log(f"export {name}: {r[name]['bytes'] / 2 ** 20:.1f} MiB, logits within "
                f"{r[name]['max_logit_difference']:.2e} of PyTorch's")
        write_unit(out, {**{k: p.read_bytes() for k, p in graphs.items()}, "vocab.txt": vocab.read_bytes(),
                         "export.json": json.dumps(r, indent=2).encode(),
                         "tokenizer_config.json": json.dumps({"do_lower_case": lowercase}).encode()})
    return r


def stage_all(args, out):
    """The paper's recipe (docs/paper.md) end to end: teacher (fine-tuned here unless --teacher is given), prune with
    distillation, compact, fill, evaluate; then the speed-up of the final model over the teacher. Another target
    from the same teacher: run again with --teacher OUT/teacher and another --output_dir."""
    model = load_checkpoint(args.model_name_or_path)[0]  # --block fits, a --cost_table too, before any training
    bp.MaskedBert(model, prune_config(args, model.config, table=cost_table(args, model.config)))
    teacher = args.teacher or str(out / "teacher")
    if not args.teacher:
        teacher_metrics = once(args, out / "teacher", stage_finetune, args.model_name_or_path)
    else:  # its own fine-tuning's metrics.json serves when made on this dev set with these settings
        teacher_metrics = evaluated(args, Path(teacher)) or once(args, out / "teacher", stage_eval, teacher)
    # the settings of the run (for docs/plot_study.py), then its figures
    results = {"args": {k: v if isinstance(v, (bool, int, float, str, list, type(None))) else str(v)
                        for k, v in vars(args).items()}, "teacher": teacher_metrics}
    results["pruned"] = once(args, out / "pruned", stage_prune, args.model_name_or_path, teacher)
    if not get_rank():
        results["structure"] = stage_compact(args, out / "pruned", out / "compact")
    barrier()
    results["filled"] = once(args, out / "filled", stage_fill, str(out / "compact"), teacher)
    if get_rank():
        return None
    dense, vocab, lowercase = load_checkpoint(teacher)
    _, dev = features_for(args, vocab, lowercase, "dev")
    if args.speed_windows:
        dev = {k: v[:args.speed_windows] for k, v in dev.items()}
    log(f"speed: the teacher and the final model take turns over {len(dev['input_ids'])} dev windows, 3 rounds")
    seconds = race(args, {"teacher": dense, "final": load_checkpoint(str(out / "filled"))[0]}, dev)
    results["speedup"] = seconds["teacher"] / seconds["final"]
    atomic_write(out / "results.json", json.dumps(results, indent=2).encode())
    s, r = results["filled"], results["structure"]
    if picture := report.plot_report(r, results["speedup"]):  # again, with the measured speed-up
        atomic_write(out / "compact" / "structure.png", picture)
    log(f"final ({out}): F1 {s['f1']:.2f} EM {s['exact_match']:.2f} (teacher F1 {results['teacher']['f1']:.2f}), "
        f"heads {r['heads']}/{r['heads_dense']}, linear params {100 * r['linear_density']:.1f} %, "
        f"speed-up {results['speedup']:.2f}x over the teacher ({r['predicted_speedup']:.2f}x predicted by the "
        f"{r['cost_model']} cost model, {r['predicted_speedup_flops']:.2f}x by FLOPs) "
        f"on {len(dev['input_ids'])} dev windows ({args.device.type})")
    return results


def prune_config(args, config=None, features=None, table=None):
    """The pruning run's PruneConfig, its schedule in steps (Sec. 3): --initial_warmup epochs at threshold 0,
    a cubic ramp, --final_warmup epochs at the final threshold, over --num_train_epochs (without features: the
    flags only, which PruneConfig checks). --target_speedup S, given the dense model's config, is a target density
    of the cost model's cost (cost_model.keep_fraction): the measured table (cost_table), or FLOPs."""
    steps, density, cost = {}, args.target_density, None
    if features is not None:
        epoch_steps, total = steps_per_epoch(args, features), total_steps(args, features, "num_train_epochs")
        steps = dict(warmup_steps=round(args.initial_warmup * epoch_steps),
                     ramp_steps=total - round((args.initial_warmup + args.final_warmup) * epoch_steps))
        if steps["ramp_steps"] < 1:
            raise ValueError(f"--initial_warmup {args.initial_warmup:g} and --final_warmup {args.final_warmup:g} "
                             f"epochs leave no step for the threshold's ramp in --num_train_epochs "
                             f"{args.num_train_epochs:g} ({total} steps)")
    if args.target_speedup is not None and config is not None:
        cost = table or cm.flop_costs(config, args.max_seq_length)
        density = cm.keep_fraction(args.target_speedup, config, cost)
    return bp.PruneConfig(block=args.block, pruning_method=args.pruning_method, final_threshold=args.final_threshold,
                          final_lambda=args.final_lambda, attention_lambda=args.attention_lambda,
                          ffn_lambda=args.ffn_lambda, gate_dead_heads=args.gate_dead_heads,
                          target_density=density, cost=cost, **steps)


def cost_table(args, config, out=None):
    """--cost_model measured: the table of --cost_table, or measured now on the run's device and precision at
    --per_device_eval_batch_size x --max_seq_length (by the first process, under torchrun); saved in out as
    cost_table.json. A resumed training state goes on by the table it started with (another would change the
    schedule): that saved table, or a --cost_table equal to it. Without out: only a --cost_table, checked. None for
    FLOPs."""
    if args.cost_model == "flops" or not (args.cost_table or out):
        return None
    saved = out / "cost_table.json" if out else None
    resumed = bool(out and args.resume and (out / "training_state.pt").exists())  # its settings were checked
    path = Path(args.cost_table) if args.cost_table else saved
    if out and not get_rank():
        out.mkdir(parents=True, exist_ok=True)  # --stage all makes its subdirectories when they are used
    if not args.cost_table and not resumed:
        if not get_rank():
            log(f"cost model: timing heads and FFN units on {args.device} ({args.precision}), batch "
                f"{args.per_device_eval_batch_size} x {args.max_seq_length} tokens")
            try:
                cost = cm.measure_costs(config, args.device, DTYPES[args.precision], args.per_device_eval_batch_size,
                                        args.max_seq_length)
            except ValueError as e:  # timings too noisy to fit
                raise ValueError(f"--cost_model measured: {e}") from None
            atomic_write(path, json.dumps(cost, indent=2).encode())
        barrier()
    try:
        cost = cm.check_cost_table(json.loads(path.read_text(encoding="utf-8")), config)
        started = json.loads(saved.read_text(encoding="utf-8")) if resumed and args.cost_table else cost
    except (OSError, ValueError) as e:  # missing, not JSON, not a table, another model's
        raise ValueError(f"{'--cost_table ' if args.cost_table else ''}{path}: {e}") from None
    if started != cost:
        raise ValueError(f"--cost_table {path}: not the table {saved} this stage started with; --resume goes on "
                         "only with the same table: give that one, or run without --resume to start afresh")
    if out and args.cost_table and not get_rank():
        atomic_write(saved, json.dumps(cost, indent=2).encode())  # the table the run used, beside it
    return cost


# ---- evaluation ------------------------------------------------------------------------------------

PROGRESS_SECONDS = 30  # how often a long evaluation or teacher pass says how far it is


@torch.no_grad()
def predict(args, model, features, trim=True, name=None):
    """Start and end logits for every window, and the seconds spent in the model's forward passes
    (synchronised on GPU). trim=True batches windows of similar length and cuts the padding (fast);
    trim=False runs full padded batches in file order, the paper's way of timing the dev evaluation.
    With a name, a long pass (the dev set, the teacher over the train set) says how far it is every 30 s.
    --compile runs torch.compile's kernels (its compilation counted in the first batch's seconds); where it
    cannot run (no C compiler, an unsupported GPU) a one-line warning, and the model runs as it is.
    In bf16 / fp16 a BERT runs as a copy cast to that dtype, LayerNorms and the residual stream included: under
    autocast every LayerNorm runs in fp32 with casts around it (docs/speed.md: dense BERT-base 1.09x faster cast on
    CPU in bf16). A MaskedBert stays under autocast: its scores must meet the threshold in fp32."""
    model.to(args.device).eval()
    cast = args.precision != "fp32" and isinstance(model, BertForQuestionAnswering)
    if cast:
        model = copy.deepcopy(model).to(DTYPES[args.precision])
    forward = torch.compile(model, dynamic=True) if getattr(args, "compile", False) else model
    N, L, B = *features["input_ids"].shape, args.per_device_eval_batch_size
    order = features["attention_mask"].sum(1).argsort() if trim else torch.arange(N)
    start, end = torch.full((N, L), float("-inf")), torch.full((N, L), float("-inf"))  # padding: never an answer
    seconds, t0, shown = 0.0, time.time(), time.time()
    for i in range(0, N, B):
        if name and i and time.time() - shown >= PROGRESS_SECONDS:
            shown, rate = time.time(), i / (time.time() - t0)
            log(f"{name}: {i}/{N} windows | {rate:.1f} windows/s | {hms((N - i) / rate)} left")
        idx = order[i:i + B]
        ids, mask, types = batches(features, idx, args.device, trim=trim)
        sync(args.device)
        t = time.perf_counter()
        with contextlib.nullcontext() if cast else autocast(args):
            try:
                s, e = forward(ids, mask, types)
            except Exception as err:  # torch.compile compiles at the first call, and fails there
                if forward is model:
                    raise
                log(f"warning: --compile: torch.compile cannot run here ({type(err).__name__}: "
                    f"{str(err).strip().splitlines()[0][:150]}); running the model without it")
                forward = model
                s, e = forward(ids, mask, types)
        sync(args.device)
        seconds += time.perf_counter() - t
        start[idx, :s.shape[1]], end[idx, :e.shape[1]] = s.float().cpu(), e.float().cpu()
    return start, end, seconds


def race(args, models, features, rounds=3, name="speed"):
    """{name: seconds}: the models take turns over the same windows, padded as the paper timed its dev evaluation,
    after a warm-up batch each, in reverse order every other round (the first of a round runs on a cooler cache);
    the fastest of `rounds` rounds counts, since a busy machine only adds time."""
    for model in models.values():
        predict(args, model, {k: v[:args.per_device_eval_batch_size] for k, v in features.items()}, trim=False)
    seconds = {k: [] for k in models}
    for r in range(rounds):
        for k, model in list(models.items())[::1 if r % 2 else -1]:
            seconds[k].append(predict(args, model, features, trim=False, name=f"{name} {r + 1}/{rounds}: {k}")[2])
    return {k: min(v) for k, v in seconds.items()}


def evaluate(args, model, examples, features, name, steps=None):
    """(metrics, predictions): dev EM/F1 with the official metric, with the training steps that made the model
    (when given), and what --resume checks (once): the stage's settings and the digests of its inputs. The first
    process only under torchrun: (None, None) for the others."""
    if get_rank():
        return None, None
    start, end, seconds = predict(args, model, features, name=f"{name}: dev evaluation")
    predictions = postprocess(examples, features, start, end, args.n_best_size, args.max_answer_length)
    metrics = {**squad_evaluate(examples, predictions), "eval_seconds": seconds, "windows": len(start),
               "evaluated_on": eval_key(args), **({"steps": steps} if steps else {}),
               "settings": getattr(args, "settings", None), "inputs": getattr(args, "inputs", None)}
    log(f"{name}: EM {metrics['exact_match']:.2f} F1 {metrics['f1']:.2f} ({seconds:.1f} s in the model)")
    return metrics, predictions


# ---- models ----------------------------------------------------------------------------------------

def load_checkpoint(name, dense=None):
    """(model, vocab file, lowercase) from a checkpoint directory or hub name. A pruned checkpoint
    (with scores.safetensors) comes back as a MaskedBert, or is refused naming the flag `dense` (the stages
    that train need a plain BERT). "tiny" is the small preset's randomly initialised 2-layer BERT over
    data/sample-vocab.txt."""
    if name == "tiny":
        vocab = DATA_DIR / "sample-vocab.txt"
        n = len(vocab.read_text(encoding="utf-8").splitlines())
        torch.manual_seed(0)
        config = BertConfig(vocab_size=n, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                            intermediate_size=256, max_position_embeddings=128)
        return BertForQuestionAnswering(config), vocab, True
    d = files.resolve_checkpoint(name)
    if dense and (d / "scores.safetensors").exists():
        raise ValueError(f"{dense} {name}: a pruned (masked) checkpoint; this stage trains a plain BERT: compact it "
                         "first (--stage compact), then fill the compacted one")
    model = files.load_masked(d) if (d / "scores.safetensors").exists() else files.load_pretrained(d)
    return (model, *tokenizer_files(d, (model.model if isinstance(model, bp.MaskedBert) else model).config.vocab_size))


# ---- command line ----------------------------------------------------------------------------------

def presets():
    """The paper's recipe (docs/paper.md) is the default; a preset changes the defaults, and flags still win."""
    shared = Path(os.environ.get("BLOCKPRUNE_SHARED", Path(__file__).resolve().parent.parent / "shared"))

    def local(path, elsewhere):  # the shared folder's copy when it has one, else the hub name or the official file
        return str(shared / path) if (shared / path).exists() else elsewhere
    return {
        "paper": {},
        "small": dict(  # offline, half a minute on 2 CPU cores: a tiny random BERT on the hand-made sample in data/
            model_name_or_path="tiny", teacher="", train_file=str(DATA_DIR / "sample-train.json"),
            dev_file=str(DATA_DIR / "sample-dev.json"), output_dir="runs/small", max_seq_length=128, doc_stride=32,
            block="8x8",  # half a 16-wide head, as the paper's 32x32 blocks are of its 64-wide heads
            learning_rate=2e-3, mask_scores_learning_rate=2e-2, finetune_epochs=20, num_train_epochs=20,
            fill_epochs=5, initial_warmup=2, final_warmup=6, per_device_eval_batch_size=64, logging_steps=50,
            save_steps=100),
        # the study of docs/study.md: a pretrained 6-layer MiniLM, the first 4,370 train questions (the first 12
        # articles), the whole dev set; from $BLOCKPRUNE_SHARED (default ../shared), else downloaded
        "minilm": dict(
            model_name_or_path=local("models/all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
            teacher="", train_file=local("squad/train-v1.1-head4370.json", "train"), max_train_questions=4370,
            dev_file=local("squad/dev-v1.1.json", "dev"), output_dir="runs/minilm", learning_rate=1e-4,
            finetune_epochs=3, target_density=0.25, num_train_epochs=2, initial_warmup=0.25, final_warmup=0.5,
            fill_epochs=1, speed_windows=1024, logging_steps=20, save_steps=50),
    }


def checked(convert, ok, expected):
    """An argparse type: the value, or argparse's one-line error for the flag, saying what was expected."""
    def parse(text):
        try:
            value = convert(text)
            good = ok(value)
        except (ValueError, RuntimeError):  # torch.device("bogus") raises RuntimeError
            good = False
        if not good:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


POSITIVE = checked(int, lambda v: v > 0, "a positive integer")
COUNT = checked(int, lambda v: v >= 0, "an integer >= 0")
NUMBER = checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")  # NaN fails too
NAME = checked(str, bool, "a directory or name, not ''")  # '' would be the current directory, in silence
TARGET = checked(lambda t: None if t == "none" else float(t), lambda v: True, "a number or 'none'")
DEVICE = checked(torch.device,  # not meta, mps...: none of them runs this
                 lambda d: d.type == "cpu" or d.type == "cuda" and (d.index or 0) < torch.cuda.device_count(),
                 "'cpu', or 'cuda' / 'cuda:N' of a GPU this machine has")


def parser():
    """Every flag, the paper's recipe as the defaults (docs/paper.md); presets() changes them."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)  # a prefix is not a flag: --mask is not --mask_scores_...
    p.error = lambda message: sys.exit(f"error: {message}")  # one line, as every other error
    a = p.add_argument
    a("--preset", choices=["paper", "small", "minilm"], default="paper",
      help="a set of defaults: the paper's recipe, 'small' (offline, about half a minute on 2 CPU cores) or 'minilm' "
           "(the study)")
    a("--stage", choices=["finetune", "prune", "compact", "fill", "eval", "all", "export"], default="all",
      help="export (not in all): a compacted or filled model as ONNX, fp32 and int8, checked (docs/deploying.md)")
    a("--model_name_or_path", type=NAME, default="bert-base-uncased",
      help="pretrained checkpoint (finetune, prune, all), pruned one (compact), compacted one (fill), any (eval)")
    a("--teacher", default="csarron/bert-base-uncased-squad-v1", help="fine-tuned QA model to distil from; "
      "'' with --stage all fine-tunes one first")
    a("--train_file", default="train", help="SQuAD v1.1 train JSON, or 'train' to download the official file")
    a("--max_train_questions", type=POSITIVE, help="train on the file's first N questions only")
    a("--dev_file", default="dev", help="SQuAD v1.1 dev JSON, or 'dev' to download the official file")
    a("--output_dir", type=NAME, default="runs/bert-base-uncased")
    a("--resume", action="store_true", help="continue from the training state and finished stages in output_dir")
    a("--overwrite_output_dir", action="store_true", help="a new run into an output_dir that holds an earlier run's "
      "results replaces them (else it is refused)")
    a("--max_seq_length", type=POSITIVE, default=384)
    a("--doc_stride", type=COUNT, default=128, help="tokens of overlap between the windows of a long context")
    a("--n_best_size", type=POSITIVE, default=20)
    a("--max_answer_length", type=POSITIVE, default=30)
    a("--per_device_train_batch_size", type=POSITIVE, default=16)
    a("--per_device_eval_batch_size", type=POSITIVE, default=128)
    a("--gradient_accumulation_steps", type=POSITIVE, default=1)
    a("--learning_rate", type=NUMBER, default=3e-5)
    a("--mask_scores_learning_rate", type=NUMBER, default=1e-2)
    a("--weight_decay", type=NUMBER, default=0.0)
    a("--max_grad_norm", type=NUMBER, default=1.0, help="clip the gradients' norm to this (0: no clipping)")
    a("--warmup_ratio", type=checked(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]"), default=0.1,
      help="fraction of fine-tuning steps with a rising lr")
    a("--finetune_epochs", type=NUMBER, default=2.0, help="dense fine-tuning of a teacher")
    a("--num_train_epochs", type=NUMBER, default=20.0, help="pruning epochs")
    a("--fill_epochs", type=NUMBER, default=4.0, help="fine-tuning of the compacted model")
    a("--initial_warmup", type=NUMBER, default=1.0, help="epochs at threshold 0 (and of lr warm-up) before pruning")
    a("--final_warmup", type=NUMBER, default=10.0, help="epochs at the final threshold at the end of pruning")
    a("--block", default="32x32", help="attention blocks: RxC, 'row', 'col' or 'head'")
    a("--pruning_method", default="sigmoid", help="keep a block while sigmoid(score) > threshold (the paper), or "
      "'topk': the top (1 - threshold) of each matrix")
    a("--final_threshold", type=float, default=0.1)
    a("--final_lambda", type=NUMBER, default=20.0)
    a("--target_density", type=TARGET, help="instead of --final_threshold: prune to this fraction of the linear "
      "parameters (e.g. 0.26); the threshold follows it down the cubic ramp. 'none': the paper's fixed final "
      "threshold (switches a preset's target off)")
    a("--target_speedup", type=TARGET, help="instead of --final_threshold or --target_density: prune to 1 / this "
      "of the encoder's FLOPs at --max_seq_length (e.g. 2.5), or of its measured time (--cost_model measured); "
      "likewise down the cubic ramp; 'none'")
    a("--cost_model", choices=["flops", "measured"], default="flops", help="what --target_speedup (and the report's "
      "predicted speed-up) weighs heads and FFN units by: FLOPs, or seconds timed on --device at --precision, "
      "--per_device_eval_batch_size x --max_seq_length (saved as cost_table.json in the prune stage's directory)")
    a("--cost_table", metavar="FILE", help="with --cost_model measured: a saved cost_table.json instead of timing "
      "(e.g. timed on the device the model is for)")
    a("--gate_dead_heads", default="eval", help="mask the V of a head with no Q or K left only at evaluation "
      "('eval': the head can come back), or in training too ('always')")
    a("--no_teacher_cache", action="store_true", help="run the teacher at every step instead of caching its logits")
    a("--speed_windows", type=COUNT, default=0, help="time the speed-up on the first N dev windows (0: all)")
    a("--attention_lambda", type=NUMBER, default=1.0)
    a("--ffn_lambda", type=NUMBER, default=0.25)
    a("--temperature", type=checked(float, lambda v: 0 < v < float("inf"), "a positive number"), default=2.0)
    a("--alpha_distil", type=NUMBER, default=0.9)
    a("--alpha_ce", type=NUMBER, default=0.1)
    a("--compile", action="store_true", help="evaluate through torch.compile (off by default; where it cannot "
      "run: a one-line warning, then eager)")
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    a("--device", type=DEVICE, default="cuda" if torch.cuda.is_available() else "cpu")
    a("--seed", type=checked(int, lambda v: 0 <= v < 2 ** 63, "an integer in [0, 2**63)"), default=17)
    a("--logging_steps", type=POSITIVE, default=100)
    a("--save_steps", type=COUNT, default=1000, help="training state every N steps (0: only at the end of a stage)")
    return p


def parse_args(argv=None):
    """The flags, a preset's defaults under them, and the checks that involve several flags."""
    p = parser()
    args, _ = p.parse_known_args(argv)
    p.set_defaults(**presets()[args.preset])
    args = p.parse_args(argv)
    if args.precision == "auto":
        args.precision = "bf16" if args.device.type == "cuda" else "fp32"
    if not args.doc_stride < args.max_seq_length // 2:
        p.error(f"--doc_stride must be in [0, max_seq_length / 2), got {args.doc_stride}")
    if args.cost_table and args.cost_model != "measured":
        p.error("--cost_table: a measured table, for --cost_model measured")
    if args.target_speedup is not None:
        if not args.target_speedup >= 1:
            p.error(f"--target_speedup must be at least 1, got {args.target_speedup}")
        if args.target_density is not None:
            p.error("--target_density and --target_speedup exclude each other: give one")
        if args.pruning_method != "sigmoid":
            p.error("--target_speedup needs --pruning_method sigmoid")
    try:
        prune_config(args)  # the pruning flags, checked by the method's own config before any work
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun: one process per GPU (or CPU process, gloo)
        if args.device.type == "cuda" and int(os.environ["LOCAL_RANK"]) >= torch.cuda.device_count():
            raise ValueError(f"torchrun: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this machine but "
                             f"{torch.cuda.device_count()} GPU(s): one process per GPU (--nproc_per_node), "
                             "or --device cpu")
        # the others wait while the first evaluates: allow for a whole dev evaluation on CPU
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(hours=6))
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(args.device)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    check_outputs(args, out)
    if args.preset == "paper" and args.stage in ("all", "prune") and args.device.type == "cpu":
        log("the paper's recipe on CPU: 20 pruning epochs of BERT-base are about 110,000 steps of 16 windows, weeks "
            "on a CPU (docs/speed.md). --preset small runs the whole pipeline in about half a minute on 2 CPU cores, "
            "--preset minilm the study")
    if args.stage == "all":
        return stage_all(args, out)
    stage = {"finetune": stage_finetune, "prune": stage_prune, "compact": stage_compact, "fill": stage_fill,
             "eval": stage_eval, "export": stage_export}[args.stage]
    inputs = [args.model_name_or_path] + ([args.teacher] if args.stage in ("prune", "fill") else [])
    return once(args, out, stage, *inputs) if args.stage in RESUMABLE else stage(args, *inputs, out)


def cli(argv=None):
    """main() with the errors a user can fix said in one line, not a traceback."""
    try:
        result = main(argv)
        if torch.distributed.is_initialized():  # under torchrun: leave together, and at once: with gloo,
            barrier()  # torch's own teardown at interpreter exit sometimes aborts ("terminate called
            torch.distributed.destroy_process_group()  # without an active exception", exit -6) after
            sys.stdout.flush(), sys.stderr.flush()  # all the work is done and saved
            os._exit(0)
        return result
    except torch.OutOfMemoryError as e:
        sys.exit(f"error: out of memory ({str(e).splitlines()[0]}). Lower --per_device_train_batch_size "
                 f"(raise --gradient_accumulation_steps to keep the batch size), --per_device_eval_batch_size "
                 f"or --max_seq_length")
    except (OSError, ValueError, FloatingPointError) as e:  # bad input, no network, a diverging loss
        sys.exit(f"error: {e}")
    finally:  # a process group left open can abort the process at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---- batches -----------------------------------------------------------------------------------------
# What train() feeds the model: steps in epochs, the windows of a step, the precision they run at.

def steps_per_epoch(args, features):
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    if len(features["input_ids"]) < global_batch:
        raise ValueError(f"--per_device_train_batch_size {args.per_device_train_batch_size} x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x {world_size()} "
                         f"processes is larger than the {len(features['input_ids'])} training windows")
    return len(features["input_ids"]) // global_batch


def total_steps(args, features, flag):
    """The steps of --flag epochs, rounded to whole steps; refused when that is none."""
    epoch = steps_per_epoch(args, features)
    if not (total := round(getattr(args, flag) * epoch)):
        raise ValueError(f"--{flag} {getattr(args, flag):g}: no training step (an epoch is {epoch} steps): give at "
                         f"least {1 / epoch:.3g}, one step")
    return total


def get_batch(args, features, step, micro):
    """This process's windows of micro-batch `micro` of a step, as a dict of tensors on the device. The
    data order is a function of (seed, epoch), so a resumed run sees the same batches; under torchrun
    each process takes its slice of the global batch. All are cut to the longest window of the step's whole
    batch: the QA head's softmax runs over every position, padding too, so a micro-batch or a process cut
    shorter would compute another loss than one batch of them all."""
    B, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    world, rank = world_size(), get_rank()
    epoch, i = divmod(step, steps_per_epoch(args, features))
    order = torch.randperm(len(features["input_ids"]), generator=torch.Generator().manual_seed(args.seed + epoch))
    whole = order[i * accum * B * world:(i + 1) * accum * B * world]  # the step's windows, all micro-batches
    batch = whole[micro * B * world:(micro + 1) * B * world]
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions",
                        "teacher_start", "teacher_end") if k in features]
    return dict(zip(keys, batches(features, batch[rank * B:(rank + 1) * B], args.device, keys, like=whole)))


def batches(features, idx, device, keys=("input_ids", "attention_mask", "token_type_ids"), trim=True, like=None):
    """The windows idx, cut to the longest of them (or of the windows `like`: the step's whole batch, get_batch).
    Padding holds no answer and attention never looks at it; SQuAD windows average 175 of
    384 tokens, so cutting it halves the work. A batch left without padding gets attention_mask None: the
    model then needs no mask, and asks the device nothing (the windows are still on the host here)."""
    out = [features[k][idx] for k in keys]
    if trim:
        n = int(features["attention_mask"][idx if like is None else like].sum(1).max())
        out = [t[:, :n] if t.dim() == 2 and t.shape[1] == features["input_ids"].shape[1] else t for t in out]
    if "attention_mask" in keys and out[keys.index("attention_mask")].all():
        out[keys.index("attention_mask")] = None
    return [t if t is None else t.to(device, non_blocking=True) for t in out]


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision, resolved


def autocast(args):
    """bf16 (or fp16) autocast, on GPU or CPU; with fp32 none."""
    return torch.autocast(args.device.type, dtype=DTYPES[args.precision], enabled=args.precision != "fp32")


if __name__ == "__main__":
    cli()
