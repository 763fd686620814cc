"""The pack's ComfyExtension: its model folder and its nodes."""
from comfy_api.latest import ComfyExtension, io

from .apply import ApplyNestedAttention
from .loader import LoadNestedAttention, register_model_folder
from .prompt import BindToken, EncodePrompt
from .subject import AttentionScale, CombineSubjects, EncodeSubject


class NestedAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()
        return [LoadNestedAttention, EncodeSubject, CombineSubjects, AttentionScale, EncodePrompt, BindToken, ApplyNestedAttention]
