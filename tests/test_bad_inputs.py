"""Bad and unusual inputs through the public API and the command line: a right answer or a BlipkitError.

The corpus holds every case of the "found" list that led to the input checks (each was a silent wrong answer, lost
work, a runaway allocation or a traceback) and a sample of the wider survey in `scripts/try_inputs.py`; the
property-based tests vary texts, option dictionaries, tensors and config values across `match`, `similarity`,
`caption`, `answer`, `classify` and the command line. Every refusal must be one line that names the input.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import blipkit
from blipkit import cli, tasks
from blipkit.errors import BlipkitError, CapabilityError, CheckpointError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
A, B = EXAMPLES / "red-circle-blue-square.png", EXAMPLES / "purple-square-yellow-circle.png"
QUESTION = "what color is the circle?"
FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def opt():
    return blipkit.load("scenes-blip2-opt")


@pytest.fixture(scope="module")
def itm2():
    return blipkit.load("scenes-blip2-itm")


def refused(call, *names: str, kind: type[BlipkitError] = BlipkitError) -> str:
    """Run `call`, which must raise `kind` with a one-line message naming one of `names`; returns the message."""
    with pytest.raises(kind) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert not names or any(n.lower() in message.lower() for n in names), message
    return message


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`blipkit ARGV` in this process: exit status, stdout, stderr."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def cli_refused(capsys, *argv: str, names: tuple[str, ...] = ()) -> str:
    """The command must end with exit 2 and one line on stderr naming one of `names`, no traceback."""
    code, _, err = run_cli(capsys, *argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert not names or any(n in lines[0] for n in names), lines[0]
    return lines[0]


def json_records(out: str) -> list[dict]:
    """JSON lines (or one JSON document) printed by a bulk command."""
    try:
        doc = json.loads(out)
        return doc if isinstance(doc, list) else [doc]
    except ValueError:
        return [json.loads(line) for line in out.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ silently wrong


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_several_captions_under_greedy_decoding_stay_with_their_image(family, model, opt):
    """caption([a, b], num_captions=3, num_beams=1) once filed image b's caption under image a."""
    m = model if family == "blip" else opt
    try:
        out = m.caption([A, B], num_captions=3, num_beams=1, max_new_tokens=10)
    except BlipkitError as e:
        assert "num_captions" in str(e) and "\n" not in str(e)
        return
    solo = [m.caption(p, num_beams=1, max_new_tokens=10)[0] for p in (A, B)]
    assert [len(c) for c in out] == [3, 3]
    assert out[0][0] == solo[0] and out[1][0] == solo[1]


def test_several_captions_on_the_command_line_stay_with_their_image(capsys, model):
    code, out, err = run_cli(capsys, "caption", A, B, "--num-captions", "3", "--beams", "1", "--json")
    if code == 2:
        assert "num_captions" in err.replace("-", "_") and "Traceback" not in err
        return
    records = json_records(out)
    assert code == 0 and [Path(r["image"]).name for r in records] == [A.name, B.name]
    assert all(len(r["captions"]) == 3 for r in records)


def test_caption_on_a_vqa_checkpoint_is_refused_naming_checkpoints_that_can(hf_blip_dirs):
    vqa = blipkit.load(hf_blip_dirs["BlipForQuestionAnswering"])
    message = refused(lambda: vqa.caption(A, max_new_tokens=5), "caption", kind=CapabilityError)
    able = message.split("can:")[-1]
    assert "blip-vqa" not in able and "blip-itm" not in able, message
    assert "blip-image-captioning" in able or "scenes-blip" in able, message


@pytest.mark.parametrize("command", ["ground", "attention"])
def test_a_second_image_is_not_read_as_the_text(capsys, command):
    """`blipkit ground a.png b.png "phrase"` grounded the file name b.png."""
    code, out, err = run_cli(capsys, command, A, B, "a red circle", "--json")
    assert "Traceback" not in err
    assert code == 2 or B.name not in out, out[:300]


