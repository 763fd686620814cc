"""The miniature world: persons and dogs with discrete identities, rendered into captioned scenes.

An identity is a combination of attribute values (head shape, skin colour, ... for a person; body shape,
ears, fur, ... for a dog). A scene sets background, position, size and a style that changes how the
subject itself is drawn (outlines only, grayscale, inverted, pixelated, a hat, upside down), so that
following the prompt and keeping the identity can pull against each other.

Everything is a pure function of its inputs (numpy Generator + PIL drawing, no global RNG): the same
arguments give the same bytes. Drawing happens at 4x and is box-filtered down.

    python -m miniworld.world triplets --domain person --out DIR --n 5000
    python -m miniworld.world sheet --out sheet.png
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DOMAINS = ("person", "pet")
SUBJECT_WORD = {"person": "person", "pet": "dog"}
RGB = tuple[int, int, int]

# ---------------------------------------------------------------------------------------------- identities
SKIN = {"pale": (255, 224, 205), "peach": (240, 178, 138), "olive": (168, 146, 92), "tan": (196, 136, 86), "brown": (138, 88, 52), "dark": (82, 52, 34)}
HAIR = {"black": (25, 25, 25), "brown": (112, 64, 28), "blonde": (245, 215, 110), "red": (205, 68, 28), "gray": (172, 172, 172), "blue": (45, 90, 225)}
EYES = {"brown": (105, 55, 20), "blue": (40, 125, 235), "green": (40, 175, 60), "violet": (155, 60, 210)}
FUR = {"white": (242, 238, 228), "black": (30, 30, 30), "brown": (122, 76, 40), "golden": (222, 172, 80), "gray": (140, 140, 146), "ginger": (212, 100, 40)}
FUR2 = {"white": (252, 252, 252), "black": (18, 18, 18), "chocolate": (78, 44, 20), "cream": (236, 216, 170), "rust": (168, 58, 28)}
COLLAR = {"none": None, "red": (225, 30, 40), "blue": (30, 70, 230), "green": (30, 190, 60), "yellow": (250, 220, 20)}

ATTRIBUTES: dict[str, list[tuple[str, list[str]]]] = {
    "person": [
        ("head", ["round", "oval", "square", "wide"]),
        ("skin", list(SKIN)),
        ("hair_colour", list(HAIR)),
        ("hair_style", ["bald", "short", "long", "mohawk", "bun"]),
        ("eye_colour", list(EYES)),
        ("eye_spacing", ["narrow", "medium", "wide"]),
        ("marking", ["none", "freckles", "scar", "glasses", "beard"]),
    ],
    "pet": [
        ("body", ["slim", "round", "long", "tall"]),
        ("ears", ["pointy", "floppy", "round"]),
        ("fur", list(FUR)),
        ("fur2", list(FUR2)),
        ("pattern", ["solid", "spots", "stripes", "patch"]),
        ("tail", ["straight", "curly", "fluffy", "stub"]),
        ("collar", list(COLLAR)),
    ],
}
# The parts of a subject and the attributes each one shows (miniworld.identity_codes' part codes): label i + 1
# in render_parts is the i-th part; 0 is everything else (background, the shirt, the hat).
PARTS: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {"hair": ("hair_colour", "hair_style"),
               "face": ("head", "skin", "eye_colour", "eye_spacing", "marking", "hair_colour")},  # eyebrows, beard
    "pet": {"head": ("ears", "collar", "fur", "fur2"), "body": ("body", "fur", "fur2", "pattern"), "tail": ("tail", "fur")},
}
MAX_PARTS = max(len(parts) for parts in PARTS.values())
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 20250103


@dataclass(frozen=True)
class Identity:
    domain: str
    attrs: tuple[int, ...]  # one value index per entry of ATTRIBUTES[domain]

    @property
    def index(self) -> int:
        return int(np.ravel_multi_index(self.attrs, _radix(self.domain)))

    def named(self) -> dict[str, str]:
        return {name: values[v] for (name, values), v in zip(ATTRIBUTES[self.domain], self.attrs)}


def _radix(domain: str) -> tuple[int, ...]:
    return tuple(len(values) for _, values in ATTRIBUTES[domain])


def num_identities(domain: str) -> int:
    return int(np.prod(_radix(domain)))


def identity_from_index(domain: str, i: int) -> Identity:
    return Identity(domain, tuple(int(v) for v in np.unravel_index(i, _radix(domain))))


@cache
def _split(domain: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([SPLIT_SEED, DOMAINS.index(domain)]).permutation(num_identities(domain))
    n_heldout = round(HELDOUT_FRACTION * len(order))
    return np.sort(order[n_heldout:]), order[:n_heldout]  # held-out keeps its random order for eval_identities


def train_identities(domain: str) -> list[Identity]:
    return [identity_from_index(domain, int(i)) for i in _split(domain)[0]]


def heldout_identities(domain: str) -> list[Identity]:
    """Identities no model of the project is ever trained on."""
    return [identity_from_index(domain, int(i)) for i in np.sort(_split(domain)[1])]


def eval_identities(domain: str, n: int = 16) -> list[Identity]:
    """A fixed list drawn from the held-out identities, for tests and demos."""
    return [identity_from_index(domain, int(i)) for i in _split(domain)[1][:n]]


# --------------------------------------------------------------------------------------------------- scenes
BACKGROUND_COLOURS = {"red": (200, 45, 45), "green": (55, 160, 65), "blue": (45, 75, 200), "yellow": (238, 214, 64), "purple": (125, 55, 160), "orange": (240, 135, 35)}
BACKGROUND_PATTERNS = {"striped": ((40, 112, 112), (236, 230, 210)), "polka dot": ((232, 60, 140), (246, 240, 234)), "checkered": ((40, 40, 40), (228, 228, 228))}
REFERENCE_BACKGROUND = (218, 218, 212)
SCENE_FIELDS: dict[str, tuple[str, ...]] = {
    "background": (*BACKGROUND_COLOURS, *BACKGROUND_PATTERNS),
    "position": ("left", "center", "right"),
    "size": ("small", "large"),
    "style": ("none", "outline drawing", "grayscale", "inverted colors", "pixelated", "wearing a hat", "upside down"),
}
SUBJECT_FRACTION = {"small": 0.42, "large": 0.72}  # subject box side / image side
POSITION_X = {"small": (0.25, 0.5, 0.75), "large": (0.34, 0.5, 0.66)}


@dataclass(frozen=True)
class Scene:
    background: str = "blue"
    position: str = "center"
    size: str = "large"
    style: str = "none"


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(**{name: values[int(rng.integers(len(values)))] for name, values in SCENE_FIELDS.items()})


def scene_labels(scene: Scene) -> dict[str, int]:
    """Class index of each scene field, for the prompt metric."""
    return {name: SCENE_FIELDS[name].index(getattr(scene, name)) for name in SCENE_FIELDS}


# {a} is the subject noun phrase, {bg} the background phrase, {pos} the position phrase
CAPTION_TEMPLATES = ("{a} on a {bg} background, {pos}", "{a} {pos}, on a {bg} background", "{a} against a {bg} background, {pos}", "{a} {pos} in front of a {bg} background")
STYLE_PHRASES = {
    "none": "a photo of a {size} {word}",
    "outline drawing": "an outline drawing of a {size} {word}",
    "grayscale": "a grayscale photo of a {size} {word}",
    "inverted colors": "a photo of a {size} {word} in inverted colors",
    "pixelated": "a pixelated image of a {size} {word}",
    "wearing a hat": "a photo of a {size} {word} wearing a hat",
    "upside down": "a photo of a {size} {word} upside down",
}
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}


def caption(domain: str, scene: Scene, *, variant: int = 0) -> str:
    """Plain English for the scene; `variant` picks a template. The subject word appears exactly once."""
    subject = STYLE_PHRASES[scene.style].format(size=scene.size, word=SUBJECT_WORD[domain])
    template = CAPTION_TEMPLATES[variant % len(CAPTION_TEMPLATES)]
    return template.format(a=subject, bg=scene.background, pos=POSITION_PHRASES[scene.position])


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (inverse of `caption` for every template)."""
    def find(options: dict[str, str]) -> str:
        hits = [value for value, pattern in options.items() if re.search(pattern, text)]
        if len(hits) != 1:
            raise ValueError(f"caption {text!r} matches {hits} of {list(options)}")
        return hits[0]

    styled = {s: re.escape(p).replace(r"\{size\}", r"\w+").replace(r"\{word\}", r"\w+") + r"\b" for s, p in STYLE_PHRASES.items()}
    styled["none"] += r"(?!.*(wearing a hat|upside down|inverted colors))"
    return Scene(
        background=find({b: rf"\b{b} background" for b in SCENE_FIELDS["background"]}),
        position=find({p: re.escape(phrase) for p, phrase in POSITION_PHRASES.items()}),
        size=find({s: rf"\b{s}\b" for s in SCENE_FIELDS["size"]}),
        style=find(styled),
    )


