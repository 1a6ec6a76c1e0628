"""Training: each loss on hand-checkable inputs, data readers and their errors, the loop (loss goes down, exact
resume, interruption, architecture mismatch), Hub-format output read by blipkit and transformers, DDP."""

from __future__ import annotations

import json
import math
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import blipkit
from blipkit.cli import main as cli
from blipkit.data import readers
from blipkit.data.scenes import NUMBER_WORDS, write_dataset
from blipkit.errors import CheckpointError, InputError
from blipkit.train import data as tdata
from blipkit.train import loop
from blipkit.train.losses import Objectives, itc_loss, itm_loss, lm_loss, sample_hard_negatives
from blipkit.train.model import sample_pixels, scratch_model, whiten_patch_embedding
from blipkit.train.tags import (
    PATCH_LABELS_FILE,
    PLACES,
    TAG_HEAD_FILE,
    TAGS_FILE,
    build_tags,
    caption_tags,
    dense_blip_recipe,
    load_patch_heads,
    object_place,
    patch_classes,
    patch_targets,
    read_boxes,
    read_labels,
    tag_targets,
    tags_recipe,
)
from blipkit.train.vocab import SPECIALS, build_tokenizer

from .conftest import torchrun

# ------------------------------------------------------------------------------------------------ losses


def test_itc_loss_by_hand():
    emb = torch.eye(2)
    p = math.e / (math.e + 1)  # softmax([1, 0])[0] at temperature 1
    assert itc_loss(emb, emb, 1.0).item() == pytest.approx(-math.log(p), abs=1e-6)
    smoothed = -(0.95 * math.log(p) + 0.05 * math.log(1 - p))  # 0.1 spread over 2 columns
    assert itc_loss(emb, emb, 1.0, label_smoothing=0.1).item() == pytest.approx(smoothed, abs=1e-6)
    # two positives in a row: each gets half the target mass
    pos = torch.tensor([[True, True], [True, True]])
    assert itc_loss(emb, emb, 1.0, positives=pos).item() == pytest.approx(
        -(0.5 * math.log(p) + 0.5 * math.log(1 - p)), abs=1e-6
    )
    # a lower temperature sharpens: the loss of the right pairing falls
    assert itc_loss(emb, emb, 0.1).item() < itc_loss(emb, emb, 1.0).item()


