"""Whole graphs through the host's validator and PromptExecutor, on the tiny models: the pack's nodes
as a user wires them, the shipped workflow files, and what a failing graph reports."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACES, PETS
from training.host import host_nodes, pack_module

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SIDE = 64  # pixels: an 8x8 latent


# --- graph building -----------------------------------------------------------------------------------
def build_graph(
    *, text="a photo of a person", subjects=((FACES, "person.png", "person"),), apply=True, start=0.0, end=1.0,
    other_patch_scale=None, lam=None, seed=3,
) -> dict:
    """An API-format prompt: tiny loaders -> [Encode Subject -> (λ) -> Bind Token]* -> [other patch] -> [Apply] -> KSampler -> SaveImage
    (apply=False: no Apply and no binding, the base model's image of the same prompt)."""
    g = {
        "ckpt": {"class_type": "TinySDXLCheckpointLoader", "inputs": {"seed": 0}},
        "cv": {"class_type": "TinyCLIPVisionLoader", "inputs": {"seed": 0}},
        "pos": {"class_type": "NestedAttentionEncodePrompt", "inputs": {"clip": ["ckpt", 1], "text": text}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
    }
    positive = ["pos", 0]
    # without Apply the base model on the same prompt (Bind Token refuses a sampler whose model lacks Apply)
    for i, (weights, image, word) in enumerate(subjects if apply else ()):
        g[f"w{i}"] = {"class_type": "NestedAttentionLoader", "inputs": {"weights_name": weights}}
        g[f"img{i}"] = {"class_type": "LoadImage", "inputs": {"image": image}}
        g[f"s{i}"] = {"class_type": "NestedAttentionEncodeSubject",
                      "inputs": {"nested_attention": [f"w{i}", 0], "clip_vision": ["cv", 0], "image": [f"img{i}", 0]}}
        subject = [f"s{i}", 0]
        if lam is not None:
            g[f"lam{i}"] = {"class_type": "NestedAttentionScale", "inputs": {"subject": subject, "scale": lam}}
            subject = [f"lam{i}", 0]
        g[f"b{i}"] = {"class_type": "NestedAttentionBindToken",
                      "inputs": {"conditioning": positive, "subject": subject, "word": word, "occurrence": 0}}
        positive = [f"b{i}", 0]
    model = ["ckpt", 0]
    if other_patch_scale is not None:
        g["other"] = {"class_type": "TestAttn2Recorder", "inputs": {"model": model, "scale": other_patch_scale}}
        model = ["other", 0]
    if apply:
        g["apply"] = {"class_type": "NestedAttentionApply", "inputs": {"model": model, "start_percent": start, "end_percent": end}}
        model = ["apply", 0]
    g["latent"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}}
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
        "positive": positive, "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}}
    g["dec"] = {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "graph"}}
    return g


_RESULTS: dict[str, np.ndarray] = {}


def run_graph(graph: dict) -> np.ndarray:
    """The saved image [H, W, 3] (uint8) of a graph; identical graphs run once per session."""
    from workflows.run import run_prompt

    key = json.dumps(graph, sort_keys=True)
    if key not in _RESULTS:
        result = run_prompt(graph)
        assert len(result.images) == 1 and result.images[0].endswith(".png") and Path(result.images[0]).is_file()
        _RESULTS[key] = np.asarray(Image.open(result.images[0]).convert("RGB"))
    return _RESULTS[key]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


# --- another pack's attn2 replace patch (what Apply must chain, not overwrite) --------------------------
RECORDED: list[tuple] = []


def host_attn2_keys(diffusion_model) -> set[tuple[str, int, int]]:
    """Every attn2 key as the host looks it up, derived here independently of nested_core."""
    keys = set()
    for name, _ in diffusion_model.named_modules():
        parts = name.split(".")
        if parts[-1] != "attn2":
            continue
        if parts[0] == "middle_block":  # middle_block.1.transformer_blocks.i.attn2
            keys.add(("middle", 0, int(parts[3])))
        else:  # input_blocks.4.1.transformer_blocks.i.attn2
            keys.add((parts[0].split("_")[0], int(parts[1]), int(parts[4])))
    return keys


