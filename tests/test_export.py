"""ONNX export and the onnxruntime back end: tower outputs against torch (<= 1e-4), the same captions and answers
through the same decoding code (tiny random BLIP / BLIP-2 OPT and the shipped models), the command, the
onnxruntime-only example, and the errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blipkit
from blipkit import cli
from blipkit.errors import CapabilityError, CheckpointError, InputError
from blipkit.export import export_onnx
from blipkit.export.runtime import OnnxBlip, OnnxBlip2, torch_tower_model

from .test_blip2 import dirs, gpt2_tokenizer, itm_tokenizer, t5_tokenizer  # noqa: F401  (fixtures)

pytest.importorskip("onnxruntime")
TOL = 1e-4
TEXTS = ["a red circle on the left", "two dogs", "x"]
EXAMPLE = Path(__file__).parents[1] / "examples" / "onnx_runtime_only.py"
IMAGE = str(Path(__file__).parents[1] / "examples" / "red-circle-blue-square.png")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def blip_pairs(hf_blip_dirs, tmp_path_factory) -> dict[str, tuple]:
    """(torch model, the same exported and loaded back) for the three tiny BLIP architectures."""
    out = {}
    for name, path in hf_blip_dirs.items():
        model = blipkit.load(path)
        target = export_onnx(model, tmp_path_factory.mktemp(f"onnx-{name}"))
        out[name] = (model, blipkit.load(target), target)
    return out


def _max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def test_blip_towers_and_scores(blip_pairs, photos):
    ours, onnx, _ = blip_pairs["BlipForImageTextRetrieval"]
    assert isinstance(onnx, OnnxBlip)
    assert _max(onnx.image_features(photos), ours.image_features(photos)) <= TOL
    assert _max(onnx.similarity(photos, TEXTS), ours.similarity(photos, TEXTS)) <= TOL
    assert _max(onnx.itm_logits(photos, TEXTS), ours.itm_logits(photos, TEXTS)) <= TOL
    assert _max(onnx.match(photos, TEXTS), ours.match(photos, TEXTS)) <= TOL
    # the torch towers are the graphs that were exported
    towers = torch_tower_model(ours)
    assert _max(towers.match(photos, TEXTS), ours.match(photos, TEXTS)) <= 1e-6


def test_encode_images_from_features(blip_pairs, photos, tmp_path):
    """The vision_projection tower takes features computed beforehand (as `evaluate` passes them); an export
    without it says so."""
    ours, onnx, _ = blip_pairs["BlipForImageTextRetrieval"]
    feats = ours.image_features(photos)
    assert _max(onnx.encode_images(feats), ours.encode_images(feats)) <= TOL
    assert _max(onnx.encode_images(feats.as_subclass(torch.Tensor)), onnx.encode_images(photos)) <= TOL
    old = blipkit.load(export_onnx(ours, tmp_path / "old", parts=["vision_encoder", "text_encoder"]))
    assert _max(old.encode_images(photos), ours.encode_images(photos)) <= TOL
    with pytest.raises(InputError, match=r"has no vision_projection tower, so encode_images takes images here, not "
                                         r"image features: export the model again$"):
        old.encode_images(feats)


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=2, num_captions=2),
                                dict(num_beams=3, prompt="a picture of"), dict(do_sample=True, num_captions=2)])
def test_blip_captions_identical(blip_pairs, photos, kw):
    ours, onnx, _ = blip_pairs["BlipForConditionalGeneration"]
    torch.manual_seed(0)
    expected = ours.caption(photos, max_new_tokens=8, return_scores=True, **kw)
    torch.manual_seed(0)
    got = onnx.caption(photos, max_new_tokens=8, return_scores=True, **kw)
    flat = (lambda x: [c for group in x for c in group]) if kw.get("num_captions", 1) > 1 else list
    assert [t for t, _ in flat(got)] == [t for t, _ in flat(expected)]
    assert max(abs(a - b) for (_, a), (_, b) in zip(flat(got), flat(expected), strict=True)) <= TOL


def test_sampled_with_a_generator_per_image(blip_pairs, opt_pair, photos):
    """caption(generator=[...]) draws each image's samples from its own generator on onnxruntime too."""
    for ours, onnx, images in ((*blip_pairs["BlipForConditionalGeneration"][:2], photos),
                               (*opt_pair, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))):
        n, kw = len(images), dict(do_sample=True, max_new_tokens=6, return_scores=True)
        got = onnx.caption(images, generator=[torch.Generator().manual_seed(10 + i) for i in range(n)], **kw)
        expected = ours.caption(images, generator=[torch.Generator().manual_seed(10 + i) for i in range(n)], **kw)
        assert [t for t, _ in got] == [t for t, _ in expected]
        assert max(abs(a - b) for (_, a), (_, b) in zip(got, expected, strict=True)) <= TOL


