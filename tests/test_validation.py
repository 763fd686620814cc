"""A missing or foreign model file is reported when the graph is queued: the host's own `validate_prompt`
(what the server runs on POST /prompt) calls the loaders' V3 `validate_inputs`, so nothing loads or runs
first. Load Nested Attention (weights files), Load Subject (subject files), Load Mini World (world files)."""
from __future__ import annotations

import asyncio
import re
import shutil
import uuid

import pytest
import torch
from safetensors.torch import save_file

from conftest import FACES
from training.host import pack_module

world_loader = pack_module("nodes.world_loader")
files_mod = pack_module("nodes.subject_files")


def validate(prompt: dict) -> tuple[bool, dict]:
    """(valid, {node id: [error details]}) as the host's validator reports them when a graph is queued."""
    import execution

    valid, _error, _outputs, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    return valid, {node_id: [e["details"] for e in info["errors"]] for node_id, info in node_errors.items()}


def only_error(prompt: dict, node_id: str) -> str:
    valid, errors = validate(prompt)
    assert not valid and list(errors) == [node_id], errors
    assert len(errors[node_id]) == 1, errors
    return errors[node_id][0]


# --- Load Nested Attention ----------------------------------------------------------------------------------
def weights_graph(weights_name: str) -> dict:
    """Load Nested Attention -> Encode Subject -> Save Subject (an output node, so the loader is validated)."""
    return {
        "w": {"class_type": "NestedAttentionLoader", "inputs": {"weights_name": weights_name}},
        "cv": {"class_type": "TinyCLIPVisionLoader", "inputs": {"seed": 0}},
        "img": {"class_type": "LoadImage", "inputs": {"image": "person.png"}},
        "s": {"class_type": "NestedAttentionEncodeSubject",
              "inputs": {"nested_attention": ["w", 0], "clip_vision": ["cv", 0], "image": ["img", 0]}},
        "save": {"class_type": "NestedAttentionSaveSubject", "inputs": {"subject": ["s", 0], "name": "validation"}},
    }


@pytest.fixture()
def weights_dir(tiny_files, tiny_models):
    """The tests' models/nested_attention, with foreign files added for one test and removed after it."""
    added = []

    def add(name: str, write) -> str:
        path = tiny_files.models / name
        write(path)
        added.append(path)
        return name

    yield add
    for path in added:
        path.unlink(missing_ok=True)


def test_a_good_weights_file_validates(tiny_files):
    assert validate(weights_graph(FACES)) == (True, {})


def test_missing_weights_file_is_reported_when_queued_naming_folder_and_command(tiny_files):
    message = only_error(weights_graph("no_such_file.safetensors"), "w")
    assert "no nested-attention weights file 'no_such_file.safetensors' in models/nested_attention" in message
    assert str(tiny_files.models) in message  # where it looked
    assert "python -m training.train" in message and "miniworld/weights/nested/" in message


def test_foreign_files_are_reported_when_queued(weights_dir, tiny_models):
    core = pack_module("nested_core")
    from training import tiny

    def baseline(path):  # a file the training CLI wrote for one of the paper's baselines (--mechanism)
        core.save_weights(tiny.make_tiny_weights(tiny_models.unet), path, extra_metadata={"mechanism": "global_v"})

    cases = {
        weights_dir("lora.safetensors", lambda p: save_file({"lora_unet_down.weight": torch.zeros(1)}, str(p))):
            r"not a nested-attention weights file .*looks like a LoRA.*python -m training.train",
        weights_dir("garbage.safetensors", lambda p: p.write_bytes(b"\x00" * 40)):
            "not a readable safetensors file",
        weights_dir("baseline.safetensors", baseline):
            "baseline.safetensors was trained for the 'global_v' baseline.*--mechanism nested",
    }
    for name, pattern in cases.items():
        assert re.search(pattern, only_error(weights_graph(name), "w")), name


