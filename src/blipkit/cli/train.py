"""`blipkit train` and `blipkit eval`."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ..errors import InputError
from ..tasks.attention import SOURCES
from ..train.losses import OBJECTIVES
from .common import (
    MAX_BATCH,
    MAX_BEAMS,
    MAX_SEED,
    check_output,
    check_output_dir,
    integer,
    number,
    write_line,
)

FORMATTER = argparse.RawDescriptionHelpFormatter
MAX_STEPS = 10**9
MAX_WORKERS = 64

TRAIN_EXAMPLES = """examples:
  blipkit train --data data/scenes --arch small --out runs/scenes-blip --steps 5000
  blipkit train --stage tags --data data/scenes --arch small --out runs/vit --steps 3000   # then --model runs/vit
  blipkit train --data coco_karpathy_train.json --image-root coco/ --out runs/ft   # fine-tunes --model
  blipkit train --data 'shards/train-{000..031}.tar' --out runs/wds --objectives itc,itm,lm
  torchrun --nproc_per_node=2 -m blipkit.cli train --data data/scenes --arch small --out runs/ddp
BLIP-2 (stage 1, a language model, stage 2):
  blipkit train --stage qformer1 --data data/scenes --init-vision scenes-blip --out runs/qformer1
  blipkit train --stage lm --data data/scenes --lm-arch small --out runs/opt-scenes
  blipkit train --stage qformer2 --data data/scenes --init runs/qformer1 --lm runs/opt-scenes --out runs/blip2
Running the same command again resumes from OUT/checkpoint.pt."""
STAGES = ("blip", "tags", "qformer1", "qformer2", "lm")
# options that only one kind of run reads: option -> the stages that take it
STAGE_OPTIONS = {
    "arch": ("blip", "tags"), "patch_init": ("blip", "tags"), "tag_min_count": ("tags",), "tags": ("tags",),
    "patch_labels": ("tags", "blip"),
    "vqa": ("blip",), "lm_filter": ("blip",), "objectives": ("blip", "qformer1"),
    "init_vision": ("qformer1",), "qformer_layers": ("qformer1",), "num_queries": ("qformer1",),
    "qformer_width": ("qformer1",), "qformer_init": ("qformer1",),
    "init": ("qformer2",), "lm": ("qformer2",), "prompt": ("qformer2",),
    "lm_arch": ("lm",), "vocab_size": ("lm",), "text_length": ("qformer1", "qformer2", "lm"),
}

EVAL_EXAMPLES = """examples:
  blipkit eval --data data/scenes --split test
  blipkit eval --data coco_karpathy_test.json --image-root coco/ --tasks retrieval,caption --k 128 --json
  blipkit eval --model runs/qformer1 --data data/scenes    # BLIP-2 retrieval: retrieval, grounding
  blipkit eval --model runs/blip2 --data data/scenes       # BLIP-2 generation: captioning, VQA"""


