"""Encode Prompt (Nested Attention) and Bind Token: which prompt token a subject replaces.

The prompt is encoded exactly as CLIPTextEncode does, and its token ids ride
along in the conditioning, so any number of Bind Token nodes can be chained
on one prompt without typing it twice. A binding travels with the
conditioning: only the conditioning it was made on is personalised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from ..nested_core import find_token_positions
from .graph_checks import check_bound_conditioning_use
from .patch import BINDINGS, PROMPT_TOKENS, Binding, Subject
from .types import CATEGORY, SubjectType


@dataclass(frozen=True)
class PromptTokens:
    """The token ids of an encoded prompt, per 77-token chunk, and the tokenizer that made them."""

    chunks: tuple[tuple[int | None, ...], ...]
    tokenizer: Any  # the CLIP object's tokenizer (no weights): tokenises the word to bind

    @classmethod
    def from_tokens(cls, tokens: dict, tokenizer: Any) -> "PromptTokens":
        chunks = tokens[_main_key(tokens)]  # SDXL tokenises twice ("l", "g"): same ids, same positions
        return cls(tuple(tuple(t[0] if isinstance(t[0], int) else None for t in chunk) for chunk in chunks), tokenizer)

    @property
    def context_len(self) -> int:
        return sum(len(c) for c in self.chunks)

    def positions(self, word: str, occurrence: int = 0) -> list[int]:
        """Context indices of `word` in this prompt (0 = every occurrence, n = the n-th); ValueError names the fix."""
        return find_token_positions(self.chunks, self.word_ids(word), word=word, occurrence=occurrence)

    def word_ids(self, word: str) -> list[int]:
        """The word's token ids, tokenised exactly like the prompt (BOS, EOS and padding dropped)."""
        tokens = self.tokenizer.tokenize_with_weights(word)
        key = _main_key(tokens)
        end = getattr(getattr(self.tokenizer, f"clip_{key}", None), "end_token", None)
        ids = [t[0] for t in tokens[key][0][1:]]
        # found, the tokenizer puts an embedding's vectors where ids go; not found, its name's pieces
        if word.strip().lower().startswith("embedding:") or not all(isinstance(i, int) for i in ids):
            raise ValueError(
                f"'{word}' is a textual-inversion embedding, not a word: nested attention binds one word of the prompt's "
                "vocabulary. Bind a plain single-token word such as 'person' or 'dog' (embeddings elsewhere in the prompt are fine)"
            )
        return ids[: ids.index(end)] if end in ids else ids


def _main_key(tokens: dict) -> str:
    return "l" if "l" in tokens else next(iter(tokens))


class EncodePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionEncodePrompt",
            display_name="Encode Prompt (Nested Attention)",
            category=CATEGORY,
            description="CLIP Text Encode that also keeps the prompt's token ids, so Bind Token can find the subject word.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP text encoder (from your SDXL checkpoint)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt. Put the subject's word in it, e.g. 'a photo of a person surfing'."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The encoded prompt, ready for Bind Token.")],
        )

    @classmethod
    def execute(cls, clip, text: str) -> io.NodeOutput:
        if clip is None:
            raise ValueError("clip input is empty: connect the CLIP output of your checkpoint loader")
        return io.NodeOutput(encode_prompt(clip, text))


def encode_prompt(clip, text: str) -> list:
    """CLIPTextEncode's conditioning, each entry also carrying the prompt's tokens for Bind Token."""
    tokens = clip.tokenize(text)
    prompt_tokens = PromptTokens.from_tokens(tokens, clip.tokenizer)
    return [[cond, {**extras, PROMPT_TOKENS: prompt_tokens}] for cond, extras in clip.encode_from_tokens_scheduled(tokens)]


