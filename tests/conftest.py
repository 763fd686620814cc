"""Shared test setup: the host imported headless on CPU once, the pack's nodes registered the way
ComfyUI registers them, and tiny random stand-ins for SDXL, its encoders and nested-attention files."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from training.host import host_nodes, setup_comfyui

# before any test module imports comfy: model_management reads the CPU flag at import
setup_comfyui(cpu=True)
# the host's `nodes` module now, while the host comes first on sys.path: in a checkout named
# custom_nodes/ComfyUI-NestedAttention pytest later puts the pack root (and its nodes/) in front
host_nodes()
if "OMP_NUM_THREADS" not in os.environ:
    # the tiny models' ops are too small to gain from threads, and on a shared 2-core machine
    # oversubscribed threads made a UNet forward 10x slower (1.3 s vs 0.11 s measured)
    torch.set_num_threads(1)

FACES = "nested_attention_faces.safetensors"
PETS = "nested_attention_pets.safetensors"
IMAGES = ("person.png", "dog.png")


@pytest.fixture(scope="session")
def node_classes() -> dict:
    """The host's node table with its built-in nodes, this pack's nodes and the tiny loaders."""
    from training import tiny
    from workflows import run

    classes = run.load_nodes()
    tiny.register_tiny_nodes()
    return classes


@pytest.fixture(scope="session")
def tiny_models():
    from training import tiny

    return SimpleNamespace(unet=tiny.tiny_sdxl(0), clip=tiny.tiny_clip(0), clip_vision=tiny.tiny_clip_vision(0), vae=tiny.tiny_vae(0))


@pytest.fixture(scope="session")
def tiny_files(node_classes, tiny_models, tmp_path_factory):
    """Tiny weights files (faces binds 'person', pets binds 'dog') and reference photos where the host looks
    for them (the runner's own --tiny environment), and a private output dir; all restored afterwards."""
    import folder_paths

    from training import tiny
    from workflows import run

    outputs = tmp_path_factory.mktemp("output")
    old_output = folder_paths.get_output_directory()
    with run.temporary_folders() as (models, inputs):
        for name in (FACES, PETS):
            tiny.tiny_weights_for_name(models / name, tiny_models.unet)
        for name in IMAGES:
            tiny.save_test_image(inputs / name)
        folder_paths.set_output_directory(str(outputs))
        try:
            yield SimpleNamespace(models=models, input=inputs, output=outputs)
        finally:
            folder_paths.set_output_directory(old_output)
