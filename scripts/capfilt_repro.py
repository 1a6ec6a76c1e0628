"""CapFilt reproduced in small (BLIP, Table 1 and 2) on generated scenes with known web noise; see docs/capfilt.md.

    python scripts/capfilt_repro.py --work out/capfilt                    # the small budget of docs/capfilt.md
    python scripts/capfilt_repro.py --work out/capfilt-big --steps 3000 --ft-steps 1000 --vqa-steps 1000 \
        --vit-steps 3000 --n-train 20000 --arch small

Steps (each skipped when its output exists, so a stopped run continues where it was):
1. scenes with a web-noise training file (`write_dataset(web_noise=...)`): one caption per training image, a share
   replaced by another image's caption, a share with one word swapped; the val split is the clean "human-annotated"
   set, the test split is held out;
2. one from-scratch BLIP, its ViT pre-trained on the scenes' object labels (`--stage tags --tags boxes`, the stand-in
   for BLIP's ImageNet ViT), the start of every pre-training below;
3. pre-train on the noisy captions; fine-tune it on the clean set as captioner (LM) and as filter (ITC + ITM);
4. `blipkit capfilt` over the noisy captions with them (nucleus sampling, and beam search for Table 2);
5. pre-train again, with the same steps, on: noisy, +filter, +captioner, +both (nucleus), +both (beam), clean;
6. evaluate each on the test split: retrieval and captioning as pre-trained, VQA after the same short VQA
   fine-tuning on the clean set; the filter's precision and recall on the known noise.

Every training job runs under `nice -n 19` with OMP_WAIT_POLICY=PASSIVE (the machine is shared). Results go to
WORK/results.json and WORK/results.md; every command run is in WORK/commands.sh with its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("noisy", "clean", "both", "filter", "captioner", "both-beam")
ARCH_MINI = {"image_size": 64, "patch_size": 8, "width": 64, "heads": 2, "vision_layers": 2, "text_layers": 2,
             "intermediate": 128, "embed_dim": 32, "max_text_length": 40}


def run(cmd: list[str], work: Path, nice: bool = True) -> None:
    """Run one command (niced), appending it and its wall time to WORK/commands.sh."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    full = (["nice", "-n", "19"] if nice else []) + cmd
    print("+", shlex.join(cmd), flush=True)
    start = time.time()
    subprocess.run(full, check=True, env=env)
    with open(work / "commands.sh", "a") as f:
        f.write(f"{shlex.join(cmd)}   # {time.time() - start:.0f} s\n")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blipkit.cli", *args]


def make_data(a: argparse.Namespace, work: Path) -> Path:
    """Scenes with `annotations/train_web.json` and its clean twin `train_clean.json` (same images, true captions)."""
    from blipkit.data.scenes import write_dataset

    root = work / "scenes"
    if not (root / "dataset.json").is_file():
        write_dataset(root, a.n_train, a.n_val, a.n_test, seed=a.seed, progress=False,
                      web_noise=(a.mismatched, a.partial))
    clean = root / "annotations" / "train_clean.json"
    if not clean.is_file():
        web = json.loads((root / "annotations" / "train_web.json").read_text())
        clean.write_text(json.dumps([{"image": e["image"], "caption": e["true_caption"]} for e in web]))
    return root


def make_init(a: argparse.Namespace, root: Path, work: Path) -> Path:
    """A from-scratch BLIP (vocabulary of every split's texts, whitened patch embedding), ViT trained on object tags."""
    init, vit = work / "init", work / "vit"
    if not (init / "config.json").is_file():
        import blipkit
        from blipkit.data.readers import load_items
        from blipkit.train.model import Arch, sample_pixels, scratch_model, whiten_patch_embedding
        from blipkit.train.vocab import build_tokenizer

        items = [it for s in ("train", "val", "test") for it in load_items(root, s).items]
        texts = [t for it in items for t in it.captions] + [t for it in items for q, ans in it.qa for t in (q, *ans)]
        arch = Arch(**ARCH_MINI) if a.arch == "mini" else a.arch
        length = ARCH_MINI["max_text_length"] if a.arch == "mini" else 64
        model = scratch_model(arch, build_tokenizer(texts, max_length=length), seed=a.seed)
        whiten_patch_embedding(model, sample_pixels(model, items, n=256, seed=a.seed))
        blipkit.save(model, init)
    if a.vit_steps and not (vit / "config.json").is_file():
        run(cli("train", "--stage", "tags", "--tags", "boxes", "--data", str(root), "--model", str(init),
                    "--out", str(vit), "--steps", str(a.vit_steps), "--batch-size", "32", "--lr", "5e-4",
                    "--warmup", "50", "--save-every", str(a.vit_steps), "--seed", str(a.seed)), work)
    return vit if a.vit_steps else init


