"""The pack's ComfyExtension: its model folder and its nodes."""
from comfy_api.latest import ComfyExtension, io

from .apply import ApplyNestedAttention
from .attention_maps import AttentionMaps
from .loader import FOLDER, LoadNestedAttention, register_model_folder
from .prompt import BindToken, EncodePrompt
from .subject import AttentionScale, CombineSubjects, EncodeSubject
from .subject_files import LoadSubject, SaveSubject
from .world_loader import LoadMiniWorld


def register_world_weights() -> None:
    """The demo world's nested-attention weights (shipped in the pack) listed by Load Nested Attention too."""
    import folder_paths

    from ..miniworld.models import WEIGHTS_DIR

    folder_paths.add_model_folder_path(FOLDER, str(WEIGHTS_DIR / "nested"))


class NestedAttentionExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_model_folder()
        register_world_weights()
        # the demo world's loader: its own category; no other node depends on miniworld/
        return [LoadNestedAttention, EncodeSubject, CombineSubjects, AttentionScale, EncodePrompt, BindToken, ApplyNestedAttention,
                SaveSubject, LoadSubject, AttentionMaps, LoadMiniWorld]
