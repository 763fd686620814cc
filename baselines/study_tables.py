"""The study's tables, from the stored per-case scores (docs/results/study/*.json): every condition with its
interval, nested attention minus each other mechanism paired case by case, the ablations, photos, mixing, times.

Intervals: 95 % bootstrap over held-out identities (one case per identity), miniworld.evaluate.bootstrap_ci.
"""
from __future__ import annotations

import json

import numpy as np

from miniworld.evaluate import bootstrap_ci

from .study_plan import MECHANISMS, PHOTOS, Layout

LABELS = {"nested": "nested attention", "decoupled": "decoupled CA", "global_v": "global V", "multiple_tokens": "multiple tokens"}
METRICS = ("identity_similarity", "prompt_accuracy")


def default_knob(mechanism: str) -> str:
    """A condition's knob suffix at the default setting: 'scale=1' for decoupled CA (its output scale), else 'λ=1'."""
    return "scale=1" if mechanism == "decoupled" else "λ=1"


def difference(ours, theirs, *, higher: str, lower: str) -> str:
    """Paired difference ours minus theirs (per case), its interval, and the verdict: `higher` / `lower` where the
    interval leaves 0, else 'not separated'."""
    mean, lo, hi = bootstrap_ci(np.subtract(ours, theirs))
    verdict = higher if lo > 0 else lower if hi < 0 else "not separated"
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}] ({verdict})"


def load(layout: Layout) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(layout.results.glob("*.json")) if p.stem not in ("times", "study")}


def sweep(result: dict, prefix: str) -> list[tuple[str, float]]:
    """(condition, knob value) of the conditions '<prefix> λ=v' / '<prefix> scale=v', in the stored order."""
    out = []
    for name in result["scores"]:
        head, _, tail = name.rpartition(" ")
        if head == prefix and "=" in tail:
            out.append((name, float(tail.split("=")[1])))
    return out


def ci(result: dict, condition: str, metric: str) -> tuple[float, float, float]:
    return bootstrap_ci(result["scores"][condition][metric])


def cell(c: tuple[float, float, float]) -> str:
    return f"{c[0]:.3f} [{c[1]:.3f}, {c[2]:.3f}]"


def main_runs(results: dict, domain: str) -> dict[str, dict]:
    """mechanism -> result of the domain's mechanism runs (the ablation runs excluded)."""
    found = {r["run"]["mechanism"]: r for r in results.values() if r.get("run", {}).get("domain") == domain and r["run"]["ablation"] is None}
    return {m: found[m] for m in MECHANISMS if m in found}


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main_table(runs: dict[str, dict]) -> str:
    any_run = next(iter(runs.values()))
    rows = [[c, "", *(cell(ci(any_run, c, m)) for m in ("identity_similarity", "identity_attributes", "prompt_accuracy"))]
            for c in ("base", "oracle", "oracle, one vector") if c in any_run["scores"]]
    for m, r in runs.items():
        for c, _ in sweep(r, m):
            rows.append([LABELS[m], c.split(" ", 1)[1], *(cell(ci(r, c, k)) for k in ("identity_similarity", "identity_attributes", "prompt_accuracy"))])
        if "other reference" in r["scores"]:
            rows.append([LABELS[m], "another identity's reference", *(cell(ci(r, "other reference", k)) for k in ("identity_similarity", "identity_attributes", "prompt_accuracy"))])
    return table(["mechanism", "knob", "identity similarity", "identity attributes", "prompt accuracy"], rows)


