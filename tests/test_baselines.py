"""baselines/: each comparison mechanism of the paper (Fig. 10) against a hand-written float64 per-query
reference of its definition, the identities that tie it to nested attention or to the base model, and its
patch on the tiny SDXL (bound rows change, unbound and negative rows stay bit-identical)."""
import math
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.host import pack_module, setup_comfyui

setup_comfyui(cpu=True)

from comfy.ldm.modules.attention import optimized_attention  # noqa: E402

from training import tiny  # noqa: E402
from sampling_helpers import encode  # noqa: E402
from sampling_helpers import sample as _sample  # noqa: E402

core = pack_module("nested_core")
baselines = pack_module("baselines")
bpatch = pack_module("baselines.patch")
patch_mod = pack_module("nodes.patch")
apply_mod = pack_module("nodes.apply")
prompt_mod = pack_module("nodes.prompt")
NestedKV = core.NestedKV

F64 = torch.float64
HEADS = 3
EXACT = dict(rtol=1e-12, atol=1e-12)


# --- float64 references: literal loops over rows, queries and heads ---------------------------------
def split(x, h, d=4):
    return x[..., h * d : (h + 1) * d]


def reference_plain(q, k, v, b, n, h):
    w = torch.softmax(split(k[b], h) @ split(q[b, n], h) / 2.0, dim=0)  # d = 4: √d = 2
    return w @ split(v[b], h)


def reference_decoupled(q, k, v, subjects, scale):
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for n in range(q.shape[1]):
            for h in range(HEADS):
                value = reference_plain(q, k, v, b, n, h)
                for s in subjects:
                    w = torch.softmax(split(s.keys, h) @ split(q[b, n], h) / 2.0, dim=0)
                    value = value + scale * (w @ split(s.values, h))
                out[b, n, h * 4 : (h + 1) * 4] = value
    return out


def reference_extended(q, k, v, contexts):
    """Attention of each query over an explicit per-row context: contexts[b] = (keys [T',C], values [T',C], λ [T'])."""
    out = torch.zeros_like(q)
    for b, (keys, values, lams) in enumerate(contexts):
        for n in range(q.shape[1]):
            for h in range(HEADS):
                logits = split(keys, h) @ split(q[b, n], h) / 2.0
                logits = torch.maximum(logits, logits * lams)
                out[b, n, h * 4 : (h + 1) * 4] = torch.softmax(logits, dim=0) @ split(values, h)
    return out


def reference_global_v(q, k, v, subjects):
    """Same context; V[p] ← g = W_V̆ mean(E) (here mean of V̆), rescaled to α|V[p]|; λ on p's logit."""
    contexts = []
    for b in range(q.shape[0]):
        values, lams = v[b].clone(), torch.ones(k.shape[1], dtype=F64)
        for s in subjects:
            g = s.values.mean(dim=0)
            for p in s.positions:
                values[p] = g if s.alpha is None else g / g.norm() * s.alpha * v[b, p].norm()
                lams[p] = s.lam
        contexts.append((k[b], values, lams))
    return reference_extended(q, k, v, contexts)


def reference_multiple_tokens(q, k, v, subjects):
    """The literal extended context: each bound position removed, M tokens (key k[p], values V̆_i) appended."""
    contexts = []
    for b in range(q.shape[0]):
        bound = {p for s in subjects for p in s.positions}
        keep = [t for t in range(k.shape[1]) if t not in bound]
        keys, values, lams = [k[b, keep]], [v[b, keep]], [torch.ones(len(keep), dtype=F64)]
        for s in subjects:
            for p in s.positions:
                m = s.values.shape[0]
                added = s.values
                if s.alpha is not None:
                    added = s.values / s.values.norm(dim=-1, keepdim=True) * s.alpha * v[b, p].norm()
                keys.append(k[b, p].expand(m, -1))
                values.append(added)
                lams.append(torch.full((m,), s.lam, dtype=F64))
        contexts.append((torch.cat(keys), torch.cat(values), torch.cat(lams)))
    return reference_extended(q, k, v, contexts)


def make(seed=0, B=2, N=7, T=154, M=5):
    g = torch.Generator().manual_seed(seed)
    C = HEADS * 4
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    return r(B, N, C), r(B, T, C), r(B, T, C), (lambda m=M: (r(m, C), r(m, C)))


def two_subjects(kv, lam=2.5, alpha=2.0):
    # subject 1 at token 5 of a 77-token context repeated twice (5 and 82); subject 2 at token 9 (and 86), M = 3
    (k1, v1), (k2, v2) = kv(), kv(3)
    return [NestedKV([5, 82], k1, v1, lam=lam, alpha=alpha), NestedKV([9, 86], k2, v2, lam=1.0, alpha=None)]