def region_mask(mask) -> torch.Tensor | None:
    """Bind Token's optional MASK as [batch, H, W] float32 in 0..1 (None: the subject applies everywhere)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or 0 in mask.shape:
        raise ValueError(f"the mask must be a MASK [H, W] or [batch, H, W]; got {getattr(mask, 'shape', type(mask).__name__)}")
    mask = mask.detach().reshape(-1, *mask.shape[-2:]).float()
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"mask values must lie in 0..1 (got {mask.min().item():g} to {mask.max().item():g}): "
                         "clamp or normalise the mask first (e.g. with a Threshold or Mask Composite node)")
    if not (mask > 0).any():
        raise ValueError("the mask is 0 everywhere, so the subject would appear nowhere: paint the subject's region white "
                         "(Load Image's mask of an image without alpha is all 0), or disconnect the mask to personalise the whole image")
    return mask


def bind_subject(conditioning: list, subject: Subject, word: str, occurrence: int, mask: torch.Tensor | None = None) -> list:
    """The conditioning with `subject` bound to `word`; every entry must carry its prompt tokens.
    `mask` (optional, [H, W] or [batch, H, W] in 0..1): the subject's correction applies only there, blended for soft values."""
    mask = region_mask(mask)
    word = word.strip().lower() or subject.weights.config.bound_word
    out = []
    for cond, extras in conditioning:
        tokens: PromptTokens | None = extras.get(PROMPT_TOKENS)
        if tokens is None:
            raise ValueError(
                "this conditioning carries no prompt tokens: encode the prompt with 'Encode Prompt (Nested Attention)' "
                "instead of CLIP Text Encode, and bind before any node that combines or concatenates conditionings"
            )
        if cond.shape[1] != tokens.context_len:
            raise ValueError(
                f"the conditioning has {cond.shape[1]} tokens but its prompt had {tokens.context_len}: it was concatenated "
                "or edited after encoding; bind the subject first"
            )
        if cond.shape[2] != subject.weights.config.context_dim:
            raise ValueError(
                f"the weights were made for a {subject.weights.config.context_dim}-wide text context "
                f"({subject.weights.config.base_model}); this prompt's encoder gives {cond.shape[2]}: use the matching checkpoint"
            )
        positions = tokens.positions(word, occurrence)
        bindings = extras.get(BINDINGS, ())
        taken = {p for b in bindings for p in b.positions} & set(positions)
        if taken:
            raise ValueError(f"'{word}' at token(s) {sorted(taken)} is already bound to a subject; bind the other subject to another word")
        out.append([cond, {**extras, BINDINGS: (*bindings, Binding(subject, tuple(positions), cond.shape[1], mask))}])
    return out


class BindToken(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionBindToken",
            display_name="Bind Token",
            category=CATEGORY,
            description="Binds a subject to one word of the prompt: that word's attention value becomes the subject's. "
                        "Chain several Bind Token nodes for several subjects.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="From 'Encode Prompt (Nested Attention)' (or an earlier Bind Token)."),
                SubjectType.Input("subject", tooltip="From Encode Subject."),
                io.String.Input("word", default="", tooltip="A single-token word of the prompt, e.g. 'person' or 'dog'. "
                                                            "Empty: the word the weights were trained on."),
                io.Int.Input("occurrence", default=0, min=0, max=64, step=1,
                             tooltip="Which occurrence of the word: 0 = every occurrence, 1 = the first, 2 = the second, …"),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional: where in the image this subject may appear (white = here, grey = partly). "
                                      "Stretched to the latent (area average), so give it the image's aspect ratio. "
                                      "Unconnected: everywhere. Use one per subject to keep two people in their own regions."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The conditioning with the subject bound; only it is personalised.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, conditioning, subject: Subject, word: str, occurrence: int, mask=None) -> io.NodeOutput:
        # before any sampling: a wiring that would drop the subject silently is an error that names the fix
        if cls.hidden is not None:  # None when called outside the host's executor
            check_bound_conditioning_use(cls.hidden.prompt, cls.hidden.unique_id)
        return io.NodeOutput(bind_subject(conditioning, subject, word, occurrence, mask))
