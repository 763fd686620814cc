"""Everything one nested-attention weights file holds: the Q-Former and, for every
cross-attention layer ℓ of the UNet, the nested projections W_K̆ℓ, W_V̆ℓ."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LayerKey, attn2_layers, layer_name
from .qformer import QFormer


@dataclass
class NestedConfig:
    """What a weights file states about itself (stored as its metadata; nothing is guessed from key names)."""

    layers: dict[LayerKey, int]  # layer key -> the layer's inner (heads·dim_head) width
    context_dim: int = 2048  # width of the UNet's text context = width of a subject token
    vision_encoder: str = "CLIP-ViT-H-14"  # the CLIP vision model the Q-Former was trained on
    vision_dim: int = 1280  # its hidden size
    vision_tokens: int = 257  # its last-layer token count (CLS + patches)
    num_queries: int = 1024  # nested keys/values per reference image
    qformer_dim: int = 1024
    qformer_depth: int = 4
    qformer_heads: int = 16
    alpha: float | None = 2.0  # value-norm target α·|V[s*]|; None = no rescaling
    bound_word: str = "person"  # the word the subject was trained on
    domain: str = "faces"
    base_model: str = "sdxl"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [[*key, width] for key, width in self.layers.items()]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NestedConfig":
        d = dict(d)
        d["layers"] = {(b, int(i), int(j)): int(w) for b, i, j, w in d["layers"]}
        return cls(**d)


def layers_of(diffusion_model: nn.Module) -> dict[LayerKey, int]:
    """The `layers` entry of a config for this UNet: each cross-attention layer's inner width."""
    return {key: attn.to_v.weight.shape[0] for key, attn in attn2_layers(diffusion_model).items()}


class NestedAttentionModel(nn.Module):
    def __init__(self, config: NestedConfig, operations=nn):
        super().__init__()
        self.config = config
        self.qformer = QFormer(
            vision_dim=config.vision_dim, num_queries=config.num_queries, dim=config.qformer_dim,
            depth=config.qformer_depth, heads=config.qformer_heads, out_dim=config.context_dim, operations=operations,
        )
        def projections() -> nn.ModuleDict:
            return nn.ModuleDict(
                {layer_name(key): operations.Linear(config.context_dim, width, bias=False) for key, width in config.layers.items()}
            )
        self.to_k = projections()  # W_K̆ per layer
        self.to_v = projections()  # W_V̆ per layer

    def encode(self, image_tokens: Tensor) -> Tensor:
        """CLIP vision last-layer tokens [B, vision_tokens, vision_dim] -> subject tokens [B, Q, context_dim]."""
        c = self.config
        if image_tokens.ndim != 3 or image_tokens.shape[1:] != (c.vision_tokens, c.vision_dim):
            raise ValueError(
                f"these weights expect {c.vision_encoder} tokens [B, {c.vision_tokens}, {c.vision_dim}]; "
                f"got {list(image_tokens.shape)}"
            )
        return self.qformer(image_tokens)

    def project(self, key: LayerKey, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Subject tokens [M, context_dim] -> nested keys and values [M, inner] of one layer, in the tokens' dtype/device."""
        name = layer_name(key)
        w_k, w_v = self.to_k[name].weight, self.to_v[name].weight
        return F.linear(tokens, w_k.to(tokens)), F.linear(tokens, w_v.to(tokens))

    @torch.no_grad()
    def init_projections_from(self, diffusion_model: nn.Module) -> None:
        """Start every W_K̆, W_V̆ as the layer's own to_k, to_v (subject tokens live in text-context space)."""
        layers = attn2_layers(diffusion_model)
        if set(layers) != set(self.config.layers):
            raise ValueError(f"the UNet's {len(layers)} cross-attention layers differ from the {len(self.config.layers)} configured")
        for key, attn in layers.items():
            self.to_k[layer_name(key)].weight.copy_(attn.to_k.weight)
            self.to_v[layer_name(key)].weight.copy_(attn.to_v.weight)


def default_config(diffusion_model: nn.Module, **overrides) -> NestedConfig:
    """A config for this UNet: its layers and context width, paper defaults for the rest."""
    layers = layers_of(diffusion_model)
    if not layers:
        raise ValueError("this model has no text cross-attention (attn2) layers")
    some_attn = next(iter(attn2_layers(diffusion_model).values()))
    return NestedConfig(layers=layers, context_dim=some_attn.to_k.weight.shape[1], **overrides)


__all__ = ["NestedConfig", "NestedAttentionModel", "default_config", "layers_of"]
