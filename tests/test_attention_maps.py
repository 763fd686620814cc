"""Attention Maps (paper Figs. 4–5): the recorded maps equal hand-computed float64 softmax weights of the
queries and keys a real UNet evaluation produces (captured by an attn2 patch Apply chains), regions where
the word is attended come out brighter and in the right place, the node runs in the host's executor and
moves the progress bar, and every bad input is refused by message."""
from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from PIL import Image

from progress_helpers import recorded_progress
from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

from training import tiny  # noqa: E402

core = pack_module("nested_core")
maps_core = pack_module("nested_core.maps")
maps_mod = pack_module("nodes.attention_maps")
patch_mod = pack_module("nodes.patch")
apply_mod = pack_module("nodes.apply")
prompt_mod = pack_module("nodes.prompt")
subject_mod = pack_module("nodes.subject")

H, W = 8, 12  # latent (not square: a transposed map cannot pass); 64x96 pixels
PERSON = 5  # "a photo of a person": BOS a photo of a person -> token index 5
DOWNSCALE = {"input": {4: 2, 5: 2, 7: 4, 8: 4}, "middle": {0: 4}, "output": {0: 4, 1: 4, 2: 4, 3: 2, 4: 2, 5: 2}}


# --- the math, alone (float64) ------------------------------------------------------------------------------------
def hand_word_weights(q, k, positions, lam, heads):
    """P[q, word] by the definition, per head then averaged: float64, one query at a time."""
    b, n, c = q.shape
    d = c // heads
    out = torch.zeros(b, n, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            qh, kh = q[i, :, h * d : (h + 1) * d], k[i, :, h * d : (h + 1) * d]
            logits = qh @ kh.T / d**0.5  # [n, T]
            logits[:, positions] = torch.maximum(logits[:, positions], lam * logits[:, positions])
            out[i] += logits.softmax(-1)[:, positions].sum(-1) / heads
    return out


def hand_nested_mix(q, keys, colors, heads):
    b, n, c = q.shape
    d = c // heads
    mix = torch.zeros(b, n, colors.shape[1], dtype=torch.float64)
    for h in range(heads):
        a = (q[..., h * d : (h + 1) * d] @ keys[:, h * d : (h + 1) * d].T / d**0.5).softmax(-1)  # [b, n, M]
        mix += a @ colors.double() / heads
    return mix


def nested_kv(positions, m, c, lam, seed):
    g = torch.Generator().manual_seed(seed)
    return core.NestedKV(positions=positions, keys=torch.randn(m, c, generator=g, dtype=torch.float64),
                         values=torch.randn(m, c, generator=g, dtype=torch.float64), lam=lam)


def test_word_and_nested_weights_equal_the_definition_in_float64():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 10, 32, generator=g, dtype=torch.float64), torch.randn(2, 154, 32, generator=g, dtype=torch.float64)
    person, dog = nested_kv([3, 80], 6, 32, 2.5, 1), nested_kv([7], 5, 32, 1.0, 2)  # a word repeated to 154 tokens
    weights = maps_core.word_weights(q, k, [person, dog], heads=4, query_chunk=3)
    assert weights.dtype == torch.float64 and weights.shape == (2, 2, 10)
    # each subject's weight uses every subject's λ (both boosts renormalise the softmax)
    both = [3, 80, 7]
    b, n, c = q.shape
    expect = torch.zeros(2, 2, 10, dtype=torch.float64)
    for i in range(b):
        for h in range(4):
            logits = q[i, :, h * 8 : (h + 1) * 8] @ k[i, :, h * 8 : (h + 1) * 8].T / 8**0.5
            logits[:, [3, 80]] = torch.maximum(logits[:, [3, 80]], 2.5 * logits[:, [3, 80]])
            p = logits.softmax(-1)
            expect[0, i] += p[:, [3, 80]].sum(-1) / 4
            expect[1, i] += p[:, [7]].sum(-1) / 4
    torch.testing.assert_close(weights, expect, rtol=1e-12, atol=1e-12)
    assert set(both) <= set(range(154))
    colors = torch.rand(6, 3, generator=g)
    mix, top = maps_core.nested_mix(q, person, colors, heads=4, query_chunk=4)
    torch.testing.assert_close(mix, hand_nested_mix(q, person.keys, colors, 4), rtol=1e-12, atol=1e-12)
    raw = maps_core.nested_weights(q, person, heads=4)
    assert raw.shape == (2, 10, 6) and torch.allclose(raw.sum(-1), torch.ones(2, 10, dtype=torch.float64))
    torch.testing.assert_close(top, hand_nested_mix(q, person.keys, torch.eye(6), 4).amax(-1), rtol=1e-12, atol=1e-12)


