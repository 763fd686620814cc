"""Apply Nested Attention: patch every cross-attention layer of an SDXL model."""
from __future__ import annotations

import comfy.model_base
import comfy.patcher_extension
from comfy_api.latest import io

from ..nested_core import attn2_layers
from .patch import WRAPPER_KEY, NestedAttentionPatch
from .types import CATEGORY


def apply_nested_attention(model, start_percent: float = 0.0, end_percent: float = 1.0):
    """A patched clone: the nested patch on all attn2 layers, chained after any attn2 patch already there."""
    if not isinstance(model.model, comfy.model_base.SDXL):
        raise ValueError(f"Apply Nested Attention needs an SDXL model; this one is {type(model.model).__name__}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"need 0 ≤ start_percent ≤ end_percent ≤ 1; got {start_percent}, {end_percent}")
    if start_percent == end_percent:
        raise ValueError(
            f"start_percent = end_percent = {start_percent}: the subject would be injected at no step. Set end_percent "
            "above start_percent (0 and 1: the whole run), or bypass Apply Nested Attention"
        )
    m = model.clone()
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    if any(isinstance(p, NestedAttentionPatch) for p in existing.values()):
        raise ValueError("this model already has Apply Nested Attention; use one Apply node and chain Bind Token for several subjects")
    keys = list(attn2_layers(m.model.diffusion_model))
    sampling = m.get_model_object("model_sampling")
    patch = NestedAttentionPatch(
        sigma_start=sampling.percent_to_sigma(start_percent),
        sigma_end=sampling.percent_to_sigma(end_percent),
        # the host looks a patch up by (block, id, index), then by (block, id): chain whichever is there
        previous={key: existing.get(key, existing.get(key[:2])) for key in keys if key in existing or key[:2] in existing},
        layers=keys,
    )
    for key in keys:
        m.set_model_attn2_replace(patch, *key)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, patch.outer_sample)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, patch.calc_cond_batch)
    return m


class ApplyNestedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionApply",
            display_name="Apply Nested Attention",
            category=CATEGORY,
            description="Patches the model's 70 cross-attention layers so subjects bound with Bind Token appear in the image. "
                        "Conditionings without a bound subject (e.g. the negative) are left exactly as they were.",
            inputs=[
                io.Model.Input("model", tooltip="An SDXL model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress at which the subject starts to be injected."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Sampling progress after which the subject is no longer injected."),
            ],
            outputs=[io.Model.Output(tooltip="The patched model (the input model is not changed).")],
        )

    @classmethod
    def execute(cls, model, start_percent: float, end_percent: float) -> io.NodeOutput:
        return io.NodeOutput(apply_nested_attention(model, start_percent, end_percent))