def plain(q, k, v):
    return core.nested_attention(q, k, v, [], heads=HEADS)


# --- functional forms ---------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.5, 1.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_decoupled_equals_definition_float64(scale, with_base):
    q, k, v, kv = make()
    subjects = two_subjects(kv)
    got = baselines.decoupled_attention(q, k, v, subjects, heads=HEADS, base=plain(q, k, v) if with_base else None, scale=scale)
    torch.testing.assert_close(got, reference_decoupled(q, k, v, subjects, scale), **EXACT)


def test_decoupled_at_scale_zero_is_the_base_exactly_and_ignores_the_bound_position():
    q, k, v, kv = make(seed=1)
    subjects = two_subjects(kv)
    base = plain(q, k, v)
    assert torch.equal(baselines.decoupled_attention(q, k, v, subjects, heads=HEADS, base=base, scale=0.0), base)
    assert torch.equal(baselines.decoupled_attention(q, k, v, subjects, heads=HEADS, scale=0.0), base)
    # IP-Adapter style: every query gets the subject, wherever (and whatever λ, α) the bound word has
    moved = [NestedKV([40], s.keys, s.values, lam=4.0, alpha=None) for s in subjects[:1]] + subjects[1:]
    one = baselines.decoupled_attention(q, k, v, subjects, heads=HEADS, base=base)
    assert not torch.equal(one, base)
    torch.testing.assert_close(baselines.decoupled_attention(q, k, v, moved, heads=HEADS, base=base), one, **EXACT)


@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_global_v_equals_definition_float64(lam, alpha, with_base):
    q, k, v, kv = make(seed=2)
    subjects = two_subjects(kv, lam=lam, alpha=alpha)
    base = plain(q, k, v) if with_base else None
    got = baselines.global_v_attention(q, k, v, subjects, heads=HEADS, base=base, query_chunk=3)
    torch.testing.assert_close(got, reference_global_v(q, k, v, subjects), **EXACT)


@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 1.0, 2.0])
def test_global_v_is_nested_attention_with_all_nested_keys_equal(lam, alpha):
    """Equal nested keys make the nested softmax uniform: v*_q = mean_i V̆_i = W_V̆ mean(E) for every query."""
    q, k, v, kv = make(seed=3)
    subjects = [NestedKV(s.positions, s.keys[:1].expand_as(s.keys).clone(), s.values, lam=s.lam, alpha=s.alpha)
                for s in two_subjects(kv, lam=lam, alpha=alpha)]
    want = core.nested_attention(q, k, v, subjects, heads=HEADS, base=plain(q, k, v))
    torch.testing.assert_close(baselines.global_v_attention(q, k, v, subjects, heads=HEADS, base=plain(q, k, v)), want, **EXACT)
    # with the subject's own (different) keys the two differ: the test can tell the mechanisms apart
    own = two_subjects(kv, lam=lam, alpha=alpha)
    gap = baselines.global_v_attention(q, k, v, own, heads=HEADS) - core.nested_attention(q, k, v, own, heads=HEADS)
    assert gap.abs().max() > 1e-3


def test_global_v_uses_the_projected_mean_subject_token():
    """g = W_V̆ · mean(E): projecting the mean token is the mean of the projected tokens (linearity)."""
    q, k, v, _ = make(seed=4)
    g = torch.Generator().manual_seed(4)
    tokens, w_v = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(HEADS * 4, 8, generator=g, dtype=F64)
    subject = NestedKV([5], torch.zeros(6, HEADS * 4, dtype=F64), tokens @ w_v.T, alpha=None)
    got = baselines.global_v_attention(q, k, v, [subject], heads=HEADS)
    values = v.clone()
    values[:, 5] = w_v @ tokens.mean(dim=0)
    torch.testing.assert_close(got, plain(q, k, values), **EXACT)


