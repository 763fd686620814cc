"""Save Subject, Load Subject: a SUBJECT as a file in models/nested_attention_subjects.

The Q-Former then runs once per subject, and subjects can be shared. A subject
file is one safetensors file:

    tensor    tokens          [M, context_dim], the subject tokens as Encode Subject made them
    metadata  format          "nested-attention-subject"
              format_version  "1"
              lambda          λ, as repr(float) (round-trips exactly)
              weights_name    the weights file that made the tokens, as Load Nested Attention lists it
              weights_sha256  that file's sha256: Load Subject refuses any other weights
              bound_word, domain, base_model   from the weights' config, for people reading the file

File names from the graph stay inside the folder: absolute paths, separators and `..` are refused,
and the resolved path must lie in the folder. Saving never replaces a file: a name already taken
gets the first free counter suffix (`alice.safetensors`, then `alice_00001.safetensors`, ...), like
ComfyUI's Save Image, and the node reports the name it wrote. Loading never unpickles.
"""
from __future__ import annotations

import logging
import math
import os

import comfy.model_management as mm
import folder_paths
import torch
from comfy_api.latest import io, ui
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..nested_core import NestedAttentionModel
from .loader import WeightsFile
from .patch import Subject
from .types import CATEGORY, NestedAttentionType, SubjectType

FOLDER = "nested_attention_subjects"
EXTENSION = ".safetensors"
FORMAT = "nested-attention-subject"
FORMAT_VERSION = 1
MAX_COUNTER = 99999
log = logging.getLogger(__name__)


class SubjectFileError(ValueError):
    """A subject file that cannot be used, or a file name that is not allowed."""


