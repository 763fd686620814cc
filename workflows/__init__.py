"""Example workflows (UI format, for the ComfyUI frontend) and a headless runner: `python -m workflows.run FILE.json`."""
