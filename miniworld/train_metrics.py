"""Train the world's metric model from scratch and measure it on held-out identities.

    python -m miniworld.train_metrics                      # writes miniworld/weights/metrics.safetensors

Every batch is rendered fresh from training identities (all styles, scenes, and some reference photos),
then degraded the way a small diffusion model's decoder might (down-up sampling, blur, JPEG, colour
shifts, noise). One CPU thread on purpose: on a shared 2-core machine more threads were slower.
Measured wall time of the defaults (3000 steps of 64, then evaluation): about 14 minutes, see docs/miniworld.md.
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from miniworld import world
from miniworld.metrics import (
    DEFAULT_PATH,
    MetricsConfig,
    WorldMetrics,
    WorldNet,
    save_metrics,
    to_batch,
)

IGNORE = -100  # label of a head that does not apply (the other domain's attributes, a reference's background)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m miniworld.train_metrics", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-fraction", type=float, default=0.15, help="share of reference photos among the training images")
    parser.add_argument("--eval-identities", type=int, default=200, help="held-out identities per domain for the report")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")
    if not 0 <= args.reference_fraction <= 1:
        parser.error("--reference-fraction must be in [0, 1]")
    return args


# ----------------------------------------------------------------------------------------------------- data
def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H,W,3] -> uint8: a random mix of the softness and noise of decoded diffusion samples."""
    side = image.shape[0]
    pil = Image.fromarray(image)
    if rng.random() < 0.5:
        low = int(rng.integers(side // 2, side - 4))
        pil = pil.resize((low, low), Image.BILINEAR).resize((side, side), Image.BILINEAR)
    if rng.random() < 0.4:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    if rng.random() < 0.3:
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
        pil = Image.open(buffer).convert("RGB")
    x = np.asarray(pil, np.float32)
    x = (x - x.mean()) * rng.uniform(0.9, 1.1) + x.mean()  # contrast
    x = x * rng.uniform(0.94, 1.06, size=3) + rng.uniform(-8, 8)  # colour balance, brightness
    if rng.random() < 0.6:
        x = x + rng.normal(0, rng.uniform(1, 8), size=x.shape)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def labels_for(identity: world.Identity, scene: world.Scene | None, heads: list[tuple[str, int]]) -> list[int]:
    """One class per head; `scene=None` is a reference photo (centred, large, unstyled, no scene background)."""
    known = {"domain": world.DOMAINS.index(identity.domain)}
    if scene is None:
        known |= {"position": 1, "size": 1, "style": 0}
    else:
        known |= world.scene_labels(scene)
    known |= {f"{identity.domain}.{name}": v for (name, _), v in zip(world.ATTRIBUTES[identity.domain], identity.attrs)}
    return [known.get(name, IGNORE) for name, _ in heads]


def training_batch(step: int, args: argparse.Namespace, pools: dict[str, list[world.Identity]], heads: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B,3,64,64] and labels [B, heads], a pure function of (seed, step)."""
    images, labels = [], []
    for i in range(args.batch_size):
        rng = np.random.default_rng([args.seed, step, i])
        pool = pools[world.DOMAINS[i % len(world.DOMAINS)]]
        identity = pool[int(rng.integers(len(pool)))]
        render_seed = int(rng.integers(2**31))
        if rng.random() < args.reference_fraction:
            image, scene = world.render_reference(identity, seed=render_seed), None
        else:
            scene = world.sample_scene(rng)
            image = world.render(identity, scene, seed=render_seed)
        images.append(degrade(image, rng) if rng.random() < 0.8 else image)
        labels.append(labels_for(identity, scene, heads))
    return to_batch(np.stack(images)), torch.tensor(labels)


# ------------------------------------------------------------------------------------------------ training
def train(args: argparse.Namespace) -> WorldNet:
    torch.manual_seed(args.seed)
    config = MetricsConfig()
    net = WorldNet(config)
    pools = {domain: world.train_identities(domain) for domain in world.DOMAINS}
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    names = [name for name, _ in config.heads]
    start = time.perf_counter()
    for step in range(args.steps):
        images, labels = training_batch(step, args, pools, config.heads)
        logits = net(images)
        # sum over heads of each head's mean loss over the images it applies to
        loss = sum(F.cross_entropy(logits[name], labels[:, j], ignore_index=IGNORE, reduction="sum") / (labels[:, j] != IGNORE).sum().clamp(min=1) for j, name in enumerate(names))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - start:6.0f} s", flush=True)
    return net.eval()


# ---------------------------------------------------------------------------------------------- evaluation
def evaluation_set(domain: str, n_identities: int, *, degraded: bool, seed: int = 1) -> dict:
    """Every held-out evaluation identity once in every style (random scene), plus one reference photo each."""
    rng = np.random.default_rng([seed, world.DOMAINS.index(domain)])
    identities = world.eval_identities(domain, n_identities)
    images, scenes, owners = [], [], []
    for style in world.SCENE_FIELDS["style"]:
        for k, identity in enumerate(identities):
            scene = world.Scene(**{**world.sample_scene(rng).__dict__, "style": style})
            image = world.render(identity, scene, seed=int(rng.integers(2**31)))
            images.append(degrade(image, rng) if degraded else image)
            scenes.append(scene)
            owners.append(k)
    references = np.stack([world.render_reference(identity, seed=10_000 + k) for k, identity in enumerate(identities)])
    return {"identities": identities, "images": np.stack(images), "scenes": scenes, "owners": np.array(owners), "references": references}


def evaluate(metrics: WorldMetrics, domain: str, data: dict, gallery_size: int = 50) -> dict:
    """Held-out accuracies: per attribute, per style, retrieval top-1 among `gallery_size` identities, prompt fields."""
    identities, owners, styles = data["identities"], data["owners"], [s.style for s in data["scenes"]]
    truth = [identities[k] for k in owners]
    predicted = metrics.predict_identities(data["images"], domain)
    hits = np.array([[p == t for p, t in zip(pi.attrs, ti.attrs)] for pi, ti in zip(predicted, truth)])
    queries = metrics.identity_embedding(data["images"], domain)
    gallery = metrics.identity_embedding(data["references"], domain)
    similarity = (queries @ gallery.T).numpy()
    # retrieval within blocks of gallery_size identities: a query competes with its own block's references
    block = owners // gallery_size
    retrieved = np.array([block[i] * gallery_size + similarity[i, block[i] * gallery_size : (block[i] + 1) * gallery_size].argmax() for i in range(len(owners))])
    same = similarity[np.arange(len(owners)), owners]
    different = (similarity.sum(1) - same) / (similarity.shape[1] - 1)
    fields = metrics.prompt_field_accuracy(data["images"], data["scenes"])
    by_style = {style: np.array(styles) == style for style in world.SCENE_FIELDS["style"]}
    return {
        "attribute_accuracy": {name: float(hits[:, j].mean()) for j, (name, _) in enumerate(world.ATTRIBUTES[domain])},
        "attribute_accuracy_by_style": {s: float(hits[m].mean()) for s, m in by_style.items()},
        "retrieval_top1_by_style": {s: float((retrieved == owners)[m].mean()) for s, m in by_style.items()},
        "similarity_same_vs_different": [float(same.mean()), float(different.mean())],
        "prompt_field_accuracy": {name: float(v.mean()) for name, v in fields.items()},
        "style_accuracy_by_style": {s: float(fields["style"].numpy()[m].mean()) for s, m in by_style.items()},
        "reference_attribute_accuracy": float(metrics.identity_attribute_accuracy(data["references"], identities).mean()),
    }


def print_report(report: dict) -> None:
    for condition, domains in report["heldout"].items():
        for domain, r in domains.items():
            print(f"\n== {domain}, {condition} held-out renders ==")
            for key, values in r.items():
                text = ", ".join(f"{k} {v:.3f}" for k, v in values.items()) if isinstance(values, dict) else values
                print(f"{key}: {text}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    net = train(args)
    train_seconds = time.perf_counter() - start
    metrics = WorldMetrics(net)
    report = {"train_steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "train_seconds": round(train_seconds), "heldout": {}}
    for condition in ("clean", "degraded"):
        report["heldout"][condition] = {d: evaluate(metrics, d, evaluation_set(d, args.eval_identities, degraded=condition == "degraded")) for d in world.DOMAINS}
    report["total_seconds"] = round(time.perf_counter() - start)
    print_report(report)
    save_metrics(net, args.out, report)
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {report['total_seconds']} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
