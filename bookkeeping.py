"""
A run's bookkeeping, kept apart so that train_squad.py reads as the recipe. Nothing here is the method; skip it on
a first read.

- The directory a run owns: held against a second run, checked before any work, never holding an earlier run's
  results beside new ones; what a stage makes written as one unit, with the digests --resume checks.
- Resume: which stages are done (once), the settings they ran with, the training state a stopped one goes on from.
- Progress lines; torchrun (DistributedDataParallel) and stop signals.

Imports files.py, report.py, squad.py and blockprune.py.
"""
import argparse
import contextlib
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import torch

import blockprune as bp
import files
import report
from files import DATA_DIR, log, save_torch
from squad import squad_file


# ---- the directory a run owns ----------------------------------------------------------------------------------------

# The stages once() runs, which --resume skips or continues; compact, eval and export run again whole.
RESUMABLE = ("finetune", "prune", "fill")

# What a stage writes into its directory, besides a model: an earlier run's are never written over in silence
# (check_outputs), and a stage's model and records are written as one unit (write_unit).
RECORDS = ("metrics.json", "predictions.json", "report.json", "structure.png", "heads.png", "results.json",
           "export.json", "model.onnx", "model-int8.onnx")


def check_outputs(args, out):
    """Before any work: every directory the command writes can be written, is none of its inputs, is held by this
    run alone (a second run is refused while it lives) and holds no earlier run's results, unless --resume goes on
    with them or --overwrite_output_dir replaces them; what a killed run left there is cleaned up."""
    subdirs = [out / d for d in ("teacher", "pruned", "compact", "filled")] if args.stage == "all" else []
    for d in [out, DATA_DIR / "cache", *(d for d in subdirs if d.exists())]:  # a subdirectory is made when used
        what = "--output_dir" if d == out else str(d)
        if d.is_file():
            raise OSError(f"{what} {d} is a file, expected a directory")
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-probe{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:  # no permission, a read-only disk: say which flag, not a bare [Errno 13]
            raise OSError(f"{what} {d}: cannot write there ({e.strerror or e})") from None
        files.remove_leftovers(d)  # atomic_write's temporary files, left by a process that was killed
    if args.stage != "eval":  # a stage that wrote over its own input would lose it
        for name in ("model_name_or_path", "teacher"):
            given = Path(getattr(args, name))
            # (a given --teacher's metrics.json may go beside it, into OUT/teacher: that loses nothing)
            if given.is_dir() and any(given.resolve() == d.resolve() for d in subdirs[1:] or [out]):
                raise ValueError(f"--output_dir {out}: the stage would write over --{name} {given}: give another "
                                 "--output_dir")
    if not get_rank():  # the run holds its directories (a stage all's subdirectories, as it uses them: once)
        for d in [out, *(d for d in subdirs if d.exists())]:
            hold(d)
    earlier = [d / f for d in [out, *subdirs] for f in RECORDS + ("model.safetensors", "pytorch_model.bin")
               if (d / f).exists()]
    if args.stage == "eval":  # its records go beside the model it evaluates, or beside none
        evaluated_dir = Path(args.model_name_or_path).resolve()
        earlier = [f for f in earlier if f.name in RECORDS or f.parent.resolve() != evaluated_dir]
    if earlier and not (args.resume and args.stage in RESUMABLE + ("all",)):
        if not args.overwrite_output_dir:
            raise ValueError(f"--output_dir {out}: holds an earlier run's results ({earlier[0]}): --resume goes on "
                             "with them, --overwrite_output_dir replaces them, or give another --output_dir")
        for f in earlier:  # the records; each stage replaces its model (with its records, as one unit)
            if f.name in RECORDS:
                f.unlink()


def hold(d):
    """Take directory d for this run (files.hold), or refuse naming the process that has it."""
    try:
        files.hold(d)
    except (OSError, ValueError) as e:
        raise type(e)(f"--output_dir {e}") from None


def write_unit(out, unit):
    """Write what a stage made as one unit (files.write_files: a kill leaves the old files or the new ones, never
    predictions beside the metrics of another model). metrics.json, a dict here, records the digest of every
    other file of the unit: --resume skips a finished stage only while they are the files it wrote (once). A unit
    with a model replaces an earlier unit whole: the records and checkpoint files that it lacks go."""
    unit = {k: json.dumps(v).encode() if k == "predictions.json" else v for k, v in unit.items()}
    if metrics := unit.get("metrics.json"):  # (the caller's dict: it returns the metrics as saved)
        metrics["outputs"] = {k: files.digest(v) for k, v in unit.items() if k != "metrics.json"}
        unit["metrics.json"] = json.dumps(metrics, indent=2).encode()
    files.write_files(out, unit, remove=RECORDS + files.STALE if "model.safetensors" in unit else ())


def saved_metrics(d):
    """d's metrics.json as a dict; {} where there is none or it is not a JSON object (a hub name, cut off)."""
    try:
        metrics = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def changed_output(d, metrics):
    """The first file of d that is not what the stage that wrote metrics wrote (its digest, write_unit), else None."""
    outputs = metrics.get("outputs")
    if not isinstance(outputs, dict):
        return "metrics.json (made by an older version, which did not record its files)"
    return next((f for f, h in outputs.items() if Path(f).name != f or not (d / f).is_file()  # (a file of d's only)
                 or files.digest((d / f).read_bytes()) != h), None)


# ---- resume: what is done, what it ran with, where a stopped stage goes on from ----------------------------------

def once(args, d, fn, *inputs):
    """Run a training stage (or the teacher's evaluation) into d. With --resume it continues the stage's training
    state, or skips the stage when its metrics.json says it finished; both only if the stage was run with the same
    settings (stage_settings), and a finished one only while its files are those it wrote and its inputs those it
    read (their digests, in its metrics.json): a stage whose inputs changed runs again, files changed under a
    finished one are refused. Without --resume, a stopped run's state is never overwritten."""
    stage = fn.__name__.removeprefix("stage_")
    settings, digests = stage_settings(args, stage), input_digests(args, stage, inputs)
    state, metrics = d / "training_state.pt", d / "metrics.json"
    if not get_rank():
        hold(d)
    if args.resume and state.exists():
        same_settings(state, read_state(state, mmap=True).get("settings"), settings)
    elif args.resume and metrics.exists():
        if not (done := saved_metrics(d)):  # cut off by hand, not UTF-8, not a JSON object: name the file
            raise ValueError(f"{metrics}: not a metrics file; run without --resume to redo the stage")
        same_settings(metrics, done.get("settings"), settings)
        if changed := changed_output(d, done):
            raise ValueError(f"{d / changed}: not the file the stage wrote (its metrics.json records another): run "
                             "without --resume (with --overwrite_output_dir) to redo the stage")
        if done.get("inputs") == digests:
            log(f"{d}: done already, skipped")
            return done
        changed = [k for k in digests if digests[k] != (done.get("inputs") or {}).get(k)]
        log(f"{d}: its input ({', '.join(changed)}) changed since the stage ran: it runs again")
    elif state.exists() and not args.overwrite_output_dir:
        raise ValueError(f"{state}: the training state of a stopped run: --resume continues it, "
                         "--overwrite_output_dir starts the stage afresh")
    result = fn(argparse.Namespace(**vars(args), settings=settings, inputs=digests), *inputs, d)
    barrier()  # under torchrun: the first process has written d before the others read it
    return result


def input_digests(args, stage, inputs):
    """What a stage reads, by content: its checkpoints (--model_name_or_path or the stage before's, --teacher) and
    the data files, each as files.fingerprint."""
    digest = {"model": inputs[0], "teacher": inputs[1] if len(inputs) > 1 else None,
              "train_file": None if stage == "eval" else args.train_file, "dev_file": args.dev_file}
    for k, v in digest.items():
        if v is not None and v != "tiny":  # "tiny": drawn afresh from the seed, not read
            digest[k] = files.fingerprint(squad_file(v) if k.endswith("_file") else files.resolve_checkpoint(v))
    return digest


def stage_settings(args, stage):
    """What a stage's result depends on: --resume refuses to continue or skip a stage run with other values. Every
    other flag may change on resume (--save_steps, --logging_steps, --device,
    --per_device_eval_batch_size, --no_teacher_cache, --speed_windows, --compile)."""
    names = ["model_name_or_path", "dev_file", "max_seq_length", "doc_stride", "n_best_size", "max_answer_length",
             "precision"]
    if stage != "eval":
        names += ["train_file", "max_train_questions", "per_device_train_batch_size", "gradient_accumulation_steps",
                  "learning_rate", "weight_decay", "max_grad_norm", "seed"]
    if stage in ("eval", "prune", "fill"):
        names += ["teacher"]
    names += {"finetune": ["finetune_epochs", "warmup_ratio"], "fill": ["fill_epochs"], "eval": [],
              "prune": ["num_train_epochs", "mask_scores_learning_rate", "initial_warmup", "final_warmup", "block",
                        "pruning_method", "final_threshold", "final_lambda", "attention_lambda", "ffn_lambda",
                        "target_density", "target_speedup", "gate_dead_heads", "cost_model", "cost_table"]}[stage]
    if stage in ("prune", "fill"):
        names += ["temperature", "alpha_distil", "alpha_ce"]
    return {**{k: getattr(args, k) for k in names}, "processes": world_size()}


def same_settings(path, saved, settings):
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: made by an older version, which did not record its settings: --resume cannot "
                         "check it; run without --resume to start the stage afresh")
    for k, v in settings.items():
        if saved.get(k) != v:
            what = "torchrun processes" if k == "processes" else f"--{k}"
            raise ValueError(f"{what}: {path} was made with {saved.get(k)!r}, this run gives {v!r}; --resume goes "
                             "on only with the same settings: give the saved value, or run without --resume (or "
                             "with another --output_dir) to start afresh")