# -------------------------------------------------------------------------------------------------- drawing
SUPERSAMPLE = 4
SHIRT = (78, 88, 110)
HAT, HAT_BAND = (28, 28, 34), (215, 30, 30)
TRANSPARENT = (0, 0, 0, 0)


class Pen:
    """Draws parts in unit coordinates (0..1) of a square subject box on an RGBA layer.

    In outline mode every filled part first erases what it covers (so outlines occlude like surfaces)
    and keeps only its edge, in its own colour."""

    def __init__(self, layer: Image.Image, x0: float, y0: float, side: float, outline: bool, labels: dict[str, int] | None = None):
        self.draw, self.x0, self.y0, self.side, self.outline = ImageDraw.Draw(layer), x0, y0, side, outline
        self.edge = max(1, round(side * 0.045))
        self.labels, self.part = labels, None  # label mode: every shape filled with its part's label, not its colour

    def _paint(self, colour: RGB) -> RGB:
        return colour if self.labels is None else (self.labels.get(self.part, 0),) * 3

    def _box(self, cx: float, cy: float, w: float, h: float) -> list[float]:
        s = self.side
        return [self.x0 + (cx - w / 2) * s, self.y0 + (cy - h / 2) * s, self.x0 + (cx + w / 2) * s, self.y0 + (cy + h / 2) * s]

    def _width(self, w: float) -> int:
        return max(1, round(w * self.side))

    def _fill(self, colour: RGB) -> dict:
        colour = self._paint(colour)
        return {"fill": TRANSPARENT, "outline": (*colour, 255), "width": self.edge} if self.outline else {"fill": (*colour, 255)}

    def ellipse(self, cx: float, cy: float, w: float, h: float, colour: RGB) -> None:
        self.draw.ellipse(self._box(cx, cy, w, h), **self._fill(colour))

    def rect(self, cx: float, cy: float, w: float, h: float, colour: RGB, radius: float = 0.0) -> None:
        self.draw.rounded_rectangle(self._box(cx, cy, w, h), radius=radius * self.side, **self._fill(colour))

    def polygon(self, points: list[tuple[float, float]], colour: RGB) -> None:
        xy = [(self.x0 + x * self.side, self.y0 + y * self.side) for x, y in points]
        self.draw.polygon(xy, **self._fill(colour))

    def chord(self, cx: float, cy: float, w: float, h: float, start: float, end: float, colour: RGB) -> None:
        self.draw.chord(self._box(cx, cy, w, h), start, end, **self._fill(colour))

    def line(self, points: list[tuple[float, float]], colour: RGB, width: float) -> None:
        xy = [(self.x0 + x * self.side, self.y0 + y * self.side) for x, y in points]
        self.draw.line(xy, fill=(*self._paint(colour), 255), width=self._width(width), joint="curve")

    def arc(self, cx: float, cy: float, w: float, h: float, start: float, end: float, colour: RGB, width: float) -> None:
        self.draw.arc(self._box(cx, cy, w, h), start, end, fill=(*self._paint(colour), 255), width=self._width(width))

    def hat(self, cx: float, top: float, brim: float) -> None:
        """A top hat with a red band whose brim rests at height `top`."""
        self.part = None
        self.rect(cx, top, brim, 0.06, HAT, radius=0.02)
        self.rect(cx, top - 0.14, 0.6 * brim, 0.26, HAT)
        self.rect(cx, top - 0.06, 0.6 * brim, 0.06, HAT_BAND)