def test_attention_maps_and_gradcam_are_right_while_other_threads_use_the_model(model):
    text_a, text_b = "a red circle left of a blue square", "a purple square and a yellow circle"
    ref_maps = tasks.cross_attention_maps(model, A, text_a).maps
    ref_cam = tasks.gradcam(model, B, text_b).phrase_map
    wrong: list[str] = []

    def maps() -> None:
        for _ in range(6):
            if not torch.allclose(tasks.cross_attention_maps(model, A, text_a).maps, ref_maps, atol=1e-4):
                wrong.append("attention maps")

    def cam() -> None:
        for _ in range(6):
            if not torch.allclose(tasks.gradcam(model, B, text_b).phrase_map, ref_cam, atol=1e-3):
                wrong.append("gradcam")

    def match() -> None:
        for _ in range(6):
            model.match([A, B], [text_a, text_b])

    threads = [threading.Thread(target=f) for f in (maps, cam, match)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_raw_uint8_pixels_are_not_taken_as_normalised(model):
    raw = torch.from_numpy(np.array(Image.open(A).convert("RGB").resize((128, 128)))).permute(2, 0, 1)
    try:
        got = model.match(raw, "a red circle")
    except BlipkitError as e:
        assert "uint8" in str(e)
        return
    assert torch.allclose(got, model.match(A, "a red circle"), atol=2e-2)


def test_a_float_tensor_with_the_hidden_width_is_not_taken_for_features(model):
    width = model.config.vision_config.hidden_size
    refused(lambda: model.match(torch.randn(1, 5, width), "a red circle"), "shape")


def test_a_16_bit_png_reads_as_its_8_bit_image(model, tmp_path):
    grey = np.asarray(Image.open(A).convert("L")).astype(np.uint16)
    Image.fromarray(grey * 257).save(tmp_path / "deep.png")
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "flat.png")
    try:
        deep = model.image_features(tmp_path / "deep.png")
    except BlipkitError as e:
        assert "deep.png" in str(e)
        return
    assert torch.allclose(deep, model.image_features(tmp_path / "flat.png"), atol=1e-3)


def test_one_candidate_answer_as_a_string_is_not_ranked_by_its_letters(model):
    try:
        assert model.answer(A, QUESTION, answers="red") == ["red"]
    except BlipkitError as e:
        assert "answers" in str(e)


@pytest.mark.parametrize("text", ["\x01\x02", "\x00", "\u200b", " \t\n", "\udcff"])
def test_texts_without_words_are_refused(model, text):
    refused(lambda: model.match(A, text), "text", repr(text)[1:-1])
    refused(lambda: model.encode_texts(["a red circle", text]), "text 1", repr(text)[1:-1])


@pytest.mark.parametrize("family", ["blip", "blip2"])
def test_zero_captions_are_refused(family, model, opt):
    m = model if family == "blip" else opt
    refused(lambda: m.caption(A, num_captions=0), "num_captions")


# ----------------------------------------------------------------------------------------------------- lost work


def test_caption_of_a_folder_keeps_the_captions_before_an_unreadable_file(capsys, tmp_path):
    shutil.copy(A, tmp_path / "a.png")
    shutil.copy(B, tmp_path / "b.png")
    (tmp_path / "zz-unreadable.png").write_bytes(b"")
    code, out, err = run_cli(capsys, "caption", tmp_path, "--json")
    assert code != 0 and "Traceback" not in err and "zz-unreadable.png" in err
    assert sorted(Path(r["image"]).name for r in json_records(out) if "caption" in r) == ["a.png", "b.png"]


def test_eval_out_in_a_missing_directory_is_refused_before_the_work(capsys, tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": str(A), "caption": "a red circle left of a blue square"}]))
    out = tmp_path / "missing" / "dir" / "x.json"
    code, _, err = run_cli(capsys, "eval", "--data", data, "--tasks", "retrieval", "--out", out)
    assert "Traceback" not in err
    assert (code == 2 and "x.json" in err and len(err.strip().splitlines()) == 1) or (code == 0 and out.is_file())


@pytest.mark.parametrize("command", ["eval", "train"])
def test_skip_bad_skips_a_zero_byte_image(capsys, tmp_path, command):
    (tmp_path / "zero.png").write_bytes(b"")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"image": str(A), "caption": "a red circle"},
                                {"image": str(tmp_path / "zero.png"), "caption": "a blue square"}]))
    argv = ["--data", data, "--skip-bad"]
    argv += ["--tasks", "retrieval"] if command == "eval" else ["--steps", "1", "--batch-size", "1", "--out",
                                                                 tmp_path / "run"]
    code, _, err = run_cli(capsys, command, *argv)
    assert code == 0, err[-500:]


