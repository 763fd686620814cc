"""attn2 patches for the baseline mechanisms: NestedAttentionPatch with its per-row step (`attend`) swapped.

Everything else is inherited unchanged: bindings reach the rows by conditioning uuid, unbound and
negative rows get the host's output, W_K̆/W_V̆ projections are cached per run and device, earlier
attn2 patches are chained, the sigma window gates. All mechanisms read the same NestedAttentionModel
(Q-Former + per-layer W_K̆, W_V̆), so one weights format and one training loop serve them all:

    patch = MECHANISMS[name](layers=keys, **options)   # options: decoupled takes scale=
"""
from __future__ import annotations

import math

from torch import Tensor

from ..nested_core import NestedKV, attn2_layers
from ..nodes.patch import WRAPPER_KEY, NestedAttentionPatch
from .attention import decoupled_attention, global_v_attention, multiple_tokens_attention


class DecoupledAttentionPatch(NestedAttentionPatch):
    """IP-Adapter's decoupled cross-attention: base + scale · softmax(q K̆ᵀ/√d) V̆ on every query of a bound row."""

    def __init__(self, *args, scale: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if not math.isfinite(scale):
            raise ValueError(f"the decoupled attention scale must be finite; got {scale}")
        self.scale = scale  # the paper's Fig. 10 sweeps 0.5–1.0; training uses 1

    def attend(self, q: Tensor, k: Tensor, v: Tensor, subjects: list[NestedKV], *, heads: int, base: Tensor) -> Tensor:
        return decoupled_attention(q, k, v, subjects, heads=heads, base=base, scale=self.scale)


class GlobalVPatch(NestedAttentionPatch):
    """Global V: the bound word's value is W_V̆ mean(E) for every query (λ and α as in nested attention)."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, subjects: list[NestedKV], *, heads: int, base: Tensor) -> Tensor:
        return global_v_attention(q, k, v, subjects, heads=heads, base=base, query_chunk=self.query_chunk)


class MultipleTokensPatch(NestedAttentionPatch):
    """Multiple tokens: the bound word replaced by one token per subject token, keys fixed to its own key."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, subjects: list[NestedKV], *, heads: int, base: Tensor) -> Tensor:
        return multiple_tokens_attention(q, k, v, subjects, heads=heads, base=base, query_chunk=self.query_chunk)


# the training loop's choice of mechanism; "the base model with no subject" needs no patch (unbound rows)
MECHANISMS: dict[str, type[NestedAttentionPatch]] = {
    "nested": NestedAttentionPatch,
    "decoupled": DecoupledAttentionPatch,
    "global_v": GlobalVPatch,
    "multiple_tokens": MultipleTokensPatch,
}


def apply_mechanism(model, mechanism: str, start_percent: float = 0.0, end_percent: float = 1.0, **options):
    """Like Apply Nested Attention (same checks, chaining and start/end window) with `mechanism`'s patch:
    a patched clone for sampling with Bind Token's conditionings. `options` go to the patch (decoupled: scale)."""
    from ..nodes.apply import apply_nested_attention  # host import: only when sampling through ComfyUI
    import comfy.patcher_extension

    if mechanism not in MECHANISMS:
        raise ValueError(f"unknown mechanism {mechanism!r}; one of {sorted(MECHANISMS)}")
    m = apply_nested_attention(model, start_percent, end_percent)
    keys = list(attn2_layers(m.model.diffusion_model))
    nested = m.model_options["transformer_options"]["patches_replace"]["attn2"][keys[0]]
    patch = MECHANISMS[mechanism](
        sigma_start=nested.sigma_start, sigma_end=nested.sigma_end, previous=nested.previous, layers=keys,
        query_chunk=nested.query_chunk, **options,
    )
    for key in keys:  # m is apply's own clone: replacing its patch and wrappers leaves `model` untouched
        m.set_model_attn2_replace(patch, *key)
    for kind, hook in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, patch.outer_sample),
                       (comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, patch.calc_cond_batch)):
        m.remove_wrappers_with_key(kind, WRAPPER_KEY)
        m.add_wrapper_with_key(kind, WRAPPER_KEY, hook)
    return m


__all__ = ["MECHANISMS", "DecoupledAttentionPatch", "GlobalVPatch", "MultipleTokensPatch", "apply_mechanism"]
