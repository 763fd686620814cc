"""Node behaviour and every user error, by message (host objects, tiny models)."""
import asyncio
import sys
import os

import pytest
import torch
from safetensors.torch import save_file

from training.host import host_nodes, pack_module, setup_comfyui

setup_comfyui(cpu=True)

import folder_paths  # noqa: E402

from training import tiny  # noqa: E402

core = pack_module("nested_core")
patch_mod = pack_module("nodes.patch")
prompt_mod = pack_module("nodes.prompt")
subject_mod = pack_module("nodes.subject")
loader_mod = pack_module("nodes.loader")
extension_mod = pack_module("nodes.extension")


@pytest.fixture(scope="module")
def weights():
    return tiny.make_tiny_weights(tiny.tiny_sdxl(0), num_queries=8)


@pytest.fixture(scope="module")
def clip():
    return tiny.tiny_clip(0)


def encode(clip, text):
    return prompt_mod.EncodePrompt.execute(clip, text).result[0]


def images(n, seed=0):
    return torch.rand(n, 64, 64, 3, generator=torch.Generator().manual_seed(seed))


# --- Encode Subject ------------------------------------------------------------------------------
def test_encode_subject_runs_the_qformer_on_clip_last_layer_tokens(weights):
    clip_vision = tiny.tiny_clip_vision(0)
    subject = subject_mod.EncodeSubject.execute(weights, clip_vision, images(1)).result[0]
    vision = clip_vision.encode_image(images(1), crop=True)["last_hidden_state"]
    torch.testing.assert_close(subject.tokens, weights.encode(vision.float())[0])
    assert subject.lam == 1.0 and subject.weights is weights


def test_several_images_concatenate_tokens(weights):
    clip_vision = tiny.tiny_clip_vision(0)
    one = [subject_mod.encode_subject(weights, clip_vision, images(1, seed=s)) for s in (1, 2)]
    both = subject_mod.encode_subject(weights, clip_vision, torch.cat([images(1, seed=1), images(1, seed=2)]))
    assert both.tokens.shape == (16, 64)
    torch.testing.assert_close(both.tokens, torch.cat([one[0].tokens, one[1].tokens]))
    mixed = subject_mod.CombineSubjects.execute(one[0], one[1]).result[0]
    torch.testing.assert_close(mixed.tokens, both.tokens)


def test_combining_subjects_of_different_weights_is_refused(weights):
    other = tiny.make_tiny_weights(tiny.tiny_sdxl(0), seed=5)
    a, b = patch_mod.Subject(weights, torch.zeros(8, 64)), patch_mod.Subject(other, torch.zeros(8, 64))
    with pytest.raises(ValueError, match="same Load Nested Attention node"):
        subject_mod.CombineSubjects.execute(a, b)
    with pytest.raises(ValueError, match="different λ.*combine first, then set λ"):
        subject_mod.CombineSubjects.execute(a, a.with_lambda(2.0))


def test_empty_image_batch_is_refused(weights):
    with pytest.raises(ValueError, match="image batch is empty.*at least one reference photo"):
        subject_mod.encode_subject(weights, tiny.tiny_clip_vision(0), torch.zeros(0, 64, 64, 3))


def test_wrong_clip_vision_names_the_expected_encoder():
    expects_vit_h = tiny.make_tiny_weights(tiny.tiny_sdxl(0), clip_vision_tokens=257, clip_vision_dim=1280, vision_encoder="CLIP-ViT-H-14")
    with pytest.raises(ValueError, match="expect the CLIP vision encoder CLIP-ViT-H-14 \\(1280 wide, 257 tokens\\).*gives 32 wide, 50 tokens"):
        subject_mod.encode_subject(expects_vit_h, tiny.tiny_clip_vision(0), images(1))


def test_attention_scale_sets_lambda_per_subject(weights):
    subject = patch_mod.Subject(weights, torch.zeros(8, 64))
    scaled = subject_mod.AttentionScale.execute(subject, 3.0).result[0]
    assert scaled.lam == 3.0 and subject.lam == 1.0 and scaled.tokens is subject.tokens


# --- Bind Token ----------------------------------------------------------------------------------
def test_bind_finds_the_word_and_keeps_other_entries(weights, clip):
    subject = patch_mod.Subject(weights, torch.zeros(8, 64))
    cond = encode(clip, "a photo of a person")
    bound = prompt_mod.BindToken.execute(cond, subject, "", 0).result[0]  # "" = the weights' word, "person"
    (binding,) = bound[0][1][patch_mod.BINDINGS]
    assert binding.positions == (5,) and binding.context_len == 77 and binding.subject is subject
    assert torch.equal(bound[0][0], cond[0][0]) and patch_mod.BINDINGS not in cond[0][1]  # input untouched


