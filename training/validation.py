"""Validation grids: rows (reference, prompt), columns the reference then the λ sweep, sampled through
the nodes' own Apply / Encode Subject / Bind Token code with one fixed seed."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from . import data as data_lib
from .checkpoints import weights_to_export
from .host import pack_module
from .models import Frozen, ensure_unet_loaded


@torch.no_grad()
def validation_grid(args, frozen: Frozen, weights, images: list, device) -> Tensor:
    """Rows: (reference, prompt); columns: the reference, then the λ sweep. Sampled through the
    nodes' own Apply / Encode Subject / Bind Token code, one fixed seed. Returns [H, W, 3] in 0..1."""
    import comfy.sample

    apply_mod, subject_mod, prompt_mod, patch_mod = (pack_module(f"nodes.{m}") for m in ("apply", "subject", "prompt", "patch"))
    res = args.validation_resolution or args.resolution
    if args.mechanism == "nested":
        model = apply_mod.apply_nested_attention(frozen.patcher)
    else:  # a baseline of the paper's comparison: the same wiring with its patch
        model = pack_module("baselines.patch").apply_mechanism(frozen.patcher, args.mechanism)

    negative = frozen.clip.encode_from_tokens_scheduled(frozen.clip.tokenize(args.validation_negative))
    rows = []
    for image in images:
        subject = subject_mod.encode_subject(weights, frozen.clip_vision, image[None])
        ref = F.interpolate(image[None].movedim(-1, 1), size=(res, res), mode="bilinear", antialias=True).movedim(1, -1)[0]
        for prompt in validation_prompts(args):
            positive = prompt_mod.encode_prompt(frozen.clip, prompt)
            try:
                positive[0][1][patch_mod.PROMPT_TOKENS].positions(weights.config.bound_word)
            except ValueError:  # a fixed validation prompt without the trained word: append it
                positive = prompt_mod.encode_prompt(frozen.clip, f"{prompt}, a {weights.config.bound_word}")
            tiles = [ref.cpu()]
            for lam in args.validation_lambdas:
                bound = prompt_mod.bind_subject(positive, subject.with_lambda(lam), weights.config.bound_word, 0)
                latent = torch.zeros(1, 4, res // 8, res // 8)
                noise = comfy.sample.prepare_noise(latent, args.validation_seed)
                samples = comfy.sample.sample(model, noise, args.validation_sampling_steps, args.validation_cfg, "euler", "normal",
                                              bound, negative, latent, seed=args.validation_seed, disable_pbar=True)
                tiles.append(frozen.vae.decode(samples)[0].float().clamp(0, 1).cpu())
            rows.append(torch.cat(tiles, dim=1))
    ensure_unet_loaded(frozen)
    return torch.cat(rows, dim=0)


def run_validation(args, accelerator, frozen, nested, ema, images, step: int) -> Path:
    from PIL import Image

    grid = validation_grid(args, frozen, weights_to_export(nested, ema), images, accelerator.device)
    out = Path(args.output_dir) / "validation" / f"step_{step:08d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((grid.numpy() * 255).round().astype("uint8")).save(out)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", grid.numpy(), step, dataformats="HWC")
    return out


def validation_prompts(args) -> list[str]:
    """--validation-prompts, else (on the demo world) three of the world's own captions for the bound word."""
    if args.validation_prompts:
        return args.validation_prompts
    import numpy as np
    from miniworld import world

    domain = {word: domain for domain, word in world.SUBJECT_WORD.items()}[args.word]  # checked by preflight
    rng = np.random.default_rng(args.validation_seed)
    return [world.caption(domain, world.sample_scene(rng)) for _ in range(3)]


def validation_images(args, dataset) -> list[Tensor]:
    paths = args.validation_images or list(dict.fromkeys(str(r.input) for r in dataset.rows))[:2]
    return [data_lib.to_tensor(data_lib.load_rgb(Path(p))) for p in paths]
