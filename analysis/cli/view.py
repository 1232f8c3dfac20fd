"""`attnscope view STORE`: explore a store in the browser, or export one span's view as a file."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
import webbrowser
from pathlib import Path
from typing import Any

from .. import store_format as sf
from ..errors import UsageError
from .args import opening, positive, storage_options, store_parent

LOOPBACK = "127.0.0.1"


def add_parser(subparsers: Any, verb: str, help: str) -> None:
    """Add `view` to the command line."""
    parser = subparsers.add_parser(verb, parents=[store_parent()], help=help, description=help)
    parser.add_argument(
        "--host", default=LOOPBACK, help=f"address to serve on (default {LOOPBACK})"
    )
    parser.add_argument("--port", type=positive(int), default=8765, help="port (default 8765)")
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser")
    parser.add_argument(
        "--export",
        type=Path,
        metavar="OUT.html",
        help="write a self-contained page of one span (--span) instead of serving",
    )
    parser.add_argument("--span", help="the span of --export (default: the run's first)")
    parser.add_argument(
        "--direction", choices=sf.DIRECTIONS, help="the direction of --export (default: first)"
    )
    parser.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


VIEW_HINT = "pip install 'attnscope[view]'"


def run(args: argparse.Namespace) -> None:
    """Serve the page until interrupted, or write the export."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        message = f"attnscope view needs Starlette and uvicorn ({error}): {VIEW_HINT}"
        raise UsageError(message) from None
    from ..view.maps import ViewStore

    options = storage_options(args.storage_option)
    store = ViewStore(args.store, options)
    with opening(args.store):
        meta = store.meta(args.run)  # a bad store or run fails here, before anything starts
    if args.export is not None:
        from ..view.export import export

        if args.export.suffix.lower() not in (".html", ".htm"):
            raise UsageError(f"--export writes an HTML page; name it .html, not {args.export}")
        span = args.span or next(iter(meta["run"]["spans"]), None)
        direction = args.direction or meta["directions"][0]
        args.export.write_text(export(store, meta["run"]["name"], direction, span))
        print(args.export)
        return
    if args.span or args.direction:
        raise UsageError("--span and --direction choose what --export writes; the page has both")
    serve(store, args.run, args.host, args.port, open_browser=not args.no_browser)


def serve(store: Any, run: str | None, host: str, port: int, *, open_browser: bool) -> None:
    """Serve `store`'s page on host:port with uvicorn until interrupted."""
    import uvicorn

    from ..view.app import create_app

    if not _is_loopback(host):
        print(
            f"attnscope: warning: serving on {host}, not loopback: anyone who can reach this "
            f"machine on port {port} can read this store",
            file=sys.stderr,
        )
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"attnscope view: {url} (Ctrl-C stops)", file=sys.stderr)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    uvicorn.run(create_app(store, run), host=host, port=port, log_level="warning")
