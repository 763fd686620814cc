"""Retrain the demo world's files from scratch, one command each (wall times on a 2-core CPU: docs/miniworld.md).

    python -m miniworld.retrain nested --domain person     # data + `python -m training.train --world ...`
    python -m miniworld.retrain all                        # base (VAE, UNet), vision, metrics, both nested weights

Nested-attention weights are trained by the very CLI users run (`python -m training.train`), on triplets the
world generates from training identities only (held-out identities never appear).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from .world import SUBJECT_WORD

ROOT = Path(__file__).resolve().parents[1]
NESTED_DIR = ROOT / "miniworld" / "weights" / "nested"  # = evaluate.NESTED_DIR (this module stays host-free: it only starts processes)
ROWS, STEPS = 6000, 1200
IDENTITY_MINUTES = 30  # the UNet's second stage (miniworld.identity_codes), on 2 threads


def triplets_command(domain: str, data: Path, rows: int = ROWS) -> list[str]:
    """Training triplets of the domain's training identities (seed 1: every run of a domain reads the same rows)."""
    return [sys.executable, "-m", "miniworld.world", "triplets", "--domain", domain, "--out", str(data), "--n", str(rows),
            "--size", "128", "--seed", "1"]


def train_command(domain: str, data: Path, run: Path, export: Path, steps: int = STEPS, *, batch: int = 16,
                  options: Sequence[str] = (), validation: bool = True) -> list[str]:
    """`python -m training.train --world` with the world's recipe; `options` add or override training arguments
    (baselines.study: --mechanism, --num-queries, --alpha); validation: a grid at the end (does not change the weights)."""
    return [sys.executable, "-m", "training.train", "--world", "--manifest", str(data / "manifest.jsonl"), "--word", SUBJECT_WORD[domain],
            "--domain", domain, "--resolution", "128", "--center-crop", "--train-batch-size", str(batch), "--max-train-steps", str(steps),
            "--learning-rate", "5e-4", "--lr-scheduler", "cosine", "--lr-warmup-steps", "50", "--checkpointing-steps", "200",
            "--validation-steps", str(steps if validation else 0), "--output-dir", str(run), "--overwrite", "--export", str(export),
            # α 1 keeps the nested value at the norm of the subject word's value, the scale the base UNet learned
            # identity codes at (miniworld.identity_codes); --world-vision defaults to the trained ViT (more identity, measured)
            "--alpha", "1", *options]


def identity_stage_command(minutes: float = IDENTITY_MINUTES, *, parts: bool = False, pairs: float = 0.0,
                           weights_dir: Path | None = None) -> list[str]:
    """The UNet's identity-code stage, continued from the UNet in weights_dir (default: the shipped one, in place);
    parts: the harder world's part codes; pairs: that share of rows showing a person and a dog (baselines.study world)."""
    return [sys.executable, "-m", "miniworld.train_base", "unet", "--from-shipped", *(["--parts"] if parts else []),
            *(["--pairs", f"{pairs:g}"] if pairs else []),
            "--minutes", f"{minutes:g}", "--threads", "2", *(["--weights-dir", str(weights_dir)] if weights_dir else [])]


def nested_commands(domain: str, work: Path, steps: int = STEPS) -> list[list[str]]:
    data, run = work / f"data_{domain}", work / f"nested_{domain}"
    return [triplets_command(domain, data),
            train_command(domain, data, run, NESTED_DIR / f"nested_{domain}.safetensors", steps)]


def run(commands: list[list[str]]) -> float:
    t0 = time.time()
    for command in commands:
        print("$", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return time.time() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m miniworld.retrain", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("nested", "all"))
    p.add_argument("--domain", choices=tuple(SUBJECT_WORD), help="with 'nested': which weights (default: both)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "world", help="data and training runs (not shipped)")
    p.add_argument("--steps", type=int, default=STEPS)
    args = p.parse_args(argv)
    times = {}
    if args.what == "all":
        base = [sys.executable, "-m", "miniworld.train_base"]
        times["vae"] = run([base + ["vae"]])
        # the shipped UNet's two stages: scenes from captions, then the subject word carrying the identity
        times["unet (scenes)"] = run([base + ["unet", "--identity-rows", "0"]])
        times["unet (identity codes)"] = run([identity_stage_command()])
        times["vision"] = run([base + ["vision"]])
        times["metrics"] = run([[sys.executable, "-m", "miniworld.train_metrics"]])
    NESTED_DIR.mkdir(parents=True, exist_ok=True)
    for domain in ([args.domain] if args.domain else list(SUBJECT_WORD)):
        times[f"nested {domain}"] = run(nested_commands(domain, args.work, args.steps))
    for name, seconds in times.items():
        print(f"{name}: {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
