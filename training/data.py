"""The training data: a JSONL manifest of (input image, target image, caption, bound word) rows.

One row per line, paths relative to the manifest's folder (absolute paths work too):

    {"input": "faces/00001.png", "target": "wild/00001.jpg", "caption": "a photo of a person at the beach", "word": "person"}

- input:   the reference photo the subject is encoded from (faces: the aligned crop)
- target:  the image the model learns to denoise (faces: the in-the-wild photo; pets: the same file as input)
- caption: the prompt; it must contain `word`, the token the subject is bound to
- word:    optional, default "person" (or --word); one CLIP token ("person", "man", "dog", ...)

`python -m training.data validate MANIFEST` reports missing/unreadable files, words that are not
one CLIP token and captions lacking their word (with the tokenizer and the token finder Bind Token
uses). Training runs the same check before loading any model and leaves such rows out.

Randomness (crops, shuffling) is a pure function of (seed, epoch, index), so a resumed run
sees exactly the batches an uninterrupted one would, on any number of processes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_WORD = "person"
IMAGE_ERRORS = (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError)


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line in the manifest
    input: Path
    target: Path
    caption: str
    word: str


@dataclass
class ManifestReport:
    path: Path
    total: int = 0
    rows: list[Row] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)

    @property
    def bad(self) -> int:
        return len(self.problems)

    def skip(self, line: int, reason: str) -> None:
        self.problems.append((line, reason))

    def format(self, limit: int = 20) -> str:
        if self.total == 0:
            return f"{self.path}: no rows (an empty manifest): write one JSON object per line, see training/README.md"
        lines = [f"{self.path}: {self.total} rows, {len(self.rows)} usable, {self.bad} skipped"]
        kinds = Counter(reason.split(":")[0] for _, reason in self.problems)
        lines += [f"  {n} × {kind}" for kind, n in kinds.most_common()]
        lines += [f"  line {line}: {reason}" for line, reason in self.problems[:limit]]
        if self.bad > limit:
            lines.append(f"  … and {self.bad - limit} more")
        return "\n".join(lines)


def _image_problem(path: Path, full: bool) -> str | None:
    if not path.is_file():
        return f"missing file: {path}"
    try:
        with Image.open(path) as im:
            if full:
                im.convert("RGB").load()
            elif im.width < 1 or im.height < 1:
                return f"unreadable image: {path} (empty)"
    except IMAGE_ERRORS as e:
        return f"unreadable image: {path} ({type(e).__name__}: {e})"
    return None


def read_manifest(path: str | Path, *, check_caption: Callable[[str, str], str | None], default_word: str = DEFAULT_WORD,
                  check_images: bool = True, full: bool = False) -> ManifestReport:
    """Every row of the manifest, checked; bad rows are reported and left out, never raised.

    check_caption(caption, word) says why a row cannot be bound (None: it can); training.preflight's
    caption_checker is the real one. check_images opens each image's header (cheap); full=True decodes
    every pixel.
    """
    path = Path(path)
    report = ManifestReport(path)
    root = path.parent
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            report.total += 1
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                report.skip(line_no, f"invalid JSON: {e.msg}")
                continue
            if not isinstance(d, dict):
                report.skip(line_no, "invalid row: not a JSON object")
                continue
            absent = [k for k in ("input", "target", "caption") if not isinstance(d.get(k), str) or not d.get(k)]
            if absent:
                report.skip(line_no, f"missing field: {', '.join(absent)}")
                continue
            word = str(d.get("word") or default_word).strip().lower()
            problem = check_caption(d["caption"], word)
            if problem:
                report.skip(line_no, problem)
                continue
            row = Row(line_no, (root / d["input"]).resolve(), (root / d["target"]).resolve(), d["caption"], word)
            if check_images:
                problem = _image_problem(row.input, full) or (_image_problem(row.target, full) if row.target != row.input else None)
                if problem:
                    report.skip(line_no, problem)
                    continue
            report.rows.append(row)
    return report


# --- images -------------------------------------------------------------------------------------
def stable_seed(*parts) -> int:
    """A seed from ints/strings that is the same in every process (hash() is salted)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def resize_short_side(im: Image.Image, size: int) -> Image.Image:
    scale = size / min(im.size)
    w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    return im.resize((w, h), Image.Resampling.BICUBIC)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL RGB -> [H, W, 3] float in 0..1 (the host's IMAGE layout)."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


class TripletDataset(torch.utils.data.Dataset):
    """Items are (index, epoch) pairs, so every random choice is a function of the seed, epoch and row."""

    def __init__(self, rows: Sequence[Row], *, resolution: int, input_size: int = 224, center_crop: bool = False, seed: int = 0):
        self.rows, self.resolution, self.input_size = list(rows), resolution, input_size
        self.center_crop, self.seed = center_crop, seed
        self.excluded: set[int] = set()  # rows using a file found unreadable: never read again

    def exclude_file(self, path: str) -> int:
        """Leave out every row that uses `path` from now on (workers see it from the next epoch); how many."""
        hits = {i for i, row in enumerate(self.rows) if path in (str(row.input), str(row.target))} - self.excluded
        self.excluded |= hits
        return len(hits)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        index, epoch = item
        if index in self.excluded:
            return {"excluded": index}
        row = self.rows[index]
        try:
            path = row.target
            target = load_rgb(path)
            path = row.input
            reference = target if row.input == row.target else load_rgb(path)
        except IMAGE_ERRORS as e:
            return {"bad": f"line {row.line}: unreadable image {path} ({type(e).__name__}: {e})", "file": str(path)}
        # target: short side to the resolution, then a square crop; SDXL is told both (micro-conditioning)
        original_hw = (target.height, target.width)
        resized = resize_short_side(target, self.resolution)
        free_h, free_w = resized.height - self.resolution, resized.width - self.resolution
        if self.center_crop:
            top, left = free_h // 2, free_w // 2
        else:
            gen = np.random.default_rng(stable_seed(self.seed, epoch, index))
            top, left = int(gen.integers(0, free_h + 1)), int(gen.integers(0, free_w + 1))
        target_px = resized.crop((left, top, left + self.resolution, top + self.resolution))
        # reference: what the CLIP vision preprocessing would see (short side, centre crop)
        ref = resize_short_side(reference, self.input_size)
        rl, rt = (ref.width - self.input_size) // 2, (ref.height - self.input_size) // 2
        ref = ref.crop((rl, rt, rl + self.input_size, rt + self.input_size))
        return {
            "index": index,
            "target": to_tensor(target_px),  # [res, res, 3]
            "input": to_tensor(ref),  # [input_size, input_size, 3]
            "caption": row.caption,
            "word": row.word,
            "original_hw": original_hw,
            "crop_tl": (top, left),
        }


def collate(items: list[dict]) -> dict:
    """Stack the good items; unreadable ones are dropped and reported in "bad" (reason, file), excluded ones dropped."""
    good = [it for it in items if "bad" not in it and "excluded" not in it]
    batch = {"bad": [(it["bad"], it["file"]) for it in items if "bad" in it], "size": len(good)}
    if good:
        batch.update(
            index=torch.tensor([it["index"] for it in good]),
            target=torch.stack([it["target"] for it in good]),
            input=torch.stack([it["input"] for it in good]),
            caption=[it["caption"] for it in good],
            word=[it["word"] for it in good],
            original_hw=[it["original_hw"] for it in good],
            crop_tl=[it["crop_tl"] for it in good],
        )
    return batch


class ShardedBatches(torch.utils.data.Sampler):
    """One epoch's batches of (index, epoch) for one process.

    The epoch's permutation (seeded by seed and epoch) is padded by wrapping around so that
    every process gets the same number of batches, a multiple of `multiple_of` (the gradient
    accumulation steps); process r takes every world-th batch-row. `skip` drops the first
    batches (resume).
    """

    def __init__(self, n: int, *, batch_size: int, world: int, rank: int, seed: int, epoch: int, multiple_of: int = 1, skip: int = 0):
        if n < 1:
            raise ValueError("no usable rows in the manifest")
        self.n, self.batch_size, self.world, self.rank = n, batch_size, world, rank
        self.seed, self.epoch, self.multiple_of, self.skip = seed, epoch, multiple_of, skip

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int, world: int, multiple_of: int = 1) -> int:
        per_rank = math.ceil(n / (batch_size * world))
        return math.ceil(per_rank / multiple_of) * multiple_of

    def __len__(self) -> int:
        return self.batches_per_epoch(self.n, self.batch_size, self.world, self.multiple_of) - self.skip

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        count = self.batches_per_epoch(self.n, self.batch_size, self.world, self.multiple_of)
        gen = torch.Generator().manual_seed(stable_seed("shuffle", self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=gen).tolist()
        need = count * self.batch_size * self.world
        order = (perm * math.ceil(need / self.n))[:need]
        mine = order[self.rank :: self.world]
        for b in range(self.skip, count):
            yield [(i, self.epoch) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]


# --- CLI ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.data", description="Nested-attention training manifests.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="report missing/unreadable files, bad words and captions lacking their word")
    v.add_argument("manifest")
    v.add_argument("--word", default=DEFAULT_WORD, help="the bound word of rows that name none")
    v.add_argument("--full", action="store_true", help="decode every image (slow) instead of reading headers")
    v.add_argument("--limit", type=int, default=50, help="problems listed one by one")
    args = parser.parse_args(argv)
    from .preflight import caption_checker, sdxl_tokenizer  # the host's tokenizer: imported only for this command

    if not Path(args.manifest).is_file():
        parser.error(f"{args.manifest}: no such file")
    check = caption_checker(sdxl_tokenizer())
    word = args.word.strip().lower()
    if problem := check(word, word):
        parser.error(f"--word {word!r}: {problem.removeprefix('bad word: ')}")
    report = read_manifest(args.manifest, default_word=word, full=args.full, check_caption=check)
    print(report.format(limit=args.limit))
    return 1 if report.bad or not report.rows else 0


if __name__ == "__main__":
    sys.exit(main())
