"""Identity codes: what makes the world's base UNet read a subject's identity from its subject word.

Nested attention replaces the *value* of the subject token (Sec. 3.2 of the paper): it works on
SDXL because SDXL learned, from captions that describe people and pets, to draw the subject's
appearance from what that token carries. The world's captions name only the scene, so a base
model pretrained on them alone gives the subject word about 1 % of the attention and draws a
random identity whatever the token holds (measured: docs/miniworld.md).

So in part of the pretraining steps the subject word's *value* carries the depicted identity:
the row of the text context that cross-attention turns into values (an attn2 patch; the keys
still see the plain word, as under nested attention) becomes the row plus the sum of one learned
vector per attribute value, rescaled to the row's norm (the value's scale, which α is defined
against, stays that of a text token). The UNet learns to attend to the subject word where the
subject is and to draw the identity its value carries: the role the subject token plays in SDXL,
and exactly the slot nested attention fills. (A first run that put the code in the keys too
taught the UNet to find the code by its key, which nested attention cannot reproduce.) The codes ship with the base model only as an oracle for evaluation (the
base model told the identity): the pack never uses them; nested attention has to produce such a
value from a photo.

Part codes (a harder world, for the paper's comparison): with `parts`, a query of the image receives the code of
the part it shows (world.PARTS: the attributes visible there, at world.part_fractions' share of its cell) and a
query off the subject the plain row. One vector per image, the same for every query (what global V can give),
is then no longer what the UNet learned to read; a value per query (what nested attention gives) is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from .world import ATTRIBUTES, DOMAINS, PARTS, Identity


class IdentityCodes(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.tables = nn.ParameterDict({
            d: nn.Parameter(torch.randn(sum(len(v) for _, v in ATTRIBUTES[d]), width) * 0.1) for d in DOMAINS
        })
        for d in DOMAINS:
            sizes = torch.tensor([0] + [len(v) for _, v in ATTRIBUTES[d]][:-1])
            self.register_buffer(f"offsets_{d}", sizes.cumsum(0), persistent=False)

    def attribute_vectors(self, domain: str, attrs: Tensor) -> Tensor:
        """attrs [B, n_attributes] value indices -> one learned vector per attribute [B, n_attributes, width]."""
        rows = attrs[:, : len(ATTRIBUTES[domain])] + getattr(self, f"offsets_{domain}")
        return self.tables[domain][rows]

    def code(self, domain: str, attrs: Tensor) -> Tensor:
        """attrs [B, n_attributes] value indices -> codes [B, width]."""
        return self.attribute_vectors(domain, attrs).sum(dim=1)

    def part_codes(self, domain: str, attrs: Tensor) -> Tensor:
        """attrs [B, n_attributes] -> [B, n_parts, width]: per part, the sum of the vectors of the attributes it shows."""
        vectors, names = self.attribute_vectors(domain, attrs), [n for n, _ in ATTRIBUTES[domain]]
        return torch.stack([vectors[:, [names.index(a) for a in shown]].sum(dim=1) for shown in PARTS[domain].values()], dim=1)

    def apply(self, rows: Tensor, domain: str, attrs: Tensor) -> Tensor:
        """Subject-word rows [B, width] -> rows carrying the identities, each at its row's norm."""
        coded = rows + self.code(domain, attrs)
        return coded * (rows.norm(dim=-1, keepdim=True) / coded.norm(dim=-1, keepdim=True))

    def identity_row(self, row: Tensor, identity: Identity) -> Tensor:
        """One subject-word row [width] carrying one identity (the oracle the evaluation compares with)."""
        attrs = torch.tensor([identity.attrs], device=row.device)
        return self.apply(row[None].float(), identity.domain, attrs)[0].to(row)


@dataclass
class CodedRow:
    """One batch row whose subject word carries part codes: the word's position, its plain row [width], the
    part codes [P, width] and the parts' share of each cell, per attention grid side: {side: [P, side·side]}."""

    position: int
    row: Tensor
    codes: Tensor
    fractions: dict[int, Tensor]


