"""The pack's ComfyExtension: its model folder and its nodes."""
from comfy_api.latest import ComfyExtension, io

from .apply import ApplyNestedAttention
from .loader import LoadNestedAttention, register_model_folder
from .prompt import BindToken, EncodePrompt
from .subject import AttentionScale, CombineSubjects, EncodeSubject
from .world_loader import LoadMiniWorld


class NestedAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()
        # the demo world's loader: its own category; no other node depends on miniworld/
        return [LoadNestedAttention, EncodeSubject, CombineSubjects, AttentionScale, EncodePrompt, BindToken, ApplyNestedAttention,
                LoadMiniWorld]
