"""Tiny, real-architecture stand-ins for SDXL and its encoders, built in code.

Tests and the headless demo cannot download a checkpoint, so they run on
models built from the host's own classes at toy widths: an SDXL UNet with the
real depth layout (so the real 70 attn2 layer keys), SDXL's two text encoders
behind the real tokenizer (real CLIP token ids), a CLIP vision ViT and a KL
VAE. Weights are random but fixed by a seed, so every result is reproducible.
Their images are noise-like: they check the plumbing, never the quality.

Call training.host.setup_comfyui() before importing this module.
"""
from __future__ import annotations

import functools
import json
import math
import os
import tempfile
import zlib
from types import SimpleNamespace

import torch
from torch import nn

import comfy.clip_vision
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
from comfy.ldm.models.autoencoder import AutoencoderKL

from .host import host_nodes, pack_module

CONTEXT_L, CONTEXT_G = 32, 32  # text widths: the UNet context is their concatenation (64)
POOLED_DIM = CONTEXT_G  # the pooled (projected) CLIP-G output
VISION_DIM, VISION_TOKENS = 32, 50  # tiny ViT: 224 px, patch 32 -> 7x7 + CLS


# --- deterministic weights -----------------------------------------------------------------------
@torch.no_grad()
def fill_deterministic(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter from `seed` (the host builds modules with uninitialised weights).

    Norm layers start as the identity; everything else is N(0, 1/fan_in), which keeps
    activations O(1) through deep stacks, so each part of the network (the cross
    attention included) visibly moves the output.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, module_ in module.named_modules():
        for pname, p in module_.named_parameters(recurse=False):
            if isinstance(module_, (nn.LayerNorm, nn.GroupNorm)):
                p.fill_(1.0 if pname == "weight" else 0.0)
                continue
            if p.ndim == 0:  # scalars (CLIP's logit_scale) are set by their constructors
                continue
            std = math.prod(p.shape[1:]) ** -0.5 if p.ndim > 1 else 0.02
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
    return module


def _seed_of(*parts) -> int:
    """A stable seed from strings/ints (Python's hash() is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


# --- UNet ----------------------------------------------------------------------------------------
class TinySDXLConfig(comfy.supported_models.SDXL):
    # the base class forces 64 channels per head; the tiny widths need 16
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


TINY_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=POOLED_DIM + 1536, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
    # SDXL's own layout: this is what gives the 70 real attn2 keys
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    use_linear_in_transformer=True, context_dim=CONTEXT_L + CONTEXT_G,
    use_temporal_attention=False, use_temporal_resblock=False,
)


def build_tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32) -> comfy.model_patcher.ModelPatcher:
    """An SDXL-architecture UNet (comfy.model_base.SDXL, 70 attn2 layers, context 64) with seeded weights."""
    config = TinySDXLConfig(dict(TINY_UNET))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({})
    fill_deterministic(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


# --- text encoders -------------------------------------------------------------------------------
def _text_config(width: int) -> dict:
    # 3 layers so the penultimate layer (what SDXL uses) is a real hidden layer
    return {
        "hidden_size": width, "intermediate_size": 4 * width, "num_attention_heads": 2, "num_hidden_layers": 3,
        "hidden_act": "quick_gelu", "max_position_embeddings": 77, "eos_token_id": 49407, "vocab_size": 49408,
    }


class TinySDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """SDXL's dual text encoder (same options as the host's) at toy widths."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        nn.Module.__init__(self)
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_text_config(CONTEXT_L), model_options={**model_options, "model_name": "clip_l"},
        )
        self.clip_g = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=_text_config(CONTEXT_G), special_tokens={"start": 49406, "end": 49407, "pad": 0},
            return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"},
        )
        self.dtypes = {dtype}


