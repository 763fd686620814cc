"""Static checks of the shipped workflow files: what the real frontend refuses or shows badly.

(The full check in the real frontend is tests/frontend/check_in_browser.py; it needs Chromium.)
"""
import json
import uuid
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[1] / "workflows").glob("*.json"))
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above `pos`


@pytest.fixture(params=WORKFLOWS, ids=lambda p: p.name)
def workflow(request):
    return json.loads(request.param.read_text())


def test_there_are_shipped_workflows():
    assert {p.name for p in WORKFLOWS} >= {"nested_attention_single_subject.json", "nested_attention_two_subjects.json"}


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
