"""Bindings through every host conditioning node a user chains after Bind Token: right positions, or an error
that names the fix before anything is sampled (graphs through the host's executor, tiny models)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FACES
from training.host import pack_module

SIDE = 64
BOUND_TEXT = "a photo of a person"  # "person" at token 5
OTHER_TEXT = "a person in the city at night"  # "person" at token 2: must never be bound through the other prompt


@pytest.fixture(scope="module")
def host(node_classes, tiny_files):
    return tiny_files


def graph(after_bind: dict | None = None, *, bind=True, apply=True, positive=None, start=0.0, end=1.0) -> dict:
    """loaders -> Encode Prompt -> [Bind Token] -> `after_bind` nodes -> KSampler (positive: `positive`, default the bind)."""
    g = {
        "ckpt": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "cv": {"class_type": "TinyCLIPVisionLoader", "inputs": {"seed": 0}},
        "w": {"class_type": "NestedAttentionLoader", "inputs": {"weights_name": FACES}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "person.png"}},
        "subject": {"class_type": "NestedAttentionEncodeSubject", "inputs": {"nested_attention": ["w", 0], "clip_vision": ["cv", 0], "image": ["img", 0]}},
        "pos": {"class_type": "NestedAttentionEncodePrompt", "inputs": {"clip": ["ckpt", 1], "text": BOUND_TEXT}},
        "other": {"class_type": "NestedAttentionEncodePrompt", "inputs": {"clip": ["ckpt", 1], "text": OTHER_TEXT}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "bind": {"class_type": "NestedAttentionBindToken", "inputs": {"conditioning": ["pos", 0], "subject": ["subject", 0], "word": "person", "occurrence": 0}},
        "apply": {"class_type": "NestedAttentionApply", "inputs": {"model": ["ckpt", 0], "start_percent": start, "end_percent": end}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0] if apply else ["ckpt", 0], "seed": 5, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": positive or ["bind", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "cond"}},
    }
    g.update(after_bind or {})
    if not bind:  # the same graph with the prompt unbound: every link to the Bind Token goes to the prompt
        del g["bind"], g["subject"], g["w"], g["img"], g["cv"]
        for node in g.values():
            for name, value in node["inputs"].items():
                if value == ["bind", 0]:
                    node["inputs"][name] = ["pos", 0]
    return g


def image(g: dict) -> np.ndarray:
    from workflows.run import run_prompt

    result = run_prompt(g)
    return np.asarray(Image.open(result.images[0]).convert("RGB")).astype(np.float64)


def refused(g: dict) -> str:
    from workflows.run import WorkflowError, run_prompt

    with pytest.raises(WorkflowError) as e:
        run_prompt(g)
    return str(e.value)


def node(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}


# --- kept, at the right positions ----------------------------------------------------------------------
def test_concat_after_bind_binds_only_the_bound_prompts_word(host):
    """ConditioningConcat(bound, other): the word stays at 5 of a 154-token context; the other prompt's "person"
    (index 77 + 2) and the repeat of 5 (index 82, the other prompt's "night" before the fix) stay unbound."""
    concat = {"cat": node("ConditioningConcat", conditioning_to=["bind", 0], conditioning_from=["other", 0])}
    via_node = image(graph(concat, positive=["cat", 0]))

    # the same context built by hand, bound at exactly index 5 of 154
    import comfy.sample
    from training import tiny

    patch_mod, apply_mod, subject_mod = (pack_module(f"nodes.{m}") for m in ("patch", "apply", "subject"))
    core = pack_module("nested_core")
    clip, model = tiny.tiny_clip(0), tiny.tiny_sdxl(0)
    weights = core.load_weights(host.models / FACES)
    photo = torch.from_numpy(np.asarray(Image.open(host.input / "person.png").convert("RGB"), dtype=np.float32) / 255)[None]
    subject = subject_mod.encode_subject(weights, tiny.tiny_clip_vision(0), photo)
    (bound, bound_extras), = clip.encode_from_tokens_scheduled(clip.tokenize(BOUND_TEXT))
    (other, _), = clip.encode_from_tokens_scheduled(clip.tokenize(OTHER_TEXT))
    positive = [[torch.cat([bound, other], 1), {**bound_extras, patch_mod.BINDINGS: (patch_mod.Binding(subject, (5,), 154),)}]]
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    latent = torch.zeros(1, 4, SIDE // 8, SIDE // 8)
    samples = comfy.sample.sample(apply_mod.apply_nested_attention(model), comfy.sample.prepare_noise(latent, 5), 2, 4.0, "euler",
                                  "normal", positive, negative, latent, seed=5, disable_pbar=True)
    by_hand = (tiny.tiny_vae(0).decode(samples)[0].detach().clamp(0, 1) * 255).round().numpy()  # as SaveImage rounds
    assert np.abs(via_node - by_hand).max() <= 1.0  # the same binding (PNG rounding only)
    assert np.abs(via_node - image(graph(concat, positive=["cat", 0], bind=False))).mean() > 1.0  # and it acts


@pytest.mark.parametrize("name,after", [
    ("combine", node("ConditioningCombine", conditioning_1=["bind", 0], conditioning_2=["other", 0])),
    ("average", node("ConditioningAverage", conditioning_to=["bind", 0], conditioning_from=["other", 0], conditioning_to_strength=0.7)),
    ("area", node("ConditioningSetArea", conditioning=["bind", 0], width=64, height=64, x=0, y=0, strength=1.0)),
    ("mask", node("ConditioningSetMask", conditioning=["bind", 0], mask=["mask", 0], strength=1.0, set_cond_area="default")),
    ("timestep range", node("ConditioningSetTimestepRange", conditioning=["bind", 0], start=0.0, end=0.8)),
])
def test_nodes_that_keep_the_bound_conditioning_keep_the_subject(host, name, after):
    nodes = {"after": after, "mask": node("SolidMask", value=1.0, width=SIDE, height=SIDE)}
    bound, unbound = image(graph(nodes, positive=["after", 0])), image(graph(nodes, positive=["after", 0], bind=False))
    assert np.abs(bound - unbound).mean() > 1.0, f"{name}: the subject was lost"


# --- refused before sampling, with the fix ------------------------------------------------------------------
@pytest.mark.parametrize("kind,extra", [("ConditioningConcat", {}), ("ConditioningAverage", {"conditioning_to_strength": 0.5})])
def test_bound_conditioning_as_the_second_input_is_refused(host, kind, extra):
    g = graph({"mix": node(kind, conditioning_to=["other", 0], conditioning_from=["bind", 0], **extra)}, positive=["mix", 0])
    message = refused(g)
    assert f"goes into {kind} (node mix) as conditioning_from" in message
    assert "Connect the bound conditioning to conditioning_to" in message


def test_zero_out_of_a_bound_conditioning_is_refused(host):
    message = refused(graph({"zero": node("ConditioningZeroOut", conditioning=["bind", 0])}, positive=["zero", 0]))
    assert "ConditioningZeroOut (node zero), which zeroes the prompt" in message


def test_a_sampler_without_apply_is_refused(host):
    """Item 9: the host gives the binding no hook of its own; Bind Token sees the graph and says what is missing."""
    message = refused(graph(apply=False))
    assert "sampled by KSampler (node ks), whose model does not pass through Apply Nested Attention" in message
    # through a model patch of the host that keeps a `model` input, the chain is followed to its loader
    g = graph(apply=False)
    g["shift"] = node("ModelSamplingDiscrete", model=["ckpt", 0], sampling="eps", zsnr=False)
    g["ks"]["inputs"]["model"] = ["shift", 0]
    assert "node ks" in refused(g)
    g["apply"]["inputs"]["model"] = ["shift", 0]
    g["ks"]["inputs"]["model"] = ["apply", 0]
    assert image(g).std() > 5  # with Apply on the chain it runs


def test_equal_start_and_end_percent_is_refused(host):
    message = refused(graph(start=0.4, end=0.4))
    assert "start_percent = end_percent = 0.4: the subject would be injected at no step" in message


def test_binding_an_embedding_says_what_to_do(host):
    g = graph()
    g["pos"]["inputs"]["text"] = "a photo of embedding:someone"
    g["bind"]["inputs"]["word"] = "embedding:someone"
    assert "'embedding:someone' is a textual-inversion embedding, not a word" in refused(g)
