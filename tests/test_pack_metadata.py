"""What ComfyUI and its registry read about the pack itself: one node-menu category for every node,
the pyproject.toml `[tool.comfy]` table as the host's own parser reads it, the icon, requirements.txt."""
from __future__ import annotations

import asyncio
from pathlib import Path

from training.host import load_pack, setup_comfyui

setup_comfyui(cpu=True)

ROOT = Path(__file__).resolve().parents[1]


def pack_nodes() -> list:
    async def node_list():
        return await (await load_pack().comfy_entrypoint()).get_node_list()

    return asyncio.run(node_list())


def test_every_node_is_in_the_nested_attention_category():
    schemas = {cls.GET_SCHEMA().node_id: cls.GET_SCHEMA() for cls in pack_nodes()}
    assert len(schemas) >= 10
    categories = {node_id: s.category for node_id, s in schemas.items()}
    assert all(c == "nested_attention" or c.startswith("nested_attention/") for c in categories.values()), categories
    assert categories["NestedAttentionLoader"] == "nested_attention"  # was "loaders", away from the rest of the pack
    assert categories["NestedAttentionMiniWorldLoader"] == "nested_attention/demo world"
    assert {c for node_id, c in categories.items() if node_id != "NestedAttentionMiniWorldLoader"} == {"nested_attention"}
