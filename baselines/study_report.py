"""The study's figures, tables and results page, from the stored per-case scores (docs/results/study/*.json) and
images (runs/study/images/*.npz); nothing is sampled here.

    docs/figures/study_tradeoff.png     identity similarity vs prompt accuracy, one curve per mechanism (paper Fig. 10)
    docs/figures/study_ablations.png    the same plane for nested attention's queries and α
    docs/figures/study_matched_<d>.png  each mechanism at the knob value that matches the others' identity level
    docs/figures/study_grid_<run>.png   each mechanism's knob sweep on the first held-out cases
    docs/study.md                       the page: how to regenerate, the tables, each run's time here, the estimate

Intervals: 95 % bootstrap over held-out identities (one case per identity), miniworld.evaluate.bootstrap_ci.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from miniworld.evaluate import bootstrap_ci

from .study_plan import BATCH, MECHANISMS, PHOTOS, ROOT, Layout, default_layout, describe, estimate, hours, measured_rates, plan, read_times

LABELS = {"nested": "nested attention", "decoupled": "decoupled CA", "global_v": "global V", "multiple_tokens": "multiple tokens"}
METRICS = ("identity_similarity", "prompt_accuracy")


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


# ------------------------------------------------------------------------------------------------------- figures
def plane(ax, curves: dict[str, tuple[dict, str]], references: dict | None = None) -> None:
    """One curve per label through its sweep's conditions, error bars both ways; base/oracle as markers."""
    for label, (result, prefix) in curves.items():
        conditions = sweep(result, prefix)
        cis = {m: np.array([ci(result, c, m) for c, _ in conditions]) for m in METRICS}
        x, y = cis["identity_similarity"], cis["prompt_accuracy"]
        ax.errorbar(x[:, 0], y[:, 0], xerr=[x[:, 0] - x[:, 1], x[:, 2] - x[:, 0]], yerr=[y[:, 0] - y[:, 1], y[:, 2] - y[:, 0]],
                    marker="o", markersize=4, capsize=2, linewidth=1.2, elinewidth=0.7, label=label)
        for (name, value), xi, yi in zip(conditions, x[:, 0], y[:, 0]):
            if name == conditions[0][0] or name == conditions[-1][0]:
                ax.annotate(f"{value:g}", (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize=7)
    for name, marker, colour in (("base", "X", "black"), ("oracle", "*", "tab:olive"), ("oracle, one vector", "P", "tab:gray")):
        if references and name in references["scores"]:
            x, y = (ci(references, name, m) for m in METRICS)
            ax.errorbar([x[0]], [y[0]], xerr=[[x[0] - x[1]], [x[2] - x[0]]], yerr=[[y[0] - y[1]], [y[2] - y[0]]],
                        marker=marker, markersize=9, color=colour, linestyle="none", label=name)
    ax.set_xlabel("identity similarity to the reference")
    ax.set_ylabel("prompt accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def figures(results: dict, layout: Layout) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout.figures.mkdir(parents=True, exist_ok=True)
    written = []
    domains = [d for d in ("person", "pet") if main_runs(results, d)]
    if domains:
        fig, axes = plt.subplots(1, len(domains), figsize=(6.2 * len(domains), 5), squeeze=False)
        for ax, domain in zip(axes[0], domains):
            runs = main_runs(results, domain)
            plane(ax, {LABELS[m]: (r, m) for m, r in runs.items()}, next(iter(runs.values())))
            ax.set_title(f"{domain}: λ 1–4 (decoupled: scale 0.5–1)")
        written.append(save_figure(fig, layout.figures / "study_tradeoff.png"))
    person = {r["run"]["name"]: r for r in results.values() if r.get("run", {}).get("domain") == "person" and r["run"]["mechanism"] == "nested"}
    if len(person) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(12.4, 5), squeeze=False)
        for ax, (kind, key, fmt) in zip(axes[0], (("queries", "queries", "{} queries"), ("alpha", "alpha", "α = {}"))):
            runs = sorted((r for r in person.values() if r["run"]["ablation"] in (None, kind)), key=lambda r: (r["run"][key] is not None, r["run"][key] or 0))
            plane(ax, {fmt.format("none" if r["run"][key] is None else f"{r['run'][key]:g}"): (r, "nested") for r in runs}, runs[0])
            ax.set_title(f"nested attention, person: {kind} (λ 1–4)")
        written.append(save_figure(fig, layout.figures / "study_ablations.png"))
    plt.close("all")
    return written


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def grid(columns: list[tuple[str, np.ndarray]], scale: int = 2) -> Image.Image:
    """Columns of uint8 [K,H,W,3] tiles under a one-line label each."""
    from matplotlib import font_manager

    k, h, w, _ = columns[0][1].shape
    header = 16
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)  # matplotlib's own font: it has λ and α
    sheet = Image.new("RGB", (len(columns) * w * scale, header + k * h * scale), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (label, tiles) in enumerate(columns):
        draw.text((j * w * scale + 3, 1), label, fill="black", font=font)
        for i, tile in enumerate(tiles):
            sheet.paste(Image.fromarray(tile).resize((w * scale, h * scale), Image.NEAREST), (j * w * scale, header + i * h * scale))
    return sheet


def images_of(layout: Layout, result: dict) -> dict[str, np.ndarray]:
    path = layout.images(result["run"]["name"])
    if not path.is_file():
        return {}
    with np.load(path) as z:
        out = {c: z[f"c{i}"] for i, c in enumerate(result["conditions"])}
        out.update({k: z[k] for k in z.files if k.startswith("reference")})
    return out


def matched(runs: dict[str, dict]) -> dict[str, str]:
    """mechanism -> its condition whose mean identity similarity is closest to the highest level every mechanism
    reaches somewhere in its sweep (images compared at equal identity, as the paper's qualitative figure)."""
    means = {m: {c: np.mean(r["scores"][c]["identity_similarity"]) for c, _ in sweep(r, m)} for m, r in runs.items()}
    target = min(max(v.values()) for v in means.values())
    return {m: min(v, key=lambda c: abs(v[c] - target)) for m, v in means.items()}


def grids(results: dict, layout: Layout) -> list[Path]:
    written = []
    for domain in ("person", "pet"):
        runs = main_runs(results, domain)
        if not runs:
            continue
        pictures = {m: images_of(layout, r) for m, r in runs.items()}
        if not all(pictures.values()):
            continue
        for m, r in runs.items():
            cols = [("reference", pictures[m]["reference"]), ("base", pictures[m]["base"])]
            cols += [(c.split(" ", 1)[1], pictures[m][c]) for c, _ in sweep(r, m)]
            written.append(_save(grid(cols), layout.figures / f"study_grid_{r['run']['name']}.png"))
        first = next(iter(pictures.values()))
        cols = [("reference", first["reference"]), ("base", first["base"])]
        cols += [(f"{LABELS[m]} {c.split(' ', 1)[1]}", pictures[m][c]) for m, c in matched(runs).items()]
        written.append(_save(grid(cols), layout.figures / f"study_matched_{domain}.png"))
    return written


def _save(image: Image.Image, path: Path) -> Path:
    """A grid as a 256-colour PNG: a quarter of the bytes, no visible change on these flat renders (kept in git)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


# -------------------------------------------------------------------------------------------------------- tables
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
        theirs = f"{m} scale=1" if m == "decoupled" else f"{m} λ=1"
        if m == "nested" or theirs not in r["scores"] or "nested λ=1" not in runs["nested"]["scores"]:
            continue
        cells = []
        for k, name in (("identity_similarity", "identity"), ("prompt_accuracy", "prompt")):
            mean, lo, hi = bootstrap_ci(np.subtract(runs["nested"]["scores"]["nested λ=1"][k], r["scores"][theirs][k]))
            verdict = "nested higher" if lo > 0 else "nested lower" if hi < 0 else "not separated"
            cells.append(f"{name} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] ({verdict})")
        lines.append(f"- {domain}, nested attention minus {LABELS[m]}: " + "; ".join(cells))
    return lines


def ablation_table(results: dict, kind: str, key: str) -> str:
    runs = [r for r in results.values() if r.get("run", {}).get("domain") == "person" and r["run"]["mechanism"] == "nested" and r["run"]["ablation"] in (None, kind)]
    runs.sort(key=lambda r: (r["run"][key] is not None, r["run"][key] or 0))
    if len(runs) < 2:
        return ""
    values = [c for c, _ in sweep(runs[0], "nested")]
    rows = [[("none" if r["run"][key] is None else f"{r['run'][key]:g}")] +
            [f"{ci(r, c, 'identity_similarity')[0]:.3f} / {ci(r, c, 'prompt_accuracy')[0]:.3f}" for c in values] for r in runs]
    return table([key, *(c.split(" ", 1)[1] for c in values)], rows)


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


def two_domains_table(results: dict) -> str:
    rows = []
    for name, r in results.items():
        if name.startswith("two_domains_"):
            for c, s in r["scores"].items():
                rows.append([LABELS[r["mechanism"]], c] + [f"{np.mean(s[k]):.3f}" for k in
                             ("person_similarity", "pet_similarity", "person_domain", "pet_domain", "person_prompt", "pet_prompt")])
    header = ["mechanism", "condition", "person half: identity", "dog half: identity", "person half read as a person",
              "dog half read as a dog", "person half: prompt", "dog half: prompt"]
    return table(header, rows) if rows else ""


def times_table(times: dict) -> str:
    rows = []
    for key, t in sorted(times.items(), key=lambda kv: ({"world": -1, "data": 0, "train": 1}.get(kv[0].split(' ')[0], 2), kv[0])):
        if key.startswith("world "):
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"the UNet's part-code stage ({t['minutes']:g} min budget, 2 threads)", ""])
        elif key.startswith("train "):
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"{t.get('steps')} steps at batch {t['batch']}",
                         f"{t['step_s']:.2f} s/step" if t.get("step_s") else ""])
        elif key.startswith("data "):
            rows.append([key, f"{t['wall_s'] / 60:.1f} min", f"{t['rows']} triplets", ""])
        elif key.startswith("evaluate "):
            rows.append([key, f"{t['seconds'] / 60:.1f} min", f"{t['images']} images, {t['sampling_steps']} sampling steps",
                         f"{t['seconds'] / t['images']:.2f} s/image"])
    return table(["run", "wall time", "work", "rate"], rows) if rows else ""


# ---------------------------------------------------------------------------------------------------------- page
REGENERATE = """```
{make}python -m baselines.study all{world} [--pet] [--two-domains]   # retrain every file, evaluate, report ({total})
python -m baselines.study train{world} [--pet]                 # only the weights files ({work}/weights/)
python -m baselines.study evaluate{world} [--pet] [--two-domains]  # scores, images, then this page, from the trained files
python -m baselines.study report{world}                        # only the figures, tables and this page, from the stored scores
python -m baselines.study estimate{world} [--pet] [--two-domains]  # the wall time of a full study here, from the times above
```"""

NOTES = """- Every file is trained by `python -m training.train --world` with `miniworld.retrain`'s recipe (the same
  triplets of training identities, Q-Former, AdamW, cosine schedule, steps and seed); a run only adds
  `--mechanism`, `--num-queries` or `--alpha`. The mechanisms are defined in `baselines/README.md`.
