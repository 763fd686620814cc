"""Nested Attention (arXiv 2501.01407) in pure torch: no host import anywhere in this package."""
from .attention import NestedKV, nested_attention, nested_attention_naive
from .layers import SDXL_LAYER_COUNT, LayerKey, attn2_layers, layer_name, parse_layer_name
from .model import NestedAttentionModel, NestedConfig, default_config, layers_of
from .qformer import QFormer
from .tokens import CHUNK_LEN, find_token_positions, repeated_positions
from .weights import FORMAT, FORMAT_VERSION, WeightsFileError, load_weights, read_config, save_weights

__all__ = [
    "NestedKV", "nested_attention", "nested_attention_naive",
    "SDXL_LAYER_COUNT", "LayerKey", "attn2_layers", "layer_name", "parse_layer_name",
    "NestedAttentionModel", "NestedConfig", "default_config", "layers_of", "QFormer",
    "CHUNK_LEN", "find_token_positions", "repeated_positions",
    "FORMAT", "FORMAT_VERSION", "WeightsFileError", "load_weights", "read_config", "save_weights",
]
