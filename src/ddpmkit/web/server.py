"""The page as a running server: queued, bound to loopback by default, offline.

    ddpmkit serve runs/mnist runs/mnist_class      # http://127.0.0.1:7860
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

import gradio as gr

from ..errors import UserError
from .actions import Actions
from .app import CSS, build_app
from .limits import Limits
from .shelf import Shelf, find_runs

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls


def make_page(runs: list[str | Path], limits: Limits | None = None, concurrency: int = 1,
              work_dir: str | Path | None = None, loras: list[str] | None = None, device: str | None = None) -> tuple[gr.Blocks, Actions]:
    """The queued gradio app serving the diffusion runs in or under `runs` (with `loras`, "FILE:SCALE", merged into
    each), and its Actions."""
    skipped: list[str] = []
    found = find_runs(runs, skipped)
    if not found:
        raise FileNotFoundError(f"no diffusion runs of images in or under {[str(r) for r in runs]}; train one (ddpmkit train mnist) "
                                "or name its folder" + (f"; not served: {'; '.join(skipped)}" if skipped else ""))
    for why in skipped:
        print(f"ddpmkit serve: not serving {why}", flush=True)
    actions = Actions(Shelf(found, loras, device), limits, work_dir)
    actions.warm_up()
    app = build_app(actions, concurrency)
    app.queue(max_size=64, default_concurrency_limit=concurrency)
    return app, actions


def serve(runs: list[str | Path], host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None, concurrency: int = 1,
          block: bool = True, loras: list[str] | None = None, device: str | None = None) -> gr.Blocks:
    """Start the page on host:port. block=False returns the running app (app.close() stops it)."""
    limits = limits or Limits()
    app, actions = make_page(runs, limits, concurrency, loras=loras, device=device)
    atexit.register(actions.close)
    print(f"ddpmkit serve: the requests' files under {actions.work_dir}, each kept {limits.keep_files_s // 60} min, all removed when the "
          "page stops", flush=True)
    try:
        app.launch(server_name=host, server_port=port, max_file_size=limits.max_upload_bytes, allowed_paths=[str(actions.work_dir)],
                   ssr_mode=False, show_error=True, css=CSS, prevent_thread_lock=not block, inbrowser=False)
    except OSError as e:  # gradio tries the one port it is given: busy, or an address this machine does not have
        actions.close()
        raise UserError(f"cannot serve on {host}:{port}: the port is in use or the address is not this machine's; choose another "
                        "with --port (or --host)") from e
    return app
