"""Bind Token's mask: the nested correction only inside it, exactly, at every one of the 70 layers of the
tiny SDXL (queries, keys, values and extra_options captured from a real sampling step), and in sampling."""
import pytest
import torch

from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

import comfy.sample  # noqa: E402
from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

from training import tiny  # noqa: E402

core = pack_module("nested_core")
patch_mod = pack_module("nodes.patch")
apply_mod = pack_module("nodes.apply")
prompt_mod = pack_module("nodes.prompt")

H, W = 8, 16  # latent; the tiny UNet's attn2 layers see 4x8 and 2x4 grids


def band(x, y):
    """The test mask's value at image fractions (x, y): 1 | ½ | 0 | 0 above, 1 below, in four columns; every
    grid cell of every layer lies wholly in one value, so the expected weight per query is exact."""
    column = min(int(x * 4), 3)
    return [1.0, 0.5, 0.0, 0.0 if y < 0.5 else 1.0][column]


def pixel_mask(height, width, fn=band):
    ys, xs = (torch.arange(n) + 0.5 for n in (height, width))
    return torch.tensor([[fn(x / width, y / height) for x in xs.tolist()] for y in ys.tolist()])[None]


def sample(model, positive, negative, *, height=H, width=W, steps=1, cfg=5.0):
    latent = torch.zeros(1, 4, height, width)
    noise = comfy.sample.prepare_noise(latent, 1)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=1, disable_pbar=True)


@pytest.fixture(scope="module")
def setup():
    model, clip = tiny.tiny_sdxl(0), tiny.tiny_clip(0)
    positive = prompt_mod.encode_prompt(clip, "a photo of a person and a dog")
    negative = prompt_mod.encode_prompt(clip, "")
    calls = []
    recorder = model.clone()

    def record(q, k, v, extra_options):
        calls.append((q, k, v, dict(extra_options)))
        return optimized_attention(q, k, v, extra_options["n_heads"])

    for key in core.attn2_layers(model.model.diffusion_model):
        recorder.set_model_attn2_replace(record, *key)
    sample(recorder, positive, negative)  # one step, cfg 5: every layer sees a cond and an uncond chunk
    return model, positive, negative, calls


