"""Synthetic scenes: determinism, truth of every caption and answer against the objects, boxes against pixels, files."""

import hashlib
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from blipkit.data import scenes as scenes_module
from blipkit.data.scenes import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    SIZES,
    draw_captions,
    draw_shape,
    generate_scene,
    generate_split,
    iter_scenes,
    question_type,
    write_dataset,
)
from blipkit.errors import InputError

SIZE = 128
NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}, "shape": None, "shapes": None, "object": None,
         "objects": None}


@pytest.fixture(scope="module")
def scenes():
    return generate_split(300, seed=11, image_size=SIZE)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    manifest = write_dataset(root, n_train=30, n_val=10, n_test=10, seed=3, image_size=64, progress=False)
    return root, manifest


# --------------------------------------------------------------------------------- an independent reading of the text


def parse(text):
    """Tokens and noun phrases: [(det, size, colour, shape or None for 'shape'/'object', first token, last token)]."""
    toks = re.findall(r"[a-z]+", text.lower())
    nps, pending = [], {}
    for i, t in enumerate(toks):
        if t in NOUNS:
            nps.append({"det": None, "size": None, "colour": None, "start": i, **pending, "shape": NOUNS[t], "end": i})
            pending = {}
        elif t in COLOURS:
            pending = {"start": i, **pending, "colour": t}
        elif t in SIZES:
            pending = {"start": i, **pending, "size": t}
        elif t in NUMBER_WORDS or t in ("a", "an"):
            pending = {"det": t, "start": i}
        else:
            pending = {}
    return toks, nps


def matches(np_, objects):
    return [o for o in objects if (np_["shape"] in (None, o.shape)) and (np_["colour"] in (None, o.colour))
            and (np_["size"] in (None, o.size))]


def centre(o):
    x1, y1, x2, y2 = o.box
    return (x1 + x2) / 2, (y1 + y2) / 2


def holds(a, rel, b, size=SIZE):
    """Whether `a` is `rel` of `b`, judged on box centres with a tenth of the image as margin."""
    (ax, ay), (bx, by), m = centre(a), centre(b), 0.1 * size
    return {"left": bx - ax >= m, "right": ax - bx >= m, "above": by - ay >= m, "below": ay - by >= m}[rel]


def placed(o, where, size=SIZE):
    """Whether `o` sits unambiguously `where` in the image (outer third on one axis, middle third on the other)."""
    x, y = centre(o)
    lo, hi = size / 3, 2 * size / 3
    mid_x, mid_y = lo <= x <= hi, lo <= y <= hi
    return {"left": x < lo and mid_y, "right": x > hi and mid_y, "top": y < lo and mid_x,
            "bottom": y > hi and mid_x}[where]


def check_caption(caption, objects, size=SIZE):
    """Assert every phrase of `caption` is true of `objects`; returns the relations and positions it states."""
    toks, nps = parse(caption)
    assert nps, f"no object named in {caption!r}"
    stated = []
    for i, np_ in enumerate(nps):
        found = matches(np_, objects)
        if np_["det"] in NUMBER_WORDS:
            assert len(found) == NUMBER_WORDS.index(np_["det"]), (caption, objects)
        else:
            assert found, (caption, objects)
        stop = nps[i + 1]["start"] if i + 1 < len(nps) else len(toks)
        after = toks[np_["end"] + 1:stop]
        for j, t in enumerate(after):  # "on the left", "at the top" (not "to the left of")
            if t in ("left", "right", "top", "bottom") and (j + 1 == len(after) or after[j + 1] != "of"):
                assert all(placed(o, t, size) for o in found), (caption, objects)
                stated.append(t)
        if i + 1 < len(nps):
            between = " ".join(after)
            rels = [r for r in ("left", "right") if f"{r} of" in between]
            rels += [r for r in ("above", "below") if r in after]
            for rel in rels:
                others = matches(nps[i + 1], objects)
                assert len(found) == 1 and len(others) == 1, f"ambiguous reference in {caption!r}"
                assert holds(found[0], rel, others[0], size), (caption, objects)
                stated.append(rel)
    return stated


def check_answer(question, answer, objects, size=SIZE):
    """Assert `answer` is the one correct answer to `question` about `objects`."""
    toks, nps = parse(question)
    assert nps, question
    target = nps[-1]  # "what shape is the red object?" asks about the last phrase
    found = matches(target, objects)
    q = question.lower()
    if q.startswith("how many"):
        assert answer == NUMBER_WORDS[len(found)]
    elif q.startswith(("is there", "are there", "does")):
        assert answer == ("yes" if found else "no")
    else:
        assert len(found) == 1, f"{question!r} is ambiguous for {objects}"
        (o,) = found
        if q.startswith("where"):
            assert placed(o, answer, size)
        elif q.startswith("what size"):
            assert target["size"] is None and answer == o.size
        elif "color" in q:
            assert target["colour"] is None and answer == o.colour
        else:
            assert target["shape"] is None and answer == o.shape


