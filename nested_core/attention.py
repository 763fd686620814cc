"""Nested attention (Patashnik et al. 2025, arXiv 2501.01407, Sec. 3.2).

In a text cross-attention layer the value of the subject token s* is replaced
by a per-query value from a second, "nested" attention over the subject's
encoder tokens:

    v*_q   = softmax(q K̆ᵀ/√d) V̆,   rescaled to norm α·|V[s*]|
    out_q  = Σ_t P[q, t] · (v*_q if t = s* else V[t])

with P = softmax(q Kᵀ/√d) and the logit of s* raised to max(l, λ·l). It is
computed in the exact cheap form

    out = P V + Σ_{s ∈ S} P[:, s] · (v*_q − V[s])

so no per-query value tensor is ever built: the nested part is one SDPA call
over the subject's M keys, and only the ~77 text logits are materialised, in
float32, in query chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


@dataclass(frozen=True)
class NestedKV:
    """One subject as one layer sees it: where its token sits in the context and its nested keys/values."""

    positions: Sequence[int]  # token indices into the context (every copy of the bound token)
    keys: Tensor  # [M, inner]  K̆ = W_K̆ E
    values: Tensor  # [M, inner]  V̆ = W_V̆ E
    lam: float = 1.0  # λ: attention boost on the subject token, 1 = neutral
    alpha: float | None = 2.0  # value-norm target α·|V[s*]|; None = no rescaling


def _heads(x: Tensor, heads: int) -> Tensor:
    return rearrange(x, "b n (h d) -> b h n d", h=heads)


def _check(q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], heads: int) -> None:
    if q.ndim != 3 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected q [B,N,C] and k, v [B,T,C]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % heads:
        raise ValueError(f"inner dim {q.shape[2]} is not divisible by {heads} heads")
    seen: set[int] = set()
    for s in subjects:
        if s.keys.shape != s.values.shape or s.keys.ndim != 2 or s.keys.shape[1] != q.shape[2]:
            raise ValueError(
                f"nested keys/values must be [M, {q.shape[2]}]; got {tuple(s.keys.shape)} and {tuple(s.values.shape)}"
            )
        bad = [p for p in s.positions if not 0 <= p < k.shape[1]]
        if not s.positions or bad:
            raise ValueError(f"subject token positions {list(s.positions)} do not fit a context of {k.shape[1]} tokens")
        if seen & set(s.positions):
            raise ValueError(f"two subjects are bound to the same token position(s) {sorted(seen & set(s.positions))}")
        seen |= set(s.positions)


def _boosted_logits(logits: Tensor, subjects: Sequence[NestedKV]) -> Tensor:
    """l ← max(l, λ·l) on every subject token column (max: a negative logit must never shrink)."""
    if all(s.lam == 1.0 for s in subjects):
        return logits
    logits = logits.clone()
    for s in subjects:
        if s.lam != 1.0:
            cols = list(s.positions)
            logits[..., cols] = torch.maximum(logits[..., cols], logits[..., cols] * s.lam)
    return logits


def nested_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    subjects: Sequence[NestedKV],
    *,
    heads: int,
    base: Tensor | None = None,
    query_chunk: int = 1024,
) -> Tensor:
    """Cross-attention with nested subject values. q [B,N,C], k, v [B,T,C] (projected, heads merged) -> [B,N,C].

    `base`, when given, is the plain attention output softmax(qKᵀ/√d)V for the same rows as
    computed elsewhere (the host's kernel, or an earlier patch in a chain); only the difference
    the subjects make is added to it. Without it the plain term is computed here.
    """
    _check(q, k, v, subjects, heads)
    if not subjects:
        if base is not None:
            return base
        plain = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
        return rearrange(plain, "b h n d -> b n (h d)")
    b, n, c = q.shape
    scale = (c // heads) ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax and sums in float32 (float64 stays float64)
    kh = _heads(k, heads).to(acc)  # [b,h,T,d]
    vh = _heads(v, heads).to(acc)
    any_boost = any(s.lam != 1.0 for s in subjects)
    # per subject, once for all chunks
    index = [torch.as_tensor(list(s.positions), device=q.device) for s in subjects]
    nested_k = [_heads(s.keys.to(q.dtype)[None], heads).expand(b, -1, -1, -1) for s in subjects]  # [b,h,M,d]
    nested_v = [_heads(s.values.to(q.dtype)[None], heads).expand(b, -1, -1, -1) for s in subjects]
    sub_v = [vh.index_select(2, i) for i in index]  # V[s]: [b,h,S,d]
    # α·|V[s]| (one norm per token over the whole inner dim, all heads together): [b,1,1,S]
    target = [None if s.alpha is None else s.alpha * v.index_select(1, i).to(acc).norm(dim=-1)[:, None, None, :]
              for s, i in zip(subjects, index)]

    result = torch.empty_like(q)
    for start in range(0, n, query_chunk):
        qc = _heads(q[:, start : start + query_chunk], heads)  # [b,h,n,d]
        logits = torch.einsum("bhnd,bhtd->bhnt", qc.to(acc), kh) * scale  # [b,h,n,T]
        probs = _boosted_logits(logits, subjects).softmax(dim=-1)
        if base is None:
            out = probs @ vh
        else:
            out = _heads(base[:, start : start + query_chunk], heads).to(acc)
            if any_boost:  # λ also renormalises every other token's weight
                out = out + (probs - logits.softmax(dim=-1)) @ vh
        for i, nk, nv, vs, t in zip(index, nested_k, nested_v, sub_v, target):
            p_s = probs.index_select(-1, i)  # [b,h,n,S]
            nested = F.scaled_dot_product_attention(qc, nk, nv).to(acc)  # v*_q: [b,h,n,d]
            weight = p_s.sum(dim=-1, keepdim=True)  # [b,h,n,1]
            if t is not None:  # rescale v*_q to α|V[s]|: folded into the per-query weight
                norm = torch.linalg.vector_norm(nested, dim=(1, 3), keepdim=True).clamp_min(torch.finfo(acc).tiny)
                weight = (p_s * t).sum(dim=-1, keepdim=True) / norm
            out = torch.addcmul(out, nested, weight).sub_(p_s @ vs)  # + P[:,s]·v*_q − P[:,s]·V[s]
        result[:, start : start + query_chunk] = rearrange(out, "b h n d -> b n (h d)")
    return result


def nested_attention_naive(q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], *, heads: int) -> Tensor:
    """The definition, literally: a value tensor per query [B,h,N,T,d]. For tests and benchmarks only."""
    _check(q, k, v, subjects, heads)
    qh, kh, vh = (_heads(x, heads) for x in (q, k, v))
    d = qh.shape[-1]
    logits = _boosted_logits(qh @ kh.transpose(-1, -2) * d**-0.5, subjects)
    probs = logits.softmax(dim=-1)  # [b,h,N,T]
    values = vh[:, :, None].expand(-1, -1, q.shape[1], -1, -1).clone()  # V_q: [b,h,N,T,d]
    for s in subjects:
        nk, nv = _heads(s.keys[None], heads), _heads(s.values[None], heads)
        nested = (qh @ nk.transpose(-1, -2) * d**-0.5).softmax(dim=-1) @ nv  # v*_q: [b,h,N,d]
        for p in s.positions:
            value = nested
            if s.alpha is not None:
                target = s.alpha * v[:, p].norm(dim=-1)  # [b]
                value = nested / nested.square().sum(dim=(1, 3), keepdim=True).sqrt() * target[:, None, None, None]
            values[:, :, :, p] = value
    out = torch.einsum("bhnt,bhntd->bhnd", probs, values)
    return rearrange(out, "b h n d -> b n (h d)")
