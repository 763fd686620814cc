"""Train nested-attention weights (Q-Former + per-layer W_K̆, W_V̆) on a frozen SDXL.

    python -m training.train --tiny --manifest data/train.jsonl --resolution 64 --max-train-steps 10   # smoke test
    python -m training.train --world --manifest world/person.jsonl --word person ...                  # the demo world
    accelerate launch -m training.train --checkpoint sd_xl_base_1.0.safetensors \\
        --clip-vision CLIP-ViT-H-14.safetensors --manifest faces.jsonl --resolution 512 ...            # phase 1
    accelerate launch -m training.train ... --resolution 1024 --init-weights phase1.safetensors         # phase 2

The UNet is run exactly as at inference: the pack's own NestedAttentionPatch on every attn2
layer, subjects bound to the caption's word with the nodes' bind_subject, through the host's
BaseModel.apply_model. Only the weights file's tensors are trained; everything else is frozen.
Files: args.py (arguments), preflight.py (checks before any model loads), models.py, step.py
(one step), checkpoints.py, validation.py; this file is the loop. See training/README.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from . import data as data_lib
from .args import parse_args
from .checkpoints import (
    TRAINING_STATE_NAME, load_training_state, save_checkpoint, truncate_metrics, weights_to_export, write_export,
)
from .host import setup_comfyui
from .models import NestedTrainer, build_models
from .preflight import (
    STATE_NAME, WEIGHTS_NAME, UsageError, check_manifest, export_path, list_checkpoints, prepare_output, run_fingerprint,
    run_identity,
)
from .step import make_loader, step_generator, training_step
from .validation import run_validation, validation_images

__all__ = ["parse_args", "main", "list_checkpoints", "training_step", "WEIGHTS_NAME", "NonFiniteLossError", "UsageError"]

logger = logging.getLogger("training.train")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, the last checkpoint is left as it was."""