def draw_person(pen: Pen, identity: Identity, hat: bool) -> None:
    a = identity.named()
    skin, hair, eyes = SKIN[a["skin"]], HAIR[a["hair_colour"]], EYES[a["eye_colour"]]
    hw, hh = {"round": (0.5, 0.5), "oval": (0.42, 0.56), "square": (0.48, 0.5), "wide": (0.6, 0.46)}[a["head"]]
    cx, cy = 0.5, 0.42
    top = cy - hh / 2
    pen.part = "hair"
    if a["hair_style"] == "long":  # hair falling behind the shoulders
        pen.rect(cx, top + 0.36, hw + 0.1, 0.74, hair, radius=0.1)
    pen.part = None
    pen.rect(cx, 0.93, 0.72, 0.3, SHIRT, radius=0.1)
    pen.part = "face"
    pen.rect(cx, 0.72, 0.12, 0.2, skin)
    if a["head"] == "square":
        pen.rect(cx, cy, hw, hh, skin, radius=0.07)
    else:
        pen.ellipse(cx, cy, hw, hh, skin)
    pen.part = "hair"
    if a["hair_style"] in ("short", "long", "bun"):  # a cap over the top of the head
        pen.chord(cx, top + 0.16, hw + 0.06, 0.42 * hh + 0.08, 180, 360, hair)
    if a["hair_style"] == "bun":
        pen.ellipse(cx, top - 0.06, 0.17, 0.15, hair)
    if a["hair_style"] == "mohawk":
        pen.rect(cx, top, 0.1, 0.24, hair, radius=0.03)
    pen.part = "face"
    if a["marking"] == "beard":
        pen.chord(cx, cy + 0.05, hw, hh, 25, 155, hair)  # the chin and jaw; the mouth is drawn over it
    dx = {"narrow": 0.07, "medium": 0.11, "wide": 0.15}[a["eye_spacing"]]
    eye_y = cy + 0.01
    for side in (-1, 1):  # eyebrows show the hair colour even on a bald head
        pen.ellipse(cx + side * dx, eye_y, 0.1, 0.09, eyes)
        pen.line([(cx + side * (dx - 0.05), eye_y - 0.085), (cx + side * (dx + 0.05), eye_y - 0.085)], hair, 0.04)
    pen.arc(cx, cy + 0.11, 0.16, 0.09, 20, 160, (150, 38, 38), 0.025)
    if a["marking"] == "freckles":
        dot = (215, 150, 110) if sum(skin) < 360 else (140, 66, 30)
        for side in (-1, 1):
            for ox, oy in ((-0.03, 0.07), (0.02, 0.09), (0.035, 0.06)):
                pen.ellipse(cx + side * (dx + ox), cy + oy, 0.035, 0.035, dot)
    if a["marking"] == "scar":
        pen.line([(cx + 0.05, cy - 0.07), (cx + 0.17, cy + 0.12)], (205, 25, 35), 0.035)
    if a["marking"] == "glasses":
        for side in (-1, 1):
            pen.arc(cx + side * dx, eye_y, 0.16, 0.15, 0, 360, (10, 10, 10), 0.028)
        pen.line([(cx - dx + 0.08, eye_y), (cx + dx - 0.08, eye_y)], (10, 10, 10), 0.028)
    if hat:
        pen.hat(cx, top + 0.03, hw + 0.14)


