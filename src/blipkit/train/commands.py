"""`blipkit train` and `blipkit eval`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import InputError
from .losses import OBJECTIVES

TRAIN_EXAMPLES = """examples:
  blipkit train --data data/scenes --arch small --out runs/scenes-blip --steps 5000
  blipkit train --data coco_karpathy_train.json --image-root coco/ --out runs/ft   # fine-tunes --model
  blipkit train --data 'shards/train-{000..031}.tar' --out runs/wds --objectives itc,itm,lm
  torchrun --nproc_per_node=2 -m blipkit.cli train --data data/scenes --arch small --out runs/ddp
Running the same command again resumes from OUT/checkpoint.pt."""

EVAL_EXAMPLES = """examples:
  blipkit eval --data data/scenes --split test
  blipkit eval --data coco_karpathy_test.json --image-root coco/ --tasks retrieval,caption --k 128 --json"""


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `train` and `eval` subcommands."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser("train", parents=[common], help="train or fine-tune BLIP (ITC, ITM, LM, VQA)",
                              description="Train BLIP from scratch (--arch) or fine-tune --model; writes a Hub-format "
                              "model to --out and resumes from its checkpoint.", epilog=TRAIN_EXAMPLES,
                              formatter_class=fmt)
    p.add_argument("--data", required=True, help="scenes dataset dir, Karpathy JSON, image folder, or tar shards")
    p.add_argument("--split", default="train", help="split of a scenes dir or original Karpathy JSON (default: train)")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to")
    p.add_argument("--vqa", default=None, help="VQA JSON whose pairs attach to the images by path")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) entries with missing files or fields")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint.pt, train_log.jsonl)")
    p.add_argument("--arch", default=None, help="train from scratch with this architecture (small, tiny) and a "
                   "vocabulary built from the data, instead of fine-tuning --model")
    p.add_argument("--steps", type=int, default=1000, help="total optimiser steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step and process (default: 32)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default: 2e-4)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma list of itc,itm,lm,vqa")
    p.add_argument("--lm-filter", default=None, metavar="REGEX",
                   help="captioning (LM) learns only from captions matching REGEX, when an image has any")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default: 0)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="leave after N steps of this run (resumable)")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", parents=[common], help="retrieval, captioning, VQA and grounding metrics",
                              description="Evaluate a model on a split: retrieval TR/IR@1/5/10 (ITC, then ITM "
                              "re-ranking of the top k), captioning BLEU-4 / CIDEr, VQA accuracy, grounding.",
                              epilog=EVAL_EXAMPLES, formatter_class=fmt)
    e.add_argument("--data", required=True, help="scenes dataset dir or Karpathy JSON (+ --vqa)")
    e.add_argument("--split", default="test", help="split of a scenes dir (default: test)")
    e.add_argument("--image-root", default=None, help="directory image paths are relative to")
    e.add_argument("--vqa", default=None, help="VQA JSON (scenes dirs carry their own)")
    e.add_argument("--boxes", default=None, help="boxes JSON for grounding (scenes dirs carry their own)")
    e.add_argument("--skip-bad", action="store_true", help="skip (and count) entries with missing files or fields")
    e.add_argument("--tasks", default="retrieval,caption,vqa,grounding", help="comma list (default: all)")
    e.add_argument("--k", type=int, default=16, help="ITM re-ranks the ITC top k (default: 16)")
    e.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--num-beams", type=int, default=3, help="beam size for captions (default: 3)")
    e.add_argument("--out", default=None, help="also write the metrics (and generated captions/answers) as JSON")
    e.set_defaults(func=run_eval)


def _list(value: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise InputError(f"{flag} {value!r}: use a comma list of {', '.join(known)}")
    return items


def _device_default(args: argparse.Namespace) -> str:
    return args.device or "cpu"


def run_train(args: argparse.Namespace) -> int:
    """The `train` command."""
    import torch

    import blipkit

    from .data import is_shards, load_items
    from .loop import TrainConfig, train
    from .model import scratch_model
    from .vocab import build_tokenizer

    if args.dtype not in (None, "float32"):
        raise InputError("training keeps float32 weights; use --amp bf16/fp16 for mixed precision")
    objectives = _list(args.objectives, OBJECTIVES, "--objectives")
    if is_shards(args.data):
        data, skipped = args.data, 0
    else:
        loaded = load_items(args.data, args.split, args.image_root, args.vqa, args.skip_bad)
        data, skipped = loaded.items, loaded.skipped
        if skipped:
            print(f"skipped {skipped} bad entr{'y' if skipped == 1 else 'ies'} of {args.data}", file=sys.stderr)
    if args.arch:
        if isinstance(data, str):
            raise InputError("--arch builds its vocabulary from the data: give a dataset dir or JSON, not tar shards")
        texts = [t for it in data for t in it.captions] + [t for it in data for q, a in it.qa for t in (q, *a)]
        model = scratch_model(args.arch, build_tokenizer(texts), seed=args.seed)
    else:
        model = blipkit.load(args.model)
        if model.family != "BLIP":
            raise InputError(f"{args.model} is a {model.family} model; `blipkit train` trains BLIP")
        model.float()
    cfg = TrainConfig(
        out=Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, clip=args.clip, objectives=objectives, amp=args.amp,
        grad_checkpointing=args.grad_checkpointing, save_every=args.save_every, seed=args.seed,
        workers=args.workers, resume=not args.no_resume, stop_after=args.stop_after, skip_bad=args.skip_bad,
        lm_filter=args.lm_filter,
    )
    if args.lm_filter:
        try:
            re.compile(args.lm_filter)
        except re.error as e:
            raise InputError(f"--lm-filter {args.lm_filter!r}: not a regular expression ({e})") from None
    result = train(model, data, cfg, device=_device_default(args))
    summary = {"out": str(cfg.out), "step": result.step, "steps": cfg.steps, "seconds": round(result.seconds, 1),
               "losses": {k: round(v, 4) for k, v in result.losses.items()}, "skipped": skipped,
               "interrupted": result.interrupted}
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        state = "stopped (rerun to resume)" if result.interrupted or result.step < cfg.steps else "done"
        losses = " ".join(f"{k}={v:.3f}" for k, v in result.losses.items())
        print(f"{state}: step {result.step}/{cfg.steps}, {result.seconds / 60:.1f} min, {losses}; model in {cfg.out}")
    return 130 if result.interrupted else 0


def run_eval(args: argparse.Namespace) -> int:
    """The `eval` command."""
    import blipkit

    from .eval import evaluate, format_metrics

    tasks = _list(args.tasks, ("retrieval", "caption", "vqa", "grounding"), "--tasks")
    model = blipkit.load(args.model, device=_device_default(args), dtype=args.dtype)
    report = evaluate(model, args.data, split=args.split, tasks=tasks, k=args.k, limit=args.limit,
                      image_root=args.image_root, vqa=args.vqa, boxes=args.boxes, batch_size=args.batch_size,
                      num_beams=args.num_beams, skip_bad=args.skip_bad)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["metrics"], indent=2) if args.json else format_metrics(report))
    return 0
