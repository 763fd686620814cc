"""The attn2 patch: what "Apply Nested Attention" installs and what training runs.

One NestedAttentionPatch object serves every cross-attention layer of a model
(the layer comes from extra_options). Subjects reach it through the
conditioning they were bound to: a CALC_COND_BATCH wrapper maps each batched
conditioning's uuid to its bindings, and the patch reads, per chunk of rows,
`uuids[j]`. Rows whose conditioning carries no binding (the negative prompt,
unbound prompts) get exactly the host's output, whatever the chunk order.

Only the host's dict protocol is used here (extra_options, wrappers'
executor signatures); the one host import is its attention kernel, so the
base output is bit-identical to an unpatched run.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nested_core import NestedAttentionModel, NestedKV, nested_attention, repeated_positions
from ..nested_core.layers import LayerKey

BINDINGS = "nested_attention"  # cond-dict key: tuple[Binding, ...]
PROMPT_TOKENS = "nested_attention_tokens"  # cond-dict key: PromptTokens of the encoded prompt
UUID_MAP = "nested_attention_bindings"  # transformer_options key: {uuid: tuple[Binding, ...]}
WRAPPER_KEY = "nested_attention"


@dataclass(frozen=True, eq=False)
class Subject:
    """A subject as the nodes pass it around (type SUBJECT): tokens from its reference image(s) + its weights."""

    weights: NestedAttentionModel
    tokens: Tensor  # [M, context_dim]: M = images × queries
    lam: float = 1.0

    def with_lambda(self, lam: float) -> "Subject":
        if not (math.isfinite(lam) and lam >= 1.0):
            raise ValueError(f"λ must be a finite number ≥ 1 (1 = neutral, the paper sweeps 1–4); got {lam}")
        return replace(self, lam=lam)


@dataclass(frozen=True)
class Binding:
    """A subject bound to token positions of one conditioning whose context has `context_len` tokens."""

    subject: Subject
    positions: tuple[int, ...]
    context_len: int
    # where the subject applies: [1 or batch, H, W] in 0..1 at any resolution (stretched to each layer's latent grid);
    # None = everywhere. Not compared: a tensor has no truth value
    mask: Tensor | None = field(default=None, compare=False)


def _bindings_as_sampled(cond: dict) -> tuple[Binding, ...]:
    """A conditioning's bindings for the context it is sampled with. A node after Bind Token may have made
    it longer (ConditioningConcat keeps the bound prompt first): the positions stay, and the context's real
    length decides how the host repeats it when batching with other lengths."""
    context = getattr((cond.get("model_conds") or {}).get("c_crossattn"), "cond", None)
    if context is None:
        return cond[BINDINGS]
    length = context.shape[1]
    out = []
    for b in cond[BINDINGS]:
        if length < b.context_len:
            raise ValueError(f"a bound conditioning was cut from {b.context_len} to {length} tokens after Bind Token; "
                             "bind the subject after the node that shortens it")
        out.append(b if length == b.context_len else replace(b, context_len=length))
    return tuple(out)


class NestedAttentionPatch:
    """attn2 replace patch for all layers of one model, with a per-sampling-run projection cache."""

    def __init__(
        self,
        sigma_start: float = math.inf,
        sigma_end: float = 0.0,
        previous: dict | None = None,
        layers: list[LayerKey] | None = None,
        query_chunk: int = 1024,
    ):
        self.sigma_start, self.sigma_end = sigma_start, sigma_end
        self.layers = set(layers or ())  # the layer keys this patch is installed on
        self.previous = dict(previous or {})  # layer key -> an earlier attn2 replace patch, chained
        self.query_chunk = query_chunk
        # (id, layer, (device, dtype)) -> (subject, K̆, V̆); (id, 'tokens', (device, dtype)) -> (subject, E);
        # (id, 'mask', (h, w), (device, dtype)) -> (mask, mask on that latent grid [batch, h·w, 1])
        self._cache: dict[tuple, tuple] = {}

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.x deep-copies model_options on every clone; one patch (and cache) per Apply node is what we want
        return self

    # --- per sampling run ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def run(self):
        """Scope of one sampling run (or one training step): projections are computed once inside, dropped after."""
        self._cache.clear()
        try:
            yield self
        finally:
            self._cache.clear()  # frees the device copies: no VRAM kept after a run

    def projections(self, subject: Subject, key: LayerKey, like: Tensor) -> tuple[Tensor, Tensor]:
        """K̆, V̆ of `subject` at layer `key` on like's device and dtype, computed once per run and device.

        Newer hosts run one sampling on several GPUs from threads sharing this patch: entries are per
        device, and each entry is stored whole by one dict assignment (a race only computes one twice)."""
        where = (like.device, like.dtype)
        cached = self._cache.get((id(subject), key, where))
        if cached is None or cached[0] is not subject:  # `is`: an id can be reused once a subject is freed
            if key not in subject.weights.config.layers:
                raise ValueError(
                    f"the nested-attention weights have no layer {key}: they were made for another model "
                    f"({subject.weights.config.base_model}, {len(subject.weights.config.layers)} layers)"
                )
            tokens = self._cache.get((id(subject), "tokens", where))
            if tokens is None or tokens[0] is not subject:  # moved to the device once per run, not once per layer
                tokens = self._cache[(id(subject), "tokens", where)] = (subject, subject.tokens.to(like.device, like.dtype))
            cached = self._cache[(id(subject), key, where)] = (subject, *subject.weights.project(key, tokens[1]))
        return cached[1], cached[2]

    def region(self, mask: Tensor, extra_options: dict, like: Tensor) -> Tensor:
        """A binding's mask on this layer's latent grid as a per-query weight [1 or batch, h·w, 1] in like's dtype,
        resized once per grid size, mask and device per run. Area interpolation: a cell's weight is the mean of the
        mask over the cell (exact 0 / 1 where the cell is wholly outside / inside; downscaling never aliases)."""
        h, w = _latent_grid(like.shape[1], extra_options)
        where = (like.device, like.dtype)
        cached = self._cache.get((id(mask), "mask", (h, w), where))
        if cached is None or cached[0] is not mask:
            grid = F.interpolate(mask[:, None].float(), size=(h, w), mode="area")  # [batch, 1, h, w]
            grid = grid.reshape(grid.shape[0], h * w, 1).to(like.device, like.dtype)  # one weight per query position
            cached = self._cache[(id(mask), "mask", (h, w), where)] = (mask, grid)
        return cached[1]

    @property
    def cache_nbytes(self) -> int:
        """Bytes of nested keys/values held for the current run (0 outside a run)."""
        return sum(t.numel() * t.element_size() for _, *kv in self._cache.values() for t in kv)

    def precompute(self, bindings, like: Tensor) -> None:
        """Fill this run's cache for every layer now, e.g. before gradient-checkpointed blocks run
        (a projection first computed inside one would be missing from its recomputation)."""
        for b in bindings:
            for key in self.layers or b.subject.weights.config.layers:
                self.projections(b.subject, key, like)

    # --- host wrappers ------------------------------------------------------------------------------
    def check_bindings(self, bindings) -> None:
        """Before sampling: every bound subject's weights must cover exactly the patched model's layers."""
        for b in bindings:
            config = b.subject.weights.config
            if self.layers and set(config.layers) != self.layers:
                missing = sorted(self.layers - set(config.layers))[:3]
                raise ValueError(
                    f"the nested-attention weights were made for a model with {len(config.layers)} cross-attention layers "
                    f"({config.base_model}); this model has {len(self.layers)} (weights lack e.g. {missing}): "
                    "use weights trained for this base model"
                )

    def outer_sample(self, executor, *args, **kwargs):
        guider = getattr(executor, "class_obj", None)
        for group in (getattr(guider, "conds", None) or {}).values():
            for c in group or []:
                self.check_bindings(c.get(BINDINGS, ()))
        with self.run():
            return executor(*args, **kwargs)

    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        # the start/end window is decided here, once per batch: one device sync, not one per layer call
        if self.sigma_end <= float(timestep.max()) <= self.sigma_start:
            uuid_map = {c["uuid"]: _bindings_as_sampled(c) for group in conds for c in (group or []) if c.get(BINDINGS)}
            if uuid_map:
                model_options = model_options.copy()
                to = model_options["transformer_options"] = model_options.get("transformer_options", {}).copy()
                to[UUID_MAP] = uuid_map
        return executor(model, conds, x_in, timestep, model_options)

    # --- the attn2 replace patch ----------------------------------------------------------------------
    def base_attention(self, key: LayerKey, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        previous = self.previous.get(key)
        if previous is not None:
            return previous(q, k, v, extra_options)
        from comfy.ldm.modules.attention import optimized_attention  # looked up per call: honours the host's choice

        return optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
        )

    def attend(self, q: Tensor, k: Tensor, v: Tensor, subjects: list[NestedKV], *, heads: int, base: Tensor) -> Tensor:
        """The rows of one bound conditioning: nested attention. The one step a subclass may swap (the
        paper's comparison mechanisms in baselines/ do; the nodes never use them)."""
        return nested_attention(q, k, v, subjects, heads=heads, base=base, query_chunk=self.query_chunk)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        key = (*extra_options["block"], extra_options.get("block_index", 0))
        base = self.base_attention(key, q, k, v, extra_options)
        uuid_map = extra_options.get(UUID_MAP)
        if not uuid_map:  # no bound conditioning in this batch, or outside the start/end window
            return base
        uuids = extra_options["uuids"]
        rows = q.shape[0] // len(uuids)
        # at inference the fresh base output is updated in place; with autograd (training) it is rebuilt
        out = base if not torch.is_grad_enabled() else None
        pieces = []
        for j, uuid in enumerate(uuids):
            part = slice(j * rows, (j + 1) * rows)
            bindings = uuid_map.get(uuid)
            if not bindings:
                pieces.append(base[part])
                continue
            whole = [b for b in bindings if b.mask is None]
            nested = self._nested(whole, key, q[part], k[part], v[part], base[part], extra_options) if whole else None
            for b in bindings:
                if b.mask is None:
                    continue
                # regional: this subject's own correction, weighted per query position by its mask
                m = self.region(b.mask, extra_options, q)  # [1 or rows, N, 1]
                if m.shape[0] not in (1, rows):
                    raise ValueError(f"Bind Token's mask holds {m.shape[0]} masks for a batch of {rows} latents: give one mask "
                                     "(used for every latent) or one per latent")
                alone = self._nested([b], key, q[part], k[part], v[part], base[part], extra_options)
                # out = base + m·(alone − base), as lerp: exactly the input where m = 0, exactly `alone` where m = 1
                nested = torch.lerp(base[part], alone, m) if nested is None else torch.lerp(nested, alone + (nested - base[part]), m)
            if out is not None:
                out[part] = nested
            pieces.append(nested)
        return out if out is not None else torch.cat(pieces)

    def _nested(self, bindings, key: LayerKey, q: Tensor, k: Tensor, v: Tensor, base: Tensor, extra_options: dict) -> Tensor:
        """These rows with `bindings` applied everywhere (one call for all of them)."""
        subjects = [
            NestedKV(
                positions=repeated_positions(b.positions, b.context_len, k.shape[1]),
                keys=(kv := self.projections(b.subject, key, q))[0],
                values=kv[1],
                lam=b.subject.lam,
                alpha=b.subject.weights.config.alpha,
            )
            for b in bindings
        ]
        return self.attend(q, k, v, subjects, heads=extra_options["n_heads"], base=base)


def _latent_grid(queries: int, extra_options: dict) -> tuple[int, int]:
    """(h, w) of the image grid a layer's `queries` positions come from: the host's activations_shape [B, C, h, w],
    else the latent's original_shape divided by the layer's downscale (SDXL's stride-2 convs round up)."""
    shape = extra_options.get("activations_shape")
    if shape is not None and len(shape) == 4 and shape[2] * shape[3] == queries:
        return int(shape[2]), int(shape[3])
    original = extra_options.get("original_shape")
    if original is not None and len(original) >= 2:
        height, width = original[-2:]
        for scale in (1, 2, 4, 8, 16, 32, 64):
            h, w = -(-height // scale), -(-width // scale)
            if h * w == queries:
                return h, w
    raise ValueError(
        f"a regional mask needs the layer's image grid, and this host reports none that fits {queries} query positions "
        f"(activations_shape {shape}, original_shape {original}): disconnect Bind Token's mask, or update ComfyUI"
    )
