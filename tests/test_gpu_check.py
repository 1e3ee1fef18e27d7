"""scripts/gpu_check.py, in its smoke mode: every step of the GPU's call, on this CPU at toy sizes."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checks_run_every_step_in_smoke_mode_and_record_them_as_they_go(tmp_path):
    p = subprocess.run([sys.executable, ROOT / "scripts/gpu_check.py", "run", "--smoke", "--out", tmp_path / "out",
                        "--runs", tmp_path / "runs", "--budget", "400"], capture_output=True, text=True)
    summary = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert p.returncode == 0, (p.stdout, summary)
    assert list(summary["steps"]) == ["bench", "teacher", "speedup", "pytest", "d25"]
    assert all(s["rc"] == 0 for s in summary["steps"].values())
    rows = json.loads((tmp_path / "out/bench.json").read_text())
    assert any(r["what"] == "training step" for r in rows)  # bench.py's rows, at toy sizes
    results = json.loads((tmp_path / "out/speedup-results.json").read_text())  # predicted and measured speed-up
    assert results["structure"]["cost_model"] == "measured" and results["speedup"] > 0
    assert (tmp_path / "out/speedup-pruned-cost_table.json").exists()
    assert (tmp_path / "out/d25-20ep-results.json").exists()
    assert "passed" in (tmp_path / "out/pytest.log").read_text()
    assert not list((tmp_path / "out").glob("**/*.safetensors"))  # the models stay behind


def test_prepare_packs_what_travels_under_a_device_calls_64_mib(tmp_path, shared):
    p = subprocess.run([sys.executable, ROOT / "scripts/gpu_check.py", "prepare", "--shared", shared, "--carry",
                        tmp_path], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    assert size < 64 * 2 ** 20 and f"{size / 2 ** 20:.1f} MiB" in p.stdout
    import files
    weights = files.read_safetensors(tmp_path / "models/all-MiniLM-L6-v2/model.safetensors")
    assert {str(w.dtype) for w in weights.values() if w.is_floating_point()} == {"torch.float16"}
    # pytest as copied here imports with no site-packages at all, as on a machine that lacks it
    check = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r});"
                            "import pytest; print(pytest.__file__)"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.startswith(str(tmp_path)), check.stderr
    for f in ("squad/dev-v1.1.json", "squad/train-v1.1-head4370.json", "models/all-MiniLM-L6-v2/vocab.txt"):
        assert (tmp_path / f).read_bytes() == (shared / f).read_bytes()