def test_outside_the_mask_exactly_unpersonalised_inside_exactly_nested_at_every_layer(setup, monkeypatch):
    model, positive, _, calls = setup
    weights = tiny.make_tiny_weights(model, seed=1)
    gen = torch.Generator().manual_seed(0)
    person, dog = (patch_mod.Subject(weights, torch.randn(8, 64, generator=gen) * 3) for _ in range(2))
    mask = prompt_mod.region_mask(pixel_mask(8 * H, 8 * W))
    left = prompt_mod.region_mask(pixel_mask(8 * H, 8 * W, lambda x, y: float(x < 0.5)))
    right = prompt_mod.region_mask(pixel_mask(8 * H, 8 * W, lambda x, y: float(x >= 0.5)))
    cases = {
        "masked": (patch_mod.Binding(person, (5,), 77, mask),),
        "whole": (patch_mod.Binding(person, (5,), 77),),
        "dog_whole": (patch_mod.Binding(dog, (8,), 77),),
        "two_regions": (patch_mod.Binding(person, (5,), 77, left), patch_mod.Binding(dog, (8,), 77, right)),
    }
    patch = patch_mod.NestedAttentionPatch(layers=list(core.attn2_layers(model.model.diffusion_model)))
    resized = []
    monkeypatch.setattr(patch_mod.F, "interpolate", lambda *a, _f=patch_mod.F.interpolate, **kw: resized.append(kw["size"]) or _f(*a, **kw))
    kinds = set()
    assert len(calls) == 70
    with patch.run():
        for q, k, v, extra in calls:
            cond = extra["cond_or_uncond"].index(0)
            rows = q.shape[0] // len(extra["uuids"])
            part = slice(cond * rows, (cond + 1) * rows)
            base = patch(q, k, v, extra)
            out = {name: patch(q, k, v, {**extra, patch_mod.UUID_MAP: {extra["uuids"][cond]: b}}) for name, b in cases.items()}
            _, _, h, w = extra["activations_shape"]
            m = torch.tensor([band((i % w + 0.5) / w, (i // w + 0.5) / h) for i in range(h * w)])  # expected weight per query
            for name in cases:  # the unbound (negative) chunk is untouched
                assert torch.equal(torch.cat([out[name][:part.start], out[name][part.stop:]]), torch.cat([base[:part.start], base[part.stop:]]))
            masked, whole, cond_base = out["masked"][part], out["whole"][part], base[part]
            assert not torch.equal(whole[:, m == 0], cond_base[:, m == 0])  # the subject would change the 0 region
            assert torch.equal(masked[:, m == 0], cond_base[:, m == 0])  # bit for bit the unpersonalised output
            assert torch.equal(masked[:, m == 1], whole[:, m == 1])  # bit for bit the unmasked nested output
            if (m == 0.5).any():
                blend = cond_base[:, m == 0.5] + 0.5 * (whole[:, m == 0.5] - cond_base[:, m == 0.5])
                torch.testing.assert_close(masked[:, m == 0.5], blend, rtol=1e-6, atol=1e-6)
            # two subjects in two regions: each half is exactly that subject alone
            half = torch.arange(h * w) % w < w // 2
            assert torch.equal(out["two_regions"][part][:, half], whole[:, half])
            assert torch.equal(out["two_regions"][part][:, ~half], out["dog_whole"][part][:, ~half])
            kinds.add((h, w, tuple(sorted(set(m.tolist())))))
    assert kinds == {(4, 8, (0.0, 0.5, 1.0)), (2, 4, (0.0, 0.5, 1.0))}  # every layer size saw all three weights
    # each mask resized once per grid size per run (3 masks × 2 sizes), not once per layer call (70 × 4 cases)
    assert sorted(resized) == sorted([(4, 8), (2, 4)] * 3)
    assert patch.cache_nbytes == 0


def test_a_left_half_mask_changes_the_left_of_the_latent_far_more_than_the_right(setup):
    """Sampling the tiny SDXL: the patch changes only the left half (exactly, see above); the random UNet's own
    mixing (near-uniform self-attention, GroupNorm statistics over the whole image) carries part of that change to
    the right, so this is a ratio, not zero: measured 0.53 of the left's change, vs 0.98 without the mask."""
    model, _, negative, _ = setup
    positive = prompt_mod.encode_prompt(tiny.tiny_clip(0), "a photo of a person")
    weights = tiny.make_tiny_weights(model, alpha=None)
    # tokens near the prompt's own embedding of "person": a small correction, where the UNet is near linear
    near = positive[0][0][0, 5] + 0.1 * torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    subject = patch_mod.Subject(weights, near)
    patched = apply_mod.apply_nested_attention(model)
    height, width = 16, 32
    left_half = torch.zeros(1, 8 * height, 8 * width)
    left_half[..., : 4 * width] = 1
    plain = sample(model, positive, negative, height=height, width=width)
    masked = sample(patched, prompt_mod.bind_subject(positive, subject, "person", 0, left_half), negative, height=height, width=width)
    whole = sample(patched, prompt_mod.bind_subject(positive, subject, "person", 0), negative, height=height, width=width)

    def change(x, side):
        d = (x - plain).abs()
        return (d[..., : width // 2] if side == "left" else d[..., width // 2:]).mean().item()

    assert change(masked, "left") > 0.05
    assert change(masked, "right") < 0.6 * change(masked, "left")  # measured 0.53
    assert change(masked, "right") < 0.6 * change(whole, "right")  # measured 0.52: the unmasked subject changes the right twice as much
    assert change(masked, "left") > 0.9 * change(whole, "left")  # measured 0.96: and the left about as much as the masked one


def test_bind_token_mask_input_and_its_errors(setup):
    model, positive, _, calls = setup
    subject = patch_mod.Subject(tiny.make_tiny_weights(model), torch.zeros(8, 64))
    schema = prompt_mod.BindToken.GET_SCHEMA()
    (mask_input,) = [i for i in schema.inputs if i.id == "mask"]
    assert mask_input.optional and "where in the image" in mask_input.tooltip
    (binding,) = prompt_mod.BindToken.execute(positive, subject, "person", 0, torch.ones(64, 64)).result[0][0][1][patch_mod.BINDINGS]
    assert binding.mask.shape == (1, 64, 64) and binding.mask.dtype == torch.float32
    (unmasked,) = prompt_mod.BindToken.execute(positive, subject, "person", 0).result[0][0][1][patch_mod.BINDINGS]
    assert unmasked.mask is None  # unconnected: everywhere, as before
    for bad, message in [
        (torch.zeros(1, 64, 64), "the mask is 0 everywhere.*Load Image's mask of an image without alpha is all 0.*disconnect the mask"),
        (torch.full((64, 64), 2.0), "mask values must lie in 0..1 \\(got 2 to 2\\)"),
        (torch.ones(1, 1, 64, 64), "the mask must be a MASK \\[H, W\\] or \\[batch, H, W\\]"),
        (torch.ones(1, 0, 64), "the mask must be a MASK"),
    ]:
        with pytest.raises(ValueError, match=message):
            prompt_mod.bind_subject(positive, subject, "person", 0, bad)
    # a batch of masks must match the latent batch (one latent here)
    q, k, v, extra = calls[0]
    patch = patch_mod.NestedAttentionPatch()
    two = patch_mod.Binding(subject, (5,), 77, torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="mask holds 2 masks for a batch of 1 latents: give one mask"):
        patch(q, k, v, {**extra, patch_mod.UUID_MAP: {extra["uuids"][extra["cond_or_uncond"].index(0)]: (two,)}})


def test_the_grid_falls_back_to_the_latent_shape(setup):
    _, _, _, calls = setup
    for q, _, _, extra in calls:
        _, _, h, w = extra["activations_shape"]
        assert patch_mod._latent_grid(q.shape[1], {"original_shape": [2, 4, H, W]}) == (h, w)
    with pytest.raises(ValueError, match="needs the layer's image grid.*disconnect Bind Token's mask, or update ComfyUI"):
        patch_mod._latent_grid(7, {"original_shape": [1, 4, H, W]})