def test_hard_negatives_never_positive():
    sim = torch.tensor([[5.0, 4.0, -9.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    pos = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    for _ in range(20):
        neg = sample_hard_negatives(sim, pos)
        assert neg[0] == 1  # the only non-positive column
        assert neg[1] in (0, 2)
        assert neg[2] == -1  # every column positive: no negative
    # the hardest negative (highest similarity) is drawn most often
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_hard_negatives(torch.tensor([[0.0, 3.0, 0.0, 0.0]]),
                                       torch.tensor([[True, False, False, False]]), g)[0]) for _ in range(200)]
    assert draws.count(1) > 150


def test_itm_and_lm_loss_by_hand():
    assert itm_loss(torch.zeros(3, 2), torch.tensor([1, 0, 1])).item() == pytest.approx(math.log(2), abs=1e-6)
    V = 7
    ids = torch.tensor([[5, 1, 2, 3], [5, 4, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    logits = torch.zeros(2, 4, V)
    assert lm_loss(logits, ids, mask).item() == pytest.approx(math.log(V), abs=1e-6)  # uniform: log V per token
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 3] = 100.0  # row 0 predicted perfectly
    logits[1, 0, 4] = logits[1, 1, 3] = 100.0
    logits[1, 2, 6] = 100.0  # predicts after the last real token: padding, ignored
    assert lm_loss(logits, ids, mask).item() == pytest.approx(0.0, abs=1e-6)
    # label smoothing 0.1 over V classes on a perfect prediction costs -(0.9 + 0.1/V) log(1) - ... > 0
    assert lm_loss(logits, ids, mask, label_smoothing=0.1).item() > 1.0
    # a prompt's tokens are not predicted
    bad = logits.clone()
    bad[:, 0] = 0.0
    assert lm_loss(bad, ids, mask, prompt_length=2).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, n_train=48, n_val=4, n_test=12, seed=3, image_size=32, progress=False)
    return root


def _tiny(scenes_dir: Path, seed: int = 0):
    items = readers.load_items(scenes_dir, "train").items
    texts = [c for it in items for c in it.captions] + [t for it in items for q, a in it.qa for t in (q, *a)]
    return scratch_model("tiny", build_tokenizer(texts), seed=seed), items


def _cfg(out: Path, **kw) -> loop.TrainConfig:
    base = dict(out=out, steps=6, batch_size=8, lr=1e-3, warmup=2, save_every=3, progress=False, log_every=1)
    return loop.TrainConfig(**{**base, **kw})


def test_objectives_all_losses(scenes):
    model, items = _tiny(scenes)
    collate = tdata.Collate(model.tokenizer, 40)
    ds = tdata.ItemDataset(items, model.processor, 0)
    batch = collate([ds[(0, i)] for i in range(6)])
    losses = Objectives(model)(batch)
    assert set(losses) == {"itc", "itm", "lm", "vqa"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_whitened_patch_embedding_decorrelates_patches(scenes):
    model, items = _tiny(scenes)
    pixels = sample_pixels(model, items, n=64, seed=0)
    assert pixels.shape == (min(64, len(items)), 3, 32, 32)
    whiten_patch_embedding(model, pixels, gain=1.0)
    conv = model.vision_model.embeddings.patch_embedding
    out = torch.nn.functional.conv2d(pixels, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    out = out.reshape(-1, out.shape[-1])
    cov = torch.cov(out.T.double())
    # the leading directions come out with unit variance and uncorrelated (eps shrinks the weakest ones only)
    top = cov[:8, :8]
    assert torch.allclose(top.diagonal(), torch.ones(8, dtype=top.dtype), atol=0.05), top.diagonal()
    assert (top - torch.diag(top.diagonal())).abs().max() < 0.05


def test_cli_patch_init_needs_arch(scenes, tmp_path, capsys):
    assert cli(["train", "--data", str(scenes), "--out", str(tmp_path), "--patch-init", "whiten"]) != 0
    assert "--patch-init" in capsys.readouterr().err


def test_caption_tags_and_vocabulary():
    assert caption_tags(["A Red circle.", "a red square"]) == {
        "a", "red", "circle", ".", "square", "a red", "red circle", "circle .", "red square"}
    items = [readers.Item(Path(f"{i}.png"), f"{i}.png", [f"a {c} circle", "an image"]) for i, c in
             enumerate(["red"] * 3 + ["blue"] * 2 + ["green"])]
    # "a", "circle", "an image" are used by every image (more than half), "green" by one (fewer than 2)
    assert build_tags(items, min_count=2, max_share=0.5) == ["a blue", "a red", "blue", "blue circle", "red",
                                                             "red circle"]
    targets = tag_targets(items, ["blue", "red circle"])
    assert targets[tdata._key("0.png")].tolist() == [0.0, 1.0]
    assert targets[tdata._key("3.png")].tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match="at least 50"):
        build_tags(items, min_count=50)


def test_tags_from_labels_and_scene_boxes(scenes, tmp_path):
    items = readers.load_items(scenes, "train").items
    labels = read_labels(scenes / "annotations" / "train_boxes.json")
    boxes = {e["image"]: e["objects"] for e in json.loads((scenes / "annotations" / "train_boxes.json").read_text())}
    first = items[0]
    o = boxes[first.key][0]
    assert {o["colour"], o["shape"], f"{o['colour']} {o['shape']}"} <= labels[first.key]
    tags = build_tags(items, min_count=1, labels=labels)
    target = tag_targets(items, tags, labels)[tdata._key(first.key)]
    assert {tags[i] for i in target.nonzero().flatten().tolist()} == labels[first.key]
    (tmp_path / "labels.json").write_text(json.dumps({it.key: ["x"] for it in items[1:]}))
    with pytest.raises(InputError, match=f"no labels for 1 of {len(items)} images"):
        build_tags(items, labels=read_labels(tmp_path / "labels.json"))
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(InputError, match="entry 0"):
        read_labels(tmp_path / "bad.json")


def test_patch_targets_share_each_patch_by_covered_pixels(tmp_path):
    square = {"shape": "square", "colour": "red", "box_norm": [0.0, 0.0, 0.5, 0.5]}  # exactly the top-left patch
    half = {"shape": "blob", "colour": "blue", "box_norm": [0.5, 0.75, 1.0, 1.0]}  # not a scenes shape: its box
    classes = patch_classes({"a.png": [square], "b.png": [half]})
    assert classes == {"shape": ["background", "blob", "square"], "colour": ["background", "blue", "red"],
                       "where": ["background", *PLACES]}
    t = patch_targets([square, half], classes, grid=2)
    assert t["shape"].tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 0], [0.5, 0.5, 0]]
    assert t["colour"].tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 0], [0.5, 0.5, 0]]
    # the square's centre (0.25, 0.25) is in the top-left third, the half box's (0.75, 0.875) in the bottom right
    assert object_place(square) == "top left" and object_place(half) == "bottom right"
    where = classes["where"]
    assert t["where"][0, where.index("top left")] == 1 and t["where"][3, where.index("bottom right")] == 0.5
    assert object_place({"box_norm": [0.4, 0.0, 0.6, 1.0]}) == "centre"
    assert object_place({"box_norm": [0.9, 0.0, 1.0, 0.2]}) == "top right"
    assert patch_classes({"a.png": [square]}, grid=3) == {**patch_classes({"a.png": [square]}),
                                                           "row": ["0", "1", "2"], "column": ["0", "1", "2"]}
    circle = patch_targets([{"shape": "circle", "colour": "red", "box_norm": [0, 0, 1, 1]}],
                           {"shape": ["background", "circle"], "colour": ["background", "red"],
                            "where": ["background", *PLACES]}, grid=2, cell=32)
    # a circle filling the image covers pi/4 of it: each quadrant in the same share
    assert torch.allclose(circle["shape"][:, 1], torch.full((4,), math.pi / 4), atol=0.02)
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "objects": [{"shape": "square"}]}]))
    with pytest.raises(InputError, match=r"entry 0 \(a.png\) has an object without shape, colour and a box_norm"):
        read_boxes(tmp_path / "bad.json")


