"""The shipped workflow files: generated from their specs, what the real frontend refuses or shows badly, what a
user needs to know (files, downloads, thumbnails), and each one converted, validated against the registered
node schemas and executed headless (the demo world's on its shipped files, the SDXL ones on tiny stand-ins).

(The same files in the real page: tests/frontend/check_in_browser.py; it needs Chromium.)
"""
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DIR = Path(__file__).resolve().parents[1] / "workflows"
WORKFLOWS = sorted(DIR.glob("*.json"))
NAMES = [p.name for p in WORKFLOWS]
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above `pos`
LOADER_FOLDERS = {"CheckpointLoaderSimple": "checkpoints", "CLIPVisionLoader": "clip_vision", "LoraLoader": "loras"}
FILE_WIDGETS = {"CheckpointLoaderSimple", "CLIPVisionLoader", "LoraLoader", "NestedAttentionLoader", "LoadImage"}


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.name)
def workflow(request):
    return json.loads(request.param.read_text())


def is_world(workflow: dict) -> bool:
    return any(n["type"] == "NestedAttentionMiniWorldLoader" for n in workflow["nodes"])


def note_text(workflow: dict) -> str:
    (note,) = [n for n in workflow["nodes"] if n["type"] == "Note"]
    return note["widgets_values"][0]


# --- the set of files ------------------------------------------------------------------------------------------
def test_every_spec_is_shipped_and_every_file_has_a_spec():
    from workflows.specs import WORKFLOWS as SPECS

    assert set(NAMES) == set(SPECS)
    assert {"nested_attention_single_subject.json", "nested_attention_two_subjects.json"} <= set(NAMES)


def test_each_job_has_a_world_and_an_sdxl_variant():
    from workflows.specs import WORKFLOWS as SPECS

    sdxl = {name: spec for name, spec in SPECS.items() if not spec.base.world}
    world = {name for name, spec in SPECS.items() if spec.base.world}
    assert len(sdxl) == len(world) >= 8
    assert {spec.twin for spec in sdxl.values()} == world  # each SDXL graph's thumbnail comes from its own world twin


def test_files_are_what_build_writes(node_classes):
    """`python -m workflows.build` reproduces every file byte for byte: the specs are the source, the files never drift."""
    from workflows.build import build, dumps

    stale = [name for name in NAMES if (DIR / name).read_text() != dumps(build(name))]
    assert not stale, f"rerun `python -m workflows.build`: {stale}"


# --- what the frontend refuses or shows badly ----------------------------------------------------------------------
def test_top_level_id_is_a_uuid_string(workflow):
    # a null id makes the frontend alert "Invalid workflow against zod schema" on every load
    uuid.UUID(workflow["id"])
    assert workflow["version"] == 0.4


def test_links_agree_with_node_slots(workflow):
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] == max(nodes) and workflow["last_link_id"] == max(link[0] for link in workflow["links"])
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]


def test_no_nodes_overlap(workflow):
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            overlap = min(a[3], b[3]) > max(a[1], b[1]) and min(a[4], b[4]) > max(a[2], b[2])
            assert not overlap, f"nodes {a[0]} and {b[0]} overlap"


