"""End-to-end check of this pack in the real ComfyUI web frontend, in headless Chromium (opt-in, not pytest).

    .venv/bin/python tests/frontend/check_in_browser.py [--keep] [--screenshots DIR]

What it does (see tests/frontend/README.md):
1. builds a throw-away ComfyUI root: a copy of the host tree, this pack (its git-tracked files) in
   custom_nodes/, a generated test-only pack registering the tiny loaders of training/tiny.py, tiny
   nested-attention weights under models/nested_attention and test photos under input/, with the
   names the shipped workflows use;
2. starts ComfyUI's own server on a free port (CPU) and checks every pack node is registered and
   the log has no import failure;
3. for each shipped workflow: opens the page, loads the workflow as served by the template browser
   route, asserts no missing node types, that the pack nodes' widgets hold the file's values, that
   the page's API prompt equals workflows/run.py's conversion; screenshot;
4. loads a tiny variant (stock loaders swapped for the tiny ones), shrinks the latent and the step
   count in the page's widgets, queues it from the page, waits for /history, asserts success, the
   saved image on disk and the SaveImage preview in the page; screenshot;
5. stops the server and removes the temp root (unless --keep). Exit status 1 on any failure.

Needs: playwright (python package, no downloaded browsers) and a system Chromium (/usr/bin/chromium).
Never run `playwright install` for this.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# appended, never in front: workflows.run's constants (stdlib-only import) and the shared server harness
sys.path.extend([str(REPO), str(REPO / "tests")])

from comfy_server import (  # noqa: E402
    PACK_DIR_NAME, TEST_PACK_DIR_NAME, WORKFLOWS, CheckFailed, Server, build_root, check, uses_world, venv_python,
)
from workflows.run import TINY_MAX_SIDE, TINY_MAX_STEPS, TINY_SWAPS  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PACK_NODES = [
    "NestedAttentionLoader", "NestedAttentionEncodePrompt", "NestedAttentionEncodeSubject",
    "NestedAttentionCombineSubjects", "NestedAttentionScale", "NestedAttentionBindToken", "NestedAttentionApply",
]
TINY_NODES = sorted(set(TINY_SWAPS.values()))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1600, "height": 1000}


def say(message: str) -> None:
    print(message, flush=True)


def check_server(server: Server) -> dict:
    """Every pack node (and the tiny loaders) registered; no import failure logged for either pack."""
    info = {}
    for node_id in PACK_NODES + TINY_NODES:
        data = server.get(f"/object_info/{node_id}")
        check(isinstance(data, dict) and node_id in data, f"/object_info/{node_id} does not list the node (not registered)")
        info[node_id] = data[node_id]
    failures = server.import_failures()
    check(not failures, "import failure logged for a pack:\n" + "\n".join(failures) + "\n" + server.log_tail())
    check("nested_attention" in str(server.get("/models")), "GET /models does not list the 'nested_attention' model folder")
    return info


def check_templates(server: Server) -> None:
    """The template browser's API lists the pack's workflows/ folder and serves the files unchanged."""
    templates = server.get("/api/workflow_templates")
    expected = sorted(p.stem for p in WORKFLOWS)
    check(sorted(templates.get(PACK_DIR_NAME, [])) == expected,
          f"GET /api/workflow_templates lists {templates.get(PACK_DIR_NAME)} for {PACK_DIR_NAME}, expected {expected}")
    for p in WORKFLOWS:
        served = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{p.name}")
        check(served == json.loads(p.read_text()), f"the served template {p.name} differs from the repo's file")


# --- the page -------------------------------------------------------------------------------------------------
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

JS_LOAD = """async ([wf, name]) => {
  window.__e2eMissing = [];
  await window.app.loadGraphData(wf, true, true, name);
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

JS_FIT = """async () => {
  try { await window.app.extensionManager?.command?.execute('Comfy.Canvas.FitView'); }
  catch (e) { try { window.app.canvas.ds.reset(); } catch (_) {} }
  window.app.canvas.setDirty(true, true);
  await new Promise(r => setTimeout(r, 600));
  return true;
}"""

JS_DIALOGS = """() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText.slice(0, 400))"""
# alerts (PrimeVue toasts) the frontend shows, e.g. "Invalid workflow against zod schema"; closed after reading
JS_TOASTS = """() => {
  const texts = Array.from(document.querySelectorAll('.p-toast-message')).map(t => t.innerText.replace(/\\s+/g, ' ').trim());
  document.querySelectorAll('.p-toast-message .p-toast-close-button').forEach(b => b.click());
  return texts;
}"""


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


JS_OVERLAPS = """() => {
  const rect = (n) => { const b = n.boundingRect ?? n.getBounding(); return [b[0], b[1], b[0] + b[2], b[1] + b[3]]; };
  const nodes = window.app.graph.nodes, out = [];
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = rect(nodes[i]), b = rect(nodes[j]);
    const ix = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), iy = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
    if (ix > 0 && iy > 0)
      out.push(`${nodes[i].title} (${nodes[i].type}#${nodes[i].id}) and ${nodes[j].title} (${nodes[j].type}#${nodes[j].id}) overlap by ${Math.round(ix)}x${Math.round(iy)} px`);
  }
  return out;
}"""


def check_alerts(page, name: str, warn_only: bool, warnings: list) -> None:
    toasts = [t for t in page.evaluate(JS_TOASTS) if t]
    if not toasts:
        return
    message = f"{name}: the page showed alerts on load: {toasts}"
    check(warn_only, message)
    warnings.append(message)


def check_page_graph(page, workflow: dict, name: str, node_info: dict) -> list[str]:
    """No missing node, no red node, and each pack node's widgets hold the file's values, by widget name."""
    missing_hook = page.evaluate("() => window.__e2eMissing")
    state = page.evaluate(JS_STATE)
    unregistered = sorted({n["type"] for n in state if not n["registered"]})
    dialogs = [d for d in page.evaluate(JS_DIALOGS) if "missing" in d.lower()]
    check(not missing_hook and not unregistered and not dialogs,
          f"{name}: missing node types in the page: hook {missing_hook}, unregistered {unregistered}, dialogs {dialogs}")
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
        checked.append(f"{node['type']}#{node['id']} " + ", ".join(f"{k}={page_widgets[k]!r}" for k in names))
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
            check(word in text.split() or word in text.replace(",", " ").split(),
                  f"{name}: Bind Token #{i} word {word!r} is not a word of its prompt {text!r}")
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


def tiny_ui_variant(workflow: dict) -> dict:
    """The UI workflow with the stock loaders swapped for the tiny ones (same outputs, same links)."""
    wf = json.loads(json.dumps(workflow))
    for node in wf["nodes"]:
        if node["type"] in TINY_SWAPS:
            node["type"] = TINY_SWAPS[node["type"]]
            node["widgets_values"] = [0, "fixed"]  # seed + the control_after_generate the frontend adds to 'seed'
            node.get("properties", {}).pop("Node name for S&R", None)
    return wf


JS_SHRINK = """([maxSide, maxSteps]) => {
  const changed = [];
  const set = (node, name, value) => {
    const w = node.widgets.find(w => w.name === name);
    w.value = value; w.callback?.(value);
    changed.push(`${node.type}#${node.id}.${name}=${value}`);
  };
  for (const node of window.app.graph.nodes) {
    if (node.type === 'EmptyLatentImage') {
      const w = node.widgets.find(w => w.name === 'width').value, h = node.widgets.find(w => w.name === 'height').value;
      const scale = Math.min(1, maxSide / Math.max(w, h));
      set(node, 'width', Math.max(64, Math.floor(Math.floor(w * scale) / 8) * 8));
      set(node, 'height', Math.max(64, Math.floor(Math.floor(h * scale) / 8) * 8));
    } else if (node.type === 'KSampler' || node.type === 'KSamplerAdvanced') {
      const steps = node.widgets.find(w => w.name === 'steps').value;
      set(node, 'steps', Math.min(steps, maxSteps));
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return changed;
}"""


def run_tiny(page, server: Server, root: Path, workflow: dict, name: str, shots: Path, warn_only: bool, warnings: list) -> dict:
    wf = tiny_ui_variant(workflow)
    page.evaluate(JS_LOAD, [wf, f"tiny_{Path(name).stem}"])
    check_alerts(page, f"tiny {name}", warn_only, warnings)
    page.evaluate(JS_FIT)  # the canvas only draws (and loads previews of) nodes in view
    state = page.evaluate(JS_STATE)
    missing = page.evaluate("() => window.__e2eMissing")
    unregistered = sorted({n["type"] for n in state if not n["registered"]})
    check(not missing and not unregistered, f"tiny {name}: missing node types {missing or unregistered}")
    changed = page.evaluate(JS_SHRINK, [TINY_MAX_SIDE, TINY_MAX_STEPS])
    page_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    for nid, node in page_prompt.items():
        if node["class_type"] == "EmptyLatentImage":
            check(max(node["inputs"]["width"], node["inputs"]["height"]) <= TINY_MAX_SIDE, f"tiny {name}: latent not shrunk: {node}")
        if node["class_type"] == "KSampler":
            check(node["inputs"]["steps"] <= TINY_MAX_STEPS, f"tiny {name}: steps not capped: {node}")
    check(not any(n["class_type"] in TINY_SWAPS for n in page_prompt.values()), f"tiny {name}: a stock loader is still in the prompt")

    before = set(server.get("/history"))
    page.evaluate("() => { window.__e2eErrors = []; }")
    t0 = time.time()
    page.evaluate("async () => { await window.app.queuePrompt(0); return true; }")
    entry, pid = None, None
    while time.time() - t0 < 300:
        history = server.get("/history")
        new = [k for k in history if k not in before]
        if new:
            pid = new[0]
            entry = history[pid]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                break
        else:
            queue = server.get("/queue")
            if not queue.get("queue_running") and not queue.get("queue_pending") and time.time() - t0 > 10:
                dialogs = page.evaluate(JS_DIALOGS)
                raise CheckFailed(f"tiny {name}: nothing was queued/executed (validation error?); dialogs: {dialogs}\n"
                                  f"{server.log_tail(30)}")
        time.sleep(0.5)
    else:
        raise CheckFailed(f"tiny {name}: not completed after 300 s\n{server.log_tail(30)}")
    seconds = time.time() - t0
    status = entry.get("status", {})
    errors = page.evaluate("() => window.__e2eErrors")
    check(status.get("status_str") == "success" and status.get("completed"),
          f"tiny {name}: status {status.get('status_str')}: {json.dumps(status.get('messages'))[:3000]} page errors {errors}")
    executed_prompt = entry["prompt"][2]
    check(any(n["class_type"] == "TinySDXLCheckpointLoader" for n in executed_prompt.values()), f"tiny {name}: the run did not use the tiny loader")
    images, save_ids = [], []
    for nid, out in entry.get("outputs", {}).items():
        for img in out.get("images", []):
            if img.get("type") == "output":
                images.append(root / "output" / img.get("subfolder", "") / img["filename"])
                save_ids.append(nid)
    check(images, f"tiny {name}: no output image in /history outputs {entry.get('outputs')}")
    for path in images:
        check(path.is_file() and path.stat().st_size > 0, f"tiny {name}: saved image {path} does not exist")
    for nid in save_ids:
        try:
            page.wait_for_function("(id) => (window.app.graph.getNodeById(Number(id))?.imgs?.length ?? 0) > 0", arg=nid, timeout=30000)
        except Exception:
            info = page.evaluate("""(id) => { const n = window.app.graph.getNodeById(Number(id));
              return {found: !!n, imgs: n?.imgs?.length ?? null, outputs: JSON.stringify(window.app.nodeOutputs?.[id] ?? null)}; }""", nid)
            raise CheckFailed(f"tiny {name}: the SaveImage node {nid} shows no preview in the page (node.imgs empty): {info}") from None
    page.evaluate(JS_FIT)
    page.wait_for_timeout(800)
    shot = shots / f"{Path(name).stem}_tiny_run.png"
    page.screenshot(path=str(shot))
    return {"prompt_id": pid, "seconds": seconds, "images": [str(p) for p in images], "changed": changed, "screenshot": str(shot)}


# --- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the temp ComfyUI root (server log, output/, screenshots)")
    p.add_argument("--screenshots", type=Path, help="where to write the screenshots (default: <temp root>/screenshots, "
                   "removed at the end unless --keep)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to be ready")
    p.add_argument("--warn-on-alerts", action="store_true", help="report alerts the page shows on loading a workflow "
                   "(e.g. 'Invalid workflow against zod schema') as warnings instead of failing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("FAIL: the python package 'playwright' is not installed in this interpreter "
              f"({sys.executable}); pip install playwright (do not run `playwright install`)", file=sys.stderr)
        return 1
    if not os.access(CHROMIUM, os.X_OK):
        print(f"FAIL: no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM=/path)", file=sys.stderr)
        return 1
    if not WORKFLOWS:
        print("FAIL: no workflows/*.json in the repo", file=sys.stderr)
        return 1

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="nested_attention_e2e_"))
    shots = (args.screenshots or tmp / "screenshots").resolve()
    shots.mkdir(parents=True, exist_ok=True)
    python = venv_python()
    server = None
    summary, failure = [], None
    console_errors: list[str] = []
    warnings: list[str] = []
    try:
        root, api_prompts, _ = build_root(tmp, python, settings={
            "Comfy.TutorialCompleted": True,  # else a templates dialog covers the page
            "Comfy.Minimap.Visible": False,  # it would cover part of the graph in the screenshots
            "LiteGraph.Canvas.MinFontSizeForLOD": 1,  # draw titles and widgets at the fit-to-view zoom (no low-quality mode)
        })
        say(f"temp root {root}: host copy, pack in custom_nodes/{PACK_DIR_NAME} + {TEST_PACK_DIR_NAME}")
        server = Server(root, python)
        ready = server.start(args.timeout)
        stats = server.get("/system_stats")["system"]
        say(f"server ready on {server.url} in {ready:.1f} s (ComfyUI {stats.get('comfyui_version')}, "
            f"python {stats.get('python_version', '').split()[0]})")
        node_info = check_server(server)
        summary.append(f"registered: {', '.join(PACK_NODES)} + tiny {', '.join(TINY_NODES)}; no import failure in the log")
        check_templates(server)
        summary.append(f"template API: /api/workflow_templates lists {PACK_DIR_NAME}: {[p.stem for p in WORKFLOWS]}, files served unchanged")

        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                viewport=VIEWPORT,
            )
            try:
                ctx.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")
                page = ctx.pages[0] if ctx.pages else ctx.new_page()
                page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: console_errors.append(f"pageerror: {e}"))
                page.goto(server.url, wait_until="domcontentloaded", timeout=60000)
                page.wait_for_function("() => window.app?.graph && window.app.canvas && window.LiteGraph", timeout=120000)
                page.wait_for_timeout(1000)
                page.evaluate(JS_SETUP)
                frontend = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? null")
                say(f"page ready; frontend {frontend}")
                browser = page.evaluate("() => navigator.userAgent").split("Chrome/")[-1].split()[0]
                summary.append(f"page: ComfyUI frontend {frontend} in headless Chromium {browser}")

                for path in WORKFLOWS:
                    name = path.name
                    # load what the template browser would load: the file as the server serves it
                    workflow = page.evaluate(
                        "async (u) => (await fetch(u)).json()", f"/api/workflow_templates/{PACK_DIR_NAME}/{name}")
                    check(workflow == json.loads(path.read_text()), f"{name}: the page fetched a different file")
                    page.evaluate(JS_LOAD, [workflow, path.stem])
                    check_alerts(page, name, args.warn_on_alerts, warnings)
                    checked = check_page_graph(page, workflow, name, node_info)
                    page_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
                    compare_api_prompt(page_prompt, api_prompts[name], name)
                    # cosmetic: overlapping nodes (as the page lays them out) are reported, not failed
                    warnings.extend(f"{name}: {o}" for o in page.evaluate(JS_OVERLAPS))
                    page.evaluate(JS_FIT)
                    shot = shots / f"{path.stem}.png"
                    page.screenshot(path=str(shot))
                    say(f"{name}: loaded, 0 missing node types; widgets match the file: " + "; ".join(checked))
                    summary.append(f"{name}: 0 missing nodes, {len(checked)} pack nodes' widgets = file, "
                                   f"page prompt = ui_to_api; screenshot {shot}")

                    if uses_world(workflow):  # the demo world's graphs run on its shipped files (tests/test_server.py)
                        continue
                    result = run_tiny(page, server, root, workflow, name, shots, args.warn_on_alerts, warnings)
                    say(f"{name} (tiny): queued from the page, success in {result['seconds']:.1f} s, saved "
                        f"{[Path(p).name for p in result['images']]}, preview shown; changed {result['changed']}")
                    summary.append(f"{name} tiny run from the page: success in {result['seconds']:.1f} s, image "
                                   f"{[Path(p).name for p in result['images']]} on disk, SaveImage preview in page; "
                                   f"screenshot {result['screenshot']}")
            finally:
                ctx.close()
    except CheckFailed as e:
        failure = str(e)
    except Exception:  # noqa: BLE001 - an unexpected error is a failure with its traceback
        failure = traceback.format_exc()
    finally:
        if server is not None:
            server.stop()
            log_copy = shots / "server.log"
            if server.log_path.exists():
                shutil.copy2(server.log_path, log_copy)
        keep = args.keep
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("=== frontend end-to-end check ===")
    for line in summary:
        print(f"  ok  {line}")
    for w in warnings:
        print(f"  WARN {w}")
    # blocked requests to external hosts (CSP, --disable-api-nodes, no network) are expected noise
    noise = ("Content Security Policy", "net::ERR_NAME_NOT_RESOLVED", "Failed to load resource")
    pack_errors = [c for c in console_errors
                   if ("NestedAttention" in c or "nested_attention" in c) and not any(n in c for n in noise)]
    print(f"  page console errors: {len(console_errors)} (mostly blocked external requests: expected), "
          f"{len(pack_errors)} about the pack")
    for c in pack_errors[:10]:
        print(f"     {c[:300]}")
    if args.keep:
        print(f"  kept: {tmp}")
    if args.screenshots:
        print(f"  screenshots: {shots}")
    print(f"  time: {time.time() - t_start:.0f} s")
    if failure is None and pack_errors:
        failure = "the page logged errors that mention the pack (above)"
    if failure:
        print(f"FAIL: {failure}", file=sys.stderr)
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
