"""The models of a training run: the frozen host models, the trained NestedAttentionModel, and the
module whose forward runs the frozen UNet with the nodes' own patch (what is trained is what runs)."""
from __future__ import annotations

import argparse
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .host import pack_module

logger = logging.getLogger("training.train")

@dataclass
class Frozen:
    """The frozen host models, as a ComfyUI user has them."""

    patcher: Any  # comfy.model_patcher.ModelPatcher of an SDXL BaseModel
    clip: Any  # comfy.sd.CLIP
    clip_vision: Any  # comfy.clip_vision.ClipVisionModel
    vae: Any  # comfy.sd.VAE
    vision_encoder: str

    @property
    def model(self):
        return self.patcher.model

    @property
    def model_sampling(self):
        return self.patcher.model.model_sampling


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False).eval()


def set_gradient_checkpointing(diffusion_model: nn.Module, on: bool) -> int:
    """Recompute every BasicTransformerBlock in backward (on=False: run them normally again).

    The block's transformer_options are snapshotted at call time: the UNet keeps mutating that
    dict ("block", "block_index"), and the recomputation must see the layer key the first pass
    saw (the nested patch is looked up by it)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from torch.utils.checkpoint import checkpoint

    count = 0
    for block in diffusion_model.modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        if on and not hasattr(block, "_nested_ckpt"):
            original = block.forward

            def forward(x, context=None, transformer_options={}, _original=original, _block=block):
                if not (_block._nested_ckpt and torch.is_grad_enabled()):
                    return _original(x, context=context, transformer_options=transformer_options)
                snapshot = dict(transformer_options)
                return checkpoint(lambda x_, c_: _original(x_, context=c_, transformer_options=snapshot), x, context, use_reentrant=False)

            block.forward = forward
        if hasattr(block, "_nested_ckpt") or on:
            block._nested_ckpt = on
        count += 1
    return count


def build_models(args: argparse.Namespace, device: torch.device, weight_dtype: torch.dtype):
    """The frozen host models and the trainable NestedAttentionModel (fp32)."""
    import comfy.model_base
    import comfy.model_management as mm

    core = pack_module("nested_core")
    if args.tiny:
        from . import tiny

        seed = args.tiny_seed  # the cached fp32 builders are shared with the graph tests; training never writes to them
        patcher = tiny.tiny_sdxl(seed) if weight_dtype == torch.float32 else tiny.build_tiny_sdxl(seed, dtype=weight_dtype)
        clip, clip_vision, vae = tiny.tiny_clip(seed), tiny.tiny_clip_vision(seed), tiny.tiny_vae(seed)
        vision_encoder = "tiny-test-ViT"
    elif args.world:
        from miniworld.models import VISION_FILES, load_world  # the demo world's own files, in the host's classes

        world = load_world(getattr(args, "world_dir", None), vision=VISION_FILES[args.world_vision])
        patcher, clip, clip_vision, vae, vision_encoder = world.patcher, world.clip, world.clip_vision, world.vae, world.vision_encoder
    else:
        import comfy.clip_vision
        import comfy.sd

        model_options = {} if weight_dtype == torch.float32 and device.type == "cpu" else {"dtype": weight_dtype}
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            args.checkpoint, output_vae=True, output_clip=True, output_clipvision=False, model_options=model_options)[:4]
        clip_vision = comfy.clip_vision.load(args.clip_vision)
        if clip_vision is None:
            raise ValueError(f"{args.clip_vision}: not a CLIP vision model the host can load")
        vision_encoder = Path(args.clip_vision).stem
    if not isinstance(patcher.model, comfy.model_base.SDXL):
        raise ValueError(f"nested attention trains on SDXL; {args.checkpoint or 'the model'} is {type(patcher.model).__name__}")
    _freeze(patcher.model)
    _freeze(clip.cond_stage_model)
    _freeze(clip_vision.model)
    _freeze(vae.first_stage_model)
    mm.load_models_gpu([patcher], force_full_load=True)
    frozen = Frozen(patcher, clip, clip_vision, vae, vision_encoder)
    diffusion_model = patcher.model.diffusion_model
    blocks = set_gradient_checkpointing(diffusion_model, args.gradient_checkpointing)
    if args.gradient_checkpointing:
        logger.info("gradient checkpointing on %d transformer blocks", blocks)

    if args.init_weights:
        start = core.load_weights(args.init_weights)
        layers = core.layers_of(diffusion_model)
        if start.config.layers != layers:
            raise ValueError(f"{args.init_weights} was trained for another UNet ({len(start.config.layers)} layers; this one has {len(layers)})")
        config = start.config
    else:
        probe = clip_vision.encode_image(torch.zeros(1, clip_vision.image_size, clip_vision.image_size, 3))["last_hidden_state"]
        config = core.default_config(
            diffusion_model, vision_encoder=vision_encoder, vision_dim=probe.shape[2], vision_tokens=probe.shape[1],
            num_queries=args.num_queries, qformer_dim=args.qformer_dim, qformer_depth=args.qformer_depth,
            qformer_heads=args.qformer_heads, alpha=args.alpha if args.alpha > 0 else None, bound_word=args.word,
            domain=args.domain, base_model="sdxl",
        )
    with torch.random.fork_rng(devices=[]):  # the same initial weights in every process, global RNG untouched
        torch.manual_seed(args.seed)
        nested = core.NestedAttentionModel(config)
    if args.init_weights:
        nested.load_state_dict(start.state_dict())
    else:
        nested.init_projections_from(diffusion_model)
    nested.to(device=device, dtype=torch.float32).train().requires_grad_(True)
    return frozen, nested


def ensure_unet_loaded(frozen: Frozen) -> None:
    """The host may offload the UNet while it loads the text/vision encoders or the VAE: load it back."""
    import comfy.model_management as mm

    if next(frozen.model.diffusion_model.parameters()).device != torch.device(frozen.patcher.load_device):
        mm.load_models_gpu([frozen.patcher], force_full_load=True)


def prediction_target(model_sampling, x0: Tensor, noise: Tensor, sigma: Tensor, x_noisy: Tensor) -> Tensor:
    """What the model's raw output should be, in the base model's own parameterisation (eps, v, ...)."""
    import comfy.model_sampling as cms

    denoise = type(model_sampling).calculate_denoised
    s = sigma.reshape(-1, *[1] * (x0.ndim - 1))
    if denoise is cms.EPS.calculate_denoised:
        return noise
    if denoise is cms.V_PREDICTION.calculate_denoised:
        sd = model_sampling.sigma_data
        return (noise * sd - x0 * s / sd) * sd / (s**2 + sd**2) ** 0.5 if sd != 1.0 else (noise - s * x0) / (s**2 + 1) ** 0.5
    # any other parameterisation whose denoised output is affine in the model output: solve for it
    a = model_sampling.calculate_denoised(sigma, torch.zeros_like(x0), x_noisy)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(x0), x_noisy) - a
    return (x0 - a) / b


def sample_sigmas(model_sampling, n: int, gen: torch.Generator) -> Tensor:
    """Training noise levels over the model's whole training range (discrete timesteps where it has them)."""
    sigmas = getattr(model_sampling, "sigmas", None)
    if sigmas is not None and sigmas.numel() > 1:
        t = torch.randint(0, sigmas.numel(), (n,), generator=gen)
        return sigmas.cpu()[t].float()
    return torch.tensor([float(model_sampling.percent_to_sigma(float(u))) for u in torch.rand(n, generator=gen)])