def test_patch_losses_by_hand(scenes):
    model, items = _tiny(scenes)
    boxes = read_boxes(scenes / "annotations" / "train_boxes.json")
    recipe = tags_recipe(model, items[:4], min_count=1, boxes=boxes)
    heads = recipe.objectives.patch_heads
    batch = recipe.collate([tdata.ItemDataset(items, model.processor, 0)[(0, i)] for i in range(4)])
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert batch["patch_shape"].shape == (4, grid * grid, len(heads["shape"].weight))
    with torch.no_grad():  # zero heads predict every class alike: the cross-entropy is log(classes)
        for head in heads.values():
            head.weight.zero_()
            head.bias.zero_()
    losses = recipe.objectives(batch)
    for f in ("shape", "colour", "where", "row", "column"):
        assert losses[f"patch_{f}"].item() == pytest.approx(math.log(heads[f].out_features), rel=1e-6)
    assert losses["count"].item() == pytest.approx(math.log(heads.count_values), rel=1e-6)
    # the count head's classes: every kind of each image counted by hand
    objects = [boxes[it.key] for it in items[:4]]
    counts = batch["counts"]
    shapes = {o["shape"] for objs in objects for o in objs}
    colours = {o["colour"] for objs in objects for o in objs}
    kinds = 1 + len(shapes) + len(colours) + len(shapes) * len(colours)
    assert counts.shape == (4, kinds) and heads["count"].out_features == kinds * heads.count_values
    assert counts[:, 0].tolist() == [len(o) for o in objects]
    assert heads.count_values == 1 + max(len(o) for o in objects)
    assert counts.sum(1).tolist() == [4 * len(o) for o in objects]  # all + shape + colour + colour-and-shape
    assert heads["row"].out_features == heads["column"].out_features == grid
    with torch.no_grad():  # a head sure of "background" everywhere: the loss is 20 x the covered share of patches
        heads["shape"].bias[0] = 20.0
    covered = 1 - batch["patch_shape"][..., 0].mean().item()
    assert recipe.objectives(batch)["patch_shape"].item() == pytest.approx(20 * covered, rel=1e-4, abs=1e-6)



