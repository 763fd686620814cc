"""The harder world of the comparison (issue 9): part labels of the renders, part codes, and the per-query
injection the harder world's UNet is trained and told with (miniworld.identity_codes)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from miniworld import world
from miniworld.identity_codes import CodedRow, IdentityCodes, PartCodeInjection

# sha256 of 42 renders (2 domains x 3 identities x 7 styles, 128 px) made before part labels existed: the label
# mode shares the drawing code and must leave every colour render byte for byte as it was (the shipped models
# were trained on these renders)
RENDERS_BEFORE_PARTS = "0726ad0723023780905f147f70116b4be10ce3d799397b5b0e128787687fc263"


def _cases(domain: str):
    for k, identity in enumerate(world.eval_identities(domain, 3)):
        for style in world.SCENE_FIELDS["style"]:
            yield identity, world.Scene(("striped", "red", "checkered")[k], ("left", "center", "right")[k], ("small", "large")[k % 2], style), k


def test_part_labels_leave_the_renders_as_they_were() -> None:
    digest = hashlib.sha256()
    for domain in world.DOMAINS:
        for identity, scene, seed in _cases(domain):
            digest.update(world.render(identity, scene, size=128, seed=seed).tobytes())
    assert digest.hexdigest() == RENDERS_BEFORE_PARTS


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_part_labels_cover_the_drawn_subject(domain: str) -> None:
    """Labelled pixels are where the subject is drawn: the pixels a render keeps whatever the background (same
    seed, so the same pose, place and brightness) against the labelled ones (the shirt and hat carry no part)."""
    for identity in world.eval_identities(domain, 4):
        for style in ("none", "upside down", "pixelated"):
            scene = world.Scene("red", "right", "large", style)
            image = world.render(identity, scene, size=128, seed=5).astype(int)
            other = world.render(identity, world.Scene("green", "right", "large", style), size=128, seed=5).astype(int)
            labels = world.render_parts(identity, scene, size=128, seed=5)
            assert labels.shape == (512, 512) and set(np.unique(labels)) <= set(range(len(world.PARTS[domain]) + 1))
            drawn = np.abs(image - other).sum(-1) < 30
            labelled = np.asarray(Image.fromarray(labels).resize((128, 128), Image.NEAREST)) > 0
            assert (labelled & ~drawn).mean() < 0.01, "a part label where nothing is drawn"
            assert labelled.mean() > 0.5 * drawn.mean()
            shares = world.part_fractions(labels, domain, 8)
            assert shares.shape == (len(world.PARTS[domain]), 8, 8) and shares.sum(0).max() <= 1.0 + 1e-6
            assert (shares > 0).sum(axis=(1, 2)).min() >= 1, f"a part of {identity} drawn nowhere in {style}"
            left = shares[:, :, :3].sum()  # the subject stands on the right
            assert left < 0.05 * shares.sum()


def test_part_codes_sum_the_attributes_each_part_shows() -> None:
    torch.manual_seed(0)
    codes = IdentityCodes(16)
    for domain in world.DOMAINS:
        identity = world.eval_identities(domain, 1)[0]
        attrs = torch.tensor([identity.attrs])
        vectors = codes.attribute_vectors(domain, attrs)[0]
        names = [n for n, _ in world.ATTRIBUTES[domain]]
        parts = codes.part_codes(domain, attrs)[0]
        for i, shown in enumerate(world.PARTS[domain].values()):
            assert torch.allclose(parts[i], sum(vectors[names.index(a)] for a in shown))
        assert torch.allclose(codes.code(domain, attrs)[0], vectors.sum(0))
        assert set().union(*world.PARTS[domain].values()) == set(names), "every attribute is shown by some part"


def test_part_code_injection_is_the_per_query_value_swap_in_float64() -> None:
    """Through the host's protocol (attn2 patch, then to_k / to_v, then the replace patch), against the definition:
    a value tensor per query whose subject row is row + Σ_p f_p(q)·code_p rescaled to |row|; other rows untouched."""
    torch.manual_seed(0)
    batch, tokens, width, inner, heads, side = 3, 7, 12, 16, 2, 4
    w_k, w_v = torch.randn(inner, width, dtype=torch.float64), torch.randn(inner, width, dtype=torch.float64)
    context = torch.randn(batch, tokens, width, dtype=torch.float64)
    q = torch.randn(batch, side * side, inner, dtype=torch.float64)
    rows = {0: CodedRow(2, context[0, 2], torch.randn(2, width, dtype=torch.float64), {side: torch.rand(2, side * side, dtype=torch.float64)}),
            2: CodedRow(5, context[2, 5], torch.randn(3, width, dtype=torch.float64), {side: torch.rand(3, side * side, dtype=torch.float64)})}
    injection = PartCodeInjection(rows, n_parts=3)
    _, keys_in, values_in = injection.attn2_patch(q, context, context, {})
    out = injection.attn2_replace(q, keys_in @ w_k.T, values_in @ w_v.T, {"n_heads": heads})

    expected = torch.empty_like(out)
    d = inner // heads
    for b in range(batch):
        keys = context[b] @ w_k.T
        for n in range(side * side):
            rows_in = context[b].clone()
            if b in rows:
                r = rows[b]
                mixed = r.row + (r.fractions[side][:, n, None] * r.codes).sum(0)
                rows_in[r.position] = mixed * r.row.norm() / mixed.norm()
            values = rows_in @ w_v.T
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                expected[b, n, cols] = (q[b, n, cols] @ keys[:, cols].T * d**-0.5).softmax(-1) @ values[:, cols]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    plain = PartCodeInjection({}, n_parts=3)  # no coded rows: plain attention
    _, k2, v2 = plain.attn2_patch(q, context, context, {})
    assert not torch.equal(out[0], plain.attn2_replace(q, k2 @ w_k.T, v2 @ w_v.T, {"n_heads": heads})[0])
    torch.testing.assert_close(out[1], plain.attn2_replace(q, k2 @ w_k.T, v2 @ w_v.T, {"n_heads": heads})[1], rtol=0, atol=1e-12)