class RowPrompts:
    """Per row: (context [1,T,C], PromptTokens, word) to bind, or None. An opaque holder, so DDP's
    input scatter passes it through untouched."""

    __slots__ = ("rows",)

    def __init__(self, rows: list):
        self.rows = rows


def patch_class(mechanism: str) -> type:
    """The nodes' NestedAttentionPatch, or (for the paper's comparison) a baseline's patch built on it."""
    if mechanism == "nested":
        return pack_module("nodes.patch").NestedAttentionPatch
    return pack_module("baselines.patch").MECHANISMS[mechanism]


class NestedTrainer(nn.Module):
    """The trained weights plus the forward that runs the frozen UNet with the nodes' patch.

    Only `nested` is a submodule (DDP syncs and saves just it); the frozen UNet rides along
    outside the module tree. Every use of the trainable weights happens inside forward()."""

    def __init__(self, nested: nn.Module, frozen: Frozen, mechanism: str = "nested"):
        super().__init__()
        self.nested = nested
        self.__dict__["frozen"] = frozen  # not a submodule
        core = pack_module("nested_core")
        self.layer_keys = list(core.attn2_layers(frozen.model.diffusion_model))
        self.__dict__["patch"] = patch_class(mechanism)(layers=self.layer_keys)

    def forward(self, x0: Tensor, noise: Tensor, sigma: Tensor, context: Tensor, y: Tensor, vision: Tensor, prompts: RowPrompts) -> Tensor:
        """Per-row loss [B]: the base model's own objective with row i bound through prompts.rows[i]."""
        prompts = prompts.rows
        patch_mod, prompt_mod = pack_module("nodes.patch"), pack_module("nodes.prompt")
        import comfy.patcher_extension

        bound = [i for i, pr in enumerate(prompts) if pr is not None]
        uuids = [uuid.uuid4() for _ in prompts]  # one conditioning per row, as if each were its own prompt
        uuid_map = {}
        if bound:
            tokens = self.nested.encode(vision[bound])  # [n_bound, Q, context_dim]
            for j, i in enumerate(bound):
                cond_i, prompt_tokens, word = prompts[i]
                subject = patch_mod.Subject(weights=self.nested, tokens=tokens[j])
                bound_cond = prompt_mod.bind_subject([[cond_i, {patch_mod.PROMPT_TOKENS: prompt_tokens}]], subject, word, 0)
                uuid_map[uuids[i]] = bound_cond[0][1][patch_mod.BINDINGS]
            # fill the step's projection cache before the UNet runs: inside a checkpointed block the
            # first pass would compute them and the recomputation would not (a different graph)
            model = self.frozen.model
            like = torch.empty(0, device=x0.device, dtype=model.manual_cast_dtype or model.get_dtype())
            for bindings in uuid_map.values():
                self.patch.precompute(bindings, like)
        captured: list[Tensor] = []

        def capture_output(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            captured.append(out)
            return out

        transformer_options = {
            "patches_replace": {"attn2": {key: self.patch for key in self.layer_keys}},
            "cond_or_uncond": [0] * len(prompts),
            "uuids": uuids,
            patch_mod.UUID_MAP: uuid_map,
            "wrappers": {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"nested_training": [capture_output]}},
        }
        ms = self.frozen.model_sampling
        x_noisy = ms.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, x0)
        self.frozen.model.apply_model(x_noisy, sigma, c_crossattn=context, y=y, transformer_options=transformer_options)
        model_output = captured[-1].float()
        target = prediction_target(ms, x0, noise, sigma, x_noisy).float()
        loss = F.mse_loss(model_output, target, reduction="none").mean(dim=(1, 2, 3))
        if not bound:  # no row used the weights: a zero term keeps DDP's gradient buckets complete
            loss = loss + 0.0 * sum(p.sum() for p in self.nested.parameters())
        return loss