def test_the_whole_graph_is_in_view_when_opened(workflow):
    """The saved view shows every node, title bar included, clear of the page's bars in a 1280x720 window, at a
    zoom where the frontend still draws text (tests/frontend checks the same in the real page)."""
    from workflows.build import LOD_SCALE, SAFE

    ds = workflow["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    assert LOD_SCALE <= scale <= 1.0
    left, top, right, bottom = (a + b for a, b in zip(SAFE, (-0.5, -0.5, 0.5, 0.5)))  # the offset is saved rounded
    for n in workflow["nodes"]:
        (x, y), (w, h) = n["pos"], n["size"]
        x0, y0, x1, y1 = (x + ox) * scale, (y - TITLE_HEIGHT + oy) * scale, (x + w + ox) * scale, (y + h + oy) * scale
        assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom, f"node {n['id']} ({n['type']}) is out of view"


def test_widgets_match_the_registered_schemas(workflow, node_classes):
    """Each node's saved widget values line up with its schema's widgets, as the page fills them (positionally)."""
    from workflows.run import VIRTUAL_NODES, _extra_widget_values, _input_specs, _is_widget

    for n in workflow["nodes"]:
        if n["type"] in VIRTUAL_NODES:
            continue
        specs = _input_specs(node_classes[n["type"]])
        expected = sum(1 + _extra_widget_values(name, kind, opts) for name, kind, opts in specs if _is_widget(kind, opts))
        assert len(n["widgets_values"]) == expected, f"node {n['id']} ({n['type']}): {n['widgets_values']}"
        sockets = [name for name, kind, opts in specs if not _is_widget(kind, opts)]
        assert [i["name"] for i in n["inputs"]] == sockets, f"node {n['id']} ({n['type']})"


# --- what a user needs to know -------------------------------------------------------------------------------------
def test_the_note_names_every_file_and_where_it_comes_from(workflow):
    text = note_text(workflow)
    files = {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in FILE_WIDGETS}
    missing = sorted(f for f in files if f not in text)
    assert not missing, f"the Note does not name {missing}"
    if is_world(workflow):
        assert "miniworld/weights" in text and "python -m workflows.world_inputs" in text
    else:
        assert "python -m training.train" in text and "huggingface.co" in text
    assert "Thumbnail:" in text


def test_sdxl_loaders_carry_download_metadata_the_frontend_reads(workflow):
    """node.properties.models [{name, url, directory}], as comfyui-workflow-templates writes it; the frontend's
    Missing Models dialog offers a download only for huggingface.co / civitai.com URLs and .safetensors names."""
    for n in workflow["nodes"]:
        models = n["properties"].get("models")
        if is_world(workflow) or n["type"] not in LOADER_FOLDERS:
            assert models is None, f"node {n['id']} ({n['type']}) names a download"
            continue
        (model,) = models
        assert model["name"] == n["widgets_values"][0] and model["name"].endswith(".safetensors")
        assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith(".safetensors")
        assert model["directory"] == LOADER_FOLDERS[n["type"]]


def test_every_workflow_has_its_thumbnail():
    """The frontend (1.32) shows a custom pack's template with `<name>.jpg` from the same folder."""
    for path in WORKFLOWS:
        thumbnail = path.with_suffix(".jpg")
        assert thumbnail.is_file(), f"no thumbnail: run `python -m workflows.build --thumbnails` ({thumbnail.name})"
        with Image.open(thumbnail) as image:
            assert image.format == "JPEG" and image.size == (512, 512)
    assert sorted(DIR.glob("*.jpg")) == sorted(p.with_suffix(".jpg") for p in WORKFLOWS)  # no stale ones


def test_the_world_photos_are_the_ones_the_world_workflows_read():
    from workflows.specs import WORLD
    from workflows.world_inputs import PHOTOS

    assert set(WORLD.photos.values()) == set(PHOTOS)


# --- each one runs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_photos(node_classes):
    from workflows.run import temporary_folders
    from workflows.world_inputs import write_photos

    with temporary_folders() as (_, input_dir):
        write_photos(input_dir)
        yield input_dir


@pytest.mark.parametrize("name", NAMES)
def test_runs_headless(name, world_photos, tmp_path):
    """Converted (ui_to_api), validated by the host against the registered schemas, executed by its executor."""
    from workflows.run import run_prompt, run_workflow, ui_to_api

    workflow = json.loads((DIR / name).read_text())
    if is_world(workflow):  # the shipped files, 4 steps: the graph and its files, not the picture
        prompt = ui_to_api(workflow)
        for node in prompt.values():
            if node["class_type"] == "KSampler":
                node["inputs"]["steps"] = 4
        result, side = run_prompt(prompt, tmp_path), 128
    else:  # tiny random stand-ins for SDXL, CLIP vision, LoRA, nested weights and photos
        result, side = run_workflow(DIR / name, tiny=True, output_dir=tmp_path, max_side=64, max_steps=1), 64
    batch = sum(1 for n in workflow["nodes"] if n["type"] == "KSampler")  # the λ sweep batches its three latents
    assert len(result.images) == batch
    for path in result.images:
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        assert image.shape == (side, side, 3) and image.std() > 5
