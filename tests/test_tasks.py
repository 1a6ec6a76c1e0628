"""Tasks on tiny random models (shapes, determinism, agreement with the model methods, error paths), and on the
shipped scenes-blip model when it is installed (the answers are right)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import blipkit
from blipkit import tasks
from blipkit.blip import Blip
from blipkit.config import BlipConfig, TextConfig, VisionConfig
from blipkit.data.scenes import COLOURS, SHAPES, generate_scene, generate_split
from blipkit.errors import CapabilityError, InputError
from blipkit.processing import ImageProcessor, Tokenizer

from .conftest import spread_weights

ALL_PARTS = ("vision_model", "text_encoder", "text_decoder", "vision_proj", "text_proj", "itm_head")
TEXTS = ["a red circle", "a blue square", "two green stars", "a white hexagon"]
WORDS = ["a", "an", "the", "picture", "of", "photo", "image", "is", "there", "left", "right", "above", "below", "and",
         "on", "what", "color", "how", "many", "one", "two", "three", "yes", "no", "?", "."]


def tiny_tokenizer(directory: Path) -> Tokenizer:
    """A BERT WordPiece tokenizer over the scene words (plus letters), with BLIP's [DEC] and [ENC]."""
    directory.mkdir(parents=True, exist_ok=True)
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = sorted(set(WORDS + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + letters + ["##" + c for c in letters]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = Tokenizer.from_dir(directory).add_blip_tokens()
    (directory / "vocab.txt").unlink()
    return tok


def tiny_blip(directory: Path, parts: tuple[str, ...] = ALL_PARTS, seed: int = 0) -> Blip:
    """A tiny random BLIP with the given heads (2 + 2 layers, 4 heads, 32 x 32 pixels in 8-pixel patches)."""
    tok = tiny_tokenizer(directory / "tokenizer")
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8)
    text = TextConfig(vocab_size=tok.vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=40,
                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                      eos_token_id=tok.sep_token_id)
    torch.manual_seed(seed)
    model = Blip(BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=16, parts=parts)).eval()
    spread_weights(model, seed)
    model.tokenizer = tok
    model.processor = ImageProcessor(size=32, mean=model.config.image_mean, std=model.config.image_std)
    return model


def tiny_blip2(directory: Path) -> blipkit.base.BlipBase:
    """A tiny random BLIP-2 retrieval model: 4 queries, a 3-layer Q-Former with cross-attention in layers 0 and 2."""
    from blipkit.blip2 import Blip2
    from blipkit.blip2_config import ARCHITECTURES, RETRIEVAL, Blip2Config

    tok = tiny_tokenizer(directory / "tokenizer2")
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, qkv_bias=True)
    qformer = TextConfig(vocab_size=tok.vocab_size, hidden_size=32, encoder_hidden_size=32, intermediate_size=40,
                         num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=40,
                         cross_attention_frequency=2, query_ffn=True, text_ffn=True)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=None, num_query_tokens=4,
                      image_text_hidden_size=16, architecture=RETRIEVAL, parts=ARCHITECTURES[RETRIEVAL])
    torch.manual_seed(0)
    model = Blip2(cfg).eval()
    spread_weights(model, 1)
    model.tokenizer = tok
    model.processor = ImageProcessor(size=32, mean=cfg.image_mean, std=cfg.image_std)
    return model


def scene_files(directory: Path, n: int = 4, seed: int = 3, size: int = 64) -> list[Path]:
    """`n` generated scenes written as PNG files."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(generate_split(n, seed=seed, image_size=size)):
        paths.append(directory / f"scene{i}.png")
        scene.image.save(paths[-1])
    return paths


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tasks")


@pytest.fixture(scope="module")
def model(work) -> Blip:
    return tiny_blip(work)


@pytest.fixture(scope="module")
def images(work) -> list[Path]:
    return scene_files(work / "scenes")


def png(path: Path) -> np.ndarray:
    """The PNG at `path` as an RGB array, after checking it is a real, non-blank picture."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] >= 150 and arr.shape[1] >= 150
    assert arr.std() > 10  # not blank
    return arr


# ------------------------------------------------------------------------------------------------- zero-shot


