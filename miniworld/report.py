"""The results page's numbers and figures, regenerated from the shipped files:

    python -m miniworld.report [--identities 24] [--steps 20]
    python -m miniworld.report --figure-only     # redraw lambda_sweep.png from the stored docs/results JSON

Writes docs/results/<domain>.json (per-case scores of every condition) and docs/figures/: lambda_sweep.png
(identity and prompt accuracy vs λ, base and other-reference levels, 95 % bootstrap intervals) and
samples_<domain>.png (held-out cases: reference, base, oracle, nested at each λ, another identity's reference).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import world
from .evaluate import bootstrap_ci, evaluate, summary

DOCS = Path(__file__).resolve().parents[1] / "docs"
LAMBDAS = (1.0, 1.5, 2.0, 3.0, 4.0)


def lambda_figure(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (("identity_similarity", "identity similarity to the reference"), ("prompt_accuracy", "prompt accuracy"))
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results)), squeeze=False)
    for row, (domain, result) in enumerate(results.items()):
        scores = result["scores"]
        lams = [float(k.split("=")[1]) for k in scores if k.startswith("nested")]
        for col, (metric, label) in enumerate(metrics):
            ax = axes[row][col]
            cis = np.array([bootstrap_ci(scores[f"nested λ={lam:g}"][metric]) for lam in lams])
            ax.errorbar(lams, cis[:, 0], yerr=[cis[:, 0] - cis[:, 1], cis[:, 2] - cis[:, 0]], marker="o", capsize=3, label="nested attention")
            levels = (("base", "--", "gray"), ("other reference", ":", "tab:red"), ("oracle", "-.", "tab:green"))
            for condition, style, colour in levels:
                if condition not in scores:  # the oracle needs a base file with identity codes
                    continue
                mean, lo, hi = bootstrap_ci(scores[condition][metric])
                name = "oracle (base model told the identity)" if condition == "oracle" else condition
                ax.axhline(mean, linestyle=style, color=colour, label=name)
                ax.axhspan(lo, hi, color=colour, alpha=0.12)
            ax.set_xlabel("λ (Attention Scale)")
            ax.set_title(f"{domain}: {label}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def samples_figure(result: dict, path: Path, rows: int = 6) -> None:
    images = result["images"]
    columns = [result["references"][:rows]] + [images[c][:rows] for c in images]
    grid = torch.cat([torch.cat(list(col), dim=0) for col in columns], dim=1)  # [rows*H, cols*W, 3]
    Image.fromarray((grid.numpy() * 255).round().astype(np.uint8)).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m miniworld.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--identities", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--figure-only", action="store_true", help="redraw the λ figure from docs/results/<domain>.json, sample nothing")
    args = p.parse_args(argv)
    if args.figure_only:
        stored = {d: json.loads((DOCS / "results" / f"{d}.json").read_text()) for d in world.DOMAINS}
        lambda_figure(stored, DOCS / "figures" / "lambda_sweep.png")
        return
    torch.set_num_threads(1)
    (DOCS / "results").mkdir(parents=True, exist_ok=True)
    (DOCS / "figures").mkdir(parents=True, exist_ok=True)
    results = {}
    for domain in world.DOMAINS:
        result = evaluate(domain, n_identities=args.identities, lambdas=LAMBDAS, steps=args.steps, keep_images=True)
        print(summary(result), flush=True)
        samples_figure(result, DOCS / "figures" / f"samples_{domain}.png")
        stored = {k: v for k, v in result.items() if k not in ("images", "references")}
        stored["columns"] = ["reference", *result["images"]]
        (DOCS / "results" / f"{domain}.json").write_text(json.dumps(stored, indent=1))
        results[domain] = stored
    lambda_figure(results, DOCS / "figures" / "lambda_sweep.png")
    print(f"wrote {DOCS / 'results'} and {DOCS / 'figures'}")


if __name__ == "__main__":
    main()
