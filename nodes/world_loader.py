"""Load Mini World (demo): the pack's own small base models, shipped in miniworld/weights/."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..miniworld.models import VISION_FILES, load_world
from .types import CATEGORY

log = logging.getLogger(__name__)


class LoadMiniWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionMiniWorldLoader",
            display_name="Load Mini World (demo)",
            category=CATEGORY + "/demo world",
            description=(
                "Loads the pack's small demo world models (not SDXL): a tiny SDXL-architecture UNet "
                "(v-prediction, 128x128 images), its dual text encoder, a VAE and a CLIP vision ViT, "
                "trained on the procedural persons-and-dogs world in miniworld/. For trying the nodes "
                "without downloading SDXL; images are 128x128 (empty latent 128x128)."
            ),
            inputs=[
                io.Combo.Input("vision", options=list(VISION_FILES), default="random",
                               tooltip="Which CLIP vision ViT: 'random' (seeded, frozen) or 'trained' (on the world's "
                                       "identities). Nested-attention weights must be trained with the same one."),
            ],
            outputs=[
                io.Model.Output(tooltip="The world's UNet (comfy.model_base.SDXL, v-prediction)."),
                io.Clip.Output(tooltip="SDXL's dual text encoder at toy widths, real SDXL tokenizer."),
                io.Vae.Output(tooltip="KL VAE: 128x128 px <-> 4x16x16 latents."),
                io.ClipVision.Output(tooltip="The reference-image encoder for Encode Subject."),
            ],
        )

    @classmethod
    def execute(cls, vision: str = "random") -> io.NodeOutput:
        if vision not in VISION_FILES:
            raise ValueError(f"unknown vision variant {vision!r}; choose one of {list(VISION_FILES)}")
        world = load_world(vision=VISION_FILES[vision])  # cached; downstream nodes clone before patching
        log.info("mini world loaded (vision encoder %s)", world.vision_encoder)
        return io.NodeOutput(world.patcher, world.clip, world.vae, world.clip_vision)
