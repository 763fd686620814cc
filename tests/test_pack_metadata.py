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


def test_the_registry_table_as_comfyui_reads_it():
    from comfy_config import config_parser  # the host's own pyproject.toml reader (nodes.load_custom_node uses it)

    config = config_parser.extract_node_configuration(str(ROOT))
    comfy, project = config.tool_comfy, config.project
    assert comfy.publisher_id == "nested-attention" and comfy.display_name.startswith("Nested Attention")
    assert project.name and project.version.count(".") == 2 and project.license.file == "LICENSE"
    assert (ROOT / project.license.file).is_file()
    # the host the pack says it needs is the one its loader checks for
    assert project.supported_comfyui_version == f">={load_pack().OLDEST_HOST}"
    assert set(project.dependencies) == {"einops", "safetensors"}


def test_the_icon_is_a_small_png_in_the_repository():
    from PIL import Image

    from comfy_config import config_parser

    icon = config_parser.extract_node_configuration(str(ROOT)).tool_comfy.icon
    path = ROOT / icon
    assert icon == "docs/icon.png" and path.is_file()
    with Image.open(path) as image:  # the registry takes SVG, PNG, JPG or GIF up to 800 x 400
        assert image.format == "PNG" and image.size[0] <= 800 and image.size[1] <= 400 and image.size[0] == image.size[1]
    assert path.stat().st_size < 100_000


def test_requirements_never_touch_the_users_torch():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    packages = {line for line in lines if line}
    assert packages == {"einops", "safetensors"}
    assert not any(name in line.lower() for line in packages for name in ("torch", "xformers", "numpy"))


def test_troubleshooting_quotes_messages_the_pack_raises():
    """README's Troubleshooting is keyed by the words of the messages: each quoted fragment must be in the code."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Troubleshooting"):]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    source = "\n".join(p.read_text() for folder in ("nodes", "nested_core") for p in sorted((ROOT / folder).glob("*.py")))
    source += (ROOT / "__init__.py").read_text()
    fragments = [f for row in rows for f in re.findall(r"`([^`]+)`", row.split(" | ")[0])]
    assert len(rows) >= 20 and len(fragments) >= len(rows)
    missing = [f for f in fragments if f not in source]
    assert not missing, f"README Troubleshooting quotes words no message has: {missing}"