def test_blip_vqa_generated_and_ranked(blip_pairs, photos):
    ours, onnx, _ = blip_pairs["BlipForQuestionAnswering"]
    questions = ["what is it?", "how many?", "where is the dog?"]
    assert onnx.answer(photos, questions, max_new_tokens=5) == ours.answer(photos, questions, max_new_tokens=5)
    candidates = ["yes", "no", "two dogs", "red"]
    assert onnx.answer(photos, questions, answers=candidates) == ours.answer(photos, questions, answers=candidates)
    assert onnx.answer(photos, questions, answers=candidates, num_candidates=2) == \
        ours.answer(photos, questions, answers=candidates, num_candidates=2)
    states, qmask = ours._question_states(photos, questions)
    assert _max(onnx.answer_logprobs(states, qmask, candidates), ours.answer_logprobs(states, qmask, candidates)) <= TOL


@pytest.fixture(scope="module")
def opt_pair(dirs, tmp_path_factory):  # noqa: F811
    model = blipkit.load(dirs["opt"])
    return model, blipkit.load(export_onnx(model, tmp_path_factory.mktemp("onnx-opt")))


@pytest.mark.parametrize("kw", [dict(num_beams=1), dict(num_beams=3), dict(num_beams=1, prompt="a photo of"),
                                dict(do_sample=True, num_captions=2)])
def test_blip2_opt_captions_identical(opt_pair, kw):
    ours, onnx = opt_pair
    assert isinstance(onnx, OnnxBlip2)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert _max(onnx.prefix_embeds(pixels), ours.prefix_embeds(pixels)) <= TOL
    torch.manual_seed(0)
    expected = ours.caption(pixels, max_new_tokens=6, return_scores=True, **kw)
    torch.manual_seed(0)
    got = onnx.caption(pixels, max_new_tokens=6, return_scores=True, **kw)
    flat = (lambda x: [c for group in x for c in group]) if kw.get("num_captions", 1) > 1 else list
    assert [t for t, _ in flat(got)] == [t for t, _ in flat(expected)]
    assert max(abs(a - b) for (_, a), (_, b) in zip(flat(got), flat(expected), strict=True)) <= TOL
    assert onnx.answer(pixels, ["what?", "who?"], max_new_tokens=4) == \
        ours.answer(pixels, ["what?", "who?"], max_new_tokens=4)
    assert onnx.generate(pixels, "say", max_new_tokens=4) == ours.generate(pixels, "say", max_new_tokens=4)


def test_blip2_t5_exports_vision_and_qformer_only(dirs, tmp_path):  # noqa: F811
    model = blipkit.load(dirs["t5"])
    with pytest.raises(InputError, match=r"ONNX export of the t5 language model is not supported"):
        export_onnx(model, tmp_path / "all")
    out = export_onnx(model, tmp_path / "part", parts=["vision_encoder", "qformer"])
    onnx = blipkit.load(out)
    pixels = torch.randn(1, 3, 32, 32)
    assert _max(onnx.prefix_embeds(pixels), model.prefix_embeds(pixels)) <= TOL
    with pytest.raises(CapabilityError, match=r"the ONNX back end runs OPT language models, not T5"):
        onnx.caption(pixels)