@pytest.mark.parametrize("lam", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("with_base", [False, True])
def test_multiple_tokens_equals_the_literal_extended_context_float64(lam, alpha, with_base):
    q, k, v, kv = make(seed=5)
    subjects = two_subjects(kv, lam=lam, alpha=alpha)
    base = plain(q, k, v) if with_base else None
    got = baselines.multiple_tokens_attention(q, k, v, subjects, heads=HEADS, base=base, query_chunk=3)
    torch.testing.assert_close(got, reference_multiple_tokens(q, k, v, subjects), **EXACT)


@pytest.mark.parametrize("lam", [1.0, 3.0])
def test_multiple_tokens_with_one_token_replaces_the_value_only(lam):
    """M = 1 with key k[s*]: the context keeps its length; only V[s*] becomes V̆_1 (so also = global V)."""
    q, k, v, kv = make(seed=6)
    _, values = kv(1)
    subject = NestedKV([5, 82], torch.zeros_like(values), values, lam=lam, alpha=None)
    got = baselines.multiple_tokens_attention(q, k, v, [subject], heads=HEADS)
    v_new = v.clone()
    v_new[:, [5, 82]] = values[0]
    lams = torch.ones(k.shape[1], dtype=F64)
    lams[[5, 82]] = lam
    torch.testing.assert_close(got, reference_extended(q, k, v, [(k[b], v_new[b], lams) for b in range(2)]), **EXACT)
    torch.testing.assert_close(got, baselines.global_v_attention(q, k, v, [subject], heads=HEADS), **EXACT)


def test_no_subjects_and_query_chunking():
    q, k, v, kv = make(seed=7)
    base = plain(q, k, v)
    for f in (baselines.decoupled_attention, baselines.global_v_attention, baselines.multiple_tokens_attention):
        assert torch.equal(f(q, k, v, [], heads=HEADS, base=base), base)
        torch.testing.assert_close(f(q, k, v, [], heads=HEADS), base, **EXACT)
    subjects = two_subjects(kv)
    for f in (baselines.global_v_attention, baselines.multiple_tokens_attention):
        torch.testing.assert_close(f(q, k, v, subjects, heads=HEADS, query_chunk=2), f(q, k, v, subjects, heads=HEADS), **EXACT)


@pytest.mark.parametrize("name", ["decoupled_attention", "global_v_attention", "multiple_tokens_attention"])
def test_float32_follows_float64_and_gradients_reach_the_subject(name):
    q, k, v, kv = make(seed=8)
    subjects = two_subjects(kv)
    f = getattr(baselines, name)
    want = f(q, k, v, subjects, heads=HEADS)
    values = subjects[0].values.float().requires_grad_()
    s32 = [replace(subjects[0], keys=subjects[0].keys.float(), values=values),
           replace(subjects[1], keys=subjects[1].keys.float(), values=subjects[1].values.float())]
    got = f(q.float(), k.float(), v.float(), s32, heads=HEADS, base=plain(q, k, v).float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    got.square().sum().backward()
    assert values.grad is not None and values.grad.abs().sum() > 0


# --- patches on the tiny SDXL ---------------------------------------------------------------------
MECHANISMS = ["decoupled", "global_v", "multiple_tokens"]
FUNCTIONS = {"decoupled": baselines.decoupled_attention, "global_v": baselines.global_v_attention,
             "multiple_tokens": baselines.multiple_tokens_attention}


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_sdxl(0)


@pytest.fixture(scope="module")
def clip():
    return tiny.tiny_clip(0)


def sample(*args, steps=2, **kwargs):  # two steps are enough here
    return _sample(*args, steps=steps, **kwargs)


def test_mechanisms_table_for_the_training_loop(model):
    assert bpatch.MECHANISMS["nested"] is patch_mod.NestedAttentionPatch  # the same class the nodes and training use
    assert set(bpatch.MECHANISMS) == {"nested", *MECHANISMS}
    keys = list(core.attn2_layers(model.model.diffusion_model))
    for name, cls in bpatch.MECHANISMS.items():
        patch = cls(layers=keys)
        assert isinstance(patch, patch_mod.NestedAttentionPatch) and patch.layers == set(keys)
    assert bpatch.MECHANISMS["decoupled"](layers=keys, scale=0.6).scale == 0.6
    with pytest.raises(ValueError, match="unknown mechanism"):
        bpatch.apply_mechanism(model, "simple_adapter")


def test_the_product_path_never_imports_baselines():
    """The nodes and the core never reach baselines/ (training does, for --mechanism, only when asked)."""
    root = Path(__file__).resolve().parents[1]
    for folder in ("nodes", "nested_core"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            assert "import baselines" not in text and "baselines." not in text.replace("baselines/", ""), path


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_patch_rows_follow_their_uuid_and_match_the_functional_form(model, mechanism):
    """Direct call with the host's protocol: only the bound chunk changes, by exactly the mechanism's formula."""
    weights = tiny.make_tiny_weights(model)
    subject = patch_mod.Subject(weights, torch.randn(8, 64, generator=torch.Generator().manual_seed(0))).with_lambda(2.0)
    patch = bpatch.MECHANISMS[mechanism](layers=list(core.attn2_layers(model.model.diffusion_model)))
    order = [1, 0, 0]  # negative, bound positive, unbound positive
    uuids = [uuid.uuid4() for _ in order]
    rows, heads, inner = 2, 8, 128  # the tiny UNet's input 7 width
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(rows * 3, n, inner, generator=g) for n in (16, 154, 154))
    extra = {
        "block": ("input", 7), "block_index": 3, "n_heads": heads, "dim_head": inner // heads, "attn_precision": None,
        "cond_or_uncond": order, "uuids": uuids, "sigmas": torch.tensor([5.0]),
        patch_mod.UUID_MAP: {uuids[1]: (patch_mod.Binding(subject, (4,), 77),)},
    }
    with patch.run():
        out = patch(q, k, v, extra)
        with torch.inference_mode():  # the sampler's mode: bound rows written into the base output in place
            assert torch.equal(patch(q, k, v, extra), out)
    reference = optimized_attention(q, k, v, heads)
    bound = slice(rows, 2 * rows)
    assert torch.equal(out[:rows], reference[:rows]) and torch.equal(out[2 * rows :], reference[2 * rows :])
    keys, values = (t.double() for t in weights.project(("input", 7, 3), subject.tokens))
    s = NestedKV([4, 81], keys, values, lam=2.0, alpha=weights.config.alpha)
    want = FUNCTIONS[mechanism](q[bound].double(), k[bound].double(), v[bound].double(), [s], heads=heads)
    assert not torch.equal(out[bound], reference[bound])
    torch.testing.assert_close(out[bound].double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_patch_changes_the_bound_image_and_leaves_negative_and_unbound_rows_bit_identical(model, clip, mechanism):
    weights = tiny.make_tiny_weights(model)
    positive, negative = encode(clip, "a person"), encode(clip, "low quality, " * 10)
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 3), "person", 0)
    patched = bpatch.apply_mechanism(model, mechanism)
    assert all(isinstance(p, bpatch.MECHANISMS[mechanism])
               for p in patched.model_options["transformer_options"]["patches_replace"]["attn2"].values())
    plain_rec, rec = [], []
    sample(model, positive, negative, record=plain_rec, steps=1)
    sample(patched, bound, negative, record=rec, steps=1)
    assert torch.equal(plain_rec[0][1], rec[0][1])  # first step: the negative's prediction is untouched
    assert (plain_rec[0][0] - rec[0][0]).abs().max() > 1e-3  # while the bound positive is personalised
    # cfg 1: only the positive runs; unbound, it is bit-identical to the unpatched model
    assert torch.equal(sample(model, positive, negative, cfg=1.0), sample(patched, positive, negative, cfg=1.0))


def test_decoupled_patch_at_scale_zero_samples_the_base_model_exactly(model, clip):
    weights = tiny.make_tiny_weights(model)
    positive, negative = encode(clip, "a person"), encode(clip, "")
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(16, 64) * 3), "person", 0)
    unpatched = sample(model, positive, negative)
    assert torch.equal(sample(bpatch.apply_mechanism(model, "decoupled", scale=0.0), bound, negative), unpatched)
    assert not torch.equal(sample(bpatch.apply_mechanism(model, "decoupled", scale=0.5), bound, negative), unpatched)


def test_apply_mechanism_keeps_the_window_and_leaves_the_input_model_alone(model, clip):
    weights = tiny.make_tiny_weights(model)
    positive, negative = encode(clip, "a person"), encode(clip, "")
    bound = prompt_mod.bind_subject(positive, patch_mod.Subject(weights, torch.randn(8, 64) * 3), "person", 0)
    plain_rec, late = [], []
    sample(model, positive, negative, record=plain_rec, steps=4)
    sample(bpatch.apply_mechanism(model, "global_v", 0.5, 1.0), bound, negative, record=late, steps=4)
    assert torch.equal(plain_rec[0][0], late[0][0])  # step 1 (sigma above the start) untouched
    assert not torch.equal(plain_rec[-1][0], late[-1][0])
    assert "attn2" not in model.model_options.get("transformer_options", {}).get("patches_replace", {})
    with pytest.raises(ValueError, match="already has Apply Nested Attention"):
        bpatch.apply_mechanism(bpatch.apply_mechanism(model, "multiple_tokens"), "decoupled")
    assert math.isfinite(bpatch.apply_mechanism(model, "decoupled", scale=0.7).model_options["transformer_options"]
                         ["patches_replace"]["attn2"][("input", 4, 0)].scale)
