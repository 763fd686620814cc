"""Where the world's model files live and what they are called: host-free, so argument parsers and the study can
name them without importing ComfyUI (miniworld.models, which loads them, imports the host)."""
from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
BASE_FILE = "base.safetensors"
VISION_FILES = {"random": "vision.safetensors", "trained": "vision_trained.safetensors"}
VISION_NAMES = {key: f"miniworld-vit-{key}" for key in VISION_FILES}  # recorded in the files and in nested weights trained on them