- Evaluation (`miniworld.evaluate`): held-out identities, one random scene each, fixed seeds; images made by the
  nodes' own Encode Subject / Bind Token code with the run's attn2 patch and the host's sampler; scored by the
  world's metrics unchanged. Knob: λ for nested attention, global V and multiple tokens; the output scale for
  decoupled CA. "Another identity's reference": the same case with the next identity's photo (knob 1).
- One vs {photos} photos: the same subject encoded from {photos} reference photos (tokens concatenated, as Encode
  Subject does with a batch), scored against the first photo. Mixing: the own (A) and the other identity's (B)
  tokens concatenated, scored against both.
- Two domains: the world's captions and images hold one subject; the two-subject caption is composed
  ("{caption}"); each half is scored with the other half painted its background colour. Run it only where
  the base model draws two subjects: the "read as a dog" column of the no-subject row says whether it does."""


PARTS_WORLD_NOTE = """The shipped world's UNet reads a subject's identity as **one** vector in the subject word's value (the same
for every image position), which global V can give exactly: there the methods did not separate ([study.md](study.md)).
In this harder world (`python -m baselines.study world --world parts`: the shipped UNet trained on for 30 min with
part codes, miniworld.identity_codes) the value a position reads is the code of the **part it shows** (a person's
hair or face; a dog's head, body or tail: the attributes visible there), and positions off the subject read the plain
word. A value per query (nested attention) can give that; one vector for all positions (global V) cannot. Everything
else (triplets, recipe, metrics, held-out cases) is the shipped world's. "oracle": the UNet told each part's code
where the part is drawn in the world's own render of the case; "oracle, one vector": the whole identity's code at
every position (a single vector for reference, not the best one: trained global V finds better ones). Both are only
references: they are told what the mechanisms have to infer from a photo."""


def layout_flags(layout: Layout) -> str:
    """The command-line flags that give this layout: --world, and each folder that is not the world's default."""
    default = default_layout(layout.world)
    flags = "" if layout.world == "shipped" else " --world parts"
    for name in ("work", "results", "figures", "page"):
        path = getattr(layout, name).resolve()
        if path != getattr(default, name).resolve():
            flags += f" --{name} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    return flags


def page(results: dict, layout: Layout, settings: dict, written: list[Path]) -> str:
    from miniworld.evaluate import TWO_DOMAINS_CAPTION

    times = read_times(layout)
    rates = measured_rates(times)
    step_s = {k.split(" ", 1)[1]: t["step_s"] * BATCH / t["batch"] for k, t in times.items() if k.startswith("train ") and t.get("step_s")}
    full = {flags: estimate(plan(pet=bool(flags)), rates, steps=settings.get("full_steps", 1200), two_domains=bool(flags), step_s=step_s)
            for flags in ("", "--pet --two-domains")}
    rel = lambda p: Path(p).resolve().relative_to(layout.page.parent.resolve()) if Path(p).resolve().is_relative_to(layout.page.parent.resolve()) else p  # noqa: E731
    out = ["# Nested attention vs the paper's baselines, in the miniature world (issue 9)", ""]
    if layout.world == "parts":
        out = [f"# Nested attention vs the paper's baselines, in the harder world (issue 9)", "", PARTS_WORLD_NOTE, ""]
    steps, full_steps, identities = settings.get("steps", 0), settings.get("full_steps", 1200), settings.get("identities", 0)
    if steps < 100 or identities < 4:
        out += [f"**Dry run** ({steps} training steps, {identities} identities, "
                f"{settings.get('sampling_steps')} sampling steps): these numbers exercise the pipeline; they are not results.", ""]
    elif steps < full_steps or identities < 16:
        out += [f"**Reduced budget**: {steps} of the shipped {full_steps} training steps, the same for every method; {identities} "
                f"held-out identities, {settings.get('sampling_steps')} sampling steps. A first measurement: read the intervals.", ""]
    summary = [line for d in ("person", "pet") for line in outcome(main_runs(results, d), d)]
    if summary:
        out += ["## Outcome at the default knob (λ 1, decoupled scale 1), paired over the same cases", "", *summary, ""]
    others = sorted(p for p in layout.page.parent.glob("study*.md") if p.resolve() != layout.page.resolve())
    if others:  # the shipped world's page, the harder world's, and any other budget of them
        out += ["Other pages of this study: " + ", ".join(f"[{p.name}]({p.name})" for p in others) + ".", ""]
    out += ["## Regenerate", "", REGENERATE.format(
        total=f"about {hours(full['']['total'])} here, person only", world=layout_flags(layout),
        work=layout.work.resolve().relative_to(ROOT) if layout.work.resolve().is_relative_to(ROOT) else layout.work,
        make="" if layout.world == "shipped" else "python -m baselines.study world --world parts   # the harder world's UNet (30 min)\n"), "",
            "Settings of this page: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "",
            "Runs on this page (`--only` takes these names): " + ", ".join(sorted(results)) + ".", "",
            NOTES.format(photos=PHOTOS, caption=TWO_DOMAINS_CAPTION), ""]
    sections = [("Identity vs prompt accuracy (paper Fig. 10)", "study_tradeoff.png", None)]
    for domain in ("person", "pet"):
        if main_runs(results, domain):
            sections.append((f"{domain}: every condition", None, main_table(main_runs(results, domain))))
            sections.append((f"{domain}: nested attention minus each other mechanism, paired over the same cases", None,
                             paired_table(main_runs(results, domain))))
    sections += [("Images at matched identity", "study_matched_person.png", None),
                 ("Queries (nested attention, person; cells: mean identity similarity / prompt accuracy)", "study_ablations.png", ablation_table(results, "queries", "queries")),
                 ("α, the value-norm target (nested attention, person; cells as above)", None, ablation_table(results, "alpha", "alpha")),
                 (f"One vs {PHOTOS} reference photos", None, photos_table(results)),
                 ("Identity mixing (A: the case's identity, B: the next one's)", None, mixing_table(results)),
                 ("Two subjects of two domains in one image", None, two_domains_table(results) or "Not run (`--two-domains`, needs `--pet`)."),
                 ("Times on this machine", None, times_table(times))]
    names = {p.name: p for p in written}
    for title, figure, text in sections:
        if not text and figure not in names:
            continue
        out += [f"## {title}", ""]
        if figure in names:
            out += [f"![{title}]({rel(names[figure])})", ""]
        if text:
            out += [text, ""]
    grids_ = [p for p in written if p.name.startswith("study_grid_")]
    if grids_:
        out += ["Knob sweeps per mechanism (first held-out cases; columns: reference, base, then the knob): " +
                ", ".join(f"[{p.stem[len('study_grid_'):]}]({rel(p)})" for p in grids_), ""]
    out += ["## Estimated wall time of the full study here", "",
            f"From the times above (training steps, start-up, triplets, images):", "",
            f"- person only: {describe(full[''])}", f"- with `--pet --two-domains`: {describe(full['--pet --two-domains'])}", ""]
    return "\n".join(out)


def report(layout: Layout) -> Path:
    results = load(layout)
    settings_path = layout.results / "study.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    written = figures(results, layout) + grids(results, layout)
    layout.page.parent.mkdir(parents=True, exist_ok=True)
    layout.page.write_text(page(results, layout, settings, written))
    for p in (*written, layout.page):
        print(f"wrote {p}")
    return layout.page


__all__ = ["report", "load", "figures", "grids", "page", "matched", "sweep"]
