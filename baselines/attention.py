"""The injection mechanisms nested attention is compared with (Patashnik et al. 2025, arXiv 2501.01407,
Sec. 5.2 and Fig. 10), as functions with nested_attention's calling convention.

q [B,N,C] and k, v [B,T,C] are the layer's projected queries, text keys and values (heads merged);
each subject is a NestedKV: its token positions in the context, K̆ = W_K̆ E and V̆ = W_V̆ E [M,C] (the
subject tokens E through the layer's per-layer projections), λ and α. `base`, when given, is the
host's plain attention output softmax(qKᵀ/√d)V for the same rows; only the difference a mechanism
makes is added to it.

    decoupled        out = base + scale · Σ_subjects softmax(q K̆ᵀ/√d) V̆           (positions, λ, α unused)
    global V         V[s*] ← g = mean_i V̆_i = W_V̆ mean(E), for every query;   l_s* ← max(l, λl)
    multiple tokens  s* replaced by M tokens, keys all k[s*], values V̆_i;      l ← max(l, λl) on each

Global V and multiple tokens replace s*'s value by one vector u (the same for every query), so both
are computed in one exact cheap form: out = P' V + P'[:, S] (U − V[S]), P' the softmax of the
(boosted) logits, and for multiple tokens the M copies of one key are one column with logit
l̃ + log M (M equal terms e^l̃ in the softmax's sum).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..nested_core.attention import NestedKV, _boosted_logits, _check, _heads


def _plain(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
    return rearrange(out, "b h n d -> b n (h d)")


def decoupled_attention(
    q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], *, heads: int, base: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """IP-Adapter's decoupled cross-attention (Ye et al. 2023; the paper's "Decoupled CA"): a second attention of
    the same queries over the subject tokens, added to the text attention with weight `scale` (Fig. 10 sweeps
    0.5–1.0). Every query gets it, wherever the bound word is: the positions, λ and α of the subjects are unused."""
    _check(q, k, v, subjects, heads)
    if base is None:
        base = _plain(q, k, v, heads)
    if scale == 0.0 or not subjects:  # exactly the base model
        return base
    qh = _heads(q, heads)
    extra = sum(
        F.scaled_dot_product_attention(qh, _heads(s.keys.to(q.dtype)[None], heads), _heads(s.values.to(q.dtype)[None], heads))
        for s in subjects
    )  # [b,h,n,d]
    return torch.add(base, rearrange(extra, "b h n d -> b n (h d)"), alpha=scale)


def global_v_attention(
    q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], *, heads: int, base: Tensor | None = None, query_chunk: int = 1024
) -> Tensor:
    """The paper's "Global V": s*'s value is g = W_V̆ mean(E) (computed as mean_i V̆_i, equal by linearity), one
    vector for every query, rescaled to α·|V[s*]| when α is set; λ raises s*'s logit as in nested attention.
    It is nested attention with a uniform nested softmax (all nested keys equal)."""
    _check(q, k, v, subjects, heads)
    acc = torch.promote_types(q.dtype, torch.float32)
    replaced = []
    for s in subjects:
        g = s.values.to(acc).mean(dim=0)  # [C]
        replaced.append(_at_positions(g if s.alpha is None else _unit(g), v, s))  # [b,S,C]
    return _constant_values_attention(q, k, v, subjects, replaced, [0.0] * len(subjects), heads=heads, base=base, query_chunk=query_chunk)


def multiple_tokens_attention(
    q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], *, heads: int, base: Tensor | None = None, query_chunk: int = 1024
) -> Tensor:
    """The paper's "Multiple Tokens": "replacing the subject's token in the prompt with one token for each of the
    encoder's outputs [...] we fix the keys of these tokens to the key of the original subject, but maintain a
    different encoder-produced value for each" (Sec. 5.2). So each copy of s* is gone from the context (its text
    value V[s*] is not kept) and M tokens stand in its place, with key k[s*] and values V̆_1..V̆_M; λ applies to
    each added token's logit. With α set, each added value is rescaled to α·|V[s*]|, the value-norm
    regularisation the other mechanisms get (the paper trains all of them in the same setting); α=None: V̆ as is.

    Equal keys give the M tokens equal weights, so the result is that of ONE token with value mean_i(ṽ_i) and
    logit l̃ + log M (computed so, exactly; the test checks it against the literal extended context)."""
    _check(q, k, v, subjects, heads)
    acc = torch.promote_types(q.dtype, torch.float32)
    replaced, log_counts = [], []
    for s in subjects:
        values = s.values.to(acc)  # [M,C]
        # with α each token is rescaled before the average: mean_i(V̆_i / |V̆_i|) · α|V[s*]|
        replaced.append(_at_positions((values if s.alpha is None else _unit(values)).mean(dim=0), v, s))
        log_counts.append(math.log(values.shape[0]))
    return _constant_values_attention(q, k, v, subjects, replaced, log_counts, heads=heads, base=base, query_chunk=query_chunk)


def _unit(x: Tensor) -> Tensor:
    """x / |x| over the last (whole inner) dim; a zero vector stays zero."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def _at_positions(value: Tensor, v: Tensor, s: NestedKV) -> Tensor:
    """The replacement value [C] at every position of `s` -> [b,S,C]; with α set, `value` is a direction
    scaled to α·|V[p]| (one norm per token over all heads, as nested attention's regulariser)."""
    b, size = v.shape[0], len(s.positions)
    if s.alpha is None:
        return value.expand(b, size, -1)
    index = torch.as_tensor(list(s.positions), device=v.device)
    return value * (s.alpha * v.index_select(1, index).to(value.dtype).norm(dim=-1, keepdim=True))  # [C]·[b,S,1]


