"""Evaluation metrics on hand-computed examples, and `blipkit eval` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from blipkit.cli import main as cli
from blipkit.data.scenes import write_dataset
from blipkit.train import loop
from blipkit.train.eval import (
    bleu,
    caption_facts,
    cider_d,
    colour_shape_accuracy,
    evaluate,
    normalize_answer,
    recall_at,
    vqa_accuracy,
)


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
