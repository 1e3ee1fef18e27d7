"""
The GPU checks in one call, for the maintainers of this repository: what the CPU machines it is built on cannot
measure (bf16 and fp16, SDPA's fused kernels, torch.compile on CUDA, batch-128 speed-ups, the recipe's hours).

    python scripts/gpu_check.py prepare                 # here: .gpu/, what travels with the working tree
    python scripts/gpu_check.py run --out $OUT          # on the GPU: the steps below, within --budget seconds
    python scripts/gpu_check.py run --smoke --out DIR   # the same steps on this CPU at toy sizes, about a minute

`prepare` copies from $BLOCKPRUNE_SHARED (default ../shared) into .gpu/ (git-ignored): the SQuAD dev set, the
4,370-question train subset, all-MiniLM-L6-v2 with its weights cast to float16 (45 MB), and pytest with the
packages it needs, since a GPU machine may have none: about 60 MB, under a device call's 64 MiB.

`run` takes the steps in this order, each a process of its own with what is left of the budget, its output in
OUT/<step>.log as it comes and a line in OUT/gpu_check.json as it ends, so that a time-out still returns what was
measured:
  1. bench: `bench.py --device cuda` (d26 over dense in bf16 autocast, bf16 cast, compiled, fp32; ours over
     transformers; the kernel-time breakdown; dense and pruning training steps);
  2. teacher: the MiniLM study's teacher (`--preset minilm --stage finetune`);
  3. speedup: `--target_speedup 2 --cost_model measured` from that teacher at the study's 2x budget, a cost table
     timed on this GPU: its predicted against its measured speed-up;
  4. pytest and 5. d25: `pytest -x -q` on CUDA beside the MiniLM study's missing point, d25 at the paper's 20
     epochs (runs/gpu/d25-20ep, resumable).
The models stay in --runs (runs/gpu/: not sent back); their metrics, reports and results go to OUT.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CARRY = ROOT / ".gpu"  # what travels: run(..., carry=[".gpu"])
PYTEST = ("pytest", "_pytest", "py", "pluggy", "iniconfig", "packaging", "pygments")  # pytest and what it imports


def prepare(shared, carry):
    """Fill carry (.gpu/) from the shared folder: the data, MiniLM in float16, pytest."""
    import torch

    import files
    for f in ("squad/dev-v1.1.json", "squad/train-v1.1-head4370.json"):
        (carry / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / f, carry / f)
    model, to = shared / "models/all-MiniLM-L6-v2", carry / "models/all-MiniLM-L6-v2"
    to.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "vocab.txt"):
        shutil.copyfile(model / f, to / f)
    files.write_safetensors(to / "model.safetensors", {k: v.to(torch.float16) if v.is_floating_point() else v
                                                       for k, v in files.read_safetensors(model / "model.safetensors")
                                                       .items()})
    (carry / "site").mkdir(parents=True, exist_ok=True)
    for name in PYTEST:  # the packages (or a module's one file) as installed here, without their bytecode
        source = Path(importlib.util.find_spec(name).origin)
        if source.name == "__init__.py":
            shutil.rmtree(carry / "site" / name, ignore_errors=True)
            shutil.copytree(source.parent, carry / "site" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, carry / "site" / source.name)
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    print(f"{carry}: {size / 2 ** 20:.1f} MiB" + (" (over a device call's 64 MiB: it will not travel)"
                                                   if size > 64 * 2 ** 20 else ""))
    return size


def steps(smoke, out, runs):
    """[(name, command, runs beside the next)]: the GPU's, or in smoke the same on CPU at toy sizes."""
    py = sys.executable
    if smoke:  # the small preset's toy BERT and hand-made sample, a few steps each
        base = ["--preset", "small", "--device", "cpu", "--finetune_epochs", "1", "--num_train_epochs", "2",
                "--initial_warmup", "0.5", "--final_warmup", "0.5", "--fill_epochs", "1", "--save_steps", "10"]
        bench = ["--tiny", "--quick", "--device", "cpu"]
        speedup, d25, tests = ["--target_speedup", "1.3"], ["--target_density", "0.25"], ["tests/test_blockprune.py"]
    else:
        base = ["--preset", "minilm", "--save_steps", "500"]
        bench = ["--device", "cuda"]
        speedup = ["--target_speedup", "2", "--num_train_epochs", "4", "--fill_epochs", "2"]
        d25 = ["--target_density", "0.25", "--num_train_epochs", "20", "--fill_epochs", "4", "--initial_warmup", "1",
               "--final_warmup", "10"]
        tests = []
    train = [py, "train_squad.py", *base, "--overwrite_output_dir"]
    return [("bench", [py, "bench.py", *bench, "--json", str(out / "bench.json")], False),
            ("teacher", [*train, "--stage", "finetune", "--output_dir", str(runs / "teacher")], False),
            ("speedup", [*train, "--teacher", str(runs / "teacher"), *speedup, "--cost_model", "measured",
                         "--output_dir", str(runs / "speedup")], False),
            ("pytest", [py, "-m", "pytest", "-x", "-q", *tests], True),  # beside the next: the CPU runs the tests
            ("d25", [py, "train_squad.py", *base, "--teacher", str(runs / "teacher"), *d25, "--resume",
                     "--output_dir", str(runs / "d25-20ep")], False)]


