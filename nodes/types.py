"""The pack's own socket types and its node-menu category."""
from comfy_api.latest import io

CATEGORY = "nested_attention"  # every node of the pack (the demo world's loader: CATEGORY + "/demo world")

NestedAttentionType = io.Custom("NESTED_ATTENTION")  # a loaded weights file (NestedAttentionModel)
SubjectType = io.Custom("SUBJECT")  # patch.Subject: encoded reference image(s) + their weights + λ
