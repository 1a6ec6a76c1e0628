"""The task subcommands of `blipkit`: match, classify, caption, ask, ground, attention, matrix, plot-space, info.

Each one loads the model named by --model, runs a task from `blipkit.tasks` (or a model method), prints a readable
result or, with --json, JSON on stdout, and writes a PNG where --out is given. The bulk commands (match, classify,
caption, ask) write each image's result as it is computed, one JSON object per line with --json, and skip images that
cannot be read (see `blipkit.cli.common`); the others print one JSON document. Progress bars go to stderr; errors
blipkit raises become one line on stderr (see `blipkit.cli`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..tasks.attention import SOURCES
from ..tasks.common import PROGRESS_MIN
from .common import (
    MAX_BATCH,
    MAX_BEAMS,
    MAX_CAPTIONS,
    MAX_NEW_TOKENS,
    MAX_SEED,
    Bulk,
    check_output,
    integer,
    number,
    write_line,
)

FORMATTER = argparse.RawDescriptionHelpFormatter


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


# ----------------------------------------------------------------------------------------------------------- helpers


def _device(name: str | None) -> str | None:
    """--device checked here, so a typo is one clear line rather than an error deep inside torch."""
    from ..devices import resolve_device

    resolve_device(name, "--device")
    return name


def _load(args: argparse.Namespace):
    import blipkit

    return blipkit.load(args.model, device=_device(args.device), dtype=args.dtype, quantize=args.quantize)


def _images(args: argparse.Namespace) -> list[Path]:
    from ..tasks.inputs import image_paths

    return image_paths(args.images)


def _one_image(args: argparse.Namespace, texts: list[str], what: str) -> Path:
    """The one image file of ground / attention; a positional `what` that looks like a second image is refused, so
    `ground a.png b.png "phrase"` cannot read the file name b.png as a phrase."""
    from ..tasks.inputs import IMAGE_SUFFIXES

    (spec,) = args.images
    paths = _images(args)
    if len(paths) != 1 or Path(spec).is_dir():
        raise InputError(f"{args.command} takes one image file; '{spec}' names {len(paths)} images: run it once per "
                         f"image")
    for text in texts:
        name = Path(text.strip())
        if (name.suffix.lower() in IMAGE_SUFFIXES and " " not in text.strip()) or (text and name.is_file()):
            raise InputError(f"{args.command} takes one image file, and the {what} '{text}' looks like another one: "
                             f"run it once per image (a {what} that really is a file name goes after -t)")
    return paths[0]


def _texts(args: argparse.Namespace, what: str = "texts") -> list[str]:
    from ..tasks.inputs import read_texts

    return read_texts(args.texts, args.texts_file, what)


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """The result of a one-document command on stdout: JSON with --json, else the readable text."""
    write_line(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


def _progress(items: list, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=len(items) < PROGRESS_MIN, file=sys.stderr, leave=False)


def _picture(args: argparse.Namespace, draw) -> str | None:
    """Draw the picture to --out when given; returns its path for the output."""
    if not getattr(args, "out", None):
        return None
    path = Path(args.out)
    draw(path)
    if not args.json:
        write_line(f"wrote {path}", sys.stderr)
    return str(path)


def _fit_lengths(method, options: dict[str, Any]) -> None:
    """Keep the minimum length within the maximum when only one of them was given (the other is the model's)."""
    defaults = {k: p.default for k, p in inspect.signature(method).parameters.items()}
    low = options.get("min_new_tokens", defaults.get("min_new_tokens"))
    high = options.get("max_new_tokens", defaults.get("max_new_tokens"))
    if isinstance(low, int) and isinstance(high, int) and low > high:
        if "min_new_tokens" in options and "max_new_tokens" in options:
            raise InputError(f"--min-new-tokens {low} is more than --max-new-tokens {high}")
        if "min_new_tokens" in options:
            options["max_new_tokens"] = low
        else:
            options["min_new_tokens"] = high


def _checked(func):
    """`func` preceded by the checks that need no model, so a wrong --out fails before a long computation."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "out", None):
            from ..tasks.inputs import image_paths

            inputs = image_paths(args.images) if args.images else []
            check_output(args.out, "--out", inputs, ".png")
        return func(args)

    return run


def _fmt(x: float | None, spec: str = "7.3f") -> str:
    return format(x, spec) if x is not None else f"{'-':>{int(spec.split('.')[0])}}"


def _sample_seed(args: argparse.Namespace) -> None:
    if args.sample:
        import torch

        torch.manual_seed(args.seed)


# ----------------------------------------------------------------------------------------------------------- commands


def cmd_match(args: argparse.Namespace) -> int:
    from ..tasks.ranking import Collection

    paths, texts = _images(args), _texts(args)
    model = _load(args)
    collection = Collection(model, texts=texts)
    bulk = Bulk(args, paths)
    for batch, pixels in bulk.images(model, 1):
        hits = collection.search_texts(pixels, k=args.top_k or len(texts), top_n=args.top_n or len(texts))
        result = {"image": str(batch[0]), "hits": [{"text": texts[h.index], **h.to_dict()} for h in hits]}
        lines = [str(batch[0]), f"  {'#':>3} {'score':>7} {'ITC':>7} {'ITM':>7}  text"]
        lines += [f"  {rank:>3} {_fmt(h['score'])} {_fmt(h['itc'])} {_fmt(h['itm'])}  {h['text']}"
                  for rank, h in enumerate(result["hits"], 1)]
        bulk.write(result, "\n".join(lines))
    return bulk.finish()


def cmd_classify(args: argparse.Namespace) -> int:
    from ..tasks.inputs import read_texts
    from ..tasks.zeroshot import DEFAULT_TEMPLATES, classify

    paths = _images(args)
    labels = read_texts(args.labels, args.labels_file, "labels")
    templates = args.template or list(DEFAULT_TEMPLATES)
    model = _load(args)
    bulk = Bulk(args, paths)
    for batch, pixels in bulk.images(model, args.batch_size):
        top = classify(model, pixels, labels, templates, head=args.head, k=args.top_k, progress=False)
        for path, best in zip(batch, top, strict=True):
            text = f"{path}: " + ", ".join(f"{label} ({score:.3f})" for label, score in best)
            bulk.write({"image": str(path), "top": [{"label": lab, "score": s} for lab, s in best]}, text)
    return bulk.finish()


BULK_CAPTION = ("write_out", "db", "ext", "overwrite", "prefix", "suffix", "recursive", "workers", "errors",
                "path_column", "text_column", "commit_seconds")  # options of `caption --write` only
BULK_FLAGS = {"write_out": "--out", "db": "--db", "ext": "--ext", "overwrite": "--overwrite", "prefix": "--prefix",
              "suffix": "--suffix", "recursive": "--recursive", "workers": "--workers", "errors": "--errors",
              "path_column": "--path-column", "text_column": "--text-column", "commit_seconds": "--commit-seconds"}


def _caption_options(args: argparse.Namespace, model) -> dict[str, Any]:
    """The `model.caption` options the command line gave (the model's defaults for the others)."""
    given = dict(prompt=args.prompt, num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                 min_new_tokens=args.min_new_tokens, num_captions=args.num_captions)
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}  # else the model's defaults
    _fit_lengths(model.caption, options)
    options["do_sample"] = args.sample
    if args.sample:
        options.update(top_p=args.top_p, temperature=args.temperature)
    return options


def cmd_caption(args: argparse.Namespace) -> int:
    from .executor import executor_options

    if args.write is None and args.executor != "local":
        raise InputError("--executor ray runs bulk captioning: add --write sidecar|jsonl|parquet|table")
    if args.write is not None:
        return _caption_bulk(args)
    executor_options(args)  # Ray flags without --executor ray: refused
    given = [BULK_FLAGS[d] for d in BULK_CAPTION if getattr(args, d) not in (None, False)]
    if given:
        raise InputError(f"{given[0]} applies to bulk captioning: add --write sidecar|jsonl|parquet|table")
    paths = _images(args)
    model = _load(args)
    options = _caption_options(args, model)
    _sample_seed(args)
    bulk = Bulk(args, paths)
    for batch, pixels in bulk.images(model, args.batch_size):
        for path, c in zip(batch, model.caption(pixels, **options), strict=True):
            key, text = ("caption", c) if isinstance(c, str) else ("captions", " | ".join(c))
            bulk.write({"image": str(path), key: c}, f"{path}\t{text}")
    return bulk.finish()


def _caption_bulk(args: argparse.Namespace) -> int:
    """`caption --write ...`: the resumable job of `blipkit.collections.caption_images`."""
    from ..collections.caption import caption_images, check_job
    from .executor import executor_options

    if args.write == "table" and args.write_out is not None:
        raise InputError("--write table writes into the database --db DIR (its --table): drop --out")
    if args.write != "table" and (args.db is not None or args.table is not None):
        raise InputError(f"--{'db' if args.db is not None else 'table'} is for --write table")
    out = args.db if args.write == "table" else args.write_out
    ext = args.ext or ".txt"
    if args.write != "sidecar" and args.ext is not None:
        raise InputError(f"--ext names caption files of --write sidecar; --write {args.write} writes {out}")
    check_job(args.images, args.write, out, ext, args.errors, args.recursive, args.path_column, args.text_column)
    ray = executor_options(args)  # flags checked, the cluster's address reached, before the model loads
    model = _load(args)  # after the checks: a wrong path fails before the model loads
    summary = caption_images(
        args.images, model, write=args.write, out=out, table=args.table or "captions", ext=ext,
        overwrite=args.overwrite, prefix=args.prefix or "", suffix=args.suffix or "", seed=args.seed,
        recursive=args.recursive, batch_size=args.batch_size, workers=args.workers, progress=True,
        errors=args.errors, path_column=args.path_column, text_column=args.text_column,
        executor=args.executor, ray=ray,
        commit_seconds=args.commit_seconds, **_caption_options(args, model),
    ).to_dict()
    if args.json:
        write_line(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    for f in summary.get("failures", []):
        write_line(f"failed: {f['path']}: {f['reason']}", sys.stderr)
    where = {"sidecar": f"caption files ({ext}) next to the images", "table": f"table '{args.table or 'captions'}' "
             f"in {out}"}.get(args.write, str(out))
    write_line(f"{summary['added']} captioned, {summary['skipped']} skipped, {summary['failed']} failed "
               f"({summary['images_per_second']:.1f} images/s) -> {where}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from ..tasks.inputs import read_texts

    paths = _images(args)
    answers = read_texts(args.answers, args.answers_file, "answers") if args.answers or args.answers_file else None
    model = _load(args)
    options = {} if args.beams is None else {"num_beams": args.beams}
    if answers is not None:
        model.require("rank_answers", "rank given answers (drop --answers to generate them)")
        options["answers"] = answers
    bulk = Bulk(args, paths)
    for batch, pixels in bulk.images(model, args.batch_size):
        for path, answer in zip(batch, model.answer(pixels, [args.question] * len(batch), **options), strict=True):
            bulk.write({"image": str(path), "question": args.question, "answer": answer}, f"{path}\t{answer}")
    return bulk.finish()


def cmd_ground(args: argparse.Namespace) -> int:
    from ..tasks.grounding import ground, render_grounding
    from ..tasks.inputs import read_texts

    path = _one_image(args, args.phrases, "phrase")
    phrases = read_texts(args.phrases + (args.texts or []), args.texts_file, "phrases")
    model = _load(args)
    found = [ground(model, path, p, layer=args.layer, threshold=args.threshold, source=args.source)
             for p in _progress(phrases, "ground")]
    picture = _picture(args, lambda out: render_grounding(found, path, out, tokens=args.tokens))
    data = {"image": str(path), "picture": picture, "results": [g.to_dict(maps=args.maps) for g in found]}
    lines = [f"{path}  (GradCAM, {found[0].cam.part} layer {found[0].cam.layer}, {found[0].cam.source} map)"]
    for g in found:
        box = ", ".join(f"{v:.3f}" for v in g.box)
        lines.append(f"  [{box}]  match {g.match:.3f}  {g.phrase}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from ..tasks.attention import cross_attention_maps, render_attention

    path = _one_image(args, args.words, "text")
    words = args.words + (args.text or [])
    text = " ".join(words) if words else None
    model = _load(args)
    maps = cross_attention_maps(model, path, text, layer=args.layer, suppress_common=args.suppress_common)
    picture = _picture(args, lambda out: render_attention(maps, path, out, heads=args.heads,
                                                          words_only=not args.all_tokens))
    data = {"image": str(path), "text": text, "picture": picture, "suppress_common": args.suppress_common,
            **maps.to_dict(maps=True)}
    gh, gw = maps.maps.shape[-2:]
    lines = [f"{path}  ({maps.part} layer {maps.layer}, {maps.maps.shape[1]} heads, {gh}x{gw} patches)",
             f"  {'token':<14} {'peak x':>7} {'peak y':>7} {'max':>7} {'to CLS':>7}"]
    heat = maps.mean_heads()
    for i, token in enumerate(maps.tokens):
        x, y = maps.peak(i)
        lines.append(f"  {token:<14} {x:7.3f} {y:7.3f} {float(heat[i].max()):7.3f} {float(maps.cls[i].mean()):7.3f}")
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_matrix(args: argparse.Namespace) -> int:
    from ..tasks.matrix import render_matrix, score_matrix

    paths, texts = _images(args), _texts(args)
    model = _load(args)
    scores = score_matrix(model, paths, texts, head=args.head, batch_size=args.batch_size)
    title = f"{'ITC cosine similarity' if args.head == 'itc' else 'ITM match probability'} · {args.model}"
    picture = _picture(args, lambda out: render_matrix(scores, paths, texts, out, title=title))
    data = {"head": args.head, "images": [str(p) for p in paths], "texts": texts, "scores": scores.tolist(),
            "picture": picture}
    width = max(len(p.name) for p in paths)
    lines = [f"{'':<{width}}  " + "  ".join(f"[{j}]".rjust(7) for j in range(len(texts)))]
    lines += [f"{p.name:<{width}}  " + "  ".join(f"{v:7.3f}" for v in row) for p, row in zip(paths, scores.tolist(),
                                                                                             strict=True)]
    lines += [f"[{j}] {t}" for j, t in enumerate(texts)]
    _emit(args, data, "\n".join(lines))
    return 0


def cmd_plot_space(args: argparse.Namespace) -> int:
    from ..tasks.inputs import image_paths, read_texts
    from ..tasks.space import embedding_space, render_space

    paths = image_paths(args.images) if args.images else []
    texts = read_texts(args.texts, args.texts_file) if args.texts or args.texts_file else []
    if len(paths) + len(texts) < 2:
        raise InputError("plot-space needs at least two images or texts to place")
    model = _load(args)
    space = embedding_space(model, paths or None, texts or None, method=args.method, seed=args.seed,
                            batch_size=args.batch_size)
    picture = _picture(args, lambda out: render_space(space, out, thumbnails=not args.no_thumbnails))
    lines = [f"{k:<5} {x:9.3f} {y:9.3f}  {lab}" for k, lab, (x, y) in
             zip(space.kinds, space.labels, space.coords.tolist(), strict=True)]
    _emit(args, {**space.to_dict(), "picture": picture}, f"{space.method} coordinates\n" + "\n".join(lines))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..tasks.facts import format_facts, model_facts

    facts = model_facts(_load(args))
    _emit(args, facts, format_facts(facts, arrays=args.arrays))
    return 0


# ----------------------------------------------------------------------------------------------------------- parser


def _add_images(p: argparse.ArgumentParser, one: bool = False, optional: bool = False) -> None:
    help_ = "an image file" if one else "image files, folders (their images) or glob patterns (quote them)"
    p.add_argument("images", nargs=1 if one else "*" if optional else "+", metavar="IMAGE", help=help_)


def _add_texts(p: argparse.ArgumentParser, help_: str, required: bool = True) -> None:
    p.add_argument("-t", "--texts", nargs="+", metavar="TEXT", help=help_)
    more = "more texts, one per line" + ("" if required else " (optional)")
    p.add_argument("--texts-file", metavar="FILE", help=more)


def _add_out(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", metavar="PNG", help="write the picture to this PNG file (its folder must exist)")


def _add_batch(p: argparse.ArgumentParser, default: int = 32) -> None:
    p.add_argument("--batch-size", type=integer(1, MAX_BATCH), default=default,
                   help=f"images per forward pass (default {default})")


def _add_layer(p: argparse.ArgumentParser, help_: str) -> None:
    p.add_argument("--layer", type=integer(), default=None, help=help_)


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=SOURCES, default=None,
                   help="the map the box comes from: 'phrase' (mean over the phrase's words) or 'itm' (the position "
                   "the ITM head reads; BLIP-2: both are the queries' mean) (default: the model's, else phrase)")


def _options_match(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    _add_texts(p, "candidate texts")
    p.add_argument("-k", "--top-k", type=integer(1), default=None, help="show the k best texts (default: all)")
    p.add_argument("--top-n", type=integer(1), default=None,
                   help="two-stage: ITM scores only the N best by ITC (default: all); score = ITM logit + ITC")


def _options_classify(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    p.add_argument("-l", "--labels", nargs="+", metavar="LABEL", help="class names")
    p.add_argument("--labels-file", metavar="FILE", help="more class names, one per line")
    p.add_argument("--template", action="append", metavar="T",
                   help="prompt with {} for the label; repeat to average several (default: 'a picture of {}')")
    p.add_argument("--head", choices=["itc", "itm"], default="itc",
                   help="itc: softmax over labels (default); itm: match probability of each label")
    p.add_argument("-k", "--top-k", type=integer(1), default=5, help="labels shown per image (default 5)")
    _add_batch(p)


def _options_caption(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="SOURCE",
                   help="image files, folders or glob patterns (quote them); with --write also .txt path lists, "
                        ".parquet/.csv/.jsonl tables with a path column, webdataset .tar shards, NAME.lance tables")
    p.add_argument("--prompt", default=None, help="text each caption starts with")
    p.add_argument("--beams", type=integer(1, MAX_BEAMS), default=None, help="beam width (default: the model's)")
    p.add_argument("--max-new-tokens", type=integer(1, MAX_NEW_TOKENS), default=None,
                   help="longest caption in tokens (default: the model's)")
    p.add_argument("--min-new-tokens", type=integer(0, MAX_NEW_TOKENS), default=None,
                   help="shortest caption in tokens (default: the model's)")
    p.add_argument("--sample", action="store_true", help="nucleus sampling instead of beam search")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=0.9, help="nucleus mass, 0 < p <= 1 (0.9)")
    p.add_argument("--temperature", type=number(0, above=True), default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--num-captions", type=integer(1, MAX_CAPTIONS), default=None, help="captions per image (default 1)")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0,
                   help="random seed when sampling (with --write: each image's own, from the seed and its key)")
    _add_batch(p, 8)
    g = p.add_argument_group("bulk captioning (resumable; bad files become error records)")
    g.add_argument("--write", choices=["sidecar", "jsonl", "parquet", "table"], default=None,
                   help="sidecar: a caption file next to each image; jsonl / parquet: one file (--out); table: a "
                        "LanceDB table (--db, --table)")
    g.add_argument("--out", dest="write_out", metavar="FILE", help="the .jsonl / .parquet file to write")
    g.add_argument("--db", metavar="DIR", help="database directory of --write table")
    g.add_argument("--table", default=None, help="table of --write table (default: captions; errors: TABLE_errors)")
    g.add_argument("--ext", default=None, help="caption file suffix of --write sidecar (default .txt)")
    done = g.add_mutually_exclusive_group()
    done.add_argument("--skip-existing", dest="overwrite", action="store_false",
                      help="skip images captioned already: their caption file exists, or their key is in the output "
                           "(default)")
    done.add_argument("--overwrite", dest="overwrite", action="store_true",
                      help="caption every image again and replace its caption")
    p.set_defaults(overwrite=False)
    g.add_argument("--prefix", default=None, help="text put before every caption, as it is (e.g. 'photo of sks, ')")
    g.add_argument("--suffix", default=None, help="text put after every caption, as it is")
    g.add_argument("--recursive", action="store_true", help="also the images in subfolders")
    g.add_argument("--workers", type=integer(0, 64), default=None,
                   help="decoding processes (default: cores - 1, at most 4; 0 decodes in this process)")
    g.add_argument("--errors", metavar="FILE", help="--write sidecar: append error records to this .jsonl file")
    g.add_argument("--path-column", help="path column of table sources (default: path, image, file_name ...)")
    g.add_argument("--text-column", help="text column of table sources, kept as `text` (default: text, caption)")
    from .executor import add_executor_arguments

    add_executor_arguments(p)
    from .common import add_commit_seconds

    add_commit_seconds(g)


def _options_ask(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    p.add_argument("-q", "--question", required=True, help="the question, asked of every image")
    p.add_argument("--answers", nargs="+", metavar="ANSWER", help="rank these candidate answers instead of generating")
    p.add_argument("--answers-file", metavar="FILE", help="candidate answers, one per line")
    p.add_argument("--beams", type=integer(1, MAX_BEAMS), default=None, help="beam width (default: the model's)")
    _add_batch(p, 8)


def _options_ground(p: argparse.ArgumentParser) -> None:
    _add_images(p, one=True)
    p.add_argument("phrases", nargs="*", metavar="PHRASE", help="phrases to find, one box each (quote each)")
    _add_texts(p, "more phrases (a phrase that looks like a file name goes here)")
    _add_layer(p, "cross-attention layer (default: the model's, else the middle one)")
    _add_source(p)
    p.add_argument("--threshold", type=number(0, 1, above=True), default=0.5,
                   help="fraction of the map's maximum in the box, 0 < t <= 1 (0.5)")
    p.add_argument("--tokens", action="store_true", help="draw each token's map too")
    p.add_argument("--maps", action="store_true", help="include the GradCAM maps in --json output")
    _add_out(p)


def _options_attention(p: argparse.ArgumentParser) -> None:
    _add_images(p, one=True)
    p.add_argument("words", nargs="*", metavar="TEXT", help="the text the model reads (optional for BLIP-2)")
    p.add_argument("-t", "--text", nargs="+", metavar="WORD", help="the text, as an option")
    _add_layer(p, "layer index (default: the middle cross-attention layer)")
    p.add_argument("--suppress-common", action="store_true",
                   help="subtract each patch's minimum over tokens (removes what every token attends to)")
    p.add_argument("--heads", action="store_true", help="draw every head, one row per token")
    p.add_argument("--all-tokens", action="store_true", help="draw special tokens ([CLS], [SEP]) too")
    _add_out(p)


def _options_matrix(p: argparse.ArgumentParser) -> None:
    _add_images(p)
    _add_texts(p, "texts (columns)")
    p.add_argument("--head", choices=["itc", "itm"], default="itc", help="itc: cosine (default); itm: probability")
    _add_batch(p)
    _add_out(p)


def _options_plot_space(p: argparse.ArgumentParser) -> None:
    _add_images(p, optional=True)
    _add_texts(p, "texts to place", required=False)
    p.add_argument("--method", choices=["auto", "tsne", "pca", "umap"], default="auto",
                   help="auto: t-SNE, PCA below 5 points (umap needs umap-learn)")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=0)
    p.add_argument("--no-thumbnails", action="store_true", help="draw images as dots")
    _add_batch(p)
    _add_out(p)


def _options_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arrays", action="store_true", help="list every named array with its shape and size")


# name, function, help, examples, options
COMMANDS: tuple[tuple[str, Any, str, tuple[str, ...], Any], ...] = (
    ("match", cmd_match, "rank texts against each image, ITC and ITM scores side by side", (
        'blipkit match scene.png -t "a red circle" "a blue square" "two green stars"',
        "blipkit match photos/ --texts-file captions.txt -k 3 --json   # one JSON line per image",
        "blipkit match 'shots/*.jpg' --texts-file captions.txt --top-n 16   # ITM re-ranks the 16 best by ITC",
    ), _options_match),
    ("classify", cmd_classify, "zero-shot classification of images over labels", (
        "blipkit classify scene.png -l circle square triangle star",
        'blipkit classify photos/ -l cat dog bird --template "a picture of a {}" --template "a photo of a {}"',
        "blipkit classify scene.png --labels-file colours.txt --head itm -k 3 --json",
    ), _options_classify),
    ("caption", cmd_caption, "caption images", (
        "blipkit caption scene.png",
        "blipkit caption photos/ --beams 5 --json > captions.jsonl   # unreadable images: skipped, listed, exit 1",
        'blipkit caption photo.jpg --prompt "a picture of" --sample --num-captions 3',
        "blipkit caption dataset/ --recursive --write sidecar --beams 3 --prefix 'photo of sks, '   # a.png -> a.txt",
        "blipkit caption 'shards/*.tar' --write parquet --out captions.parquet --json   # rerun to resume",
        "blipkit caption photos/ --write table --db photos.db --sample --seed 1 --num-captions 3",
    ), _options_caption),
    ("ask", cmd_ask, "answer a question about each image (VQA)", (
        'blipkit ask scene.png -q "what color is the circle?"',
        'blipkit ask photos/ -q "how many shapes are there?" --answers zero one two three --json',
    ), _options_ask),
    ("ground", cmd_ground, "find phrases in an image: a box per phrase from GradCAM over the ITM encoder", (
        'blipkit ground scene.png "the red circle" "the blue square" -o boxes.png',
        'blipkit ground scene.png "a yellow star" --layer 1 --threshold 0.4 --json',
        'blipkit ground scene.png --texts-file phrases.txt --tokens -o tokens.png   # a map per word too',
    ), _options_ground),
    ("attention", cmd_attention, "cross-attention maps of one layer: where each token looks in the image", (
        'blipkit attention scene.png "a red circle left of a blue square" -o attention.png',
        'blipkit attention scene.png -t a red circle --layer 0 --suppress-common --heads -o heads.png',
        'blipkit attention scene.png "a red circle" --json > maps.json   # [tokens, heads, grid_h, grid_w]',
    ), _options_attention),
    ("matrix", cmd_matrix, "score every image against every text (ITC or ITM), as numbers and a heatmap", (
        'blipkit matrix a.png b.png c.png -t "a red circle" "a blue square" -o matrix.png',
        "blipkit matrix photos/ --texts-file captions.txt --head itm --json",
    ), _options_matrix),
    ("plot-space", cmd_plot_space, "2-D map of image and text embeddings (t-SNE, PCA or UMAP)", (
        "blipkit plot-space photos/ -o space.png",
        "blipkit plot-space photos/ --texts-file captions.txt --method pca -o space.png --json",
        'blipkit plot-space -t "a red circle" "a blue circle" "a red square" "a blue square" -o words.png',
    ), _options_plot_space),
    ("info", cmd_info, "model facts: parameters per part and array, layer types, configuration", (
        "blipkit info",
        "blipkit info --model ./my-checkpoint --arrays",
        "blipkit info --model blip-itm-base-coco --json",
    ), _options_info),
)


def add_commands(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add the task subcommands to `blipkit`'s parser."""
    for name, func, help_, examples, options in COMMANDS:
        p = subparsers.add_parser(name, parents=[common], help=help_, description=help_,
                                  epilog=_examples(*examples), formatter_class=FORMATTER)
        p.set_defaults(func=_checked(func))
        options(p)
