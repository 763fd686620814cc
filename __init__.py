"""ComfyUI-NestedAttention: Nested Attention (arXiv 2501.01407) subject personalisation for SDXL.

ComfyUI imports this file as the pack; the node modules are imported only when
the host asks for them, so training and tests can import `nested_core` and the
patch without the node API.
"""
import logging

OLDEST_HOST = "0.3.64"  # the oldest ComfyUI the suite has passed on (newest: 0.33.0); README "Install"


def host_problem() -> str | None:
    """Why this ComfyUI cannot run the pack (None: it can): the APIs the nodes use, checked by feature."""
    try:
        from comfy.patcher_extension import WrappersMP
        from comfy_api.latest import ComfyExtension, io  # noqa: F401

        missing = [name for name, ok in (("WrappersMP.OUTER_SAMPLE", hasattr(WrappersMP, "OUTER_SAMPLE")),
                                         ("WrappersMP.CALC_COND_BATCH", hasattr(WrappersMP, "CALC_COND_BATCH")),
                                         ("io.Hidden.prompt", hasattr(getattr(io, "Hidden", None), "prompt")),
                                         ("io.Custom", hasattr(io, "Custom"))) if not ok]
    except ImportError as e:
        missing = [f"{e.name or e}"]
    if not missing:
        return None
    try:
        from comfyui_version import __version__ as version
    except ImportError:
        version = "older than 0.3.47 (no comfyui_version)"
    return (f"ComfyUI-NestedAttention needs ComfyUI {OLDEST_HOST} or newer (the V3 node API and model wrappers); this "
            f"ComfyUI is {version} and lacks {', '.join(missing)}. Update ComfyUI (git pull, or Manager > Update ComfyUI)")


_problem = host_problem()
if _problem:  # an older host never calls comfy_entrypoint: say why once, and register nothing
    logging.getLogger(__name__).error(_problem)
    NODE_CLASS_MAPPINGS: dict = {}
else:

    async def comfy_entrypoint():
        from .nodes.extension import NestedAttentionExtension

        return NestedAttentionExtension()
