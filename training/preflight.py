"""Everything a training run checks before it loads a model: the words and the manifest (with the
real tokenizer and the one token finder), the output folder (never reused, mixed or overwritten
silently), where the export goes, and, on resume, that the run being continued is this run.

A user's mistake raises UsageError, which `python -m training.train` prints as one message.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from . import data as data_lib
from .args import STATE_NAME
from .host import pack_module, setup_comfyui

CHECKPOINT_PREFIX = "checkpoint-"
WEIGHTS_NAME = "nested_attention.safetensors"  # ready-to-use weights file inside each checkpoint and the default export
RUN_FILES = ("checkpoints", "metrics.jsonl", "logs", "validation", "args.json", WEIGHTS_NAME)  # what a run writes in its folder

# What must be equal to continue a run: they define the model, the data stream and its randomness.
MUST_MATCH = ("seed", "manifest_sha256", "models", "world_size", "mechanism", "init_weights", "num_queries", "qformer_dim", "qformer_depth", "qformer_heads",
              "alpha", "word", "domain", "resolution", "center_crop", "caption_dropout", "image_dropout", "train_batch_size",
              "gradient_accumulation_steps")
# What may change on resume (a new learning rate, more threads), reported because the run is then no longer exact.
MAY_CHANGE = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
              "max_grad_norm", "ema_decay", "mixed_precision", "num_threads")


class UsageError(ValueError):
    """A mistake in the command or its files: printed as one message that names the fix, no traceback."""


# --- words and manifest ---------------------------------------------------------------------------------
def sdxl_tokenizer():
    """SDXL's tokenizer (no weights): what every SDXL checkpoint, the world and the tiny models tokenise with."""
    setup_comfyui()
    import comfy.sdxl_clip

    return comfy.sdxl_clip.SDXLTokenizer()


def caption_checker(tokenizer):
    """check(caption, word) -> None, or why the row cannot be bound, with the token finder Bind Token uses."""
    prompt_mod = pack_module("nodes.prompt")
    cache: dict[str, str | None] = {}

    def check(caption: str, word: str) -> str | None:
        if word not in cache:
            try:
                prompt_mod.PromptTokens.from_tokens(tokenizer.tokenize_with_weights(word), tokenizer).positions(word)
                cache[word] = None
            except ValueError as e:
                cache[word] = f"bad word: {e}"
        if cache[word]:
            return cache[word]
        try:
            prompt_mod.PromptTokens.from_tokens(tokenizer.tokenize_with_weights(caption), tokenizer).positions(word)
        except ValueError as e:
            return f"caption lacks its word: {e} (caption {caption!r})"
        return None

    return check


def check_manifest(args: argparse.Namespace, log=print) -> data_lib.ManifestReport:
    """The manifest's usable rows, every bad one reported; the bound word checked first."""
    check = caption_checker(sdxl_tokenizer())
    problem = check(args.word, args.word)
    if problem:
        raise UsageError(f"--word {args.word!r}: {problem.removeprefix('bad word: ')}")
    if args.world and args.validation_steps > 0 and not args.validation_prompts:
        from miniworld.world import SUBJECT_WORD

        if args.word not in SUBJECT_WORD.values():
            raise UsageError(f"--word {args.word!r} is not a subject word of the demo world ({sorted(SUBJECT_WORD.values())}); "
                             "use one of them, or give --validation-prompts")
    report = data_lib.read_manifest(args.manifest, default_word=args.word, check_images=not args.skip_image_check, check_caption=check)
    log(report.format())
    if not report.rows:
        raise UsageError(f"{args.manifest}: no usable rows (see the report above); `python -m training.data validate {args.manifest}` checks a manifest")
    return report


# --- the run's identity -----------------------------------------------------------------------------------
def file_sha256(path: str | os.PathLike) -> str:
    """The one file hash of the pack (Load Nested Attention's, which subject files record)."""
    return pack_module("nodes.loader").file_sha256(path)


def models_identity(args: argparse.Namespace) -> str:
    if args.tiny:
        return f"tiny (seed {args.tiny_seed})"
    if args.world:
        from miniworld.models import BASE_FILE, VISION_FILES, WEIGHTS_DIR

        folder = Path(getattr(args, "world_dir", None) or WEIGHTS_DIR)  # the hashes tell a harder world from the shipped one
        files = (folder / BASE_FILE, folder / VISION_FILES[args.world_vision])
        return "miniworld " + " ".join(f"{p.name}:{file_sha256(p)[:16]}" for p in files)
    # a real checkpoint is gigabytes: its name and size identify it well enough to catch a wrong file
    return " ".join(f"{Path(p).name}:{Path(p).stat().st_size}" for p in (args.checkpoint, args.clip_vision))