class PartCodeInjection:
    """The subject word's value, per query, = its row plus the code of the part that query shows, rescaled to the
    row's norm; keys untouched. Host APIs only: an attn2 patch appends each row's P part codes to the value
    context (so the layer's own to_v projects them) and zero rows to the key context; the attn2 replace patch
    attends over the real tokens and swaps in the per-query value:

        out_q = Σ_t P[q,t] V[t] + P[q,s] · (r_q · (V[s] + Σ_p f_p(q) · to_v(code_p)) − V[s]),
        r_q = |row| / |row + Σ_p f_p(q) · code_p|        (to_v is linear without bias)

    `rows`: batch row -> CodedRow, the rows of the batch the layer sees (the others are plain attention). One
    injection serves every layer of a model call (a training step, or a whole sampling run): the per-query mixes
    in the context space are computed once per row and grid, not per layer."""

    def __init__(self, rows: dict[int, CodedRow], n_parts: int):
        self.rows, self.n_parts = rows, n_parts
        self._mixes: dict[tuple, tuple[Tensor, Tensor]] = {}  # (row, side, dtype, device) -> (f [P, N], ratio [N, 1])

    def _mix(self, b: int, side: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The part shares of row b on a side x side grid and each query's rescale r_q."""
        key = (b, side, like.dtype, like.device)
        if key not in self._mixes:
            coded = self.rows[b]
            f, row = coded.fractions[side].to(like), coded.row.to(like)
            mixed = row + f.T @ coded.codes.to(like)  # [N, width]: the coded row before rescaling
            self._mixes[key] = f, row.norm() / mixed.norm(dim=-1, keepdim=True)
        return self._mixes[key]

    def attn2_patch(self, n, context, value, extra_options):
        extra = context.new_zeros(context.shape[0], self.n_parts, context.shape[2])
        codes = extra.clone()
        for b, coded in self.rows.items():  # a domain with fewer parts leaves its last extra rows zero
            codes[b, : len(coded.codes)] = coded.codes.to(codes)
        return n, torch.cat([context, extra], dim=1), torch.cat([value, codes], dim=1)

    def attn2_replace(self, q: Tensor, k: Tensor, v: Tensor, extra_options) -> Tensor:
        heads, tokens = extra_options["n_heads"], k.shape[1] - self.n_parts
        qh, kh, vh = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k[:, :tokens], v[:, :tokens]))
        probs = (qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5).softmax(dim=-1)
        out = probs @ vh
        side = int(round(q.shape[1] ** 0.5))
        for b, coded in self.rows.items():
            s, (f, ratio) = coded.position, self._mix(b, side, q)
            value = ratio * (v[b, s] + f.T @ v[b, tokens : tokens + len(f)])  # [N, inner] = to_v(rescaled coded row) per query
            value = rearrange(value, "n (h d) -> h n d", h=heads)
            out[b] = out[b] + probs[b, :, :, s, None] * (value - vh[b, :, s, None])
        return rearrange(out, "b h n d -> b n (h d)")

    def install(self, options: dict, layer_keys) -> dict:
        """transformer_options with both patches on every layer (for model.apply_model)."""
        patches = {**options.get("patches", {}), "attn2_patch": [self.attn2_patch]}
        replace = {**options.get("patches_replace", {}), "attn2": {key: self.attn2_replace for key in layer_keys}}
        return {**options, "patches": patches, "patches_replace": replace}


def save_tensors(codes: IdentityCodes) -> dict[str, Tensor]:
    return {f"identity_codes.{d}": t.detach().cpu() for d, t in codes.tables.items()}


def from_tensors(tensors: dict[str, Tensor]) -> IdentityCodes | None:
    """The codes stored in a base file, or None if it has none."""
    if not all(f"identity_codes.{d}" in tensors for d in DOMAINS):
        return None
    width = tensors[f"identity_codes.{DOMAINS[0]}"].shape[1]
    codes = IdentityCodes(width)
    with torch.no_grad():
        for d in DOMAINS:
            codes.tables[d].copy_(tensors[f"identity_codes.{d}"])
    return codes
