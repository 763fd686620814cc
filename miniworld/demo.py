"""The README's main command: the shipped demo-world workflows, run headless through ComfyUI's executor,
as a contact sheet you can look at.

    python -m miniworld.demo [--output output/miniworld]

Rows: a held-out person (never seen in training) and a prompt; columns: the reference photo, the base
model with the subject word and no subject, then nested attention at λ 1, 2, 3. Last row: a person and a
dog in one image from the two weights files, beside the base model's image of that prompt.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.host import setup_comfyui

from . import world

WORKFLOWS = Path(__file__).resolve().parents[1] / "workflows"
SINGLE, PAIR = WORKFLOWS / "miniworld_single_subject.json", WORKFLOWS / "miniworld_person_and_pet.json"
LAMBDAS = (1.0, 2.0, 3.0)
PROMPTS = (  # scene words and words that change how the subject itself is drawn
    "a photo of a large person wearing a hat on a blue background, on the left",
    "an outline drawing of a large person on a striped background, in the center",
    "a grayscale photo of a large person on a yellow background, on the right",
)
PAIR_PROMPT = "a photo of a small person and a small dog on a green background, in the center"


# --- edits of an API-format prompt ------------------------------------------------------------------------
def _one(prompt: dict, class_type: str) -> tuple[str, dict]:
    found = [(k, v) for k, v in prompt.items() if v["class_type"] == class_type]
    if len(found) != 1:
        raise ValueError(f"the demo workflow should have one {class_type} node, it has {len(found)}")
    return found[0]


def with_text(prompt: dict, text: str, lam: float | None = None) -> dict:
    p = copy.deepcopy(prompt)
    _one(p, "NestedAttentionEncodePrompt")[1]["inputs"]["text"] = text
    if lam is not None:
        _one(p, "NestedAttentionScale")[1]["inputs"]["scale"] = lam
    return p


def without_subjects(prompt: dict) -> dict:
    """The same graph sampled by the base model from the unbound prompt (Apply and every Bind Token skipped)."""
    p = copy.deepcopy(prompt)
    _, sampler = _one(p, "KSampler")
    source = sampler["inputs"]["positive"]
    while p[source[0]]["class_type"] == "NestedAttentionBindToken":
        source = p[source[0]]["inputs"]["conditioning"]
    sampler["inputs"]["positive"] = source
    apply_id, apply = _one(p, "NestedAttentionApply")
    sampler["inputs"]["model"] = apply["inputs"]["model"]
    used = {tuple(v) for node in p.values() for v in node["inputs"].values() if isinstance(v, list)}
    for node_id in [k for k in p if not any(src == k for src, _ in used) and p[k]["class_type"] != "SaveImage"]:
        del p[node_id]  # nodes nothing reads any more (the host would run them for nothing)
    return p


# --- the sheet -------------------------------------------------------------------------------------------
def _tile(image: np.ndarray | Image.Image, size: int) -> Image.Image:
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    return im.convert("RGB").resize((size, size), Image.NEAREST)


def contact_sheet(rows: list[tuple[str, list[Image.Image]]], header: list[str], scale: int = 2) -> Image.Image:
    size, label_w, head_h = 128 * scale, 300, 28
    cols = max(len(tiles) for _, tiles in rows)
    sheet = Image.new("RGB", (label_w + cols * size, head_h + len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for c, text in enumerate(header):
        draw.text((label_w + c * size + 6, 8), text, fill="black")
    for r, (label, tiles) in enumerate(rows):
        y = head_h + r * size
        words, line, lines = label.split(), "", []
        for w in words:  # wrap the caption into the label column
            if len(line) + len(w) > 44:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        draw.multiline_text((6, y + 8), "\n".join(lines + [line]), fill="black")
        for c, tile in enumerate(tiles):
            sheet.paste(_tile(tile, size), (label_w + c * size, y))
    return sheet


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(prog="python -m miniworld.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("output/miniworld"), help="where the images and the sheet go")
    p.add_argument("--people", type=int, default=2, help="held-out persons (rows of prompts each)")
    args = p.parse_args(argv)
    t0 = time.time()
    setup_comfyui()
    import torch

    torch.set_num_threads(1)  # a 16×16 latent: threads only contend
    from workflows.run import load_nodes, run_prompt, temporary_folders, ui_to_api

    classes = load_nodes()
    single = ui_to_api(json.loads(SINGLE.read_text()), classes)
    pair = ui_to_api(json.loads(PAIR.read_text()), classes)
    out = args.output.resolve()
    rows = []

    def saved(prompt: dict) -> Image.Image:
        (path,) = run_prompt(prompt, out).images
        return Image.open(path)

    with temporary_folders() as (_, input_dir):
        people = world.eval_identities("person", args.people)
        for k, person in enumerate(people):
            reference = world.render_reference(person, size=128, seed=k)
            Image.fromarray(reference).save(input_dir / "miniworld_person.png")
            for text in PROMPTS:
                tiles = [reference, saved(without_subjects(with_text(single, text)))]
                tiles += [saved(with_text(single, text, lam)) for lam in LAMBDAS]
                rows.append((f"held-out person {k + 1}: {text}", tiles))
        dog = world.eval_identities("pet", 1)[0]
        pet_reference = world.render_reference(dog, size=128, seed=0)
        Image.fromarray(pet_reference).save(input_dir / "miniworld_pet.png")
        Image.fromarray(world.render_reference(people[0], size=128, seed=0)).save(input_dir / "miniworld_person.png")
        both = with_text(pair, PAIR_PROMPT)
        rows.append((f"person 1 and a held-out dog: {PAIR_PROMPT}",
                     [world.render_reference(people[0], size=128, seed=0), saved(without_subjects(both)), saved(both), pet_reference]))
    header = ["reference photo", "base model (no subject)", *[f"nested attention λ={lam:g}" for lam in LAMBDAS]]
    sheet = contact_sheet(rows, header)
    path = out / "contact_sheet.png"
    sheet.save(path)
    print(f"{len(rows)} rows of held-out subjects in {time.time() - t0:.0f} s; last row: base, person + dog, the dog's photo")
    print(f"contact sheet: {path}")
    return path


if __name__ == "__main__":
    main()
