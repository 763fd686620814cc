"""One training step's work: the batches of one process, the frozen encoders' inputs and the loss."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import data as data_lib
from .host import pack_module
from .models import Frozen, RowPrompts, ensure_unet_loaded, sample_sigmas


def make_loader(args, dataset, *, world: int, rank: int, epoch: int, skip: int, num_workers: int) -> torch.utils.data.DataLoader:
    sampler = data_lib.ShardedBatches(len(dataset), batch_size=args.train_batch_size, world=world, rank=rank, seed=args.seed,
                                      epoch=epoch, multiple_of=args.gradient_accumulation_steps, skip=skip)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data_lib.collate,
                                       num_workers=num_workers, persistent_workers=False)


def step_generator(args, rank: int, step: int, micro: int) -> torch.Generator:
    """All randomness of one micro-batch (noise, σ, dropouts) from (seed, rank, step): resumes exactly."""
    return torch.Generator().manual_seed(data_lib.stable_seed("step", args.seed, rank, step, micro))


@torch.no_grad()
def encode_batch(args, frozen: Frozen, batch: dict, gen: torch.Generator, device: torch.device):
    """Frozen encoders: latents, text contexts (+ SDXL size/crop ADM), CLIP vision tokens; dropouts decided here."""
    prompt_mod = pack_module("nodes.prompt")
    model = frozen.model
    b = batch["size"]
    drop_caption = (torch.rand(b, generator=gen) < args.caption_dropout).tolist()
    drop_image = (torch.rand(b, generator=gen) < args.image_dropout).tolist()
    contexts, pooled, prompts = [], [], []
    for i in range(b):
        caption = "" if drop_caption[i] else batch["caption"][i]
        tokens = frozen.clip.tokenize(caption)
        cond, pool = frozen.clip.encode_from_tokens(tokens, return_pooled=True)
        cond = cond.to(device)
        contexts.append(cond)
        pooled.append(pool.to(device))
        bind = not (drop_caption[i] or drop_image[i])
        prompts.append((cond, prompt_mod.PromptTokens.from_tokens(tokens, frozen.clip.tokenizer), batch["word"][i]) if bind else None)
    # contexts of different lengths are repeated to their LCM, as the host batches conditionings
    total = math.lcm(*(c.shape[1] for c in contexts))
    context = torch.cat([c.repeat(1, total // c.shape[1], 1) for c in contexts])
    # SDXL micro-conditioning: original size, crop top-left, target size (per row)
    y = torch.cat([
        model.encode_adm(pooled_output=pooled[i], height=batch["original_hw"][i][0], width=batch["original_hw"][i][1],
                         crop_h=batch["crop_tl"][i][0], crop_w=batch["crop_tl"][i][1],
                         target_height=args.resolution, target_width=args.resolution).to(device)
        for i in range(b)
    ])
    latents = frozen.vae.encode(batch["target"])
    x0 = model.process_latent_in(latents.to(device)).float()
    vision = frozen.clip_vision.encode_image(batch["input"], crop=True)["last_hidden_state"].to(device, torch.float32)
    sigma = sample_sigmas(frozen.model_sampling, b, gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    return dict(x0=x0, noise=noise, sigma=sigma, context=context, y=y, vision=vision, prompts=RowPrompts(prompts))


def training_step(args, model: nn.Module, frozen: Frozen, batch: dict, gen: torch.Generator, device: torch.device) -> Tensor:
    """Mean loss of one micro-batch (a graph to backpropagate). An empty batch gives a zero loss with a graph."""
    if batch["size"] == 0:
        inner = model.module if hasattr(model, "module") else model
        return 0.0 * sum(p.sum() for p in inner.parameters())
    inputs = encode_batch(args, frozen, batch, gen, device)
    ensure_unet_loaded(frozen)
    return model(**inputs).mean()
