"""``python -m dreambooth ui``: the Dreambooth tab served on its own, without a WebUI.

The page is the same tab the WebUI shows, with the same page script and style sheet (which the WebUI itself
would put into the page), and the HTTP API routes beside it when ``dreambooth/api.py`` is there. This module is
light to import: gradio, FastAPI and uvicorn are imported only when the server is built.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

EXTENSION_DIR = Path(__file__).resolve().parents[2]
PAGE_SCRIPT = EXTENSION_DIR / "javascript" / "dreambooth.js"
STYLE_SHEET = EXTENSION_DIR / "style.css"

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def head_html() -> str:
    """The ``<script>`` and ``<style>`` the WebUI would add for an extension: our page script and style sheet."""
    parts = []
    if STYLE_SHEET.is_file():
        parts.append(f"<style>\n{STYLE_SHEET.read_text(encoding='utf-8')}\n</style>")
    else:
        log.warning("%s is missing: the tab is shown without its style sheet", STYLE_SHEET)
    if PAGE_SCRIPT.is_file():
        script = PAGE_SCRIPT.read_text(encoding="utf-8").replace("</script", "<\\/script")
        parts.append(f"<script>\n{script}\n</script>")
    else:
        log.warning("%s is missing: progress is not refreshed live", PAGE_SCRIPT)
    return "\n".join(parts)


class InjectHead:
    """ASGI middleware that puts ``html`` before ``</head>`` of every HTML page (gradio's page has no hook for it
    in 3.x)."""

    def __init__(self, app: Callable[..., Awaitable[None]], html: str) -> None:
        self.app = app
        self.html = html.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or not self.html:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []

        async def send_injected(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = {k.lower(): v for k, v in message.get("headers", [])}
                if headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers:
                    start = message
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks).replace(b"</head>", self.html + b"</head>", 1)
                headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_injected)


def _mount_api(app: Any, host: Any) -> bool:
    """Add the HTTP API routes (``dreambooth/api.py``'s ``add_routes``) to ``app`` when that module is there."""
    if importlib.util.find_spec(f"{__package__.rsplit('.', 1)[0]}.api") is None:
        log.info("no dreambooth/api.py: serving the tab without the HTTP API")
        return False
    from .. import api

    api.add_routes(app, host)
    return True


def build_app(host: Any, *, api: bool = True) -> Any:
    """The ASGI app: the API routes (first, so they win), the tab at ``/``, our script and style in the page."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from fastapi import FastAPI

    from . import compat
    from .tab import build_tab

    demo = build_tab(host)
    compat.queue(demo)
    app = FastAPI(title="Dreambooth")
    if api:
        _mount_api(app, host)
    app = compat.mount(app, demo, "/")
    return InjectHead(app, head_html())


def serve(host: Any, port: int = 7860, listen: str = "127.0.0.1", *, api: bool = True) -> None:
    """Serve until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the standalone UI needs gradio, fastapi and uvicorn",
                        "install them: pip install -r requirements/host.txt (or current.txt)") from None
    app = build_app(host, api=api)
    print(f"Dreambooth UI on http://{listen}:{port} (models root {host.models_root()})", flush=True)
    uvicorn.run(app, host=listen, port=port, log_level="warning")


def add_ui_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``ui`` subcommand to ``python -m dreambooth``."""
    p = subparsers.add_parser("ui", help="serve the Dreambooth tab in a browser, without a WebUI",
                              description="Serves the same tab the WebUI shows, with the HTTP API beside it. "
                                          "Checkpoints are listed from <models root>/Stable-diffusion.")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--listen", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 makes it reachable from other machines)")
    p.add_argument("--models-root", metavar="DIR",
                   help="models root (default: $DREAMBOOTH_MODELS_ROOT or ./models); model dirs live in "
                        "DIR/dreambooth/<name>")
    p.add_argument("--device", help="torch device for training, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--no-api", action="store_true", help="do not serve the HTTP API routes")
    return p


def cmd_ui(args: argparse.Namespace) -> int:
    from ..host.standalone import StandaloneHost

    if importlib.util.find_spec("gradio") is None:
        raise UserError("gradio is not installed", "pip install -r requirements/host.txt (or current.txt)")
    serve(StandaloneHost(args.models_root, args.device), args.port, args.listen, api=not args.no_api)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dreambooth.ui.app``: the ``ui`` command on its own."""
    parser = argparse.ArgumentParser(prog="python -m dreambooth.ui.app")
    sub = parser.add_subparsers(dest="command")
    add_ui_command(sub)
    args = parser.parse_args(["ui", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return cmd_ui(args)
    except UserError as err:
        print(f"error: {err.message}")
        if err.hint:
            print(f"hint: {err.hint}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
