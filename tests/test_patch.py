"""The patch on a real host with the tiny SDXL (real 70 attn2 keys): exactness, isolation, caching, chaining."""
import math
import uuid

import pytest
import torch

from training.host import host_nodes, pack_module, setup_comfyui

setup_comfyui(cpu=True)

from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

from training import tiny  # noqa: E402
from sampling_helpers import encode, sample  # noqa: E402

core = pack_module("nested_core")
patch_mod = pack_module("nodes.patch")
apply_mod = pack_module("nodes.apply")
prompt_mod = pack_module("nodes.prompt")

SDXL_KEYS = (
    [("input", i, j) for i in (4, 5) for j in range(2)]
    + [("input", i, j) for i in (7, 8) for j in range(10)]
    + [("middle", 0, j) for j in range(10)]
    + [("output", i, j) for i in (0, 1, 2) for j in range(10)]
    + [("output", i, j) for i in (3, 4, 5) for j in range(2)]
)


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_sdxl(0)


@pytest.fixture(scope="module")
def model64():
    """float64 UNet: for exact equalities (float32 sampling amplifies rounding to ~1e-3)."""
    return tiny.build_tiny_sdxl(0, dtype=torch.float64)


@pytest.fixture(scope="module")
def clip():
    return tiny.tiny_clip(0)


def double(conditioning):
    return [[c.double(), {**e, "pooled_output": e["pooled_output"].double()}] for c, e in conditioning]




def identity_subject(weights, conditioning, position, m=6):
    """Subject tokens = m copies of the prompt's own embedding at the bound token: with W_V̆ = to_v, v*_q = V[s*]."""
    return patch_mod.Subject(weights=weights, tokens=conditioning[0][0][0, position].expand(m, -1).clone())


def test_the_70_sdxl_layer_keys_in_execution_order(model):
    assert list(core.attn2_layers(model.model.diffusion_model)) == SDXL_KEYS
    assert len(SDXL_KEYS) == core.SDXL_LAYER_COUNT


def test_encode_prompt_matches_clip_text_encode(clip):
    nodes = host_nodes()

    text = "a photo of a person on a beach, " * 10  # 90 tokens: two chunks
    ours = encode(clip, text)
    stock = nodes.CLIPTextEncode().encode(clip, text)[0]
    assert ours[0][0].shape == (1, 154, 64)
    assert torch.equal(ours[0][0], stock[0][0]) and torch.equal(ours[0][1]["pooled_output"], stock[0][1]["pooled_output"])


def test_nested_value_equal_to_text_value_leaves_sampling_unchanged(model64, clip):
    """With v*_q = V[s*], λ = 1, α = 1 the patched sampler gives the unpatched result."""
    model = model64
    weights = tiny.make_tiny_weights(model, alpha=1.0)
    positive = double(encode(clip, "a photo of a person in a garden"))
    negative = encode(clip, "blurry")
    bound = prompt_mod.bind_subject(positive, identity_subject(weights, positive, 5), "person", 0)
    unpatched = sample(model, positive, negative)
    patched = sample(apply_mod.apply_nested_attention(model), bound, negative)
    assert unpatched.abs().max() > 1
    torch.testing.assert_close(patched, unpatched, rtol=1e-6, atol=1e-6)
    # the same binding with real nested values changes the image
    real = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(6, 64, dtype=torch.float64) * 3), "person", 0)
    assert (sample(apply_mod.apply_nested_attention(model), real, negative) - unpatched).abs().max() > 1e-2


def test_negative_and_unbound_rows_are_bit_identical_in_sampling(model, clip):
    weights = tiny.make_tiny_weights(model)
    positive = encode(clip, "a person")
    negative = encode(clip, "low quality, " * 10)  # 77 tokens vs positive 77: and a 154-token case below
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(16, 64)), "person", 0)
    patched_model = apply_mod.apply_nested_attention(model)
    for neg in (negative, encode(clip, "low quality, " * 30)):
        plain, nested = [], []
        sample(model, positive, neg, record=plain, batch=2, steps=1)
        sample(patched_model, bound, neg, record=nested, batch=2, steps=1)
        assert torch.equal(plain[0][1], nested[0][1])  # first step: same input, the negative's prediction is untouched
        assert not torch.equal(plain[0][0], nested[0][0])  # while the bound positive is personalised
    # cfg 1: only the positive runs; unbound, it is bit-identical to the unpatched model
    assert torch.equal(sample(model, positive, negative, cfg=1.0, steps=2), sample(patched_model, positive, negative, cfg=1.0, steps=2))


