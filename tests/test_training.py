"""`python -m training.train` on the tiny models (CPU, 64² crops): it trains, resumes exactly,
stops cleanly on a non-finite loss, runs as two gloo processes, and its export runs in the nodes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.host import PACK_ROOT, pack_module, setup_comfyui
from training_helpers import run_training, write_manifest


@pytest.fixture(scope="module")
def host():
    setup_comfyui(cpu=True)
    from training import train, tiny

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a thread pool only spins, ~10x slower on a shared 2-core machine
    yield train, tiny
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("data"))


def _states(*modules) -> dict:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def test_train_export_and_run_in_the_nodes(host, manifest, tmp_path):
    train, tiny = host
    core = pack_module("nested_core")
    frozen_before = _states(tiny.tiny_sdxl(0).model, tiny.tiny_clip(0).cond_stage_model,
                            tiny.tiny_clip_vision(0).model, tiny.tiny_vae(0).first_stage_model)
    out = tmp_path / "run"
    export = tmp_path / "exported.safetensors"
    result = run_training(train, manifest, out, "--max-train-steps", "2", "--train-batch-size", "2", "--export", str(export),
                  "--report-to", "tensorboard", "--validation-steps", "2", "--validation-prompts", "a portrait of a person",
                  "--validation-lambdas", "1", "2", "--validation-sampling-steps", "1", "--validation-cfg", "1.0",
                  "--validation-images", str(manifest.parent / "ref0.png"))
    assert result["global_step"] == 2 and all(np.isfinite(v) for v in result["losses"].values())
    assert result["bad_rows"] == 3  # reported and skipped, the run went on

    # only the nested weights moved
    frozen_after = _states(tiny.tiny_sdxl(0).model, tiny.tiny_clip(0).cond_stage_model,
                           tiny.tiny_clip_vision(0).model, tiny.tiny_vae(0).first_stage_model)
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    initial = tiny.make_tiny_weights(tiny.tiny_sdxl(0))  # the same architecture, untrained
    weights = core.load_weights(export)
    changed = {k.split(".")[0] for k, v in weights.state_dict().items() if not torch.equal(v, _fresh_init(train, tiny)[k])}
    assert changed == {"qformer", "to_k", "to_v"}
    assert weights.config.layers == initial.config.layers and len(weights.config.layers) == core.SDXL_LAYER_COUNT
    _, metadata = core.read_config(export)
    recorded = json.loads(metadata["training_args"])
    assert recorded["seed"] == 7 and recorded["models"] == "tiny (seed 0)" and metadata["training_step"] == "2"
    assert not any(str(tmp_path) in v for v in metadata.values())  # no per-run path: identical runs export identical files

    # progress artefacts: checkpoint with a ready-to-load weights file, validation grid, tensorboard, metrics
    checkpoint = out / "checkpoints" / "checkpoint-00000002"
    assert (checkpoint / "state.json").is_file() and core.load_weights(checkpoint / train.WEIGHTS_NAME).config == weights.config
    grid = Image.open(out / "validation" / "step_00000002.png")
    assert grid.size == (64 * 3, 64)  # reference + λ ∈ {1, 2}
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    # the export in the nodes: Encode Subject -> Bind Token -> Apply -> sample
    import comfy.sample

    apply_mod, subject_mod, prompt_mod, patch_mod = (pack_module(f"nodes.{m}") for m in ("apply", "subject", "prompt", "patch"))
    clip, model = tiny.tiny_clip(0), tiny.tiny_sdxl(0)
    image = torch.from_numpy(np.asarray(Image.open(manifest.parent / "ref1.png"), dtype=np.float32) / 255)[None]
    subject = subject_mod.encode_subject(weights, tiny.tiny_clip_vision(0), image)
    tokens = clip.tokenize("a person in the snow")
    positive = [[c, {**d, patch_mod.PROMPT_TOKENS: prompt_mod.PromptTokens.from_tokens(tokens, clip.tokenizer)}]
                for c, d in clip.encode_from_tokens_scheduled(tokens)]
    bound = prompt_mod.bind_subject(positive, subject, "person", 0)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)

    def sample(m, cond):
        return comfy.sample.sample(m, noise, 2, 1.0, "euler", "normal", cond, cond, latent, seed=3, disable_pbar=True)

    personalised, plain = sample(apply_mod.apply_nested_attention(model), bound), sample(model, positive)
    assert torch.isfinite(personalised).all() and not torch.allclose(personalised, plain)


def _fresh_init(train, tiny) -> dict:
    """The run's initial weights, rebuilt the way build_models makes them (seed 7)."""
    core = pack_module("nested_core")
    unet = tiny.tiny_sdxl(0).model.diffusion_model
    config = core.default_config(unet, vision_encoder="tiny-test-ViT", vision_dim=tiny.VISION_DIM, vision_tokens=tiny.VISION_TOKENS,
                                 num_queries=8, qformer_dim=32, qformer_depth=1, qformer_heads=4, domain="faces")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = core.NestedAttentionModel(config)
    model.init_projections_from(unet)
    return model.state_dict()