def evaluated(args, model_dir):
    """model_dir's metrics.json when it was made on this dev set with these settings (eval_key), of the files it
    lies beside, else None: --stage all then does not evaluate a given --teacher again (11 minutes on CPU for the
    MiniLM study)."""
    metrics = saved_metrics(model_dir)
    if metrics.get("evaluated_on") == eval_key(args) and not changed_output(model_dir, metrics):
        log(f"--teacher {model_dir}: its metrics.json is of this dev set and these settings; not evaluated again")
        return metrics
    return None


def eval_key(args):
    """What a dev score depends on besides the model: the dev file's bytes and the evaluation settings."""
    h = hashlib.sha256(squad_file(args.dev_file).read_bytes())
    h.update(repr((args.max_seq_length, args.doc_stride, args.n_best_size, args.max_answer_length,
                   args.precision)).encode())
    return h.hexdigest()[:16]


class TrainingState:
    """What --resume needs to continue a stage exactly: weights (and scores), optimiser, lr schedule, grad
    scaler, step and every process's random generator (dropout draws differ per process), written
    atomically by the first process."""

    def __init__(self, path, net, opt, sched, scaler, settings=None):
        self.path, self.parts = path, {"net": net, "optimizer": opt, "scheduler": sched, "scaler": scaler}
        self.settings = settings  # the stage's settings (stage_settings), which --resume compares first (once)

    def load(self, device, stage):
        if not self.path.exists():
            return 0
        state = read_state(self.path, map_location=device)
        try:
            for k, part in self.parts.items():
                part.load_state_dict(state[k])
            rng, cuda_rng = state["rng"], state["cuda_rng"]
        except Exception as e:  # another stage's or model's: torch raises many kinds, some pages long
            raise not_a_state(self.path, e) from None
        if world_size() > 1 and len(state.get("rng_per_process", [])) == world_size():
            rng, cuda_rng = state["rng_per_process"][get_rank()]
        torch.set_rng_state(rng.cpu())  # map_location put them on the GPU; generators take CPU tensors
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda_rng])
        log(f"{stage}: resumed from {self.path} at step {state['step']}")
        return state["step"]

    def save(self, step):  # called by every process at the same step; the first one writes
        rng = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)
        per_process = [None] * world_size()
        if world_size() > 1:
            torch.distributed.all_gather_object(per_process, rng)
        if get_rank():
            return
        save_torch(self.path, {**{k: part.state_dict() for k, part in self.parts.items()}, "step": step,
                               "rng": rng[0], "cuda_rng": rng[1], "settings": self.settings,
                               **({"rng_per_process": per_process} if world_size() > 1 else {})})


