"""baselines.study (issue 9's pipeline): every run is trained by the same training command but for its mechanism,
queries or α (checked through training.args' own parser); miniworld.evaluate really samples through the chosen
mechanism and its knob (decoupled CA at scale 0 gives the base model's image bit for bit); the timing, estimate
and report (figures, tables, grids, page) do what they say on synthetic scores.

The study itself needs the demo world's metrics, which the tiny models have no counterpart of, so there is no
end-to-end run here; `python -m baselines.study all --steps 20 --rows 64 --identities 2 --sampling-steps 4
--out /tmp/study` does that in about 4 minutes (baselines/README.md)."""
from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from training.host import PACK_ROOT, setup_comfyui

setup_comfyui(cpu=True)

from baselines import study, study_plan  # noqa: E402
from baselines.study_plan import Layout, Run, plan  # noqa: E402

RECIPE_VARIES = {"mechanism", "num_queries", "alpha", "output_dir", "export", "manifest", "word", "domain"}


# --- plan and commands ------------------------------------------------------------------------------------------
def test_the_plan_covers_every_mechanism_and_both_ablations_with_one_shared_default_run():
    runs = plan()
    names = [r.name for r in runs]
    assert len(set(names)) == len(names) == 9
    assert {r.mechanism for r in runs if r.ablation is None} == set(study_plan.MECHANISMS)
    assert {r.queries for r in study_plan.ablation_runs(runs, "queries")} == {16, 64, 256}
    assert {r.alpha for r in study_plan.ablation_runs(runs, "alpha")} == {None, 1.0, 2.0, 3.0}
    assert Run("person") in study_plan.ablation_runs(runs, "queries") and Run("person") in study_plan.ablation_runs(runs, "alpha")
    with_pet = plan(pet=True, queries=(16, 64, 256, 1024))
    assert len(with_pet) == 14 and {r.name for r in with_pet if r.domain == "pet"} == {f"pet_{m}" for m in study_plan.MECHANISMS}


def test_every_run_is_trained_with_the_same_recipe_but_its_mechanism_queries_or_alpha(tmp_path):
    from training.args import parse_args

    layout = Layout(tmp_path / "work", tmp_path / "results", tmp_path / "figures", tmp_path / "study.md")
    for domain in ("person", "pet"):
        layout.data(domain).mkdir(parents=True)
        (layout.data(domain) / "manifest.jsonl").write_text("")  # the parser only checks that it is a file
    parsed = {}
    for run in plan(pet=True):
        command = study_plan.train_command(run, layout, steps=1200)
        assert command[1:3] == ["-m", "training.train"]
        parsed[run] = vars(parse_args(command[3:]))
        assert parsed[run]["mechanism"] == run.mechanism and parsed[run]["num_queries"] == run.queries
        assert parsed[run]["alpha"] == (0.0 if run.alpha is None else run.alpha)  # ≤ 0: no rescaling (training.models)
        assert Path(parsed[run]["export"]) == layout.weights(run) and "miniworld/weights" not in parsed[run]["export"]
        assert parsed[run]["validation_steps"] == 0 and parsed[run]["max_train_steps"] == 1200 and parsed[run]["seed"] == 0
    recipes = {json.dumps({k: v for k, v in args.items() if k not in RECIPE_VARIES}, sort_keys=True, default=str) for args in parsed.values()}
    assert len(recipes) == 1, "the runs differ in more than their mechanism, queries and α"
    manifests = {run.domain: args["manifest"] for run, args in parsed.items()}
    assert all(args["manifest"] == manifests[run.domain] for run, args in parsed.items())  # one data set per domain


def test_the_shipped_retrain_command_is_unchanged_by_the_study_options():
    from miniworld import retrain

    data, train = retrain.nested_commands("person", Path("/w"), steps=300)
    assert data[-6:] == ["--n", str(retrain.ROWS), "--size", "128", "--seed", "1"]
    assert train[train.index("--export") + 1] == str(retrain.NESTED_DIR / "nested_person.safetensors")
    assert train[train.index("--validation-steps") + 1] == "300" and "--mechanism" not in train


def test_study_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit):
        study.parse_args(["train", "--two-domains"])  # needs --pet
    with pytest.raises(SystemExit):
        study.parse_args(["train", "--only", "person_nested_q17"])
    with pytest.raises(SystemExit):
        study.parse_args(["train", "--alphas", "two"])
    args = study.parse_args(["train", "--out", str(tmp_path), "--alphas", "none", "2", "--queries", "16", "--only", "person_nested_alpha_none"])
    assert [r.name for r in args.runs] == ["person_nested_alpha_none"] and args.layout.page == tmp_path / "study.md"