@pytest.mark.parametrize("order", [[0, 1], [1, 0], [1, 0, 0], [0, 1, 0]])
def test_rows_follow_their_uuid_in_any_chunk_order(model, order):
    """Direct call with the host's protocol: only chunks whose uuid carries bindings change."""
    weights = tiny.make_tiny_weights(model)
    subject = patch_mod.Subject(weights, torch.randn(8, 64))
    patch = patch_mod.NestedAttentionPatch(layers=SDXL_KEYS)
    uuids = [uuid.uuid4() for _ in order]
    bound = order.index(0)  # the first positive chunk is the bound one; other chunks are unbound/negative
    rows, heads, inner = 2, 8, 128  # the tiny UNet's input 7 width
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows * len(order), 16, inner, generator=g)
    k = torch.randn(rows * len(order), 154, inner, generator=g)
    v = torch.randn(rows * len(order), 154, inner, generator=g)
    extra = {
        "block": ("input", 7), "block_index": 3, "n_heads": heads, "dim_head": inner // heads, "attn_precision": None,
        "cond_or_uncond": order, "uuids": uuids, "sigmas": torch.tensor([5.0]),
        patch_mod.UUID_MAP: {uuids[bound]: (patch_mod.Binding(subject, (4,), 77),)},
    }
    with patch.run():
        out = patch(q, k, v, extra)
        with torch.inference_mode():  # the sampler's mode: bound rows are written into the base output in place
            assert torch.equal(patch(q, k, v, extra), out)
    reference = optimized_attention(q, k, v, heads)
    for j in range(len(order)):
        part = slice(j * rows, (j + 1) * rows)
        if j == bound:
            assert not torch.equal(out[part], reference[part])
            want = core.nested_attention_naive(
                q[part].double(), k[part].double(), v[part].double(),
                [core.NestedKV([4, 81], *(t.double() for t in weights.project(("input", 7, 3), subject.tokens)), alpha=weights.config.alpha)],
                heads=heads,
            )
            torch.testing.assert_close(out[part].double(), want, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(out[part], reference[part])


def test_projections_computed_once_per_run_and_dropped_after(model, clip, monkeypatch):
    w_person = tiny.make_tiny_weights(model, seed=1)
    w_pet = tiny.make_tiny_weights(model, seed=2, bound_word="dog")
    calls = []
    for w in (w_person, w_pet):
        original = w.project
        monkeypatch.setattr(w, "project", lambda key, tokens, _o=original: calls.append(key) or _o(key, tokens))
    positive = encode(clip, "a person with a dog")
    positive = prompt_mod.bind_subject(positive, patch_mod.Subject(w_person, torch.randn(8, 64)), "person", 0)
    positive = prompt_mod.bind_subject(positive, patch_mod.Subject(w_pet, torch.randn(8, 64)), "", 0)
    patched = apply_mod.apply_nested_attention(model)
    sample(patched, positive, encode(clip, ""), steps=4)
    assert sorted(calls) == sorted(SDXL_KEYS * 2)  # 70 layers × 2 subjects, not × steps × cond rows
    patch = patched.model_options["transformer_options"]["patches_replace"]["attn2"][SDXL_KEYS[0]]
    assert patch.cache_nbytes == 0  # nothing kept on the device after the run


def test_chains_an_earlier_attn2_patch(model64, clip):
    model = model64
    seen = []

    def earlier(q, k, v, extra_options):
        seen.append(extra_options["block"])
        return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    first = model.clone()
    for key in SDXL_KEYS:
        first.set_model_attn2_replace(earlier, *key)
    weights = tiny.make_tiny_weights(model, alpha=1.0)
    positive, negative = double(encode(clip, "a person")), encode(clip, "")
    identity = prompt_mod.bind_subject(positive, identity_subject(weights, positive, 2), "person", 0)
    both = apply_mod.apply_nested_attention(first)
    # nested values = V[s*]: the result is the earlier patch's alone, so it was called and kept
    torch.testing.assert_close(sample(both, identity, negative), sample(first, positive, negative), rtol=1e-5, atol=1e-5)
    assert seen and not torch.equal(sample(first, positive, negative), sample(model, positive, negative))


def test_start_end_percent_gates_by_sigma(model, clip):
    weights = tiny.make_tiny_weights(model)
    positive, negative = encode(clip, "a person"), encode(clip, "")
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(8, 64) * 3), "person", 0)
    plain, late = [], []
    sample(model, positive, negative, record=plain, steps=4)
    sample(apply_mod.apply_nested_attention(model, 0.5, 1.0), bound, negative, record=late, steps=4)
    assert torch.equal(plain[0][0], late[0][0])  # step 1 (sigma above the start) untouched
    assert not torch.equal(plain[-1][0], late[-1][0])


