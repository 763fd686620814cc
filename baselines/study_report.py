"""The study's figures and results page, from the stored per-case scores (docs/results/study/*.json) and images
(runs/study/images/*.npz); nothing is sampled here. Tables: study_tables.py; two subjects in one image:
study_two_subjects.py.

    docs/figures/study_tradeoff.png     identity similarity vs prompt accuracy, one curve per mechanism (paper Fig. 10)
    docs/figures/study_ablations.png    the same plane for nested attention's queries and α
    docs/figures/study_matched_<d>.png  each mechanism at the knob value that matches the others' identity level
    docs/figures/study_grid_<run>.png   each mechanism's knob sweep on the first held-out cases (and two_domains_<m>)
    docs/study.md                       the page: how to regenerate, the tables, each run's time here, the estimate
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import study_two_subjects as two
from .study_plan import BATCH, PHOTOS, ROOT, Layout, default_layout, describe, estimate, hours, measured_rates, plan, read_times
from .study_tables import (LABELS, METRICS, ablation_table, ci, load, main_runs, main_table, mixing_table, outcome, paired_table,
                           photos_table, sweep, times_table)


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
    for m, r in two.pair_results(results).items():
        if pictures := images_of(layout, r):
            written.append(_save(grid(two.grid_columns(r, pictures)), layout.figures / f"study_grid_{r['run']['name']}.png"))
    return written


def _save(image: Image.Image, path: Path) -> Path:
    """A grid as a 256-colour PNG: a quarter of the bytes, no visible change on these flat renders (kept in git)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return path


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
- Two domains: a person on the left and a dog on the right ("{caption}"), each from its own domain's file
  bound to its own word, or each bound alone, on the same caption and seed; each half is scored by the world's
  metrics with the other half painted its background colour. Only the pairs world's UNet learned such scenes
  ([study_pairs.md](study_pairs.md)); elsewhere the no-subject row's "read as its subject" columns show whether
  the base model draws both."""


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


PAIRS_WORLD_NOTE = """The shipped world's UNet learned scenes of one subject, so a caption naming a person and a dog gets one of
them ([study.md](study.md) cannot measure two subjects in one image). This world's UNet (`python -m baselines.study
world --world pairs`) is the shipped one trained on for 30 min where half the rows show a training person on the
left and a training dog on the right (`world.render_pair`, caption `world.pair_caption`), both subject words
carrying their identity's code, and the other half are the shipped world's single-subject rows. Every weights file
here is trained as everywhere else (single-subject triplets, one domain per file); two subjects meet only at
sampling. "oracle, both": the base model told both identities, each through its own word (miniworld.identity_codes)."""

WORLD_PAGES = {  # title, what the page opens with
    "shipped": ("Nested attention vs the paper's baselines, in the miniature world (issue 9)", None),
    "parts": ("Nested attention vs the paper's baselines, in the harder world (issue 9)", PARTS_WORLD_NOTE),
    "pairs": ("Two subjects of two domains in one image, and the baselines, in the two-subject world (issue 9)", PAIRS_WORLD_NOTE),
}


def layout_flags(layout: Layout) -> str:
    """The command-line flags that give this layout: --world, and each folder that is not the world's default."""
    default = default_layout(layout.world)
    flags = "" if layout.world == "shipped" else f" --world {layout.world}"
    for name in ("work", "results", "figures", "page"):
        path = getattr(layout, name).resolve()
        if path != getattr(default, name).resolve():
            flags += f" --{name} {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    return flags


def page(results: dict, layout: Layout, settings: dict, written: list[Path]) -> str:
    from miniworld.world import PAIR_CAPTION

    times = read_times(layout)
    rates = measured_rates(times)
    step_s = {k.split(" ", 1)[1]: t["step_s"] * BATCH / t["batch"] for k, t in times.items() if k.startswith("train ") and t.get("step_s")}
    full = {flags: estimate(plan(pet=bool(flags)), rates, steps=settings.get("full_steps", 1200), two_domains=bool(flags), step_s=step_s)
            for flags in ("", "--pet --two-domains")}
    rel = lambda p: Path(p).resolve().relative_to(layout.page.parent.resolve()) if Path(p).resolve().is_relative_to(layout.page.parent.resolve()) else p  # noqa: E731
    title, note = WORLD_PAGES[layout.world]
    out = [f"# {title}", "", *([note, ""] if note else [])]
    steps, full_steps, identities = settings.get("steps", 0), settings.get("full_steps", 1200), settings.get("identities", 0)
    if steps < 100 or identities < 4:
        out += [f"**Dry run** ({steps} training steps, {identities} identities, "
                f"{settings.get('sampling_steps')} sampling steps): these numbers exercise the pipeline; they are not results.", ""]
    elif steps < full_steps or identities < 16:
        out += [f"**Reduced budget**: {steps} of the shipped {full_steps} training steps, the same for every method; {identities} "
                f"held-out identities, {settings.get('sampling_steps')} sampling steps. A first measurement: read the intervals.", ""]
    summary = [line for d in ("person", "pet") for line in outcome(main_runs(results, d), d)] + two.outcome(results) + two.leak_outcome(results)
    if summary:
        out += ["## Outcome at the default knob (λ 1, decoupled scale 1), paired over the same cases", "", *summary, ""]
    others = sorted(p for p in layout.page.parent.glob("study*.md") if p.resolve() != layout.page.resolve())
    if others:  # the shipped world's page, the harder world's, and any other budget of them
        out += ["Other pages of this study: " + ", ".join(f"[{p.name}]({p.name})" for p in others) + ".", ""]
    out += ["## Regenerate", "", REGENERATE.format(
        total=f"about {hours(full['']['total'])} here, person only", world=layout_flags(layout),
        work=layout.work.resolve().relative_to(ROOT) if layout.work.resolve().is_relative_to(ROOT) else layout.work,
        make="" if layout.world == "shipped" else f"python -m baselines.study world --world {layout.world}   # the world's UNet (30 min)\n"), "",
            "Settings of this page: " + ", ".join(f"{k} {v}" for k, v in settings.items()) + ".", "",
            "Runs on this page (`--only` takes these names): " + ", ".join(sorted(n for n in results if not n.startswith("two_domains_"))) + ".", "",
            NOTES.format(photos=PHOTOS, caption=PAIR_CAPTION.format(bg="{bg}")), ""]
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
                 ("Two subjects of two domains in one image", "study_grid_two_domains_nested.png", two.pair_table(results) or "Not run (`--two-domains`, needs `--pet`)."),
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
            "From the times above (training steps, start-up, triplets, images):", "",
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