def test_the_harder_world_has_its_own_files_and_its_runs_train_in_it(tmp_path, capsys):
    from training.args import parse_args

    with pytest.raises(SystemExit):
        study.parse_args(["world"])  # the shipped world is not remade
    assert "--world parts or --world pairs" in capsys.readouterr().err
    args = study.parse_args(["train", "--world", "parts"])
    shipped = study.parse_args(["train"]).layout
    assert args.layout.world == "parts" and shipped.world == "shipped" and shipped.world_dir is None
    assert {args.layout.work, args.layout.results, args.layout.page}.isdisjoint({shipped.work, shipped.results, shipped.page})
    world_dir = tmp_path / "parts_world"
    layout = Layout(tmp_path / "work", tmp_path / "results", tmp_path / "figures", tmp_path / "study.md", world_dir, "parts")
    with pytest.raises(ValueError, match="need theirs"):
        Layout(world="parts")  # a world other than the shipped one without its folder
    layout.data("person").mkdir(parents=True)
    (layout.data("person") / "manifest.jsonl").write_text("")
    command = study_plan.train_command(Run("person", "global_v"), layout, steps=600)
    with pytest.raises(SystemExit):  # no harder world made yet
        parse_args(command[3:])
    assert "python -m baselines.study world" in capsys.readouterr().err
    world_dir.mkdir()
    (world_dir / "base.safetensors").write_bytes(b"")
    parsed = parse_args(command[3:])
    assert parsed.world_dir == str(world_dir) and parsed.mechanism == "global_v"
    make = study_plan.world_command(layout, 30)
    assert make[1:4] == ["-m", "miniworld.train_base", "unet"] and "--parts" in make and "--from-shipped" in make
    assert make[make.index("--weights-dir") + 1] == str(world_dir) and "miniworld/weights" not in " ".join(make)
    pairs = study.parse_args(["train", "--world", "pairs"]).layout  # two subjects in one image: a third world, its own files
    assert pairs.world == "pairs" and len({pairs.work, args.layout.work, shipped.work}) == 3 and pairs.page.name == "study_pairs.md"
    make = study_plan.world_command(pairs, 30)
    assert make[make.index("--pairs") + 1] == f"{study_plan.PAIR_ROWS:g}" and "--parts" not in make
    assert make[make.index("--weights-dir") + 1] == str(pairs.world_dir) and pairs.world_dir != args.layout.world_dir
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--world-dir", str(world_dir), "--output-dir", str(tmp_path / "o")])


def test_making_the_harder_world_never_replaces_a_trained_one(tmp_path):
    args = study.parse_args(["world", "--world", "parts", "--out", str(tmp_path)])
    args.layout = Layout(*(getattr(args.layout, f) for f in ("work", "results", "figures", "page")), tmp_path / "parts_world", "parts")
    (tmp_path / "parts_world").mkdir()
    (tmp_path / "parts_world" / "base.safetensors").write_bytes(b"trained")
    with pytest.raises(SystemExit, match="--overwrite-world"):
        study.make_world(args)
    assert (tmp_path / "parts_world" / "base.safetensors").read_bytes() == b"trained"


