"""Two subjects of two domains in one image (issue 9, `--two-domains`): a person on the left and a dog on the right,
each from its own weights file bound to its own word, against each bound alone on the same caption and seed
(miniworld.evaluate.evaluate_two_domains). Each half is scored on its own, the other half painted its background.

The question the paper's multi-subject claim raises: does binding a second subject cost the first one its identity
(leaking into it, or drawing attention away)? So the outcome is, per half, "both bound" minus "its subject bound alone",
paired over the same cases; and "both bound" against the base model told nothing and told both identities.
"""
from __future__ import annotations

import numpy as np

from miniworld import world

from .study_plan import MECHANISMS
from .study_tables import LABELS, default_knob, difference, table

HALVES = {d: f"{world.SUBJECT_WORD[d]} half" for d in world.DOMAINS}
ALONE = {d: f"{world.SUBJECT_WORD[d]} alone" for d in world.DOMAINS}  # = evaluate_two_domains' condition names


def pair_results(results: dict) -> dict[str, dict]:
    """mechanism -> the two-domain result, nested attention first."""
    found = {r["mechanism"]: r for name, r in results.items() if name.startswith("two_domains_")}
    return {m: found[m] for m in MECHANISMS if m in found}


def outcome(results: dict) -> list[str]:
    """Per mechanism and half at the default knob: identity with both bound minus with its subject alone (the cost of
    the second subject), and minus the base model told nothing (what binding gives in a two-subject image)."""
    lines = []
    for m, r in pair_results(results).items():
        knob, s = default_knob(r["mechanism"]), r["scores"]
        if f"both {knob}" not in s:
            continue
        for d in world.DOMAINS:
            both = s[f"both {knob}"][f"{d}_similarity"]
            cost = difference(both, s[f"{ALONE[d]} {knob}"][f"{d}_similarity"], higher="both higher", lower="both lower")
            gain = difference(both, s["no subject"][f"{d}_similarity"], higher="bound higher", lower="bound lower")
            lines.append(f"- {LABELS[m]}, {HALVES[d]}: identity with both bound minus {ALONE[d]} {cost}; "
                         f"minus no subject bound {gain}")
    return lines


def leak_outcome(results: dict) -> list[str]:
    """Binding one subject alone should leave the other half as the base model drew it: per mechanism, how much the
    other half changes (mean absolute pixel change from the no-subject image, 0..1), and nested attention minus each
    other mechanism, paired."""
    runs = {m: r for m, r in pair_results(results).items() if "person_change" in r["scores"]["no subject"]}
    other = dict(zip(world.DOMAINS, reversed(world.DOMAINS)))  # the half a binding should leave alone
    def changes(r: dict) -> dict[str, list]:  # bound domain -> per-case change of the other half
        return {d: r["scores"][f"{ALONE[d]} {default_knob(r['mechanism'])}"][f"{other[d]}_change"] for d in world.DOMAINS}
    lines = [f"- {LABELS[m]}: " + "; ".join(f"{ALONE[d]} changes the {HALVES[other[d]]} by {np.mean(v):.3f}" for d, v in changes(r).items())
             for m, r in runs.items()]
    if "nested" in runs:
        ours = changes(runs["nested"])
        for m, r in runs.items():
            if m != "nested":
                lines.append(f"- the other half's change, nested attention minus {LABELS[m]}: " + "; ".join(
                    f"{ALONE[d]} {difference(ours[d], v, higher='nested changes it more', lower='nested changes it less')}"
                    for d, v in changes(r).items()))
    return lines


def pair_table(results: dict) -> str:
    rows, keys = [], ("similarity", "domain", "prompt", "change")
    for m, r in pair_results(results).items():
        for c, s in r["scores"].items():
            rows.append([LABELS[m], c] + [f"{np.mean(s[f'{d}_{k}']):.3f}" if f"{d}_{k}" in s else "" for k in keys for d in world.DOMAINS])
    names = ("identity", "read as its subject", "prompt", "pixel change from no subject")
    header = ["mechanism", "condition", *(f"{HALVES[d]}: {k}" for k in names for d in world.DOMAINS)]
    return table(header, rows) if rows else ""


def grid_columns(result: dict, pictures: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """The columns of a mechanism's two-subject grid: both references, the base model told nothing and told both, then
    both bound and each alone at the default knob."""
    knob = default_knob(result["mechanism"])
    names = ["no subject", "oracle, both", f"both {knob}", *(f"{ALONE[d]} {knob}" for d in world.DOMAINS)]
    return ([(f"reference ({world.SUBJECT_WORD[d]})", pictures[f"reference_{d}"]) for d in world.DOMAINS] +
            [(name, pictures[name]) for name in names if name in pictures])


__all__ = ["pair_results", "outcome", "leak_outcome", "pair_table", "grid_columns"]
