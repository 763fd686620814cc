"""The demo world's shipped nested-attention weights personalise (issue 7): on held-out identities, images
made with the nodes' own code (Encode Subject, Attention Scale, Bind Token, Apply Nested Attention, the host's
sampler) look like the reference's identity, more than the base model's and more than the same weights given
another held-out identity's photo, while the prompt is followed as well as by the base model.

Scored by the world's own metrics (miniworld.metrics, validated on held-out renders). The thresholds are set
from the distributions measured on exactly these cases (`python -m miniworld.evaluate --domain D --identities 12
--steps 12 --lambdas 1 2`, tabled in docs/miniworld.md); each is stated next to what was measured.
"""
from __future__ import annotations

import numpy as np
import pytest

from training.host import setup_comfyui

setup_comfyui(cpu=True)

from miniworld import world  # noqa: E402
from miniworld.evaluate import evaluate  # noqa: E402

N_IDENTITIES, STEPS = 12, 12  # a fixed set of held-out identities, one scene each; about 15 s per domain here

# Paired per-case differences of identity similarity (cosine of the metrics' identity embeddings), measured on
# these cases as "mean [95 % bootstrap interval over the 12 cases]"; each threshold sits at about the interval's
# lower end, so a change that loses a third to a half of the effect fails.
MIN_GAIN_OVER_BASE = {"person": 0.06, "pet": 0.035}  # measured +0.120 [+0.065, +0.183], pet +0.074 [+0.035, +0.110]
MIN_GAIN_OVER_OTHER_REFERENCE = {"person": 0.10, "pet": 0.10}  # +0.178 [+0.111, +0.256], pet +0.160 [+0.110, +0.205]
MIN_ORACLE_GAIN = {"person": 0.06, "pet": 0.045}  # the base model told the identity: +0.130 [+0.072, +0.191], pet +0.098 [+0.049, +0.138]
MAX_PROMPT_DROP = 0.05  # base minus nested λ 1 prompt accuracy: measured −0.042 in both domains (nested no worse)
MIN_PROMPT_COST_OF_LAMBDA_2 = 0.10  # λ 1 minus λ 2 prompt accuracy: +0.292 [+0.167, +0.438], pet +0.208 [+0.125, +0.312]


@pytest.fixture(scope="module", params=world.DOMAINS)
def measured(request) -> tuple[str, dict]:
    result = evaluate(request.param, n_identities=N_IDENTITIES, lambdas=(1.0, 2.0), other_lambdas=(1.0,), steps=STEPS)
    return request.param, {c: {k: np.asarray(v) for k, v in s.items() if k != "prompt_fields"} for c, s in result["scores"].items()}


def _identity(scores: dict, condition: str) -> np.ndarray:
    return scores[condition]["identity_similarity"]


def test_the_subject_looks_like_its_reference(measured):
    domain, scores = measured
    gain_over_base = (_identity(scores, "nested λ=1") - _identity(scores, "base")).mean()
    assert gain_over_base > MIN_GAIN_OVER_BASE[domain], gain_over_base


def test_identity_comes_from_the_reference_not_from_the_domain(measured):
    domain, scores = measured
    gain_over_other = (_identity(scores, "nested λ=1") - _identity(scores, "other reference")).mean()
    assert gain_over_other > MIN_GAIN_OVER_OTHER_REFERENCE[domain], gain_over_other


def test_the_prompt_is_followed_as_by_the_base_model(measured):
    _, scores = measured
    drop = scores["base"]["prompt_accuracy"].mean() - scores["nested λ=1"]["prompt_accuracy"].mean()
    assert drop < MAX_PROMPT_DROP, drop


def test_raising_lambda_trades_prompt_accuracy_away(measured):
    # measured, and reported in docs/miniworld.md: λ 1 already reaches most of the oracle's identity here, and
    # λ 2 changes identity similarity within noise (person −0.030 [−0.075, +0.013], pet +0.013 [−0.051, +0.085])
    # while it costs prompt accuracy
    _, scores = measured
    cost = scores["nested λ=1"]["prompt_accuracy"].mean() - scores["nested λ=2"]["prompt_accuracy"].mean()
    assert cost > MIN_PROMPT_COST_OF_LAMBDA_2, cost


def test_the_base_model_reads_identity_from_the_subject_words_value(measured):
    # what nested attention relies on (miniworld.identity_codes): without it no weights could personalise
    domain, scores = measured
    gain = (_identity(scores, "oracle") - _identity(scores, "base")).mean()
    assert gain > MIN_ORACLE_GAIN[domain], gain
