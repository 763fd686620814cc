"""Shipped workflows written from short Python specs: the frontend's UI format (v0.4), laid out in columns.

    python -m workflows.build            # (re)writes the workflows this file defines

A spec names nodes, their widget values in schema order and their links by name; slots and types come
from the registered node classes, so a spec cannot link a wrong slot. Each column is one stage of the
graph (loaders, encoders, binding, sampling, output), so the whole graph reads left to right.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .run import SEED_NAMES, _extra_widget_values, _input_specs, _is_widget, load_nodes

HERE = Path(__file__).resolve().parent
COLUMN_WIDTH, GAP, TITLE = 340, 40, 30
NOTE_COLOURS = {"color": "#432", "bgcolor": "#653"}


@dataclass
class Node:
    name: str  # the spec's handle for links
    type: str
    column: int
    widgets: list = field(default_factory=list)  # widget values in schema order (seed's control value is added)
    inputs: dict[str, tuple[str, int]] = field(default_factory=dict)  # input name -> (node name, output slot)
    title: str | None = None
    height: int | None = None


def _outputs(node_cls) -> list[tuple[str, str]]:
    names = getattr(node_cls, "RETURN_NAMES", None) or node_cls.RETURN_TYPES
    return [(name, kind) for name, kind in zip(names, node_cls.RETURN_TYPES)]


def _default_height(node_cls, n_widgets: int, n_sockets: int, kind: str) -> int:
    if kind == "Note":
        return 220
    if kind == "LoadImage":
        return 330
    if kind == "SaveImage":
        return 300
    return 46 + 26 * (n_widgets + n_sockets)


def to_ui(nodes: list[Node], *, note: str, workflow_id: str) -> dict:
    """The UI-format workflow of `nodes` plus a Note (first column, top) saying what it needs."""
    classes = load_nodes()
    nodes = [Node("note", "Note", 0, [note])] + nodes
    ids = {n.name: i + 1 for i, n in enumerate(nodes)}
    links, out_links = [], {}
    ui_nodes, column_y = [], {}
    for order, n in enumerate(nodes):
        node_id = ids[n.name]
        ui = {"id": node_id, "type": n.type, "pos": [0, 0], "size": [COLUMN_WIDTH - GAP, 0], "flags": {}, "order": order, "mode": 0,
              "properties": {"Node name for S&R": n.type}, "widgets_values": list(n.widgets)}
        if n.type == "Note":
            ui.update(outputs=[], **NOTE_COLOURS)
            n_widgets = n_sockets = 0
        else:
            cls = classes[n.type]
            specs = _input_specs(cls)
            sockets = [(name, kind) for name, kind, options in specs if not _is_widget(kind, options)]
            unknown = set(n.inputs) - {name for name, _ in sockets}
            if unknown:
                raise ValueError(f"{n.name} ({n.type}) has no socket input {sorted(unknown)}")
            widgets = []
            values = iter(n.widgets)
            for name, kind, options in specs:
                if _is_widget(kind, options):
                    widgets.append(next(values))
                    if _extra_widget_values(name, kind, options):
                        widgets.append("fixed" if (options.get("control_after_generate") or name in SEED_NAMES) else "image")
            ui["widgets_values"] = widgets
            ui["inputs"] = []
            for slot, (name, kind) in enumerate(sockets):
                link = None
                if name in n.inputs:
                    src, src_slot = n.inputs[name]
                    link = len(links) + 1
                    links.append([link, ids[src], src_slot, node_id, slot, kind])
                    out_links.setdefault((ids[src], src_slot), []).append(link)
                ui["inputs"].append({"name": name, "type": kind, "link": link})
            ui["outputs"] = [{"name": name, "type": kind, "links": [], "slot_index": i} for i, (name, kind) in enumerate(_outputs(cls))]
            n_widgets, n_sockets = len(n.widgets), max(len(sockets), len(ui["outputs"]))
        if n.title:
            ui["title"] = n.title
        height = n.height or _default_height(None, n_widgets, n_sockets, n.type)
        y = column_y.get(n.column, 0) + TITLE
        ui["pos"] = [n.column * COLUMN_WIDTH, y]
        ui["size"] = [COLUMN_WIDTH - GAP, height]
        column_y[n.column] = y + height + GAP
        ui_nodes.append(ui)
    for ui in ui_nodes:
        for out in ui.get("outputs", []):
            out["links"] = out_links.get((ui["id"], out["slot_index"])) or None
    return {"id": workflow_id, "revision": 0, "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.85, "offset": [20, 20]}}, "version": 0.4}


# --- the miniature world's workflows (they run anywhere in seconds) ----------------------------------------------
WORLD_NOTE = ("Nested Attention on the pack's miniature demo world (128×128 px, runs on a CPU in seconds).\n\n"
              "Files (all shipped inside this pack, nothing to download): miniworld/weights/base.safetensors and "
              "vision.safetensors (Load Mini World), miniworld/weights/nested_{domains}.safetensors (Load Nested Attention; "
              "the pack adds that folder to models/nested_attention). Reference photo: any render of the world, e.g. "
              "`python -m miniworld.world reference --domain person --out input/miniworld_person.png` in the pack's folder.\n"
              "Keep the subject word in the prompt; raise λ for identity, lower it for prompt freedom.")


def world_single_subject(domain: str = "person", word: str = "person") -> list[Node]:
    return [
        Node("world", "NestedAttentionMiniWorldLoader", 0, ["random"]),
        Node("weights", "NestedAttentionLoader", 0, [f"nested_{domain}.safetensors"]),
        Node("photo", "LoadImage", 1, [f"miniworld_{domain}.png"]),
        Node("subject", "NestedAttentionEncodeSubject", 2, [], {"nested_attention": ("weights", 0), "clip_vision": ("world", 3), "image": ("photo", 0)}),
        Node("lam", "NestedAttentionScale", 2, [2.0], {"subject": ("subject", 0)}),
        Node("prompt", "NestedAttentionEncodePrompt", 2, [f"a photo of a large {word} wearing a hat on a blue background, on the left"],
             {"clip": ("world", 1)}, height=150),
        Node("negative", "CLIPTextEncode", 2, [""], {"clip": ("world", 1)}, height=100),
        Node("bind", "NestedAttentionBindToken", 3, [word, 0], {"conditioning": ("prompt", 0), "subject": ("lam", 0)}),
        Node("apply", "NestedAttentionApply", 3, [0.0, 1.0], {"model": ("world", 0)}),
        Node("latent", "EmptyLatentImage", 3, [128, 128, 1]),
        Node("sampler", "KSampler", 4, [7, 20, 3.0, "euler", "normal", 1.0],
             {"model": ("apply", 0), "positive": ("bind", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)}, height=280),
        Node("decode", "VAEDecode", 4, [], {"samples": ("sampler", 0), "vae": ("world", 2)}),
        Node("save", "SaveImage", 5, [f"miniworld_{domain}"], {"images": ("decode", 0)}),
    ]


def world_person_and_pet() -> list[Node]:
    return [
        Node("world", "NestedAttentionMiniWorldLoader", 0, ["random"]),
        Node("person_weights", "NestedAttentionLoader", 0, ["nested_person.safetensors"]),
        Node("pet_weights", "NestedAttentionLoader", 0, ["nested_pet.safetensors"]),
        Node("person_photo", "LoadImage", 1, ["miniworld_person.png"]),
        Node("pet_photo", "LoadImage", 1, ["miniworld_pet.png"]),
        Node("person", "NestedAttentionEncodeSubject", 2, [], {"nested_attention": ("person_weights", 0), "clip_vision": ("world", 3), "image": ("person_photo", 0)}),
        Node("pet", "NestedAttentionEncodeSubject", 2, [], {"nested_attention": ("pet_weights", 0), "clip_vision": ("world", 3), "image": ("pet_photo", 0)}),
        Node("prompt", "NestedAttentionEncodePrompt", 2, ["a photo of a small person and a small dog on a green background, in the center"],
             {"clip": ("world", 1)}, height=150),
        Node("negative", "CLIPTextEncode", 2, [""], {"clip": ("world", 1)}, height=100),
        Node("bind_person", "NestedAttentionBindToken", 3, ["person", 0], {"conditioning": ("prompt", 0), "subject": ("person", 0)}),
        Node("bind_pet", "NestedAttentionBindToken", 3, ["dog", 0], {"conditioning": ("bind_person", 0), "subject": ("pet", 0)}),
        Node("apply", "NestedAttentionApply", 3, [0.0, 1.0], {"model": ("world", 0)}),
        Node("latent", "EmptyLatentImage", 3, [128, 128, 1]),
        Node("sampler", "KSampler", 4, [7, 20, 3.0, "euler", "normal", 1.0],
             {"model": ("apply", 0), "positive": ("bind_pet", 0), "negative": ("negative", 0), "latent_image": ("latent", 0)}, height=280),
        Node("decode", "VAEDecode", 4, [], {"samples": ("sampler", 0), "vae": ("world", 2)}),
        Node("save", "SaveImage", 5, ["miniworld_person_and_pet"], {"images": ("decode", 0)}),
    ]


WORKFLOWS = {
    "miniworld_single_subject.json": (world_single_subject, WORLD_NOTE.format(domains="person")),
    "miniworld_person_and_pet.json": (world_person_and_pet, WORLD_NOTE.format(domains="person / nested_pet")),
}


def main() -> None:
    for name, (spec, note) in WORKFLOWS.items():
        workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-nested-attention/{name}"))  # stable across rebuilds
        (HERE / name).write_text(json.dumps(to_ui(spec(), note=note, workflow_id=workflow_id), indent=1, ensure_ascii=False) + "\n")
        print(HERE / name)


if __name__ == "__main__":
    main()
