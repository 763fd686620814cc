"""Shared by the training tests: a small manifest of the tiny world of random images, and one run of
`training.train.main` in-process (each with a fresh accelerate state)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

ROWS = 6


def write_manifest(root: Path) -> Path:
    """6 good (input, target, caption) triplets of odd sizes, plus 3 bad rows a run must skip."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(ROWS):
        Image.fromarray(rng.integers(0, 255, (80, 72, 3), dtype=np.uint8)).save(root / f"ref{i}.png")
        Image.fromarray(rng.integers(0, 255, (72, 64 + 16 * i, 3), dtype=np.uint8)).save(root / f"target{i}.jpg")
        rows.append({"input": f"ref{i}.png", "target": f"target{i}.jpg", "caption": f"a photo of a person, picture {i}"})
    rows += [
        {"input": "gone.png", "target": "target0.jpg", "caption": "a person"},
        {"input": "ref0.png", "target": "target0.jpg", "caption": "a cat on a sofa"},
        {"input": "ref0.png", "target": "target0.jpg"},
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def train_args(train, manifest: Path, out: Path, *extra: str):
    return train.parse_args([
        "--tiny", "--manifest", str(manifest), "--output-dir", str(out), "--resolution", "64", "--seed", "7",
        "--dataloader-num-workers", "0", "--lr-warmup-steps", "1", "--learning-rate", "1e-3", "--report-to", "none",
        "--validation-steps", "0", *extra,
    ])


def run_training(train, manifest: Path, out: Path, *extra: str) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    try:
        return train.main(train_args(train, manifest, out, *extra))
    finally:  # several runs in one process: start each with a fresh accelerate state
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
