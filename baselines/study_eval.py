"""The study's evaluation: every trained file through miniworld.evaluate (held-out identities, fixed seeds, images
made by the nodes' own functions with the run's mechanism patched in, scored by the world's metrics). Writes the
per-case scores as JSON (docs/results/study/<run>.json) and the first cases' images for the grids (runs/study/images/).

Mechanism runs get every sweep (the knob, one vs PHOTOS reference photos, identity mixing); the ablation runs the
knob sweep only; with pet files, `two_domains` puts a person and a dog in one image.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from miniworld import world
from miniworld.evaluate import evaluate, evaluate_two_domains, mechanism_of, summary

from .study_plan import GRID_CASES, LAMBDAS, PHOTOS, SCALES, Layout, Run, record_time


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images[:GRID_CASES].numpy() * 255).round().astype(np.uint8)


def save(layout: Layout, name: str, result: dict, **extra) -> dict:
    """Scores (everything but the images) as JSON; the first GRID_CASES images of each condition as npz
    (arrays c0, c1, ... in the order of the JSON's `conditions`; reference, or reference_<domain>)."""
    images, references = result.pop("images"), result.pop("references")
    stored = {**result, **extra, "conditions": list(images), "grid_cases": min(GRID_CASES, result["cases"])}
    layout.result(name).parent.mkdir(parents=True, exist_ok=True)
    layout.result(name).write_text(json.dumps(stored, indent=1))
    arrays = {f"c{i}": _uint8(v) for i, v in enumerate(images.values())}
    if isinstance(references, dict):
        arrays.update({f"reference_{d}": _uint8(v) for d, v in references.items()})
    else:
        arrays["reference"] = _uint8(references)
    layout.images(name).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(layout.images(name), **arrays)
    record_time(layout, f"evaluate {name}", {"seconds": result["seconds"], "images": sum(len(v) for v in images.values()),
                                             "sampling_steps": result["steps"], "cases": result["cases"]})
    return stored


def evaluate_run(run: Run, layout: Layout, *, identities: int, sampling_steps: int, lambdas=LAMBDAS, scales=SCALES) -> dict:
    path = layout.weights(run)
    if mechanism_of(path) != run.mechanism:
        raise ValueError(f"{path} was trained for {mechanism_of(path)!r}, the study's run {run.name} is {run.mechanism!r}")
    full = run.ablation is None
    result = evaluate(run.domain, path, n_identities=identities, lambdas=lambdas, scales=scales, other_lambdas=(1.0,),
                      steps=sampling_steps, mechanism=run.mechanism, photos=PHOTOS if full else 1, mixing=full, keep_images=True,
                      base_dir=layout.world_dir)
    print(summary(result), flush=True)
    return save(layout, run.name, result, run={"name": run.name, "domain": run.domain, "mechanism": run.mechanism,
                                              "queries": run.queries, "alpha": run.alpha, "ablation": run.ablation})


def evaluate_pair(mechanism: str, layout: Layout, *, identities: int, sampling_steps: int, lambdas=LAMBDAS, scales=SCALES) -> dict:
    paths = {d: layout.weights(Run(d, mechanism)) for d in world.DOMAINS}
    result = evaluate_two_domains(paths, n_identities=identities, lambdas=lambdas, scales=scales, steps=sampling_steps,
                                  mechanism=mechanism, keep_images=True, base_dir=layout.world_dir)
    means = {c: {k: round(float(np.mean(v)), 3) for k, v in s.items()} for c, s in result["scores"].items()}
    print(f"two domains, {mechanism}: " + json.dumps(means), flush=True)
    return save(layout, f"two_domains_{mechanism}", result, run={"name": f"two_domains_{mechanism}", "mechanism": mechanism})


__all__ = ["evaluate_run", "evaluate_pair", "save"]
