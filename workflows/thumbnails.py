"""Template-browser thumbnails (`<workflow>.jpg`, what frontend 1.32 requests for a custom pack's template),
made by running the demo-world workflows through ComfyUI's executor on the shipped files.

    python -m workflows.build --thumbnails      # rebuilds the workflows, then this (rerun when the world's weights change)

A world workflow's thumbnail is its reference photo(s) and what it saved. An SDXL workflow cannot run here
(no SDXL download), so its thumbnail is its demo-world twin's picture, labelled as such on the picture.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SIDE = 512  # square, like the core templates' thumbnails
BACKGROUND, INK, DIM = (30, 30, 34), (236, 236, 236), (160, 160, 168)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _centered(draw: ImageDraw.ImageDraw, y: int, text: str, size: int, fill, x0: int = 0, x1: int = SIDE) -> None:
    font = _font(size)
    width = draw.textlength(text, font=font)
    draw.text((x0 + (x1 - x0 - width) / 2, y), text, font=font, fill=fill)


def compose(title: str, references: list[Image.Image], outputs: list[Image.Image], labels: tuple = (), footer: str = "",
            banner: str | None = None) -> Image.Image:
    """Title, the reference photo(s), the saved image(s) large (with `labels`), a footer (or a red `banner`)."""
    sheet = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    _centered(draw, 10, title, 22, INK)
    ref_side, y = 84, 44
    x = (SIDE - len(references) * (ref_side + 6) + 6 - 90) // 2
    draw.text((x, y + ref_side // 2 - 9), "reference", font=_font(15), fill=DIM)
    x += 90
    for ref in references:
        sheet.paste(ref.convert("RGB").resize((ref_side, ref_side), Image.NEAREST), (x, y))
        x += ref_side + 6
    n = max(1, len(outputs))
    top, bottom = y + ref_side + 14, SIDE - 34
    label_h = 22 if labels else 0
    side = min(bottom - top - label_h, (SIDE - 16 - 8 * (n - 1)) // n)
    x = (SIDE - n * side - 8 * (n - 1)) // 2
    top += (bottom - top - label_h - side) // 2
    for i, image in enumerate(outputs):
        sheet.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x, top))
        if i < len(labels):
            _centered(draw, top + side + 2, labels[i], 17, INK, x, x + side)
        x += side + 8
    if banner:  # a red band instead of the footer: says the picture is not this graph's own result
        draw.rectangle((0, SIDE - 32, SIDE, SIDE), fill=(150, 40, 40))
        _centered(draw, SIDE - 25, banner, 15, (255, 255, 255))
    else:
        _centered(draw, SIDE - 26, footer, 14, DIM)
    return sheet


def _title(name: str) -> str:
    stem = name.removesuffix(".json")
    for prefix in ("miniworld_", "nested_attention_"):
        stem = stem.removeprefix(prefix)
    return stem.replace("_", " ")


def run_world_workflow(path: Path, input_dir: Path, output_dir: Path) -> tuple[list[Image.Image], list[Image.Image]]:
    """(the photos its Load Image nodes read, the images it saved), from running the workflow as shipped."""
    from .run import load_nodes, run_prompt, ui_to_api

    workflow = json.loads(path.read_text())
    references = [Image.open(input_dir / n["widgets_values"][0]) for n in workflow["nodes"] if n["type"] == "LoadImage"]
    result = run_prompt(ui_to_api(workflow, load_nodes()), output_dir)
    return references, [Image.open(p) for p in result.images]


def write_thumbnails(folder: Path) -> list[Path]:
    """Run every world workflow of the specs, write its thumbnail and its SDXL twin's; returns the paths written."""
    from training.host import setup_comfyui

    setup_comfyui()
    import torch

    torch.set_num_threads(1)  # 16x16 latents: threads only contend
    from .run import temporary_folders
    from .specs import WORKFLOWS
    from .world_inputs import write_photos

    written, pictures = [], {}
    with temporary_folders() as (_, input_dir), tempfile.TemporaryDirectory(prefix="nested_thumbs_") as out:
        write_photos(input_dir)
        for name, spec in WORKFLOWS.items():
            if not spec.base.world:
                continue
            t0 = time.time()
            pictures[name] = run_world_workflow(folder / name, input_dir, Path(out) / name.removesuffix(".json"))
            image = compose(_title(name) + " (demo world)", *pictures[name], labels=spec.labels,
                            footer="made by running this workflow on the demo world, 128 px")
            written.append(_save(image, folder / name))
            print(f"{written[-1]} ({time.time() - t0:.1f} s)")
    for name, spec in WORKFLOWS.items():
        if spec.twin:
            image = compose(_title(name) + " (SDXL)", *pictures[spec.twin], labels=spec.labels,
                            banner="not SDXL output: this graph run on the demo world, 128 px")
            written.append(_save(image, folder / name))
            print(written[-1])
    return written


def _save(image: Image.Image, workflow_path: Path) -> Path:
    path = workflow_path.with_suffix(".jpg")
    image.save(path, quality=85, optimize=True)
    return path
