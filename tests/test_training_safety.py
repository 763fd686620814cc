"""A user's runs and files are never overwritten or mixed silently, and every mistake is one message before
any model loads: output-folder reuse, resuming another run, files that break mid-run, bad words, empty
manifests, unwritable folders and exports (tiny models, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import data as data_lib
from training.host import PACK_ROOT, setup_comfyui
from training_helpers import run_training, train_args, write_manifest


@pytest.fixture(scope="module")
def train():
    setup_comfyui(cpu=True)
    from training import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train
    torch.set_num_threads(threads)


@pytest.fixture
def manifest(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return write_manifest(root)


@pytest.fixture
def no_models(train, monkeypatch):
    """Fails the test if a run gets as far as loading a model."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the mistake was reported")
    monkeypatch.setattr(train, "build_models", refuse)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- the output folder ------------------------------------------------------------------------------------
def test_reusing_an_output_dir_is_refused_and_changes_nothing(train, manifest, tmp_path):
    out = tmp_path / "run"
    run_training(train, manifest, out, "--max-train-steps", "2", "--checkpointing-steps", "1")
    before = _snapshot(out)
    with pytest.raises(train.UsageError, match=r"already holds a run \(2 checkpoint\(s\) up to checkpoint-00000002.*--resume latest.*--overwrite"):
        run_training(train, manifest, out, "--max-train-steps", "2")
    assert _snapshot(out) == before  # not a byte touched


