"""The paper's comparison (issue 9) in the miniature world: nested attention vs decoupled cross-attention, global V and
multiple tokens, trained alike and measured by the world's metrics, in one command.

    python -m baselines.study all [--pet] [--two-domains]   # train every file, evaluate every sweep, write the page
    python -m baselines.study train       # runs/study/weights/<run>.safetensors (+ each run's time in times.json)
    python -m baselines.study evaluate    # docs/results/study/<run>.json, runs/study/images/, then `report`
    python -m baselines.study report      # docs/figures/study_*.png and docs/study.md from the stored scores
    python -m baselines.study estimate    # the wall time of that configuration here, from the recorded times

    python -m baselines.study world --world parts   # the harder world's UNet (runs/parts_world/, 30 min)
    python -m baselines.study all --world parts     # the same study in it (runs/study_parts/, docs/study_parts.md)
    python -m baselines.study world --world pairs   # a UNet that also learned a person and a dog in one image (runs/pairs_world/)
    python -m baselines.study all --world pairs --pet --two-domains --queries 16 --alphas 1   # two subjects (docs/study_pairs.md)

A dry run exercises everything end to end in minutes (write it away from docs/):
    python -m baselines.study all --steps 20 --rows 64 --identities 2 --sampling-steps 4 --out /tmp/study

Files: study_plan.py (runs, commands, times, estimate), study_eval.py (sweeps), study_report.py (figures, page).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from miniworld import retrain

from .study_plan import (
    ALPHAS, BATCH, IDENTITIES, LAMBDAS, WORLD_MINUTES, QUERIES, SAMPLING_STEPS, SCALES, WORLDS, Layout, data_command,
    default_layout, describe, estimate, measured_rates, plan, read_times, record_time, timed, train_command, world_command,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m baselines.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=("world", "all", "train", "evaluate", "report", "estimate"))
    p.add_argument("--world", choices=WORLDS, default="shipped",
                   help="the shipped world; the harder one whose UNet reads a code per part per query; or one whose UNet also "
                        "learned a person and a dog in one image (`world` makes the last two)")
    g = p.add_argument_group("which runs")
    g.add_argument("--pet", action="store_true", help="also the four mechanisms on the pet domain")
    g.add_argument("--two-domains", action="store_true", help="a person and a dog in one image per mechanism (needs --pet)")
    g.add_argument("--queries", type=int, nargs="+", default=list(QUERIES), help="nested attention's query ablation")
    g.add_argument("--alphas", nargs="+", default=["none" if a is None else f"{a:g}" for a in ALPHAS], help="α ablation ('none': no rescaling)")
    g.add_argument("--only", nargs="+", metavar="RUN", help="only these runs (names as in times.json, e.g. person_decoupled)")
    g = p.add_argument_group("training (the same for every run)")
    g.add_argument("--steps", type=int, default=retrain.STEPS)
    g.add_argument("--batch", type=int, default=BATCH)
    g.add_argument("--rows", type=int, default=retrain.ROWS, help="training triplets per domain")
    g = p.add_argument_group("evaluation")
    g.add_argument("--identities", type=int, default=IDENTITIES, help="held-out identities (one case each)")
    g.add_argument("--sampling-steps", type=int, default=SAMPLING_STEPS)
    g.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS))
    g.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="decoupled CA's knob")
    g = p.add_argument_group("where")
    g.add_argument("--out", type=Path, help="everything under this folder (work/, results/, figures/, study.md): dry runs")
    g.add_argument("--work", type=Path, help="data, training runs, weights, images (default: runs/study[_parts])")
    g.add_argument("--results", type=Path, help="per-case scores and times (JSON) (default: docs/results/study[_parts])")
    g.add_argument("--figures", type=Path, help="default: docs/figures[/study_parts]")
    g.add_argument("--page", type=Path, help="default: docs/study[_parts].md")
    g.add_argument("--world-minutes", type=float, default=WORLD_MINUTES, help="world: the wall time of its UNet stage")
    g.add_argument("--overwrite-world", action="store_true", help="world: replace an existing runs/<world>_world/base.safetensors")
    args = p.parse_args(argv)
    if args.two_domains and not args.pet:
        p.error("--two-domains needs --pet (a pet file per mechanism)")
    for name in ("steps", "batch", "rows", "identities", "sampling_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    try:
        args.alphas = [None if a.lower() == "none" else float(a) for a in args.alphas]
    except ValueError:
        p.error(f"--alphas: numbers or 'none', got {args.alphas}")
    if args.command == "world" and args.world == "shipped":
        p.error("`world` makes another world: give --world parts or --world pairs (the shipped world ships in miniworld/weights)")
    default = default_layout(args.world)
    args.layout = (Layout(args.out / "work", args.out / "results", args.out / "figures", args.out / "study.md", default.world_dir, args.world)
                   if args.out else Layout(args.work or default.work, args.results or default.results,
                                           args.figures or default.figures, args.page or default.page, default.world_dir, args.world))
    args.runs = plan(pet=args.pet, queries=args.queries, alphas=args.alphas)
    if args.only:
        unknown = set(args.only) - {r.name for r in args.runs}
        if unknown:
            p.error(f"--only: no run named {sorted(unknown)}; the runs are {[r.name for r in args.runs]}")
        args.runs = [r for r in args.runs if r.name in args.only]
    return args


def write_settings(layout: Layout, **settings) -> None:
    path = layout.results / "study.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**old, **settings, "full_steps": retrain.STEPS}, indent=1))


def make_world(args) -> None:
    """Another world: the shipped base and ViT files copied to runs/<world>_world/, then its UNet trained on with part
    codes (parts) or with two-subject scenes among its rows (pairs); the shipped files are never written."""
    import shutil

    from miniworld.files import BASE_FILE, VISION_FILES, WEIGHTS_DIR

    folder = args.layout.world_dir
    if (folder / BASE_FILE).is_file() and not args.overwrite_world:
        raise SystemExit(f"{folder / BASE_FILE} exists (a trained world); --overwrite-world replaces it")
    folder.mkdir(parents=True, exist_ok=True)
    for name in (BASE_FILE, *VISION_FILES.values()):
        shutil.copyfile(WEIGHTS_DIR / name, folder / name)
    entry = timed(world_command(args.layout, args.world_minutes))
    record_time(args.layout, f"world {args.world}", {**entry, "minutes": args.world_minutes})


def train(args) -> None:
    layout = args.layout
    for domain in sorted({r.domain for r in args.runs}):
        manifest = layout.data(domain) / "manifest.jsonl"
        if not manifest.is_file() or sum(1 for _ in manifest.open()) != args.rows:  # the same rows for every run
            record_time(layout, f"data {domain}", {**timed(data_command(domain, layout, args.rows)), "rows": args.rows})
    for run in args.runs:
        layout.weights(run).parent.mkdir(parents=True, exist_ok=True)
        entry = timed(train_command(run, layout, args.steps, args.batch), layout.run_dir(run) / "metrics.jsonl")
        record_time(layout, f"train {run.name}", {**entry, "batch": args.batch})
        print(f"{run.name}: {entry['wall_s'] / 60:.1f} min", flush=True)
    write_settings(layout, steps=args.steps, batch=args.batch, rows=args.rows)


def evaluate(args) -> None:
    import torch

    from .study_eval import evaluate_pair, evaluate_run

    torch.set_num_threads(1)
    options = dict(identities=args.identities, sampling_steps=args.sampling_steps, lambdas=args.lambdas, scales=args.scales)
    for run in args.runs:
        evaluate_run(run, args.layout, **options)
    if args.two_domains:
        for mechanism in sorted({r.mechanism for r in args.runs if r.domain == "pet"}):
            evaluate_pair(mechanism, args.layout, **options)
    write_settings(args.layout, identities=args.identities, sampling_steps=args.sampling_steps, cfg=3.0)


def print_estimate(args) -> None:
    """The configuration's wall time from the times recorded in this layout (or the defaults); after a dry run,
    also the full study's."""
    times = read_times(args.layout)
    step_s = {k.split(" ", 1)[1]: t["step_s"] * BATCH / t["batch"] for k, t in times.items() if k.startswith("train ") and t.get("step_s")}
    rates = measured_rates(times)
    configurations = {"this configuration": (args, args.runs)}
    if args.command != "estimate":
        full = parse_args(["estimate", *(["--pet", "--two-domains"] if args.pet else [])])
        configurations = {"the full study": (full, full.runs)}
    for label, (a, runs) in configurations.items():
        est = estimate(runs, rates, steps=a.steps, batch=a.batch, rows=a.rows, identities=a.identities, sampling_steps=a.sampling_steps,
                       lambdas=a.lambdas, scales=a.scales, two_domains=a.two_domains, step_s=step_s)
        measured = "measured here" if times else "no times recorded yet: the defaults"
        print(f"estimate ({label}, rates {measured}): {describe(est)}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.command == "world":
        make_world(args)
        return
    if args.command in ("all", "train"):
        train(args)
    if args.command in ("all", "evaluate"):
        evaluate(args)
    if args.command in ("all", "evaluate", "report"):
        from .study_report import report

        report(args.layout)
    print_estimate(args)


if __name__ == "__main__":
    main(sys.argv[1:])
