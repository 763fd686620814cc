"""ComfyUI-NestedAttention: Nested Attention (arXiv 2501.01407) subject personalisation for SDXL.

ComfyUI imports this file as the pack; the node modules are imported only when
the host asks for them, so training and tests can import `nested_core` and the
patch without the node API.
"""


async def comfy_entrypoint():
    from .nodes.extension import NestedAttentionExtension

    return NestedAttentionExtension()