def test_overwrite_starts_anew(train, manifest, tmp_path):
    out = tmp_path / "run"
    run_training(train, manifest, out, "--max-train-steps", "3", "--checkpointing-steps", "1")
    again = run_training(train, manifest, out, "--max-train-steps", "2", "--checkpointing-steps", "1", "--overwrite")
    assert again["global_step"] == 2
    assert [p.name for p in train.list_checkpoints(out)] == ["checkpoint-00000001", "checkpoint-00000002"]  # the old 3rd is gone
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_resume_with_another_seed_or_manifest_is_refused(train, manifest, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_training(train, manifest, out, "--max-train-steps", "2", "--checkpointing-steps", "1")
    before = _snapshot(out)
    with pytest.raises(train.UsageError, match=r"belongs to another run:\n  seed: the checkpoint has 7, this command 5"):
        run_training(train, manifest, out, "--max-train-steps", "4", "--resume", "latest", "--seed", "5")
    other = manifest.parent / "other.jsonl"
    other.write_text("\n".join(manifest.read_text().splitlines()[:4]) + "\n")
    with pytest.raises(train.UsageError, match=r"manifest_sha256: the checkpoint has '[0-9a-f]+', this command '[0-9a-f]+'") as e:
        run_training(train, other, out, "--max-train-steps", "4", "--resume", "latest", "--num-queries", "4")
    assert "num_queries: the checkpoint has 8, this command 4" in str(e.value)
    assert _snapshot(out) == before


def test_an_export_path_that_exists_is_never_replaced_silently(train, manifest, tmp_path, no_models):
    export = tmp_path / "mine.safetensors"
    export.write_bytes(b"the user's own file")
    with pytest.raises(train.UsageError, match="--export .*mine.safetensors already exists; choose another file name, or pass --overwrite"):
        run_training(train, manifest, tmp_path / "run", "--max-train-steps", "1", "--export", str(export))
    assert export.read_bytes() == b"the user's own file"


# --- files that break during a run ------------------------------------------------------------------------
def test_files_that_break_mid_run_are_left_out_and_never_step(train, manifest, tmp_path, monkeypatch):
    """Two files corrupted after the up-front check: no step on an empty batch, no 0.0 loss logged,
    2 bad files counted (not one per read), each read once and never again."""
    broken = [manifest.parent / "target1.jpg", manifest.parent / "ref4.png"]
    real_check = train.check_manifest

    def check_then_corrupt(*a, **k):
        report = real_check(*a, **k)
        for path in broken:
            path.write_bytes(b"corrupted during the run")
        return report

    reads: dict[str, int] = {}
    real_load = data_lib.load_rgb

    def counting_load(path):
        reads[str(path)] = reads.get(str(path), 0) + 1
        return real_load(path)

    monkeypatch.setattr(train, "check_manifest", check_then_corrupt)
    monkeypatch.setattr(data_lib, "load_rgb", counting_load)
    out = tmp_path / "run"
    result = run_training(train, manifest, out, "--max-train-steps", "10")  # batch 1: 6 rows, 2 unusable, 2.5 epochs
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 11)) and result["global_step"] == 10
    assert all(m["rows"] == 1 and m["loss"] > 0 for m in logged)  # every step had a row; no fake 0.0 loss
    assert logged[-1]["bad_files"] == 2 and result["bad_files"] == sorted(map(str, broken))
    assert all(reads[str(p)] == 1 for p in broken)  # found bad once, then left out
    state = json.loads((train.list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["bad_files"] == sorted(map(str, broken))  # a resumed run leaves them out too


# --- mistakes reported before any model loads ---------------------------------------------------------------
def test_a_word_of_several_tokens_is_refused_up_front(train, manifest, tmp_path, no_models):
    with pytest.raises(train.UsageError, match=r"--word 'xylophonist': 'xylophonist' is \d CLIP tokens"):
        run_training(train, manifest, tmp_path / "run", "--word", "xylophonist")


def test_an_empty_manifest_is_refused_up_front(train, tmp_path, no_models):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n# nothing yet\n")
    with pytest.raises(train.UsageError, match="no usable rows"):
        run_training(train, empty, tmp_path / "run")


def test_an_unwritable_output_dir_is_refused_up_front(train, manifest, tmp_path, no_models):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(train.UsageError, match=r"--output-dir .*a_file/run is not writable"):
        run_training(train, manifest, blocker / "run")
    with pytest.raises(train.UsageError, match=r"the folder of --export .*a_file is not writable"):
        run_training(train, manifest, tmp_path / "run", "--export", str(blocker / "w.safetensors"))


def test_an_export_that_fails_at_the_end_says_where_the_weights_are(train, manifest, tmp_path, monkeypatch):
    from training import checkpoints

    core = checkpoints.pack_module("nested_core")
    real_save = core.save_weights
    export = tmp_path / "final.safetensors"

    def disk_full_for_the_export(model, path, **k):
        if Path(path) == export:
            raise OSError(28, "No space left on device")
        return real_save(model, path, **k)

    monkeypatch.setattr(core, "save_weights", disk_full_for_the_export)
    out = tmp_path / "run"
    with pytest.raises(train.UsageError, match=r"could not write the export .*final.safetensors.*No space left on device.*"
                                              r"safe in .*checkpoint-00000002/nested_attention.safetensors \(step 2\)"):
        run_training(train, manifest, out, "--max-train-steps", "2", "--export", str(export))
    assert (out / "checkpoints" / "checkpoint-00000002" / "nested_attention.safetensors").is_file()


def test_the_cli_prints_one_message_not_a_traceback(manifest, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACK_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "training.train", *_cli(manifest, tmp_path), "--word", "xylophonist"],
                          cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: --word 'xylophonist': 'xylophonist' is" in proc.stderr


def _cli(manifest: Path, tmp_path: Path) -> list[str]:
    return ["--tiny", "--manifest", str(manifest), "--output-dir", str(tmp_path / "cli"), "--resolution", "64", "--report-to", "none"]


# --- validate ---------------------------------------------------------------------------------------------------
def test_validate_fails_an_empty_manifest_and_words_of_several_tokens(manifest, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert data_lib.main(["validate", str(empty)]) == 1
    assert "no rows (an empty manifest)" in capsys.readouterr().out
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][:2]
    rows[1]["word"] = "xylophonist"
    rows[1]["caption"] = "a xylophonist on stage"
    mixed = manifest.parent / "mixed.jsonl"
    mixed.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert data_lib.main(["validate", str(mixed)]) == 1
    assert "line 2: bad word: 'xylophonist' is" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        data_lib.main(["validate", str(manifest), "--word", "xylophonist"])
    assert e.value.code == 2 and "--word 'xylophonist': 'xylophonist' is" in capsys.readouterr().err


def test_tiny_defaults_suit_the_tiny_models(train, manifest, tmp_path):
    """The smoke test's validation grid: 4 sampling steps × 1 prompt, not the real recipe's 30 × 3; 1 thread."""
    args = train_args(train, manifest, tmp_path / "run")
    assert (args.validation_sampling_steps, len(args.validation_prompts), args.num_threads) == (4, 1, 1)
    real = train.parse_args(["--checkpoint", str(manifest), "--clip-vision", str(manifest), "--manifest", str(manifest)])
    assert (real.validation_sampling_steps, len(real.validation_prompts), real.num_threads) == (30, 3, None)
