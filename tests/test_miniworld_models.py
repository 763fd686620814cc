"""The mini world's shipped base models: they load strictly, are the host's SDXL classes, round-trip
128 px images through 16x16 latents at the measured quality, and the loader node hands them out."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

import comfy.clip_vision
import comfy.model_base
import comfy.sample
import comfy.sd

from miniworld import models, world

core = pack_module("nested_core")
PSNR_FLOOR_DB = 22.5  # these 8 renders measured 23.55 dB with the shipped VAE (an untrained one: ~10 dB)


@pytest.fixture(scope="module")
def world_models():
    return models.load_world()


@pytest.fixture(scope="module")
def renders() -> torch.Tensor:
    """Fixed held-out-identity renders, [8, 128, 128, 3] in 0..1."""
    scenes = [world.Scene("blue", "left", "large", "none"), world.Scene("checkered", "right", "small", "grayscale"),
              world.Scene("yellow", "center", "large", "wearing a hat"), world.Scene("polka dot", "center", "small", "inverted colors")]
    images = [world.render(identity, scene, size=128, seed=i)
              for domain in world.DOMAINS for i, (identity, scene) in enumerate(zip(world.eval_identities(domain, 4), scenes))]
    return torch.from_numpy(np.stack(images)).float() / 255


def test_shipped_files_are_small_fp16_with_configs_in_metadata():
    from safetensors import safe_open

    files = [models.WEIGHTS_DIR / models.BASE_FILE, *(models.WEIGHTS_DIR / f for f in models.VISION_FILES.values())]
    assert sum(f.stat().st_size for f in files) <= 18e6
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata()
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "clip", "vae", "identity_codes"}
        assert f.get_tensor("unet.out.2.weight").dtype == torch.float16
    configs = json.loads(meta["configs"])
    assert configs["unet"]["context_dim"] == 64 and configs["vae"]["embed_dim"] == 4


def test_types_are_the_hosts_sdxl_classes(world_models):
    m = world_models
    assert type(m.patcher.model) is comfy.model_base.SDXL
    assert m.patcher.model.model_type == comfy.model_base.ModelType.V_PREDICTION
    assert isinstance(m.clip, comfy.sd.CLIP) and isinstance(m.vae, comfy.sd.VAE)
    assert isinstance(m.clip_vision, comfy.clip_vision.ClipVisionModel)
    assert m.vision_encoder == "miniworld-vit-trained"  # the default: what the shipped nested weights use
    for module in (m.patcher.model.diffusion_model, m.clip.cond_stage_model, m.vae.first_stage_model, m.clip_vision.model):
        assert next(module.parameters()).dtype == torch.float32
    n_unet = sum(p.numel() for p in m.patcher.model.diffusion_model.parameters())
    assert 2e6 < n_unet < 5e6


def test_nested_attention_finds_the_cross_attention_layers(world_models):
    keys = list(core.attn2_layers(world_models.patcher.model.diffusion_model))
    assert len(keys) == 8
    assert keys[0] == ("input", 3, 0) and ("middle", 0, 0) in keys and keys[-1] == ("output", 4, 0)


def test_text_encoder_is_sdxls_layout_behind_the_real_tokenizer(world_models):
    clip = world_models.clip
    for word in ("person", "dog"):
        assert len(clip.tokenizer.clip_l.tokenizer(word)["input_ids"]) == 3  # BOS, one token, EOS
    tokens = clip.tokenize("a photo of a large dog on the left, on a red background")
    assert tokens["l"][0][6][0] == clip.tokenizer.clip_l.tokenizer("dog")["input_ids"][1]
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 32)
    other = clip.encode_from_tokens(clip.tokenize("a photo of a large person on the left, on a red background"))
    assert (cond - other).abs()[0, 6].mean() > 0.1  # BOS a photo of a large [dog]: the subject word changes its own token's context


@torch.no_grad()
def test_vae_round_trip_shapes_quality_and_latent_scale(world_models, renders):
    vae = world_models.vae
    latents = vae.encode(renders)
    assert latents.shape == (8, 4, 16, 16)
    scaled = world_models.patcher.model.process_latent_in(latents)  # what the UNet sees: ~unit variance
    assert 0.7 < float(scaled.std()) < 1.4 and abs(float(scaled.mean())) < 0.3
    decoded = vae.decode(latents)
    assert decoded.shape == (8, 128, 128, 3)
    mse = ((decoded.float() - renders) ** 2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(1 / mse)).mean())
    assert psnr > PSNR_FLOOR_DB, f"VAE round trip {psnr:.2f} dB"


def test_host_sampler_runs_the_unet_at_128px(world_models):
    m = world_models
    positive = m.clip.encode_from_tokens_scheduled(m.clip.tokenize("a photo of a large dog in the center, on a red background"))
    negative = m.clip.encode_from_tokens_scheduled(m.clip.tokenize(""))
    latent = torch.zeros(1, 4, 16, 16)  # EmptyLatentImage at 128x128
    noise = comfy.sample.prepare_noise(latent, 0)
    samples = comfy.sample.sample(m.patcher, noise, 4, 4.0, "euler", "normal", positive, negative, latent, seed=0, disable_pbar=True)
    image = m.vae.decode(samples)
    assert image.shape == (1, 128, 128, 3) and torch.isfinite(image).all()


def test_clip_vision_variants_encode_reference_photos():
    reference = torch.from_numpy(world.render_reference(world.eval_identities("pet", 1)[0], size=64)).float()[None] / 255
    for name in models.VISION_FILES.values():
        clip_vision, encoder = models.load_vision(models.WEIGHTS_DIR / name)
        tokens = clip_vision.encode_image(reference)["last_hidden_state"]
        assert tokens.shape == (1, 65, 64) and encoder.startswith("miniworld-vit")


def test_missing_or_corrupt_files_name_the_retrain_command(tmp_path):
    with pytest.raises(ValueError, match=r"python -m miniworld.train_base unet"):
        models.load_world(tmp_path)
    broken = tmp_path / models.BASE_FILE
    broken.write_bytes((models.WEIGHTS_DIR / models.BASE_FILE).read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"unreadable .*train_base unet"):
        models.load_base(broken)


def test_loading_is_strict(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = models.WEIGHTS_DIR / models.BASE_FILE
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    del tensors["vae.decoder.conv_out.bias"]
    save_file(tensors, str(tmp_path / models.BASE_FILE), metadata=meta)
    with pytest.raises(ValueError, match=r"vae weights do not match.*decoder.conv_out.bias"):
        models.load_base(tmp_path / models.BASE_FILE)


def test_loader_node_schema_and_outputs(world_models):
    node = pack_module("nodes.world_loader").LoadMiniWorld
    schema = node.define_schema()
    assert schema.node_id == "NestedAttentionMiniWorldLoader" and schema.display_name == "Load Mini World (demo)"
    assert schema.category == "nested_attention/demo world" and "not SDXL" in schema.description
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP", "VAE", "CLIP_VISION"]
    patcher, clip, vae, clip_vision = node.execute("random").result
    assert type(patcher.model) is comfy.model_base.SDXL and isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE) and isinstance(clip_vision, comfy.clip_vision.ClipVisionModel)
    assert node.execute("random").result[0] is patcher  # cached: graphs load it many times
    with pytest.raises(ValueError, match="unknown vision variant"):
        node.execute("nope")


def test_identity_codes_keep_the_row_norm_and_tell_identities_apart():
    from miniworld.identity_codes import IdentityCodes, from_tensors, save_tensors

    torch.manual_seed(0)
    codes = IdentityCodes(64)
    row = torch.nn.functional.normalize(torch.randn(64), dim=0) * 11  # a subject-word row of the world's text encoder
    a, b = world.eval_identities("person", 2)
    ra, rb = codes.identity_row(row, a), codes.identity_row(row, b)
    assert torch.allclose(ra.norm(), row.norm()) and torch.allclose(rb.norm(), row.norm())  # a text value's scale: α stays meaningful
    assert (ra - rb).norm() > 0.1 * row.norm() and (ra - row).norm() > 0.1 * row.norm()
    again = from_tensors(save_tensors(codes))
    assert torch.equal(again.identity_row(row, a), ra)
    assert from_tensors({}) is None  # a base file from before the codes


def test_shipped_base_carries_its_identity_codes():
    codes = models.load_identity_codes(models.WEIGHTS_DIR / models.BASE_FILE)
    assert codes is not None
    assert {d: tuple(t.shape) for d, t in codes.tables.items()} == {
        d: (sum(len(v) for _, v in world.ATTRIBUTES[d]), 2 * models.TEXT_WIDTH) for d in world.DOMAINS}