# --- timing and estimate ----------------------------------------------------------------------------------------
def test_timed_separates_start_up_from_steps_and_fails_with_the_command(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("stale line from an earlier run\n")
    script = ("import time, json\ntime.sleep(0.4)\n"
              f"for i in range(4):\n    open({str(metrics)!r}, 'a').write(json.dumps({{'step': i}}) + '\\n')\n    time.sleep(0.3)\n")
    entry = study_plan.timed([sys.executable, "-c", script], metrics, poll_s=0.02)
    assert entry["steps"] == 4
    assert 0.2 < entry["step_s"] < 0.8 and entry["first_step_s"] >= 0.35 and entry["wall_s"] >= entry["last_step_s"]
    with pytest.raises(subprocess.CalledProcessError):
        study_plan.timed([sys.executable, "-c", "raise SystemExit(3)"])


def test_the_estimate_adds_up_the_plan_with_measured_rates():
    times = {
        "data person": {"wall_s": 60.0, "rows": 6000},
        "train person_nested": {"step_s": 0.25, "batch": 8, "first_step_s": 10.0, "wall_s": 20},
        "train person_decoupled": {"step_s": 0.6, "batch": 16, "first_step_s": 30.0, "wall_s": 40},
        "train person_global_v": {"step_s": 0.7, "batch": 16, "first_step_s": 20.0, "wall_s": 40},
        "evaluate person_nested": {"seconds": 2 * 100 * (0.1 + 0.0125 * 4), "images": 100, "sampling_steps": 4},
    }
    rates = study_plan.measured_rates(times)
    assert rates["step_s"] == pytest.approx(0.6) and rates["startup_s"] == 20.0 and rates["row_s"] == pytest.approx(0.01)
    assert rates["image_a_s"] == pytest.approx(0.2) and rates["image_b_s"] == pytest.approx(0.025)  # twice the model
    runs = plan()
    est = study_plan.estimate(runs, rates, steps=100, rows=1000, identities=10, sampling_steps=20, step_s={"person_nested_q256": 1.0})
    assert est["train_runs"]["person_decoupled"] == pytest.approx(20.0 + 100 * 0.6)
    assert est["train_runs"]["person_nested_q256"] == pytest.approx(20.0 + 100 * 1.0)
    per_image = 0.2 + 0.025 * 20
    # a mechanism run: base, oracle, 6 knob values, another reference, then 6 from three photos and 6 mixed
    assert study_plan.images_per_case(Run("person", "decoupled")) == 21 and study_plan.images_per_case(Run("person", queries=64)) == 9
    assert est["evaluate_runs"]["person_global_v"] == pytest.approx(10 * 21 * per_image)
    assert est["total"] == pytest.approx(est["data"] + est["train"] + est["evaluate"]) and est["data"] == pytest.approx(10.0)
    two = study_plan.estimate(plan(pet=True), rates, steps=100, two_domains=True)
    assert {k for k in two["evaluate_runs"] if k.startswith("two_domains_")} == {f"two_domains_{m}" for m in study_plan.MECHANISMS}


# --- evaluation through a baseline mechanism ---------------------------------------------------------------------
def test_evaluate_samples_through_the_mechanism_and_its_knob_reaches_the_sampler():
    from miniworld import evaluate as ev

    torch.set_num_threads(1)
    result = ev.evaluate("person", n_identities=1, steps=2, mechanism="decoupled", scales=(0.0, 1.0), photos=2, mixing=True, keep_images=True)
    images = result["images"]
    oracle = "oracle" in images
    assert list(images) == ["base", *(["oracle"] if oracle else []), "decoupled scale=0", "decoupled scale=1", "other reference",
                            "2 photos scale=0", "2 photos scale=1", "mix scale=0", "mix scale=1"]
    assert len(images) == study_plan.images_per_case(Run("person", "decoupled"), scales=(0.0, 1.0), oracle=oracle)
    assert torch.equal(images["decoupled scale=0"], images["base"])  # decoupled CA at scale 0 is the base model
    assert not torch.equal(images["decoupled scale=1"], images["base"])
    assert result["mechanism"] == "decoupled" and "identity_similarity_other" in result["scores"]["mix scale=1"]
    assert ev.mechanism_of(ev.WEIGHTS["person"]) == "nested"  # files without the record are nested attention


def test_one_side_paints_the_other_half_with_the_background():
    from miniworld import evaluate as ev

    images = torch.rand(2, 8, 8, 3)
    left = ev.one_side(images, "left", ["red", "blue"])
    assert torch.equal(left[:, :, :4], images[:, :, :4])
    assert torch.allclose(left[1, :, 4:], torch.tensor([45, 75, 200]) / 255 * torch.ones(8, 4, 3))
    right = ev.one_side(images, "right", ["red", "blue"])
    assert torch.equal(right[:, :, 4:], images[:, :, 4:]) and torch.allclose(right[0, 0, 0], torch.tensor([200, 45, 45]) / 255)


# --- report on synthetic scores ---------------------------------------------------------------------------------
N = 6


def synthetic(run: Run, level: float, slope: float, photos: bool) -> dict:
    """Per-case scores: identity similarity level + slope·(knob index), prompt accuracy falling with the knob."""
    rng = np.random.default_rng(zlib.crc32(run.name.encode()))
    knob = "scale" if run.mechanism == "decoupled" else "λ"
    noise = lambda: rng.normal(0, 0.003, N)  # noqa: E731
    scores = {"base": (0.45, 0.9), "oracle": (0.7, 0.9)}
    for i, v in enumerate(run.knob()):
        scores[f"{run.mechanism} {knob}={v:g}"] = (level + slope * i, 0.9 - 0.05 * i)
    scores["other reference"] = (0.46, 0.9)
    if photos:
        for i, v in enumerate(run.knob()):
            scores[f"3 photos {knob}={v:g}"] = (level + slope * i + 0.05, 0.9 - 0.05 * i)
            scores[f"mix {knob}={v:g}"] = (level + slope * i - 0.05, 0.85 - 0.05 * i)
    body = {c: {"identity_similarity": (s + noise()).tolist(), "identity_similarity_other": (0.4 + noise()).tolist(),
                "identity_attributes": (s / 2 + noise()).tolist(), "prompt_accuracy": (p + noise()).tolist()} for c, (s, p) in scores.items()}
    return {"domain": run.domain, "mechanism": run.mechanism, "cases": N, "steps": 20, "seconds": 1.0, "scores": body,
            "conditions": list(body), "grid_cases": 2,
            "run": {"name": run.name, "domain": run.domain, "mechanism": run.mechanism, "queries": run.queries, "alpha": run.alpha, "ablation": run.ablation}}


@pytest.fixture
def synthetic_study(tmp_path):
    layout = Layout(tmp_path / "work", tmp_path / "results", tmp_path / "figures", tmp_path / "study.md")
    layout.results.mkdir(parents=True)
    levels = {"nested": (0.5, 0.06), "decoupled": (0.45, 0.03), "global_v": (0.47, 0.01), "multiple_tokens": (0.5, 0.02)}
    for run in plan():
        level, slope = levels[run.mechanism]
        result = synthetic(run, level + 0.01 * (run.queries // 64), slope, run.ablation is None)
        layout.result(run.name).write_text(json.dumps(result))
        layout.images(run.name).parent.mkdir(parents=True, exist_ok=True)
        tiles = {f"c{i}": np.full((2, 16, 16, 3), i * 9 % 255, np.uint8) for i in range(len(result["conditions"]))}
        np.savez_compressed(layout.images(run.name), reference=np.zeros((2, 16, 16, 3), np.uint8), **tiles)
    study_plan.record_time(layout, "train person_nested", {"wall_s": 600.0, "steps": 1200, "batch": 16, "step_s": 0.45, "first_step_s": 6.0})
    study_plan.record_time(layout, "evaluate person_nested", {"seconds": 60.0, "images": 504, "sampling_steps": 20, "cases": 24})
    (layout.results / "study.json").write_text(json.dumps({"steps": 1200, "full_steps": 1200, "identities": 24, "sampling_steps": 20}))
    return layout


def test_the_report_writes_figures_grids_tables_and_the_page(synthetic_study):
    from baselines import study_report
    from miniworld.evaluate import bootstrap_ci

    layout = synthetic_study
    page = study_report.report(layout).read_text()
    for name in ("study_tradeoff", "study_ablations", "study_matched_person", *(f"study_grid_person_{m}" for m in study_plan.MECHANISMS)):
        path = layout.figures / f"{name}.png"
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name
        assert f"figures/{name}.png" in page
    result = json.loads(layout.result("person_nested").read_text())
    mean, lo, hi = bootstrap_ci(result["scores"]["nested λ=2.5"]["identity_similarity"])
    assert f"| nested attention | λ=2.5 | {mean:.3f} [{lo:.3f}, {hi:.3f}] |" in page
    assert "Dry run" not in page and "| train person_nested | 10.0 min | 1200 steps at batch 16 | 0.45 s/step |" in page
    for heading in ("Queries", "α, the value-norm target", "One vs 3 reference photos", "Identity mixing", "Times on this machine",
                    "Estimated wall time"):
        assert f"## {heading}" in page, heading
    assert "| 256 |" in page and "| none |" in page  # both ablation tables have their rows


def test_matched_identity_picks_each_mechanisms_setting_nearest_the_common_level(synthetic_study):
    from baselines import study_report

    results = study_report.load(synthetic_study)
    runs = study_report.main_runs(results, "person")
    picks = study_report.matched(runs)
    # highest level every mechanism reaches: global V's top (0.47 + 5·0.01 = 0.52)
    assert picks["global_v"] == "global_v λ=4"
    assert picks["nested"] == "nested λ=1"  # 0.50 is the nearest to 0.52 of 0.50, 0.56, ...
    assert picks["decoupled"] == "decoupled scale=0.7"  # 0.45 + 2·0.03 = 0.51


def test_a_dry_run_page_says_so(synthetic_study):
    from baselines import study_report

    (synthetic_study.results / "study.json").write_text(json.dumps({"steps": 20, "full_steps": 1200, "identities": 2, "sampling_steps": 4}))
    assert "**Dry run**" in study_report.report(synthetic_study).read_text()
    (synthetic_study.results / "study.json").write_text(json.dumps({"steps": 600, "full_steps": 1200, "identities": 12, "sampling_steps": 12}))
    page = study_report.report(synthetic_study).read_text()
    assert "**Reduced budget**: 600 of the shipped 1200 training steps" in page and "Dry run" not in page


def test_the_study_cli_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "baselines.study", "estimate", "--pet", "--two-domains", "--out", "/nonexistent/dir"],
                          cwd=PACK_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "13 runs" in proc.stdout and "defaults" in proc.stdout


def test_the_paired_table_subtracts_case_by_case():
    from baselines import study_report

    def result(scores):
        return {"scores": {c: {"identity_similarity": i, "prompt_accuracy": p} for c, (i, p) in scores.items()}}

    runs = {"nested": result({"nested λ=1": ([0.6, 0.7, 0.8], [1.0, 1.0, 0.5]), "nested λ=2": ([0.9, 0.9, 0.9], [0.5, 0.5, 0.5])}),
            "decoupled": result({"decoupled scale=0.5": ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0]), "decoupled scale=1": ([0.5, 0.6, 0.7], [1.0, 0.5, 0.5])}),
            "global_v": result({"global_v λ=2": ([0.8, 0.9, 1.0], [0.5, 0.5, 0.5])})}
    text = study_report.paired_table(runs)
    # same cases: every difference is exactly 0.1 (so the interval is a point); scale 0.5 is not compared
    assert "| decoupled CA | scale=1 vs nested λ=1 | +0.100 [+0.100, +0.100] | +0.167 [" in text
    assert "| global V | λ=2 vs nested λ=2 | +0.000 [-0.100, +0.100] | +0.000 [+0.000, +0.000] |" in text
    assert "scale=0.5" not in text


