"""The collection subcommands of `blipkit`: `index` (embed images into a LanceDB table, resumable) and `search`.

Both go through `blipkit.collections.Index`; `--model` defaults to the model the table was built with (scenes-blip
for a new table). Progress goes to stderr; `--json` prints the job summary or the hits on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import InputError
from .common import add_commit_seconds
from .executor import add_executor_arguments, executor_options

FORMATTER = argparse.RawDescriptionHelpFormatter


def _index(args: argparse.Namespace):
    from ..collections import Index

    if args.quantize is not None:
        raise InputError("--quantize is not taken by index / search (the table's embeddings come from float weights)")
    if args.device is not None:
        from .tasks import _device

        _device(args.device)
    return Index(args.db, args.model, table=args.table, features=getattr(args, "features", False),
                 caption=getattr(args, "caption", False), labels=getattr(args, "labels", None),
                 ann=getattr(args, "ann", "auto"), device=args.device, dtype=args.dtype)


def cmd_index(args: argparse.Namespace) -> int:
    from ..collections.store import connect

    if args.batch_size < 1:
        raise InputError(f"--batch-size {args.batch_size}: use 1 or more")
    if args.workers is not None and args.workers < 0:
        raise InputError(f"--workers {args.workers}: use 0 (decode in this process) or more")
    ray = executor_options(args)
    connect(args.db, write=True)  # a read-only database fails before the model loads
    summary = _index(args).add(args.sources, recursive=args.recursive, batch_size=args.batch_size,
                               workers=args.workers, progress=True, path_column=args.path_column,
                               text_column=args.text_column, executor=args.executor, ray=ray,
                               commit_seconds=args.commit_seconds).to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['added']} added, {summary['skipped']} skipped, {summary['failed']} failed "
              f"({summary['images_per_second']:.1f} images/s); table '{args.table}' has {summary['rows']} rows"
              + (f", {summary['errors']} error records in '{args.table}_errors'" if summary["errors"] else ""))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.image is None):
        raise InputError("give a TEXT to search for, or --image PATH (not both)")
    if args.image is not None and args.rerank:
        raise InputError("--rerank applies to text queries (ITM scores an image against a text); drop it with --image")
    index = _index(args)
    ann = {k: v for k, v in (("nprobes", args.nprobes), ("refine_factor", args.refine_factor)) if v is not None}
    if args.image is not None:
        hits = index.search_image(args.image, k=args.k, where=args.where, **ann)
    else:
        rerank = 32 if args.rerank is None else args.rerank
        hits = index.search_text(args.text, k=args.k, rerank=rerank, where=args.where, **ann)
    if args.json:
        print(json.dumps(hits, indent=2, ensure_ascii=False))
        return 0
    print(f"  {'#':>3} {'score':>8} {'ITC':>7} {'ITM':>7}  path")
    for rank, h in enumerate(hits, 1):
        itm = f"{h['itm']:7.3f}" if h.get("itm") is not None else f"{'-':>7}"
        score = f"{h['score']:8.3f}" if h["score"] is not None else f"{'-':>8}"
        print(f"  {rank:>3} {score} {h['itc']:7.3f} {itm}  {h['path']}" + (f"  ({h['error']})" if "error" in h else ""))
    if not hits:
        print("no hits", file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, metavar="DIR",
                   help="the LanceDB database: a directory, or s3://BUCKET/PATH (credentials, region and endpoint "
                        "from the AWS_* environment)")
    p.add_argument("--table", default="images", help="table name (default: images; errors go to TABLE_errors)")
    p.set_defaults(model=None)  # the table's own model unless --model says otherwise


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add `index` and `search`."""
    from ..collections.store import ANN_CHOICES

    p = sub.add_parser(
        "index", parents=[common], formatter_class=FORMATTER,
        help="embed images into a LanceDB table (resumable; bad files become error records)",
        description="Embed the images of SOURCES into a LanceDB table: path, key, size, ITC embedding (BLIP-2: its "
                    "query vectors too), optionally patch features, a caption and zero-shot labels. A rerun skips "
                    "what is done; a killed job loses at most the work since its last commit (--commit-seconds).",
        epilog="examples:\n  blipkit index photos/ --db photos.db --recursive\n"
               "  blipkit index 'shards/*.tar' list.txt table.parquet --db data.db --features --json\n"
               "  blipkit index scenes/ --db s.db --caption --labels 'red circle' 'blue square'\n"
               "  blipkit index '/mnt/shared/shards/*.tar' --db photos.db --executor ray --ray-address auto "
               "--actors 8 --gpus-per-actor 1",
    )
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image files, folders, globs (quoted), .txt path lists, .parquet/.csv/.jsonl tables with a "
                        "path column, webdataset .tar shards, or NAME.lance blipkit tables")
    _common(p)
    p.add_argument("--recursive", action="store_true", help="also the images in subfolders")
    p.add_argument("--features", action="store_true", help="store fp16 patch features (re-ranking reads no image)")
    p.add_argument("--caption", action="store_true", help="store a generated caption per image")
    p.add_argument("--labels", nargs="+", metavar="LABEL",
                   help="store the best zero-shot label and every label's score")
    p.add_argument("--ann", choices=ANN_CHOICES, default="auto",
                   help="vector index: auto (from 100,000 vectors on: rows, BLIP-2 rows x 32), none (exact search), "
                        "ivf_pq, hnsw")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call and per commit (default 32)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: cores - 1, at most 4)")
    p.add_argument("--path-column", help="path column of table sources (default: path, image, file_name ...)")
    p.add_argument("--text-column", help="text column of table sources, stored as `text` (default: text, caption)")
    add_commit_seconds(p)
    add_executor_arguments(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "search", parents=[common], formatter_class=FORMATTER,
        help="search an image table by text (ITC, then ITM re-ranking) or by image",
        description="Search a table built by `blipkit index`: ITC first (ANN index or exact), then the best "
                    "--rerank candidates re-scored as in BLIP's retrieval protocol (ITM match logit + ITC).",
        epilog="examples:\n  blipkit search --db photos.db 'a red circle left of a blue square' -k 5\n"
               "  blipkit search --db photos.db --image query.png --json\n"
               "  blipkit search --db photos.db 'a dog' --where \"width >= 640\" --rerank 0",
    )
    p.add_argument("text", nargs="?", help="what to look for")
    _common(p)
    p.add_argument("--image", metavar="PATH", help="search by an image instead (ITC similarity)")
    p.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    p.add_argument("--rerank", type=int, default=None,
                   help="re-rank the best N with ITM (default 32 for text; 0: ITC only); at least k are re-ranked")
    p.add_argument("--where", metavar="SQL", help="SQL filter on the table's columns, e.g. \"path LIKE '%%/cats/%%'\"")
    p.add_argument("--nprobes", type=int, help="ANN partitions to probe (more: better recall, slower)")
    p.add_argument("--refine-factor", type=int,
                   help="ANN candidates re-scored exactly with the stored vectors, as a multiple of k (default 20; "
                        "BLIP-2 tables: max(20 x k, 800) rows)")
    p.set_defaults(func=cmd_search)
