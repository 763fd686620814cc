"""Attention Maps: why a subject did or did not appear (the paper's Figs. 4–5).

The patched model is evaluated once, at one point of the schedule, on the latent noised to it, with the
host's own sampler machinery (the pack's wrappers run as in sampling). A copy of Apply Nested Attention's
patch, installed on a clone of the model, records through its `attend` step:
- how much attention the image queries give the bound word (per layer group: input, middle, output), and
- which subject token each region takes its nested value from, each token coloured by a PCA of the tokens.
The maps come out as IMAGE (and the raw word weights as MASK), at the latent's pixel size.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import comfy.sample
import comfy.samplers
import comfy.utils
import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..nested_core.layers import LayerKey
from ..nested_core.maps import nested_mix, token_colors, word_weights
from .patch import BINDINGS, Binding, NestedAttentionPatch, _latent_grid
from .types import CATEGORY

GROUPS = ("input", "middle", "output")  # the UNet's block groups, in the order the maps are output
LATENT_TO_PIXELS = 8  # SDXL's VAE


@dataclass(frozen=True)
class LayerMaps:
    """What one call of one layer recorded, on its own grid (h, w), for a batch of B latents."""

    word: torch.Tensor  # [B, h, w]: attention weight on the subject's word
    mix: torch.Tensor  # [B, h, w, 3]: colour of the subject tokens the nested value is drawn from
    top: torch.Tensor  # [B, h, w]: weight of the strongest subject token (1/M: spread evenly)
    seen: tuple  # (H, W) of the latent the UNet ran on (an area conditioning: a crop)


class AttentionRecorder(NestedAttentionPatch):
    """Apply Nested Attention's patch, unchanged in what it computes, that also records, for one bound subject,
    the word weights and the coloured nested-token mix of every layer it runs (one UNet evaluation)."""

    def __init__(self, patch: NestedAttentionPatch, target: int, colors: torch.Tensor, progress=None):
        super().__init__(patch.sigma_start, patch.sigma_end, patch.previous, list(patch.layers), patch.query_chunk)
        self.target = target  # a context position of the subject's word: tells its NestedKV from other subjects'
        self.colors = colors  # [M, 3]: one colour per subject token
        self.progress = progress
        self.maps: dict[LayerKey, list[LayerMaps]] = {}  # one entry per call of the layer
        self._layer = threading.local()  # the layer being run (newer hosts may run layers from several threads)

    def __call__(self, q, k, v, extra_options):
        self._layer.call = ((*extra_options["block"], extra_options.get("block_index", 0)), extra_options)
        try:
            return super().__call__(q, k, v, extra_options)
        finally:
            self._layer.call = None
            if self.progress is not None:
                self.progress.update(1)

    def attend(self, q, k, v, subjects, *, heads, base):
        for i, s in enumerate(subjects):
            if self.target in s.positions:
                key, extra_options = self._layer.call
                try:
                    h, w = _latent_grid(q.shape[1], extra_options)
                except ValueError as e:
                    raise ValueError(f"Attention Maps cannot fold layer {key}'s {q.shape[1]} queries back into an image "
                                     "grid: this ComfyUI reports no activations_shape or original_shape; update ComfyUI") from e
                word = word_weights(q, k, subjects, heads=heads, query_chunk=self.query_chunk)[i]  # [B, N]
                mix, top = nested_mix(q, s, self.colors.to(q.device), heads=heads, query_chunk=self.query_chunk)
                seen = tuple(extra_options.get("original_shape") or ())[-2:]  # the latent (or area crop) the UNet ran on
                self.maps.setdefault(key, []).append(LayerMaps(word.detach().reshape(-1, h, w).float().cpu(),
                                                               mix.detach().reshape(-1, h, w, 3).float().cpu(),
                                                               top.detach().reshape(-1, h, w).float().cpu(), seen))
        return super().attend(q, k, v, subjects, heads=heads, base=base)


# --- what the node needs from its inputs ----------------------------------------------------------------------------
def nested_patch(model) -> NestedAttentionPatch:
    attn2 = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    patches = {id(p): p for p in attn2.values() if isinstance(p, NestedAttentionPatch)}
    if not patches:
        raise ValueError("this model has no Apply Nested Attention: connect the MODEL output of Apply Nested Attention "
                         "(the model the sampler used), not the checkpoint loader's")
    assert len(patches) == 1, "Apply Nested Attention refuses a model that already has it"
    return next(iter(patches.values()))


def bound_subjects(conditioning) -> list[Binding]:
    """The conditioning's bindings, in Bind Token order (each once)."""
    found: list[Binding] = []
    for _cond, extras in conditioning or []:
        for b in extras.get(BINDINGS, ()):
            if not any(b is f for f in found):
                found.append(b)
    return found