def add_commands(subparsers: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the `train` and `eval` subcommands."""
    p = subparsers.add_parser("train", parents=[common], help="train BLIP, the BLIP-2 stages, or a small LM",
                              description="Train BLIP from scratch (--arch) or fine-tune --model; or a BLIP-2 stage "
                              "(--stage qformer1 / qformer2) or the small language model stage 2 can use (--stage "
                              "lm). Writes a Hub-format model to --out and resumes from its checkpoint.",
                              epilog=TRAIN_EXAMPLES, formatter_class=FORMATTER)
    _train_data_options(p)
    _train_model_options(p)
    _train_run_options(p)
    _train_blip2_options(p)
    p.set_defaults(func=run_train)
    e = subparsers.add_parser("eval", parents=[common], help="retrieval, captioning, VQA and grounding metrics",
                              description="Evaluate a BLIP or BLIP-2 model on a split: retrieval TR/IR@1/5/10 (ITC, "
                              "then ITM re-ranking of the top k), captioning BLEU-4 / CIDEr, VQA accuracy, grounding. "
                              "Tasks the model has no parts for are reported as skipped.",
                              epilog=EVAL_EXAMPLES, formatter_class=FORMATTER)
    _eval_options(e)
    e.set_defaults(func=run_eval)


def _add_data(p: argparse.ArgumentParser, split: str) -> None:
    """The data options train and eval share."""
    p.add_argument("--data", required=True, help="scenes dataset dir, Karpathy JSON, image folder"
                   + (", or tar shards" if split == "train" else ""))
    p.add_argument("--split", default=split, help=f"split of a scenes dir or original Karpathy JSON (default: {split})")
    p.add_argument("--image-root", default=None, help="directory image paths are relative to")
    p.add_argument("--vqa", default=None, help="VQA JSON whose pairs attach to the images by path")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) entries with missing fields or image files that are missing or unreadable")


def _train_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", default="blip", choices=STAGES,
                   help="blip (default): BLIP; tags: pretrain BLIP's ViT on caption tags; qformer1 / qformer2: "
                   "BLIP-2 stage 1 / 2; lm: an OPT on the captions")
    _add_data(p, "train")
    p.add_argument("--out", required=True, help="output directory (model, checkpoint.pt, train_log.jsonl)")


def _train_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default=None, help="train from scratch with this architecture (small, tiny) and a "
                   "vocabulary built from the data, instead of fine-tuning --model")
    p.add_argument("--patch-init", default=None, choices=["whiten", "normal"],
                   help="with --arch: start the ViT patch embedding from the whitened principal directions of "
                   "256 training images' patches (whiten, the default) or normal(0, 0.02)")
    p.add_argument("--tags", default=None, metavar="SOURCE",
                   help="--stage tags: what the tags are: the captions' words and word pairs (default), 'boxes' "
                   "(the objects of a scenes dataset: colour, shape, 'colour shape'), or a JSON file {image: [tags]}")
    p.add_argument("--patch-labels", default=None, metavar="BOXES",
                   help="--stage tags: also teach every patch the shape, colour and place (third of the image) of the "
                   "object covering it, its own row and column, and the image's count of each kind of object, "
                   "from 'boxes' (a scenes dataset's boxes) or a boxes JSON [{image, objects: [{shape, colour, "
                   "box_norm}]}]; "
                   "--stage blip: keep teaching the image encoder those targets beside the image-text objectives "
                   "(each head starts from --model's, when a run saved it with the same classes)")
    p.add_argument("--tag-min-count", type=integer(1), default=None,
                   help="--stage tags: a caption word or word pair is a tag when at least this many images use it "
                   "(default: 20) and at most half of them")


def _train_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=integer(1, MAX_STEPS), default=1000, help="total optimiser steps (default: 1000)")
    p.add_argument("--batch-size", type=integer(1, MAX_BATCH), default=32,
                   help="images per step and process (default: 32)")
    p.add_argument("--lr", type=number(0, 1, above=True), default=2e-4, help="peak learning rate (default: 2e-4)")
    p.add_argument("--warmup", type=integer(0, MAX_STEPS), default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--weight-decay", type=number(0), default=0.05)
    p.add_argument("--clip", type=number(0), default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--objectives", default=None, help="comma list of itc,itm,lm,vqa (blip; default: all) or "
                   "itc,itm,itg (qformer1; default: all)")
    p.add_argument("--lm-filter", default=None, metavar="REGEX",
                   help="captioning (LM) learns only from captions matching REGEX, when an image has any")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"], help="mixed precision")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--save-every", type=integer(1), default=200, help="checkpoint every N steps (default: 200)")
    p.add_argument("--log-every", type=integer(1), default=10, help="write train_log.jsonl every N steps (default: 10)")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    p.add_argument("--workers", type=integer(0, MAX_WORKERS), default=0,
                   help="data-loading worker processes (default: 0)")
    p.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.add_argument("--stop-after", type=integer(1), default=None, help="leave after N steps of this run (resumable)")


def _train_blip2_options(p: argparse.ArgumentParser) -> None:
    b = p.add_argument_group("BLIP-2 stage 1 (--stage qformer1)")
    b.add_argument("--init-vision", default=None, metavar="MODEL",
                   help="BLIP model (name or directory) whose image encoder BLIP-2 uses, frozen; e.g. scenes-blip")
    b.add_argument("--qformer-layers", type=integer(1, 64), default=None,
                   help="Q-Former layers (default: BLIP's text layers)")
    b.add_argument("--num-queries", type=integer(1, 1024), default=None, help="learned query tokens (default: 8)")
    b.add_argument("--qformer-width", type=integer(1, 8192), default=None,
                   help="Q-Former width (default: the image encoder's)")
    b.add_argument("--qformer-init", default=None, choices=["text-encoder", "random"],
                   help="start the Q-Former and heads from BLIP's text encoder (default) or at random")
    b.add_argument("--text-length", type=integer(1, 4096), default=None,
                   help="text tokens per caption (default: BLIP's text positions; 64 for qformer2 and lm)")
    b = p.add_argument_group("BLIP-2 stage 2 (--stage qformer2)")
    b.add_argument("--init", default=None, metavar="DIR", help="the stage-1 output (run --stage qformer1 first)")
    b.add_argument("--lm", default=None, metavar="DIR",
                   help="frozen language model: an OPT or Flan-T5 directory in Hugging Face format (--stage lm)")
    b.add_argument("--prompt", default=None, help="OPT: text before each caption (pass it to caption() later)")
    b = p.add_argument_group("language model (--stage lm)")
    b.add_argument("--lm-arch", default=None,
                   help="architecture: small (4 layers, width 256), mini (3 layers, width 192) or tiny")
    b.add_argument("--vocab-size", type=integer(1, 1_000_000), default=None,
                   help="byte-level BPE vocabulary size (default: 768)")


def _eval_options(e: argparse.ArgumentParser) -> None:
    _add_data(e, "test")
    e.add_argument("--boxes", default=None, help="boxes JSON for grounding (scenes dirs carry their own)")
    e.add_argument("--tasks", default="retrieval,caption,vqa,grounding", help="comma list (default: all)")
    e.add_argument("--k", type=integer(1), default=16, help="ITM re-ranks the ITC top k (default: 16)")
    e.add_argument("--limit", type=integer(1), default=None, help="evaluate only the first N images")
    e.add_argument("--batch-size", type=integer(1, MAX_BATCH), default=64)
    e.add_argument("--num-beams", type=integer(1, MAX_BEAMS), default=3, help="beam size for captions (default: 3)")
    e.add_argument("--layer", type=integer(), default=None,
                   help="cross-attention layer grounding reads its GradCAM from (default: the model's)")
    e.add_argument("--source", choices=SOURCES, default=None,
                   help="grounding's map: the phrase's words or the position the ITM head reads (default: the "
                   "model's)")
    e.add_argument("--out", default=None, help="also write the metrics (and generated captions/answers) as JSON; "
                   "its folder must exist")


def _list(value: str, known: tuple[str, ...], flag: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise InputError(f"{flag} {value!r}: use a comma list of {', '.join(known)}")
    return items


def _device_default(args: argparse.Namespace) -> str:
    """--device checked (one clear line for a typo or a missing GPU), or cpu."""
    from .tasks import _device

    return _device(args.device) or "cpu"


def _check_stage_options(args: argparse.Namespace) -> None:
    """Options another kind of run reads are an error rather than silently ignored."""
    for dest, stages in STAGE_OPTIONS.items():
        if getattr(args, dest) is not None and args.stage not in stages:
            flag = "--" + dest.replace("_", "-")
            raise InputError(f"{flag} is for --stage {' / '.join(stages)}; this run is --stage {args.stage}")


def _blip_model(args: argparse.Namespace, data):
    """The BLIP model a run starts from: a new one of `--arch` (vocabulary from the data), or `--model`."""
    import blipkit

    from ..train.model import sample_pixels, scratch_model, whiten_patch_embedding
    from ..train.vocab import build_tokenizer

    if args.patch_init and not args.arch:
        raise InputError("--patch-init initialises a model trained from scratch: give --arch too")
    if args.arch:
        if isinstance(data, str):
            raise InputError("--arch builds its vocabulary from the data: give a dataset dir or JSON, not tar shards")
        texts = [t for it in data for t in it.captions] + [t for it in data for q, a in it.qa for t in (q, *a)]
        model = scratch_model(args.arch, build_tokenizer(texts), seed=args.seed)
        if (args.patch_init or "whiten") == "whiten":
            whiten_patch_embedding(model, sample_pixels(model, data, n=256, seed=args.seed))
        return model
    model = blipkit.load(args.model)
    if model.family != "BLIP":
        raise InputError(f"{args.model} is a {model.family} model; `blipkit train` trains BLIP (BLIP-2: --stage)")
    return model.float()


def _to_train(args: argparse.Namespace, data, objectives: tuple[str, ...], cfg):
    """What the run trains: a BLIP model (the default stage; with --patch-labels its `Recipe` with the patch
    objectives, `cfg` the run's `TrainConfig`) or the `Recipe` of a BLIP-2 stage or the LM."""
    if args.stage == "blip":
        if not args.patch_labels:
            return _blip_model(args, data)
        from ..train.loop import blip_recipe
        from ..train.tags import dense_blip_recipe, read_boxes

        if isinstance(data, str):
            raise InputError("--patch-labels reads each image's boxes by path: give a dataset dir or JSON, not tar "
                             "shards")
        boxes = read_boxes(_labels_file(args, args.patch_labels))
        return dense_blip_recipe(blip_recipe(_blip_model(args, data), cfg), data, boxes, start=args.model)
    stages = {"tags": _tags_stage, "lm": _lm_stage, "qformer1": _qformer1_stage, "qformer2": _qformer2_stage}
    return stages[args.stage](args, data, objectives)


def _labels_file(args: argparse.Namespace, name: str) -> Path:
    """A labels option's file: 'boxes' is the dataset's own boxes file of the split."""
    return Path(args.data) / "annotations" / f"{args.split}_boxes.json" if name == "boxes" else Path(name)


def _tags_stage(args: argparse.Namespace, data, objectives: tuple[str, ...]):
    from ..train.tags import read_boxes, read_labels, tags_recipe

    if isinstance(data, str):
        raise InputError("--stage tags reads every caption of an image: give a dataset dir or JSON, not tar shards")

    labels = read_labels(_labels_file(args, args.tags)) if args.tags else None
    boxes = read_boxes(_labels_file(args, args.patch_labels)) if args.patch_labels else None
    return tags_recipe(_blip_model(args, data), data, min_count=args.tag_min_count or 20, labels=labels, boxes=boxes)


def _lm_stage(args: argparse.Namespace, data, objectives: tuple[str, ...]):
    from ..processing import Tokenizer
    from ..train.lm import LM_ARCHS, build_bpe_tokenizer, lm_recipe, scratch_lm
    from ..train.loop import STATE_FILE

    if isinstance(data, str):
        raise InputError("--stage lm builds its tokenizer from the captions: give a dataset dir or JSON, not tar "
                         "shards")
    arch = args.lm_arch or "small"
    if arch not in LM_ARCHS:
        raise InputError(f"--lm-arch {arch}: unknown (known: {', '.join(LM_ARCHS)})")
    out = Path(args.out)
    if not args.no_resume and (out / STATE_FILE).is_file() and (out / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_dir(out)  # resuming: the vocabulary the checkpoint was trained with
    else:
        tokenizer = build_bpe_tokenizer([c for it in data for c in it.captions], args.vocab_size or 768,
                                        max_length=LM_ARCHS[arch].positions)
    return lm_recipe(scratch_lm(arch, tokenizer, seed=args.seed), tokenizer, args.text_length or 64)


def _qformer1_stage(args: argparse.Namespace, data, objectives: tuple[str, ...]):
    import blipkit

    from ..train.blip2_stages import stage1_model, stage1_recipe

    if not args.init_vision:
        raise InputError("--stage qformer1 takes its frozen image encoder from a BLIP model: pass --init-vision "
                         "NAME_OR_DIR (e.g. scenes-blip)")
    blip = blipkit.load(args.init_vision)
    if blip.family != "BLIP":
        raise InputError(f"--init-vision {args.init_vision} is a {blip.family} model; pass a BLIP model")
    model = stage1_model(blip, args.qformer_layers, args.num_queries or 8, args.qformer_width, args.text_length,
                         args.qformer_init or "text-encoder", seed=args.seed)
    return stage1_recipe(model, objectives, args.grad_checkpointing)


def _qformer2_stage(args: argparse.Namespace, data, objectives: tuple[str, ...]):
    import blipkit

    from ..train.blip2_stages import stage2_model, stage2_recipe
    from ..train.lm import load_language_model

    if not args.init:
        raise InputError("--stage qformer2 starts from a stage-1 Q-Former: pass --init DIR, the --out of "
                         "`blipkit train --stage qformer1` (run stage 1 first)")
    if not Path(args.init).is_dir():
        raise InputError(f"--init {args.init}: no such directory; run stage 1 first (`blipkit train --stage "
                         f"qformer1 --out {args.init} ...`)")
    if not args.lm:
        raise InputError("--stage qformer2 needs --lm DIR, a language model (OPT or Flan-T5 in Hugging Face format); "
                         "train a small one with `blipkit train --stage lm`")
    stage1 = blipkit.load(args.init)
    lm, tokenizer = load_language_model(args.lm)
    model = stage2_model(stage1, lm, tokenizer).float()
    return stage2_recipe(model, stage1, args.prompt or "", args.text_length)


def run_train(args: argparse.Namespace) -> int:
    """The `train` command."""
    import torch

    from ..data.readers import captions_only, is_shards, load_items
    from ..train.blip2_losses import STAGE1_OBJECTIVES
    from ..train.loop import TrainConfig, train

    if args.dtype not in (None, "float32"):
        raise InputError("training keeps float32 weights; use --amp bf16/fp16 for mixed precision")
    if args.quantize is not None:
        raise InputError("training keeps float32 weights: --quantize is for inference commands (eval, caption ...)")
    _check_stage_options(args)
    check_output_dir(args.out, "--out")
    device = _device_default(args)
    known = STAGE1_OBJECTIVES if args.stage == "qformer1" else OBJECTIVES
    objectives = _list(args.objectives or ",".join(known), known, "--objectives")
    if args.lm_filter:
        try:
            re.compile(args.lm_filter)
        except re.error as e:
            raise InputError(f"--lm-filter {args.lm_filter!r}: not a regular expression ({e})") from None
    if is_shards(args.data):
        data, skipped = args.data, 0
    else:
        loaded = load_items(args.data, args.split, args.image_root, args.vqa, args.skip_bad)
        data, skipped = loaded.items, loaded.skipped
        if skipped:
            write_line(f"skipped {skipped} bad entr{'y' if skipped == 1 else 'ies'} of {args.data}", sys.stderr)
        if args.stage not in ("blip", "tags"):  # tags: a model built here takes its vocabulary from the QA too
            data = captions_only(data)
    cfg = TrainConfig(
        out=Path(args.out), steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
        weight_decay=args.weight_decay, clip=args.clip, objectives=objectives, amp=args.amp,
        grad_checkpointing=args.grad_checkpointing, save_every=args.save_every, log_every=args.log_every,
        seed=args.seed, workers=args.workers, resume=not args.no_resume, stop_after=args.stop_after,
        skip_bad=args.skip_bad, lm_filter=args.lm_filter,
    )
    result = train(_to_train(args, data, objectives, cfg), data, cfg, device=device)
    summary = {"out": str(cfg.out), "stage": args.stage, "step": result.step, "steps": cfg.steps,
               "seconds": round(result.seconds, 1), "losses": {k: round(v, 4) for k, v in result.losses.items()},
               "skipped": skipped, "interrupted": result.interrupted}
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
    """The `eval` command: options, --out and the data checked before the model loads and the work starts."""
    import blipkit

    from ..data.readers import load_items
    from ..train.eval import evaluate, format_metrics

    tasks = _list(args.tasks, ("retrieval", "caption", "vqa", "grounding"), "--tasks")
    if args.out:
        inputs = [Path(p) for p in (args.data, args.vqa, args.boxes) if p is not None]
        check_output(args.out, "--out", inputs)
    device = _device_default(args)
    loaded = load_items(args.data, args.split, args.image_root, args.vqa, args.skip_bad)
    if loaded.skipped:
        write_line(f"skipped {loaded.skipped} bad entr{'y' if loaded.skipped == 1 else 'ies'} of {args.data}",
                   sys.stderr)
    model = blipkit.load(args.model, device=device, dtype=args.dtype, quantize=args.quantize)
    report = evaluate(model, args.data, split=args.split, tasks=tasks, k=args.k, limit=args.limit,
                      image_root=args.image_root, vqa=args.vqa, boxes=args.boxes, batch_size=args.batch_size,
                      num_beams=args.num_beams, skip_bad=args.skip_bad, layer=args.layer, loaded=loaded,
                      source=args.source)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", errors="backslashreplace")
    write_line(json.dumps(report["metrics"], indent=2) if args.json else format_metrics(report))
    return 0