def test_row_and_column_targets_are_each_patchs_own_place(scenes):
    """States whose patch tokens spell out their row and column: heads that read them have (almost) no loss, heads
    that read the other one have a large loss (row-major patch order)."""
    model, items = _tiny(scenes)
    recipe = tags_recipe(model, items[:2], min_count=1, boxes=read_boxes(scenes / "annotations" / "train_boxes.json"))
    objectives, heads = recipe.objectives, recipe.objectives.patch_heads
    grid = heads["row"].out_features
    width = model.config.vision_config.hidden_size
    states = torch.zeros(2, 1 + grid * grid, width)
    for p in range(grid * grid):
        states[:, 1 + p, p // grid] = 1.0  # row code in the first `grid` features
        states[:, 1 + p, grid + p % grid] = 1.0  # column code in the next ones

    class Spelled(torch.nn.Module):
        def forward(self, pixels):
            return states

    batch = recipe.collate([tdata.ItemDataset(items, model.processor, 0)[(0, i)] for i in range(2)])
    objectives.model.vision_model = Spelled()
    reads = {"row": 0, "column": grid}
    with torch.no_grad():
        for f, head in heads.items():
            if f in reads:
                head.weight.zero_()
                head.bias.zero_()
                head.weight[:, reads[f]:reads[f] + grid] = 30 * torch.eye(grid)
    losses = objectives(batch)
    assert losses["patch_row"].item() < 1e-6 and losses["patch_column"].item() < 1e-6
    with torch.no_grad():
        heads["row"].weight.copy_(heads["column"].weight)  # reads the column: wrong off the diagonal
    assert objectives(batch)["patch_row"].item() > 10

def test_cli_tags_stage_then_blip_from_it(scenes, tmp_path):
    out = tmp_path / "vit"
    args = ["train", "--stage", "tags", "--data", str(scenes), "--arch", "tiny", "--out", str(out), "--steps", "40",
            "--batch-size", "8", "--lr", "2e-3", "--warmup", "5", "--tag-min-count", "3", "--log-every", "1",
            "--patch-labels", "boxes", "--json"]
    assert cli(args) == 0
    rows = [json.loads(line) for line in (out / loop.LOG_FILE).read_text().splitlines()]
    for loss in ("tags", "patch_shape", "patch_colour", "patch_where", "patch_row", "patch_column", "count"):
        assert sum(r[loss] for r in rows[-5:]) < sum(r[loss] for r in rows[:5]) - 0.1, loss
    tags = json.loads((out / TAGS_FILE).read_text())
    assert "red" in tags and (out / TAG_HEAD_FILE).is_file()
    classes = json.loads((out / PATCH_LABELS_FILE).read_text())
    assert classes["shape"][0] == "background" and "circle" in classes["shape"] and "red" in classes["colour"]
    heads = load_file(out / TAG_HEAD_FILE)
    assert heads["patch_heads.shape.weight"].shape[0] == len(classes["shape"])
    assert heads["tag_head.weight"].shape[0] == len(tags)
    model = blipkit.load(out)
    assert model.tokenizer.token_to_id("what") is not None  # the vocabulary covers the questions, as BLIP's does
    start = scratch_model("tiny", model.tokenizer, seed=0)
    trained = model.vision_model.encoder.layers[0].mlp.fc1.weight
    assert not torch.equal(trained, start.vision_model.encoder.layers[0].mlp.fc1.weight)
    # only the image encoder trains in this stage
    assert torch.equal(model.text_decoder.bert.embeddings.word_embeddings.weight,
                       start.text_decoder.bert.embeddings.word_embeddings.weight)
    blip = tmp_path / "blip"
    assert cli(["train", "--data", str(scenes), "--model", str(out), "--out", str(blip), "--steps", "2",
                "--batch-size", "4", "--json"]) == 0
    assert torch.equal(blipkit.load(blip).tokenizer("a red circle")[0], model.tokenizer("a red circle")[0])


def test_cli_blip_stage_keeps_patch_objectives(scenes, tmp_path):
    vit = tmp_path / "vit"
    assert cli(["train", "--stage", "tags", "--data", str(scenes), "--arch", "tiny", "--out", str(vit), "--steps",
                "30", "--batch-size", "8", "--lr", "2e-3", "--warmup", "5", "--tag-min-count", "3", "--log-every", "1",
                "--patch-labels", "boxes", "--json"]) == 0
    tag_rows = [json.loads(line) for line in (vit / loop.LOG_FILE).read_text().splitlines()]
    saved = load_file(vit / TAG_HEAD_FILE)
    blip = tmp_path / "blip"
    assert cli(["train", "--data", str(scenes), "--model", str(vit), "--out", str(blip), "--steps", "3",
                "--batch-size", "8", "--lr", "1e-6", "--warmup", "1", "--log-every", "1", "--patch-labels", "boxes",
                "--json"]) == 0
    rows = [json.loads(line) for line in (blip / loop.LOG_FILE).read_text().splitlines()]
    for loss in ("itc", "itm", "lm", "vqa", "patch_shape", "patch_colour", "patch_where", "patch_row",
                 "patch_column", "count"):
        assert loss in rows[0], loss
    heads = load_file(blip / TAG_HEAD_FILE)
    assert set(heads) == {k for k in saved if k.startswith("patch_heads.")}
    for k, v in heads.items():  # the heads started where the tags run left them (3 steps at lr 1e-6 since)
        assert torch.allclose(v, saved[k], atol=1e-4), k
    assert abs(rows[0]["patch_row"] - tag_rows[-1]["patch_row"]) < 0.1
    assert json.loads((blip / PATCH_LABELS_FILE).read_text()) == json.loads((vit / PATCH_LABELS_FILE).read_text())
    assert blipkit.load(blip).family == "BLIP"


def test_dense_objectives_add_patch_losses_to_blips(scenes, tmp_path):
    model, items = _tiny(scenes)
    boxes = read_boxes(scenes / "annotations" / "train_boxes.json")
    recipe = dense_blip_recipe(loop.blip_recipe(model, _cfg(tmp_path)), items, boxes)
    batch = recipe.collate([tdata.ItemDataset(items, model.processor, 0)[(0, i)] for i in range(4)])
    torch.manual_seed(0)
    losses = recipe.objectives(batch)
    plain = Objectives(model).from_features(model.vision_model(batch["pixels"]), batch)
    for k in ("itc", "itm", "lm", "vqa"):
        assert torch.allclose(losses[k], plain[k]) or k == "itm", k  # ITM draws its negatives at random
    heads = recipe.objectives.patch_heads
    features = model.vision_model(batch["pixels"])
    assert torch.allclose(losses["patch_row"], heads.losses(features, batch)["patch_row"])
    assert torch.allclose(losses["count"], heads.losses(features, batch)["count"])
    with pytest.raises(InputError, match="no boxes for 1 of"):
        dense_blip_recipe(loop.blip_recipe(model, _cfg(tmp_path)), items, {k: v for k, v in list(boxes.items())[1:]})


def test_patch_heads_start_each_from_a_run_with_the_same_classes(scenes, tmp_path):
    """A run saved without the count head (its classes file has none): the BLIP stage starts every patch head from
    it and the count head fresh; a head whose classes changed starts fresh too."""
    model, items = _tiny(scenes)
    boxes = read_boxes(scenes / "annotations" / "train_boxes.json")
    tags = tags_recipe(model, items, min_count=1, boxes=boxes)
    with torch.no_grad():
        for head in tags.objectives.patch_heads.values():
            head.weight.normal_()
    tags.save(tmp_path)
    classes = json.loads((tmp_path / PATCH_LABELS_FILE).read_text())
    old = {k: v for k, v in classes.items() if k not in ("count", "count_values")}
    old["where"] = old["where"][:-1]  # a head whose classes differ
    (tmp_path / PATCH_LABELS_FILE).write_text(json.dumps(old))
    heads = tags.objectives.patch_heads
    assert load_patch_heads(dense_blip_recipe(loop.blip_recipe(model, _cfg(tmp_path / "b")), items,
                                              boxes).objectives.patch_heads, classes, tmp_path) == [
        "shape", "colour", "row", "column"]
    fresh = dense_blip_recipe(loop.blip_recipe(model, _cfg(tmp_path / "b")), items, boxes, start=tmp_path)
    for f in ("shape", "colour", "row", "column"):
        assert torch.equal(fresh.objectives.patch_heads[f].weight, heads[f].weight), f
    for f in ("where", "count"):
        assert not torch.equal(fresh.objectives.patch_heads[f].weight, heads[f].weight), f
    (tmp_path / PATCH_LABELS_FILE).write_text("[1, 2]")  # not a classes file: every head fresh
    assert load_patch_heads(fresh.objectives.patch_heads, classes, tmp_path) == []


def test_dense_recipe_gives_itm_each_caption_made_false_as_a_negative(scenes, tmp_path):
    from blipkit.train.scene_metrics import caption_facts

    model, items = _tiny(scenes)
    boxes = read_boxes(scenes / "annotations" / "train_boxes.json")
    recipe = dense_blip_recipe(loop.blip_recipe(model, _cfg(tmp_path)), items, boxes)
    samples = [tdata.ItemDataset(items, model.processor, 0)[(0, i)] for i in range(8)]
    false = recipe.collate.false_captions(samples)
    assert len(false) >= 6 and false == recipe.collate.false_captions(samples)
    for row, text in false:
        true, objects = samples[row].caption, boxes[items[row].key]
        changed = [(a, b) for a, b in zip(true.split(), text.split(), strict=True) if a != b]
        assert 1 <= len(changed) <= 2, (true, text)  # one word (and "shape"/"shapes" agreeing with a number)
        colours, shapes, pairs = caption_facts(text)
        have = {(o["colour"], o["shape"]) for o in objects}
        wrong_count = any(a in NUMBER_WORDS for a, _ in changed)
        assert (wrong_count or not set(pairs) <= have or not set(colours) <= {c for c, _ in have}
                or not set(shapes) <= {s for _, s in have}), (true, text, objects)
    batch = recipe.collate(samples)
    assert batch["false_rows"].tolist() == [row for row, _ in false]
    seen = []
    hook = model.itm_head.register_forward_hook(lambda m, i, o: seen.append(len(o)))
    torch.manual_seed(0)
    recipe.objectives(batch)
    torch.manual_seed(0)
    recipe.objectives({k: v for k, v in batch.items() if not k.startswith("false_")})
    hook.remove()
    assert seen[0] - seen[1] == len(false)  # the false captions went through ITM as negatives as well


COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "white", "black")