def paired_table(runs: dict[str, dict]) -> str:
    """Nested attention minus each other mechanism on the same cases (same identities, scenes, seeds), knob by
    knob where both have it (λ), at scale 1 for decoupled CA: paired differences, far tighter than the
    unpaired intervals of the table above."""
    if "nested" not in runs:
        return ""
    nested = dict((v, c) for c, v in sweep(runs["nested"], "nested"))
    rows = []
    for m, r in runs.items():
        if m == "nested":
            continue
        pairs = [(c, nested[v if m != "decoupled" else 1.0]) for c, v in sweep(r, m) if m != "decoupled" or v == 1.0]
        for theirs, ours in pairs:
            if ours not in runs["nested"]["scores"]:
                continue
            diffs = [np.subtract(runs["nested"]["scores"][ours][k], r["scores"][theirs][k]) for k in ("identity_similarity", "prompt_accuracy")]
            rows.append([LABELS[m], f"{theirs.split(' ', 1)[1]} vs nested {ours.split(' ', 1)[1]}",
                         *(f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]" for mean, lo, hi in map(bootstrap_ci, diffs))])
    return table(["other mechanism", "knob", "identity: nested minus other", "prompt: nested minus other"], rows)


def outcome(runs: dict[str, dict], domain: str) -> list[str]:
    """One line per other mechanism at the default knob (λ 1; decoupled: scale 1): the paired difference in identity
    and prompt, and whether its interval leaves 0 (the methods separated on these cases) or not."""
    if "nested" not in runs:
        return []
    lines = []
    for m, r in runs.items():
        theirs = f"{m} {default_knob(m)}"
        if m == "nested" or theirs not in r["scores"] or "nested λ=1" not in runs["nested"]["scores"]:
            continue
        cells = [f"{name} " + difference(runs["nested"]["scores"]["nested λ=1"][k], r["scores"][theirs][k], higher="nested higher", lower="nested lower")
                 for k, name in (("identity_similarity", "identity"), ("prompt_accuracy", "prompt"))]
        lines.append(f"- {domain}, nested attention minus {LABELS[m]}: " + "; ".join(cells))
    return lines


def ablation_table(results: dict, kind: str, key: str) -> str:
    runs = [r for r in results.values() if r.get("run", {}).get("domain") == "person" and r["run"]["mechanism"] == "nested" and r["run"]["ablation"] in (None, kind)]
    runs.sort(key=lambda r: (r["run"][key] is not None, r["run"][key] or 0))
    if len(runs) < 2:
        return ""
    values = [c for c, _ in sweep(runs[0], "nested")]
    label = lambda r: "none" if r["run"][key] is None else f"{r['run'][key]:g}"  # noqa: E731
    rows = [[label(r)] + [f"{ci(r, c, 'identity_similarity')[0]:.3f} / {ci(r, c, 'prompt_accuracy')[0]:.3f}" for c in values] for r in runs]
    default = next(r for r in runs if r["run"]["ablation"] is None)

    def paired(r: dict, c: str, metric: str) -> str:  # minus the default run on the same cases; * where the interval leaves 0
        mean, lo, hi = bootstrap_ci(np.subtract(r["scores"][c][metric], default["scores"][c][metric]))
        return f"{mean:+.3f}{'*' if lo > 0 or hi < 0 else ''}"
    differences = [[label(r)] + [f"{paired(r, c, 'identity_similarity')} / {paired(r, c, 'prompt_accuracy')}" for c in values]
                   for r in runs if r is not default]
    header = [key, *(c.split(" ", 1)[1] for c in values)]
    return (table(header, rows) + f"\n\nMinus the default run ({key} {label(default)}), paired over the same cases "
            "(* : the 95 % interval leaves 0):\n\n" + table(header, differences))


def photos_table(results: dict) -> str:
    rows = []
    for domain in ("person", "pet"):
        for m, r in main_runs(results, domain).items():
            for c, v in sweep(r, m):
                more = f"{PHOTOS} photos {c.split(' ', 1)[1]}"
                if more in r["scores"]:
                    one, three = ci(r, c, "identity_similarity"), ci(r, more, "identity_similarity")
                    rows.append([domain, LABELS[m], c.split(" ", 1)[1], cell(one), cell(three), f"{three[0] - one[0]:+.3f}",
                                 f"{ci(r, c, 'prompt_accuracy')[0]:.3f} / {ci(r, more, 'prompt_accuracy')[0]:.3f}"])
    return table(["domain", "mechanism", "knob", "1 photo: identity", f"{PHOTOS} photos: identity", "change", "prompt (1 / 3)"], rows) if rows else ""


def mixing_table(results: dict) -> str:
    rows = []
    for domain in ("person", "pet"):
        for m, r in main_runs(results, domain).items():
            for c, v in sweep(r, m):
                mix = f"mix {c.split(' ', 1)[1]}"
                if mix in r["scores"]:
                    sim = lambda cond, key: f"{np.mean(r['scores'][cond][key]):.3f}"  # noqa: E731
                    rows.append([domain, LABELS[m], c.split(" ", 1)[1], f"{sim(c, 'identity_similarity')} / {sim(c, 'identity_similarity_other')}",
                                 f"{sim(mix, 'identity_similarity')} / {sim(mix, 'identity_similarity_other')}", sim(mix, "prompt_accuracy")])
        if main_runs(results, domain):
            r = next(iter(main_runs(results, domain).values()))
            for c in ("base", "other reference"):
                rows.append([domain, c, "", f"{np.mean(r['scores'][c]['identity_similarity']):.3f} / {np.mean(r['scores'][c]['identity_similarity_other']):.3f}", "", ""])
    return table(["domain", "mechanism", "knob", "own reference only: sim. to A / to B", "A and B mixed: sim. to A / to B", "mixed: prompt"], rows) if rows else ""


def times_table(times: dict) -> str:
    rows = []
    for key, t in sorted(times.items(), key=lambda kv: ({"world": -1, "data": 0, "train": 1}.get(kv[0].split(' ')[0], 2), kv[0])):
        if key.startswith("world "):
            stage = {"world parts": "part-code", "world pairs": "two-subject"}.get(key, key)
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"the UNet's {stage} stage ({t['minutes']:g} min budget, 2 threads)", ""])
        elif key.startswith("train "):
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"{t.get('steps')} steps at batch {t['batch']}",
                         f"{t['step_s']:.2f} s/step" if t.get("step_s") else ""])
        elif key.startswith("data "):
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"{t['rows']} triplets", ""])
        elif key.startswith("evaluate "):
            rows.append([key, f"{t['seconds'] / 60:.1f} min", f"{t['images']} images, {t['sampling_steps']} sampling steps",
                         f"{t['seconds'] / t['images']:.2f} s/image"])
    return table(["run", "wall time", "work", "rate"], rows) if rows else ""


__all__ = ["LABELS", "METRICS", "default_knob", "difference", "load", "sweep", "ci", "cell", "main_runs", "table", "main_table", "paired_table", "outcome", "ablation_table", "photos_table", "mixing_table", "times_table"]