def run_identity(args: argparse.Namespace) -> dict:
    """What defines this run (no paths of the run itself): compared on resume, and its hash marks the export."""
    identity = {name: getattr(args, name) for name in MUST_MATCH + MAY_CHANGE if hasattr(args, name)}
    identity["manifest_sha256"] = file_sha256(args.manifest)
    identity["models"] = models_identity(args)
    identity["init_weights"] = file_sha256(args.init_weights) if args.init_weights else None
    return identity


def run_fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps({k: identity[k] for k in MUST_MATCH}, sort_keys=True).encode()).hexdigest()[:16]


# --- the output folder --------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (state.json written), oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and (p / STATE_NAME).is_file() and not p.name.endswith(".tmp")]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def previous_run(output_dir: Path) -> list[str]:
    """What an earlier run left in output_dir (empty: the folder is free)."""
    found = []
    checkpoints = list_checkpoints(output_dir)
    if checkpoints:
        found.append(f"{len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}")
    found += [name for name in RUN_FILES[1:] if (output_dir / name).exists()]
    return found


def _probe_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what} {folder} is not writable ({e.strerror or e}); choose a folder you can write to") from None


def export_path(args: argparse.Namespace) -> Path:
    return Path(args.export) if args.export else Path(args.output_dir) / WEIGHTS_NAME


def resume_checkpoint(args: argparse.Namespace) -> Path | None:
    if args.resume == "latest":
        found = list_checkpoints(args.output_dir)
        return found[-1] if found else None
    return Path(args.resume) if args.resume else None


def compare_for_resume(saved: dict, identity: dict, checkpoint: Path) -> list[str]:
    """Refuses to continue another run (each mismatch named); returns the allowed changes, to report."""
    mismatches = [f"{k}: the checkpoint has {saved.get(k)!r}, this command {identity.get(k)!r}"
                  for k in MUST_MATCH if saved.get(k) != identity.get(k)]
    if mismatches:
        raise UsageError(
            f"--resume {checkpoint} belongs to another run:\n  " + "\n  ".join(mismatches)
            + "\nrepeat the original run's arguments to continue it, or train into a new --output-dir"
        )
    return [f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in MAY_CHANGE if k in saved and saved.get(k) != identity.get(k)]


def prepare_output(args: argparse.Namespace, identity: dict, *, main_process: bool = True, log=print) -> Path | None:
    """Check (and with --overwrite, clear) the output folder and the export path; the checkpoint to resume from."""
    out = Path(args.output_dir)
    _probe_writable(out, "--output-dir")
    export = export_path(args)
    _probe_writable(export.parent, "the folder of --export")
    earlier = previous_run(out)
    checkpoint = resume_checkpoint(args)
    if earlier and not args.resume and not args.overwrite:
        raise UsageError(
            f"--output-dir {out} already holds a run ({', '.join(earlier)}). Continue it with --resume latest, "
            "train into a new --output-dir, or pass --overwrite to delete that run first"
        )
    if args.overwrite and earlier and main_process:
        for name in RUN_FILES:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        log(f"--overwrite: deleted the earlier run in {out} ({', '.join(earlier)})")
    if checkpoint is not None:
        saved = json.loads((checkpoint / STATE_NAME).read_text()).get("run")
        if saved is None:
            raise UsageError(f"--resume {checkpoint}: the checkpoint records no run identity (written by an older version); start a new run")
        for change in compare_for_resume(saved, identity, checkpoint):
            log(f"resuming with a changed setting ({change}): the continued run is no longer bit-identical to an uninterrupted one")
    if export.exists() and not args.overwrite and export.parent.resolve() != out.resolve():
        if checkpoint is None or export_run(export) != run_fingerprint(identity):  # only this run's own export is replaced
            raise UsageError(f"--export {export} already exists; choose another file name, or pass --overwrite to replace it at the end")
    return checkpoint


def export_run(path: Path) -> str | None:
    """The run fingerprint an exported weights file records (None for any other file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("training_run")
    except (SafetensorError, OSError):
        return None