@pytest.mark.parametrize("name", ["scenes-blip", "scenes-blip2-opt"])
def test_shipped_models_round_trip(name, tmp_path):
    ours = blipkit.load(name)
    onnx = blipkit.load(export_onnx(ours, tmp_path / name))
    from blipkit.data.scenes import iter_scenes

    images = [s.image for s in iter_scenes(6, seed=20261202)]
    for kw in (dict(num_beams=1), dict()):  # greedy and the default beam search
        assert onnx.caption(images, **kw) == ours.caption(images, **kw)
    if name == "scenes-blip":
        assert _max(onnx.match(images, TEXTS), ours.match(images, TEXTS)) <= TOL
        assert onnx.answer(images[:2], ["what color is it?"] * 2) == ours.answer(images[:2], ["what color is it?"] * 2)
        # evaluate's retrieval passes features computed beforehand to encode_images (the vision_projection tower)
        from blipkit.data.scenes import write_dataset
        from blipkit.train.eval import evaluate

        write_dataset(tmp_path / "scenes", 0, 0, 12, seed=0, progress=False)
        got, want = (evaluate(m, tmp_path / "scenes", "test", ["retrieval"])["metrics"] for m in (onnx, ours))
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in want) <= 1e-6


def test_command_and_runtime_only_example(tmp_path, capsys):
    out = tmp_path / "blip"
    assert cli.main(["export", "scenes-blip", "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote image_text_encoder.onnx, text_decoder.onnx" in capsys.readouterr().out
    manifest = json.loads((out / "onnx.json").read_text())
    assert set(manifest["towers"]) == {"vision_encoder", "vision_projection", "text_encoder", "image_text_encoder",
                                       "text_decoder_cross", "text_decoder"}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}
    run = subprocess.run([sys.executable, str(EXAMPLE), str(out), IMAGE, "a red circle"], capture_output=True,
                         text=True, check=True)
    model = blipkit.load(out)
    caption = model.caption(IMAGE, num_beams=1, min_new_tokens=0)[0]
    itc = float(model.similarity(IMAGE, "a red circle")[0, 0])
    assert run.stdout.splitlines() == [f"ITC {itc:+.3f}  a red circle", f"caption: {caption}"]
    assert "import torch" not in EXAMPLE.read_text() and "import blipkit" not in EXAMPLE.read_text()


def test_weight_only_int8_matmul(tmp_path):
    """A MatMul with a constant weight becomes MatMulNBits: with float activations (accuracy level 0) it computes x @
    the block-dequantized weight (K = 40: a padded last block); at level 4 (int8 activations per block) it stays
    within 1 % of the float product."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from blipkit.export.onnx import weight_only_int8

    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(40, 24)).astype(np.float32), rng.normal(size=(3, 40)).astype(np.float32)
    blocks = np.pad(w.T, ((0, 0), (0, 24))).reshape(24, 2, 32)
    scale = np.abs(blocks).max(-1, keepdims=True) / 127
    dequant = (np.rint(blocks / scale) * scale).reshape(24, 64)[:, :40].T
    for level, tol in ((0, 1e-5), (4, 1e-2)):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 40])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 24])],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        assert weight_only_int8(model, accuracy_level=level) == 1
        assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
        assert "w" not in {t.name for t in model.graph.initializer}  # the float matrix is gone
        onnx.save(model, str(tmp_path / "m.onnx"))
        (y,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        want = x @ dequant if level == 0 else x @ w
        assert np.abs(y - want).max() <= tol * np.abs(want).max()


def test_int8_export_round_trip(blip_pairs, photos, tmp_path):
    """--quantize int8 puts the decoder step's weights in int8 blocks and leaves the other towers float32: image
    features match torch as the float export's do; the step's log-probabilities move by 0.1 on average at most."""
    import onnx

    ours, float_export, _ = blip_pairs["BlipForConditionalGeneration"]
    assert cli.main(["export", str(ours.name_or_path), "--format", "onnx", "--out", str(tmp_path / "q"),
                     "--quantize", "int8"]) == 0
    manifest = json.loads((tmp_path / "q" / "onnx.json").read_text())
    assert manifest["quantize"] == "int8"
    assert manifest["int8"] == {"method": "weight-only, com.microsoft.MatMulNBits", "bits": 8, "block_size": 32,
                                "accuracy_level": 4, "towers": ["text_decoder"], "float": "vocabulary head"}
    ops = {name: {n.op_type for n in onnx.load(str(tmp_path / "q" / f"{name}.onnx")).graph.node}
           for name in ("text_decoder", "text_decoder_cross", "vision_encoder")}
    assert "MatMulNBits" in ops["text_decoder"] and not ops["text_decoder_cross"] & {"MatMulNBits"}
    assert "MatMulNBits" not in ops["vision_encoder"]
    int8 = blipkit.load(tmp_path / "q")
    assert _max(int8.image_features(photos), ours.image_features(photos)) <= TOL
    feats = ours.image_features(photos)
    cross = float_export.runner("text_decoder_cross", feats)
    ids = torch.tensor([[ours.config.text_config.bos_token_id, 1000, 1001, 1002]]).expand(len(photos), -1)
    step = (ids, torch.arange(4).expand_as(ids), torch.ones_like(ids), torch.ones(feats.shape[:2], dtype=torch.long),
            float_export._decoder_kv(len(photos)), *cross)
    got, want = (m.runner("text_decoder", *step)[0].log_softmax(-1) for m in (int8, float_export))
    # tiny random weights, log-probabilities spread ~3: the int8 step moves them by ~0.04 on average
    assert float((got - want).abs().mean()) <= 0.1 and _max(got, want) <= 0.6


@pytest.mark.parametrize("name", ["scenes-blip", "scenes-blip2-opt"])
def test_int8_export_shipped_captions(name, tmp_path):
    """The shipped models' int8 exports caption these scenes as the float models do (greedy and beam search; their
    test split: 100 / 100 and 99 / 100 identical, docs/speed.md); ITC and ITM stay those of the float towers."""
    ours = blipkit.load(name)
    onnx = blipkit.load(export_onnx(ours, tmp_path / name, quantize="int8"))
    from blipkit.data.scenes import iter_scenes

    images = [s.image for s in iter_scenes(8, seed=20261202)]
    for kw in (dict(num_beams=1), dict()):
        assert onnx.caption(images, **kw) == ours.caption(images, **kw)
    if name == "scenes-blip":
        assert _max(onnx.similarity(images, TEXTS), ours.similarity(images, TEXTS)) <= TOL
        assert _max(onnx.itm_logits(images, TEXTS), ours.itm_logits(images, TEXTS)) <= TOL
        size = sum(p.stat().st_size for p in (tmp_path / name).glob("text_decoder.onnx"))
        assert size < 0.5 * sum(p.stat().st_size for p in export_onnx(ours, tmp_path / "f", parts=["text_decoder"])
                                .glob("text_decoder.onnx"))


def test_errors(blip_pairs, tmp_path, capsys):
    model, _, target = blip_pairs["BlipForConditionalGeneration"]
    with pytest.raises(InputError, match=r"has no part 'qformer' to export; its parts: vision_encoder, "):
        export_onnx(model, tmp_path / "x", parts=["qformer"])
    assert not (tmp_path / "x").exists()
    assert cli.main(["export", "scenes-blip", "--format", "onnx", "--out", str(tmp_path / "y"), "--parts", "nope"]) == 2
    assert "has no part 'nope' to export" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in target.iterdir():
        if p.name != "text_decoder.onnx":
            (broken / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match=r"the text_decoder tower's file text_decoder.onnx is missing; export "):
        blipkit.load(broken)
    with pytest.raises(InputError, match=r"is an ONNX export, which runs on onnxruntime on the CPU as exported"):
        blipkit.load(target, quantize="int8")
    with pytest.raises(InputError, match=r"has int8 weights: export the float model"):
        export_onnx(blipkit.load(blipkit.shipped_models()["scenes-blip"], quantize="int8"), tmp_path / "z")
