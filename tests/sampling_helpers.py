"""Shared by the patch tests: encode a prompt with the pack's node, sample the tiny SDXL with the host's sampler
(optionally recording each step's cond and uncond predictions)."""
from __future__ import annotations

import torch

from training.host import pack_module


def encode(clip, text):
    return pack_module("nodes.prompt").EncodePrompt.execute(clip, text).result[0]


def sample(model, positive, negative, *, steps=3, cfg=5.0, batch=1, record=None, seed=1):
    import comfy.sample

    latent = torch.zeros(batch, 4, 8, 8)
    m = model
    if record is not None:
        m = model.clone()

        def cfg_function(args):  # sees cond and uncond predictions separately, each step
            record.append((args["cond"].clone(), args["uncond"].clone()))
            return args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]

        m.set_model_sampler_cfg_function(cfg_function)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(m, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed, disable_pbar=True)
