"""Shipped workflows written from short Python specs (workflows/specs.py): the frontend's UI format (v0.4).

    python -m workflows.build                # (re)writes every workflows/*.json the specs define
    python -m workflows.build --thumbnails   # ... and their same-name .jpg thumbnails, by running the world variants

A spec names nodes, their widget values in schema order and their links by name; slots and types come from
the registered node classes, so a spec cannot link a wrong slot. Each column is one stage of the graph
(loaders, encoders, binding, sampling, output), so the graph reads left to right. The saved view
(`extra.ds`) fits the whole graph into the canvas of a 1280x720 browser window, clear of the page's own
bars, so a workflow opened from the template browser shows every node.

The host serves a pack's templates from the first of `example_workflows/`, `example/`, `examples/`, `workflow/`,
`workflows/` it finds (ComfyUI 0.3.75 and upstream, app/custom_node_manager.py), and lists the JSON files of all
of them: this folder is enough, and copies in `example_workflows/` would list every template twice.
"""
from __future__ import annotations

import argparse
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .run import SEED_NAMES, _extra_widget_values, _input_specs, _is_widget, load_nodes

HERE = Path(__file__).resolve().parent
COLUMN_WIDTH, GAP, TITLE = 310, 30, 30  # a node is COLUMN_WIDTH - GAP wide; TITLE: LiteGraph's title bar above `pos`
V_GAP = 24  # between a node's bottom and the next node's title bar
NOTE_COLOURS = {"color": "#432", "bgcolor": "#653"}
NOTE_CHARS_PER_LINE, NOTE_LINE_HEIGHT = 40, 15  # the Note's text box at this width (frontend 1.32), with margin

# The view a workflow opens with: a 1280x720 window, minus the page's chrome drawn over the canvas (frontend
# 1.32.9, measured in headless Chromium: tab bar 38 px, side tool bar 59 px, the workflow name box and Run bar
# below the tabs, zoom controls bottom right). SAFE is the part of the canvas no chrome covers, with margin.
VIEW = (1280, 720)
SAFE = (80, 96, 1260, 656)  # left, top, right, bottom in canvas pixels
LOD_SCALE = 0.58  # below this zoom the frontend draws nodes without text (LiteGraph.Canvas.MinFontSizeForLOD 8 px / 14 px)


@dataclass
class Node:
    name: str  # the spec's handle for links
    type: str
    column: int
    widgets: list = field(default_factory=list)  # widget values in schema order (seed's control value is added)
    inputs: dict[str, tuple[str, int]] = field(default_factory=dict)  # input name -> (node name, output slot)
    title: str | None = None
    height: int | None = None


@dataclass(frozen=True)
class ModelFile:
    """A public file a stock loader names: what the frontend's Missing Models dialog offers to download."""

    url: str
    directory: str  # the models/ folder the loader reads


def _outputs(node_cls) -> list[tuple[str, str]]:
    names = getattr(node_cls, "RETURN_NAMES", None) or node_cls.RETURN_TYPES
    return [(name, kind) for name, kind in zip(names, node_cls.RETURN_TYPES)]