def run(smoke, out, budget, runs):
    """Each step with what is left of the budget; OUT/<step>.log as it runs, OUT/gpu_check.json as each ends."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BLOCKPRUNE_SHARED": os.environ.get("BLOCKPRUNE_SHARED", str(CARRY))}
    if not importlib.util.find_spec("pytest") and (CARRY / "site").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CARRY / "site"), env.get("PYTHONPATH")]))
    end, summary, running = time.time() + budget, {"smoke": smoke, "steps": {}}, []

    def wait_first():  # the oldest step still running, to its end or the budget's
        name, p, t0, log = running[0]
        rc = p.wait(timeout=max(1, end - time.time()))
        running.pop(0)
        summary["steps"][name] = {"rc": rc, "seconds": round(time.time() - t0, 1)}
        log.close()
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
        print(f"{name}: rc {rc}, {summary['steps'][name]['seconds']} s", flush=True)

    try:
        for name, command, beside in steps(smoke, out, runs):
            if time.time() > end - 10:
                summary["steps"][name] = {"rc": None, "seconds": 0, "why": "out of time"}
                continue
            print(f"{name}: {' '.join(command)}", flush=True)
            log = open(out / f"{name}.log", "w")
            running.append((name, subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT),
                            time.time(), log))
            if not beside:
                while running:
                    wait_first()
    except subprocess.TimeoutExpired:  # the budget is spent: what ran is in OUT
        for name, p, t0, log in running:
            p.terminate()  # SIGTERM: a training step ends and saves its state, for --resume next time
            p.wait(timeout=60)
            summary["steps"][name] = {"rc": None, "seconds": round(time.time() - t0, 1), "why": "out of time"}
            log.close()
    for d in runs.glob("*"):  # the runs' figures, not their models
        for f in ("results.json", "metrics.json", "compact/report.json", "pruned/cost_table.json"):
            if (d / f).is_file():
                shutil.copyfile(d / f, out / f"{d.name}-{f.replace('/', '-')}")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["prepare", "run"])
    p.add_argument("--smoke", action="store_true", help="the same steps on this CPU at toy sizes")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="where logs and JSON go")
    p.add_argument("--budget", type=float, default=540, help="seconds for all the steps")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "gpu", help="where the runs' models go (not --out)")
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("BLOCKPRUNE_SHARED", ROOT.parent / "shared")))
    p.add_argument("--carry", type=Path, default=CARRY, help="where prepare puts what travels")
    args = p.parse_args(argv)
    if args.what == "prepare":
        return prepare(args.shared, args.carry)
    return run(args.smoke, args.out, args.budget, args.runs.resolve())


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if isinstance(summary, dict) and any(s["rc"] for s in summary["steps"].values()) else 0)