@pytest.mark.parametrize("command", ["ground", "attention"])
def test_out_that_would_overwrite_the_input_is_refused(capsys, tmp_path, command):
    image = tmp_path / "x.png"
    shutil.copy(A, image)
    before = image.read_bytes()
    cli_refused(capsys, command, image, "a red circle", "-o", image, names=("x.png",))
    assert image.read_bytes() == before


# ------------------------------------------------------------------------------------------------ memory, hangs


@pytest.mark.parametrize("method", ["match", "similarity", "itm_logits"])
def test_scores_do_not_require_grad(model, itm2, method):
    for m in (model, itm2):
        assert not getattr(m, method)(A, ["a red circle", "a blue square"]).requires_grad


@pytest.mark.parametrize("call", [
    lambda m: m.encode_images(A), lambda m: m.encode_texts("a red circle"), lambda m: m.image_features(A),
    lambda m: m.match(m.image_features(A), "a red circle"),
    lambda m: tasks.label_scores(m, A, ["circle", "square"]), lambda m: tasks.gradcam(m, A, "a circle").token_maps,
    lambda m: tasks.cross_attention_maps(m, A, "a circle").maps,
], ids=["encode_images", "encode_texts", "image_features", "match_features", "label_scores", "gradcam", "attention"])
def test_features_and_maps_do_not_require_grad(model, call):
    assert not call(model).requires_grad


def test_gradcam_leaves_no_gradient_on_the_weights(model):
    tasks.gradcam(model, A, "a red circle")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("options, names", [
    (dict(min_new_tokens=100, max_new_tokens=100, prompt="red " * 40), ("min_new_tokens", "max_new_tokens")),
    (dict(max_new_tokens=10**7), ("max_new_tokens",)),
    (dict(num_beams=10**6, max_new_tokens=5), ("num_beams",)),
])
def test_blip_generation_is_bounded_by_the_position_table(model, options, names):
    refused(lambda: model.caption(A, **{"num_beams": 1, **options}), *names)


def shipped_copy(tmp_path: Path, config: dict | None = None, pre: dict | None = None) -> Path:
    """scenes-blip copied (weights linked), with config.json / preprocessor_config.json values replaced."""
    src = Path(blipkit.__file__).parent / "models" / "scenes-blip"
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            os.symlink(f, d / f.name)
        else:
            shutil.copy(f, d / f.name)
    for name, change in (("config.json", config), ("preprocessor_config.json", pre)):
        if change:
            data = json.loads((d / name).read_text())
            for key, value in change.items():
                node = data
                *parents, last = key.split(".")
                for p in parents:
                    node = node[p]
                node[last] = value
            (d / name).write_text(json.dumps(data))
    return d


@pytest.mark.parametrize("config, pre, names", [
    (None, {"size": {"height": 100000, "width": 100000}}, ("preprocessor_config.json", "size")),
    ({"text_config.num_hidden_layers": 10**6}, None, ("config.json", "num_hidden_layers")),
    ({"vision_config.hidden_size": "wide"}, None, ("config.json", "hidden_size")),
    ({"text_config.vocab_size": -1}, None, ("config.json", "vocab_size")),
    ({"vision_config.patch_size": 0}, None, ("config.json", "patch_size")),
    (None, {"image_std": [0, 0, 0]}, ("preprocessor_config.json", "image_std")),
    (None, {"image_mean": [0.5]}, ("preprocessor_config.json", "image_mean")),
])
def test_malformed_checkpoint_values_are_refused_before_anything_is_allocated(tmp_path, config, pre, names):
    refused(lambda: blipkit.load(shipped_copy(tmp_path, config, pre)), *names, kind=CheckpointError)


def test_create_checks_the_dtype_before_building(monkeypatch):
    import blipkit.blip as blip_module

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the dtype was checked")

    monkeypatch.setattr(blip_module.Blip, "__init__", built)
    refused(lambda: blipkit.create("blip-itm-base-coco", dtype="int8"), "int8")


# ---------------------------------------------------------------------------------- tracebacks: a sample corpus