def test_classify_itc_and_itm(model, images):
    labels = ["red circle", "blue square", "green star"]
    scores = tasks.label_scores(model, images, labels)
    assert scores.shape == (len(images), 3)
    assert torch.allclose(scores.sum(-1), torch.ones(len(images)), atol=1e-5)  # ITC: softmax over labels
    assert torch.equal(scores, tasks.label_scores(model, images, labels))  # deterministic
    top = tasks.classify(model, images, labels, k=2)
    assert [len(t) for t in top] == [2] * len(images)
    for row, t in zip(scores, top, strict=True):
        assert t[0][0] == labels[int(row.argmax())] and t[0][1] >= t[1][1]
    # ITM: each label's match probability, averaged over templates
    two = ["a picture of a {}", "{}"]
    itm = tasks.label_scores(model, images, labels, two, head="itm")
    each = [tasks.label_scores(model, images, labels, [t], head="itm") for t in two]
    assert torch.allclose(itm, (each[0] + each[1]) / 2, atol=1e-6)
    assert torch.allclose(each[1], model.match(images, labels), atol=1e-6)
    # ITC: templates are averaged in embedding space; softmax at the caller's temperature
    with torch.no_grad():
        prompts = [t.format(label) for label in labels for t in two]
        emb = torch.nn.functional.normalize(model.encode_texts(prompts).view(3, 2, -1).mean(1), dim=-1)
        expected = (model.encode_images(images) @ emb.t() / 0.5).softmax(-1)
    assert torch.allclose(tasks.label_scores(model, images, labels, two, temperature=0.5), expected, atol=1e-5)


def test_classify_errors(model, images):
    with pytest.raises(InputError, match="no labels"):
        tasks.classify(model, images, [])
    with pytest.raises(InputError, match="exactly once"):
        tasks.classify(model, images, ["cat"], templates=["a picture"])
    with pytest.raises(InputError, match="head"):
        tasks.classify(model, images, ["cat"], head="clip")
    with pytest.raises(InputError, match="k must be >= 1, got 0"):
        tasks.classify(model, images, ["cat"], k=0)
    with pytest.raises(InputError, match="does not exist"):
        tasks.classify(model, ["missing.png"], ["cat"])


# ------------------------------------------------------------------------------------------------- ranking


def test_rank_texts_two_stage_recipe(model, images):
    hits = tasks.rank_texts(model, images[0], TEXTS)
    with torch.no_grad():
        itc = model.similarity(images[0], TEXTS)[0]
        logits = model.itm_logits(images[0], TEXTS)[0]
    expected = logits[:, 1] + itc
    assert [h.index for h in hits] == torch.argsort(expected, descending=True).tolist()
    for h in hits:
        assert h.score == pytest.approx(float(expected[h.index]), abs=1e-5)
        assert h.itc == pytest.approx(float(itc[h.index]), abs=1e-5)
        assert h.itm == pytest.approx(float(logits[h.index].softmax(-1)[1]), abs=1e-5)
    # top_n: ITM only re-ranks the best by ITC
    few = tasks.rank_texts(model, images[0], TEXTS, k=2, top_n=2)
    assert {h.index for h in few} == set(torch.topk(itc, 2).indices.tolist())
    only_itc = tasks.rank_texts(model, images[0], TEXTS, head="itc")
    assert [h.index for h in only_itc] == torch.argsort(itc, descending=True).tolist() and only_itc[0].itm is None
    only_itm = tasks.rank_texts(model, images[0], TEXTS, head="itm", k=1)
    assert only_itm[0].index == int(logits.softmax(-1)[:, 1].argmax()) and only_itm[0].itc is None


def test_collection_search_images(model, images):
    gallery = tasks.Collection(model, images=images, texts=TEXTS)
    hits = gallery.search_images("a red circle", k=2, top_n=3)
    with torch.no_grad():
        itc = model.similarity(images, ["a red circle"])[:, 0]
    assert len(hits) == 2 and {h.index for h in hits} <= set(torch.topk(itc, 3).indices.tolist())
    assert hits[0].score >= hits[1].score
    assert tasks.rank_images(model, "a red circle", images, k=2, top_n=3) == hits
    assert len(gallery.search_texts(images[1], k=3)) == 3
    with pytest.raises(InputError, match="one image"):
        gallery.search_texts(images[:2])
    with pytest.raises(InputError, match="no texts"):
        tasks.rank_texts(model, images[0], [])