DOG_BODY = {"slim": (0.52, 0.22, 0.22), "round": (0.5, 0.34, 0.14), "long": (0.7, 0.2, 0.12), "tall": (0.46, 0.24, 0.3)}  # w, h, leg length


def draw_dog(pen: Pen, identity: Identity, hat: bool) -> None:
    """A dog seen from the side, facing right."""
    a = identity.named()
    fur, fur2, collar = FUR[a["fur"]], FUR2[a["fur2"]], COLLAR[a["collar"]]
    bw, bh, leg = DOG_BODY[a["body"]]
    feet, bx = 0.88, 0.45
    by = feet - leg - 0.4 * bh
    left, right = bx - bw / 2, bx + bw / 2
    hx, hy, r = right - 0.02, by - bh / 2 - 0.07, 0.13
    tail = {"straight": lambda: pen.line([(left + 0.03, by - 0.04), (left - 0.12, by - 0.24)], fur, 0.05),
            "curly": lambda: pen.arc(left - 0.03, by - 0.16, 0.16, 0.16, 0, 360, fur, 0.05),
            "fluffy": lambda: pen.ellipse(left - 0.07, by - 0.13, 0.15, 0.25, fur),
            "stub": lambda: pen.ellipse(left, by - 0.06, 0.1, 0.09, fur)}
    pen.part = "tail"
    tail[a["tail"]]()
    pen.part = "body"
    for x in (left + 0.1 * bw, left + 0.26 * bw, right - 0.24 * bw, right - 0.08 * bw):
        pen.rect(x, (by + feet) / 2, 0.075, feet - by, fur, radius=0.02)
    pen.ellipse(bx, by, bw, bh, fur)
    draw_fur_pattern(pen, a["pattern"], bx, by, bw, bh, fur2)
    pen.part = "head"
    if a["ears"] == "pointy":
        pen.polygon([(hx - 0.12, hy - 0.06), (hx - 0.0, hy - 0.1), (hx - 0.1, hy - 0.27)], fur2)
    elif a["ears"] == "round":
        pen.ellipse(hx - 0.06, hy - 0.12, 0.13, 0.13, fur2)
    pen.ellipse(hx, hy, 2 * r, 2 * r, fur)
    pen.ellipse(hx + 0.13, hy + 0.05, 0.15, 0.11, fur)
    pen.ellipse(hx + 0.2, hy + 0.03, 0.06, 0.05, (15, 15, 15))
    pen.ellipse(hx + 0.04, hy - 0.03, 0.05, 0.05, (15, 15, 15))
    if a["ears"] == "floppy":  # hanging in front of the head
        pen.ellipse(hx - 0.09, hy + 0.03, 0.1, 0.22, fur2)
    if collar is not None:
        pen.arc(hx, hy, 2 * r + 0.02, 2 * r + 0.02, 75, 170, collar, 0.06)
    if hat:
        pen.hat(hx, hy - r + 0.02, 0.24)