def sigma_at(model, percent: float) -> float:
    """The sigma at `percent` of the model's schedule (0: the first step, pure noise; 1: the last)."""
    sampling = model.get_model_object("model_sampling")
    if percent <= 0.0:
        return float(sampling.sigma_max)
    if percent >= 1.0:
        return float(sampling.sigma_min)
    return float(sampling.percent_to_sigma(percent))


def latent_samples(latent) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[0] == 0:
        raise ValueError(f"the latent must be an image latent [batch, channels, height, width]; got "
                         f"{getattr(samples, 'shape', type(samples).__name__)}: connect the sampler's LATENT output")
    return samples


def _evaluate_once(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A 'sampler' that runs the model once at sigmas[0] (what is recorded is all this is for)."""
    model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
    return x


def record_attention(model, positive, latent: dict, *, percent: float = 0.5, seed: int = 0, subject: int = 1,
                     progress=None) -> AttentionRecorder:
    """Evaluate the patched model once on `latent` noised to `percent` of the schedule (cfg 1: the positive only),
    recording subject number `subject` (1 = the first Bind Token) at every layer. ValueError names each fix."""
    patch = nested_patch(model)
    bindings = bound_subjects(positive)
    if not bindings:
        raise ValueError("this conditioning has no bound subject: connect the conditioning from Bind Token "
                         "(the sampler's positive), not the one from Encode Prompt")
    if not 1 <= subject <= len(bindings):
        raise ValueError(f"subject {subject} asked for, and the conditioning has {len(bindings)} bound subject(s): "
                         f"set subject to 1..{len(bindings)} (in Bind Token order)")
    samples = latent_samples(latent)
    sigma = sigma_at(model, percent)
    if not patch.sigma_end <= sigma <= patch.sigma_start:
        raise ValueError(f"at percent {percent:g} (sigma {sigma:.4g}) Apply Nested Attention is not active: its "
                         "start_percent/end_percent leave this point out. Choose a percent between them")
    binding = bindings[subject - 1]
    recorder = AttentionRecorder(patch, binding.positions[0], token_colors(binding.subject.tokens), progress)
    m = model.clone()
    for key in patch.layers:  # the recorder in the patch's place on this clone only; the wrappers stay Apply's
        m.set_model_attn2_replace(recorder, *key)
    samples = comfy.sample.fix_empty_latent_channels(m, samples)
    noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    negative = [[c, {k: v for k, v in extras.items() if k != BINDINGS}] for c, extras in positive]  # not run at cfg 1
    with recorder.run(), torch.no_grad():
        comfy.sample.sample_custom(m, noise, 1.0, comfy.samplers.KSAMPLER(_evaluate_once), torch.tensor([sigma, 0.0]),
                                   positive, negative, samples, disable_pbar=True, seed=seed)
    if not recorder.maps:
        raise ValueError("no cross-attention layer applied the subject at this point (e.g. a Conditioning Set Timestep "
                         "Range on the bound conditioning leaves it out): choose a percent where the subject is active")
    return recorder


# --- maps -> pictures ---------------------------------------------------------------------------------------------
def group_maps(maps: dict, latent_hw: tuple[int, int], size: tuple[int, int]) -> dict[str, LayerMaps]:
    """Per layer group: LayerMaps at pixel `size` (word [B, H, W], mix [B, H, W, 3], top [B, H, W]): each layer's
    maps stretched bilinearly to `size`, then averaged over the group's layers (several calls of a layer: first)."""

    def stretch(x):  # [B, h, w, C] -> [B, H, W, C]
        return F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)

    out = {}
    for group in GROUPS:
        layers = []
        for key in sorted(k for k in maps if k[0] == group):
            for call in maps[key]:
                _check_whole_latent(call.seen, latent_hw)
            # word, mix and top side by side as channels: [B, h, w, 5], averaged over the layer's calls
            both = torch.stack([torch.cat([c.word[..., None], c.mix, c.top[..., None]], -1) for c in maps[key]]).mean(0)
            layers.append(stretch(both))
        if layers:
            mean = torch.stack(layers).mean(0)
            out[group] = LayerMaps(mean[..., 0], mean[..., 1:4].clamp(0, 1), mean[..., 4], tuple(latent_hw))
    return out