def note_height(text: str) -> int:
    lines = sum(max(1, -(-len(line) // NOTE_CHARS_PER_LINE)) for line in text.split("\n"))
    return 24 + NOTE_LINE_HEIGHT * lines


def _default_height(kind: str, widget_rows: int, socket_rows: int) -> int:
    """A little over what the frontend computes for the node (it grows a node to that, never shrinks it)."""
    if kind == "LoadImage":
        return 290  # room for the photo's preview (the page grows the node to about 280 once the photo loads)
    if kind in ("SaveImage", "PreviewImage"):
        return 220
    return max(60, 22 + 20 * socket_rows + 24 * widget_rows)


def fit_view(ui_nodes: list[dict], view: tuple[int, int] = VIEW, safe: tuple[int, int, int, int] = SAFE) -> dict:
    """`extra.ds` (scale, offset) that shows every node, title bar included, centred in the safe part of the canvas.
    LiteGraph draws graph point p at (p + offset) * scale."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] - TITLE for n in ui_nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    left, top, right, bottom = safe
    scale = min(1.0, (right - left) / (x1 - x0), (bottom - top) / (y1 - y0))
    scale = int(scale * 1000) / 1000  # floor, so rounding never pushes a node out
    offset_x = (left + ((right - left) - (x1 - x0) * scale) / 2) / scale - x0
    offset_y = (top + ((bottom - top) - (y1 - y0) * scale) / 2) / scale - y0
    return {"scale": scale, "offset": [round(offset_x, 1), round(offset_y, 1)]}


def to_ui(nodes: list[Node], *, note: str, workflow_id: str, models: dict[str, ModelFile] | None = None) -> dict:
    """The UI-format workflow of `nodes` plus a Note (first column, top) saying what it needs. A loader whose
    widget names a file of `models` gets the download metadata the frontend reads (`properties.models`)."""
    classes = load_nodes()
    models = models or {}
    nodes = [Node("note", "Note", 0, [note], height=note_height(note))] + nodes
    ids = {n.name: i + 1 for i, n in enumerate(nodes)}
    links, out_links = [], {}
    ui_nodes, column_y = [], {}
    for order, n in enumerate(nodes):
        node_id = ids[n.name]
        ui = {"id": node_id, "type": n.type, "pos": [0, 0], "size": [COLUMN_WIDTH - GAP, 0], "flags": {}, "order": order, "mode": 0,
              "properties": {"Node name for S&R": n.type}, "widgets_values": list(n.widgets)}
        if n.type == "Note":
            ui.update(outputs=[], **NOTE_COLOURS)
            widget_rows = socket_rows = 0
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
            if next(values, None) is not None:
                raise ValueError(f"{n.name} ({n.type}) has more widget values than widgets")
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
            files = [{"name": v, "url": models[v].url, "directory": models[v].directory} for v in widgets if isinstance(v, str) and v in models]
            if files:
                ui["properties"]["models"] = files
            widget_rows, socket_rows = len(widgets), max(len(sockets), len(ui["outputs"]))
        if n.title:
            ui["title"] = n.title
        height = n.height or _default_height(n.type, widget_rows, socket_rows)
        y = column_y.get(n.column, 0) + TITLE
        ui["pos"] = [n.column * COLUMN_WIDTH, y]
        ui["size"] = [COLUMN_WIDTH - GAP, height]
        column_y[n.column] = y + height + V_GAP
        ui_nodes.append(ui)
    for ui in ui_nodes:
        for out in ui.get("outputs", []):
            out["links"] = out_links.get((ui["id"], out["slot_index"])) or None
    return {"id": workflow_id, "revision": 0, "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": fit_view(ui_nodes)}, "version": 0.4}


def workflow_id(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-nested-attention/{name}"))  # stable across rebuilds


def build(name: str) -> dict:
    """The UI-format workflow the spec `name` (a file name in workflows/) defines."""
    from .specs import WORKFLOWS

    spec = WORKFLOWS[name]
    return to_ui(spec.nodes(), note=spec.note, workflow_id=workflow_id(name), models=spec.models)


def dumps(workflow: dict) -> str:
    return json.dumps(workflow, indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> list[Path]:
    from .specs import WORKFLOWS

    p = argparse.ArgumentParser(prog="python -m workflows.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--thumbnails", action="store_true",
                   help="also write each workflow's .jpg thumbnail by running the demo-world variants (about a minute on a CPU)")
    args = p.parse_args(argv)
    written = []
    for name in WORKFLOWS:
        path = HERE / name
        path.write_text(dumps(build(name)))
        written.append(path)
        print(path)
    if args.thumbnails:
        from .thumbnails import write_thumbnails

        written += write_thumbnails(HERE)
    return written


if __name__ == "__main__":
    main()
