"""`match_pairs`: image i scored with its own texts, the pairs of all the images in one pass, for BLIP and BLIP-2.

Equal to `match` image by image, and to the reference ITM (transformers, same random weights) pair by pair.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blipkit
from blipkit import pairs
from blipkit.errors import InputError

from .conftest import blip_tokenizer, photo, spread_weights

TOL = 1e-5
POOL = ["a red circle on the left", "two dogs", "an extremely long caption " * 3, "x", "a photo of a cat on a couch",
        "how many shapes are there in the picture?", "red", "a blue square next to a green triangle"]
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def blip(hf_blip_dirs):
    from transformers import BlipForImageTextRetrieval

    path = hf_blip_dirs["BlipForImageTextRetrieval"]
    return blipkit.load(path), BlipForImageTextRetrieval.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from transformers import Blip2ForImageTextRetrieval

    from .test_blip2 import itm_tokenizer, tiny_config

    torch.manual_seed(2)
    tok = itm_tokenizer()
    ref = Blip2ForImageTextRetrieval(tiny_config("itm", tok)).eval()
    spread_weights(ref, seed=2)
    path = tmp_path_factory.mktemp("blip2-itm")
    ref.save_pretrained(path)
    tok.save_pretrained(path)
    return blipkit.load(path), ref


@pytest.fixture(scope="module")
def images():
    return [photo(i, size=(40 + 7 * i, 30 + 5 * i)) for i in range(4)]


def per_image(model, feats, texts):
    return [model.match(feats[i : i + 1], t)[0] for i, t in enumerate(texts)]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


RAGGED = [POOL[:1], POOL[1:6], POOL[2:4], POOL[5:8]]  # 1, 5, 2 and 3 texts of different lengths


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_pairs_equal_match_image_by_image(request, family, images):
    model = request.getfixturevalue(family)[0]
    got = model.match_pairs(images, RAGGED)
    want = [model.match(im, t)[0] for im, t in zip(images, RAGGED, strict=True)]
    assert max_diff(got, want) <= TOL
    assert len({round(float(p), 6) for g in got for p in g}) > 6  # the weights really discriminate
    feats = model.image_features(images)  # features in place of images, and one text as a string
    assert max_diff(model.match_pairs(feats, RAGGED), got) <= TOL
    same = model.match_pairs(images, [POOL[1:4]] * 4)  # as many texts for every image: shared keys/values
    assert max_diff(same, list(model.match(images, POOL[1:4]))) <= TOL
    one = model.match_pairs(images[:2], ["two dogs", ["red"]])
    assert max_diff(one, [model.match(images[0], "two dogs")[0], model.match(images[1], "red")[0]]) <= TOL


def test_blip_pairs_equal_the_reference(blip, images):
    from transformers import BlipImageProcessorPil

    ours, ref = blip
    pixels = BlipImageProcessorPil(size={"height": 32, "width": 32})(images, return_tensors="pt")["pixel_values"]
    image = torch.tensor([i for i, t in enumerate(RAGGED) for _ in t])
    flat = [x for t in RAGGED for x in t]
    enc = blip_tokenizer()(flat, padding=True, return_tensors="pt")
    with torch.no_grad():  # the reference scores the pairs as rows of one batch, padding masked
        want = ref(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels[image],
                   use_itm_head=True).itm_score.softmax(-1)[:, 1]
    got = torch.cat(ours.match_pairs(images, RAGGED))
    assert (got - want).abs().max() <= TOL


def test_blip2_pairs_equal_the_reference(blip2):
    from .test_blip2 import itm_tokenizer

    ours, ref = blip2
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    image = torch.tensor([i for i, t in enumerate(RAGGED) for _ in t])
    flat = [x for t in RAGGED for x in t]
    enc = itm_tokenizer()(flat, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(pixel_values=pixels[image], input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                   use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    got = torch.cat(ours.match_pairs(pixels, RAGGED))
    assert (got - want).abs().max() <= TOL


ragged = st.lists(st.lists(st.sampled_from(POOL), min_size=1, max_size=6), min_size=1, max_size=4)


@pytest.mark.parametrize("family", ["blip", "blip2"])
@SLOW
@given(texts=ragged, chunk=st.integers(1, 9), budget=st.sampled_from([1, 50_000, pairs.KV_BUDGET]))
def test_any_ragged_texts_and_passes_equal_match(request, family, images, monkeypatch, texts, chunk, budget):
    """Any number of texts per image, any pass size (rows per pass, bytes of gathered keys/values)."""
    model = request.getfixturevalue(family)[0]
    feats = model.image_features(images[: len(texts)])
    want = per_image(model, feats, texts)
    before = model.itm_chunk
    monkeypatch.setattr(pairs, "KV_BUDGET", budget)
    model.itm_chunk = chunk
    try:
        got = model.match_pairs(feats, texts)
    finally:
        model.itm_chunk = before
    assert [len(g) for g in got] == [len(t) for t in texts]
    assert max_diff(got, want) <= TOL


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_bad_pairs_are_refused_naming_the_input(request, family, images):
    model = request.getfixturevalue(family)[0]
    cases = [
        (["a", "b"], images[:3], "got 2 lists of texts for 3 images"),
        ("two dogs", images[:1], "texts must be a list with the texts of each image"),
        ([], images[:1], "no texts given"),
        ([["a"], []], images[:2], "no texts of image 1 given"),
        ([["a"], ["b", "  "]], images[:2], "image 1's text 1"),
        ([["a"], ["b", 3]], images[:2], "image 1's text 1 is a int"),
        ([("a",)], images[:1], None),  # tuples are lists of texts
    ]
    for texts, ims, message in cases:
        if message is None:
            assert model.match_pairs(ims, texts)[0].shape == (1,)
            continue
        with pytest.raises(InputError, match=message):
            model.match_pairs(ims, texts)


def test_onnx_back_end_scores_pairs_as_torch(blip, images, tmp_path):
    """The onnxruntime back end runs the same pairs through its image-text graph (to its 1e-4 of torch)."""
    pytest.importorskip("onnxruntime")
    from blipkit.export import export_onnx

    ours = blip[0]
    onnx = blipkit.load(export_onnx(ours, tmp_path / "onnx"))
    onnx.itm_chunk = 4  # several chunks, each row with its own image
    got, want = onnx.match_pairs(images, RAGGED), ours.match_pairs(images, RAGGED)
    assert max_diff(got, want) <= 1e-4