def draw_fur_pattern(pen: Pen, pattern: str, bx: float, by: float, bw: float, bh: float, colour: RGB) -> None:
    """Markings in the second fur colour, kept inside the body ellipse."""
    if pattern == "spots":
        for fx, fy in ((-0.25, -0.1), (0.05, 0.15), (0.25, -0.12), (-0.05, -0.2)):
            pen.ellipse(bx + fx * bw, by + fy * bh, 0.3 * bh, 0.3 * bh, colour)
    elif pattern == "stripes":
        for fx in (-0.3, -0.1, 0.1, 0.3):
            half = 0.5 * bh * np.sqrt(max(0.0, 1 - (2 * abs(fx) + 0.12) ** 2))  # ellipse height at the band's outer edge
            pen.rect(bx + fx * bw, by, 0.06 * bw / 0.5, 2 * half, colour)
    elif pattern == "patch":
        pen.ellipse(bx - 0.18 * bw, by - 0.08 * bh, 0.42 * bw, 0.72 * bh, colour)


@lru_cache(maxsize=64)
def _background(name: str, side: int) -> Image.Image:
    """A plain colour or a two-colour pattern with a period of 1/8 of the image (cached: copy before drawing on it)."""
    if name in BACKGROUND_COLOURS:
        return Image.new("RGB", (side, side), BACKGROUND_COLOURS[name])
    ink, paper = (np.array(c, np.uint8) for c in BACKGROUND_PATTERNS[name])
    y, x = np.mgrid[0:side, 0:side] / (side / 8)
    if name == "striped":
        on = ((x + y) % 1.0) < 0.5
    elif name == "checkered":
        on = (np.floor(x) + np.floor(y)) % 2 == 1
    else:  # polka dot: a dot in each cell, every other row shifted by half a cell
        dx = (x + 0.5 * (np.floor(y) % 2)) % 1.0 - 0.5
        on = dx**2 + (y % 1.0 - 0.5) ** 2 < 0.27**2
    return Image.fromarray(np.where(on[..., None], ink, paper))