def test_token_colors_are_a_deterministic_pca_in_0_1():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(40, 16, generator=g) @ torch.diag(torch.linspace(3, 0.1, 16))
    colors = maps_core.token_colors(tokens)
    assert colors.shape == (40, 3) and colors.min() == 0 and colors.max() == 1
    # a PCA: unchanged by shifting or scaling all tokens
    torch.testing.assert_close(maps_core.token_colors(5 + 2 * tokens), colors, atol=1e-5, rtol=0)
    assert torch.equal(maps_core.token_colors(tokens[:1]), torch.full((1, 3), 0.5))
    # one direction of variance: red orders the tokens along it, green and blue stay grey
    line = torch.arange(4.0)[:, None] * torch.ones(1, 8)
    assert torch.allclose(maps_core.token_colors(line), torch.tensor([[0.0, 0.5, 0.5], [1 / 3, 0.5, 0.5], [2 / 3, 0.5, 0.5], [1.0, 0.5, 0.5]]))


# --- on the tiny SDXL, through the host's sampler ---------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    model, clip = tiny.tiny_sdxl(0), tiny.tiny_clip(0)
    weights = tiny.make_tiny_weights(model, num_queries=8)
    subject = subject_mod.encode_subject(weights, tiny.tiny_clip_vision(0), tiny.test_image("person.png")[None]).with_lambda(2.0)
    positive = prompt_mod.bind_subject(prompt_mod.encode_prompt(clip, "a photo of a person"), subject, "person", 0)
    return model, positive, subject


class QKCapture:
    """Another attn2 patch, applied before Apply Nested Attention (which chains it): keeps every layer's q and k."""

    def __init__(self):
        self.calls = {}

    def __deepcopy__(self, memo):  # ComfyUI 0.3.x deep-copies model_options on clone: keep one recorder
        return self

    def __call__(self, q, k, v, extra_options):
        key = (*extra_options["block"], extra_options["block_index"])
        self.calls[key] = (q.detach().double(), k.detach().double(), extra_options["n_heads"])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    def install(self, model):
        m = model.clone()
        for key in core.attn2_layers(m.model.diffusion_model):
            m.set_model_attn2_replace(self, *key)
        return m


