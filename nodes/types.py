"""The pack's own socket types."""
from comfy_api.latest import io

NestedAttentionType = io.Custom("NESTED_ATTENTION")  # a loaded weights file (NestedAttentionModel)
SubjectType = io.Custom("SUBJECT")  # patch.Subject: encoded reference image(s) + their weights + λ