# ------------------------------------------------------------------------------------------------- matrix


def test_score_matrix_and_picture(model, images, work):
    itc = tasks.score_matrix(model, images, TEXTS)
    itm = tasks.score_matrix(model, images, TEXTS, head="itm")
    with torch.no_grad():
        assert torch.allclose(itc, model.similarity(images, TEXTS), atol=1e-6)
        assert torch.allclose(itm, model.match(images, TEXTS), atol=1e-6)
    path = work / "out" / "matrix.png"
    tasks.render_matrix(itm, images, TEXTS, path, title="ITM")
    arr = png(path)
    first = generate_split(1, seed=3, image_size=64)[0]  # the scene of images[0]
    colour = next(o.colour for o in first.objects if o.colour not in ("white", "black"))
    drawn = np.abs(arr.astype(int) - COLOURS[colour]).max(-1) < 12
    assert drawn.sum() > 20, colour  # the first scene's thumbnail shows its object
    with pytest.raises(InputError, match="scores are"):
        tasks.render_matrix(itm[:2], images, TEXTS)
    with pytest.raises(InputError, match="PNG"):
        tasks.render_matrix(itm, images, TEXTS, work / "matrix.jpg")


# ------------------------------------------------------------------------------------------------- attention


def test_attention_maps_shape_and_grid_from_pixels(work, images):
    wide = tiny_blip(work / "wide")
    wide.processor = ImageProcessor(size=(32, 48), mean=wide.config.image_mean, std=wide.config.image_std)
    maps = tasks.cross_attention_maps(wide, images[0], "a red circle", layer=1)
    assert maps.tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert maps.special == [True, False, False, False, True]
    assert maps.maps.shape == (5, 4, 4, 6) and maps.cls.shape == (5, 4)  # grid 32/8 x 48/8
    total = maps.maps.sum(dim=(-1, -2)) + maps.cls
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)  # each token's attention sums to one
    low = maps.suppress_common()
    assert torch.allclose(low.maps.amin(dim=0), torch.zeros(4, 4, 6), atol=1e-7)
    assert torch.equal(tasks.cross_attention_maps(wide, images[0], "a red circle", layer=1, suppress_common=True).maps,
                       low.maps)
    x, y = maps.peak(2)
    assert 0 < x < 1 and 0 < y < 1
    assert blipkit.layers._RECORDING.get() is None  # nothing left recording after the call


def test_attention_layers_and_picture(model, images, work):
    assert tasks.default_layer(model) == 0  # the middle of 2 layers is the last; GradCAM needs an earlier one
    assert tasks.default_layer(tasks.find_stack(model)[1]) == 0
    with pytest.raises(InputError, match="layers 0..1"):
        tasks.cross_attention_maps(model, images[0], "a red circle", layer=5)
    with pytest.raises(InputError, match="one image"):
        tasks.cross_attention_maps(model, images, "a red circle")
    maps = tasks.cross_attention_maps(model, images[0], "a red circle", layer=-1)
    assert maps.layer == 1
    tasks.render_attention(maps, images[0], work / "out" / "attention.png")
    png(work / "out" / "attention.png")
    tasks.render_attention(maps, images[0], work / "out" / "heads.png", heads=True)
    assert png(work / "out" / "heads.png").shape[1] > 600  # a column per head


@pytest.mark.parametrize("layers, every, expected", [(12, 1, 6), (12, 2, 6), (4, 1, 2), (2, 1, 0), (3, 2, 0)])
def test_default_layer_per_stack(layers, every, expected):
    from blipkit.text import TextEncoder

    cfg = TextConfig(hidden_size=8, encoder_hidden_size=8, intermediate_size=8, num_hidden_layers=layers,
                     num_attention_heads=2, cross_attention_frequency=every)
    assert tasks.default_layer(TextEncoder(cfg)) == expected  # BLIP-base 6, Q-Former 6, scenes-blip 2


def test_attention_from_the_caption_decoder(work, images):
    captioner = tiny_blip(work / "cap", parts=("vision_model", "text_decoder"))
    maps = tasks.cross_attention_maps(captioner, images[0], "a red circle")
    assert maps.part == "text_decoder" and maps.tokens[0] == "[DEC]" and maps.maps.shape[:2] == (5, 4)
    with pytest.raises(CapabilityError, match="itm_head"):
        tasks.ground(captioner, images[0], "a red circle")
    with pytest.raises(CapabilityError, match="vision_proj"):
        tasks.classify(captioner, images[0], ["circle"])
    with pytest.raises(CapabilityError):
        tasks.rank_texts(captioner, images[0], TEXTS)


