"""Run a ComfyUI workflow file headless, with this pack's nodes loaded the way ComfyUI loads them.

    python -m workflows.run workflows/nested_attention_single_subject.json --tiny --output out/

The file is what the ComfyUI frontend saves (UI format); the backend only runs
API format, so it is converted here (`ui_to_api`) using the registered node
classes' input definitions, validated with the host's `validate_prompt` and run
by its `PromptExecutor`. `--tiny` swaps the checkpoint, CLIP vision,
nested-attention and LoRA files for tiny random built-in models (training/tiny.py)
and the reference photos for generated ones: it runs anywhere in seconds, but the
image is noise, not a result.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from training.host import host_nodes, load_pack

log = logging.getLogger(__name__)

# frontend-only nodes: they never reach the backend
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}  # INT widgets the frontend gives a control_after_generate value
MODE_MUTED, MODE_BYPASSED = 2, 4

TINY_SWAPS = {"CheckpointLoaderSimple": "TinySDXLCheckpointLoader", "CLIPVisionLoader": "TinyCLIPVisionLoader"}
TINY_MAX_SIDE = 128  # pixels: a 16x16 latent keeps the tiny UNet at well under a second per step
TINY_MAX_STEPS = 4
TINY_LORA_LOADERS = ("LoraLoader", "LoraLoaderModelOnly")  # their file becomes a tiny LoRA for the tiny UNet


class WorkflowError(RuntimeError):
    """A workflow that did not convert, validate or run; the message names the node and says why."""

    def __init__(self, message: str, status_messages: list | None = None, node_errors: dict | None = None):
        super().__init__(message)
        self.status_messages = status_messages or []
        self.node_errors = node_errors or {}


@dataclass
class RunResult:
    outputs: dict  # node id -> its UI output (e.g. {"images": [{"filename", "subfolder", "type"}]})
    images: list[str]  # paths of the images the output nodes saved
    status_messages: list = field(default_factory=list)


# --- the host and the pack ---------------------------------------------------------------------------
_NODES_LOADED = False


def load_nodes() -> dict:
    """Set the host up and register its built-in nodes plus this pack's, as ComfyUI does at start. Idempotent."""
    global _NODES_LOADED
    nodes = host_nodes()
    if not _NODES_LOADED:
        asyncio.run(_register_nodes())
        _NODES_LOADED = True
    return nodes.NODE_CLASS_MAPPINGS


async def _register_nodes() -> None:
    import folder_paths

    nodes = host_nodes()

    # built-in extras whose optional deps (torchaudio, kornia, ...) are missing log long tracebacks: one line instead
    logging.disable(logging.WARNING)
    try:
        failed = await nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
    finally:
        logging.disable(logging.NOTSET)
    if failed:
        log.info("built-in node modules skipped (missing optional dependencies): %s", ", ".join(map(os.path.basename, failed)))
    # what nodes.load_custom_node does with a pack that exports comfy_entrypoint
    extension = await load_pack().comfy_entrypoint()
    for node_cls in await extension.get_node_list():
        schema = node_cls.GET_SCHEMA()
        nodes.NODE_CLASS_MAPPINGS[schema.node_id] = node_cls
        nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name
    if "nested_attention" not in folder_paths.folder_names_and_paths:
        raise WorkflowError("the pack did not register its 'nested_attention' model folder")


# --- UI format -> API format ---------------------------------------------------------------------------
def _input_specs(node_cls) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every required and optional input, in definition order."""
    types = node_cls.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options))
    return specs


def _is_widget(kind, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def _extra_widget_values(name: str, kind, options: dict) -> int:
    """How many values the frontend stores after this widget's own value."""
    if options.get("control_after_generate") or (kind == "INT" and name in SEED_NAMES):
        return 1  # control_after_generate: "fixed" / "randomize" / ...
    if options.get("image_upload"):
        return 1  # the upload button widget
    return 0


