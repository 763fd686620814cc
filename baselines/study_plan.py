"""The baseline study's plan (issue 9): which weights files are trained, with which command, where everything is
written, and how long the whole study takes on this machine.

Host-free: it builds commands, times processes and does arithmetic, so the tests check it without models.
Every run uses `miniworld.retrain`'s recipe (same triplets, Q-Former size, optimizer, steps, seed); a run only
adds `--mechanism`, `--num-queries` or `--alpha` to `python -m training.train --world`.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from miniworld import retrain

ROOT = retrain.ROOT
MECHANISMS = ("nested", "decoupled", "global_v", "multiple_tokens")  # = training/args.py --mechanism
LAMBDAS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # the paper's Fig. 10 sweep for nested / global V / multiple tokens
SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # and for decoupled CA (its output scale; λ means nothing there)
QUERIES = (16, 64, 256)  # Q-Former queries = nested keys; the world's default is 16 (the paper: 16 ... 1024)
ALPHAS = (None, 1.0, 2.0, 3.0)  # value-norm target; None: no rescaling (--alpha 0)
DEFAULT_QUERIES, DEFAULT_ALPHA = 16, 1.0  # the world recipe (miniworld.retrain: --alpha 1; training.args: 16 queries): the mechanism runs use them
PHOTOS = 3  # one vs three reference photos
IDENTITIES, SAMPLING_STEPS, BATCH = 24, 20, 16
GRID_CASES = 4  # cases whose images are kept for the grids

# Rates for the estimate before anything was timed here (docs/miniworld.md, 2-core machine shared with training):
# a training step at batch 16; a sampled image as a + b · steps (0.25 s at 12 steps, 0.35 s at 20).
DEFAULT_RATES = {"step_s": 0.5, "startup_s": 20.0, "row_s": 0.01, "image_a_s": 0.1, "image_b_s": 0.0125}


@dataclass(frozen=True)
class Run:
    """One weights file of the study."""

    domain: str
    mechanism: str = "nested"
    queries: int = DEFAULT_QUERIES
    alpha: float | None = DEFAULT_ALPHA

    @property
    def name(self) -> str:
        name = f"{self.domain}_{self.mechanism}"
        if self.queries != DEFAULT_QUERIES:
            name += f"_q{self.queries}"
        if self.alpha != DEFAULT_ALPHA:
            name += "_alpha_none" if self.alpha is None else f"_alpha{self.alpha:g}"
        return name

    @property
    def ablation(self) -> str | None:
        """'queries' or 'alpha' for the nested ablation runs; None for a mechanism run (the full sweeps)."""
        return "queries" if self.queries != DEFAULT_QUERIES else "alpha" if self.alpha != DEFAULT_ALPHA else None

    def options(self) -> list[str]:
        return ["--mechanism", self.mechanism, "--num-queries", str(self.queries), "--alpha", "0" if self.alpha is None else f"{self.alpha:g}"]

    def knob(self, lambdas=LAMBDAS, scales=SCALES) -> tuple:
        return tuple(scales) if self.mechanism == "decoupled" else tuple(lambdas)


def plan(*, pet: bool = False, queries=QUERIES, alphas=ALPHAS) -> list[Run]:
    """Every mechanism on the person domain (and the pet domain), then nested attention's query and α ablations
    on the person domain; the default run (16 queries, α 2) is shared by both ablations."""
    runs = [Run(domain, m) for domain in (("person", "pet") if pet else ("person",)) for m in MECHANISMS]
    runs += [Run("person", queries=q) for q in queries if q != DEFAULT_QUERIES]
    runs += [Run("person", alpha=a) for a in alphas if a != DEFAULT_ALPHA]
    return runs


def ablation_runs(runs: list[Run], kind: str) -> list[Run]:
    """The runs of one ablation table, the shared default run included."""
    return [r for r in runs if r.domain == "person" and r.mechanism == "nested" and r.ablation in (None, kind)]


@dataclass(frozen=True)
class Layout:
    """Where the study writes: trained files and images under `work` (git-ignored), scores, times, figures and the
    page under docs/. world_dir: the world's base and vision files (None: the shipped miniworld/weights)."""

    work: Path = ROOT / "runs" / "study"
    results: Path = ROOT / "docs" / "results" / "study"
    figures: Path = ROOT / "docs" / "figures"
    page: Path = ROOT / "docs" / "study.md"
    world_dir: Path | None = None
    world: str = "shipped"  # WORLDS: which world world_dir holds

    def __post_init__(self):
        if self.world not in WORLDS or (self.world == "shipped") != (self.world_dir is None):
            raise ValueError(f"Layout: world {self.world!r} with world_dir {self.world_dir}: the shipped world has no "
                             f"world_dir, the others ({WORLDS[1:]}) need theirs")

    def data(self, domain: str) -> Path:
        return self.work / f"data_{domain}"

    def run_dir(self, run: Run) -> Path:
        return self.work / "runs" / run.name

    def weights(self, run: Run) -> Path:
        return self.work / "weights" / f"{run.name}.safetensors"

    def images(self, name: str) -> Path:
        return self.work / "images" / f"{name}.npz"

    def result(self, name: str) -> Path:
        return self.results / f"{name}.json"

    @property
    def times(self) -> Path:
        return self.results / "times.json"