def test_weights_for_another_model_are_refused_before_sampling(model, clip):
    weights = tiny.make_tiny_weights(model)
    weights.config.layers = dict(list(weights.config.layers.items())[:10])
    positive = prompt_mod.bind_subject(encode(clip, "a person"), patch_mod.Subject(weights, torch.randn(8, 64)), "person", 0)
    with pytest.raises(ValueError, match="made for a model with 10 cross-attention layers.*this model has 70"):
        sample(apply_mod.apply_nested_attention(model), positive, encode(clip, ""))


def test_apply_twice_and_bad_window_are_refused(model):
    once = apply_mod.apply_nested_attention(model)
    with pytest.raises(ValueError, match="already has Apply Nested Attention"):
        apply_mod.apply_nested_attention(once)
    with pytest.raises(ValueError, match="start_percent ≤ end_percent"):
        apply_mod.apply_nested_attention(model, 0.8, 0.2)


def test_apply_refuses_a_non_sdxl_model():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(
        use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4, out_channels=4,
        model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1], num_head_channels=16, num_heads=-1, context_dim=64,
        use_temporal_attention=False, use_temporal_resblock=False,
    ))
    sd15 = comfy.model_patcher.ModelPatcher(config.get_model({}), mm.get_torch_device(), mm.unet_offload_device())
    with pytest.raises(ValueError, match="needs an SDXL model; this one is BaseModel"):
        apply_mod.apply_nested_attention(sd15)


def test_lambda_must_be_at_least_one(model):
    subject = patch_mod.Subject(tiny.make_tiny_weights(model), torch.randn(8, 64))
    assert subject.with_lambda(2.5).lam == 2.5 and subject.lam == 1.0
    for bad in (0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="λ must be a finite number ≥ 1"):
            subject.with_lambda(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_the_model_dtype(clip, dtype):
    """Half-precision UNet: projections and nested values follow the model's dtype, softmax stays float32."""
    model = tiny.build_tiny_sdxl(0, dtype=dtype)
    weights = tiny.make_tiny_weights(model)
    seen = []
    original = weights.project
    weights.project = lambda key, tokens: seen.append(tokens.dtype) or original(key, tokens)
    positive, negative = encode(clip, "a person"), encode(clip, "")
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(8, 64) * 3), "person", 0)
    patched = sample(apply_mod.apply_nested_attention(model), bound, negative, steps=2)
    plain = sample(model, positive, negative, steps=2)
    assert set(seen) == {dtype} and len(seen) == 70
    assert torch.isfinite(patched).all() and (patched - plain).abs().max() > 1e-2


def test_projection_cache_is_per_device_and_safe_under_threads(model):
    """Newer hosts sample one run on several GPUs from threads sharing the patch: each device gets its own
    projections, and concurrent calls agree with a single-threaded run ("meta" stands in for a second device)."""
    import threading

    weights = tiny.make_tiny_weights(model)
    subject = patch_mod.Subject(weights, torch.randn(8, 64, generator=torch.Generator().manual_seed(0)))
    patch = patch_mod.NestedAttentionPatch(layers=list(core.attn2_layers(model.model.diffusion_model)))
    keys = sorted(patch.layers)
    cpu, meta = torch.empty(0), torch.empty(0, device="meta")
    with patch.run():
        expected = {key: patch.projections(subject, key, cpu) for key in keys}
    results, errors = {}, []

    def worker(like, name):
        try:
            for key in keys:
                results[(name, key)] = patch.projections(subject, key, like)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with patch.run():
        threads = [threading.Thread(target=worker, args=(like, f"{like.device.type}-{i}")) for i in range(3) for like in (cpu, meta)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for (name, key), (k, v) in results.items():
            assert k.device.type == v.device.type == name.split("-")[0]  # never another device's entry
            if k.device.type == "cpu":
                assert torch.equal(k, expected[key][0]) and torch.equal(v, expected[key][1])
        # one entry per (layer, device) plus the tokens per device, whatever the interleaving
        assert len(patch._cache) == 2 * (len(keys) + 1)
