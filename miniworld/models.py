"""The mini world's base models: a small SDXL, its dual text encoder, a KL VAE and a CLIP vision ViT.

Every model is one of the host's own classes at toy widths, so the pack patches it exactly as it
patches SDXL: the UNet is comfy.model_base.SDXL (v-prediction), the text encoder is SDXL's
dual CLIP behind the real SDXL tokenizer, the VAE is the host's AutoencoderKL with 4 latent
channels and an 8x downscale (128 px images <-> 16x16 latents, like EmptyLatentImage assumes),
the vision encoder is comfy.clip_vision.ClipVisionModel.

Weights ship in miniworld/weights/: base.safetensors (UNet + text + VAE) and one file per vision
variant. Each file states its configs as JSON metadata; nothing is guessed from key names.
`python -m miniworld.train_base {vae,unet,vision}` retrains a part from scratch.

Only the host (comfy.*) is imported here, so the module works both inside ComfyUI (the pack
is a package) and from the repo root (tests, `python -m miniworld.train_base`).
"""
from __future__ import annotations

import copy
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import comfy.clip_vision
import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL
from torch import nn

from .files import BASE_FILE, VISION_FILES, VISION_NAMES, WEIGHTS_DIR  # noqa: F401  (re-exported: the loaders' names)

FORMAT = "miniworld-base/1"
IMAGE_SIZE = 128  # world images, px
LATENT_SCALE = comfy.latent_formats.SDXL().scale_factor  # 0.13025: the UNet sees latents * this

# --- configs (defaults for building; a saved file carries its own copy) ---------------------------
TEXT_WIDTH = 32  # each of CLIP-L / CLIP-G; the UNet context is their concatenation (64)
TEXT = {
    # 3 layers so the penultimate layer (what SDXL reads) is a real hidden layer
    "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "num_attention_heads": 2, "num_hidden_layers": 3,
    "hidden_act": "quick_gelu", "max_position_embeddings": 77, "eos_token_id": 49407, "vocab_size": 49408,
}

UNET = dict(
    use_checkpoint=False, image_size=IMAGE_SIZE // 8, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=TEXT_WIDTH + 1536, in_channels=4, out_channels=4, model_channels=32,
    # SDXL's block structure (res blocks, spatial transformers, up/down samplers) at a small depth:
    # levels 16x16 / 8x8 / 4x4 latent px at 32 / 64 / 96 channels (32 per head); 8 cross-attention
    # layers (every block but the first input and last output block). ~3.0 M params, 0.45 s per
    # batch-32 training step on one CPU thread
    num_res_blocks=[1, 1, 1], channel_mult=[1, 2, 3],
    transformer_depth=[0, 1, 1], transformer_depth_middle=1, transformer_depth_output=[0, 1, 1, 1, 1, 1],
    use_linear_in_transformer=True, context_dim=2 * TEXT_WIDTH,
    use_temporal_attention=False, use_temporal_resblock=False,
)
UNET_HEAD_CHANNELS = 32

VAE = {
    "embed_dim": 4,
    "ddconfig": {
        # narrow at full resolution (CPU time is spent there; the host's GroupNorm(32) sets the floor), 3 downsamples = 8x
        "double_z": True, "z_channels": 4, "resolution": IMAGE_SIZE, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    },
}

VISION = {
    "hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
    "image_size": 64, "patch_size": 8, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "projection_dim": 64,
}


# --- builders (weights uninitialised, as the host builds them; train_base fills or trains them) ---
class WorldSDXLConfig(comfy.supported_models.SDXL):
    """SDXL's model config at toy widths, always v-prediction."""

    unet_extra_config = {"num_heads": -1, "num_head_channels": UNET_HEAD_CHANNELS}

    def model_type(self, state_dict, prefix=""):
        return comfy.model_base.ModelType.V_PREDICTION


def build_unet(config: dict | None = None) -> comfy.model_base.SDXL:
    model_config = WorldSDXLConfig(dict(config or UNET))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({})


class WorldClipModel(comfy.sdxl_clip.SDXLClipModel):
    """SDXL's dual text encoder (the host's options for CLIP-L and CLIP-G) at the world's widths."""

    def __init__(self, device="cpu", dtype=None, model_options=None, text_config: dict | None = None):
        nn.Module.__init__(self)
        model_options = model_options or {}
        text_config = text_config or TEXT
        self.clip_l = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=dict(text_config), model_options={**model_options, "model_name": "clip_l"},
        )
        self.clip_g = comfy.sd1_clip.SDClipModel(
            layer="hidden", layer_idx=-2, device=device, dtype=dtype, layer_norm_hidden_state=False,
            textmodel_json_config=dict(text_config), special_tokens={"start": 49406, "end": 49407, "pad": 0},
            return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"},
        )
        self.dtypes = {dtype}


def build_clip(config: dict | None = None) -> comfy.sd.CLIP:
    """A comfy.sd.CLIP with the real SDXL tokenizer; fp32 (the host defaults text encoders to fp16)."""
    target = SimpleNamespace(params={"text_config": config or TEXT}, clip=WorldClipModel, tokenizer=comfy.sdxl_clip.SDXLTokenizer)
    return comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})


def build_autoencoder(config: dict | None = None) -> AutoencoderKL:
    """The bare AutoencoderKL (what train_base optimises)."""
    return AutoencoderKL(**copy.deepcopy(config or VAE))


def build_vae(state_dict: dict, config: dict | None = None) -> comfy.sd.VAE:
    """comfy.sd.VAE around an AutoencoderKL state dict (checked strictly first: the host loads loosely)."""
    config = copy.deepcopy(config or VAE)
    _load_strict(build_autoencoder(config), state_dict, "vae")
    vae = comfy.sd.VAE(sd=state_dict, config={"params": config}, dtype=torch.float32)
    return vae


