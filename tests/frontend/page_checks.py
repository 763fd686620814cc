"""What check_in_browser.py asks the ComfyUI page about a loaded workflow: missing nodes, dialogs and alerts, the
pack nodes' widgets, whether every node is in view, the page's own API prompt. Each check raises CheckFailed
with what is wrong and where."""
from __future__ import annotations

from pathlib import Path

from comfy_server import check

PACK_NODES = [
    "NestedAttentionLoader", "NestedAttentionEncodePrompt", "NestedAttentionEncodeSubject",
    "NestedAttentionCombineSubjects", "NestedAttentionScale", "NestedAttentionBindToken", "NestedAttentionApply",
    "NestedAttentionMiniWorldLoader",
]

JS_SETUP = """() => {
  window.__e2eMissing = [];
  window.__e2eErrors = [];
  window.app.registerExtension({
    name: 'nested_attention.e2e_check',
    afterConfigureGraph(missing) {
      for (const m of (missing || [])) window.__e2eMissing.push(typeof m === 'string' ? m : (m?.type ?? JSON.stringify(m)));
    },
  });
  const api = window.app.api;
  if (api) for (const ev of ['execution_error', 'execution_interrupted'])
    api.addEventListener(ev, (e) => window.__e2eErrors.push({event: ev, detail: e.detail}));
  return true;
}"""

# as the template browser loads a template: clean, restore the saved view (extra.ds), then its name
JS_LOAD = """async ([wf, name]) => {
  window.__e2eMissing = [];
  await window.app.loadGraphData(wf, true, true, name);
  await new Promise(r => setTimeout(r, 500));
  window.app.canvas.setDirty(true, true);
  await new Promise(r => setTimeout(r, 300));
  return true;
}"""

JS_STATE = """() => {
  const LG = window.LiteGraph;
  return window.app.graph.nodes.map(n => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!LG.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, type: w.type})),
    widgets_values: n.serialize().widgets_values ?? null,
    has_errors: !!n.has_errors,
    size: Array.from(n.size),
  }));
}"""

JS_DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 2000))"""
JS_CLOSE_DIALOGS = """() => { document.querySelectorAll('.p-dialog .p-dialog-close-button, .p-dialog [aria-label="Close"]')
  .forEach(b => b.click()); return true; }"""
# alerts (PrimeVue toasts) the frontend shows, e.g. "Invalid workflow against zod schema"; closed after reading
JS_TOASTS = """() => {
  const texts = Array.from(document.querySelectorAll('.p-toast-message')).map(t => t.innerText.replace(/\\s+/g, ' ').trim());
  document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach(b => b.click());
  return texts;
}"""

# every node's box (title bar included) in window pixels through the canvas' current view, and which of a few
# points of it are covered by something that is not the graph (the page's bars, menus, dialogs) or off-window
JS_VIEW = """() => {
  const c = window.app.canvas, ds = c.ds, el = c.canvas, r = el.getBoundingClientRect();
  const graphOwns = (e) => e === el || !!e?.closest?.('.dom-widget') || e?.tagName === 'TEXTAREA';
  const nodes = window.app.graph.nodes.map(n => {
    const b = n.getBounding();
    const x0 = (b[0] + ds.offset[0]) * ds.scale + r.left, y0 = (b[1] + ds.offset[1]) * ds.scale + r.top;
    const x1 = x0 + b[2] * ds.scale, y1 = y0 + b[3] * ds.scale;
    const points = [[x0 + 2, y0 + 2], [x1 - 2, y0 + 2], [x0 + 2, y1 - 2], [x1 - 2, y1 - 2], [(x0 + x1) / 2, y0 + 8]];
    const covered = [];
    for (const [x, y] of points) {
      const e = (x < 0 || y < 0 || x > window.innerWidth || y > window.innerHeight) ? null : document.elementFromPoint(x, y);
      if (!graphOwns(e)) covered.push(e ? `${e.tagName.toLowerCase()}.${String(e.className).split(' ')[0]}` : 'off-window');
    }
    return {id: n.id, type: n.type, title: n.title, rect: [x0, y0, x1, y1].map(Math.round), covered};
  });
  return {scale: ds.scale, window: [window.innerWidth, window.innerHeight], nodes};
}"""

JS_OVERLAPS = """() => {
  const rect = (n) => { const b = n.getBounding(); return [b[0], b[1], b[0] + b[2], b[1] + b[3]]; };
  const nodes = window.app.graph.nodes, out = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = rect(nodes[i]), b = rect(nodes[j]);
    const ix = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), iy = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
    if (ix > 0 && iy > 0)
      out.push(`${nodes[i].title} (${nodes[i].type}#${nodes[i].id}) and ${nodes[j].title} (${nodes[j].type}#${nodes[j].id}) overlap by ${Math.round(ix)}x${Math.round(iy)} px`);
  }
  return out;
}"""

MISSING_MODELS_TEXT = "following models were not found"  # the Missing Models dialog's message
DOWNLOAD_REFUSED = ("Download not allowed", "Only allowed suffixes", "Invalid directory")


def expected_missing_models(workflow: dict, root: Path) -> list[str]:
    """'<directory> / <name>' of each download the file names (node.properties.models) that the root does not have:
    what the frontend's Missing Models dialog must list."""
    missing = []
    for n in workflow["nodes"]:
        for m in (n.get("properties") or {}).get("models") or []:
            if m["name"] in (n.get("widgets_values") or []) and not (root / "models" / m["directory"] / m["name"]).exists():
                missing.append(f"{m['directory']} / {m['name']}")
    return sorted(set(missing))


