"""The miniature world: deterministic rendering, disjoint identity splits, parseable captions, styles that
change the subject, and (once shipped) metric models that reach their measured accuracy."""
from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
from PIL import Image

from miniworld import world


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_rendering_is_deterministic_and_seeded(domain: str) -> None:
    identity = world.eval_identities(domain, 1)[0]
    scene = world.Scene("striped", "left", "small", "pixelated")
    first = world.render(identity, scene, seed=3)
    assert first.shape == (64, 64, 3) and first.dtype == np.uint8
    assert _digest(first) == _digest(world.render(identity, scene, seed=3))
    assert _digest(first) != _digest(world.render(identity, scene, seed=4))
    assert _digest(world.render_reference(identity, seed=1)) == _digest(world.render_reference(identity, seed=1))
    assert world.render(identity, scene, size=96).shape == (96, 96, 3)


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_identity_index_round_trip_and_splits(domain: str) -> None:
    n = world.num_identities(domain)
    assert n >= 1000
    assert all(world.identity_from_index(domain, i).index == i for i in (0, 1, n // 3, n - 1))
    train = {identity.index for identity in world.train_identities(domain)}
    heldout = {identity.index for identity in world.heldout_identities(domain)}
    assert not train & heldout and len(train | heldout) == n
    assert 0.05 * n < len(heldout) < 0.2 * n
    evaluation = world.eval_identities(domain, 16)
    assert len(evaluation) == 16 and {identity.index for identity in evaluation} <= heldout


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_captions_name_the_subject_once_and_parse_back(domain: str) -> None:
    rng = np.random.default_rng(0)
    word = world.SUBJECT_WORD[domain]
    for k in range(200):
        scene = world.sample_scene(rng)
        text = world.caption(domain, scene, variant=k)
        assert len(re.findall(rf"\b{word}\b", text)) == 1 and text.count(word) == 1, text
        assert world.parse_caption(text) == scene, text
        labels = world.scene_labels(scene)
        assert all(getattr(scene, name) == world.SCENE_FIELDS[name][i] for name, i in labels.items())


@pytest.mark.parametrize("domain", world.DOMAINS)
def test_every_style_changes_the_subject(domain: str) -> None:
    """Same identity, background, position, size and seed: each style must redraw much of the subject."""
    identity = world.eval_identities(domain, 3)[2]  # a colourful one, so grayscale shows
    plain = world.render(identity, world.Scene("blue", "center", "large", "none"), seed=0).astype(int)
    for style in world.SCENE_FIELDS["style"][1:]:
        styled = world.render(identity, world.Scene("blue", "center", "large", style), seed=0).astype(int)
        subject = (np.abs(plain - world.BACKGROUND_COLOURS["blue"]).sum(-1) > 60) | (np.abs(styled - world.BACKGROUND_COLOURS["blue"]).sum(-1) > 60)
        changed = (np.abs(styled - plain).sum(-1) > 60)[subject].mean()
        assert changed > 0.12, (style, changed)


def test_triplets_manifest(tmp_path) -> None:
    manifest = world.make_triplets("pet", tmp_path, 6, seed=1)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 6
    train = {identity.index for identity in world.train_identities("pet")}
    for row in rows:
        assert row["word"] == "dog" and row["caption"].count("dog") == 1
        assert row["identity"] in train
        assert world.parse_caption(row["caption"]) == world.Scene(**row["scene"])
        reference, target = (np.asarray(Image.open(manifest.parent / row[k])) for k in ("input", "target"))
        assert reference.shape == target.shape == (64, 64, 3)
    assert manifest.read_bytes() == world.make_triplets("pet", tmp_path / "again", 6, seed=1).read_bytes()
