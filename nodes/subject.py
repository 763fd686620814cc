"""Encode Subject, Combine Subjects, Attention Scale λ: making and adjusting a SUBJECT."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.utils
import torch
from comfy_api.latest import io

from ..nested_core import NestedAttentionModel
from .patch import Subject
from .types import CATEGORY, NestedAttentionType, SubjectType


def encode_subject(weights: NestedAttentionModel, clip_vision, image: torch.Tensor) -> Subject:
    """Q-Former over the CLIP vision last-layer tokens of every image; several images give concatenated tokens.
    One image at a time, so the UI's progress bar moves once per reference photo."""
    c = weights.config
    if image is None or image.ndim != 4 or image.shape[0] == 0:
        raise ValueError(f"the image batch is empty ({None if image is None else list(image.shape)}): connect at least one reference photo")
    device = mm.get_torch_device()
    progress = comfy.utils.ProgressBar(image.shape[0])
    tokens = []
    try:
        for i in range(image.shape[0]):
            vision = clip_vision.encode_image(image[i : i + 1], crop=True)["last_hidden_state"]  # [1, tokens, hidden]
            if tuple(vision.shape[1:]) != (c.vision_tokens, c.vision_dim):
                raise ValueError(
                    f"these nested-attention weights expect the CLIP vision encoder {c.vision_encoder} "
                    f"({c.vision_dim} wide, {c.vision_tokens} tokens); the connected one gives {vision.shape[2]} wide, "
                    f"{vision.shape[1]} tokens: load {c.vision_encoder} with Load CLIP Vision"
                )
            weights.qformer.to(device)
            with torch.inference_mode():
                tokens.append(weights.encode(vision.to(device, torch.float32))[0])  # [Q, context_dim]
            progress.update(1)
    finally:
        weights.qformer.to(mm.unet_offload_device())  # the Q-Former is needed once per subject, not during sampling
    return Subject(weights=weights, tokens=torch.cat(tokens).to(mm.intermediate_device()))


class EncodeSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionEncodeSubject",
            display_name="Encode Subject",
            category=CATEGORY,
            description="Turns reference photo(s) of one subject into nested-attention tokens. "
                        "Several images in the batch: their tokens are concatenated (better identity).",
            inputs=[
                NestedAttentionType.Input("nested_attention", tooltip="From Load Nested Attention."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision encoder the weights were trained with."),
                io.Image.Input("image", tooltip="One or more photos of the subject (a batch)."),
            ],
            outputs=[SubjectType.Output(tooltip="The subject, for Bind Token.")],
        )

    @classmethod
    def execute(cls, nested_attention, clip_vision, image) -> io.NodeOutput:
        return io.NodeOutput(encode_subject(nested_attention, clip_vision, image))


class CombineSubjects(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionCombineSubjects",
            display_name="Combine Subjects",
            category=CATEGORY,
            description="Concatenates two subjects' tokens: more photos of one subject, or two people mixed into one identity.",
            inputs=[SubjectType.Input("subject_a"), SubjectType.Input("subject_b")],
            outputs=[SubjectType.Output()],
        )

    @classmethod
    def execute(cls, subject_a: Subject, subject_b: Subject) -> io.NodeOutput:
        if subject_a.weights is not subject_b.weights:
            raise ValueError("both subjects must come from the same Load Nested Attention node: tokens of different weights do not mix")
        if subject_a.lam != subject_b.lam:
            raise ValueError(f"the subjects have different λ ({subject_a.lam}, {subject_b.lam}): combine first, then set λ with Attention Scale λ")
        tokens = torch.cat([subject_a.tokens, subject_b.tokens])
        return io.NodeOutput(Subject(weights=subject_a.weights, tokens=tokens, lam=subject_a.lam))


class AttentionScale(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionScale",
            display_name="Attention Scale λ",
            category=CATEGORY,
            description="λ: how much attention the subject's word gets (logit ← max(l, λ·l)). "
                        "1 = as trained; higher = stronger identity, weaker prompt. The paper sweeps 1–4.",
            inputs=[
                SubjectType.Input("subject"),
                io.Float.Input("scale", default=1.0, min=1.0, max=10.0, step=0.05, tooltip="λ ≥ 1; try 1–4."),
            ],
            outputs=[SubjectType.Output()],
        )

    @classmethod
    def execute(cls, subject: Subject, scale: float) -> io.NodeOutput:
        return io.NodeOutput(subject.with_lambda(scale))