def check_dialogs(page, workflow: dict, name: str, root: Path) -> list[str]:
    """No dialog on load, except the Missing Models dialog where the file names downloads the root lacks: that one
    must list exactly those, each offered for download (no 'not allowed' / 'invalid directory' line). Closed after."""
    page.wait_for_timeout(300)
    dialogs = page.evaluate(JS_DIALOGS)
    expected = expected_missing_models(workflow, root)
    models = [d for d in dialogs if MISSING_MODELS_TEXT in d]
    others = [d for d in dialogs if MISSING_MODELS_TEXT not in d]
    check(not others, f"{name}: the page opened a dialog on load: {others}")
    if not expected:
        check(not models, f"{name}: a Missing Models dialog for a workflow that names no absent download: {models}")
        return []
    check(len(models) == 1, f"{name}: expected a Missing Models dialog listing {expected}, the page shows {dialogs}")
    text = models[0]
    listed = sorted(line.strip() for line in text.splitlines() if " / " in line and line.strip().endswith(".safetensors"))
    check(listed == expected, f"{name}: the Missing Models dialog lists {listed}, expected {expected}:\n{text}")
    refused = [r for r in DOWNLOAD_REFUSED if r in text]
    check(not refused, f"{name}: the Missing Models dialog refuses a download ({refused}):\n{text}")
    page.evaluate(JS_CLOSE_DIALOGS)
    page.keyboard.press("Escape")
    page.wait_for_function("() => !document.querySelector('.p-dialog')", timeout=5000)
    return listed


def check_alerts(page, name: str, warn_only: bool, warnings: list) -> None:
    toasts = [t for t in page.evaluate(JS_TOASTS) if t]
    if not toasts:
        return
    message = f"{name}: the page showed alerts on load: {toasts}"
    check(warn_only, message)
    warnings.append(message)


def check_in_view(page, name: str) -> dict:
    """Every node, title bar included, drawn inside the window and not under the page's own bars."""
    view = page.evaluate(JS_VIEW)
    hidden = [f"{n['title']} ({n['type']}#{n['id']}) at {n['rect']} under {sorted(set(n['covered']))}" for n in view["nodes"] if n["covered"]]
    check(not hidden, f"{name}: not the whole graph in view when opened (zoom {view['scale']:.3f}, window {view['window']}):\n  "
          + "\n  ".join(hidden))
    return view


def widget_names(node_info: dict) -> list[str]:
    """The node's widget inputs in definition order (what the frontend creates, and fills positionally)."""
    names = []
    for section in ("required", "optional"):
        for name, spec in (node_info["input"].get(section) or {}).items():
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("forceInput"):
                continue
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                names.append(name)
    return names


def close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return a == b