def _widget_inputs(node: dict, node_cls) -> dict:
    """The node's widget values by input name (positional in the file, in schema order)."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some nodes save their widgets by name
        return dict(values)
    out, i = {}, 0
    for name, kind, options in _input_specs(node_cls):
        if not _is_widget(kind, options):
            continue
        if i >= len(values):
            break  # an older file without a widget added since: the node's default applies
        out[name] = values[i]
        i += 1 + _extra_widget_values(name, kind, options)
    return out


def ui_to_api(workflow: dict, node_classes: dict | None = None) -> dict:
    """A frontend (UI format, v0.4) workflow as an API-format prompt {id: {class_type, inputs}}."""
    node_classes = node_classes if node_classes is not None else load_nodes()
    by_id = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow.get("links", [])}  # [id, src, src_slot, dst, dst_slot, type]

    def source(link_id):
        """(node id, slot) feeding a link, through Reroutes; None for a PrimitiveNode (its value is a widget)."""
        _, src, slot, *_ = links[link_id]
        node = by_id[src]
        if node["type"] == "Reroute":
            upstream = node["inputs"][0].get("link")
            return None if upstream is None else source(upstream)
        if node["type"] == "PrimitiveNode":
            return None
        return str(src), slot

    missing = sorted({n["type"] for n in workflow["nodes"] if n["type"] not in node_classes and n["type"] not in VIRTUAL_NODES})
    if missing:
        raise WorkflowError(f"the workflow uses node types this ComfyUI does not have: {missing}")
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == MODE_MUTED:
            continue
        if node.get("mode", 0) == MODE_BYPASSED:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is bypassed; this runner does not support bypass, unbypass or remove it")
        node_cls = node_classes[node["type"]]
        inputs = _widget_inputs(node, node_cls)
        # a link overrides the widget value of an input converted to a socket
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None and (src := source(slot["link"])) is not None:
                inputs[slot["name"]] = [src[0], src[1]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


# --- tiny mode ---------------------------------------------------------------------------------------------
def make_tiny(prompt: dict, models_dir: Path, input_dir: Path, max_side: int = TINY_MAX_SIDE, max_steps: int = TINY_MAX_STEPS) -> dict:
    """The prompt on tiny built-in models: stock loaders swapped, nested-attention files and photos generated,
    image size and step count capped (a 1024px, 30-step run would take the tiny UNet minutes on a CPU)."""
    from training import tiny

    tiny.register_tiny_nodes()
    prompt = json.loads(json.dumps(prompt))  # a copy
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind in TINY_SWAPS:
            node["class_type"], node["inputs"] = TINY_SWAPS[kind], {"seed": 0}
        elif kind == "NestedAttentionLoader":
            path = models_dir / inputs["weights_name"]
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tiny.tiny_weights_for_name(path, tiny.tiny_sdxl(0))
        elif kind in TINY_LORA_LOADERS and isinstance(inputs.get("lora_name"), str):
            path = models_dir.parent / "loras" / inputs["lora_name"]
            if not path.exists():
                save_tiny_lora(path, tiny.tiny_sdxl(0))
        elif kind == "LoadImage":
            tiny.save_test_image(input_dir / inputs["image"])
        elif kind == "EmptyLatentImage" and all(isinstance(inputs.get(k), int) for k in ("width", "height")):
            scale = min(1.0, max_side / max(inputs["width"], inputs["height"]))
            inputs["width"], inputs["height"] = (max(64, int(inputs[k] * scale) // 8 * 8) for k in ("width", "height"))
        elif kind in ("KSampler", "KSamplerAdvanced") and isinstance(inputs.get("steps"), int):
            inputs["steps"] = min(inputs["steps"], max_steps)
    return prompt


def save_tiny_lora(path: str | os.PathLike, model_patcher, rank: int = 2, seed: int = 0) -> Path:
    """A LoRA (rank `rank`, fixed by `seed`) on every cross-attention query projection of a (tiny) UNet, in the
    generic `<module>.lora_up/lora_down.weight` format the host's LoRA loader reads: a stand-in for an SDXL LoRA file."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in model_patcher.model.state_dict().items():
        if key.startswith("diffusion_model.") and key.endswith("attn2.to_q.weight"):
            module = key.removesuffix(".weight")
            out_features, in_features = weight.shape
            tensors[f"{module}.lora_down.weight"] = torch.randn(rank, in_features, generator=gen) * 0.1
            tensors[f"{module}.lora_up.weight"] = torch.randn(out_features, rank, generator=gen) * 0.1
    if not tensors:
        raise ValueError("the model has no attn2.to_q layer to put a LoRA on")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"note": "tiny random test LoRA"})
    return path


TEMPORARY_MODEL_FOLDERS = ("nested_attention", "loras")


@contextlib.contextmanager
def temporary_folders():
    """Temp models/nested_attention and models/loras (searched first) and a temp input dir, all undone afterwards
    (tiny runs write their stand-in files there, the demo its reference photos). Yields (nested_attention dir, input dir)."""
    import folder_paths

    old_input = folder_paths.get_input_directory()
    with tempfile.TemporaryDirectory(prefix="nested_tiny_") as tmp:
        models = {name: Path(tmp, "models", name) for name in TEMPORARY_MODEL_FOLDERS}
        input_dir = Path(tmp, "input")
        for name, folder in models.items():
            folder.mkdir(parents=True)
            folder_paths.add_model_folder_path(name, str(folder), is_default=True)
        input_dir.mkdir()
        folder_paths.set_input_directory(str(input_dir))
        try:
            yield models["nested_attention"], input_dir
        finally:
            for name, folder in models.items():
                folder_paths.folder_names_and_paths[name][0].remove(str(folder))
                # the host's file-list cache would stat the deleted folder on its next lookup and crash
                folder_paths.filename_list_cache.pop(name, None)
            folder_paths.set_input_directory(old_input)