def test_recorded_maps_equal_the_softmax_weights_of_the_real_queries_and_keys(setup):
    model, positive, subject = setup
    capture = QKCapture()
    patched = apply_mod.apply_nested_attention(capture.install(model))
    latent = {"samples": torch.randn(2, 4, H, W, generator=torch.Generator().manual_seed(3))}
    recorder = maps_mod.record_attention(patched, positive, latent, percent=0.4, seed=7)
    assert positive[0][1][patch_mod.BINDINGS][0].positions == (PERSON,)
    assert set(recorder.maps) == set(capture.calls) and len(recorder.maps) == 70
    colors = maps_core.token_colors(subject.tokens)
    for key, calls in recorder.maps.items():
        (call,) = calls  # one call per layer: cfg 1 runs the positive only
        q, k, heads = capture.calls[key]
        s = DOWNSCALE[key[0]][key[1]]
        assert call.word.shape == call.top.shape == (2, -(-H // s), -(-W // s)) and call.mix.shape == (*call.word.shape, 3)
        assert call.seen == (H, W)
        expect = hand_word_weights(q, k, [PERSON], 2.0, heads)
        torch.testing.assert_close(call.word.reshape(2, -1).double(), expect, rtol=0, atol=2e-6)
        nested_keys = subject.weights.project(key, subject.tokens.double())[0]
        expect_mix = hand_nested_mix(q, nested_keys, colors, heads)
        torch.testing.assert_close(call.mix.reshape(2, -1, 3).double(), expect_mix, rtol=0, atol=2e-6)
        expect_top = hand_nested_mix(q, nested_keys, torch.eye(len(colors)), heads).amax(-1)  # the strongest token's weight
        torch.testing.assert_close(call.top.reshape(2, -1).double(), expect_top, rtol=0, atol=2e-6)
    # the evaluation was at the asked sigma, on the latent noised with the asked seed: another seed, other maps
    other = maps_mod.record_attention(patched, positive, latent, percent=0.4, seed=8)
    assert not torch.equal(other.maps[("middle", 0, 0)][0].word, recorder.maps[("middle", 0, 0)][0].word)


def test_the_recorder_changes_nothing_the_patch_computes(setup):
    model, positive, subject = setup
    patch = maps_mod.nested_patch(apply_mod.apply_nested_attention(model))
    binding = positive[0][1][patch_mod.BINDINGS][0]
    recorder = maps_mod.AttentionRecorder(patch, PERSON, maps_core.token_colors(subject.tokens))
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 24, 64, generator=g), torch.randn(1, 77, 64, generator=g), torch.randn(1, 77, 64, generator=g)
    options = {"block": ("input", 4), "block_index": 0, "n_heads": 4, "uuids": ["u"], "activations_shape": [1, 64, 4, 6],
               "original_shape": [1, 4, H, W], patch_mod.UUID_MAP: {"u": (binding,)}}
    with patch.run(), recorder.run():
        assert torch.equal(recorder(q, k, v, dict(options)), patch(q, k, v, dict(options)))
    assert list(recorder.maps) == [("input", 4, 0)]


def test_regions_where_the_word_is_attended_are_brighter_in_place(setup):
    """Queries of the left third of a 4x6 grid point at the word's key, the rest away from it: the word map, the
    MASK and the picture are high exactly there (a transposed or mirrored map fails)."""
    model, positive, subject = setup
    patch = maps_mod.nested_patch(apply_mod.apply_nested_attention(model))
    binding = positive[0][1][patch_mod.BINDINGS][0]
    recorder = maps_mod.AttentionRecorder(patch, PERSON, maps_core.token_colors(subject.tokens))
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(1, 77, 64, generator=g) * 0.3, torch.randn(1, 77, 64, generator=g)
    attended = torch.zeros(4, 6, dtype=torch.bool)
    attended[:, :2] = True  # left third
    q = torch.where(attended.reshape(1, 24, 1), 30 * k[:, PERSON : PERSON + 1], -30 * k[:, PERSON : PERSON + 1])
    for block in (("input", 4), ("output", 3)):
        options = {"block": block, "block_index": 0, "n_heads": 4, "uuids": ["u"], "activations_shape": [1, 64, 4, 6],
                   "original_shape": [1, 4, H, W], patch_mod.UUID_MAP: {"u": (binding,)}}
        with recorder.run():
            recorder(q, k, v, options)
    word = recorder.maps[("input", 4, 0)][0].word[0]  # [4, 6]
    assert word[attended].min() > 0.5 > 0.05 > word[~attended].max()
    groups = maps_mod.group_maps(recorder.maps, (H, W), (8 * H, 8 * W))
    assert list(groups) == ["input", "output"]  # only layers that ran
    pictures, _mixes, raw = maps_mod.render(groups, labels=False)
    assert pictures.shape == (2, 64, 96, 3) and raw.shape == (2, 64, 96)
    left, right = raw[:, :, :24], raw[:, :, 40:]  # away from the bilinear border at x = 32
    assert left.min() > 0.5 > 0.05 > right.max()
    assert pictures[:, :, :24].mean() > 3 * pictures[:, :, 40:].mean()  # bright where attended


# --- the node ---------------------------------------------------------------------------------------------------
def test_node_outputs_three_maps_per_latent_over_the_image_and_ticks_once_per_layer(setup):
    model, positive, _subject = setup
    patched = apply_mod.apply_nested_attention(model)
    image = torch.rand(1, 8 * H, 8 * W, 3, generator=torch.Generator().manual_seed(0))
    with recorded_progress() as ticks:
        out = maps_mod.AttentionMaps.execute(patched, positive, {"samples": torch.zeros(2, 4, H, W)}, 0.5, 0, 1, image)
    words, tokens, raw = out.result
    assert words.shape == tokens.shape == (6, 64, 96, 3) and raw.shape == (6, 64, 96)
    assert ticks == [(i, 71) for i in range(1, 72)]  # 70 cross-attention layers, then the drawing
    assert 0 < float(raw.max()) < 1 and words.min() >= 0 and words.max() <= 1
    plain = maps_mod.attention_maps(patched, positive, {"samples": torch.zeros(2, 4, H, W)}, labels=False)
    over = maps_mod.attention_maps(patched, positive, {"samples": torch.zeros(2, 4, H, W)}, image=image, labels=False)
    torch.testing.assert_close(over[0], 0.4 * image.expand(6, -1, -1, -1) + 0.6 * plain[0])  # drawn over the image
    torch.testing.assert_close(over[2], plain[2])  # the raw weights do not depend on it
    # labels (images ≥ 96 px wide) only in the top-left corner
    assert not torch.equal(words[:, :12, :48], over[0][:, :12, :48]) and torch.equal(words[:, 32:], over[0][:, 32:])


def test_node_in_a_graph_through_the_executor(node_classes, tiny_files):
    from workflows.run import run_prompt

    graph = {
        "ckpt": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "cv": {"class_type": "TinyCLIPVisionLoader", "inputs": {"seed": 0}},
        "w": {"class_type": "NestedAttentionLoader", "inputs": {"weights_name": "nested_attention_faces.safetensors"}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "person.png"}},
        "s": {"class_type": "NestedAttentionEncodeSubject", "inputs": {"nested_attention": ["w", 0], "clip_vision": ["cv", 0], "image": ["img", 0]}},
        "pos": {"class_type": "NestedAttentionEncodePrompt", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a person"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "b": {"class_type": "NestedAttentionBindToken", "inputs": {"conditioning": ["pos", 0], "subject": ["s", 0], "word": "person", "occurrence": 0}},
        "apply": {"class_type": "NestedAttentionApply", "inputs": {"model": ["ckpt", 0], "start_percent": 0.0, "end_percent": 1.0}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "seed": 1, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
                                                    "scheduler": "normal", "positive": ["b", 0], "negative": ["neg", 0],
                                                    "latent_image": ["latent", 0], "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "maps": {"class_type": "NestedAttentionAttentionMaps", "inputs": {"model": ["apply", 0], "positive": ["b", 0], "latent": ["ks", 0],
                                                                          "percent": 0.5, "seed": 1, "subject": 1, "image": ["dec", 0]}},
        "save_words": {"class_type": "SaveImage", "inputs": {"images": ["maps", 0], "filename_prefix": "maps_word"}},
        "save_tokens": {"class_type": "SaveImage", "inputs": {"images": ["maps", 1], "filename_prefix": "maps_tokens"}},
    }
    result = run_prompt(graph)
    assert len(result.images) == 6  # input, middle, output; word attention and nested tokens
    assert all(Image.open(p).size == (64, 64) for p in result.images)
    assert len({np.asarray(Image.open(p)).tobytes() for p in result.images}) == 6


