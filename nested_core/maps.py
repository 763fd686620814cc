"""What a nested-attention layer attends to, as numbers to draw (the paper's Figs. 4–5, Sec. 3.2).

For the rows of one bound conditioning at one cross-attention layer:

    word weight   P[q, s*] = softmax(q Kᵀ/√d)[s*]   (λ-boosted logits, as the layer uses them; summed over
                                                    every position of the bound word, averaged over heads)
    nested mix    A[q, m]  = softmax(q K̆ᵀ/√d)[m]    (which subject token m query q takes its value from,
                                                    averaged over heads), optionally times one colour per token

and one colour per subject token from a PCA of the tokens themselves, so a token has the same colour at
every layer. Same conventions as attention.py: q [B,N,C], k [B,T,C] projected, heads merged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .attention import NestedKV, _boosted_logits, _check, _heads


def word_weights(q: Tensor, k: Tensor, subjects: Sequence[NestedKV], *, heads: int, query_chunk: int = 1024) -> Tensor:
    """[len(subjects), B, N]: the attention weight each query gives each subject's word (all its positions summed),
    averaged over heads, with every subject's λ applied as nested_attention applies it. float32 (float64 stays)."""
    _check(q, k, k, subjects, heads)
    b, n, c = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = (c // heads) ** -0.5
    kh = _heads(k, heads).to(acc)  # [b,h,T,d]
    index = [torch.as_tensor(list(s.positions), device=q.device) for s in subjects]
    out = torch.empty(len(subjects), b, n, dtype=acc, device=q.device)
    for start in range(0, n, query_chunk):
        qc = _heads(q[:, start : start + query_chunk], heads).to(acc)  # [b,h,n,d]
        probs = _boosted_logits(torch.einsum("bhnd,bhtd->bhnt", qc, kh) * scale, subjects).softmax(dim=-1)
        for i, cols in enumerate(index):
            out[i, :, start : start + query_chunk] = probs.index_select(-1, cols).sum(-1).mean(1)
    return out


def nested_weights(q: Tensor, subject: NestedKV, *, heads: int, query_chunk: int = 1024) -> Tensor:
    """softmax(q K̆ᵀ/√d) over the subject's M tokens, averaged over heads: [B, N, M] (which token each query's
    nested value comes from)."""
    if subject.keys.ndim != 2 or subject.keys.shape[1] != q.shape[2] or q.shape[2] % heads:
        raise ValueError(f"expected nested keys [M, {q.shape[2]}] and {q.shape[2]} divisible by {heads} heads; got {tuple(subject.keys.shape)}")
    b, n, c = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = (c // heads) ** -0.5
    keys = _heads(subject.keys[None].to(acc), heads)  # [1,h,M,d]
    out = torch.empty(b, n, subject.keys.shape[0], dtype=acc, device=q.device)
    for start in range(0, n, query_chunk):
        qc = _heads(q[:, start : start + query_chunk], heads).to(acc)  # [b,h,n,d]
        out[:, start : start + query_chunk] = (qc @ keys.transpose(-1, -2) * scale).softmax(dim=-1).mean(1)  # [b,n,M]
    return out


def nested_mix(q: Tensor, subject: NestedKV, colors: Tensor, *, heads: int, query_chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(Σ_m A[q, m]·colors[m] [B, N, P], max_m A[q, m] [B, N]) for A = nested_weights(q, subject): the colour each
    query's nested value is drawn from, and how much its strongest token dominates (1/M: evenly spread)."""
    if colors.ndim != 2 or colors.shape[0] != subject.keys.shape[0]:
        raise ValueError(f"colors must be [M={subject.keys.shape[0]}, P]; got {tuple(colors.shape)}")
    b, n, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    mix = torch.empty(b, n, colors.shape[1], dtype=acc, device=q.device)
    top = torch.empty(b, n, dtype=acc, device=q.device)
    for start in range(0, n, query_chunk):
        weights = nested_weights(q[:, start : start + query_chunk], subject, heads=heads, query_chunk=query_chunk)  # [b,n,M]
        mix[:, start : start + query_chunk] = weights @ colors.to(acc)
        top[:, start : start + query_chunk] = weights.amax(-1)
    return mix, top


def token_colors(tokens: Tensor, *, components: int = 3) -> Tensor:
    """One colour per token [M, components] in 0..1: the tokens' first principal components, each stretched to 0..1
    (each direction's sign fixed so its largest entry is positive: deterministic). A component with no variance is 0.5."""
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise ValueError(f"expected tokens [M, C] with M ≥ 1; got {tuple(tokens.shape)}")
    x = tokens.detach().to(torch.float64)
    x = x - x.mean(dim=0)
    colors = torch.full((x.shape[0], components), 0.5, dtype=torch.float64, device=x.device)
    if x.shape[0] < 2:
        return colors.float()
    _u, s, vh = torch.linalg.svd(x, full_matrices=False)
    for i in range(min(components, s.shape[0])):
        if s[i] <= s[0] * 1e-6 or s[0] == 0:
            break
        direction = vh[i] * torch.sign(vh[i][vh[i].abs().argmax()])  # sign fixed: its largest entry positive
        pc = x @ direction  # [M]
        colors[:, i] = (pc - pc.min()) / (pc.max() - pc.min())
    return colors.float()

