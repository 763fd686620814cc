"""The cross-attention layers of a UNet, named the way the host names them.

A layer key is ``(block, block_id, transformer_index)``, e.g. ``("input", 4, 1)``:
the same 3-tuple the host uses to look up an attn2 replace patch. Keys are
derived from the module tree, never hard-coded, so a smaller model built with
the same code (the tiny test UNet) gets its own, correct set. On SDXL there
are 70 of them.
"""
from __future__ import annotations

import re

from torch import nn

LayerKey = tuple[str, int, int]

BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2}
SDXL_LAYER_COUNT = 70

# module paths inside the diffusion model:
#   input_blocks.4.1.transformer_blocks.0.attn2   -> ("input", 4, 0)
#   middle_block.1.transformer_blocks.3.attn2     -> ("middle", 0, 3)   (one index fewer: the host calls it block 0)
#   output_blocks.2.1.transformer_blocks.9.attn2  -> ("output", 2, 9)
_ATTN2_PATH = re.compile(
    r"^(?:.*\.)?(?:(?P<block>input_blocks|output_blocks)\.(?P<id>\d+)|middle_block)\.\d+"
    r"\.transformer_blocks\.(?P<index>\d+)\.attn2$"
)
_BLOCK_NAMES = {"input_blocks": "input", "output_blocks": "output", None: "middle"}


def attn2_layers(diffusion_model: nn.Module) -> dict[LayerKey, nn.Module]:
    """Every text cross-attention module of a UNet, by layer key, in execution order."""
    found: dict[LayerKey, nn.Module] = {}
    for path, module in diffusion_model.named_modules():
        match = _ATTN2_PATH.match(path)
        if match is None:
            continue
        block = _BLOCK_NAMES[match["block"]]
        block_id = int(match["id"] or 0)
        key = (block, block_id, int(match["index"]))
        if key in found:
            raise ValueError(f"two cross-attention modules map to layer key {key} ({path})")
        found[key] = module
    return dict(sorted(found.items(), key=lambda kv: (BLOCK_ORDER[kv[0][0]], kv[0][1], kv[0][2])))


def layer_name(key: LayerKey) -> str:
    """'input_4_1': the key as a state-dict-safe name (no dots)."""
    block, block_id, index = key
    return f"{block}_{block_id}_{index}"


def parse_layer_name(name: str) -> LayerKey:
    block, block_id, index = name.rsplit("_", 2)
    if block not in BLOCK_ORDER:
        raise ValueError(f"'{name}' is not a layer name like 'input_4_1'")
    return (block, int(block_id), int(index))
