"""The demo world's shipped files in the pack's real paths: its workflows run through ComfyUI's executor, the
demo's graph edits hold, and `python -m training.train --world` continues the shipped weights at the loss scale
of the shipped run, resumes and exports. (That the weights personalise: tests/test_miniworld_personalisation.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from training.host import PACK_ROOT, pack_module, setup_comfyui

setup_comfyui(cpu=True)

WORKFLOWS = PACK_ROOT / "workflows"
MAX_WORLD_LOSS = 0.3  # v-MSE of the shipped runs: 0.05-0.11 per step (docs/miniworld.md); a broken model gives ~1


@pytest.fixture(scope="module")
def world_inputs(node_classes):
    from miniworld import world
    from workflows.run import temporary_folders

    with temporary_folders() as (_, input_dir):
        for domain in world.DOMAINS:
            photo = world.render_reference(world.eval_identities(domain, 1)[0], size=128)
            Image.fromarray(photo).save(input_dir / f"miniworld_{domain}.png")
        yield input_dir


@pytest.mark.parametrize("name", ["miniworld_single_subject.json", "miniworld_person_and_pet.json"])
def test_the_world_workflows_run_on_the_shipped_files(world_inputs, name, tmp_path):
    from miniworld.demo import with_text, without_subjects
    from workflows.run import run_prompt, ui_to_api

    prompt = ui_to_api(json.loads((WORKFLOWS / name).read_text()))
    for key in prompt:  # 4 steps: the graph and its files, not the picture
        if prompt[key]["class_type"] == "KSampler":
            prompt[key]["inputs"]["steps"] = 4
    nested = np.asarray(Image.open(run_prompt(prompt, tmp_path / "nested").images[0]), dtype=np.float64)
    base = np.asarray(Image.open(run_prompt(without_subjects(prompt), tmp_path / "base").images[0]), dtype=np.float64)
    assert nested.shape == base.shape == (128, 128, 3) and base.std() > 10  # an image, not a blank
    assert np.abs(nested - base).mean() > 0.5  # the subjects reach the sampler
    assert with_text(prompt, "a photo of a large person on a red background, on the left") != prompt


def test_the_training_cli_continues_the_shipped_weights(tmp_path):
    from miniworld import world
    from miniworld.evaluate import WEIGHTS

    manifest = world.make_triplets("person", tmp_path / "data", 16, seed=3, size=128)
    common = [sys.executable, "-m", "training.train", "--world", "--manifest", str(manifest), "--word", "person", "--domain", "person",
              "--resolution", "128", "--train-batch-size", "8", "--init-weights", str(WEIGHTS["person"]), "--learning-rate", "1e-5",
              "--lr-warmup-steps", "0", "--validation-steps", "0", "--report-to", "none", "--checkpointing-steps", "1",
              "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACK_ROOT)}  # COMFYUI_PATH, if set, too
    for steps, extra in (("2", []), ("3", ["--resume", "latest"])):
        proc = subprocess.run(common + ["--max-train-steps", steps, *extra], cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and max(losses) < MAX_WORLD_LOSS, losses
    core = pack_module("nested_core")
    exported = core.load_weights(tmp_path / "run" / "nested_attention.safetensors")
    assert exported.config == core.load_weights(WEIGHTS["person"]).config