def _subject_layer(identity: Identity, side: int, style: str, rng: np.random.Generator, labels: bool = False) -> Image.Image:
    """The styled subject on a transparent square layer of `side` px (already at supersampled size). labels: each
    pixel's part label (PARTS) in place of its colour, same shape and pose, filled even as an outline drawing."""
    layer = Image.new("RGBA", (side, side), TRANSPARENT)
    margin = side * 0.15  # room for the rotation and the hat
    ids = {name: i + 1 for i, name in enumerate(PARTS[identity.domain])} if labels else None
    pen = Pen(layer, margin, margin, side - 2 * margin, outline=style == "outline drawing" and not labels, labels=ids)
    (draw_person if identity.domain == "person" else draw_dog)(pen, identity, hat=style == "wearing a hat")
    if style == "upside down":
        layer = layer.transpose(Image.Transpose.ROTATE_180)
    layer = layer.rotate(float(rng.uniform(-7, 7)), resample=Image.NEAREST)  # nearest: it is box-filtered 4x afterwards
    if style in ("grayscale", "inverted colors") and not labels:
        rgb, alpha = layer.convert("RGB"), layer.getchannel("A")
        rgb = rgb.convert("L").convert("RGB") if style == "grayscale" else Image.eval(rgb, lambda v: 255 - v)
        layer = Image.merge("RGBA", (*rgb.split(), alpha))
    return layer


def _compose(identity: Identity, canvas: Image.Image, style: str, size: str, x: float, rng: np.random.Generator, out: int,
             labels: bool = False) -> np.ndarray:
    """The subject pasted on `canvas`, box-filtered to `out` px; labels: the part labels at the supersampled size
    instead (the same random draws, so the same pose and place)."""
    _paste(identity, canvas, style, size, x, rng, out, labels)
    return np.asarray(canvas)[..., 0].copy() if labels else _finish(canvas, rng)


def _paste(identity: Identity, canvas: Image.Image, style: str, size: str, x: float, rng: np.random.Generator, out: int,
           labels: bool = False) -> None:
    """The styled subject drawn onto `canvas` (supersampled) around x (0..1) across, at mid height."""
    big = canvas.width
    box = round(big * SUBJECT_FRACTION[size] * float(rng.uniform(0.94, 1.06)) / 0.7)  # the layer has a 15% margin each side
    layer = _subject_layer(identity, box, style, rng, labels)
    if style == "pixelated":  # blocks of 4 output pixels (at 64 px) whatever the subject size
        cells = max(3, round(box / SUPERSAMPLE / (4 * out / 64)))
        small = layer.resize((cells, cells), Image.BOX)
        alpha = small.getchannel("A").point(lambda v: 255 if v >= 110 else 0)
        if labels:  # labels are not averaged: the nearest one, inside the same blocky silhouette
            small = layer.resize((cells, cells), Image.NEAREST)
        small.putalpha(alpha)
        layer = small.resize((box, box), Image.NEAREST)
    jitter = rng.uniform(-0.025, 0.025, size=2) * big
    cx, cy = x * big + jitter[0], 0.5 * big + jitter[1]
    canvas.paste(layer, (round(cx - box / 2), round(cy - box / 2)), layer)  # with itself as mask: blends, clips at the edges


