"""Metrics of the miniature world: one small CNN that reads a 64x64 image back into world labels.

A shared convolutional trunk feeds linear heads: the domain (person or dog), the four scene fields
(background, position, size, style) and, per domain, one head per identity attribute. Trained on styled
renders of training identities only (`python -m miniworld.train_metrics`), with blur/noise/JPEG
degradations so it transfers to images decoded from a small diffusion model.

- identity: `identity_attribute_accuracy` (fraction of an identity's attributes read back from an image)
  and `identity_similarity` (cosine of identity embeddings; an embedding is the concatenated square roots
  of the per-attribute probabilities, so the cosine is the mean Bhattacharyya overlap of the attribute
  predictions and ignores background, position and style).
- prompt: `prompt_accuracy` (fraction of the scene's four fields read back) and `prompt_field_accuracy`.

The weights file is safetensors (fp16) with the config and the measured held-out accuracies as JSON
metadata; loading checks the heads against the world's attribute tables.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from miniworld import world

DEFAULT_PATH = Path(__file__).parent / "weights" / "metrics.safetensors"
FORMAT = "miniworld-metrics/1"
ImageBatch = torch.Tensor | np.ndarray


def world_heads() -> list[tuple[str, int]]:
    """(name, classes) of every head, in output order: domain, scene fields, then `domain.attribute`."""
    heads = [("domain", len(world.DOMAINS))] + [(name, len(values)) for name, values in world.SCENE_FIELDS.items()]
    for domain in world.DOMAINS:
        heads += [(f"{domain}.{name}", len(values)) for name, values in world.ATTRIBUTES[domain]]
    return heads


@dataclass(frozen=True)
class MetricsConfig:
    image_size: int = 64
    widths: tuple[int, ...] = (24, 48, 96, 128)  # conv blocks, each halving the resolution
    context: int = 192  # channels of the last conv, which sees most of the image
    hidden: int = 128  # the layout path's width
    heads: list[tuple[str, int]] = field(default_factory=world_heads)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MetricsConfig:
        d = json.loads(text)
        return cls(image_size=d["image_size"], widths=tuple(d["widths"]), context=d["context"], hidden=d["hidden"], heads=[(n, k) for n, k in d["heads"]])


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class WorldNet(nn.Module):
    """Conv trunk, then two views of its last map: pooled over space (what is there, wherever it is:
    identity, style, background) and flattened (where it is: position, size); linear heads read both."""

    def __init__(self, config: MetricsConfig):
        super().__init__()
        self.config = config
        channels = (3, *config.widths)
        self.trunk = nn.Sequential(*[nn.Sequential(conv_block(a, b), nn.MaxPool2d(2)) for a, b in pairwise(channels)])
        self.context = conv_block(config.widths[-1], config.context)
        side = config.image_size // 2 ** len(config.widths)
        self.layout = nn.Sequential(nn.Flatten(), nn.Linear(config.context * side * side, config.hidden), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Dropout(0.1), nn.Linear(2 * config.context + config.hidden, sum(k for _, k in config.heads)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: [N, 3, S, S] in 0..1 -> {head name: logits [N, classes]}."""
        features = self.context(self.trunk(images * 2 - 1))  # [N, context, S/16, S/16]
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=-1)
        logits = self.out(torch.cat([pooled, self.layout(features)], dim=-1))
        return dict(zip([n for n, _ in self.config.heads], logits.split([k for _, k in self.config.heads], dim=-1)))