def _check_whole_latent(seen: tuple, latent_hw: tuple[int, int]) -> None:
    """The UNet must have run on the whole latent: a bound area conditioning (Conditioning Set Area) runs on a crop."""
    if seen and tuple(int(x) for x in seen) != tuple(latent_hw):
        raise ValueError(f"the bound conditioning was evaluated on a {seen[0]}x{seen[1]} crop of the {latent_hw[0]}x"
                         f"{latent_hw[1]} latent: it covers only an area (Conditioning Set Area?). Connect the conditioning "
                         "from before the area node to see the maps")


# a dark-to-bright ramp (black, purple, red, orange, pale yellow) for weights, 0..1
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.74, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]])


def heatmap(values: torch.Tensor) -> torch.Tensor:
    """values [...] in 0..1 -> colours [..., 3] on _RAMP (piecewise linear)."""
    x = values.clamp(0, 1) * (len(_RAMP) - 1)
    low = x.floor().long().clamp(max=len(_RAMP) - 2)
    t = (x - low)[..., None]
    return _RAMP[low] * (1 - t) + _RAMP[low + 1] * t


def _label(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Write each image's text (lines) on a black box in its top-left corner (images at least 96 px wide; smaller ones stay
    unlabelled). Pixels outside the box are left exactly as they were."""
    if images.shape[2] < 96:
        return images
    import numpy as np
    from PIL import Image, ImageDraw

    out = images.clone()
    for image, text in zip(out, texts):
        pil = Image.new("RGB", (image.shape[1], image.shape[0]))
        draw = ImageDraw.Draw(pil)
        left, top, right, bottom = draw.textbbox((3, 2), text)
        box = (max(left - 2, 0), max(top - 1, 0), min(right + 2, image.shape[1]), min(bottom + 1, image.shape[0]))
        draw.text((3, 2), text, fill=(255, 255, 255))
        drawn = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255)
        image[box[1] : box[3], box[0] : box[2]] = drawn[box[1] : box[3], box[0] : box[2]]
    return out


def render(groups: dict[str, LayerMaps], image: torch.Tensor | None = None, *, tokens: int | None = None,
           labels: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(word-attention pictures, nested-token pictures, raw word weights): each [B·groups, H, W(, 3)], latent-major
    (latent 0's input, middle, output, then latent 1's ...). Word pictures are scaled to each map's own maximum
    (the label says it); with `image`, both are drawn over it. `tokens` (M) only for the labels."""
    names = list(groups)
    words = torch.stack([groups[g].word for g in names], dim=1).flatten(0, 1)  # [B·G, H, W]
    mixes = torch.stack([groups[g].mix for g in names], dim=1).flatten(0, 1)  # [B·G, H, W, 3]
    tops = torch.stack([groups[g].top for g in names], dim=1).flatten(0, 1)  # [B·G, H, W]
    peaks = words.flatten(1).amax(1).clamp_min(torch.finfo(words.dtype).tiny)  # [B·G]
    heat = heatmap(words / peaks[:, None, None])
    if image is not None:
        under = image[..., :3].float().cpu().repeat_interleave(len(names), dim=0)  # one per (latent, group)
        heat, mixes = 0.4 * under + 0.6 * heat, 0.4 * under + 0.6 * mixes
    if labels:
        even = f" (even {100 / tokens:.0f}%)" if tokens else ""
        heat = _label(heat, [f"{names[i % len(names)]}: word\nmax {p * 100:.1f}%" for i, p in enumerate(peaks.tolist())])
        mixes = _label(mixes, [f"{names[i % len(names)]}: tokens\ntop {t * 100:.0f}%{even}"
                               for i, t in enumerate(tops.flatten(1).mean(1).tolist())])
    return heat.clamp(0, 1), mixes.clamp(0, 1), words


