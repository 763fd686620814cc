"""Checkpoints and the export: pickle-free training state (tensors in safetensors, the rest as JSON),
written atomically, and the weights file the nodes load.

A checkpoint folder holds training_state.safetensors (trained weights + every optimizer tensor), state.json
(step, data position, schedule, the run's identity; written last: it marks the folder complete),
nested_attention.safetensors (ready to use) and, with EMA, ema.safetensors. No RNG state is stored: every
random draw is a function of (seed, epoch/step, rank, row).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .args import STATE_NAME
from .host import pack_module
from .preflight import CHECKPOINT_PREFIX, WEIGHTS_NAME, UsageError, list_checkpoints


def weights_to_export(nested: nn.Module, ema) -> nn.Module:
    """A detached fp32 copy of the weights to write/validate (EMA weights when EMA is on)."""
    out = copy.deepcopy(nested).float().cpu().eval().requires_grad_(False)
    if ema is not None:
        out.load_state_dict(ema.shadow)
    return out


TRAINING_STATE_NAME = "training_state.safetensors"  # trained weights + optimizer tensors; JSON metadata for the rest


def save_training_state(path: Path, nested: nn.Module, optimizer, scaler) -> None:
    """What resume needs beyond state.json, without pickle: tensors in safetensors, the rest as JSON metadata.

    No RNG state is stored: every random draw is a function of (seed, epoch/step, rank, row)."""
    from safetensors.torch import save_file

    opt = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in nested.state_dict().items()}
    for index, param_state in opt["state"].items():
        for name, value in param_state.items():
            tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    metadata = {"param_groups": json.dumps(opt["param_groups"]), "scaler": json.dumps(scaler.state_dict() if scaler else None)}
    save_file(tensors, str(path), metadata=metadata)


def load_training_state(path: Path, nested: nn.Module, optimizer, scaler) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    nested.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["param_groups"])})
    scaler_state = json.loads(metadata["scaler"])
    if scaler is not None and scaler_state is not None:
        scaler.load_state_dict(scaler_state)


def export_metadata(state: dict) -> dict:
    """What a weights file records of its training: the step and the run's identity (never its paths), so two
    identical runs into different folders write byte-identical files."""
    return {"training_step": state["global_step"], "training_run": state["fingerprint"], "mechanism": state["run"]["mechanism"],
            "training_args": json.dumps(state["run"], sort_keys=True)}


def save_checkpoint(accelerator, args, nested, optimizer, ema, state: dict) -> Path:
    """Written under a .tmp name and renamed when complete: a crash never leaves a half checkpoint as 'latest'."""
    core = pack_module("nested_core")
    root = Path(args.output_dir) / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{state['global_step']:08d}"
    tmp = root / (final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # weights and optimizer are identical on every rank after the all-reduce
        save_training_state(tmp / TRAINING_STATE_NAME, nested, optimizer, accelerator.scaler)
        if ema is not None:
            ema.save(tmp / "ema.safetensors")
        core.save_weights(weights_to_export(nested, ema), tmp / WEIGHTS_NAME, extra_metadata=export_metadata(state))
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if args.checkpoints_total_limit > 0:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_export(path: Path, weights: nn.Module, state: dict, checkpoint: Path | None) -> None:
    """The final weights file; if it cannot be written, say where the same weights already are."""
    from safetensors import SafetensorError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        pack_module("nested_core").save_weights(weights, path, extra_metadata=export_metadata(state))
    except (OSError, SafetensorError) as e:
        safe = f"they are safe in {checkpoint / WEIGHTS_NAME} (step {state['global_step']})" if checkpoint else "no checkpoint was written"
        raise UsageError(f"could not write the export {path} ({e}); the trained weights are not lost: {safe}. "
                         "Copy that file, or free the space / fix the permissions and rerun with --resume latest") from None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines after `step` (written after the checkpoint a resume starts from), so each step appears once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
