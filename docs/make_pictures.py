"""The pack's pictures, made by code: its registry icon and the node pictures in docs/nodes/.

    python docs/make_pictures.py            # from the pack's folder, with the test venv (.venv/bin/python)

docs/icon.png                 the icon pyproject.toml's [tool.comfy] Icon names (drawn, 256 px, no model)
docs/nodes/attention_maps.png Attention Maps on the demo world: a held-out person sampled with the shipped
                              nested_person weights (the world workflow's prompt and settings), then the node's
                              word-attention and nested-token maps for the input, middle and output blocks
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def make_icon(path: Path = DOCS / "icon.png", side: int = 256) -> Path:
    """Nested attention as a picture: a word token (the ring) whose value comes from an inner attention over
    subject tokens (the dots), on a dark tile."""
    from PIL import Image, ImageDraw

    scale = 4  # drawn large, downsampled: smooth edges
    s = side * scale
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((0, 0, s - 1, s - 1), radius=s // 6, fill=(24, 20, 38, 255))
    c = s / 2
    for radius, width, colour in ((0.36, 0.05, (252, 140, 10)), (0.22, 0.04, (190, 54, 84))):
        r = radius * s
        draw.ellipse((c - r, c - r, c + r, c + r), outline=colour + (255,), width=int(width * s))
    dots = [(-0.07, -0.05, (253, 255, 163)), (0.06, -0.06, (87, 16, 110)), (0.0, 0.07, (240, 180, 60))]
    for dx, dy, colour in dots:
        r = 0.045 * s
        draw.ellipse((c + dx * s - r, c + dy * s - r, c + dx * s + r, c + dy * s + r), fill=colour + (255,))
    image = image.resize((side, side), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def make_attention_maps_picture(path: Path = DOCS / "nodes" / "attention_maps.png") -> Path:
    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    sys.path.insert(0, str(ROOT))
    from training.host import pack_module, setup_comfyui

    setup_comfyui(cpu=True)
    torch.set_num_threads(1)
    import comfy.sample

    from miniworld import world
    from miniworld.models import WEIGHTS_DIR, load_world

    nested_core = pack_module("nested_core")
    prompt_mod, subject_mod = pack_module("nodes.prompt"), pack_module("nodes.subject")
    apply_mod, maps_mod = pack_module("nodes.apply"), pack_module("nodes.attention_maps")

    models = load_world(WEIGHTS_DIR)
    weights = nested_core.load_weights(WEIGHTS_DIR / "nested" / "nested_person.safetensors")
    identity = world.eval_identities("person", 1)[0]  # held out: as workflows/world_inputs.py's miniworld_person.png
    reference = torch.from_numpy(world.render_reference(identity, size=128, seed=0)).float()[None] / 255
    subject = subject_mod.encode_subject(weights, models.clip_vision, reference).with_lambda(1.0)
    text = "a photo of a large person wearing a hat on a blue background, on the left"
    positive = prompt_mod.bind_subject(prompt_mod.encode_prompt(models.clip, text), subject, "person", 0)
    negative = prompt_mod.encode_prompt(models.clip, "")
    model = apply_mod.apply_nested_attention(models.patcher)
    empty = torch.zeros(1, 4, 16, 16)
    with torch.no_grad():
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(empty, 7), 20, 3.0, "euler", "normal",
                                      positive, negative, empty, seed=7, disable_pbar=True)
        decoded = models.vae.decode(samples)[..., :3].clamp(0, 1)
        recorder = maps_mod.record_attention(model, positive, {"samples": samples}, percent=0.5, seed=7)
        groups = maps_mod.group_maps(recorder.maps, (16, 16), (128, 128))
        words, tokens, raw = maps_mod.render(groups, decoded, labels=False)

    def pil(t):
        return Image.fromarray((t.numpy() * 255).round().astype(np.uint8)).resize((192, 192), Image.NEAREST)

    tiles = [("reference", pil(reference[0])), ("sampled", pil(decoded[0]))]
    for i, group in enumerate(maps_mod.GROUPS):
        tiles.append((f"word: {group}, max {raw[i].max() * 100:.1f}%", pil(words[i])))
    tiles.append(("", None))
    tiles.append(("", None))
    m = subject.tokens.shape[0]
    for i, group in enumerate(maps_mod.GROUPS):
        top = groups[group].top.mean() * 100
        tiles.append((f"{group}: top token {top:.0f}% (even {100 / m:.0f}%)", pil(tokens[i])))
    cols, pad, top = 5, 6, 16
    sheet = Image.new("RGB", (cols * (192 + pad) + pad, 2 * (192 + top + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        x, y = pad + (i % cols) * (192 + pad), pad + (i // cols) * (192 + top + pad)
        if tile is not None:
            sheet.paste(tile, (x, y + top))
            draw.text((x, y + 2), label, fill=(0, 0, 0))
    draw.multiline_text((pad, 192 + top + 2 * pad + top), CAPTION, fill=(0, 0, 0), spacing=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    return path


CAPTION = """Attention Maps on the demo world (held-out person,
shipped nested_person weights, lambda 1, percent 0.5).
Top: where the word 'person' is attended, each map
scaled to its maximum: on the subject, most in the
output blocks. Bottom: which of the 16 subject tokens
each region reads (colour = PCA of the tokens;
grey = all evenly); the label gives the strongest
token's weight against an even share."""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python docs/make_pictures.py", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="*", help="icon, attention_maps (default: both)")
    what = p.parse_args(argv).what or ["icon", "attention_maps"]
    if set(what) - {"icon", "attention_maps"}:
        p.error(f"unknown picture(s) {sorted(set(what) - {'icon', 'attention_maps'})}: choose icon, attention_maps")
    if "icon" in what:
        print(make_icon())
    if "attention_maps" in what:
        print(make_attention_maps_picture())


if __name__ == "__main__":
    main()