def build_clip_vision(config: dict | None = None) -> comfy.clip_vision.ClipVisionModel:
    # the host's class only takes a json path
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config or VISION, f)
    try:
        clip_vision = comfy.clip_vision.ClipVisionModel(f.name)
    finally:
        os.unlink(f.name)
    clip_vision.model.float()
    clip_vision.dtype = torch.float32
    return clip_vision


def patcher_for(model: comfy.model_base.SDXL) -> comfy.model_patcher.ModelPatcher:
    return comfy.model_patcher.ModelPatcher(model, mm.get_torch_device(), mm.unet_offload_device())


# --- files ---------------------------------------------------------------------------------------
def _retrain_hint(part: str) -> str:
    return f"`python -m miniworld.train_base {part}` rebuilds it"


def _load_strict(module: nn.Module, state_dict: dict, part: str) -> None:
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"{part} weights do not match the config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}; {_retrain_hint(part)}")


def _split(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def save_base(path: str | os.PathLike, *, unet: nn.Module, clip: nn.Module, vae: nn.Module, identity_codes=None,
              configs: dict | None = None, info: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    """UNet (diffusion_model), text encoders (cond_stage_model), AutoencoderKL and the UNet's identity codes
    (miniworld.identity_codes, an evaluation oracle) in one file, stored in `dtype`."""
    from safetensors.torch import save_file

    from .identity_codes import save_tensors

    tensors = {}
    for prefix, module in (("unet.", unet), ("clip.", clip), ("vae.", vae)):
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            tensors[prefix + k] = (v.to(dtype) if v.is_floating_point() else v).contiguous()
    if identity_codes is not None:
        tensors.update({k: v.to(dtype).contiguous() for k, v in save_tensors(identity_codes).items()})
    configs = configs or {"unet": UNET, "unet_head_channels": UNET_HEAD_CHANNELS, "text": TEXT, "vae": VAE}
    metadata = {"format": FORMAT, "configs": json.dumps(configs), "info": json.dumps(info or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)  # a crash mid-write never leaves a broken file


def save_vision(path: str | os.PathLike, clip_vision_model: nn.Module, *, name: str, config: dict | None = None,
                info: dict | None = None, dtype: torch.dtype = torch.float16) -> None:
    from safetensors.torch import save_file

    tensors = {k: (v.detach().cpu().to(dtype) if v.is_floating_point() else v.cpu()).contiguous()
               for k, v in clip_vision_model.state_dict().items()}
    metadata = {"format": FORMAT, "configs": json.dumps({"vision": config or VISION}), "name": name, "info": json.dumps(info or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, f"{path}.tmp", metadata=metadata)
    os.replace(f"{path}.tmp", path)


def read_file(path: str | os.PathLike, part: str) -> tuple[dict, dict]:
    """(tensors in fp32, metadata with parsed configs) of one of the world's files, or a ValueError saying how to rebuild it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing mini-world weights {path}; {_retrain_hint(part)}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        metadata["configs"] = json.loads(metadata["configs"])
        metadata["info"] = json.loads(metadata.get("info", "{}"))
    except Exception as e:  # safetensors raises its own error types for truncated/garbled files
        raise ValueError(f"unreadable mini-world weights {path} ({e}); {_retrain_hint(part)}") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, metadata


# --- loading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldModels:
    patcher: comfy.model_patcher.ModelPatcher
    clip: comfy.sd.CLIP
    vae: comfy.sd.VAE
    clip_vision: comfy.clip_vision.ClipVisionModel
    vision_encoder: str  # the name nested-attention weights record for the vision encoder they expect
    info: dict  # training notes from the files' metadata


def load_base(path: str | os.PathLike):
    """(patcher, clip, vae, metadata) from a base file, strictly."""
    tensors, meta = read_file(path, "unet")
    configs = meta["configs"]
    unet_config = WorldSDXLConfig(dict(configs["unet"]))
    unet_config.unet_extra_config = {"num_heads": -1, "num_head_channels": configs["unet_head_channels"]}
    unet_config.set_inference_dtype(torch.float32, None)
    model = unet_config.get_model({})
    _load_strict(model.diffusion_model, _split(tensors, "unet."), "unet")
    model.eval()
    clip = build_clip(configs["text"])
    _load_strict(clip.cond_stage_model, _split(tensors, "clip."), "unet")
    vae = build_vae(_split(tensors, "vae."), configs["vae"])
    return patcher_for(model), clip, vae, meta


def load_identity_codes(path: str | os.PathLike):
    """The IdentityCodes a base file's UNet was trained with, or None (a file from before they existed)."""
    from .identity_codes import from_tensors

    return from_tensors(read_file(path, "unet")[0])


def load_vision(path: str | os.PathLike):
    """(ClipVisionModel, name) from a vision file, strictly."""
    tensors, meta = read_file(path, "vision")
    clip_vision = build_clip_vision(meta["configs"]["vision"])
    _load_strict(clip_vision.model, tensors, "vision")
    return clip_vision, meta["name"]


@functools.lru_cache(maxsize=4)
def _load_world(weights_dir: str, vision: str) -> WorldModels:
    patcher, clip, vae, meta = load_base(Path(weights_dir) / BASE_FILE)
    clip_vision, name = load_vision(Path(weights_dir) / vision)
    return WorldModels(patcher, clip, vae, clip_vision, name, meta["info"])


def load_world(weights_dir: str | os.PathLike | None = None, *, vision: str = VISION_FILES["trained"]) -> WorldModels:
    """The world's models, fp32 on CPU. Cached: graphs load them many times; callers clone before patching."""
    return _load_world(str(Path(weights_dir or WEIGHTS_DIR).resolve()), vision)
