"""`blipkit serve`: the HTTP API and web page of `blipkit.serve` under uvicorn (`pip install 'blipkit[serve]'`)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from ..errors import BlipkitError, InputError

FORMATTER = argparse.RawDescriptionHelpFormatter


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _check(args: argparse.Namespace) -> None:
    """The options checked before the model loads."""
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: use 0..65535")
    if args.max_batch < 1:
        raise InputError(f"--max-batch {args.max_batch}: use 1 (no batching) or more")
    if args.max_wait_ms < 0:
        raise InputError(f"--max-wait-ms {args.max_wait_ms}: use 0 or more")
    if args.gather < 0:
        raise InputError(f"--gather {args.gather}: use 0 (start at once what is queued) or more")
    if args.max_body_mb <= 0:
        raise InputError(f"--max-body-mb {args.max_body_mb}: use a positive size")
    if args.api_key is not None and not args.api_key.strip():
        raise InputError("--api-key is blank: give a secret, or leave the option out")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--threads {args.threads}: use 1 or more")


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model (and the index), then serve until interrupted."""
    _check(args)
    try:
        import uvicorn

        from ..serve import Limits, create_app
    except ImportError as e:
        raise BlipkitError(f"blipkit serve needs {e.name}: pip install 'blipkit[serve]'") from None
    import blipkit

    index = None
    if args.db is not None:
        from ..collections import Index

        if args.quantize is not None:
            raise InputError("--quantize is not taken with --db (the table's embeddings come from float weights)")
        index = Index(args.db, args.model, table=args.table, device=args.device, dtype=args.dtype)
        if len(index) == 0:
            raise InputError(f"--db {args.db} has no table '{args.table}' with images: build one with "
                             f"`blipkit index IMAGES --db {args.db}`")
        model = index.model  # the table's model unless --model names one
    else:
        model = blipkit.load(args.model or "scenes-blip", device=args.device, dtype=args.dtype, quantize=args.quantize)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    limits = Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024))
    app = create_app(model, index=index, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, limits=limits,
                     api_key=args.api_key, process=args.model_process, threads=args.threads,
                     gather=args.gather)
    if not _loopback(args.host) and args.api_key is None:
        print(f"blipkit serve: listening on {args.host}, reachable from other machines, without --api-key",
              file=sys.stderr)
    print(f"blipkit serve: {model.name_or_path} on http://{args.host}:{args.port}/ (API docs at /docs)",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve` to `blipkit`'s parser."""
    help_ = "serve the model over HTTP: a JSON API with request batching, and a web page at /"
    p = subparsers.add_parser(
        "serve", parents=[common], help=help_, description=help_, formatter_class=FORMATTER,
        epilog="examples:\n"
               "  blipkit serve                                   # http://127.0.0.1:8000/\n"
               "  blipkit serve --model ./my-checkpoint --port 9000 --max-batch 32 --max-wait-ms 10\n"
               "  blipkit serve --db photos.db                    # /api/search and the page's search grid\n"
               "  blipkit serve --host 0.0.0.0 --api-key \"$KEY\"   # reachable from other machines: set a key",
    )
    p.set_defaults(func=cmd_serve, model=None)  # with --db, the table's model unless --model names one
    p.add_argument("--db", metavar="DIR", help="LanceDB database built by `blipkit index`, searched by /api/search")
    p.add_argument("--table", default="images", help="table of --db (default: images)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--max-batch", type=int, default=16, help="most requests of one kind per model call (default 16; "
                   "1: no batching)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a request waits for others to join its batch (default 5)")
    p.add_argument("--gather", type=float, default=0.0,
                   help="once the model is free, wait for as many requests as its last call had in flight, at most "
                        "this fraction of that call (e.g. 0.5; default 0: start at once what is queued)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the model calls (default: one less "
                   "than the cores, leaving one to the HTTP work; with --no-model-process, torch's: one per core)")
    p.add_argument("--model-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the model calls in a process of their own, apart from the HTTP work (default: on)")
    p.add_argument("--max-body-mb", type=float, default=20.0, help="largest request body in MB (default 20)")
    p.add_argument("--api-key", default=None, help="require this key ('Authorization: Bearer KEY' or 'X-API-Key')")
    p.add_argument("--quiet", action="store_true", help="log warnings only, not every request")