@pytest.mark.parametrize("name, files, names", [
    ("config.json not JSON", {"config.json": "{"}, ("config.json",)),
    ("config.json a list", {"config.json": "[]"}, ("config.json",)),
    ("config.json binary", {"config.json": b"\x89PNG\x00\xff"}, ("config.json",)),
    ("preprocessor not JSON", {"preprocessor_config.json": "{"}, ("preprocessor_config.json",)),
    ("tokenizer.json truncated", {"tokenizer.json": '{"version": "1.0", "trunc'}, ("tokenizer.json",)),
    ("weights truncated", {"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}"}, ("model.safetensors",)),
    ("index not JSON", {"model.safetensors.index.json": "{"}, ("model.safetensors.index.json",)),
])
def test_malformed_checkpoint_files_are_one_line_errors(tmp_path, name, files, names):
    d = shipped_copy(tmp_path)
    for file, data in files.items():
        if file == "model.safetensors.index.json":
            (d / "model.safetensors").unlink()
        if file == "model.safetensors":
            (d / file).unlink()
        (d / file).write_bytes(data.encode() if isinstance(data, str) else data)
    refused(lambda: blipkit.load(d), *names, kind=CheckpointError)


@pytest.mark.parametrize("kwargs, names", [
    (dict(device="gpu"), ("gpu",)), (dict(device="cuda:3"), ("cuda",)), (dict(device=""), ("device",)),
    (dict(dtype="int8"), ("int8",)), (dict(dtype=torch.int64), ("int64",)), (dict(dtype="float8"), ("float8",)),
])
def test_load_checks_device_and_dtype(kwargs, names):
    refused(lambda: blipkit.load("scenes-blip", **kwargs), *names)


@pytest.mark.parametrize("call, names", [
    (lambda m: m.match(A, None), ("texts",)),
    (lambda m: m.similarity(A, 5), ("texts", "int")),
    (lambda m: m.match(A, [["nested"]]), ("text 0",)),
    (lambda m: m.match(A, b"bytes"), ("texts", "bytes")),
    (lambda m: m.match(os.fsdecode(b"/tmp/\xff\xfe-missing.png"), "a"), ("missing.png",)),
    (lambda m: m.match([], "a"), ("image",)),
    (lambda m: m.match(torch.full((1, 3, 128, 128), float("nan")), "a"), ("NaN",)),
    (lambda m: m.caption(A, num_beams=0), ("num_beams",)),
    (lambda m: m.caption(A, num_beams="3"), ("num_beams",)),
    (lambda m: m.caption(A, max_new_tokens=-1), ("max_new_tokens",)),
    (lambda m: m.caption(A, do_sample=True, top_p=1.5), ("top_p",)),
    (lambda m: m.caption(A, do_sample=True, temperature=float("nan")), ("temperature",)),
    (lambda m: m.caption(A, repetition_penalty=0), ("repetition_penalty",)),
    (lambda m: m.caption(A, min_new_tokens=20, max_new_tokens=10), ("min_new_tokens",)),
    (lambda m: m.caption(A, prompt=5), ("prompt",)),
    (lambda m: m.answer(A, QUESTION, num_candidates=0, answers=["red"]), ("num_candidates",)),
    (lambda m: m.answer(A, QUESTION, foo=1), ("foo",)),
    (lambda m: m.answer([A, B], [QUESTION] * 3), ("question",)),
    (lambda m: tasks.classify(m, A, []), ("label",)),
    (lambda m: tasks.classify(m, A, ["circle"], head="xyz"), ("head",)),
    (lambda m: tasks.classify(m, A, ["circle"], k=0), ("k",)),
    (lambda m: tasks.classify(m, A, ["circle"], templates=["no braces"]), ("template",)),
    (lambda m: tasks.ground(m, A, "a circle", threshold=2), ("threshold",)),
    (lambda m: tasks.ground(m, A, "a circle", layer=100), ("layer",)),
    (lambda m: tasks.cross_attention_maps(m, A, "a circle", layer="0"), ("layer",)),
    (lambda m: tasks.rank_texts(m, A, ["a", "b"], top_n=-3), ("top_n",)),
    (lambda m: tasks.score_matrix(m, A, ["a"], head="xyz"), ("head",)),
    (lambda m: tasks.embedding_space(m, texts=["a", "b", "c"], method="xyz"), ("method",)),
    (lambda m: blipkit.save(m, None), ("directory",)),
    (lambda m: blipkit.create("nope"), ("nope",)),
])
def test_corpus_of_bad_api_inputs(model, call, names):
    refused(lambda: call(model), *names)