# ----------------------------------------------------------------------------------------------------------- tests


def test_same_seed_same_bytes_different_seed_different():
    a, b, c = (generate_split(8, seed=s, image_size=64) for s in (5, 5, 6))
    assert [s.image.tobytes() for s in a] == [s.image.tobytes() for s in b]
    assert [(s.captions, s.qa, s.objects) for s in a] == [(s.captions, s.qa, s.objects) for s in b]
    assert all(x.image.tobytes() != y.image.tobytes() for x, y in zip(a, c, strict=True))
    assert [s.captions for s in a] != [s.captions for s in c]


def test_written_files_are_byte_identical_for_the_same_seed(tmp_path):
    for name in ("a", "b"):
        write_dataset(tmp_path / name, 4, 2, 2, seed=9, image_size=48, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 8 + 3 * 3 + 1
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_seen_digests_are_skipped():
    first = generate_split(3, seed=7, image_size=64)
    seen = {hashlib.blake2b(first[0].image.tobytes(), digest_size=16).digest()}
    rest = list(iter_scenes(2, seed=7, image_size=64, seen=seen))
    assert [s.image.tobytes() for s in rest] == [s.image.tobytes() for s in first[1:]]


def test_scene_contents(scenes):
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    for s in scenes:
        assert s.image.mode == "RGB" and s.image.size == (SIZE, SIZE)
        assert len(s.captions) == len(set(s.captions)) >= 3
        assert s.qa and s.background in ("plain", "gradient", "textured")
        for o in s.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
            assert o.box_norm == pytest.approx([v / SIZE for v in o.box])
        for a in s.objects:  # boxes do not overlap
            for b in s.objects:
                if a is not b:
                    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_captions_name_only_existing_objects_and_true_relations(scenes):
    stated = Counter()
    for s in scenes:
        for caption in s.captions:
            stated.update(check_caption(caption, s.objects))
    # every relation and position is exercised, so the checks above are not vacuous
    assert all(stated[k] >= 5 for k in ("left", "right", "above", "below", "top", "bottom")), stated


def test_caption_checker_rejects_false_captions(scenes):
    s = next(s for s in scenes if len(s.objects) == 2 and s.objects[0].shape != s.objects[1].shape
             and abs(centre(s.objects[0])[0] - centre(s.objects[1])[0]) > 0.1 * SIZE)
    a, b = sorted(s.objects, key=lambda o: centre(o)[0])
    check_caption(f"a {a.colour} {a.shape} left of a {b.colour} {b.shape}", s.objects)
    wrong_colour = next(c for c in COLOURS if c not in (a.colour, b.colour))
    for false in (f"a {b.colour} {b.shape} left of a {a.colour} {a.shape}", f"a {wrong_colour} {a.shape}",
                  f"three {a.shape}s", "one shape"):
        with pytest.raises(AssertionError):
            check_caption(false, s.objects)


def test_answers_are_consistent_and_balanced(scenes):
    kinds, yes_no = Counter(), Counter()
    for s in scenes:
        for q, a in s.qa:
            check_answer(q, a, s.objects)
            kinds[question_type(q)] += 1
            if question_type(q) == "yes/no":
                yes_no[a] += 1
        assert len({q for q, _ in s.qa}) == len(s.qa)
    assert set(kinds) == {"color", "shape", "size", "count", "position", "yes/no"}
    assert yes_no["yes"] == yes_no["no"] > 100
    answers = Counter(a for s in scenes for q, a in s.qa if question_type(q) == "count")
    assert set(answers) <= set(NUMBER_WORDS) and len(answers) >= 3


def test_boxes_hold_exactly_their_colour(scenes):
    for s in scenes[:100]:
        img = np.asarray(s.image)
        for colour in {o.colour for o in s.objects}:
            mask = (img == COLOURS[colour]).all(axis=-1)
            owners = [o for o in s.objects if o.colour == colour]
            inside = np.zeros_like(mask)
            for o in owners:
                x1, y1, x2, y2 = o.box
                inside[y1:y2, x1:x2] = True
                ys, xs = np.nonzero(mask[y1:y2, x1:x2])
                assert (xs.min(), xs.max(), ys.min(), ys.max()) == (0, x2 - x1 - 1, 0, y2 - y1 - 1), o  # tight box
                assert len(xs) >= 0.3 * (x2 - x1) * (y2 - y1), o
            assert not (mask & ~inside).any(), f"{colour} pixels outside the boxes of {owners}"


def test_light_backgrounds_hold_no_white_object(scenes):
    light = [s for s in scenes if np.asarray(s.image)[0, 0].min() > 225]
    assert 0.1 * len(scenes) < len(light) < 0.3 * len(scenes)  # one scene in five
    assert any((np.asarray(s.image)[0, 0] == 255).all() for s in light)  # white pages among them
    for s in light:
        assert s.background == "plain" and "white" not in {o.colour for o in s.objects}


def test_draw_shape_fills_its_box():
    for shape in SHAPES:
        img = Image.new("RGB", (40, 40), (128, 128, 128))
        draw_shape(ImageDraw.Draw(img), shape, (255, 0, 0), [5, 7, 30, 29])
        ys, xs = np.nonzero((np.asarray(img) == (255, 0, 0)).all(axis=-1))
        assert (xs.min(), xs.max() + 1, ys.min(), ys.max() + 1) == (5, 30, 7, 29), shape
        if shape == "square":  # every pixel of the box, the edges included
            assert len(xs) == 25 * 22
    with pytest.raises(InputError, match="pentagon"):
        draw_shape(ImageDraw.Draw(img), "pentagon", (255, 0, 0), [0, 0, 10, 10])


def test_caption_templates_vary(scenes):
    words = {**{w: "S" for w, shape in NOUNS.items() if shape}, **{w: "C" for w in COLOURS}, **{w: "Z" for w in SIZES},
             **{w: "N" for w in NUMBER_WORDS}, "an": "a"}
    templates = {" ".join(words.get(t, t) for t in re.findall(r"[a-z]+", c)) for s in scenes[:200] for c in s.captions}
    assert len(templates) > 150, len(templates)
    short = {c for s in scenes for c in s.captions if len(c.split()) == 2}
    assert short, "no short captions such as 'red circle'"


def test_dataset_files(dataset):
    root, manifest = dataset
    on_disk = json.loads((root / "dataset.json").read_text())
    assert on_disk == manifest
    assert manifest["seed"] == 3 and manifest["image_size"] == 64 and manifest["generator_version"]
    assert set(manifest["colours"]) == set(COLOURS) and manifest["shapes"] == list(SHAPES)
    counts = {"train": 30, "val": 10, "test": 10}
    assert {s: v["count"] for s, v in manifest["splits"].items()} == counts
    assert len({v["seed"] for v in manifest["splits"].values()}) == 3

    digests, image_ids, question_ids = {}, [], []
    for split, n in counts.items():
        caps = json.loads((root / "annotations" / f"{split}.json").read_text())
        vqa = json.loads((root / "annotations" / f"{split}_vqa.json").read_text())
        boxes = json.loads((root / "annotations" / f"{split}_boxes.json").read_text())
        assert len(caps) == len(boxes) == n and len(vqa) >= n
        digests[split] = set()
        for entry, box_entry in zip(caps, boxes, strict=True):
            assert set(entry) == {"image", "caption", "image_id"}
            assert entry["image"] == box_entry["image"] and entry["image"].startswith(f"images/{split}/")
            assert isinstance(entry["image_id"], int) and entry["caption"]
            assert all(isinstance(c, str) and c for c in entry["caption"])
            image = Image.open(root / entry["image"])
            assert image.size == (64, 64) and image.mode == "RGB"
            digests[split].add(hashlib.sha256(image.tobytes()).hexdigest())
            image_ids.append(entry["image_id"])
            arr = np.asarray(image)
            assert set(box_entry) == {"image", "image_id", "width", "height", "background", "objects"}
            for o in box_entry["objects"]:
                assert set(o) == {"shape", "colour", "size", "box", "box_norm"}
                assert o["box_norm"] == pytest.approx([v / 64 for v in o["box"]], abs=1e-6)
                x1, y1, x2, y2 = o["box"]
                assert (arr[y1:y2, x1:x2] == COLOURS[o["colour"]]).all(axis=-1).any()
        for q in vqa:
            assert set(q) == {"question_id", "image", "image_id", "question", "answer", "question_type"}
            assert isinstance(q["answer"], list) and len(q["answer"]) == 1
            assert q["question_type"] == question_type(q["question"])
            question_ids.append(q["question_id"])
        assert len(digests[split]) == n
    assert not (digests["train"] & digests["val"] or digests["train"] & digests["test"])
    assert not digests["val"] & digests["test"]
    assert len(set(image_ids)) == len(image_ids) and len(set(question_ids)) == len(question_ids)


def test_rejects_bad_arguments():
    with pytest.raises(InputError, match="image_size"):
        generate_scene(random.Random(0), image_size=8)
    with pytest.raises(InputError, match="n=-1"):
        generate_split(-1, seed=0)


@pytest.mark.parametrize("seed", [3, 7, 11])
def test_draw_captions_repeats_the_generators_own_draw(seed):
    """From a scene's boxes entry and the random state the generator had before its captions, the same captions."""
    scene = generate_scene(random.Random(seed))
    rng = random.Random(seed)
    _, background, light = scenes_module._background(rng, 128)
    objs = scenes_module._place_objects(rng, 128, [c for c in COLOURS if not (light and c == "white")])
    entry = {"objects": [o.to_dict() for o in objs], "background": background, "width": 128}
    assert [o.to_dict() for o in objs] == [o.to_dict() for o in scene.objects]
    assert draw_captions(entry, rng) == scene.captions
    more = draw_captions(entry, random.Random(seed), n=8)  # up to n distinct captions
    assert len(set(more)) == len(more) and len(scene.captions) <= len(more) <= 8