# ------------------------------------------------------------------------------------------------- grounding


def test_gradcam_equals_attention_times_positive_gradient(model, images):
    cam = tasks.gradcam(model, images[0], "the red circle", layer=0)
    assert cam.tokens == ["[CLS]", "the", "red", "circle", "[SEP]"]
    assert cam.token_maps.shape == (5, 4, 4) and cam.phrase_map.shape == (4, 4)
    assert (cam.token_maps >= 0).all() and cam.token_maps.abs().sum() > 0
    assert torch.allclose(cam.phrase_map, cam.token_maps[1:4].mean(0))
    # by hand through the public parts, with .backward()
    qkv = model.text_encoder.encoder.layer[0].crossattention.qkv
    ids, mask = model.tokens(["the red circle"])
    with torch.no_grad():
        feats = model.vision_model(model.pixels(images[0]))
    with blipkit.layers.recording(qkv) as record:
        h, _ = model.text_encoder(ids, mask, context=feats)
    probs = record[qkv]
    (grad,) = torch.autograd.grad(model.itm_head(h[:, 0])[0, 1], probs)
    ref = (probs * grad.clamp(min=0))[0, :, :, 1:].mean(0).reshape(5, 4, 4).detach()
    assert torch.allclose(cam.token_maps, ref, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # GradCAM leaves no gradients on the weights
    assert not cam.token_maps.requires_grad and not cam.phrase_map.requires_grad
    with torch.no_grad():
        assert cam.match == pytest.approx(float(model.match(images[0], "the red circle")), abs=1e-6)
    assert all(p.grad is None for p in model.parameters())  # GradCAM leaves no gradients on the weights
    assert torch.equal(tasks.gradcam(model, images[0], "the red circle", layer=0).token_maps, cam.token_maps)
    # the ITM position's map: the first token's (what the ITM head reads), the same token maps
    itm = tasks.gradcam(model, images[0], "the red circle", layer=0, source="itm")
    assert cam.source == "phrase" and itm.source == "itm" and torch.equal(itm.token_maps, cam.token_maps)
    assert torch.equal(itm.phrase_map, cam.token_maps[0]) and not torch.equal(itm.phrase_map, cam.phrase_map)
    g = tasks.ground(model, images[0], "the red circle", layer=0, source="itm")
    assert (g.box, g.peak) == tasks.box_from_map(cam.token_maps[0]) and g.to_dict()["source"] == "itm"
    with pytest.raises(InputError, match=r"source='first': use 'phrase' .* or 'itm'"):
        tasks.ground(model, images[0], "the red circle", source="first")


def test_box_from_map():
    heat = torch.zeros(8, 8)
    heat[2:4, 5:7] = 1.0  # rows 2-3, columns 5-6
    heat[6, 0] = 0.9  # a separate blob, not connected to the peak
    box, peak = tasks.box_from_map(heat, threshold=0.5)
    assert 4.5 / 8 <= box[0] <= 5 / 8 and 7 / 8 <= box[2] <= 7.5 / 8
    assert 1.5 / 8 <= box[1] <= 2 / 8 and 4 / 8 <= box[3] <= 4.5 / 8
    assert box[0] <= peak[0] <= box[2] and box[1] <= peak[1] <= box[3]
    assert tasks.box_from_map(torch.zeros(4, 4)) == ([0.0, 0.0, 1.0, 1.0], [0.5, 0.5])
    # a highest cell on the border: the peak is that cell's centre (the upsampled map is flat out to the edge there)
    edge = torch.zeros(8, 8)
    edge[3, 0], edge[3, 1] = 1.0, 0.3
    box, peak = tasks.box_from_map(edge)
    assert peak == [0.0625, 0.4375] and box[0] == 0.0 and box[1] <= 3 / 8 <= 4 / 8 <= box[3]
    # a region grown from the peak even where the threshold is above every upsampled value near it
    assert tasks.box_from_map(edge, threshold=0.99)[1] == peak
    with pytest.raises(InputError, match="threshold"):
        tasks.box_from_map(heat, threshold=1.5)


def test_ground_and_picture(model, images, work):
    found = [tasks.ground(model, images[1], p) for p in ("the red circle", "a blue square")]
    for g in found:
        x1, y1, x2, y2 = g.box
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and 0 <= g.match <= 1
        assert g.cam.layer == 0 and x1 <= g.peak[0] <= x2
    assert found[0].to_dict()["box"] == found[0].box
    tasks.render_grounding(found, images[1], work / "out" / "ground.png", tokens=True)
    png(work / "out" / "ground.png")
    with pytest.raises(InputError, match="empty"):
        tasks.ground(model, images[1], " ")
    with pytest.raises(InputError, match="no cross-attention|does not exist"):
        tasks.ground(model, images[1], "a red circle", layer=2)


# ------------------------------------------------------------------------------------------------- BLIP-2


def test_blip2_tasks(work, images):
    model2 = tiny_blip2(work)
    top = tasks.classify(model2, images[:2], ["red circle", "blue square"], k=1)
    assert len(top) == 2 and len(top[0]) == 1
    with torch.no_grad():
        assert torch.allclose(tasks.score_matrix(model2, images, TEXTS), model2.similarity(images, TEXTS), atol=1e-5)
    hits = tasks.rank_texts(model2, images[0], TEXTS)
    assert len(hits) == len(TEXTS) and hits[0].itm is not None
    maps = tasks.cross_attention_maps(model2, images[0])
    assert maps.part == "qformer" and maps.tokens == [f"query {i}" for i in range(4)]
    assert maps.maps.shape == (4, 4, 4, 4)
    with_text = tasks.cross_attention_maps(model2, images[0], "a red circle", layer=2)
    assert with_text.layer == 2 and with_text.maps.shape == (4, 4, 4, 4)
    with pytest.raises(InputError, match="no cross-attention"):
        tasks.cross_attention_maps(model2, images[0], layer=1)  # the Q-Former cross-attends every 2nd layer
    g = tasks.ground(model2, images[0], "a red circle")
    assert g.cam.part == "qformer" and g.cam.token_maps.shape == (4, 4, 4) and len(g.box) == 4
    space = tasks.embedding_space(model2, images, TEXTS[:2], method="pca")
    assert space.coords.shape == (6, 2)


# ------------------------------------------------------------------------------------------------- plots and facts


def test_embedding_space(model, images, work):
    space = tasks.embedding_space(model, images, TEXTS)
    assert space.method == "tsne" and space.coords.shape == (8, 2)
    assert space.kinds == ["image"] * 4 + ["text"] * 4 and space.labels[-1] == TEXTS[-1]
    assert np.allclose(space.coords, tasks.embedding_space(model, images, TEXTS).coords)  # seeded
    small = tasks.embedding_space(model, images[:2], TEXTS[:1])
    assert small.method == "pca" and small.coords.shape == (3, 2)
    tasks.render_space(space, work / "out" / "space.png")
    png(work / "out" / "space.png")
    with pytest.raises(InputError, match="t-SNE needs"):
        tasks.embedding_space(model, images[:2], method="tsne")
    with pytest.raises(InputError, match="no images and no texts"):
        tasks.embedding_space(model)


def test_model_facts(model):
    facts = tasks.model_facts(model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert facts["total_parameters"] == sum(unique.values())
    assert sum(facts["parts"].values()) == facts["total_parameters"]
    assert set(facts["parts"]) == set(ALL_PARTS)
    assert sum(a["count"] for a in facts["arrays"]) == facts["total_parameters"]
    assert {t["name"] for t in facts["tied"]} == {"text_decoder.cls.predictions.decoder.weight",
                                                   "text_decoder.cls.predictions.decoder.bias"}
    assert facts["leaf_layer_types"]["Conv2d"] == 1 and facts["layer_types"]["TextLayer"] == 4
    assert facts["config"]["vision"]["grid"] == 4 and facts["config"]["text"]["num_hidden_layers"] == 2
    text = tasks.format_facts(facts, arrays=True)
    assert "text_encoder" in text and "vision_model.embeddings.patch_embedding.weight" in text


# ------------------------------------------------------------------------------------------------- inputs


def test_image_paths_and_texts(images, tmp_path):
    folder = images[0].parent
    assert tasks.image_paths(folder) == sorted(images)
    assert tasks.image_paths([str(folder / "scene*.png")]) == sorted(images)
    assert tasks.image_paths(images[0]) == [images[0]]
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="holds no images"):
        tasks.image_paths(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        tasks.image_paths(tmp_path / "nope.png")
    with pytest.raises(InputError, match="matches no image"):
        tasks.image_paths(str(tmp_path / "*.jpg"))
    (tmp_path / "texts.txt").write_text("a red circle\n\n  a blue square  \n")
    assert tasks.read_texts(["x"], tmp_path / "texts.txt") == ["x", "a red circle", "a blue square"]
    with pytest.raises(InputError, match="no texts"):
        tasks.read_texts([], None)


# ------------------------------------------------------------------------------------------------- the trained model

needs_scenes = pytest.mark.skipif(
    "scenes-blip" not in blipkit.list_models(), reason="the shipped scenes-blip model is not installed"
)


@pytest.fixture(scope="module")
def scenes_blip():
    return blipkit.load("scenes-blip")


def distinct_scenes(n: int, seed: int, objects: int, colours_differ: bool = False) -> list:
    """`n` scenes of exactly `objects` objects whose colour-shape pairs (or, with `colours_differ`, colours) differ."""
    rng, out = random.Random(seed), []
    while len(out) < n:
        scene = generate_scene(rng, image_size=128)
        keys = {o.colour if colours_differ else (o.colour, o.shape) for o in scene.objects}
        if len(scene.objects) == objects and len(keys) == objects:
            out.append(scene)
    return out


def inside(point: list[float], box: tuple[float, ...], margin: float = 0.0) -> bool:
    return box[0] - margin <= point[0] <= box[2] + margin and box[1] - margin <= point[1] <= box[3] + margin


def centre(box: list[float] | tuple[float, ...]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


@needs_scenes
def test_trained_right_label_wins(scenes_blip):
    scenes = distinct_scenes(16, seed=101, objects=1)
    right = 0
    for scene in scenes:
        shape, colour = scene.objects[0].shape, scene.objects[0].colour
        labels = [f"{c} {shape}" for c in COLOURS]  # one label per colour: the right one must win
        for head in ("itc", "itm"):
            right += tasks.classify(scenes_blip, scene.image, labels, templates=["{}"], head=head, k=1)[0][0][0] == (
                f"{colour} {shape}")
    assert right >= 0.9 * 2 * len(scenes)


@needs_scenes
def test_trained_box_lands_on_the_named_shape(scenes_blip):
    hits = 0
    scenes = distinct_scenes(20, seed=606, objects=1)
    for scene in scenes:
        obj = scene.objects[0]
        g = tasks.ground(scenes_blip, scene.image, f"the {obj.colour} {obj.shape}")
        hits += inside(centre(g.box), obj.box_norm, margin=0.05)
    assert hits >= 0.85 * len(scenes)  # 20 of 20 at the defaults (docs/tasks.md)
    # With two objects of different colours, the box goes to the named one far more often than to the other
    # (23 of 24 at the defaults; a box that ignored the phrase would be nearer either one half the time).
    closer = total = 0
    for scene in distinct_scenes(12, seed=707, objects=2, colours_differ=True):
        for obj, other in (scene.objects, scene.objects[::-1]):
            c = centre(tasks.ground(scenes_blip, scene.image, f"the {obj.colour} {obj.shape}").box)
            closer += math.dist(c, centre(obj.box_norm)) < math.dist(c, centre(other.box_norm))
            total += 1
    assert closer >= 0.8 * total


@needs_scenes
def test_trained_colour_word_attention_peaks_on_its_object(scenes_blip):
    hits = total = 0
    for scene in distinct_scenes(12, seed=203, objects=2):
        for obj in scene.objects:
            maps = tasks.cross_attention_maps(scenes_blip, scene.image, f"a {obj.colour} {obj.shape}",
                                              suppress_common=True)
            half_cell = 0.5 / maps.maps.shape[-1]
            hits += inside(list(maps.peak(maps.tokens.index(obj.colour))), obj.box_norm, margin=half_cell)
            total += 1
    # 18 of 24 at the default layer (and at layer 0); a peak placed without looking lands in the box about one time
    # in twelve (the boxes cover 3-12 % of the image)
    assert hits >= 0.7 * total
