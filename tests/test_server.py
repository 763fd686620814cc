"""The pack as users install it: cloned into `ComfyUI/custom_nodes/ComfyUI-NestedAttention` (a folder
name that is not a Python identifier), loaded by ComfyUI's own server (`main.py --cpu`), a graph queued
over HTTP; and this test suite and the demo run from inside that checkout."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from PIL import Image

from comfy_server import PACK_DIR_NAME, Server, build_root

PACK_NODES = [
    "NestedAttentionLoader", "NestedAttentionEncodePrompt", "NestedAttentionEncodeSubject", "NestedAttentionCombineSubjects",
    "NestedAttentionScale", "NestedAttentionBindToken", "NestedAttentionApply", "NestedAttentionSaveSubject", "NestedAttentionLoadSubject",
    "NestedAttentionAttentionMaps",
    "NestedAttentionMiniWorldLoader",
]
SINGLE = "nested_attention_single_subject.json"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(ComfyUI root holding the pack, tiny API prompts of the shipped workflows)."""
    root, _, tiny_prompts = build_root(tmp_path_factory.mktemp("install"), sys.executable)
    return root, tiny_prompts


@pytest.fixture(scope="module")
def server(installed):
    root, _ = installed
    server = Server(root, sys.executable)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_the_server_lists_the_pack_nodes_and_runs_a_graph_over_http(server, installed):
    for node_id in PACK_NODES:
        assert node_id in server.get(f"/object_info/{node_id}"), f"{node_id} is not registered:\n{server.log_tail()}"
    assert not server.import_failures()
    assert "nested_attention" in server.get("/models")

    _, tiny_prompts = installed
    entry = server.run_prompt(tiny_prompts[SINGLE])
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    assert len(images) == 1
    png = server.get(f"/view?filename={images[0]['filename']}&subfolder={images[0]['subfolder']}&type=output")
    image = Image.open(io.BytesIO(png))
    assert image.size[0] >= 64 and image.mode == "RGB"


def test_tests_and_demo_run_from_the_installed_checkout(installed, tmp_path):
    """pytest inside custom_nodes/ComfyUI-NestedAttention used to import the pack's nodes/ as the host's `nodes`."""
    root, _ = installed
    checkout = root / "custom_nodes" / PACK_DIR_NAME
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}  # the enclosing ComfyUI is found by itself
    env["OMP_NUM_THREADS"] = "1"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_graph.py", "-k", "single_subject or shipped"],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=600,
    )
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout.splitlines()[-1]
    demo = subprocess.run(
        [sys.executable, "-m", "workflows.run", "--tiny", f"workflows/{SINGLE}", "--output", str(tmp_path)],
        cwd=checkout, env=env, capture_output=True, text=True, timeout=300,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-3000:]
    assert list(tmp_path.glob("*.png"))