def test_a_missing_weights_file_stops_the_run_before_any_node_executes(tiny_files):
    from workflows.run import WorkflowError, run_prompt

    with pytest.raises(WorkflowError) as failure:
        run_prompt(weights_graph("no_such_file.safetensors"))
    assert failure.value.status_messages == []  # nothing executed: no checkpoint or CLIP vision loaded first
    assert "no nested-attention weights file" in str(failure.value) and "node w" in str(failure.value)


# --- Load Subject ---------------------------------------------------------------------------------------------
@pytest.fixture()
def subjects_dir(tiny_files, tmp_path, monkeypatch):
    import folder_paths

    models = tmp_path / "models"
    folder = models / files_mod.FOLDER
    folder.mkdir(parents=True)
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, files_mod.FOLDER, ([], set()))
    yield folder
    folder_paths.filename_list_cache.pop(files_mod.FOLDER, None)


def subject_graph(subject_name: str) -> dict:
    return {
        "w": {"class_type": "NestedAttentionLoader", "inputs": {"weights_name": FACES}},
        "load": {"class_type": "NestedAttentionLoadSubject", "inputs": {"nested_attention": ["w", 0], "subject_name": subject_name}},
        "save": {"class_type": "NestedAttentionSaveSubject", "inputs": {"subject": ["load", 0], "name": "validation"}},
    }


def test_subject_files_are_checked_when_queued(subjects_dir, tiny_files):
    save_file({"tokens": torch.zeros(8, 64)}, str(subjects_dir / "good.safetensors"),
              metadata={"format": "nested-attention-subject", "format_version": "1", "lambda": "1.0"})
    shutil.copy(tiny_files.models / FACES, subjects_dir / "weights.safetensors")
    (subjects_dir / "garbage.safetensors").write_bytes(b"\x00" * 40)
    assert validate(subject_graph("good.safetensors")) == (True, {})  # the weights it needs are checked when it runs
    cases = {
        "missing.safetensors": "no subject file 'missing.safetensors' in models/nested_attention_subjects.*save one with Save Subject",
        "weights.safetensors": "not a subject file.*it is a nested-attention weights file: put it in models/nested_attention",
        "garbage.safetensors": "not a readable safetensors file.*save the subject again",
        "../outside.safetensors": "is not allowed: use a plain name",
    }
    for name, pattern in cases.items():
        assert re.search(pattern, only_error(subject_graph(name), "load")), name


# --- Load Mini World (demo) -----------------------------------------------------------------------------------
def world_graph(vision: str = "random") -> dict:
    return {
        "world": {"class_type": "NestedAttentionMiniWorldLoader", "inputs": {"vision": vision}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["world", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
    }


def test_the_shipped_world_validates(node_classes):
    assert validate(world_graph("random")) == (True, {})
    assert validate(world_graph("trained")) == (True, {})


def test_missing_or_foreign_world_files_are_reported_when_queued(node_classes, tmp_path, monkeypatch):
    shipped = world_loader.WEIGHTS_DIR
    monkeypatch.setattr(world_loader, "WEIGHTS_DIR", tmp_path)
    message = only_error(world_graph(), "world")
    assert "the demo world's file base.safetensors is missing" in message
    assert "git checkout -- miniworld/weights/base.safetensors" in message
    assert "python -m miniworld.train_base vae` then `python -m miniworld.train_base unet" in message

    (tmp_path / "base.safetensors").symlink_to(shipped / "base.safetensors")
    message = only_error(world_graph("trained"), "world")
    assert "vision_trained.safetensors is missing" in message and "python -m miniworld.train_base vision" in message

    save_file({"x": torch.zeros(1)}, str(tmp_path / "vision.safetensors"))
    assert "vision.safetensors is not a mini-world file" in only_error(world_graph("random"), "world")
    assert "unknown vision variant 'nope'" in only_error(world_graph("nope"), "world")