def test_lm_filter_picks_the_captioning_target(scenes):
    model, items = _tiny(scenes)
    ds = tdata.ItemDataset(items, model.processor, 0, lm_filter=rf"\b({'|'.join(COLOURS)})\b")
    batch = tdata.Collate(model.tokenizer, 40)([ds[(0, i)] for i in range(12)])
    named = [any(c in cap.split() for cap in items[i].captions for c in COLOURS) for i in range(12)]
    targets = model.tokenizer.batch_decode(batch["lm_ids"])
    assert sum(named) >= 6
    for row, text in zip(batch["lm_rows"].tolist(), targets, strict=True):
        assert any(c in text.split() for c in COLOURS) or not named[row], text
    assert "lm" in Objectives(model)(batch)


# ------------------------------------------------------------------------------------------------ the loop


def test_training_reduces_loss(scenes, tmp_path):
    model, items = _tiny(scenes)
    loop.train(model, items, _cfg(tmp_path, steps=40, warmup=5, lr=2e-3, save_every=100, log_every=1))
    rows = [json.loads(line) for line in (tmp_path / loop.LOG_FILE).read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.5, (first, last)
    for name in ("lm", "vqa"):
        assert sum(r[name] for r in rows[-5:]) < sum(r[name] for r in rows[:5])


def test_resume_is_exact(scenes, tmp_path):
    a, items = _tiny(scenes)
    loop.train(a, items, _cfg(tmp_path / "a"))
    b, _ = _tiny(scenes)
    r1 = loop.train(b, items, _cfg(tmp_path / "b", stop_after=3))
    assert r1.step == 3
    c, _ = _tiny(scenes, seed=1)  # different initial weights: everything must come from the checkpoint
    r2 = loop.train(c, items, _cfg(tmp_path / "b"))
    assert r2.step == 6
    for (name, p), q in zip(a.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name
    # the Hub-format output of the resumed run equals the uninterrupted one
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_crash_loses_only_steps_since_checkpoint(scenes, tmp_path, monkeypatch):
    model, items = _tiny(scenes)
    real = loop.batches

    def crashing(*args, **kw):
        it = real(*args, **kw)
        for _ in range(5):
            yield next(it)
        raise RuntimeError("power cut")

    monkeypatch.setattr(loop, "batches", crashing)
    with pytest.raises(RuntimeError, match="power cut"):
        loop.train(model, items, _cfg(tmp_path, save_every=2))
    monkeypatch.setattr(loop, "batches", real)
    state = torch.load(tmp_path / loop.STATE_FILE, weights_only=False)
    assert state["step"] == 4  # the last checkpoint before the crash at step 5
    fresh, _ = _tiny(scenes)
    assert loop.train(fresh, items, _cfg(tmp_path, save_every=2)).step == 6


def test_resume_other_architecture_is_an_error(scenes, tmp_path):
    model, items = _tiny(scenes)
    loop.train(model, items, _cfg(tmp_path, steps=2, save_every=2))
    other = scratch_model(loop_arch_wider(), model.tokenizer)
    with pytest.raises(CheckpointError, match="different architecture.*hidden_size"):
        loop.train(other, items, _cfg(tmp_path, steps=4))


def loop_arch_wider():
    import dataclasses

    from blipkit.train.model import ARCHS

    return dataclasses.replace(ARCHS["tiny"], width=48, heads=2)


# ------------------------------------------------------------------------------------------------ output format


def test_tokenizer_roundtrip_and_transformers(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(["A red circle left of two blue squares.", "how many objects are there?"])
    assert [tok.token_to_id(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    assert tok.pad_token_id == 0 and tok.bos_token_id == tok.token_to_id("[DEC]")
    tok.save(tmp_path)
    again = blipkit.processing.Tokenizer.from_dir(tmp_path)
    texts = ["a red circle", "Two BLUE squares, left of it", "zebra"]  # unseen words are spelled, not [UNK]
    ids, _ = again(texts)
    assert torch.equal(ids, tok(texts)[0])
    assert tok.token_to_id("[UNK]") not in ids.tolist()[2]
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf(texts, padding=True, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert again.decode(ids[1]) == "two blue squares, left of it"


def test_saved_model_reads_in_blipkit_and_transformers(scenes, tmp_path):
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipImageProcessor

    model, items = _tiny(scenes)
    loop.train(model, items, _cfg(tmp_path, steps=3))
    again = blipkit.load(tmp_path)
    image = str(items[0].image)
    with torch.no_grad():
        assert torch.allclose(again.match(image, ["a red circle"]), model.match(image, ["a red circle"]), atol=1e-6)
        pixels = BlipImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"]
        assert (pixels - again.pixels(image)).abs().max() < 0.05  # torchvision vs PIL resize of a 32-px image
        pixels = again.pixels(image)
        ids, mask = again.tokens(["a red circle"])
        itm = BlipForImageTextRetrieval.from_pretrained(tmp_path).eval()
        ref = itm(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score.softmax(-1)[:, 1]
        assert torch.allclose(ref, again.match(pixels, ["a red circle"])[0], atol=1e-5)
        cap = BlipForConditionalGeneration.from_pretrained(tmp_path).eval()
        dec = ids.clone()
        dec[:, 0] = again.config.text_config.bos_token_id
        ref_logits = cap(pixel_values=pixels, input_ids=dec, attention_mask=mask).logits
        ours, _ = again.text_decoder(dec, attention_mask=mask, context=again.image_features(pixels))
        assert (ref_logits - ours).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------------ data


def test_karpathy_errors_name_the_entry(scenes, tmp_path):
    entries = json.loads((scenes / "annotations" / "train.json").read_text())[:4]
    entries[1] = {**entries[1], "image": "images/train/missing.png"}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(InputError, match=r"entry 1 \(images/train/missing.png\).*does not exist"):
        readers.read_karpathy(path, image_root=scenes)
    del entries[2]["caption"]
    path.write_text(json.dumps(entries))
    with pytest.raises(InputError, match="entry 2: needs 'image' .* and 'caption'"):
        readers.read_karpathy(path, image_root=scenes)
    loaded = readers.read_karpathy(path, image_root=scenes, skip_bad=True)
    assert (len(loaded.items), loaded.skipped) == (2, 2)


def test_cli_bad_data_one_line_and_skip_bad(scenes, tmp_path, capsys):
    entries = json.loads((scenes / "annotations" / "train.json").read_text())[:17]
    entries[3] = {**entries[3], "image": "images/train/nope.png"}
    path = scenes / "bad_train.json"
    path.write_text(json.dumps(entries))
    args = ["train", "--data", str(path), "--arch", "tiny", "--out", str(tmp_path), "--steps", "1",
            "--batch-size", "8", "--objectives", "itc,itm,lm"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "entry 3 (images/train/nope.png)" in err and "--skip-bad" in err
    assert cli([*args, "--skip-bad", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["skipped"] == 1 and out["step"] == 1


def test_original_karpathy_and_folder_formats(scenes, tmp_path):
    entries = json.loads((scenes / "annotations" / "train.json").read_text())[:3]
    original = {"dataset": "coco", "images": [
        {"filepath": str(Path(e["image"]).parent), "filename": Path(e["image"]).name, "split": s,
         "sentences": [{"raw": c, "tokens": c.split()} for c in e["caption"]]}
        for e, s in zip(entries, ("train", "restval", "test"), strict=True)]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(original))
    loaded = readers.read_karpathy(path, image_root=scenes, split="train")
    assert len(loaded.items) == 2 and loaded.items[0].captions == entries[0]["caption"]
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, e in enumerate(entries):
        shutil.copy(scenes / e["image"], folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("\n".join(e["caption"]))
    (folder / "3.png").write_bytes((scenes / entries[0]["image"]).read_bytes())  # no captions
    with pytest.raises(InputError, match="3.png: no captions"):
        readers.read_folder(folder)
    assert len(readers.read_folder(folder, skip_bad=True).items) == 3


def test_metadata_folder_and_vqa_attach(scenes, tmp_path):
    entries = json.loads((scenes / "annotations" / "train.json").read_text())[:3]
    folder = tmp_path / "meta"
    folder.mkdir()
    lines = []
    for i, e in enumerate(entries):
        shutil.copy(scenes / e["image"], folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": e["caption"][0]}))
    lines.append(json.dumps({"file_name": "gone.png", "text": "a red circle"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(InputError, match="metadata.jsonl line 4.*gone.png does not exist"):
        readers.read_folder(folder)
    assert len(readers.read_folder(folder, skip_bad=True).items) == 3
    vqa = tmp_path / "vqa.json"
    vqa.write_text(json.dumps([{"image": "0.png", "question": "how many shapes are there?", "answer": "two"},
                               {"image": "1.png", "question": "what color is it?"}]))
    with pytest.raises(InputError, match="vqa.json: entry 1: needs 'image', 'question' and 'answer'"):
        readers.read_vqa(vqa)
    loaded = readers.load_items(folder, vqa=vqa, skip_bad=True)
    assert loaded.skipped == 2 and loaded.items[0].qa == [("how many shapes are there?", ["two"])]


def test_tar_shards_stream_and_resume(scenes, tmp_path):
    entries = json.loads((scenes / "annotations" / "train.json").read_text())
    qa = json.loads((scenes / "annotations" / "train_vqa.json").read_text())
    for s in range(3):
        with tarfile.open(tmp_path / f"shard-{s:03d}.tar", "w") as tar:
            for e in entries[s * 16 : (s + 1) * 16]:
                key = Path(e["image"]).stem
                tar.add(scenes / e["image"], arcname=f"{key}.png")
                q = next(x for x in qa if x["image"] == e["image"])
                meta = tmp_path / f"{key}.json"
                meta.write_text(json.dumps({"captions": e["caption"], "question": q["question"],
                                            "answer": q["answer"]}))
                tar.add(meta, arcname=f"{key}.json")
    spec = str(tmp_path / "shard-{000..002}.tar")
    assert len(readers.expand_shards(spec)) == 3
    model, _ = _tiny(scenes)
    collate = tdata.Collate(model.tokenizer, 40)
    stream = tdata.ShardStream(readers.expand_shards(spec), model.processor, seed=0, buffer=8)
    full = tdata.stream_batches(stream, collate, 8, 0)
    batches = [next(full) for _ in range(8)]  # 64 samples: more than one pass over the 48
    resumed = next(tdata.stream_batches(stream, collate, 8, 7))
    for key in ("pixels", "caption_ids", "question_ids", "answer_ids"):
        assert torch.equal(resumed[key], batches[7][key])
    result = loop.train(model, spec, _cfg(tmp_path / "run", steps=2))
    assert result.step == 2 and set(result.losses) >= {"itc", "itm", "lm", "vqa"}


# ------------------------------------------------------------------------------------------------ DDP


def test_ddp_two_processes(scenes, tmp_path):
    """torchrun with two CPU processes (gloo): both train in lockstep and the result resumes in one process."""
    script = tmp_path / "ddp_train.py"
    script.write_text(
        "import sys, torch\n"
        "from blipkit.cli import main\n"
        "torch.set_num_threads(1)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "ddp"
    proc = torchrun(script, "train", "--data", str(scenes), "--arch", "tiny", "--out", str(out), "--steps", "3",
                    "--batch-size", "4", "--save-every", "3", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(out / loop.STATE_FILE, weights_only=False)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    model = blipkit.load(out)
    assert model.config.parts == tuple(state["config"]["blipkit_parts"])