def build_tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A CLIP object like an SDXL checkpoint's: the real SDXL tokenizer, tiny text encoders (context 64, pooled 32)."""
    target = SimpleNamespace(params={}, clip=TinySDXLClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    fill_deterministic(clip.cond_stage_model, seed)
    return clip


# --- CLIP vision ---------------------------------------------------------------------------------
TINY_VISION = {
    "hidden_size": VISION_DIM, "intermediate_size": 4 * VISION_DIM, "num_attention_heads": 4, "num_hidden_layers": 2,
    "image_size": 224, "patch_size": 32, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "projection_dim": VISION_DIM,
}


def build_tiny_clip_vision(seed: int = 0) -> comfy.clip_vision.ClipVisionModel:
    """A CLIP vision ViT through the host's class: last_hidden_state [B, 50, 32]."""
    # the host's class only takes a json path
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(TINY_VISION, f)
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    fill_deterministic(clip_vision.model, seed)
    return clip_vision


# --- VAE -----------------------------------------------------------------------------------------
TINY_VAE = {
    "embed_dim": 4,
    "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}


def build_tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    """A KL VAE with SDXL's latent layout (4 channels, 8x downscale) at width 32."""
    autoencoder = fill_deterministic(AutoencoderKL(**TINY_VAE), seed)
    return comfy.sd.VAE(sd=autoencoder.state_dict(), config={"params": TINY_VAE})


# --- nested-attention weights --------------------------------------------------------------------
def make_tiny_weights(
    model_patcher, clip_vision_tokens: int = VISION_TOKENS, clip_vision_dim: int = VISION_DIM, num_queries: int = 8,
    seed: int = 0, **config_overrides,
):
    """Untrained nested-attention weights matching a (tiny) UNet and the tiny CLIP vision, fixed by `seed`."""
    core = pack_module("nested_core")
    diffusion_model = model_patcher.model.diffusion_model
    settings = dict(
        vision_dim=clip_vision_dim, vision_tokens=clip_vision_tokens, vision_encoder="tiny-test-ViT",
        num_queries=num_queries, qformer_dim=32, qformer_depth=1, qformer_heads=4,
    )
    config = core.default_config(diffusion_model, **{**settings, **config_overrides})
    # the modules' own init schemes, under a private RNG: deterministic, global RNG untouched
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        weights = core.NestedAttentionModel(config)
    weights.init_projections_from(diffusion_model)
    return weights.eval().requires_grad_(False)


def save_tiny_weights(path: str | os.PathLike, model_patcher=None, seed: int = 0, **kwargs) -> str:
    """make_tiny_weights(...) written as a weights file (default: for build_tiny_sdxl(0))."""
    weights = make_tiny_weights(model_patcher or tiny_sdxl(0), seed=seed, **kwargs)
    pack_module("nested_core").save_weights(weights, path, extra_metadata={"note": "tiny random test weights"})
    return os.fspath(path)


def tiny_weights_for_name(path: str | os.PathLike, model_patcher=None) -> str:
    """Tiny weights whose seed and domain follow the file name ("..._pets..." binds "dog")."""
    name = os.path.basename(os.fspath(path))
    pets = "pet" in name.lower()
    overrides = {"bound_word": "dog", "domain": "pets"} if pets else {"bound_word": "person", "domain": "faces"}
    return save_tiny_weights(path, model_patcher, seed=_seed_of(name) % 2**31, **overrides)


# --- reference photos ----------------------------------------------------------------------------
def test_image(name: str, size: int = 96) -> torch.Tensor:
    """A deterministic stand-in photo [H, W, 3] in 0..1: a coloured disc on a gradient, seeded by `name`."""
    gen = torch.Generator().manual_seed(_seed_of(name))
    background, disc = torch.rand(2, 3, generator=gen)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = background * (0.5 + 0.5 * y[..., None])  # [H, W, 3]
    centre = 0.3 + 0.4 * torch.rand(2, generator=gen)
    inside = ((y - centre[0]) ** 2 + (x - centre[1]) ** 2) < 0.08
    image[inside] = disc
    return image


def save_test_image(path: str | os.PathLike, size: int = 96) -> str:
    """test_image(file name) written as a PNG (for LoadImage)."""
    from PIL import Image

    pixels = (test_image(os.path.basename(os.fspath(path)), size) * 255).round().to(torch.uint8).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(pixels).save(path)
    return os.fspath(path)


# --- cached builders (graphs run many times in tests) --------------------------------------------
@functools.lru_cache(maxsize=None)
def tiny_sdxl(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    return build_tiny_sdxl(seed)


@functools.lru_cache(maxsize=None)
def tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    return build_tiny_clip(seed)


@functools.lru_cache(maxsize=None)
def tiny_vae(seed: int = 0) -> comfy.sd.VAE:
    return build_tiny_vae(seed)


@functools.lru_cache(maxsize=None)
def tiny_clip_vision(seed: int = 0) -> comfy.clip_vision.ClipVisionModel:
    return build_tiny_clip_vision(seed)


# --- loader nodes for tests and the demo (V1 API; not part of the pack's node list) ---------------
_SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "seed of the random tiny weights"})


class TinySDXLCheckpointLoader:
    """Like CheckpointLoaderSimple, for a tiny random SDXL (tests/demo only)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing/tiny"

    def load(self, seed):
        # CLIP and VAE are cloned/unchanged by downstream nodes; the patcher is cloned before patching
        return (tiny_sdxl(seed), tiny_clip(seed), tiny_vae(seed))


class TinyCLIPVisionLoader:
    """Like CLIPVisionLoader, for a tiny random ViT (tests/demo only)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": _SEED}}

    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"
    CATEGORY = "testing/tiny"

    def load(self, seed):
        return (tiny_clip_vision(seed),)


TINY_NODES = {"TinySDXLCheckpointLoader": TinySDXLCheckpointLoader, "TinyCLIPVisionLoader": TinyCLIPVisionLoader}


def register_tiny_nodes() -> None:
    """Add the tiny loaders to the host's node table (the host's top-level `nodes` module)."""
    nodes = host_nodes()

    nodes.NODE_CLASS_MAPPINGS.update(TINY_NODES)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.update({k: f"{k} (tiny, tests)" for k in TINY_NODES})