def test_the_two_subject_outcome_pairs_both_bound_with_each_alone(synthetic_study):
    """The page's two-subject lines are per-case differences: here binding both costs the person half 0.1 identity
    (separated), and the dog half nothing (noise only)."""
    from baselines import study_report, study_two_subjects
    from miniworld.evaluate import bootstrap_ci

    rng = np.random.default_rng(0)
    levels = {"no subject": (0.40, 0.40), "oracle, both": (0.8, 0.8), "both λ=1": (0.5, 0.6), "person alone λ=1": (0.6, 0.4),
              "dog alone λ=1": (0.4, 0.6)}
    scores = {c: {f"{d}_{k}": ((p if d == "person" else q) + rng.normal(0, 0.01, N)).tolist() if k == "similarity" else [1.0] * N
                  for d in ("person", "pet") for k in ("similarity", "domain", "prompt")} for c, (p, q) in levels.items()}
    for c in scores:  # the dog half changes by 0.02 when the person alone is bound (a leak), the person half by 0.01
        scores[c].update(person_change=[0.01 * (c == "dog alone λ=1")] * N, pet_change=[0.02 * (c == "person alone λ=1")] * N)
    result = {"mechanism": "nested", "cases": N, "steps": 20, "seconds": 1.0, "scores": scores, "conditions": list(scores),
              "grid_cases": 2, "run": {"name": "two_domains_nested", "mechanism": "nested"}}
    synthetic_study.result("two_domains_nested").write_text(json.dumps(result))
    tiles = {f"c{i}": np.full((2, 16, 16, 3), 40 * i, np.uint8) for i in range(len(scores))}
    np.savez_compressed(synthetic_study.images("two_domains_nested"), reference_person=np.zeros((2, 16, 16, 3), np.uint8),
                        reference_pet=np.zeros((2, 16, 16, 3), np.uint8), **tiles)
    page = study_report.report(synthetic_study).read_text()
    cost = bootstrap_ci(np.subtract(scores["both λ=1"]["person_similarity"], scores["person alone λ=1"]["person_similarity"]))
    line = next(line for line in page.splitlines() if line.startswith("- nested attention, person half:"))
    assert f"minus person alone {cost[0]:+.3f} [{cost[1]:+.3f}, {cost[2]:+.3f}] (both lower)" in line
    dog = next(line for line in page.splitlines() if line.startswith("- nested attention, dog half:"))
    assert "(not separated)" in dog.split(";")[0] and "(bound higher)" in dog.split(";")[1]
    assert "- nested attention: person alone changes the dog half by 0.020; dog alone changes the person half by 0.010" in page
    assert "figures/study_grid_two_domains_nested.png" in page and "| nested attention | oracle, both | 0.7" in page
    columns = study_two_subjects.grid_columns(result, study_report.images_of(synthetic_study, result))
    assert [c for c, _ in columns] == ["reference (person)", "reference (dog)", *levels]