def test_resume_after_a_crash_matches_an_uninterrupted_run(host, manifest, tmp_path, monkeypatch):
    """Bitwise: losses, weights and the export file's bytes; metrics.jsonl has each step once."""
    train, _ = host
    common = ("--max-train-steps", "4", "--checkpointing-steps", "2", "--gradient-accumulation-steps", "2",
              "--ema-decay", "0.9", "--lr-scheduler", "cosine")  # 6 rows, accumulation 2: step 4 is in epoch 2
    straight = run_training(train, manifest, tmp_path / "straight", *common)

    calls = {"n": 0}
    real_step = train.training_step

    def killed_in_step_4(*a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # first micro-batch of step 4: step 3 is logged, its checkpoint (4) never written
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(train, "training_step", killed_in_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_training(train, manifest, crashed, *common)
    monkeypatch.setattr(train, "training_step", real_step)
    assert [p.name for p in train.list_checkpoints(crashed)] == ["checkpoint-00000002"]
    assert [json.loads(line)["step"] for line in (crashed / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    resumed = run_training(train, manifest, crashed, *common, "--resume", "latest")
    assert resumed["losses"] == {3: straight["losses"][3], 4: straight["losses"][4]}  # exactly, not approximately
    logged = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]  # step 3 done again, logged once
    assert [m["loss"] for m in logged] == [straight["losses"][s] for s in (1, 2, 3, 4)]
    a, b = (pack_module("nested_core").load_weights(r["export"]).state_dict() for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)  # model, optimizer, schedule and EMA all continued exactly
    assert straight["export"].read_bytes() == resumed["export"].read_bytes()  # no run path in the metadata


def test_identical_runs_are_bitwise_identical_whatever_the_loader_workers(host, manifest, tmp_path):
    """Data loading is a pure function of (seed, epoch, row): worker processes change nothing, not even the last bit."""
    train, _ = host
    runs = [run_training(train, manifest, tmp_path / f"w{workers}", "--max-train-steps", "3", "--dataloader-num-workers", str(workers))
            for workers in (0, 2)]
    assert runs[0]["losses"] == runs[1]["losses"]
    assert runs[0]["export"].read_bytes() == runs[1]["export"].read_bytes()


def test_gradient_checkpointing_changes_nothing(host, manifest, tmp_path):
    """Recomputed blocks must see the layer keys of the first pass (the patch is looked up by them)."""
    train, _ = host
    runs = [run_training(train, manifest, tmp_path / str(flag), "--max-train-steps", "2", *flag)
            for flag in ((), ("--gradient-checkpointing",))]
    assert runs[0]["losses"] == runs[1]["losses"]
    a, b = (pack_module("nested_core").load_weights(r["export"]).state_dict() for r in runs)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(host, manifest, tmp_path, monkeypatch):
    train, _ = host
    real_step = train.training_step
    calls = {"n": 0}

    def diverges_at_step_2(*a, **k):
        calls["n"] += 1
        loss = real_step(*a, **k)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(train, "training_step", diverges_at_step_2)
    out = tmp_path / "nan"
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite at step 2.*checkpoint-00000001"):
        run_training(train, manifest, out, "--max-train-steps", "3", "--checkpointing-steps", "1")
    assert [p.name for p in train.list_checkpoints(out)] == ["checkpoint-00000001"]
    assert not list((out / "checkpoints").glob("*.tmp")) and not (out / train.WEIGHTS_NAME).exists()
    weights = pack_module("nested_core").load_weights(out / "checkpoints" / "checkpoint-00000001" / train.WEIGHTS_NAME)
    assert all(torch.isfinite(v).all() for v in weights.state_dict().values())


def test_two_gloo_processes_write_a_valid_checkpoint(host, manifest, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.x: `launch --cpu --num_processes 2` starts ONE process (its simple launcher); torchrun via
    # --multi_gpu plus ACCELERATE_USE_CPU=1 gives two gloo processes (DistributedType.MULTI_CPU)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PACK_ROOT), "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train",
           *[a for a in _argv(manifest, out)], "--max-train-steps", "2"]
    proc = subprocess.run(cmd, cwd=PACK_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    checkpoint = out / "checkpoints" / "checkpoint-00000002"
    assert {p.name for p in checkpoint.iterdir()} == {"training_state.safetensors", "state.json", "nested_attention.safetensors"}
    assert not [p for p in out.rglob("*") if p.suffix in {".pkl", ".bin", ".pt"}]  # nothing a resume would have to unpickle
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["world_size"] == 2 and state["epoch"] == 0 and state["batches_done_in_epoch"] == 2  # 6 rows / (2 × 1): 3 steps an epoch
    weights = pack_module("nested_core").load_weights(out / "nested_attention.safetensors")
    assert len(weights.config.layers) == 70


def _argv(manifest: Path, out: Path) -> list[str]:
    return ["--tiny", "--manifest", str(manifest), "--output-dir", str(out), "--resolution", "64", "--dataloader-num-workers", "0",
            "--report-to", "none", "--validation-steps", "0", "--lr-warmup-steps", "0"]


def test_a_baseline_mechanism_trains_through_the_same_loop_and_the_nodes_refuse_its_weights(host, manifest, tmp_path, monkeypatch):
    """--mechanism picks the patch inside the one loop (the paper's comparison); its file says so, and Load Nested
    Attention will not run a baseline's weights as nested attention."""
    train, _ = host
    import folder_paths

    result = run_training(train, manifest, tmp_path / "gv", "--max-train-steps", "1", "--mechanism", "global_v")
    _, metadata = pack_module("nested_core").read_config(result["export"])
    assert metadata["mechanism"] == "global_v" and json.loads(metadata["training_args"])["mechanism"] == "global_v"
    loader = pack_module("nodes.loader")
    monkeypatch.setattr(folder_paths, "get_full_path_or_raise", lambda folder, name: str(result["export"]))
    with pytest.raises(ValueError, match="trained for the 'global_v' baseline .* not for nested attention"):
        loader.LoadNestedAttention.execute("gv.safetensors")