# --- EMA, schedule --------------------------------------------------------------------------------
class EMA:
    """fp32 shadow copy of the trained weights; saved as safetensors, never pickled."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - d)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in self.shadow.items()}, str(path))

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        for k, v in load_file(str(path)).items():
            self.shadow[k].copy_(v)


def lr_lambda(args, total_steps: int):
    def fn(step: int) -> float:
        if step < args.lr_warmup_steps:
            return (step + 1) / (args.lr_warmup_steps + 1)
        if args.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - args.lr_warmup_steps) / max(1, total_steps - args.lr_warmup_steps))
        return 1.0 - progress if args.lr_scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return fn


# --- main -----------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration
    from tqdm.auto import tqdm

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    log = logger.info if accelerator.is_main_process else (lambda *a, **k: None)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if args.num_threads:  # results are bit-reproducible for a given thread count (float summation order)
        torch.set_num_threads(args.num_threads)
    num_workers = args.dataloader_num_workers if args.dataloader_num_workers is not None else (0 if device.type == "cpu" else 2)
    setup_comfyui(args.comfyui_path, cpu=device.type == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # every check a user's mistake can fail, before any model is loaded
    report = check_manifest(args, log=log)
    identity = {**run_identity(args), "world_size": world}
    fingerprint = run_fingerprint(identity)
    resume_from = prepare_output(args, identity, main_process=accelerator.is_main_process, log=log)
    accelerator.wait_for_everyone()

    frozen, nested = build_models(args, device, weight_dtype)
    dataset = data_lib.TripletDataset(report.rows, resolution=args.resolution, input_size=frozen.clip_vision.image_size,
                                      center_crop=args.center_crop, seed=args.seed)
    model = NestedTrainer(nested, frozen, args.mechanism)
    optimizer = torch.optim.AdamW(nested.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    batches_per_epoch = data_lib.ShardedBatches.batches_per_epoch(len(dataset), args.train_batch_size, world, args.gradient_accumulation_steps)
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args, max_steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMA(nested, args.ema_decay) if args.ema_decay > 0 else None

    # resume: weights and optimizer from training_state.safetensors; step, data position, schedule from state.json
    global_step, epoch, batches_done, bad_files = 0, 0, 0, set()
    if resume_from is not None:
        state = json.loads((resume_from / STATE_NAME).read_text())
        load_training_state(resume_from / TRAINING_STATE_NAME, nested, optimizer, accelerator.scaler)
        lr_scheduler.load_state_dict(state["scheduler"])
        if ema is not None and (resume_from / "ema.safetensors").is_file():
            ema.load(resume_from / "ema.safetensors")
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_done_in_epoch"]
        bad_files = set(state["bad_files"])
        for path in bad_files:
            dataset.exclude_file(path)
        log("resumed from %s at step %d", resume_from, global_step)
    elif args.resume == "latest":
        log("--resume latest: no checkpoint in %s yet, starting from scratch", output_dir / "checkpoints")

    metrics_path = output_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        truncate_metrics(metrics_path, global_step)  # steps logged after that checkpoint are done again
        accelerator.init_trackers("nested_attention", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=1))
    val_images = validation_images(args, dataset) if accelerator.is_main_process and args.validation_steps > 0 else []
    log("%d rows, %d processes × batch %d × accumulation %d: %d steps/epoch, %d steps in all; %d torch threads, %d loader workers",
        len(dataset), world, args.train_batch_size, args.gradient_accumulation_steps, steps_per_epoch, max_steps,
        torch.get_num_threads(), num_workers)

    def state_dict() -> dict:
        return {"global_step": global_step, "epoch": epoch, "batches_done_in_epoch": batches_done, "scheduler": lr_scheduler.state_dict(),
                "world_size": world, "batch_size": args.train_batch_size, "accumulation": args.gradient_accumulation_steps,
                "bad_files": sorted(bad_files), "run": identity, "fingerprint": fingerprint, "args": vars(args)}

    losses: dict[int, float] = {}
    last_checkpoint = list_checkpoints(output_dir)[-1] if list_checkpoints(output_dir) else None
    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_main_process, dynamic_ncols=True)
    inner = accelerator.unwrap_model(model)
    start_time, start_step = time.time(), global_step
    micro, loss_sum, rows = 0, torch.zeros(()), 0  # over the current accumulation window, this process
    try:
        while global_step < max_steps:
            for batch in make_loader(args, dataset, world=world, rank=rank, epoch=epoch, skip=batches_done, num_workers=num_workers):
                batches_done += 1
                for reason, path in batch["bad"]:
                    if path not in bad_files:  # a file found bad is reported once and left out from then on
                        bad_files.add(path)
                        logger.warning("%s: left out from now on (%d row(s) use it)", reason, dataset.exclude_file(path))
                with accelerator.accumulate(model):
                    with inner.patch.run():  # one projection scope per step: recomputed with gradients each time
                        loss = training_step(args, model, frozen, batch, step_generator(args, rank, global_step, micro), device)
                        finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item()
                        if finite < 1:
                            raise NonFiniteLossError(
                                f"the loss became non-finite at step {global_step + 1} (micro-batch {micro}); stopping. "
                                f"The last good checkpoint is {last_checkpoint or 'none (no checkpoint was written yet)'} and is untouched. "
                                "Try a lower --learning-rate, --mixed-precision bf16 instead of fp16, or --max-grad-norm 1."
                            )
                        accelerator.backward(loss)  # every process, even with no row: DDP all-reduces every backward
                    loss_sum = loss_sum + loss.detach().float().cpu() * batch["size"]
                    rows += batch["size"]
                    micro += 1
                    if not accelerator.sync_gradients:
                        continue
                    window_loss, window_rows = accelerator.gather(torch.stack([loss_sum, torch.tensor(float(rows))]).to(device)).reshape(-1, 2).sum(0).tolist()
                    if window_rows > 0:
                        if args.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(nested.parameters(), args.max_grad_norm)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro, loss_sum, rows = 0, torch.zeros(()), 0
                if window_rows == 0:  # no readable image in the whole window: no step, nothing logged
                    logger.warning("a batch with no readable image on any process: skipped, no optimizer step")
                    continue
                lr_scheduler.step()
                step_loss = window_loss / window_rows
                lr = lr_scheduler.get_last_lr()[0]
                global_step += 1
                losses[global_step] = step_loss
                if ema is not None:
                    ema.update(nested, global_step)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if accelerator.is_main_process:
                    samples_per_s = (global_step - start_step) * args.train_batch_size * args.gradient_accumulation_steps * world / (time.time() - start_time)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": global_step, "loss": step_loss, "lr": lr, "rows": int(window_rows),
                                            "bad_files": len(bad_files)}) + "\n")
                    if global_step % args.log_every == 0 or global_step == max_steps:
                        accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/samples_per_s": samples_per_s,
                                         "data/bad_files": len(bad_files), "train/epoch": epoch}, step=global_step)
                if global_step % args.checkpointing_steps == 0 or global_step == max_steps:
                    last_checkpoint = save_checkpoint(accelerator, args, nested, optimizer, ema, state_dict())
                if args.validation_steps > 0 and (global_step % args.validation_steps == 0 or global_step == max_steps):
                    if accelerator.is_main_process and val_images:
                        path = run_validation(args, accelerator, frozen, nested, ema, val_images, global_step)
                        log("validation grid: %s", path)
                    accelerator.wait_for_everyone()
                if global_step >= max_steps:
                    break
            else:  # the epoch's batches are all done
                epoch, batches_done = epoch + 1, 0

        export = export_path(args)
        if accelerator.is_main_process:
            write_export(export, weights_to_export(nested, ema), state_dict(), last_checkpoint)
            log("exported %s (step %d)", export, global_step)
        accelerator.wait_for_everyone()
    finally:  # also on a non-finite loss or a crash: close the bar and flush tensorboard
        progress.close()
        accelerator.end_training()
    return {"losses": losses, "global_step": global_step, "export": export, "bad_rows": report.bad, "bad_files": sorted(bad_files),
            "checkpoint": last_checkpoint}


if __name__ == "__main__":
    try:
        main(parse_args())
    except (UsageError, NonFiniteLossError) as e:  # the user's to fix: one message, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