def test_two_subjects_on_one_prompt_and_nth_occurrence(weights, clip):
    pet = tiny.make_tiny_weights(tiny.tiny_sdxl(0), seed=3, bound_word="dog")
    cond = encode(clip, "a person, a dog and another person")
    cond = prompt_mod.bind_subject(cond, patch_mod.Subject(weights, torch.zeros(8, 64)), "Person", 2)
    cond = prompt_mod.bind_subject(cond, patch_mod.Subject(pet, torch.zeros(8, 64)), "", 0)
    person, dog = cond[0][1][patch_mod.BINDINGS]
    assert person.positions == (8,) and dog.positions == (5,)  # BOS a person , a dog and another person


@pytest.mark.parametrize(
    "text, word, occurrence, message",
    [
        ("a photo of a man", "person", 0, "the word 'person' is not in the prompt"),
        ("a photomaker man", "photomaker", 0, "'photomaker' is 2 CLIP tokens.*single-token word"),
        ("a person", "person", 2, "has 'person' 1 time"),
    ],
)
def test_bind_errors(weights, clip, text, word, occurrence, message):
    with pytest.raises(ValueError, match=message):
        prompt_mod.bind_subject(encode(clip, text), patch_mod.Subject(weights, torch.zeros(8, 64)), word, occurrence)


def test_bind_needs_the_nested_prompt_encoder(weights, clip):
    nodes = host_nodes()

    stock = nodes.CLIPTextEncode().encode(clip, "a person")[0]
    with pytest.raises(ValueError, match="no prompt tokens.*'Encode Prompt \\(Nested Attention\\)'"):
        prompt_mod.bind_subject(stock, patch_mod.Subject(weights, torch.zeros(8, 64)), "person", 0)


def test_bind_refuses_an_edited_conditioning_and_a_taken_token(weights, clip):
    cond = encode(clip, "a person")
    concatenated = [[torch.cat([c, c], dim=1), e] for c, e in cond]
    subject = patch_mod.Subject(weights, torch.zeros(8, 64))
    with pytest.raises(ValueError, match="has 154 tokens but its prompt had 77.*bind the subject first"):
        prompt_mod.bind_subject(concatenated, subject, "person", 0)
    once = prompt_mod.bind_subject(cond, subject, "person", 0)
    with pytest.raises(ValueError, match="already bound"):
        prompt_mod.bind_subject(once, subject, "person", 0)


def test_bind_refuses_weights_of_another_context_width(clip):
    sdxl_sized = core.NestedAttentionModel(core.NestedConfig(layers={("input", 4, 0): 16}, context_dim=2048, vision_dim=8,
                                                             vision_tokens=4, num_queries=2, qformer_dim=8, qformer_depth=1, qformer_heads=2))
    with pytest.raises(ValueError, match="made for a 2048-wide text context.*gives 64"):
        prompt_mod.bind_subject(encode(clip, "a person"), patch_mod.Subject(sdxl_sized, torch.zeros(2, 2048)), "person", 0)


# --- Loader --------------------------------------------------------------------------------------
def test_loader_registers_its_folder_and_keeps_extra_paths(tmp_path, monkeypatch):
    extra = tmp_path / "extra_models"  # as extra_model_paths.yaml would add before the pack loads
    extra.mkdir()
    folder_paths.add_model_folder_path("nested_attention", str(extra))
    nodes = asyncio.run(extension_mod.NestedAttentionExtension().get_node_list())
    assert {n.GET_SCHEMA().node_id for n in nodes} >= {
        "NestedAttentionLoader", "NestedAttentionEncodeSubject", "NestedAttentionBindToken", "NestedAttentionScale", "NestedAttentionApply",
    }
    paths, extensions = folder_paths.folder_names_and_paths["nested_attention"]
    assert str(extra) in paths and os.path.join(folder_paths.models_dir, "nested_attention") == paths[0]
    assert ".safetensors" in extensions
    tiny.save_tiny_weights(extra / "mine.safetensors", num_queries=8)
    save_file({"lora_unet_down.weight": torch.zeros(1)}, extra / "a_lora.safetensors")
    assert {"mine.safetensors", "a_lora.safetensors"} <= set(folder_paths.get_filename_list("nested_attention"))
    loaded = loader_mod.LoadNestedAttention.execute("mine.safetensors").result[0]
    assert loaded.config.num_queries == 8 and len(loaded.config.layers) == 70
    with pytest.raises(core.WeightsFileError, match="looks like a LoRA"):
        loader_mod.LoadNestedAttention.execute("a_lora.safetensors")


def test_an_older_host_gets_one_message_naming_the_version_to_install(monkeypatch):
    from training.host import load_pack

    pack = load_pack()
    assert pack.host_problem() is None and hasattr(pack, "comfy_entrypoint")
    import comfyui_version

    monkeypatch.setitem(sys.modules, "comfy_api.latest", None)  # a host from before the V3 node API
    message = pack.host_problem()
    assert message.startswith(f"ComfyUI-NestedAttention needs ComfyUI {pack.OLDEST_HOST} or newer")
    assert f"this ComfyUI is {comfyui_version.__version__} and lacks comfy_api.latest" in message
