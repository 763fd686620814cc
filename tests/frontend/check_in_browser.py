"""End-to-end check of this pack in the real ComfyUI web frontend, in headless Chromium (run by scripts/test.sh
when a Chromium is there; CI installs one).

    .venv/bin/python tests/frontend/check_in_browser.py [--keep] [--screenshots DIR]

What it does (see tests/frontend/README.md):
1. builds a throw-away ComfyUI root: a copy of the host tree, this pack (its git-tracked files) in
   custom_nodes/, a generated test-only pack registering the tiny loaders of training/tiny.py, the
   demo world's photos and test photos under input/, tiny stand-ins for one SDXL workflow's files;
2. starts ComfyUI's own server on a free port (CPU), checks every pack node is registered, the log
   has no import failure, and the template API lists and serves every workflow and its thumbnail;
3. for each shipped workflow, in a 1280x720 window: loads it as the template browser does; no missing
   node type, no dialog or alert (an SDXL workflow's Missing Models dialog must list exactly the public
   files the test root lacks, each offered for download), every node in view as opened (not off-window,
   not under the page's bars), the pack nodes' widgets hold the file's values, the page's API prompt
   equals workflows/run.py's conversion; screenshot as opened;
4. queues every demo-world workflow from the page as shipped: success, its images on disk and shown in
   its Save Image node; screenshot; and one SDXL workflow on tiny stand-ins (loaders swapped, latent and
   steps shrunk through the page's widgets), the same checks;
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
from page_checks import (  # noqa: E402
    JS_DIALOGS, JS_LOAD, JS_OVERLAPS, JS_SETUP, JS_STATE, PACK_NODES, check_alerts, check_dialogs, check_in_view,
    check_page_graph, compare_api_prompt,
)
from workflows.run import TINY_MAX_SIDE, TINY_MAX_STEPS, TINY_SWAPS  # noqa: E402

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
TINY_NODES = sorted(set(TINY_SWAPS.values()))
TINY_RUNS = ["nested_attention_single_subject.json"]  # SDXL graphs queued from the page on tiny stand-ins
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 720}  # the window the workflows' saved views are made for (workflows/build.py)


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
    """The template browser's API lists the pack's workflows/ folder and serves each file unchanged, and the
    thumbnail the frontend asks for (`<name>.jpg` beside it)."""
    templates = server.get("/api/workflow_templates")
    expected = sorted(p.stem for p in WORKFLOWS)
    check(sorted(templates.get(PACK_DIR_NAME, [])) == expected,
          f"GET /api/workflow_templates lists {templates.get(PACK_DIR_NAME)} for {PACK_DIR_NAME}, expected {expected}")
    for p in WORKFLOWS:
        served = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{p.name}")
        check(served == json.loads(p.read_text()), f"the served template {p.name} differs from the repo's file")
        thumbnail = server.get(f"/api/workflow_templates/{PACK_DIR_NAME}/{p.stem}.jpg")
        check(thumbnail == p.with_suffix(".jpg").read_bytes(), f"the thumbnail {p.stem}.jpg is not served as the repo's file")


# --- runs queued from the page -------------------------------------------------------------------------------------
def tiny_ui_variant(workflow: dict) -> dict:
    """The UI workflow with the stock loaders swapped for the tiny ones (same outputs, same links)."""
    wf = json.loads(json.dumps(workflow))
    for node in wf["nodes"]:
        if node["type"] in TINY_SWAPS:
            node["type"] = TINY_SWAPS[node["type"]]
            node["widgets_values"] = [0, "fixed"]  # seed + the control_after_generate the frontend adds to 'seed'
            node.get("properties", {}).pop("Node name for S&R", None)
            node.get("properties", {}).pop("models", None)
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


def queue_from_page(page, server: Server, root: Path, name: str, shots: Path, shot_name: str) -> dict:
    """Queue the graph in the page (`app.queuePrompt`), wait for its /history entry: success, images on disk and
    shown in their Save Image node; screenshot."""
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
                raise CheckFailed(f"{name}: nothing was queued/executed (validation error?); dialogs: {dialogs}\n{server.log_tail(30)}")
        time.sleep(0.5)
    else:
        raise CheckFailed(f"{name}: not completed after 300 s\n{server.log_tail(30)}")
    seconds = time.time() - t0
    status = entry.get("status", {})
    errors = page.evaluate("() => window.__e2eErrors")
    check(status.get("status_str") == "success" and status.get("completed"),
          f"{name}: status {status.get('status_str')}: {json.dumps(status.get('messages'))[:3000]} page errors {errors}")
    images, save_ids = [], []
    for nid, out in entry.get("outputs", {}).items():
        for img in out.get("images", []):
            if img.get("type") == "output":
                images.append(root / "output" / img.get("subfolder", "") / img["filename"])
                save_ids.append(nid)
    check(images, f"{name}: no output image in /history outputs {entry.get('outputs')}")
    for path in images:
        check(path.is_file() and path.stat().st_size > 0, f"{name}: saved image {path} does not exist")
    for nid in set(save_ids):
        try:
            page.wait_for_function("(id) => (window.app.graph.getNodeById(Number(id))?.imgs?.length ?? 0) > 0", arg=nid, timeout=30000)
        except Exception:
            info = page.evaluate("""(id) => { const n = window.app.graph.getNodeById(Number(id));
              return {found: !!n, imgs: n?.imgs?.length ?? null, outputs: JSON.stringify(window.app.nodeOutputs?.[id] ?? null)}; }""", nid)
            raise CheckFailed(f"{name}: the Save Image node {nid} shows no image in the page (node.imgs empty): {info}") from None
    page.wait_for_timeout(800)
    shot = shots / shot_name
    page.screenshot(path=str(shot))
    return {"prompt_id": pid, "seconds": seconds, "images": [str(p) for p in images], "screenshot": str(shot), "prompt": entry["prompt"][2]}


def run_tiny(page, server: Server, root: Path, workflow: dict, name: str, shots: Path, warn_only: bool, warnings: list) -> dict:
    wf = tiny_ui_variant(workflow)
    page.evaluate(JS_LOAD, [wf, f"tiny_{Path(name).stem}"])
    check(not page.evaluate(JS_DIALOGS), f"tiny {name}: a dialog on load: {page.evaluate(JS_DIALOGS)}")
    check_alerts(page, f"tiny {name}", warn_only, warnings)
    state = page.evaluate(JS_STATE)
    missing = page.evaluate("() => window.__e2eMissing")
    unregistered = sorted({n["type"] for n in state if not n["registered"]})
    check(not missing and not unregistered, f"tiny {name}: missing node types {missing or unregistered}")
    changed = page.evaluate(JS_SHRINK, [TINY_MAX_SIDE, TINY_MAX_STEPS])
    page_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    for node in page_prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            check(max(node["inputs"]["width"], node["inputs"]["height"]) <= TINY_MAX_SIDE, f"tiny {name}: latent not shrunk: {node}")
        if node["class_type"] == "KSampler":
            check(node["inputs"]["steps"] <= TINY_MAX_STEPS, f"tiny {name}: steps not capped: {node}")
    check(not any(n["class_type"] in TINY_SWAPS for n in page_prompt.values()), f"tiny {name}: a stock loader is still in the prompt")
    result = queue_from_page(page, server, root, f"tiny {name}", shots, f"{Path(name).stem}_tiny_run.png")
    check(any(n["class_type"] == "TinySDXLCheckpointLoader" for n in result["prompt"].values()), f"tiny {name}: the run did not use the tiny loader")
    return {**result, "changed": changed}


# --- main -------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", action="store_true", help="keep the temp ComfyUI root (server log, output/, screenshots)")
    p.add_argument("--screenshots", type=Path, help="where to write the screenshots and the server log (default: "
                   "<temp root>/screenshots, removed at the end unless --keep)")
    p.add_argument("--timeout", type=float, default=180, help="seconds to wait for the server to be ready")
    p.add_argument("--warn-on-alerts", action="store_true", help="report alerts the page shows on loading a workflow "
                   "(e.g. 'Invalid workflow against zod schema') as warnings instead of failing")
    return p.parse_args(argv)


def check_workflow(page, server, root, path: Path, node_info: dict, api_prompts: dict, shots: Path, args, warnings: list, summary: list):
    name = path.name
    # load what the template browser would load: the file as the server serves it
    workflow = page.evaluate("async (u) => (await fetch(u)).json()", f"/api/workflow_templates/{PACK_DIR_NAME}/{name}")
    check(workflow == json.loads(path.read_text()), f"{name}: the page fetched a different file")
    page.evaluate(JS_LOAD, [workflow, path.stem])
    offered = check_dialogs(page, workflow, name, root)
    check_alerts(page, name, args.warn_on_alerts, warnings)
    checked = check_page_graph(page, workflow, name, node_info)
    view = check_in_view(page, name)
    page_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    compare_api_prompt(page_prompt, api_prompts[name], name)
    warnings.extend(f"{name}: {o}" for o in page.evaluate(JS_OVERLAPS))  # cosmetic: reported, not failed
    shot = shots / f"{path.stem}.png"
    page.screenshot(path=str(shot))
    line = (f"{name}: 0 missing nodes, no dialog" + (f" but Missing Models, which offers {offered}" if offered else "")
            + f", all {len(view['nodes'])} nodes in view at zoom {view['scale']:.3f}, {len(checked)} pack nodes' widgets = file, "
            f"page prompt = ui_to_api; {shot.name}")
    say(line)
    summary.append(line)
    return workflow


def run_workflow_in_page(page, server, root, path: Path, workflow: dict, shots: Path, args, warnings: list, summary: list):
    """The demo world's graphs run as shipped, on its own files; an SDXL graph of TINY_RUNS on tiny stand-ins."""
    name = path.name
    if uses_world(workflow):
        page.evaluate(JS_LOAD, [workflow, path.stem])
        result = queue_from_page(page, server, root, name, shots, f"{path.stem}_run.png")
        line = (f"{name} queued from the page: success in {result['seconds']:.1f} s, {len(result['images'])} image(s) on disk "
                f"and shown in Save Image; {Path(result['screenshot']).name}")
    else:
        result = run_tiny(page, server, root, workflow, name, shots, args.warn_on_alerts, warnings)
        line = (f"{name} on tiny stand-ins, queued from the page: success in {result['seconds']:.1f} s, image shown; "
                f"changed {result['changed']}; {Path(result['screenshot']).name}")
    say(line)
    summary.append(line)


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
        root, api_prompts, _ = build_root(tmp, python, tiny=TINY_RUNS, settings={
            "Comfy.TutorialCompleted": True,  # else a templates dialog covers the page
            "Comfy.Minimap.Visible": False,  # it would cover part of the graph in the screenshots
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
        summary.append(f"template API: lists {len(WORKFLOWS)} workflows of {PACK_DIR_NAME}, serves each file and its .jpg thumbnail unchanged")

        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                str(tmp / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT,
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
                browser = page.evaluate("() => navigator.userAgent").split("Chrome/")[-1].split()[0]
                say(f"page ready; frontend {frontend}, Chromium {browser}")
                summary.append(f"page: ComfyUI frontend {frontend} in headless Chromium {browser}, window {VIEWPORT['width']}x{VIEWPORT['height']}")
                # every workflow as opened first: a run leaves a "job completed" panel over the canvas' top right
                loaded = {path: check_workflow(page, server, root, path, node_info, api_prompts, shots, args, warnings, summary)
                          for path in WORKFLOWS}
                for path, workflow in loaded.items():
                    if uses_world(workflow) or path.name in TINY_RUNS:
                        run_workflow_in_page(page, server, root, path, workflow, shots, args, warnings, summary)
            finally:
                ctx.close()
    except CheckFailed as e:
        failure = str(e)
    except Exception:  # noqa: BLE001 - an unexpected error is a failure with its traceback
        failure = traceback.format_exc()
    finally:
        if server is not None:
            server.stop()
            if server.log_path.exists():
                shutil.copy2(server.log_path, shots / "server.log")
        if not args.keep:
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