def register_subject_folder() -> list[str]:
    """models/nested_attention_subjects, beside any paths extra_model_paths.yaml gave the folder; its paths (the
    first one is where Save Subject writes). Idempotent: called by the nodes themselves."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
    _paths, extensions = folder_paths.folder_names_and_paths[FOLDER]
    extensions.add(EXTENSION)
    return folder_paths.get_folder_paths(FOLDER)


def _checked_name(name: str) -> str:
    """A plain file name inside the folder, with the .safetensors extension; anything path-like is refused."""
    name = name.strip()
    bad = [c for c in ("/", "\\", os.sep, ":", "\0") if c in name]
    if not name or name.startswith(".") or ".." in name or bad or os.path.isabs(name):
        raise SubjectFileError(
            f"subject file name {name!r} is not allowed: use a plain name such as 'alice' (no folders, no '/', '\\', "
            f"':' or '..'); subject files live directly in models/{FOLDER}"
        )
    return name if name.lower().endswith(EXTENSION) else name + EXTENSION


def _inside(folder: str, name: str) -> str:
    """folder/name, resolved (links followed); refused unless it is a direct child of the resolved folder."""
    root = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(root, name))
    if os.path.dirname(path) != root:
        raise SubjectFileError(f"subject file {name!r} resolves to {path}, outside models/{FOLDER} ({root}): use a file in that folder")
    return path


def _source(weights: NestedAttentionModel, what: str) -> WeightsFile:
    source = getattr(weights, "source", None)
    if not isinstance(source, WeightsFile):
        raise SubjectFileError(
            f"{what} needs to know which weights file the NESTED_ATTENTION came from, and these weights were not loaded "
            "by Load Nested Attention: load the weights file with Load Nested Attention"
        )
    return source


# --- saving ----------------------------------------------------------------------------------------------------------
def save_subject(subject: Subject, name: str) -> str:
    """Write `subject` as models/nested_attention_subjects/<name>.safetensors, or with the first free counter suffix
    if that name is taken (an existing file is never replaced); returns the file name written."""
    source = _source(subject.weights, "Save Subject")
    filename = _checked_name(name)
    c = subject.weights.config
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "lambda": repr(float(subject.lam)),
        "weights_name": source.name, "weights_sha256": source.sha256,
        "bound_word": c.bound_word, "domain": c.domain, "base_model": c.base_model,
    }
    data = save({"tokens": subject.tokens.detach().to("cpu").contiguous()}, metadata=metadata)
    folder = register_subject_folder()[0]
    os.makedirs(folder, exist_ok=True)
    stem = filename[: -len(EXTENSION)]
    for counter in range(MAX_COUNTER + 1):
        candidate = filename if counter == 0 else f"{stem}_{counter:05}{EXTENSION}"
        path = _inside(folder, candidate)
        try:
            f = open(path, "xb")  # exclusive create: never replaces a file, even one written a moment ago
        except FileExistsError:
            continue
        try:
            with f:
                f.write(data)
        except BaseException:
            os.remove(path)  # no half-written subject under a name Load Subject lists
            raise
        return candidate
    raise SubjectFileError(f"models/{FOLDER} already holds {filename} and {MAX_COUNTER} numbered copies: choose another name")


class SaveSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedAttentionSaveSubject",
            display_name="Save Subject",
            category=CATEGORY,
            description=f"Saves a subject (its tokens and λ, and which weights file made it) to models/{FOLDER}, so Load Subject "
                        "can use it without the photos, CLIP vision or the Q-Former. A name already taken gets a counter suffix; "
                        "no file is ever replaced.",
            inputs=[
                SubjectType.Input("subject", tooltip="From Encode Subject, Combine Subjects or Attention Scale λ."),
                io.String.Input("name", default="subject",
                                tooltip=f"File name in models/{FOLDER} ('.safetensors' is added). If it exists, the first free "
                                        "name_00001, name_00002, … is used instead."),
            ],
            outputs=[SubjectType.Output(tooltip="The same subject, to use in this graph too.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, subject: Subject, name: str) -> io.NodeOutput:
        written = save_subject(subject, name)
        log.info("saved subject %s (%d tokens, λ %g)", written, subject.tokens.shape[0], subject.lam)
        return io.NodeOutput(subject, ui=ui.PreviewText(f"saved {written}"))


# --- loading ---------------------------------------------------------------------------------------------------------
def subject_path(name: str) -> str:
    """The file `name` in the subjects folder(s): a plain name only, resolved inside the folder it is found in."""
    filename = _checked_name(name)
    folders = register_subject_folder()
    for folder in folders:
        path = _inside(folder, filename)
        if os.path.isfile(path):
            return path
    raise SubjectFileError(f"no subject file {filename!r} in models/{FOLDER} (searched {folders}): save one with Save Subject, "
                           "or copy a shared subject file there, then press R in ComfyUI to refresh the list")


def _header_problem(name: str, metadata: dict) -> str | None:
    """Why a file with this safetensors metadata is not a subject file this pack reads (None: it is)."""
    if metadata.get("format") != FORMAT:
        hint = ("it is a nested-attention weights file: put it in models/nested_attention and use Load Nested Attention"
                if metadata.get("format") == "nested-attention" else "subject files are written by Save Subject")
        return f"{name}: not a subject file (no format='{FORMAT}' metadata); {hint}"
    version = metadata.get("format_version", "")
    if version != str(FORMAT_VERSION):
        return f"{name}: subject format version {version!r}, this pack reads {FORMAT_VERSION}: update the pack, or save the subject again"
    return None


def _unreadable(name: str, error: Exception) -> str:
    return f"{name}: not a readable safetensors file ({error}): it is corrupt or truncated; save the subject again"


def subject_file_problem(name) -> str | None:
    """Why Load Subject cannot use the file `name`, from its header alone (None: it looks usable). Run when the graph
    is queued; whether it fits the connected weights is known only when they load."""
    if not isinstance(name, str):  # linked from another node: known only when it runs
        return None
    try:
        with safe_open(subject_path(name), framework="pt") as f:
            metadata = f.metadata() or {}
    except SubjectFileError as e:  # a name that leaves the folder, or no such file
        return str(e)
    except (SafetensorError, OSError) as e:
        return _unreadable(name, e)
    return _header_problem(name, metadata)


def load_subject(weights: NestedAttentionModel, name: str) -> Subject:
    """The subject saved as `name`, for exactly the weights that made it; strict checks, each naming the fix."""
    path = subject_path(name)
    source = _source(weights, "Load Subject")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            tokens = f.get_tensor("tokens") if keys == {"tokens"} else None
    except (SafetensorError, OSError) as e:
        raise SubjectFileError(_unreadable(name, e)) from e
    problem = _header_problem(name, metadata)
    if problem:
        raise SubjectFileError(problem)
    if tokens is None:
        raise SubjectFileError(f"{name}: holds tensors {sorted(keys)}, a subject file holds only 'tokens': it is damaged; save the subject again")
    if metadata.get("weights_sha256") != source.sha256:
        needed = metadata.get("weights_name", "?")
        raise SubjectFileError(
            f"{name} was made with the weights file '{needed}' (sha256 {metadata.get('weights_sha256', '?')[:12]}…); the "
            f"connected weights are '{source.name}' (sha256 {source.sha256[:12]}…): load '{needed}' (that exact file) with "
            "Load Nested Attention, or encode the subject again with these weights"
        )
    c = weights.config
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] != c.context_dim or not tokens.is_floating_point():
        raise SubjectFileError(
            f"{name}: tokens are {tokens.dtype} {list(tokens.shape)}, these weights need [M, {c.context_dim}] floats "
            "(token width = the text context width): the file is damaged; save the subject again"
        )
    if not torch.isfinite(tokens).all():
        raise SubjectFileError(f"{name}: its tokens hold NaN/inf values: the file is damaged; save the subject again")
    try:
        lam = float(metadata.get("lambda", "nan"))
        if not math.isfinite(lam):
            raise ValueError(metadata.get("lambda"))
        return Subject(weights=weights, tokens=tokens.to(mm.intermediate_device())).with_lambda(lam)
    except ValueError as e:
        raise SubjectFileError(f"{name}: its λ is not usable ({e}): the file is damaged; save the subject again") from e


class LoadSubject(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_subject_folder()
        names = [n for n in folder_paths.get_filename_list(FOLDER) if "/" not in n and "\\" not in n]  # what Load accepts
        return io.Schema(
            node_id="NestedAttentionLoadSubject",
            display_name="Load Subject",
            category=CATEGORY,
            description=f"Loads a subject saved by Save Subject from models/{FOLDER}: no photos, CLIP vision or Q-Former needed. "
                        "It works only with the exact weights file that made it.",
            inputs=[
                NestedAttentionType.Input("nested_attention",
                                          tooltip="From Load Nested Attention: the weights file the subject was made with."),
                io.Combo.Input("subject_name", options=names, tooltip=f"A subject file in models/{FOLDER}, written by Save Subject."),
            ],
            outputs=[SubjectType.Output(tooltip="The subject (tokens and λ as saved), for Bind Token.")],
        )

    @classmethod
    def validate_inputs(cls, subject_name) -> bool | str:
        # when the graph is queued: a missing or foreign file is reported before any model loads
        return subject_file_problem(subject_name) or True

    @classmethod
    def execute(cls, nested_attention, subject_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_subject(nested_attention, subject_name))