# What the survey (scripts/try_inputs.py) still found after the input checks: each was accepted with a wrong or
# meaningless answer, ran out of memory, or raised a TypeError from inside torch / numpy / scikit-learn.
@pytest.mark.parametrize("call, names", [
    (lambda m: m.match(Image.new("RGB", (0, 0)), "a"), ("0x0", "empty")),
    (lambda m: m.match(Image.new("RGB", (0, 10)), "a"), ("0x10", "empty")),
    (lambda m: m.match(torch.zeros(0, 3, 128, 128), "a"), ("shape", "N >= 1")),
    (lambda m: m.match(m.pixels(A) * 1e30, "a"), ("pixel values",)),
    (lambda m: m.encode_images(torch.full((3, 128, 128), -5e3)), ("pixel values",)),
    (lambda m: m.caption(A, num_beams=10**6, max_new_tokens=5), ("num_beams",)),
    (lambda m: m.caption(A, do_sample=True, num_captions=10**6), ("num_captions",)),
    (lambda m: tasks.classify(m, A, None), ("labels",)),
    (lambda m: tasks.classify(m, A, 5), ("labels",)),
    (lambda m: tasks.classify(m, A, b"a red circle"), ("labels",)),
    (lambda m: tasks.classify(m, A, {"a red circle"}), ("labels",)),
    (lambda m: tasks.classify(m, A, {"a red circle": 1}), ("labels",)),
    (lambda m: tasks.classify(m, A, [["a red circle"]]), ("label 0",)),
    (lambda m: tasks.classify(m, A, ["a red circle", None]), ("label 1",)),
    (lambda m: tasks.classify(m, A, ["a red circle", "\x01\x02"]), ("label 1",)),
    (lambda m: tasks.classify(m, A, "\u200b"), ("label 0",)),
    (lambda m: tasks.classify(m, A, ["circle"], templates=["a {0} {}"]), ("template",)),
    (lambda m: tasks.classify(m, A, ["circle", "square"], k=1.5), ("k",)),
    (lambda m: tasks.classify(m, A, ["circle", "square"], k="3"), ("k",)),
    (lambda m: tasks.classify(m, A, ["circle", "square"], temperature=float("nan")), ("temperature",)),
    (lambda m: tasks.classify(m, A, ["circle", "square"], batch_size="8"), ("batch_size",)),
    (lambda m: tasks.rank_texts(m, A, ["a", "b"], k=0), ("k",)),
    (lambda m: tasks.rank_texts(m, A, ["a", "b"], top_n=0), ("top_n",)),
    (lambda m: tasks.rank_texts(m, A, ["a", "b"], top_n=1.5), ("top_n",)),
    (lambda m: tasks.rank_images(m, "a", [A, B], k=0), ("k",)),
    (lambda m: tasks.ground(m, A, "a circle", threshold="0.5"), ("threshold",)),
    (lambda m: tasks.ground(m, A, "a circle", layer=True), ("layer",)),
    (lambda m: tasks.cross_attention_maps(m, A, "a circle", suppress_common="yes"), ("suppress_common",)),
    (lambda m: tasks.embedding_space(m, texts=["a", "b", "c"], seed="x"), ("seed",)),
    (lambda m: tasks.embedding_space(m, texts=["a", "b", "c"], seed=-1), ("seed",)),
])
def test_corpus_of_bad_api_inputs_found_after_the_checks(model, call, names):
    refused(lambda: call(model), *names)


def test_options_at_their_limits_still_work(model):
    """The bounds refuse only what is out of range: k or top_n above the count keeps everything."""
    assert len(tasks.rank_texts(model, A, ["a red circle", "a blue square"], k=5, top_n=5)) == 2
    assert len(tasks.classify(model, A, ["circle", "square"], k=5)[0]) == 2
    assert len(model.caption(A, num_beams=4, num_captions=4, max_new_tokens=6)[0]) == 4


def test_blip2_beams_are_bounded(opt):
    refused(lambda: opt.caption(A, num_beams=10**6, max_new_tokens=5), "num_beams")


