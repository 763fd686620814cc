"""nested_core.attention against a hand-written float64 reference of the paper's definition."""
import pytest
import torch

from training.host import pack_module

core = pack_module("nested_core")
NestedKV = core.NestedKV

F64 = torch.float64


def reference(q, k, v, subjects, heads):
    """Literal per-query loops: logits with max(l, λl), softmax, V_q[s*] = v*_q rescaled to α|V[s*]|."""
    B, N, C = q.shape
    d = C // heads
    out = torch.zeros_like(q)
    for b in range(B):
        for n in range(N):
            # the nested value of each subject for this query, all heads, then one norm over C
            nested = {}
            for i, s in enumerate(subjects):
                parts = []
                for h in range(heads):
                    sl = slice(h * d, (h + 1) * d)
                    w = torch.softmax(s.keys[:, sl] @ q[b, n, sl] / d**0.5, dim=0)
                    parts.append(w @ s.values[:, sl])
                nested[i] = torch.cat(parts)
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                logits = k[b, :, sl] @ q[b, n, sl] / d**0.5
                values = [v[b, t, sl] for t in range(k.shape[1])]
                for i, s in enumerate(subjects):
                    for p in s.positions:
                        logits[p] = max(logits[p], s.lam * logits[p])
                        vec = nested[i]
                        if s.alpha is not None:
                            vec = vec / vec.norm() * s.alpha * v[b, p].norm()
                        values[p] = vec[sl]
                probs = torch.softmax(logits, dim=0)
                out[b, n, sl] = sum(pr * val for pr, val in zip(probs, values))
    return out


def make(seed=0, B=2, N=9, T=154, heads=3, d=4, M=5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    C = heads * d
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, N, C), r(B, T, C), r(B, T, C), (lambda: (r(M, C), r(M, C)))


def two_subjects(kv, lam=2.5, alpha=2.0):
    # subject 1 at token 5 of a 77-token context repeated twice (5 and 82); subject 2 at token 9 (and 86)
    (k1, v1), (k2, v2) = kv(), kv()
    return [NestedKV([5, 82], k1, v1, lam=lam, alpha=alpha), NestedKV([9, 86], k2, v2, lam=1.0, alpha=None)]


def plain(q, k, v, heads):
    return core.nested_attention(q, k, v, [], heads=heads)


@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 1.0, 2.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_cheap_form_equals_definition_float64(lam, alpha, with_base):
    q, k, v, kv = make()
    subjects = two_subjects(kv, lam=lam, alpha=alpha)
    base = plain(q, k, v, 3) if with_base else None
    got = core.nested_attention(q, k, v, subjects, heads=3, base=base, query_chunk=4)
    want = reference(q, k, v, subjects, heads=3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_naive_form_equals_definition_float64():
    q, k, v, kv = make(seed=1)
    subjects = two_subjects(kv)
    torch.testing.assert_close(core.nested_attention_naive(q, k, v, subjects, heads=3), reference(q, k, v, subjects, 3), rtol=1e-12, atol=1e-12)


def test_query_chunking_does_not_change_the_result():
    q, k, v, kv = make(seed=2, N=50)
    subjects = two_subjects(kv)
    whole = core.nested_attention(q, k, v, subjects, heads=3, query_chunk=4096)
    for chunk in (1, 7, 49):
        torch.testing.assert_close(core.nested_attention(q, k, v, subjects, heads=3, query_chunk=chunk), whole, rtol=0, atol=1e-14)


def test_nested_value_equal_to_text_value_is_the_identity():
    """v*_q = V[s*] (all nested values equal that vector), λ = 1, α = 1: plain cross-attention."""
    q, k, v, _ = make(seed=3, B=1)
    k[:, 77:], v[:, 77:] = k[:, :77], v[:, :77]  # a 77-token context repeated to 154, as the host batches it
    M = 6
    subject = NestedKV([5, 82], torch.randn(M, 12, dtype=F64), v[0, 5].expand(M, -1).clone(), lam=1.0, alpha=1.0)
    torch.testing.assert_close(core.nested_attention(q, k, v, [subject], heads=3), plain(q, k, v, 3), rtol=1e-12, atol=1e-12)


def test_lambda_never_lowers_a_negative_logit():
    """max(l, λl): with every logit of the subject negative, λ > 1 changes nothing."""
    q, k, v, kv = make(seed=4, B=1, N=3, T=77)
    q, k[:, 5] = q.abs(), -k[:, 5].abs()  # q·k[5] < 0 for every query and head
    nk, nv = kv()
    same = [core.nested_attention(q, k, v, [NestedKV([5], nk, nv, lam=lam)], heads=3) for lam in (1.0, 4.0)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=0)


def test_lambda_raises_the_subject_share():
    q, k, v, kv = make(seed=5, B=1, N=4, T=77)
    q, k[:, 5] = q.abs(), k[:, 5].abs()  # positive subject logits
    nk, nv = kv()
    out1 = core.nested_attention(q, k, v, [NestedKV([5], nk, nv, lam=1.0, alpha=None)], heads=3)
    out4 = core.nested_attention(q, k, v, [NestedKV([5], nk, nv, lam=4.0, alpha=None)], heads=3)
    nested_only = core.nested_attention(q, k, v, [NestedKV(list(range(77)), nk, nv, alpha=None)], heads=3)
    assert (out4 - nested_only).norm() < (out1 - nested_only).norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_close_and_keep_dtype(dtype):
    q, k, v, kv = make(seed=6)
    subjects = two_subjects(kv)
    want = reference(q, k, v, subjects, 3)
    cast = [NestedKV(s.positions, s.keys.to(dtype), s.values.to(dtype), s.lam, s.alpha) for s in subjects]
    got = core.nested_attention(q.to(dtype), k.to(dtype), v.to(dtype), cast, heads=3)
    assert got.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_gradients_reach_the_nested_keys_and_values():
    q, k, v, kv = make(seed=7, B=1)
    nk, nv = (t.requires_grad_() for t in kv())
    core.nested_attention(q, k, v, [NestedKV([5], nk, nv)], heads=3).square().sum().backward()
    assert nk.grad.abs().sum() > 0 and nv.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "subjects, message",
    [
        (lambda kv: [NestedKV([200], *kv())], "do not fit a context of 154"),
        (lambda kv: [NestedKV([], *kv())], "do not fit"),
        (lambda kv: [NestedKV([5], *kv()), NestedKV([5, 9], *kv())], "same token position"),
        (lambda kv: [NestedKV([5], torch.zeros(4, 8, dtype=F64), torch.zeros(4, 8, dtype=F64))], r"must be \[M, 12\]"),
    ],
)
def test_bad_input_is_named(subjects, message):
    q, k, v, kv = make()
    with pytest.raises(ValueError, match=message):
        core.nested_attention(q, k, v, subjects(kv), heads=3)


def test_heads_must_divide_width():
    q, k, v, _ = make()
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        core.nested_attention(q, k, v, [], heads=5)
