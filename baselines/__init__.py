"""The injection mechanisms the paper compares nested attention with (Sec. 5.2, Fig. 10): for training
and evaluating baselines only. The nodes ship nested attention alone and never import this package."""
from .attention import decoupled_attention, global_v_attention, multiple_tokens_attention

__all__ = ["decoupled_attention", "global_v_attention", "multiple_tokens_attention"]