def train(a: argparse.Namespace, work: Path, out: Path, start: Path, data: list[str], objectives: str, steps: int,
          lr: str) -> Path:
    if not (out / "config.json").is_file() or (out / "checkpoint.pt").is_file() and not _finished(out, steps):
        run(cli("train", *data, "--model", str(start), "--out", str(out), "--objectives", objectives,
                    "--steps", str(steps), "--batch-size", "32", "--lr", lr, "--warmup", str(max(1, steps // 10)),
                    "--save-every", str(steps), "--seed", str(a.seed)), work)
    return out


def _finished(out: Path, steps: int) -> bool:
    log = out / "train_log.jsonl"
    if not log.is_file():
        return False
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return bool(rows) and rows[-1].get("step", 0) >= steps


def evaluate(work: Path, model: Path, root: Path, tasks: str, out: Path) -> dict:
    if not out.is_file():
        run(cli("eval", "--model", str(model), "--data", str(root), "--split", "test", "--tasks", tasks,
                    "--out", str(out)), work)
    return json.loads(out.read_text())["metrics"]


def row_data(row: str, root: Path, work: Path, nucleus: str = "nucleus") -> Path:
    """The pre-training captions of a row (Karpathy list JSON, paths relative to the scenes root)."""
    import pyarrow.parquet as pq

    ann = root / "annotations"
    fixed = {"noisy": ann / "train_web.json", "clean": ann / "train_clean.json",
             "both": work / f"capfilt-{nucleus}" / "annotations.json",
             "both-beam": work / "capfilt-beam" / "annotations.json"}
    if row in fixed:
        return fixed[row]
    out = work / f"rows/{row}.json"
    if not out.is_file():
        t = pq.read_table(work / f"capfilt-{nucleus}" / "candidates.parquet").to_pylist()
        keep = {"filter": lambda r: r["source"] == "web" and r["verdict"] == "keep",
                "captioner": lambda r: True}[row]
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps([{"image": r["image"], "caption": r["caption"]} for r in t if keep(r)]))
    return out


def bootstrap(a: argparse.Namespace, work: Path, name: str, annotations: Path, captioner: str | Path,
              filt: str | Path, img: list[str], extra: list[str] = ()) -> Path:
    """`blipkit capfilt` into WORK/capfilt-NAME (skipped when done)."""
    out = work / f"capfilt-{name}"
    if not (out / "candidates.parquet").is_file():
        run(cli("capfilt", str(annotations), *img, "--out", str(out), "--captioner", str(captioner), "--filter",
                str(filt), "--samples", str(a.samples), "--min-new-tokens", "1", "--seed", str(a.seed), *extra), work)
    return out


def subset(annotations: Path, n: int, out: Path) -> Path:
    """The first `n` entries of an annotation file (written once)."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json.loads(annotations.read_text())[:n]))
    return out


def _pairs_named(caption: str) -> set[tuple[str, str]]:
    from blipkit.data.scenes import _pairs

    return _pairs(caption.split(" "))


def _auc(positive: list[float], negative: list[float]) -> float:
    """How often a true caption scores above a wrong one (ties count half): the filter's ranking quality."""
    import numpy as np

    if not positive or not negative:
        return float("nan")
    neg = np.sort(np.asarray(negative))
    pos = np.asarray(positive)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + ties / 2).sum() / (len(pos) * len(neg)))