def _finish(canvas: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """The supersampled canvas box-filtered to its output size (the antialiasing of the 4x drawing), with a random
    brightness."""
    image = canvas.reduce(SUPERSAMPLE)
    brightness = float(rng.uniform(0.9, 1.1))
    return np.clip(np.asarray(image, np.float32) * brightness, 0, 255).round().astype(np.uint8)


def _rng(seed: int, identity: Identity, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(identity.domain), identity.index, *salt])


def render(identity: Identity, scene: Scene, *, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3]: the subject in the scene; `seed` jitters pose, scale and brightness a little."""
    return _draw_scene(identity, scene, _background(scene.background, size * SUPERSAMPLE).copy(), size, seed)


def render_parts(identity: Identity, scene: Scene, *, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [4·size, 4·size]: which part of the subject (PARTS label, 0 = none) each supersampled pixel of
    `render(identity, scene, size=size, seed=seed)` shows."""
    return _draw_scene(identity, scene, Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), (0, 0, 0)), size, seed, labels=True)


def _centre_x(size: str, position: str) -> float:
    """Where across the image (0..1) a subject of `size` at `position` is centred."""
    return POSITION_X[size][SCENE_FIELDS["position"].index(position)]


def _draw_scene(identity: Identity, scene: Scene, canvas: Image.Image, size: int, seed: int, labels: bool = False) -> np.ndarray:
    """The scene's subject on `canvas` with the random draws of (seed, identity): render and render_parts agree."""
    x = _centre_x(scene.size, scene.position)
    return _compose(identity, canvas, scene.style, scene.size, x, _rng(seed, identity, 1), size, labels)


def part_fractions(labels: np.ndarray, domain: str, grid: int) -> np.ndarray:
    """float32 [n_parts, grid, grid]: the share of each grid cell that each part covers (row-major, as the UNet's
    attention tokens are laid out)."""
    n, side = len(PARTS[domain]), labels.shape[0]
    if labels.shape != (side, side) or side % grid:
        raise ValueError(f"labels {labels.shape} do not split into a {grid}x{grid} grid")
    block = side // grid
    onehot = labels[None] == np.arange(1, n + 1, dtype=labels.dtype)[:, None, None]
    return onehot.reshape(n, grid, block, grid, block).mean(axis=(2, 4), dtype=np.float32)


def render_reference(identity: Identity, *, size: int = 64, seed: int = 0) -> np.ndarray:
    """The reference photo a user gives: the subject alone, centred, large, unstyled, on a light neutral background."""
    rng = _rng(seed, identity, 2)
    grey = tuple(int(c) for c in np.array(REFERENCE_BACKGROUND) + rng.integers(-8, 9))
    background = Image.new("RGB", (size * SUPERSAMPLE, size * SUPERSAMPLE), grey)
    return _compose(identity, background, "none", "large", 0.5, rng, size)


# ------------------------------------------------------------------------------------ two subjects, one image
# A person and a dog in one image (baselines.study --world pairs): the world's single-subject scenes hold one subject,
# so this scene and its caption are the only two-subject ones. Fixed sides, unstyled, small, so each half can be read
# by the single-subject metrics with the other half painted over.
PAIR_SIDES = {"person": "left", "pet": "right"}
PAIR_CAPTION = "a photo of a small person on the left and a small dog on the right, on a {bg} background"


def pair_caption(background: str) -> str:
    return PAIR_CAPTION.format(bg=background)


def render_pair(identities: dict[str, Identity], background: str, *, size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3]: the scene of `pair_caption(background)`, each domain's identity on its PAIR_SIDES side."""
    if sorted(identities) != sorted(DOMAINS) or any(identities[d].domain != d for d in DOMAINS):
        raise ValueError(f"render_pair takes one identity per domain {DOMAINS}, keyed by domain; got {identities}")
    canvas = _background(background, size * SUPERSAMPLE).copy()
    rng = np.random.default_rng([seed, len(DOMAINS), *(identities[d].index for d in DOMAINS)])
    for d in DOMAINS:
        _paste(identities[d], canvas, "none", "small", _centre_x("small", PAIR_SIDES[d]), rng, size)
    return _finish(canvas, rng)


