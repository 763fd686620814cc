"""Load Nested Attention: a weights file from models/nested_attention."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass

import folder_paths
from comfy_api.latest import io

from ..nested_core import WeightsFileError, load_weights, read_config
from .types import CATEGORY, NestedAttentionType

FOLDER = "nested_attention"
EXTENSIONS = {".safetensors"}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsFile:
    """Where a loaded NESTED_ATTENTION came from (its `.source`): subject files name it and check it by hash."""

    name: str  # as Load Nested Attention lists it, e.g. "faces.safetensors"
    sha256: str  # of the whole file, hex


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def register_model_folder() -> None:
    """models/nested_attention, added beside any paths extra_model_paths.yaml already gave the folder."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    _paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    extensions.update(EXTENSIONS)


def _mechanism_problem(weights_name: str, metadata: dict) -> str | None:
    mechanism = metadata.get("mechanism", "nested")
    if mechanism == "nested":
        return None
    return (f"{weights_name} was trained for the '{mechanism}' baseline of the paper's comparison (baselines/), "
            "not for nested attention; load a file trained with the default --mechanism nested")


def weights_file_problem(weights_name) -> str | None:
    """Why Load Nested Attention cannot load `weights_name`, from the file's header alone (None: it looks loadable).
    Run when the graph is queued, before any model loads; each message names the fix."""
    if not isinstance(weights_name, str):  # linked from another node: known only when it runs
        return None
    path = folder_paths.get_full_path(FOLDER, weights_name)
    if path is None:
        return (f"no nested-attention weights file '{weights_name}' in models/{FOLDER} (searched "
                f"{folder_paths.get_folder_paths(FOLDER)}): put the .safetensors file there, press R in ComfyUI to "
                "refresh the list and pick it. Weights files are made by `python -m training.train` (--export); the demo "
                "world's are shipped in the pack's miniworld/weights/nested/ and listed by this node")
    try:
        _config, metadata = read_config(path)
    except WeightsFileError as e:  # not safetensors, not a nested-attention file, newer format, bad config
        return str(e)  # names the file and the fix
    return _mechanism_problem(weights_name, metadata)


class LoadNestedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionLoader",
            display_name="Load Nested Attention",
            category=CATEGORY,
            description="Loads a nested-attention weights file (Q-Former + per-layer nested projections) from models/nested_attention.",
            inputs=[
                io.Combo.Input("weights_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A .safetensors file made by `python -m training.train`, in models/nested_attention."),
            ],
            outputs=[NestedAttentionType.Output(tooltip="The weights, for Encode Subject.")],
        )

    @classmethod
    def validate_inputs(cls, weights_name) -> bool | str:
        # when the graph is queued: a missing or foreign file is reported before any other model loads
        return weights_file_problem(weights_name) or True

    @classmethod
    def execute(cls, weights_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, weights_name)
        problem = _mechanism_problem(weights_name, read_config(path)[1])
        if problem:
            raise ValueError(problem)
        weights = load_weights(path)
        # hashed at load, not later: the hash must be of the bytes these weights came from (about 1 s per GB)
        weights.source = WeightsFile(weights_name, file_sha256(path))
        c = weights.config
        log.info("loaded %s: %s %s, %d layers, %d queries, expects %s", weights_name, c.base_model, c.domain, len(c.layers), c.num_queries, c.vision_encoder)
        return io.NodeOutput(weights)