def test_save_targets_that_are_files_are_refused(model, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    refused(lambda: blipkit.save(model, target), "a-file")
    refused(lambda: blipkit.save(model, target / "sub"), "a-file")
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("argv, names", [
    (["caption", A, "--beams", "0"], ("--beams",)),
    (["caption", A, "--num-captions", "0"], ("--num-captions",)),
    (["caption", A, "--sample", "--top-p", "1.5"], ("--top-p",)),
    (["caption", A, "--min-new-tokens", "20", "--max-new-tokens", "10"], ("--min-new-tokens",)),
    (["match", A, "-t", "\x01\x02"], ("\\x01",)),
    (["match", A, "-t", os.fsdecode(b"\xff")], ("\\udcff", "UTF-8", "text")),
    (["classify", A, "-l", "circle", "--head", "xyz"], ("--head",)),
    (["ground", A, "a circle", "--threshold", "2"], ("--threshold",)),
    (["attention", A, "a circle", "--layer", "99"], ("layer 99",)),
    (["matrix", A, "-t", "a", "-o", "x.txt"], ("x.txt",)),
    (["info", "--device", "gpu"], ("gpu",)),
    (["info", "--dtype", "int8"], ("int8",)),
])
def test_corpus_of_bad_command_lines(capsys, argv, names):
    cli_refused(capsys, *argv, names=names)


def test_a_non_utf8_texts_file_is_one_line(capsys, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"a red circle\n\xff\xfe bad\n")
    cli_refused(capsys, "match", A, "--texts-file", texts, names=("texts.txt",))


# --------------------------------------------------------------------------------------------- property based

WORDS = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
ANY_TEXT = st.one_of(
    WORDS,
    st.text(max_size=10),  # with surrogates and control characters
    st.sampled_from(["", " ", "\x00", "\x01\x02", "\u200b", "\udcff", "[SEP]", "a red circle"]),
)
TEXTS = st.one_of(ANY_TEXT, st.lists(ANY_TEXT, max_size=4), st.none(), st.integers(), st.binary(max_size=8),
                  st.lists(st.one_of(st.none(), st.integers()), min_size=1, max_size=2))
NAMES = ("text", "label", "question", "prompt", "answer")


def one_line(e: BlipkitError, *names: str) -> None:
    message = str(e)
    assert "\n" not in message.strip(), message
    assert not names or any(n.lower() in message.lower() for n in names), message


def count(texts) -> int:
    return 1 if isinstance(texts, str) else len(texts)


@FAST
@given(texts=TEXTS)
def test_match_and_similarity_take_any_texts(model, texts):
    for method in (model.match, model.similarity):
        try:
            out = method(A, texts)
        except BlipkitError as e:
            one_line(e, *NAMES)
            continue
        assert out.shape == (1, count(texts)) and bool(torch.isfinite(out).all()) and not out.requires_grad


@FAST
@given(labels=TEXTS)
def test_classify_takes_any_labels(model, labels):
    try:
        top = tasks.classify(model, A, labels, k=3)
    except BlipkitError as e:
        one_line(e, *NAMES)
        return
    assert isinstance(labels, (str, list)), f"{labels!r} was taken as labels"
    given_labels = [x.strip() for x in ([labels] if isinstance(labels, str) else labels)]
    assert all(label.strip() in given_labels for label, _ in top[0])
    assert math.isclose(sum(s for _, s in tasks.classify(model, A, labels, k=len(given_labels))[0]), 1, abs_tol=1e-3)


@FAST
@given(question=TEXTS, answers=st.one_of(st.none(), TEXTS))
def test_answer_takes_any_question_and_candidates(model, question, answers):
    try:
        out = model.answer(A, question, answers=answers, max_new_tokens=3)
    except BlipkitError as e:
        one_line(e, *NAMES)
        return
    assert isinstance(question, str) or (isinstance(question, list) and len(question) == 1)
    assert len(out) == 1 and isinstance(out[0], str)
    if answers is not None:
        assert out[0] in ([answers] if isinstance(answers, str) else answers)


NUMBER = st.one_of(st.integers(-3, 6), st.floats(allow_nan=True, allow_infinity=True, width=32), st.none(),
                   st.booleans(), st.sampled_from(["3", "x", 10**7]))
OPTIONS = st.fixed_dictionaries({}, optional={
    "num_beams": NUMBER, "max_new_tokens": NUMBER, "min_new_tokens": NUMBER, "num_captions": NUMBER,
    "repetition_penalty": NUMBER, "temperature": NUMBER, "top_p": NUMBER, "length_penalty": NUMBER,
    "do_sample": st.one_of(st.booleans(), st.sampled_from(["yes", None, 1])),
    "return_scores": st.one_of(st.booleans(), st.sampled_from(["no", 0])),
    "prompt": st.one_of(st.none(), WORDS, st.integers()),
})


def caption_shape_ok(out, images: int, options: dict) -> None:
    """Captions: one item per image; a list of `num_captions` when more than one; (text, score) with scores."""
    k = options.get("num_captions", 1)
    assert len(out) == images
    for item in out:
        items = item if k > 1 else [item]
        assert len(items) == k
        for c in items:
            if options.get("return_scores"):
                text, score = c
                assert isinstance(text, str) and math.isfinite(score)
            else:
                assert isinstance(c, str)


@FAST
@given(options=OPTIONS)
def test_caption_options_give_captions_or_name_the_option(model, options):
    options = {"max_new_tokens": 6, **options}
    if isinstance(options["max_new_tokens"], int) and options["max_new_tokens"] > 12:
        options["max_new_tokens"] = 12  # keep the valid cases fast; 10**7 is tried by a corpus case
    try:
        out = model.caption([A, B], **options)
    except BlipkitError as e:
        one_line(e, *options)
        return
    caption_shape_ok(out, 2, options)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(options=OPTIONS)
def test_blip2_caption_options_give_captions_or_name_the_option(opt, options):
    options = {**options, "max_new_tokens": 4}
    try:
        out = opt.caption(A, **options)
    except BlipkitError as e:
        one_line(e, *options)
        return
    caption_shape_ok(out, 1, options)


@FAST
@given(shape=st.one_of(
    st.lists(st.sampled_from([0, 1, 2, 3, 4]), max_size=5),
    st.tuples(st.sampled_from([[], [1], [2], [0]]),
              st.sampled_from([(3, 128, 128), (3, 64, 64), (1, 128, 128), (128, 128, 3), (3, 128, 192)]))
    .map(lambda t: [*t[0], *t[1]])),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.uint8, torch.int64, torch.bool]),
       fill=st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf"), 1e30]))
