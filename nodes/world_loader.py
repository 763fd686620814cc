"""Load Mini World (demo): the pack's own small base models, shipped in miniworld/weights/."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..miniworld.models import BASE_FILE, FORMAT, VISION_FILES, WEIGHTS_DIR, load_world
from .types import CATEGORY

log = logging.getLogger(__name__)
# how each shipped file is made again (docs/miniworld.md); `python -m miniworld.retrain all` makes every one
REBUILD = {BASE_FILE: "`python -m miniworld.train_base vae` then `python -m miniworld.train_base unet`",
           **{name: "`python -m miniworld.train_base vision`" for name in VISION_FILES.values()}}


def world_files_problem(vision) -> str | None:
    """Why the demo world cannot load with this vision variant, from the files' headers (None: it can). Run when
    the graph is queued; each message names the folder and the command that makes the file."""
    if not isinstance(vision, str):  # linked from another node: known only when it runs
        return None
    if vision not in VISION_FILES:
        return f"unknown vision variant {vision!r}; choose one of {list(VISION_FILES)}"
    from safetensors import SafetensorError, safe_open

    for name in (BASE_FILE, VISION_FILES[vision]):
        path = WEIGHTS_DIR / name
        fix = (f"it ships with the pack in miniworld/weights/ ({WEIGHTS_DIR}): restore it with `git checkout -- "
               f"miniworld/weights/{name}` in the pack's folder, or rebuild it with {REBUILD[name]}")
        if not path.is_file():
            return f"the demo world's file {name} is missing; {fix}"
        try:
            with safe_open(str(path), framework="pt") as f:
                found = (f.metadata() or {}).get("format")
        except (SafetensorError, OSError) as e:
            return f"the demo world's file {name} is unreadable ({e}); {fix}"
        if found != FORMAT:
            return f"the demo world's file {name} is not a mini-world file (format {found!r}, expected {FORMAT!r}); {fix}"
    return None


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
                io.Combo.Input("vision", options=list(VISION_FILES), default="trained",
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
    def validate_inputs(cls, vision) -> bool | str:
        # when the graph is queued: a missing world file is reported before anything loads
        return world_files_problem(vision) or True

    @classmethod
    def execute(cls, vision: str = "trained") -> io.NodeOutput:
        if vision not in VISION_FILES:
            raise ValueError(f"unknown vision variant {vision!r}; choose one of {list(VISION_FILES)}")
        world = load_world(WEIGHTS_DIR, vision=VISION_FILES[vision])  # cached; downstream nodes clone before patching
        log.info("mini world loaded (vision encoder %s)", world.vision_encoder)
        return io.NodeOutput(world.patcher, world.clip, world.vae, world.clip_vision)
