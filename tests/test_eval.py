"""Evaluation metrics on hand-computed examples, and `blipkit eval` end to end on tiny BLIP and BLIP-2 models (the
BLIP-2 retrieval numbers against a brute-force computation from `similarity` and `itm_logits`)."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch

import blipkit
from blipkit import tasks
from blipkit.cli import main as cli
from blipkit.data.scenes import write_dataset
from blipkit.train import loop
from blipkit.train.eval import evaluate, rerank
from blipkit.train.metrics import bleu, cider_d, normalize_answer, recall_at, vqa_accuracy
from blipkit.train.scene_metrics import caption_facts, colour_shape_accuracy

from .conftest import spread_weights


def test_bleu_by_hand():
    # candidate "the cat sat on the mat" vs reference "the cat is on the mat":
    # 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat), 3-grams 1/4 (on the mat), 4-grams 0/3 -> BLEU-4 = 0
    cand, ref = "the cat sat on the mat", "the cat is on the mat"
    assert bleu([cand], [[ref]]) == 0.0
    assert bleu([cand], [[ref]], n=3) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    # clipping: "the the the" against "the cat" counts "the" once; the candidate is longer, so no brevity penalty
    assert bleu(["the the the"], [["the cat"]], n=1) == pytest.approx(1 / 3)
    # brevity penalty with the closest reference length: 4 words vs references of 6 and 9 -> exp(1 - 6/4)
    assert bleu(["a b c d"], [["a b c d e f", "a b c d e f g h i"]], n=1) == pytest.approx(math.exp(1 - 6 / 4))
    # corpus level: n-gram counts are summed over the corpus before dividing
    two = bleu(["a b c d e", "a b c d x"], [["a b c d e"], ["a b c d e"]])
    p = [9 / 10, 7 / 8, 5 / 6, 3 / 4]
    assert two == pytest.approx(math.exp(sum(math.log(x) for x in p) / 4))
    assert bleu(["A red circle."], [["a red circle"]]) == pytest.approx(0.0)  # too short for a 4-gram
    assert bleu(["a small red circle"], [["A small red circle!"]]) == pytest.approx(1.0)


def test_cider_by_hand():
    # two images, each candidate equals its only reference; every n-gram has df 1 and weight log 2:
    # the 1-gram and 2-gram cosines are 1, the 3- and 4-gram vectors are empty -> (1 + 1 + 0 + 0) / 4 * 10 = 5
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # an n-gram found in every image's references carries no weight (idf log(2/2) = 0)
    assert cider_d(["x", "x"], [["x"], ["x"]]) == pytest.approx(0.0)
    good = cider_d(["a red circle", "a blue square"], [["a red circle", "red circle"], ["a blue square"]])
    bad = cider_d(["a blue square", "a red circle"], [["a red circle", "red circle"], ["a blue square"]])
    assert good > bad >= 0


def test_recall_at_by_hand():
    # 2 images, 3 texts (text 0, 1 -> image 0; text 2 -> image 1)
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    r = recall_at(scores, [0, 0, 1], ks=(1, 2))
    # image 0 ranks text 1 first (its own): hit; image 1 ranks text 0, 2: own text at rank 2
    assert r["TR@1"] == 50.0 and r["TR@2"] == 100.0
    # text 0 -> image 1 first (miss at 1); text 1 -> image 0 (hit); text 2 -> image 0 first (miss)
    assert r["IR@1"] == pytest.approx(100 / 3) and r["IR@2"] == 100.0


def test_rerank_by_hand():
    # 2 images, 3 texts (text 0, 1 -> image 0; text 2 -> image 1); the ITC top k of each row and column are re-scored
    # with ITM logit + ITC, the rest scores -100
    sim = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]])
    itm = torch.tensor([[0.0, -5.0, 0.0], [0.0, 0.0, 0.0]])
    seen = []

    def score(image_rows, text_rows):
        seen.extend(zip(image_rows.tolist(), text_rows.tolist(), strict=True))
        return itm[image_rows, text_rows]

    # k = 1: image 0 -> text 1, image 1 -> text 0; text 0 -> image 1, text 1 -> image 0, text 2 -> image 0
    r = rerank(sim, score, ["a", "b", "c"], [0, 0, 1], k=1)
    assert sorted(seen) == [(0, 1), (0, 2), (1, 0)]  # (0, 1) and (1, 0) are wanted twice but scored once
    assert r["TR@1"] == 50.0 and r["IR@1"] == pytest.approx(100 / 3)  # image 0 -> text 1 and text 1 -> image 0 hit
    # k = 2: the ITM logit of (image 0, text 1) pushes text 1 below text 2 and image 0 below image 1
    r = rerank(sim, score, ["a", "b", "c"], [0, 0, 1], k=2)
    assert r["TR@1_itc"] == 50.0 and r["IR@1_itc"] == pytest.approx(100 / 3)
    assert r["TR@1"] == 0.0 and r["TR@5"] == 100.0 and r["IR@1"] == 0.0 and r["IR@5"] == 100.0
    assert r["TR@1_any"] == 0.0 and r["IR@1_any"] == 0.0 and r["R_mean"] == pytest.approx(400 / 6)


def test_vqa_normalisation():
    assert normalize_answer("Two.") == "2" and normalize_answer("the Red") == "red"
    assert vqa_accuracy(["two", "blue", "a circle", "no"], [["2"], ["red"], ["circle"], ["yes"]]) == 50.0


def test_caption_facts_and_accuracy():
    assert caption_facts("a small red circle left of two blue squares") == (
        ["red", "blue"], ["circle", "square"], [("red", "circle"), ("blue", "square")])
    objs = [{"colour": "red", "shape": "circle"}, {"colour": "blue", "shape": "square"}]
    acc = colour_shape_accuracy(["a red circle and a blue square", "a blue circle", "two shapes"], [objs] * 3)
    # 4 words right in caption 0; "blue circle" pairs wrongly: both words wrong; caption 2 states no colour/shape
    assert acc["colour_shape_acc"] == pytest.approx(100 * 4 / 6)
    assert acc["coverage"] == pytest.approx(200 / 3) and acc["all_true"] == pytest.approx(100 / 3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes_eval")
    write_dataset(root, n_train=32, n_val=0, n_test=6, seed=5, image_size=32, progress=False)
    out = root / "model"
    assert cli(["train", "--data", str(root), "--arch", "tiny", "--out", str(out), "--steps", "2",
                "--batch-size", "8"]) == 0
    return root, out


def test_evaluate_reports_every_metric(tiny_run):
    import blipkit

    root, out = tiny_run
    model = blipkit.load(out)
    report = evaluate(model, root, "test", k=4)
    m = report["metrics"]
    for key in ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "BLEU-4", "CIDEr", "VQA_acc",
                "caption_colour_shape_acc", "pointing_acc"):
        assert key in m and 0.0 <= m[key] <= 1000.0, key
    assert m["IR@10"] == 100.0  # 6 images: every image is within the top 10
    assert report["counts"]["images"] == 6 and len(report["captions"]) == 6


def test_eval_cli_json_and_bad_input(tiny_run, tmp_path, capsys):
    root, out = tiny_run
    assert cli(["eval", "--model", str(out), "--data", str(root), "--tasks", "vqa", "--json", "--limit", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"VQA_acc"}
    assert cli(["eval", "--model", str(out), "--data", str(root), "--tasks", "retrieval,colour"]) == 2
    assert "--tasks" in capsys.readouterr().err
    assert cli(["eval", "--model", str(out), "--data", str(root), "--split", "dev"]) == 2
    assert "no split 'dev'" in capsys.readouterr().err
    assert loop.STATE_FILE in {p.name for p in out.iterdir()}
    grounding = ["eval", "--model", str(out), "--data", str(root), "--tasks", "grounding", "--json", "--limit", "3"]
    assert cli(grounding + ["--layer", "7"]) == 2
    assert "layer 7 does not exist" in capsys.readouterr().err
    by_layer = []
    for layer in ("0", "1"):
        assert cli(grounding + ["--layer", layer]) == 0
        by_layer.append(json.loads(capsys.readouterr().out)["pointing_acc"])
    assert cli(grounding) == 0  # the default: this 2-layer model's layer 0
    assert json.loads(capsys.readouterr().out)["pointing_acc"] == by_layer[0]
    assert cli(grounding + ["--source", "itm"]) == 0  # the ITM position's map: pointing counted by hand
    model, boxes = blipkit.load(out), json.loads((root / "annotations" / "test_boxes.json").read_text())[:3]
    hits = n = 0
    for entry in boxes:
        names = Counter((o["colour"], o["shape"]) for o in entry["objects"])
        for o in entry["objects"]:
            if names[(o["colour"], o["shape"])] == 1:
                x, y = tasks.ground(model, root / entry["image"], f"the {o['colour']} {o['shape']}", source="itm").peak
                hits += o["box_norm"][0] <= x <= o["box_norm"][2] and o["box_norm"][1] <= y <= o["box_norm"][3]
                n += 1
    assert json.loads(capsys.readouterr().out)["pointing_acc"] == pytest.approx(100 * hits / n, abs=0.005)  # 2 places
    (tmp_path / "boxes.json").write_text(json.dumps([{"image": "x.png", "objects": [{"shape": "circle"}]}]))
    assert cli(grounding + ["--boxes", str(tmp_path / "boxes.json")]) == 2
    assert "--boxes" in (err := capsys.readouterr().err) and "entry 0 (x.png)" in err


# ------------------------------------------------------------------------------------------------ BLIP-2


@pytest.fixture(scope="module")
def blip2_dirs(tiny_run, tmp_path_factory):
    """A tiny BLIP-2 retrieval model (stage 1 on the tiny BLIP's ViT) and a generation model with a tiny OPT."""
    import blipkit
    from blipkit.data.readers import load_items
    from blipkit.train.blip2_stages import stage1_model, stage2_model
    from blipkit.train.lm import build_bpe_tokenizer, scratch_lm

    root, out = tiny_run
    retrieval = stage1_model(blipkit.load(out), num_queries=4)
    spread_weights(retrieval, seed=1)  # images and texts get distinct scores, so a wrong pairing shows
    tok = build_bpe_tokenizer([c for it in load_items(root, "train").items for c in it.captions], vocab_size=300)
    generation = stage2_model(retrieval, scratch_lm("tiny", tok), tok)
    spread_weights(generation.language_model, seed=2)  # decoding is not one token forever
    base = tmp_path_factory.mktemp("blip2")
    return blipkit.save(retrieval, base / "retrieval"), blipkit.save(generation, base / "generation")


def brute_force_retrieval(model, images: list, texts: list[str], owner: list[int], k: int) -> dict[str, float]:
    """The retrieval metrics from the full `similarity` and `itm_logits` matrices, one image / text at a time."""
    with torch.no_grad():
        px = model.pixels(images)
        sim = model.similarity(px, texts)
        itm = model.itm_logits(px, texts)[..., 1]
    score = itm + sim
    own = [{texts[j] for j in range(len(texts)) if owner[j] == i} for i in range(len(images))]
    out = {}
    tr, tr_itc, tr_any = [], [], []
    for i in range(len(images)):
        top = sorted(sim[i].topk(k).indices.tolist(), key=lambda j: -float(score[i, j]))
        tr.append(next((r for r, j in enumerate(top) if owner[j] == i), len(texts)))
        tr_itc.append(int(sim[i].argmax()) in {j for j in range(len(texts)) if owner[j] == i})
        tr_any.append(texts[top[0]] in own[i])
    ir, ir_itc, ir_any = [], [], []
    for j in range(len(texts)):
        top = sorted(sim[:, j].topk(min(k, len(images))).indices.tolist(), key=lambda i: -float(score[i, j]))
        ir.append(top.index(owner[j]) if owner[j] in top else len(images))
        ir_itc.append(int(sim[:, j].argmax()) == owner[j])
        ir_any.append(texts[j] in own[top[0]])
    for K in (1, 5, 10):
        out[f"TR@{K}"] = 100.0 * sum(r < K for r in tr) / len(tr)
        out[f"IR@{K}"] = 100.0 * sum(r < K for r in ir) / len(ir)
    out["TR@1_itc"], out["IR@1_itc"] = 100.0 * sum(tr_itc) / len(tr), 100.0 * sum(ir_itc) / len(ir)
    out["TR@1_any"], out["IR@1_any"] = 100.0 * sum(tr_any) / len(tr), 100.0 * sum(ir_any) / len(ir)
    out["R_mean"] = sum(out[f"{d}@{K}"] for d in ("TR", "IR") for K in (1, 5, 10)) / 6
    return out


def test_evaluate_blip2_retrieval_equals_brute_force(tiny_run, blip2_dirs):
    import blipkit
    from blipkit.data.readers import load_items
    from blipkit.train.eval import itm_scorer

    root, _ = tiny_run
    model = blipkit.load(blip2_dirs[0])
    assert model.family == "BLIP-2" and not model.has("language_model")
    report = evaluate(model, root, "test", k=10)
    items = load_items(root, "test").items
    texts = [c for it in items for c in it.captions]
    owner = [i for i, it in enumerate(items) for _ in it.captions]
    want = brute_force_retrieval(model, [it.image for it in items], texts, owner, k=10)
    m = report["metrics"]
    assert {key: m[key] for key in want} == pytest.approx({key: round(v, 2) for key, v in want.items()}, abs=0.011)
    assert 0 < m["TR@1"] < 100 or 0 < m["IR@1"] < 100  # the scores tell images apart, but not perfectly
    assert 0.0 <= m["pointing_acc"] <= 100.0 and report["counts"]["grounding_phrases"] > 0  # GradCAM on the Q-Former
    assert set(report["skipped"]) == {"caption", "vqa"} and "language model" in report["skipped"]["caption"]
    # the pair scorer: each pair's ITM logit as `itm_logits` gives it over all pairs
    with torch.no_grad():
        px = model.pixels([it.image for it in items])
        full = model.itm_logits(px, texts)[..., 1]
        rows, cols = torch.tensor([0, 5, 5, 2, 0]), torch.tensor([3, 0, 29, 7, 4])
        got = itm_scorer(model, model.image_features(px), texts)(rows, cols)
    assert torch.allclose(got, full[rows, cols], atol=1e-5)


def test_evaluate_blip2_generation(tiny_run, blip2_dirs, capsys):
    import blipkit
    from blipkit.data.readers import load_items

    root, _ = tiny_run
    model = blipkit.load(blip2_dirs[1])
    assert model.family == "BLIP-2" and not model.has("itm_head")
    report = evaluate(model, root, "test", num_beams=2)
    m = report["metrics"]
    for key in ("BLEU-4", "CIDEr", "VQA_acc", "caption_colour_shape_acc", "caption_coverage", "caption_all_true"):
        assert key in m and 0.0 <= m[key] <= 1000.0, key
    assert set(report["skipped"]) == {"retrieval", "grounding"}
    assert "ITC projections" in report["skipped"]["retrieval"] and "ITM head" in report["skipped"]["grounding"]
    # captions and answers from the features computed once equal the model's own from the images
    items = load_items(root, "test").items
    images = [it.image for it in items]
    assert [c["caption"] for c in report["captions"]] == model.caption(images, num_beams=2, min_new_tokens=1)
    qa = [(it.image, q) for it in items for q, _ in it.qa]
    assert report["counts"]["questions"] == len(qa) == len(report["answers"])
    first = [a["answer"] for a in report["answers"][:4]]
    assert first == model.answer([i for i, _ in qa[:4]], [q for _, q in qa[:4]], num_beams=1)
    # the command line
    assert cli(["eval", "--model", str(blip2_dirs[1]), "--data", str(root), "--tasks", "caption,retrieval",
                "--limit", "2", "--num-beams", "1"]) == 0
    shown = capsys.readouterr().out
    assert "BLEU-4" in shown and "retrieval" in shown and "skipped" in shown