def test_any_tensor_is_pixels_of_the_right_shape_or_refused(model, shape, dtype, fill):
    x = torch.full(shape, fill).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    try:
        out = model.match(x, "a red circle")
    except BlipkitError as e:
        one_line(e)
        return
    assert dtype.is_floating_point and abs(fill) <= 1000, f"{dtype} {fill} taken as pixels"
    n = 1 if len(shape) == 3 else shape[0]
    assert tuple(shape[-3:]) == (3, 128, 128) and out.shape == (n, 1)


CONFIG_KEYS = ["vision_config.hidden_size", "vision_config.num_hidden_layers", "vision_config.num_attention_heads",
               "vision_config.image_size", "vision_config.patch_size", "vision_config.layer_norm_eps",
               "text_config.vocab_size", "text_config.hidden_size", "text_config.num_attention_heads",
               "text_config.max_position_embeddings", "text_config.pad_token_id", "text_config.bos_token_id",
               "image_text_hidden_size"]


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(key=st.sampled_from(CONFIG_KEYS),
       value=st.one_of(st.integers(-2, 9), st.sampled_from([None, "x", 1.5, True, [], 10**9, float("nan")])))
def test_config_values_load_or_name_the_key(tmp_path_factory, key, value):
    d = shipped_copy(tmp_path_factory.mktemp("cfg"), {key: value})
    try:
        model = blipkit.load(d)
    except CheckpointError as e:
        one_line(e, key.split(".")[-1], "config.json", "model.safetensors", "tensor")
        return
    assert model.match(A, "a red circle").shape == (1, 1)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(["--beams", "--max-new-tokens", "--min-new-tokens", "--num-captions", "--top-p",
                               "--temperature", "--batch-size"]),
       value=st.one_of(st.integers(-5, 8).map(str), st.sampled_from(["", "x", "nan", "inf", "1e999", "2.5"])))
def test_caption_command_options_give_captions_or_one_line(capsys, option, value):
    code, out, err = run_cli(capsys, "caption", A, "--sample", "--max-new-tokens", "6", option, value)
    assert "Traceback" not in err
    if code == 0:
        assert A.name in out
    else:
        lines = [x for x in err.splitlines() if x.strip()]
        assert code == 2 and len(lines) == 1 and option in lines[0], err
