"""The weights file format: round trip, and every way a file can be wrong, by message."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.host import pack_module

core = pack_module("nested_core")

LAYERS = {("input", 4, 0): 16, ("middle", 0, 0): 32, ("output", 3, 1): 16}


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = core.NestedConfig(
        layers=LAYERS, context_dim=24, vision_encoder="test-ViT", vision_dim=20, vision_tokens=10, num_queries=4,
        qformer_dim=16, qformer_depth=2, qformer_heads=4, **overrides,
    )
    return core.NestedAttentionModel(config)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "subject.safetensors"
    model = small_model(alpha=1.5, bound_word="dog", domain="pets")
    core.save_weights(model, path, extra_metadata={"training_args": "--steps 3"})
    return model, path


def test_round_trip_is_exact_and_keeps_the_config(saved):
    model, path = saved
    loaded = core.load_weights(path)
    assert loaded.config == model.config
    assert loaded.config.layers == LAYERS and loaded.config.alpha == 1.5 and loaded.config.bound_word == "dog"
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in loaded.parameters())


def test_documented_key_layout(saved):
    _, path = saved
    keys = set(load_file(path))
    assert {"to_k.input_4_0.weight", "to_v.middle_0_0.weight", "to_v.output_3_1.weight"} <= keys
    assert all(k.startswith(("qformer.", "to_k.", "to_v.")) for k in keys)
    assert load_file(path)["to_k.middle_0_0.weight"].shape == (32, 24)  # [inner, context_dim]


def test_alpha_none_survives(tmp_path):
    path = tmp_path / "w.safetensors"
    core.save_weights(small_model(alpha=None), path)
    assert core.load_weights(path).config.alpha is None


def test_projection_shapes_and_init_from_layers():
    model = small_model()
    tokens = torch.randn(7, 24)
    k, v = model.project(("middle", 0, 0), tokens)
    assert k.shape == v.shape == (7, 32)
    torch.testing.assert_close(k, tokens @ model.to_k["middle_0_0"].weight.T)


@pytest.mark.parametrize("queries", [16, 64, 256, 1024])
def test_qformer_gives_one_token_per_query(queries):
    config = core.NestedConfig(layers=LAYERS, context_dim=24, vision_dim=20, vision_tokens=10, num_queries=queries,
                               qformer_dim=16, qformer_depth=1, qformer_heads=2)
    out = core.NestedAttentionModel(config).encode(torch.randn(3, 10, 20))
    assert out.shape == (3, queries, 24) and torch.isfinite(out).all()


def test_encoder_rejects_other_clip_tokens():
    with pytest.raises(ValueError, match=r"expect test-ViT tokens \[B, 10, 20\]; got \[1, 257, 1280\]"):
        small_model().encode(torch.randn(1, 257, 1280))


def rewrite(path, tensors=None, metadata=None):
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header_len))["__metadata__"]
    tensors = load_file(path) if tensors is None else tensors
    save_file(tensors, path, metadata=meta if metadata is None else metadata(meta))


def test_foreign_file_is_named(tmp_path):
    path = tmp_path / "ip-adapter.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2, 2), "ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(core.WeightsFileError, match="not a nested-attention weights file.*IP-Adapter"):
        core.load_weights(path)


def test_corrupt_file_is_named(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(core.WeightsFileError, match="not a readable safetensors file.*corrupt or truncated"):
        core.load_weights(path)


def test_pickle_file_is_refused_not_loaded(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"a": torch.zeros(1)}, path)
    with pytest.raises(core.WeightsFileError, match="not a readable safetensors file"):
        core.load_weights(path)


def test_newer_format_asks_for_an_update(saved):
    _, path = saved
    rewrite(path, metadata=lambda m: {**m, "format_version": "99"})
    with pytest.raises(core.WeightsFileError, match="format version 99 is newer.*update the pack"):
        core.load_weights(path)


def test_missing_tensor_is_named(saved):
    _, path = saved
    tensors = load_file(path)
    del tensors["to_v.output_3_1.weight"]
    rewrite(path, tensors)
    with pytest.raises(core.WeightsFileError, match=r"missing \['to_v.output_3_1.weight'\]"):
        core.load_weights(path)


def test_wrong_shape_is_named(saved):
    _, path = saved
    tensors = load_file(path)
    tensors["to_k.input_4_0.weight"] = torch.zeros(8, 24)
    rewrite(path, tensors)
    with pytest.raises(core.WeightsFileError, match=r"to_k.input_4_0.weight has shape \[8, 24\], its config says \[16, 24\]"):
        core.load_weights(path)


def test_non_finite_weights_are_named(saved):
    _, path = saved
    tensors = load_file(path)
    tensors["to_k.input_4_0.weight"][0, 0] = float("nan")
    rewrite(path, tensors)
    with pytest.raises(core.WeightsFileError, match="NaN/inf.*diverged"):
        core.load_weights(path)


def test_malformed_config_is_named(saved):
    _, path = saved
    rewrite(path, metadata=lambda m: {**m, "config": "{not json"})
    with pytest.raises(core.WeightsFileError, match="'config' metadata is missing or malformed"):
        core.load_weights(path)


def test_failed_save_leaves_the_previous_file(saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()
    monkeypatch.setattr(core.weights, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        core.save_weights(model, path)
    assert path.read_bytes() == before


def test_equal_weights_make_byte_equal_files(saved, tmp_path):
    """safetensors writes metadata in hash-map order; the header is sorted so exports can be compared by hash."""
    model, _ = saved
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        core.save_weights(model, p, extra_metadata={"a": "1", "b": "2", "c": "3", "training_step": "7"})
    assert len({p.read_bytes() for p in paths}) == 1
    assert core.load_weights(paths[0]).config == model.config