def filter_quality(root: Path, work: Path, which: str, images: set[str] | None = None) -> dict:
    """Precision / recall of the filter at finding the known noise; how many synthetic captions are right."""
    import pyarrow.parquet as pq

    web = json.loads((root / "annotations" / "train_web.json").read_text())
    boxes = {b["image"]: {(o["colour"], o["shape"]) for o in b["objects"]}
             for b in json.loads((root / "annotations" / "train_boxes.json").read_text())}
    label = {(e["image"], e["caption"]): e["noise"] for e in web}
    rows = [r for r in pq.read_table(work / f"capfilt-{which}" / "candidates.parquet").to_pylist()
            if images is None or r["image"] in images]
    web_rows = [r for r in rows if r["source"] == "web"]
    dropped_noisy = sum(r["verdict"] == "drop" and label[r["image"], r["caption"]] != "clean" for r in web_rows)
    dropped = sum(r["verdict"] == "drop" for r in web_rows)
    noisy = sum(label[r["image"], r["caption"]] != "clean" for r in web_rows)
    out = {"web": len(web_rows), "noisy": noisy, "dropped": dropped,
           "precision": dropped_noisy / max(1, dropped), "recall": dropped_noisy / max(1, noisy),
           "clean_kept": sum(r["verdict"] == "keep" and label[r["image"], r["caption"]] == "clean" for r in web_rows)
           / max(1, len(web_rows) - noisy)}
    out["auc"] = _auc([r["score"] for r in web_rows if label[r["image"], r["caption"]] == "clean"],
                      [r["score"] for r in web_rows if label[r["image"], r["caption"]] != "clean"])
    for kind in ("mismatched", "partial"):
        n = [r for r in web_rows if label[r["image"], r["caption"]] == kind]
        out[f"recall_{kind}"] = sum(r["verdict"] == "drop" for r in n) / max(1, len(n))
    syn = [r for r in rows if r["source"] == "synthetic"]
    # a caption naming a colour-shape pair the image lacks is certainly wrong (the scenes grammar: "colour shape")
    wrong = [bool(_pairs_named(r["caption"]) - boxes[r["image"]]) for r in syn]
    kept = [r["verdict"] == "keep" for r in syn]
    out.update(synthetic=len(syn), synthetic_kept=sum(kept), synthetic_distinct=len({r["caption"] for r in syn}),
               synthetic_wrong=sum(wrong) / max(1, len(syn)),
               synthetic_kept_wrong=sum(w and k for w, k in zip(wrong, kept, strict=True)) / max(1, sum(kept)))
    return out


def pretrain_row(a: argparse.Namespace, work: Path, row: str, root: Path, start: Path, nucleus: str,
                 img: list[str], val: list[str]) -> dict:
    """Pre-train on a row's captions; retrieval and captioning as pre-trained, VQA after the VQA fine-tuning."""
    runs = work / "runs"
    data = row_data(row, root, work, nucleus)
    pt = train(a, work, runs / f"pt-{row}", start, ["--data", str(data), *img], "itc,itm,lm", a.steps, a.lr)
    metrics = evaluate(work, pt, root, "retrieval,caption", runs / f"eval-{row}.json")
    vqa = train(a, work, runs / f"vqa-{row}", pt, val, "vqa", a.vqa_steps, a.vqa_lr)
    metrics.update(evaluate(work, vqa, root, "vqa", runs / f"eval-vqa-{row}.json"))
    return {"pairs": len(json.loads(data.read_text())), **metrics}


LABELS = {"noisy": "noisy web captions", "filter": "+ filter", "captioner": "+ captioner (nucleus)",
          "both": "+ captioner and filter (nucleus)", "both-beam": "+ captioner and filter (beam)",
          "clean": "clean captions (no noise)"}


