"""`blipkit capfilt`: bootstrap a captioned dataset (BLIP's CapFilt) through `blipkit.collections.capfilt`.

Progress goes to stderr; the summary (or with `--json`, the job summary as JSON) to stdout.
"""

from __future__ import annotations

import argparse
import json

from ..errors import InputError
from .common import add_commit_seconds, check_output_dir, integer, number
from .executor import add_executor_arguments, executor_options

FORMATTER = argparse.RawDescriptionHelpFormatter
EXAMPLES = """examples:
  blipkit capfilt annotations.json --out capfilt/                      # scenes-blip as captioner and filter
  blipkit capfilt web.parquet --out cf/ --captioner runs/cap --filter runs/filt --samples 3 --threshold 0.6
  blipkit capfilt dataset_coco.json --out cf/ --image-root coco/ --decoding beam
  blipkit capfilt photos/ --out cf/ --samples 0                        # filter the sidecar captions only
  blipkit capfilt web.parquet --out cf/ --executor ray --ray-address auto --actors 8 --gpus-per-actor 1
rerun the same command to resume; with another --threshold only the outputs are rewritten"""


def cmd_capfilt(args: argparse.Namespace) -> int:
    """The `capfilt` command."""
    from ..collections.capfilt import capfilt, read_annotations

    if args.quantize is not None:
        raise InputError("--quantize is not taken by capfilt (scores come from the filter's float weights)")
    if args.device is not None:
        from .tasks import _device

        _device(args.device)
    check_output_dir(args.out, "--out")
    ray = executor_options(args)  # flags checked, the cluster's address reached, before anything is read
    annotations = read_annotations(args.annotations, args.image_root, args.skip_bad)  # checked before models load
    result = capfilt(annotations, args.out, captioner=args.captioner or args.model,
                     filter=args.filter or args.captioner or args.model, samples=args.samples,
                     threshold=args.threshold, decoding=args.decoding, top_p=args.top_p,
                     min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens,
                     num_beams=args.num_beams, seed=args.seed, batch_size=args.batch_size, workers=args.workers,
                     commit_seconds=args.commit_seconds, executor=args.executor, ray=ray, device=args.device,
                     dtype=args.dtype, progress=True)
    summary = result.to_dict()
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    c = result.counts
    print(f"{summary['added']} images captioned and filtered, {summary['skipped']} done before, "
          f"{summary['failed']} failed ({summary['images_per_second']:.1f} images/s)")
    print(f"kept {c['web_kept']} of {c['web']} web captions and {c['synthetic_kept']} of {c['synthetic']} synthetic "
          f"ones: {c['annotations']}; every candidate with its score: {c['candidates']}")
    if annotations.skipped:
        print(f"skipped {annotations.skipped} bad entries of {args.annotations}")
    return 0


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """Add `capfilt`."""
    p = sub.add_parser(
        "capfilt", parents=[common], formatter_class=FORMATTER,
        help="bootstrap a captioned dataset: synthetic captions + ITM filtering (BLIP's CapFilt), resumable",
        description="For each image of ANNOTATIONS, the captioner writes --samples synthetic captions (nucleus "
                    "sampling, p = 0.9) and the filter's ITM head scores every web and synthetic caption; captions "
                    "with a match probability of at least --threshold are kept. Writes OUT/annotations.json (the "
                    "kept pairs in the input's format; .parquet for Parquet input) and OUT/candidates.parquet "
                    "(every candidate: image, caption, source, score, verdict). A killed job resumes where it "
                    "stopped when rerun. With --executor ray the same job runs on Ray Data (one captioner and "
                    "filter per actor) and writes the same outputs.",
        epilog=EXAMPLES,
    )
    p.add_argument("annotations", metavar="ANNOTATIONS",
                   help="JSON list of {image, caption}, Karpathy JSON, Parquet table (image + caption columns) or "
                        "a folder of images with sidecar .txt captions or a metadata.jsonl")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (rerun with it to resume)")
    p.add_argument("--captioner", default=None, metavar="MODEL",
                   help="model writing the synthetic captions (default: --model, scenes-blip)")
    p.add_argument("--filter", default=None, metavar="MODEL",
                   help="model whose ITM head scores the captions (default: the captioner)")
    p.add_argument("--samples", type=integer(0, 64), default=1,
                   help="synthetic captions per image (default 1; 0: filter the web captions only)")
    p.add_argument("--threshold", type=number(0, 1), default=0.5,
                   help="ITM match probability a caption needs to be kept (default 0.5, the head's argmax)")
    p.add_argument("--decoding", choices=["nucleus", "beam"], default="nucleus",
                   help="nucleus sampling (default, as BLIP) or beam search (the best --samples beams)")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=0.9, help="nucleus sampling's p (default 0.9)")
    p.add_argument("--num-beams", type=integer(1, 64), default=3, help="beams for --decoding beam (default 3)")
    p.add_argument("--min-new-tokens", type=integer(0, 512), default=5,
                   help="shortest synthetic caption in tokens (default 5, BLIP's)")
    p.add_argument("--max-new-tokens", type=integer(1, 512), default=30, help="longest synthetic caption (default 30)")
    p.add_argument("--seed", type=integer(0), default=0, help="seed of the sampling (default 0)")
    p.add_argument("--image-root", default=None, help="directory the annotations' image paths are relative to")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip entries whose image is missing or unreadable or whose caption is empty (counted)")
    p.add_argument("--batch-size", type=integer(1, 4096), default=32,
                   help="images per model call (default 32)")
    p.add_argument("--workers", type=integer(0, 64), default=None,
                   help="decoding processes of --executor local (default: cores - 1, at most 4; 0: in this process)")
    add_commit_seconds(p)
    add_executor_arguments(p)
    p.set_defaults(func=cmd_capfilt)