class Attn2Recorder:
    """Scales every attn2 output by `scale` and records which layer ran: a stand-in for another pack's patch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 4.0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model, scale):
        from comfy.ldm.modules.attention import optimized_attention

        def attn2(q, k, v, extra_options):
            RECORDED.append((*extra_options["block"], extra_options["block_index"]))
            return optimized_attention(q, k, v, extra_options["n_heads"]) * scale

        m = model.clone()
        for key in host_attn2_keys(m.model.diffusion_model):
            m.set_model_attn2_replace(attn2, *key)
        return (m,)


@pytest.fixture(scope="module")
def host(node_classes, tiny_files):
    nodes = host_nodes()

    nodes.NODE_CLASS_MAPPINGS["TestAttn2Recorder"] = Attn2Recorder
    yield tiny_files
    nodes.NODE_CLASS_MAPPINGS.pop("TestAttn2Recorder", None)


# --- the tiny models themselves ------------------------------------------------------------------------
def test_tiny_models_have_sdxl_layout(tiny_models):
    import comfy.model_base
    import torch

    from training import tiny

    unet = tiny_models.unet.model
    assert isinstance(unet, comfy.model_base.SDXL)
    keys = host_attn2_keys(unet.diffusion_model)
    assert len(keys) == 70
    assert set(pack_module("nested_core").attn2_layers(unet.diffusion_model)) == keys
    assert sum(p.numel() for p in unet.diffusion_model.parameters()) < 30e6

    clip = tiny_models.clip
    tokens = clip.tokenize("a photo of a person")
    assert [t[0] for t in tokens["l"][0][:7]] == [49406, 320, 1125, 539, 320, 2533, 49407]  # the real CLIP ids
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 32)
    long_prompt = clip.tokenize(" ".join(["person"] * 80))
    assert clip.encode_from_tokens(long_prompt).shape == (1, 154, 64)

    # in inference mode, as the host runs them: a graph run earlier in the session leaves the cached tiny models'
    # weights as inference tensors, which autograd-tracked calls refuse
    with torch.inference_mode():
        out = tiny_models.clip_vision.encode_image(torch.rand(2, 80, 96, 3))
        image = tiny_models.vae.decode(torch.randn(1, 4, 8, 8)).detach()
    assert out["last_hidden_state"].shape == (2, 50, 32)
    assert image.shape == (1, 64, 64, 3) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0

    # the same seed gives the same weights, another seed other weights
    a, b, c = (tiny.make_tiny_weights(tiny_models.unet, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.qformer.queries, b.qformer.queries) and not torch.equal(a.qformer.queries, c.qformer.queries)


# --- (i) one subject ----------------------------------------------------------------------------------------
def test_single_subject_changes_the_image(host):
    patched = run_graph(build_graph())
    plain = run_graph(build_graph(apply=False))
    assert patched.shape == (SIDE, SIDE, 3)
    assert plain.std() > 5  # a real (noise-like) image, not a blank one
    # the subject visibly changes the image...
    assert mean_abs_diff(patched, plain) > 2.0
    # ...and only while the patch is active: a window no step falls in (2 steps: σ_max and σ_min) gives exactly the unpatched image
    assert np.array_equal(run_graph(build_graph(start=0.3, end=0.6)), plain)


def test_lambda_changes_the_image(host):
    assert mean_abs_diff(run_graph(build_graph(lam=3.0)), run_graph(build_graph())) > 0.5


# --- (ii) two subjects, two weights files, one prompt ------------------------------------------------------
def test_two_subjects_on_one_prompt(host):
    text = "a photo of a person and a dog"
    person = (FACES, "person.png", "person")
    dog = (PETS, "dog.png", "")  # "": the pets weights' own trained word ('dog')
    both = run_graph(build_graph(text=text, subjects=(person, dog)))
    person_only = run_graph(build_graph(text=text, subjects=(person,)))
    dog_only = run_graph(build_graph(text=text, subjects=((PETS, "dog.png", "dog"),)))
    plain = run_graph(build_graph(text=text, subjects=(person, dog), apply=False))
    assert mean_abs_diff(both, plain) > 2.0
    # each binding contributes: dropping either one changes the image
    assert mean_abs_diff(both, person_only) > 0.5
    assert mean_abs_diff(both, dog_only) > 0.5


# --- (iii) together with another attn2 replace patch -------------------------------------------------------
def test_chains_after_another_attn2_patch(host, tiny_models):
    keys = host_attn2_keys(tiny_models.unet.model.diffusion_model)
    RECORDED.clear()
    both = run_graph(build_graph(other_patch_scale=0.5))
    # the earlier patch still runs on every one of the 70 layers under Apply
    assert set(RECORDED) == keys
    other_only = run_graph(build_graph(other_patch_scale=0.5, apply=False))
    nested_only = run_graph(build_graph())
    # its effect is kept: with Apply inactive the result is exactly the other patch's alone
    assert np.array_equal(run_graph(build_graph(other_patch_scale=0.5, start=0.3, end=0.6)), other_only)
    assert mean_abs_diff(both, nested_only) > 2.0  # the other patch's scaling is not overwritten
    assert mean_abs_diff(both, other_only) > 2.0  # and the subject is still added on top


# --- (iv) the shipped workflows ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nested_attention_single_subject.json", "nested_attention_two_subjects.json"])
def test_shipped_workflow_converts_and_runs_tiny(host, name, tmp_path):
    from workflows import run

    workflow = json.loads((WORKFLOWS / name).read_text())
    prompt = run.ui_to_api(workflow)
    by_type = {}
    for node in prompt.values():
        by_type.setdefault(node["class_type"], []).append(node["inputs"])
    # widgets map to the right names: the seed's control_after_generate value ("fixed") is skipped
    (ksampler,) = by_type["KSampler"]
    assert ksampler["seed"] == 42 and ksampler["steps"] == 30 and ksampler["sampler_name"] == "dpmpp_2m" and ksampler["denoise"] == 1.0
    assert by_type["EmptyLatentImage"] == [{"width": 1024, "height": 1024, "batch_size": 1}]
    assert by_type["CheckpointLoaderSimple"][0]["ckpt_name"] == "sd_xl_base_1.0.safetensors"
    assert "Note" not in by_type
    words = sorted(inputs["word"] for inputs in by_type["NestedAttentionBindToken"])
    if "two" in name:
        assert {i["weights_name"] for i in by_type["NestedAttentionLoader"]} == {FACES, PETS}
        assert words == ["dog", "person"]
        # the second Bind Token takes the first one's output
        first, second = sorted(by_type["NestedAttentionBindToken"], key=lambda i: i["word"] != "person")
        assert prompt[second["conditioning"][0]]["inputs"] is first
    else:
        assert words == ["person"] and "NestedAttentionScale" in by_type

    result = run.run_workflow(WORKFLOWS / name, tiny=True, output_dir=tmp_path, max_side=SIDE, max_steps=1)
    assert len(result.images) == 1
    image = np.asarray(Image.open(result.images[0]).convert("RGB"))
    assert image.shape == (SIDE, SIDE, 3) and image.std() > 5
    assert Path(result.images[0]).parent == tmp_path


def test_cli_says_tiny_runs_are_not_real_results(host, tmp_path, capsys):
    from workflows import run

    images = run.main([str(WORKFLOWS / "nested_attention_single_subject.json"), "--tiny", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert "tiny RANDOM built-in models" in out and "not a real result" in out
    assert len(images) == 1 and f"saved {images[0]}" in out
    side = run.TINY_MAX_SIDE
    assert Image.open(images[0]).size == (side, side)


# --- (v) failures report the node's message ------------------------------------------------------------------
def test_word_not_in_prompt_reports_the_node_error(host):
    from workflows.run import WorkflowError, run_prompt

    with pytest.raises(WorkflowError) as failure:
        run_prompt(build_graph(text="a photo of a cat"))
    errors = [data for event, data in failure.value.status_messages if event == "execution_error"]
    assert len(errors) == 1
    assert errors[0]["node_type"] == "NestedAttentionBindToken" and errors[0]["node_id"] == "b0"
    assert "'person' is not in the prompt" in errors[0]["exception_message"]
    assert "not in the prompt" in str(failure.value) and "NestedAttentionBindToken" in str(failure.value)


def test_missing_weights_file_names_the_node_and_file(host):
    from workflows.run import WorkflowError, run_prompt

    with pytest.raises(WorkflowError) as failure:
        run_prompt(build_graph(subjects=(("no_such_file.safetensors", "person.png", "person"),)))
    # 0.3.75 does not check V3 combo values at validation (newer hosts do): either stage must name both
    message = str(failure.value)
    assert "w0" in message and "no_such_file.safetensors" in message


def test_converter_handles_reroutes_primitives_notes_and_muted_nodes(node_classes):
    from workflows.run import WorkflowError, ui_to_api

    workflow = json.loads((WORKFLOWS / "nested_attention_single_subject.json").read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    ids = {n["type"]: n["id"] for n in workflow["nodes"]}
    ksampler, decode, ckpt = nodes[ids["KSampler"]], nodes[ids["VAEDecode"]], ids["CheckpointLoaderSimple"]
    links = workflow["links"]

    def add_node(node_id, type_, widgets, mode=0, inputs=()):
        workflow["nodes"].append({"id": node_id, "type": type_, "mode": mode, "widgets_values": widgets, "inputs": list(inputs), "outputs": []})

    # VAE through a Reroute
    vae_slot = next(i for i in decode["inputs"] if i["name"] == "vae")
    old = next(link for link in links if link[0] == vae_slot["link"])
    old[3], old[4] = 100, 0
    add_node(100, "Reroute", [], inputs=[{"name": "", "type": "*", "link": old[0]}])
    links.append([200, 100, 0, decode["id"], 1, "VAE"])
    vae_slot["link"] = 200
    # steps widget converted to an input, fed by a real node: the link wins
    add_node(101, "PrimitiveInt", [3])
    links.append([201, 101, 0, ksampler["id"], 4, "INT"])
    ksampler["inputs"].append({"name": "steps", "type": "INT", "widget": {"name": "steps"}, "link": 201})
    # seed fed by the frontend's PrimitiveNode: its value is already in the widget values
    add_node(102, "PrimitiveNode", [7, "fixed"])
    links.append([202, 102, 0, ksampler["id"], 5, "INT"])
    ksampler["inputs"].append({"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 202})
    add_node(103, "SaveImage", ["muted"], mode=2)

    prompt = ui_to_api(workflow, node_classes)
    inputs = prompt[str(ksampler["id"])]["inputs"]
    assert inputs["steps"] == ["101", 0] and inputs["seed"] == 42 and inputs["cfg"] == 5.0
    assert prompt[str(decode["id"])]["inputs"]["vae"] == [str(ckpt), 2]
    assert {"100", "102", "103"}.isdisjoint(prompt) and prompt["101"]["class_type"] == "PrimitiveInt"
    assert all(node["class_type"] != "Note" for node in prompt.values())

    nodes[ids["SaveImage"]]["mode"] = 4
    with pytest.raises(WorkflowError, match="bypassed"):
        ui_to_api(workflow, node_classes)
    add_node(104, "SomeUninstalledNode", [])
    with pytest.raises(WorkflowError, match="SomeUninstalledNode"):
        ui_to_api(workflow, node_classes)