def to_batch(images: ImageBatch, size: int = 64) -> torch.Tensor:
    """ComfyUI IMAGE (float [N,H,W,3] in 0..1) or uint8 [N,H,W,3] / [H,W,3] -> float32 [N,3,size,size] in 0..1."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected images [N,H,W,3] or [H,W,3], got {tuple(x.shape)}")
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    x = rearrange(x.cpu(), "n h w c -> n c h w")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def save_metrics(net: WorldNet, path: str | Path, report: dict) -> None:
    """fp16 weights (BatchNorm's step counters left out) with config and measured accuracies as metadata."""
    tensors = {k: v.detach().half().contiguous() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": net.config.to_json(), "report": json.dumps(report)})


class WorldMetrics:
    """The shipped metric model, on CPU in float32. All image inputs: see `to_batch`."""

    def __init__(self, net: WorldNet, report: dict | None = None, batch_size: int = 256):
        self.net, self.report, self.batch_size = net.eval(), report or {}, batch_size

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> WorldMetrics:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path}: format {metadata.get('format')!r}, expected {FORMAT!r}")
        config = MetricsConfig.from_json(metadata["config"])
        if config.heads != world_heads():
            raise ValueError(f"{path}: heads {config.heads} do not match the world's attributes {world_heads()}")
        net = WorldNet(config)
        expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
        tensors = load_file(str(path))
        if set(tensors) != expected:
            raise ValueError(f"{path}: missing {sorted(expected - set(tensors))}, unexpected {sorted(set(tensors) - expected)}")
        net.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)  # strict above, minus the step counters
        return cls(net, json.loads(metadata.get("report", "{}")))

    @torch.no_grad()
    def logits(self, images: ImageBatch) -> dict[str, torch.Tensor]:
        x = to_batch(images, self.net.config.image_size)
        chunks = [self.net(x[i : i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}

    # ------------------------------------------------------------------------------------------ identity
    @torch.no_grad()
    def identity_embedding(self, images: ImageBatch, domain: str) -> torch.Tensor:
        """[N, sum of attribute classes], unit norm: concatenated sqrt of per-attribute probabilities."""
        logits = self.logits(images)
        parts = [logits[f"{domain}.{name}"].softmax(-1).sqrt() for name, _ in world.ATTRIBUTES[domain]]
        return F.normalize(torch.cat(parts, dim=-1), dim=-1)

    @torch.no_grad()
    def predict_domain(self, images: ImageBatch) -> str:
        """The domain most of the images show."""
        votes = self.logits(images)["domain"].argmax(-1).bincount(minlength=len(world.DOMAINS))
        return world.DOMAINS[int(votes.argmax())]

    @torch.no_grad()
    def identity_similarity(self, images: ImageBatch, reference_images: ImageBatch, *, domain: str | None = None) -> torch.Tensor:
        """[N] cosine between each image's identity embedding and its reference's.

        References pair up with the images when there are N of them; otherwise their mean embedding (one
        subject from several photos) is compared with every image. `domain` defaults to the references'."""
        domain = domain or self.predict_domain(reference_images)
        queries = self.identity_embedding(images, domain)
        references = self.identity_embedding(reference_images, domain)
        if len(references) != len(queries):
            references = F.normalize(references.mean(0, keepdim=True), dim=-1).expand_as(queries)
        return (queries * references).sum(-1)

    @torch.no_grad()
    def predict_identities(self, images: ImageBatch, domain: str) -> list[world.Identity]:
        return [world.Identity(domain, tuple(row)) for row in _attribute_values(self.logits(images), domain).tolist()]

    @torch.no_grad()
    def identity_attribute_accuracy(self, images: ImageBatch, identities: Sequence[world.Identity] | world.Identity) -> torch.Tensor:
        """[N] fraction of each image's identity attributes read back from it (one identity for all, or one each)."""
        logits = self.logits(images)
        identities = _per_image(identities, len(logits["domain"]))
        scores = torch.zeros(len(identities))
        for domain in {identity.domain for identity in identities}:
            rows = torch.tensor([i for i, identity in enumerate(identities) if identity.domain == domain])
            predicted = _attribute_values({name: v[rows] for name, v in logits.items()}, domain)
            scores[rows] = (predicted == torch.tensor([identities[i].attrs for i in rows])).float().mean(-1)
        return scores

    # -------------------------------------------------------------------------------------------- prompt
    @torch.no_grad()
    def predict_scenes(self, images: ImageBatch) -> list[world.Scene]:
        logits = self.logits(images)
        fields = {name: logits[name].argmax(-1).tolist() for name in world.SCENE_FIELDS}
        return [world.Scene(**{name: world.SCENE_FIELDS[name][fields[name][i]] for name in fields}) for i in range(len(fields["style"]))]

    @torch.no_grad()
    def prompt_field_accuracy(self, images: ImageBatch, scenes: Sequence[world.Scene] | world.Scene) -> dict[str, torch.Tensor]:
        """{field: [N] 1.0 where the image shows the scene's value of that field, else 0.0}."""
        predicted = self.predict_scenes(images)
        scenes = _per_image(scenes, len(predicted))
        return {name: torch.tensor([float(getattr(p, name) == getattr(s, name)) for p, s in zip(predicted, scenes)]) for name in world.SCENE_FIELDS}

    @torch.no_grad()
    def prompt_accuracy(self, images: ImageBatch, scenes: Sequence[world.Scene] | world.Scene) -> torch.Tensor:
        """[N] fraction of the scene's fields (background, position, size, style) the image shows."""
        return torch.stack(list(self.prompt_field_accuracy(images, scenes).values()), dim=-1).mean(-1)


def _attribute_values(logits: dict[str, torch.Tensor], domain: str) -> torch.Tensor:
    """[N, attributes] most likely value index of each of the domain's attributes."""
    return torch.stack([logits[f"{domain}.{name}"].argmax(-1) for name, _ in world.ATTRIBUTES[domain]], dim=-1)


def _per_image(items, n: int) -> list:
    items = [items] if isinstance(items, (world.Identity, world.Scene)) else list(items)
    if len(items) == 1:
        items = items * n
    if len(items) != n:
        raise ValueError(f"{len(items)} labels for {n} images")
    return items