# The worlds the study runs in: the shipped one; a harder one whose UNet reads a code per part of the subject per query
# (miniworld.identity_codes, part codes); one whose UNet also learned scenes of a person and a dog together
# (world.render_pair), for two subjects in one image. `python -m baselines.study world --world parts|pairs` makes them.
WORLDS = ("shipped", "parts", "pairs")
WORLD_DIRS = {"parts": ROOT / "runs" / "parts_world", "pairs": ROOT / "runs" / "pairs_world"}
WORLD_MINUTES = retrain.IDENTITY_MINUTES  # each world's UNet stage: as long as the shipped identity stage
PAIR_ROWS = 0.5  # the pairs world: the share of its stage's rows that show a person and a dog


def default_layout(world: str = "shipped") -> Layout:
    if world == "shipped":
        return Layout()
    if world not in WORLD_DIRS:
        raise ValueError(f"unknown world {world!r}; choose one of {WORLDS}")
    return Layout(ROOT / "runs" / f"study_{world}", ROOT / "docs" / "results" / f"study_{world}", ROOT / "docs" / "figures" / f"study_{world}",
                  ROOT / "docs" / f"study_{world}.md", WORLD_DIRS[world], world)


def world_command(layout: Layout, minutes: float = WORLD_MINUTES) -> list[str]:
    """The world's UNet: the shipped one trained on (minutes) with part codes (parts) or with two-subject scenes too
    (pairs), written to layout.world_dir."""
    if layout.world == "shipped":
        raise ValueError("the shipped world's UNet ships in miniworld/weights (miniworld.retrain all remakes it)")
    return retrain.identity_stage_command(minutes, weights_dir=layout.world_dir,
                                          **({"parts": True} if layout.world == "parts" else {"pairs": PAIR_ROWS}))


def data_command(domain: str, layout: Layout, rows: int) -> list[str]:
    return retrain.triplets_command(domain, layout.data(domain), rows)


def train_command(run: Run, layout: Layout, steps: int, batch: int = BATCH) -> list[str]:
    """miniworld.retrain's command with the run's mechanism, queries and α; no validation grid (the study
    evaluates), nothing written to miniworld/weights/."""
    world = ["--world-dir", str(layout.world_dir)] if layout.world_dir is not None else []
    return retrain.train_command(run.domain, layout.data(run.domain), layout.run_dir(run), layout.weights(run), steps,
                                 batch=batch, options=[*run.options(), *world], validation=False)


def timed(command: list[str], metrics: Path | None = None, poll_s: float = 0.5) -> dict:
    """Run `command` from the repository root; wall time, and when `metrics` (a training run's metrics.jsonl) is
    given, when its first and last step were logged: per-step time apart from the start-up."""
    print("$", " ".join(command[1:]), flush=True)
    if metrics is not None and metrics.exists():
        metrics.unlink()
    t0 = time.time()
    proc = subprocess.Popen(command, cwd=ROOT)
    lines, first, last = 0, None, None
    while True:
        done = proc.poll() is not None  # read once more after the end: the last steps' lines
        if metrics is not None and metrics.exists() and (n := _lines(metrics)) > lines:
            now = time.time() - t0
            first, last, lines = now if first is None else first, now, n
        if done:
            break
        time.sleep(poll_s)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, command)
    out = {"wall_s": time.time() - t0, "command": " ".join(command[1:])}
    if metrics is not None:
        out.update(steps=lines, first_step_s=first, last_step_s=last,
                   step_s=(last - first) / (lines - 1) if lines > 1 else None)
    return out


def _lines(path: Path) -> int:
    return sum(1 for _ in path.open())


def read_times(layout: Layout) -> dict:
    return json.loads(layout.times.read_text()) if layout.times.is_file() else {}


