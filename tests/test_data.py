"""The training manifest: validation report (the host's tokenizer, no model), bad rows skipped, deterministic sharded batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import data
from training.preflight import caption_checker, sdxl_tokenizer

CHECK = caption_checker(sdxl_tokenizer())


def _image(path: Path, w: int, h: int, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    for i in range(3):
        _image(tmp_path / f"in{i}.png", 40, 48, i)
        _image(tmp_path / f"t{i}.png", 96, 64, 10 + i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows = [
        {"input": "in0.png", "target": "t0.png", "caption": "a photo of a person", "word": "person"},
        {"input": "in1.png", "target": "t1.png", "caption": "A PERSON on a bike"},  # default word, any case
        {"input": "in2.png", "target": "in2.png", "caption": "a dog on the grass", "word": "dog"},  # pets: input = target
        {"input": "nope.png", "target": "t0.png", "caption": "a person"},  # missing file
        {"input": "broken.png", "target": "t0.png", "caption": "a person"},  # unreadable
        {"input": "in0.png", "target": "t0.png", "caption": "two persons"},  # lacks the word ("persons" ≠ "person")
        {"input": "in0.png", "caption": "a person"},  # no target
        {"input": "in0.png", "target": "t0.png", "caption": "a person", "word": "two words"},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n# a comment\n{not json\n")
    return path


def test_report_counts_and_reasons(manifest: Path):
    report = data.read_manifest(manifest, check_caption=CHECK)
    assert report.total == 9 and len(report.rows) == 3 and report.bad == 6
    reasons = dict(report.problems)
    assert reasons[4].startswith("missing file") and reasons[5].startswith("unreadable image")
    assert reasons[6].startswith("caption lacks its word") and reasons[7].startswith("missing field: target")
    assert reasons[8].startswith("bad word") and reasons[11].startswith("invalid JSON")
    assert [r.word for r in report.rows] == ["person", "person", "dog"]
    assert report.rows[0].input == (manifest.parent / "in0.png").resolve()  # relative to the manifest
    text = report.format()
    assert "9 rows, 3 usable, 6 skipped" in text and "line 4: missing file" in text


def test_cli_exit_code(manifest: Path, capsys):
    assert data.main(["validate", str(manifest)]) == 1
    assert "6 skipped" in capsys.readouterr().out
    good = manifest.parent / "good.jsonl"
    good.write_text(manifest.read_text().splitlines()[0] + "\n")
    assert data.main(["validate", str(good)]) == 0


def test_dataset_crops_and_conditioning(manifest: Path):
    rows = data.read_manifest(manifest, check_caption=CHECK).rows
    ds = data.TripletDataset(rows, resolution=32, input_size=24, seed=3)
    item = ds[(0, 0)]
    assert item["target"].shape == (32, 32, 3) and item["input"].shape == (24, 24, 3)
    assert 0.0 <= float(item["target"].min()) and float(item["target"].max()) <= 1.0
    assert item["original_hw"] == (64, 96)
    top, left = item["crop_tl"]
    assert top == 0 and 0 <= left <= 48 - 32  # short side 64 -> 32: the 96 side becomes 48
    assert ds[(0, 0)]["crop_tl"] == item["crop_tl"]  # a pure function of (seed, epoch, index)
    assert len({ds[(0, e)]["crop_tl"] for e in range(8)}) > 1
    assert data.TripletDataset(rows, resolution=32, center_crop=True)[(0, 0)]["crop_tl"] == (0, 8)


def test_unreadable_at_runtime_is_dropped_not_raised(manifest: Path):
    rows = data.read_manifest(manifest, check_caption=CHECK).rows
    rows[1].target.write_bytes(b"corrupted after validation")
    ds = data.TripletDataset(rows, resolution=32, input_size=24)
    batch = data.collate([ds[(0, 0)], ds[(1, 0)], ds[(2, 0)]])
    assert batch["size"] == 2 and len(batch["bad"]) == 1 and "line 2" in batch["bad"][0][0]
    assert batch["bad"][0][1] == str(rows[1].target)  # the file, so training can leave it out
    assert batch["target"].shape == (2, 32, 32, 3) and batch["caption"][1] == "a dog on the grass"
    empty = data.collate([ds[(1, 0)]])
    assert empty["size"] == 0 and "target" not in empty


@pytest.mark.parametrize("n,batch,world,accum", [(7, 2, 1, 1), (7, 2, 2, 1), (10, 1, 2, 3), (3, 4, 2, 1)])
def test_sharded_batches(n, batch, world, accum):
    count = data.ShardedBatches.batches_per_epoch(n, batch, world, accum)
    assert count % accum == 0
    epochs = {}
    for epoch in (0, 1):
        shards = [list(data.ShardedBatches(n, batch_size=batch, world=world, rank=r, seed=5, epoch=epoch, multiple_of=accum))
                  for r in range(world)]
        assert all(len(s) == count for s in shards)  # every process the same number of steps: no DDP hang
        seen = [i for s in shards for b in s for i, e in b]
        assert all(len(b) == batch for s in shards for b in s) and set(seen) == set(range(n))  # every row, padded by wrapping
        assert all(e == epoch for s in shards for b in s for _, e in b)
        epochs[epoch] = shards
        for r in range(world):  # resume: skipping k batches yields exactly the tail
            tail = list(data.ShardedBatches(n, batch_size=batch, world=world, rank=r, seed=5, epoch=epoch, multiple_of=accum, skip=1))
            assert tail == shards[r][1:]
    if n > 3:
        assert epochs[0] != epochs[1]  # reshuffled per epoch
