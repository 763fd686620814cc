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
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .world import ATTRIBUTES, DOMAINS, Identity


class IdentityCodes(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.tables = nn.ParameterDict({
            d: nn.Parameter(torch.randn(sum(len(v) for _, v in ATTRIBUTES[d]), width) * 0.1) for d in DOMAINS
        })
        for d in DOMAINS:
            sizes = torch.tensor([0] + [len(v) for _, v in ATTRIBUTES[d]][:-1])
            self.register_buffer(f"offsets_{d}", sizes.cumsum(0), persistent=False)

    def code(self, domain: str, attrs: Tensor) -> Tensor:
        """attrs [B, n_attributes] value indices -> codes [B, width]."""
        rows = attrs[:, : len(ATTRIBUTES[domain])] + getattr(self, f"offsets_{domain}")
        return self.tables[domain][rows].sum(dim=1)

    def apply(self, rows: Tensor, domain: str, attrs: Tensor) -> Tensor:
        """Subject-word rows [B, width] -> rows carrying the identities, each at its row's norm."""
        coded = rows + self.code(domain, attrs)
        return coded * (rows.norm(dim=-1, keepdim=True) / coded.norm(dim=-1, keepdim=True))

    def identity_row(self, row: Tensor, identity: Identity) -> Tensor:
        """One subject-word row [width] carrying one identity (the oracle the evaluation compares with)."""
        attrs = torch.tensor([identity.attrs], device=row.device)
        return self.apply(row[None].float(), identity.domain, attrs)[0].to(row)


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
