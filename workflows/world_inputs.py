"""The reference photos the demo-world workflows read (Load Image), rendered from held-out identities of the world.

    python -m workflows.world_inputs --out <ComfyUI>/input      # in the pack's folder; numpy and Pillow only

Held-out identities were never seen by any of the world's models, as a user's photo would not be.
"""
from __future__ import annotations

import argparse
from pathlib import Path

PHOTOS = {  # file name -> (domain, held-out identity: index into world.eval_identities, photo seed)
    "miniworld_person.png": ("person", 0, 0),
    "miniworld_person_photo_2.png": ("person", 0, 1),  # the same person, another photo
    "miniworld_person_photo_3.png": ("person", 0, 2),
    "miniworld_person_b.png": ("person", 1, 0),  # a second person
    "miniworld_pet.png": ("pet", 0, 0),
}
SIZE = 128  # the world's image side


def write_photos(out_dir: str | Path, names=None) -> list[Path]:
    """Write the photos (all, or those of `names`) as PNGs into `out_dir`; returns their paths."""
    from PIL import Image

    from miniworld import world

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names if names is not None else PHOTOS:
        domain, index, seed = PHOTOS[name]
        identity = world.eval_identities(domain, index + 1)[index]
        Image.fromarray(world.render_reference(identity, size=SIZE, seed=seed)).save(out / name)
        paths.append(out / name)
    return paths


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m workflows.world_inputs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="ComfyUI's input folder")
    paths = write_photos(p.parse_args(argv).out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