def attention_maps(model, positive, latent: dict, *, percent: float = 0.5, seed: int = 0, subject: int = 1,
                   image: torch.Tensor | None = None, labels: bool = True):
    """The node's work: record (one tick per cross-attention layer run), then draw (one tick)."""
    patch = nested_patch(model)
    samples = latent_samples(latent)
    batch = samples.shape[0]
    if image is not None:
        if image.ndim != 4 or image.shape[0] not in (1, batch):
            raise ValueError(f"the image batch has {image.shape[0] if image.ndim == 4 else '?'} image(s) for {batch} "
                             "latent(s): connect VAE Decode of this latent (one image per latent), or one image")
        image = image.expand(batch, -1, -1, -1) if image.shape[0] == 1 else image
    progress = comfy.utils.ProgressBar(len(patch.layers) + 1)
    recorder = record_attention(model, positive, latent, percent=percent, seed=seed, subject=subject, progress=progress)
    latent_hw = tuple(samples.shape[-2:])
    size = tuple(image.shape[1:3]) if image is not None else (latent_hw[0] * LATENT_TO_PIXELS, latent_hw[1] * LATENT_TO_PIXELS)
    tokens = bound_subjects(positive)[subject - 1].subject.tokens.shape[0]
    result = render(group_maps(recorder.maps, latent_hw, size), image, tokens=tokens, labels=labels)
    progress.update_absolute(progress.total)
    return result


class AttentionMaps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionAttentionMaps",
            display_name="Attention Maps (Nested Attention)",
            category=CATEGORY,
            description="Why a subject did or did not appear: runs the patched model once on the latent and shows, per "
                        "UNet block group (input, middle, output), where the bound word is attended and which subject "
                        "token each region takes its value from (one colour per token; similar tokens, similar colours).",
            inputs=[
                io.Model.Input("model", tooltip="The MODEL from Apply Nested Attention (the one the sampler used)."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning from Bind Token."),
                io.Latent.Input("latent", tooltip="The sampled LATENT (the sampler's output), or any latent of that size."),
                io.Float.Input("percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Where in the schedule to look: 0 = the first step (pure noise), 1 = the last. "
                                       "The latent is noised to that point."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The noise added to the latent (the sampler's seed reproduces its noise)."),
                io.Int.Input("subject", default=1, min=1, max=64, step=1,
                             tooltip="Which bound subject: 1 = the first Bind Token in the chain, 2 = the second, …"),
                io.Image.Input("image", optional=True,
                               tooltip="Optional: the decoded image (VAE Decode of the latent), drawn under the maps."),
            ],
            outputs=[
                io.Image.Output(display_name="word_attention",
                                tooltip="Per latent: input, middle, output block maps of the bound word's attention, "
                                        "each scaled to its own maximum (the label gives it)."),
                io.Image.Output(display_name="nested_tokens",
                                tooltip="Per latent and block group: each region painted with the colours of the "
                                        "subject tokens it takes its value from."),
                io.Mask.Output(display_name="word_weights",
                               tooltip="The bound word's raw attention weights (0..1, unscaled), same order: e.g. a "
                                       "mask from where the subject is attended."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, percent: float, seed: int, subject: int, image=None) -> io.NodeOutput:
        return io.NodeOutput(*attention_maps(model, positive, latent, percent=percent, seed=seed, subject=subject, image=image))
