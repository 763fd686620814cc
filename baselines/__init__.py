"""The injection mechanisms the paper compares nested attention with (Sec. 5.2, Fig. 10): for training
and evaluating baselines only. The nodes ship nested attention alone and never import this package.

Inside the pack (`pack_module("baselines.patch")`) the functional forms are re-exported here. As a top-level
package (`python -m baselines.study` from the repository root) nothing is imported eagerly: attention.py's
relative imports need the pack, which the study reaches through training.host.pack_module."""
if "." in __name__:  # comfyui_nested_attention.baselines
    from .attention import decoupled_attention, global_v_attention, multiple_tokens_attention

    __all__ = ["decoupled_attention", "global_v_attention", "multiple_tokens_attention"]