def check_page_graph(page, workflow: dict, name: str, node_info: dict) -> list[str]:
    """No missing node, no red node, and each pack node's widgets hold the file's values, by widget name."""
    missing_hook = page.evaluate("() => window.__e2eMissing")
    state = page.evaluate(JS_STATE)
    unregistered = sorted({n["type"] for n in state if not n["registered"]})
    check(not missing_hook and not unregistered, f"{name}: missing node types in the page: hook {missing_hook}, unregistered {unregistered}")
    check(len(state) == len(workflow["nodes"]), f"{name}: page has {len(state)} nodes, the file {len(workflow['nodes'])}")
    by_id = {n["id"]: n for n in state}
    checked = []
    for node in workflow["nodes"]:
        if node["type"] not in PACK_NODES:
            continue
        page_node = by_id.get(node["id"])
        check(page_node is not None and page_node["type"] == node["type"], f"{name}: node {node['id']} ({node['type']}) not in the page")
        info = node_info[node["type"]]
        check(not page_node["has_errors"], f"{name}: node {node['id']} ({node['type']}) is flagged with errors in the page")
        expected_title = node.get("title") or info["display_name"]
        check(page_node["title"] == expected_title,
              f"{name}: node {node['id']} shows title {page_node['title']!r}, expected {expected_title!r}")
        names = widget_names(info)
        page_widgets = {w["name"]: w["value"] for w in page_node["widgets"]}
        check(list(page_widgets)[: len(names)] == names,
              f"{name}: node {node['id']} ({node['type']}) widgets in the page {list(page_widgets)} != schema {names}")
        file_values = node.get("widgets_values") or []
        check(len(file_values) == len(names),
              f"{name}: node {node['id']} ({node['type']}) has {len(file_values)} widget values in the file, the node "
              f"has {len(names)} widgets {names}")
        for wname, value in zip(names, file_values):
            check(close(page_widgets[wname], value),
                  f"{name}: node {node['id']} ({node['type']}) widget {wname!r} is {page_widgets[wname]!r} in the page, "
                  f"{value!r} in the file")
        sv = page_node["widgets_values"] or []
        check(len(sv) == len(file_values) and all(close(a, b) for a, b in zip(sv, file_values)),
              f"{name}: node {node['id']} ({node['type']}) re-serialises as {sv}, the file has {file_values}")
        checked.append(f"{node['type']}#{node['id']}")
    semantic_checks(workflow, name, by_id)
    return checked


def semantic_checks(workflow: dict, name: str, by_id: dict) -> None:
    """Values that only make sense in the right widget: catches a file whose values are in a different order."""
    def widget(node_id, wname):
        return next(w["value"] for w in by_id[node_id]["widgets"] if w["name"] == wname)

    links = {link[0]: link for link in workflow["links"]}
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        t, i = node["type"], node["id"]
        if t == "NestedAttentionBindToken":
            word, occ = widget(i, "word"), widget(i, "occurrence")
            check(isinstance(word, str) and word and " " not in word.strip(), f"{name}: Bind Token #{i} word is {word!r}")
            check(isinstance(occ, int) and occ >= 0, f"{name}: Bind Token #{i} occurrence is {occ!r}")
            # the word must be in the prompt that feeds it (through other Bind Tokens)
            src = node
            while src["type"] != "NestedAttentionEncodePrompt":
                link = next(s["link"] for s in src["inputs"] if s["name"] == "conditioning")
                src = nodes[links[link][1]]
            text = widget(src["id"], "text")
            check(word in text.replace(",", " ").split(), f"{name}: Bind Token #{i} word {word!r} is not a word of its prompt {text!r}")
            check(occ <= text.replace(",", " ").split().count(word), f"{name}: Bind Token #{i} binds occurrence {occ} of {word!r}")
        elif t == "NestedAttentionScale":
            lam = widget(i, "scale")
            check(isinstance(lam, (int, float)) and 1.0 <= lam <= 10.0, f"{name}: λ #{i} is {lam!r}")
        elif t == "NestedAttentionApply":
            s, e = widget(i, "start_percent"), widget(i, "end_percent")
            check(0.0 <= s <= e <= 1.0, f"{name}: Apply #{i} start/end are {s!r}/{e!r}")


def compare_api_prompt(page_prompt: dict, expected: dict, name: str) -> None:
    """The page's own graphToPrompt output against workflows/run.py's ui_to_api for the same file."""
    check(set(page_prompt) == set(expected), f"{name}: page prompt nodes {sorted(page_prompt)} != ui_to_api {sorted(expected)}")
    diffs = []
    for nid, exp in expected.items():
        got = page_prompt[nid]
        if got["class_type"] != exp["class_type"]:
            diffs.append(f"node {nid}: class {got['class_type']} != {exp['class_type']}")
            continue
        gi, ei = got["inputs"], exp["inputs"]
        for key in sorted(set(gi) | set(ei)):
            a, b = gi.get(key, "<absent>"), ei.get(key, "<absent>")
            if isinstance(a, list) and isinstance(b, list):
                a, b = [str(a[0]), a[1]], [str(b[0]), b[1]]
            if not close(a, b):
                diffs.append(f"node {nid} ({exp['class_type']}).{key}: page {a!r} != ui_to_api {b!r}")
    check(not diffs, f"{name}: the page's API prompt differs from workflows/run.py ui_to_api:\n  " + "\n  ".join(diffs))

