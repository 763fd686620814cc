"""Smoke runs of the benchmark scripts on the tiny model, so they keep working (their figures are not checked:
speed targets live in the scripts' own output, measured on real-size models)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_overhead_benchmark_measures_a_cfg_step_with_one_bound_row():
    out = run("benchmarks.overhead", "--tiny", "--steps", "1", "--warmup", "0", "--skip-memory", "--skip-naive", "--queries", "16")
    assert "batch layout seen by the UNet: batch 2, cond_or_uncond [1, 0]" in out
    assert "70 attn2 layers" in out
    assert any(line.startswith("nested M=16") and "x" in line for line in out.splitlines())


def test_training_throughput_benchmark_runs():
    out = run("benchmarks.train_throughput", "--model", "tiny", "--sizes", "64", "--steps", "1", "--warmup", "0")
    assert "nested training step" in out and "ratio (time)" in out