def record_time(layout: Layout, key: str, entry: dict) -> None:
    times = read_times(layout)
    times[key] = entry
    layout.times.parent.mkdir(parents=True, exist_ok=True)
    layout.times.write_text(json.dumps(times, indent=1, sort_keys=True))


# ----------------------------------------------------------------------------------------------------- estimate
def images_per_case(run: Run, *, lambdas=LAMBDAS, scales=SCALES, oracle: bool = True) -> int:
    """Images evaluate() samples per case: base, oracle, the knob sweep, the other reference, and for mechanism
    runs the sweep again from PHOTOS photos and for the mixed identity."""
    sweep = len(run.knob(lambdas, scales))
    return 1 + oracle + sweep + 1 + (2 * sweep if run.ablation is None else 0)


def two_domain_images_per_case(mechanism: str, *, lambdas=LAMBDAS, scales=SCALES) -> int:
    return 2 + 3 * len(Run("person", mechanism).knob(lambdas, scales))  # no subject, oracle; both, person alone, dog alone


def measured_rates(times: dict) -> dict:
    """Rates from a study's times.json (a dry run's, or the full run's), else DEFAULT_RATES: the median training
    step per batch row, the median start-up, triplets per row, and a load factor on the image-time model."""
    rates = dict(DEFAULT_RATES)
    train = [t for k, t in times.items() if k.startswith("train ") and t.get("step_s")]
    if train:
        per_row = sorted(t["step_s"] / t["batch"] for t in train)
        rates["step_s"] = per_row[len(per_row) // 2] * BATCH
        starts = sorted(t["first_step_s"] for t in train)
        rates["startup_s"] = starts[len(starts) // 2]
    data = [t for k, t in times.items() if k.startswith("data ") and t.get("rows")]
    if data:
        rates["row_s"] = max(t["wall_s"] / t["rows"] for t in data)
    evals = [t for k, t in times.items() if k.startswith("evaluate ") and t.get("images")]
    if evals:
        measured = sum(t["seconds"] for t in evals)
        model = sum(t["images"] * (rates["image_a_s"] + rates["image_b_s"] * t["sampling_steps"]) for t in evals)
        rates["image_a_s"] *= measured / model
        rates["image_b_s"] *= measured / model
    return rates


def estimate(runs: list[Run], rates: dict, *, steps: int, batch: int = BATCH, rows: int = retrain.ROWS,
             identities: int = IDENTITIES, sampling_steps: int = SAMPLING_STEPS, lambdas=LAMBDAS, scales=SCALES,
             two_domains: bool = False, step_s: dict | None = None) -> dict:
    """Seconds per part of the study. step_s: a measured step time (at `batch`) per run name, where known."""
    step_s = step_s or {}
    per_image = rates["image_a_s"] + rates["image_b_s"] * sampling_steps
    domains = sorted({r.domain for r in runs})
    train = {r.name: rates["startup_s"] + steps * step_s.get(r.name, rates["step_s"] * batch / BATCH) for r in runs}
    evaluate = {r.name: identities * images_per_case(r, lambdas=lambdas, scales=scales) * per_image for r in runs}
    if two_domains and "pet" in domains:
        for m in sorted({r.mechanism for r in runs if r.domain == "pet"}):
            evaluate[f"two_domains_{m}"] = identities * two_domain_images_per_case(m, lambdas=lambdas, scales=scales) * per_image
    parts = {"data": len(domains) * rows * rates["row_s"], "train": sum(train.values()), "evaluate": sum(evaluate.values())}
    return {**parts, "total": sum(parts.values()), "train_runs": train, "evaluate_runs": evaluate, "rates": rates}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def describe(est: dict) -> str:
    return (f"triplets {hours(est['data'])}, training {hours(est['train'])} ({len(est['train_runs'])} runs), "
            f"evaluation {hours(est['evaluate'])}: {hours(est['total'])} in all on this machine "
            f"(a training step {est['rates']['step_s']:.2f} s at batch {BATCH}, "
            f"an image {est['rates']['image_a_s']:.3f} s + {est['rates']['image_b_s']:.4f} s per sampling step)")


__all__ = ["Run", "Layout", "WORLDS", "WORLD_DIRS", "PAIR_ROWS", "default_layout", "world_command", "plan", "ablation_runs", "train_command", "data_command", "timed", "read_times", "record_time",
           "estimate", "measured_rates", "describe", "hours", "images_per_case", "two_domain_images_per_case"]