# --- execution -----------------------------------------------------------------------------------------------
class _ServerStub:
    """What PromptExecutor needs of the web server: nowhere to send progress."""

    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass


def _cache_options(executor_class) -> dict:
    """No cache limits, in the words of this host's PromptExecutor (0.3.64 says cache_size, 0.3.75 on cache_args)."""
    params = inspect.signature(executor_class.__init__).parameters
    return {"cache_args": _NoCacheLimits()} if "cache_args" in params else {"cache_size": None}


class _NoCacheLimits(dict):
    """PromptExecutor's cache_args: hosts add keys over time (0.33 reads "ram_inactive", which 0.3.75 lacks);
    every size or headroom this runner does not set is 0, i.e. no extra caching."""

    def __missing__(self, key):
        return 0


def _validation_message(error: dict, node_errors: dict) -> str:
    lines = [f"{error.get('message', 'invalid prompt')} {error.get('details', '')}".strip()]
    for node_id, info in node_errors.items():
        for e in info.get("errors", []):
            lines.append(f"  node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines)


def _execution_message(status_messages: list) -> str:
    for event, data in status_messages:
        if event == "execution_error":
            return f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_type')}: {data.get('exception_message')}"
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "execution failed without an error message"


async def _execute(prompt: dict) -> RunResult:
    import execution
    import folder_paths

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
    if not valid:
        raise WorkflowError(_validation_message(error, node_errors), node_errors=node_errors)
    executor = execution.PromptExecutor(_ServerStub(), cache_type=execution.CacheType.CLASSIC, **_cache_options(execution.PromptExecutor))
    await executor.execute_async(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    if not executor.success:
        raise WorkflowError(_execution_message(executor.status_messages), status_messages=executor.status_messages)
    ui_outputs = executor.history_result["outputs"]
    images = [
        os.path.join(folder_paths.get_output_directory(), image.get("subfolder", ""), image["filename"])
        for node_output in ui_outputs.values()
        for image in node_output.get("images", [])
        if image.get("type") == "output"
    ]
    return RunResult(outputs=ui_outputs, images=images, status_messages=executor.status_messages)


def run_prompt(prompt: dict, output_dir: str | os.PathLike | None = None) -> RunResult:
    """Validate and run an API-format prompt; raises WorkflowError with the failing node's message."""
    load_nodes()
    import folder_paths

    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        folder_paths.set_output_directory(str(Path(output_dir).resolve()))
    return asyncio.run(_execute(prompt))


def run_workflow(
    path: str | os.PathLike, *, tiny: bool = False, output_dir: str | os.PathLike = "output",
    max_side: int = TINY_MAX_SIDE, max_steps: int = TINY_MAX_STEPS,
) -> RunResult:
    """Convert a UI-format workflow file, run it, return what it saved (`max_*` apply with `tiny` only)."""
    workflow = json.loads(Path(path).read_text())
    prompt = ui_to_api(workflow, load_nodes())
    if not tiny:
        return run_prompt(prompt, output_dir)
    with temporary_folders() as (models_dir, input_dir):
        return run_prompt(make_tiny(prompt, models_dir, input_dir, max_side, max_steps), output_dir)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workflows.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("workflow", type=Path, help="a workflow .json saved by the ComfyUI frontend (UI format)")
    parser.add_argument("--tiny", action="store_true", help="run on tiny random built-in models (no downloads; noise-like image)")
    parser.add_argument("--output", type=Path, default=Path("output"), help="where SaveImage writes (default ./output)")
    args = parser.parse_args(argv)
    if not args.workflow.is_file():
        parser.error(f"no such workflow file: {args.workflow}")
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tiny:
        print(
            "--tiny: running on tiny RANDOM built-in models (SDXL architecture, toy widths) and generated reference "
            f"images, at most {TINY_MAX_SIDE}px and {TINY_MAX_STEPS} steps. The image will look like noise: this checks "
            "that the workflow runs, it is not a real result."
        )
    try:
        result = run_workflow(args.workflow, tiny=args.tiny, output_dir=args.output)
    except WorkflowError as e:
        print(f"workflow failed: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    for image in result.images:
        print(f"saved {image}")
    return result.images


if __name__ == "__main__":
    main()