def read_state(path, **kw):
    """A training state, or one line naming it when it is cut off or not one (mmap=True: read only what is used).
    weights_only: tensors, numbers, strings and containers, nothing that a hostile file could make run as code."""
    try:
        state = torch.load(path, weights_only=True, **kw)
        assert isinstance(state, dict), "not a dict"
        return state
    except Exception as e:  # cut off, foreign: torch raises many kinds, some pages long
        raise not_a_state(path, e) from None


def not_a_state(path, e):
    """The one-line error for a training state that cannot serve (the first line of torch's message)."""
    return ValueError(f"{path}: not a training state of this stage and model ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:200]}); move it away to start the stage afresh")


# ---- progress, torchrun, stop signals --------------------------------------------------------------------------------

class Progress:
    """A line every --logging_steps: step, loss, lr, examples per second over the last interval (a pause or
    an evaluation in between does not skew it for long) and time left; when pruning also the threshold,
    lambda, densities, heads, the scores' spread and how many heads died or came back since the start.
    Between two lines nothing here waits for the device: the counts and the first non-finite loss stay on it."""

    def __init__(self, args, stage, total, masked=None, state_path=None):
        self.args, self.stage, self.total, self.masked, self.state_path = args, stage, total, masked, state_path
        self.batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
        self.t0, self.seen = time.time(), 0
        self.alive, self.died, self.revived = None, 0, 0
        self.bad_step = self.bad_loss = None  # the first step (from 1) whose loss was not finite, 0 for none
        log(f"{stage}: {total} steps of {self.batch} windows")

    def micro_step(self, step, loss):
        loss = loss.detach()
        if self.bad_step is None:
            self.bad_step, self.bad_loss = torch.zeros((), dtype=torch.long, device=loss.device), loss.float()
        bad = ~torch.isfinite(loss) & (self.bad_step == 0)
        self.bad_step = torch.where(bad, step + 1, self.bad_step)
        self.bad_loss = torch.where(bad, loss.float(), self.bad_loss)

    def step(self, step, loss, lr):
        self.seen += self.batch
        if self.masked is not None:  # heads that die and come back, counted at every step
            alive = report.heads_alive_at(self.masked, self.masked.threshold)
            if self.alive is not None:
                self.died = self.died + (self.alive & ~alive).sum()
                self.revived = self.revived + (~self.alive & alive).sum()
            self.alive = alive
        if step % self.args.logging_steps and step != self.total:
            return
        check_finite(self)
        rate = self.seen / (time.time() - self.t0)
        self.t0, self.seen = time.time(), 0
        line = f"{self.stage} step {step}/{self.total} | loss {loss.item():.4f} | lr {lr:.2e}"
        if self.masked is not None:
            line += f" | {report.pruning_state(self.masked, step, self.died, self.revived)}"
        left = (self.total - step) * self.batch / rate
        log(f"{line} | {rate:.1f} ex/s | {hms(left)} left")

    def state_dict(self):  # for --resume: the heads' counts go on where they stopped
        return {"alive": self.alive, "died": self.died, "revived": self.revived}

    def load_state_dict(self, state):
        self.alive, self.died, self.revived = state["alive"], state["died"], state["revived"]