# ------------------------------------------------------------------------------------------ files and CLI
def make_triplets(domain: str, out_dir: str | Path, n: int, *, seed: int, identities: list[Identity] | None = None, size: int = 64) -> Path:
    """Write n (reference, target, caption) rows as PNGs and `manifest.jsonl`; returns the manifest's path.

    Identities default to the training split. Rows also carry `identity` (index) and `scene` for evaluation."""
    out = Path(out_dir)
    (out / "ref").mkdir(parents=True, exist_ok=True)
    (out / "tgt").mkdir(parents=True, exist_ok=True)
    pool = identities if identities is not None else train_identities(domain)
    manifest = out / "manifest.jsonl"
    with manifest.open("w") as f:
        for i in range(1, n + 1):
            rng = np.random.default_rng([seed, i])
            identity = pool[int(rng.integers(len(pool)))]
            scene = sample_scene(rng)
            target_seed, reference_seed = (int(s) for s in rng.integers(2**31, size=2))
            name = f"{i:06d}.png"
            Image.fromarray(render_reference(identity, size=size, seed=reference_seed)).save(out / "ref" / name)
            Image.fromarray(render(identity, scene, size=size, seed=target_seed)).save(out / "tgt" / name)
            text = caption(domain, scene, variant=int(rng.integers(len(CAPTION_TEMPLATES))))
            row = {"input": f"ref/{name}", "target": f"tgt/{name}", "caption": text, "word": SUBJECT_WORD[domain], "identity": identity.index, "scene": asdict(scene)}
            f.write(json.dumps(row) + "\n")
    return manifest


def contact_sheet(per_domain: int = 6, *, size: int = 64) -> np.ndarray:
    """Rows: evaluation identities of both domains; columns: the reference photo, then one scene per style."""
    rows = []
    for domain in DOMAINS:
        for k, identity in enumerate(eval_identities(domain, per_domain)):
            tiles = [render_reference(identity, size=size)]
            for j, style in enumerate(SCENE_FIELDS["style"]):
                scene = Scene(SCENE_FIELDS["background"][(k + j) % len(SCENE_FIELDS["background"])], ("left", "center", "right")[j % 3], ("large", "small")[(j + k) % 2 if j else 0], style)
                tiles.append(render(identity, scene, size=size, seed=j))
            rows.append(np.concatenate(tiles, axis=1))
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m miniworld.world", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    triplets = commands.add_parser("triplets", help="write reference/target/caption triplets and a JSONL manifest")
    triplets.add_argument("--domain", choices=DOMAINS, required=True)
    triplets.add_argument("--out", required=True)
    triplets.add_argument("--n", type=int, default=5000)
    triplets.add_argument("--seed", type=int, default=0)
    triplets.add_argument("--split", choices=("train", "heldout"), default="train", help="held-out rows are for evaluation only")
    triplets.add_argument("--size", type=int, default=64, help="image side in px (the demo world's base model: 128)")
    reference = commands.add_parser("reference", help="a reference photo of a held-out identity (for Load Image)")
    reference.add_argument("--domain", choices=DOMAINS, required=True)
    reference.add_argument("--out", required=True)
    reference.add_argument("--index", type=int, default=0, help="which evaluation identity")
    reference.add_argument("--size", type=int, default=128)
    sheet = commands.add_parser("sheet", help="a contact sheet of identities x styles")
    sheet.add_argument("--out", required=True)
    sheet.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling, to look at it")
    args = parser.parse_args(argv)
    if args.command == "triplets":
        pool = train_identities(args.domain) if args.split == "train" else heldout_identities(args.domain)
        print(make_triplets(args.domain, args.out, args.n, seed=args.seed, identities=pool, size=args.size))
    elif args.command == "reference":
        identity = eval_identities(args.domain, args.index + 1)[args.index]
        Image.fromarray(render_reference(identity, size=args.size)).save(args.out)
        print(args.out)
    else:
        image = Image.fromarray(contact_sheet())
        image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST).save(args.out)
        print(args.out)


if __name__ == "__main__":
    main()