def test_the_schema():
    schema = maps_mod.AttentionMaps.GET_SCHEMA()
    assert (schema.node_id, schema.category) == ("NestedAttentionAttentionMaps", "nested_attention")
    assert [o.display_name for o in schema.outputs] == ["word_attention", "nested_tokens", "word_weights"]
    assert all(i.tooltip for i in schema.inputs) and [i.id for i in schema.inputs if i.optional] == ["image"]


def test_bad_inputs_are_refused_by_message(setup):
    model, positive, _subject = setup
    latent = {"samples": torch.zeros(1, 4, H, W)}
    patched = apply_mod.apply_nested_attention(model)
    unbound = prompt_mod.encode_prompt(tiny.tiny_clip(0), "a photo of a person")
    import nodes as host_nodes

    area = host_nodes.ConditioningSetArea().append(positive, 48, 32, 0, 0, 1.0)[0]
    cases = [
        ((model, positive, latent), {}, "this model has no Apply Nested Attention: connect the MODEL output of Apply Nested Attention"),
        ((patched, unbound, latent), {}, "this conditioning has no bound subject: connect the conditioning from Bind Token"),
        ((patched, positive, latent), {"subject": 2}, r"subject 2 asked for, and the conditioning has 1 bound subject\(s\): set subject to 1..1"),
        ((patched, positive, {"samples": torch.zeros(4, H, W)}), {}, "the latent must be an image latent"),
        ((patched, positive, latent), {"image": torch.rand(3, 64, 96, 3)}, "the image batch has 3 image"),
        ((apply_mod.apply_nested_attention(model, 0.6, 1.0), positive, latent), {"percent": 0.3},
         "Apply Nested Attention is not active: its start_percent/end_percent leave this point out"),
        ((patched, area, latent), {}, r"evaluated on a 4x6 crop of the 8x12 latent: it covers only an area"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            maps_mod.attention_maps(*args, **kwargs)
    assert uuid  # (imported for the patch's uuid map in other tests)