def check_finite(progress):
    """Stop on the first loss that was not finite since the start. The steps only record it on the device
    (Progress.micro_step): asking at every step would make the host wait for the GPU. This runs at logging steps
    and before every save, so that the state saved is always one of finite losses."""
    if progress.bad_step is not None and progress.bad_step > 0:
        raise FloatingPointError(f"{progress.stage}: loss is {progress.bad_loss.item()} in step "
                                 f"{progress.bad_step.item()}; the last good state is "
                                 f"{progress.state_path if progress.state_path.exists() else 'not saved yet'}")


def hms(seconds):
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def ddp(net):
    """Under torchrun: DistributedDataParallel, which averages the gradients (scores included) over the
    processes after backward; a layer without heads or FFN units leaves its empty Linears out of the forward."""
    if world_size() == 1:
        return net
    c = (net.model if isinstance(net, bp.MaskedBert) else net).config
    return torch.nn.parallel.DistributedDataParallel(
        net, find_unused_parameters=0 in c.num_attention_heads + c.intermediate_size)


def all_stopping(stop, device):
    """Has any process been asked to stop? Under torchrun the processes decide together, since a signal
    may reach one of them during this very check."""
    stopping = bool(stop)
    if world_size() > 1:
        flag = torch.tensor([float(stopping)], device=device)
        torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX)
        stopping = bool(flag.item())
    return stopping


@contextlib.contextmanager
def stop_signals(stage):
    """While training, SIGTERM or a first Ctrl-C only asks to stop: the step in progress finishes and its
    state is saved before the run exits. A second Ctrl-C stops at once."""
    stop = []

    def handler(signum, frame):
        if stop and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.append(signal.Signals(signum).name)
        log(f"{stage}: {stop[-1]}: saving the training state after this step (Ctrl-C again to stop now)")
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def world_size():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def get_rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
