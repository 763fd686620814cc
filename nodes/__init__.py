"""Host glue: the ComfyUI nodes of the pack (V3 schema API)."""