def _constant_values_attention(
    q: Tensor, k: Tensor, v: Tensor, subjects: Sequence[NestedKV], replaced: Sequence[Tensor], log_counts: Sequence[float],
    *, heads: int, base: Tensor | None, query_chunk: int,
) -> Tensor:
    """Text attention whose subject columns carry a query-independent value U [b,S,C] and logit l̃ + log_count."""
    if not subjects:
        return base if base is not None else _plain(q, k, v, heads)
    b, n, c = q.shape
    scale = (c // heads) ** -0.5
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax and sums in float32 (float64 stays float64)
    kh, vh = _heads(k, heads).to(acc), _heads(v, heads).to(acc)  # [b,h,T,d]
    index = [torch.as_tensor(list(s.positions), device=q.device) for s in subjects]
    # U − V[S] per subject: [b,h,S,d]
    delta = [_heads(u.to(acc), heads) - vh.index_select(2, i) for u, i in zip(replaced, index)]
    reweighted = any(s.lam != 1.0 for s in subjects) or any(log_counts)

    result = torch.empty_like(q)
    for start in range(0, n, query_chunk):
        qc = _heads(q[:, start : start + query_chunk], heads).to(acc)  # [b,h,n,d]
        logits = torch.einsum("bhnd,bhtd->bhnt", qc, kh) * scale  # [b,h,n,T]
        boosted = _boosted_logits(logits, subjects)
        if any(log_counts):
            boosted = boosted + _column_offsets(log_counts, index, logits)
        probs = boosted.softmax(dim=-1)
        if base is None:
            out = probs @ vh
        else:
            out = _heads(base[:, start : start + query_chunk], heads).to(acc)
            if reweighted:  # λ and log M also renormalise every other token's weight
                out = out + (probs - logits.softmax(dim=-1)) @ vh
        for i, dv in zip(index, delta):
            out = out + probs.index_select(-1, i) @ dv  # + P'[:,s]·(u − V[s])
        result[:, start : start + query_chunk] = rearrange(out, "b h n d -> b n (h d)")
    return result


def _column_offsets(log_counts: Sequence[float], index: Sequence[Tensor], like: Tensor) -> Tensor:
    """[T]: log_count on each subject's columns, 0 elsewhere (broadcast over the logits)."""
    offsets = torch.zeros(like.shape[-1], dtype=like.dtype, device=like.device)
    for count, i in zip(log_counts, index):
        offsets[i] = count
    return offsets


__all__ = ["NestedKV", "decoupled_attention", "global_v_attention", "multiple_tokens_attention"]
