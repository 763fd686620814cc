"""The one weights file format: a single safetensors file.

Tensors (all of NestedAttentionModel's state dict, nothing else):
    qformer.*                         the Q-Former
    to_k.<block>_<id>_<index>.weight  W_K̆ of layer (block, id, index), [inner, context_dim]
    to_v.<block>_<id>_<index>.weight  W_V̆ of that layer

Metadata (safetensors string header):
    format          "nested-attention"
    format_version  "1"
    config          JSON of NestedConfig: layers [[block, id, index, inner], ...], context_dim,
                    vision_encoder, vision_dim, vision_tokens, num_queries, qformer_dim/depth/heads,
                    alpha, bound_word, domain, base_model
    plus free-form string entries (e.g. "training_args") that loaders ignore.

Loading never unpickles anything and checks every tensor against the config.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .model import NestedAttentionModel, NestedConfig

FORMAT = "nested-attention"
FORMAT_VERSION = 1


class WeightsFileError(ValueError):
    """A file that is not (or no longer) a loadable nested-attention weights file."""


def save_weights(model: NestedAttentionModel, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    metadata = {k: str(v) for k, v in (extra_metadata or {}).items()}
    metadata.update(format=FORMAT, format_version=str(FORMAT_VERSION), config=json.dumps(model.config.to_dict()))
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(_sorted_header(save(tensors, metadata=metadata)))
    os.replace(tmp, path)  # never leave a half-written file under the real name


def _sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted: safetensors writes the metadata in
    hash-map order, which differs between calls, and equal weights should make byte-equal files."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format pads the header with spaces to keep tensors 8-byte aligned
    return len(header).to_bytes(8, "little") + header + data[8 + n :]


def _what_it_looks_like(keys: list[str]) -> str:
    """Only for the error message: a hint at what a foreign file is."""
    joined = " ".join(keys[:2000])
    if "ip_adapter" in joined or "image_proj" in joined:
        return "an IP-Adapter model (load it with an IP-Adapter pack)"
    if "lora" in joined:
        return "a LoRA"
    if "model.diffusion_model" in joined:
        return "a checkpoint (load it with Load Checkpoint)"
    if "vision_model" in joined or "visual" in joined:
        return "a CLIP vision model (load it with Load CLIP Vision)"
    return "some other model"


def read_config(path: str | os.PathLike) -> tuple[NestedConfig, dict[str, str]]:
    """The config and raw metadata of a weights file, without reading its tensors."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise WeightsFileError(f"{path}: not a readable safetensors file ({e}); the file is corrupt or truncated, download or export it again") from e
    if metadata.get("format") != FORMAT:
        raise WeightsFileError(
            f"{path}: not a nested-attention weights file (no format='{FORMAT}' metadata); it looks like "
            f"{_what_it_looks_like(keys)}. Nested-attention weights come from `python -m training.train`."
        )
    version = int(metadata.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise WeightsFileError(f"{path}: format version {version} is newer than this pack reads ({FORMAT_VERSION}); update the pack")
    if version < 1:
        raise WeightsFileError(f"{path}: format version {version} is not a valid nested-attention version")
    try:
        config = NestedConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise WeightsFileError(f"{path}: its 'config' metadata is missing or malformed ({e!r}); export the file again") from e
    return config, metadata


def load_weights(path: str | os.PathLike, device: torch.device | str = "cpu") -> NestedAttentionModel:
    config, _ = read_config(path)
    with torch.device("meta"):
        model = NestedAttentionModel(config)
    expected = model.state_dict()
    with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
        found = set(f.keys())
        missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
        if missing or unexpected:
            raise WeightsFileError(
                f"{path}: tensors do not match its config: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}; the file is damaged, export it again"
            )
        state = {}
        for name, like in expected.items():
            t = f.get_tensor(name)
            if t.shape != like.shape:
                raise WeightsFileError(f"{path}: tensor {name} has shape {list(t.shape)}, its config says {list(like.shape)}")
            if not torch.isfinite(t).all():
                raise WeightsFileError(f"{path}: tensor {name} holds NaN/inf values; the training run diverged")
            state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