def render(results: dict) -> str:
    """The tables of docs/capfilt.md from results.json."""
    out = ["| pre-training data | pairs | TR@1 | IR@1 | IR@1 (any) | R mean | CIDEr | colour-shape | VQA |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row, m in results["rows"].items():
        out.append(f"| {LABELS[row]} | {m['pairs']} | {m['TR@1']:.1f} | {m['IR@1']:.1f} | {m['IR@1_any']:.1f} | "
                   f"{m['R_mean']:.1f} | {m['CIDEr']:.1f} | {m['caption_colour_shape_acc']:.1f} | "
                   f"{m['VQA_acc']:.1f} |")
    out += ["", "| bootstrap | web captions | filter precision | recall (mismatched / partial) | true web kept | AUC |",
            "| --- | --- | --- | --- | --- | --- |"]
    for which, f in results["filter"].items():
        out.append(f"| {which} | {f['web']} | {100 * f['precision']:.1f} % | {100 * f['recall']:.1f} % "
                   f"({100 * f['recall_mismatched']:.1f} / {100 * f['recall_partial']:.1f}) | "
                   f"{100 * f['clean_kept']:.1f} % | {f['auc']:.3f} |")
    out += ["", "| bootstrap | synthetic kept | distinct | naming an absent pair | of those kept |",
            "| --- | --- | --- | --- | --- |"]
    for which, f in results["filter"].items():
        out.append(f"| {which} | {f['synthetic_kept']} / {f['synthetic']} | {f['synthetic_distinct']} | "
                   f"{100 * f['synthetic_wrong']:.1f} % | {100 * f['synthetic_kept_wrong']:.1f} % |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="out/capfilt", help="working directory (rerun with it to resume)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=500, help="the clean 'human-annotated' set")
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--mismatched", type=float, default=0.3)
    p.add_argument("--partial", type=float, default=0.2)
    p.add_argument("--arch", default="mini", help="mini (64 px, width 64, 2 + 2 layers) or a blipkit arch (small)")
    p.add_argument("--vit-steps", type=int, default=300, help="ViT pre-training on object tags (0: none)")
    p.add_argument("--steps", type=int, default=500, help="pre-training steps of every row")
    p.add_argument("--ft-steps", type=int, default=200, help="captioner and filter fine-tuning steps")
    p.add_argument("--vqa-steps", type=int, default=150, help="VQA fine-tuning steps of every row")
    p.add_argument("--samples", type=int, default=1, help="synthetic captions per image")
    p.add_argument("--captioner", default=None, help="bootstrap the rows with this captioner instead of the recipe's")
    p.add_argument("--filter", default=None, help="bootstrap the rows with this filter (default: --captioner)")
    p.add_argument("--beam-images", type=int, default=1000, help="images of the nucleus vs beam comparison (0: all)")
    p.add_argument("--rows-only", default=None, metavar="ROWS",
                   help="only pre-train and evaluate these rows (comma list; those of a bootstrap need it done)")
    p.add_argument("--beam-row", action="store_true", help="also pre-train on the beam bootstrap (needs "
                   "--beam-images 0)")
    p.add_argument("--lr", default="2e-3", help="pre-training learning rate")
    p.add_argument("--ft-lr", default="5e-4", help="fine-tuning learning rate (captioner, filter)")
    p.add_argument("--vqa-lr", default="1e-3", help="VQA fine-tuning learning rate")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.beam_row and a.beam_images:
        p.error("--beam-row pre-trains on the beam bootstrap of every image: pass --beam-images 0 too")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    root = make_data(a, work)
    start = make_init(a, root, work)
    img = ["--image-root", str(root)]
    runs = work / "runs"
    noisy = train(a, work, runs / "pt-noisy", start, ["--data", str(row_data("noisy", root, work)), *img],
                  "itc,itm,lm", a.steps, a.lr)
    val = ["--data", str(root), "--split", "val"]
    if a.rows_only:  # some rows only, e.g. in a second process beside the main one (rows share no output)
        nucleus = "nucleus" if a.captioner or a.filter else "recipe"
        for row in a.rows_only.split(","):
            pretrain_row(a, work, row, root, start, nucleus, img, val)
        return
    # the paper's captioner and filter: the noisy pre-training fine-tuned on the clean set (LM; ITC + ITM)
    captioner = train(a, work, runs / "captioner", noisy, val, "lm", a.ft_steps, a.ft_lr)
    filt = train(a, work, runs / "filter", noisy, val, "itc,itm", a.ft_steps, a.ft_lr)
    web = root / "annotations" / "train_web.json"
    bootstrap(a, work, "recipe", web, captioner, filt, img)
    # the bootstrap the rows train on: with the recipe's models, or with the models given
    given = a.captioner is not None or a.filter is not None
    boot = (a.captioner or str(captioner), a.filter or a.captioner or str(filt))
    if given:
        bootstrap(a, work, "nucleus", web, *boot, img)
    nucleus = "nucleus" if given else "recipe"
    compare = web if not a.beam_images else subset(web, a.beam_images, work / "rows" / "beam-images.json")
    bootstrap(a, work, "beam", compare, *boot, img, ["--decoding", "beam"])
    images = {e["image"] for e in json.loads(compare.read_text())}
    results: dict = {"settings": vars(a), "filter": {
        "recipe": filter_quality(root, work, "recipe"),
        **({"nucleus": filter_quality(root, work, "nucleus")} if given else {}),
        "nucleus (same images as beam)": filter_quality(root, work, nucleus, images),
        "beam": filter_quality(root, work, "beam", images)}, "rows": {}}
    for row in ROWS if a.beam_row else ROWS[:-1]:
        results["rows"][row] = pretrain_row(a, work, row, root, start, nucleus, img, val)
        (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["minutes"] = round((time.time() - t0) / 60, 1)
    (work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (work / "results.md").write_text(render(results))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
