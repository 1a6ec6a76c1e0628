"""Checkpoint files at the door: every malformed config, preprocessor, index or tokenizer file is one CheckpointError
naming the file and the key; device, dtype, name and save-target arguments are checked before anything is built.

Hypothesis mutates valid files of small saved models (delete keys, change types, negative / huge / NaN values,
wrong nesting) and asserts "loads and works, or a one-line CheckpointError naming the file", never another exception.
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import blipkit
from blipkit.devices import resolve_device, resolve_dtype
from blipkit.errors import CheckpointError, InputError

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
IMAGE = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))


def exactly(message: str) -> str:
    return "^" + re.escape(message) + "$"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """The shipped models saved as ordinary checkpoint directories (BLIP, BLIP-2 OPT, BLIP-2 ITM)."""
    root = tmp_path_factory.mktemp("saved")
    return {name: blipkit.save(blipkit.load(name), root / name)
            for name in ("scenes-blip", "scenes-blip2-opt", "scenes-blip2-itm")}


def copy(src: Path, dst: Path) -> Path:
    """A checkpoint copy whose JSON files can be edited; the weights are linked, not copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if f.suffix == ".safetensors":
            target.symlink_to(f)
        else:
            shutil.copy(f, target)
    return dst


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def works(model) -> None:
    """Use what the checkpoint has, so a config that loads also computes."""
    if model.has("itm_head"):
        assert model.match(IMAGE, ["a red circle"]).shape == (1, 1)
    if model.has("text_decoder") or model.has("language_model"):
        assert isinstance(model.caption(IMAGE, max_new_tokens=8)[0], str)


def load_or_checkpoint_error(directory: Path) -> None:
    """The contract: loads and works, or a one-line CheckpointError naming the file at fault (the edited file, or
    the weights when the edited config no longer describes them)."""
    try:
        model = blipkit.load(directory)
    except CheckpointError as e:
        assert str(e).startswith(str(directory)) and "\n" not in str(e), str(e)
        return
    works(model)


# -------------------------------------------------------------------------------------------- hypothesis sweeps
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**70),
    st.sampled_from([0, 1, -1, 2, 3, 7, 10**6, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 300), max_size=4),
    st.dictionaries(st.sampled_from(["height", "width", "content", "a"]), st.integers(-2, 5000), max_size=3),
)


def _paths(obj, prefix=()):
    """Every key path of a JSON document (large containers sampled), for choosing what to mutate."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k in list(obj)[:30]:
            out += _paths(obj[k], prefix + (k,))
    elif isinstance(obj, list):
        for i in range(min(len(obj), 4)):
            out += _paths(obj[i], prefix + (i,))
    return out


@st.composite
def mutations(draw, document: dict):
    """A list of (path, action, value) edits of `document`: delete the key, or set it to an arbitrary value."""
    paths = _paths(document)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        edits.append((draw(st.sampled_from(paths)), draw(st.sampled_from(["delete", "set"])), draw(VALUES)))
    return edits


def apply(document, edits) -> None:
    for path, action, value in edits:
        obj = document
        try:
            for p in path[:-1]:
                obj = obj[p]
            if action == "delete":
                del obj[path[-1]]
            else:
                obj[path[-1]] = value
        except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced the container
            continue


CASES = [
    ("scenes-blip", "config.json"),
    ("scenes-blip2-opt", "config.json"),
    ("scenes-blip2-itm", "config.json"),
    ("scenes-blip", "preprocessor_config.json"),
    ("scenes-blip", "tokenizer_config.json"),
    ("scenes-blip2-opt", "special_tokens_map.json"),
]


@pytest.mark.parametrize(("model", "file"), CASES)
def test_mutated_files_load_and_work_or_name_the_file(saved, tmp_path, model, file):
    document = json.loads((saved[model] / file).read_text())

    @SETTINGS
    @given(edits=mutations(document))
    def run(edits):
        directory = copy(saved[model], tmp_path / "ck")
        changed = json.loads(json.dumps(document))
        apply(changed, edits)
        (directory / file).write_text(json.dumps(changed))
        load_or_checkpoint_error(directory)

    run()


@pytest.fixture(scope="module")
def sharded(saved, tmp_path_factory) -> Path:
    """scenes-blip as two safetensors shards and an index."""
    from safetensors.torch import load_file, save_file

    d = copy(saved["scenes-blip"], tmp_path_factory.mktemp("sharded"))
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(d / name))
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def test_mutated_index_loads_and_works_or_names_the_file(sharded, tmp_path):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    names = st.one_of(VALUES, st.sampled_from(["../model.safetensors", "/etc/passwd", "nope.safetensors", "",
                                               "model-00001-of-00002.safetensors"]))

    @SETTINGS
    @given(key=st.sampled_from([None, *list(index["weight_map"])[:20]]), value=names, drop=st.booleans())
    def run(key, value, drop):
        d = tmp_path / "ck"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(sharded, d, symlinks=True)
        changed = json.loads(json.dumps(index))
        if key is None:
            changed["weight_map"] = value
        elif drop:
            del changed["weight_map"][key]
        else:
            changed["weight_map"][key] = value
        (d / "model.safetensors.index.json").write_text(json.dumps(changed))
        load_or_checkpoint_error(d)

    run()


# ----------------------------------------------------------------------------------------- config.json, exactly
def _config_error(saved, tmp_path, model: str, change, file: str = "config.json") -> str:
    d = copy(saved[model], tmp_path / "ck")
    edit(d / file, change)
    with pytest.raises(CheckpointError) as info:
        blipkit.load(d)
    message = str(info.value)
    assert message.startswith(f"{d / file}: ") and "\n" not in message
    return message[len(f"{d / file}: "):]


FIX = "; correct it or restore the file from the checkpoint"


@pytest.mark.parametrize(("model", "key", "value", "expected"), [
    ("scenes-blip", "vision_config.num_hidden_layers", 1000000,
     "'vision_config.num_hidden_layers' is 1000000, out of range (it must be at least 1 and at most 256)"),
    ("scenes-blip", "vision_config.hidden_size", "192",
     "'vision_config.hidden_size' is '192', a string, not an integer"),
    ("scenes-blip", "vision_config.num_attention_heads", True,
     "'vision_config.num_attention_heads' is True, a boolean, not an integer"),
    ("scenes-blip", "vision_config.layer_norm_eps", math.nan,
     "'vision_config.layer_norm_eps' is nan, not a finite number"),
    ("scenes-blip", "vision_config.image_size", 100000,
     "'vision_config.image_size' is 100000, out of range (it must be at least 1 and at most 4096)"),
    ("scenes-blip", "text_config.vocab_size", -5,
     "'text_config.vocab_size' is -5, out of range (it must be at least 1 and at most 1048576)"),
    ("scenes-blip", "text_config.bos_token_id", 213,
     "'text_config.bos_token_id' is 213, out of range (it must be at least 0 and at most 212)"),
    ("scenes-blip", "text_config.pad_token_id", None, "'text_config.pad_token_id' is null"),
    ("scenes-blip", "text_config.label_smoothing", 2.0,
     "'text_config.label_smoothing' is 2.0, out of range (it must be at least 0.0 and at most 1.0)"),
    ("scenes-blip", "image_text_hidden_size", [128], "'image_text_hidden_size' is [128], a list, not an integer"),
    ("scenes-blip2-opt", "text_config.num_hidden_layers", 10**6,
     "'text_config.num_hidden_layers' is 1000000, out of range (it must be at least 1 and at most 256)"),
    ("scenes-blip2-opt", "text_config.activation_function", "swish",
     "'text_config.activation_function' is 'swish', not one of 'relu', 'gelu'"),
    ("scenes-blip2-opt", "text_config.eos_token_id", [2, 439],
     "'text_config.eos_token_id' is [2, 439], out of range (it must be at least 0 and at most 438)"),
    ("scenes-blip2-opt", "text_config.do_layer_norm_before", "yes",
     "'text_config.do_layer_norm_before' is 'yes', a string, not a boolean"),
    ("scenes-blip2-opt", "qformer_config.cross_attention_frequency", 0,
     "'qformer_config.cross_attention_frequency' is 0, out of range (it must be at least 1 and at most 256)"),
    ("scenes-blip2-opt", "num_query_tokens", 5000,
     "'num_query_tokens' is 5000, out of range (it must be at least 1 and at most 1024)"),
    ("scenes-blip2-opt", "image_token_index", 439,
     "'image_token_index' is 439, out of range (it must be at least 0 and at most 438)"),
    ("scenes-blip2-itm", "qformer_config.max_position_embeddings", 10**9,
     "'qformer_config.max_position_embeddings' is 1000000000, out of range (it must be at least 1 and at most 131072)"),
])
def test_config_values_checked_exactly(saved, tmp_path, model, key, value, expected):
    def change(d):
        *parents, last = key.split(".")
        for p in parents:
            d = d[p]
        d[last] = value

    assert _config_error(saved, tmp_path, model, change) == expected + FIX


@pytest.mark.parametrize(("model", "change", "expected"), [
    ("scenes-blip", lambda d: d["vision_config"].update(num_attention_heads=5),
     "'vision_config.hidden_size' is 192, which 5 attention heads do not divide"),
    ("scenes-blip", lambda d: d["vision_config"].update(patch_size=24),
     "'vision_config.patch_size' is 24, which does not divide image_size 128"),
    ("scenes-blip", lambda d: d["text_config"].pop("bos_token_id"),
     "'text_config.bos_token_id' is not set, and its default 30522 is not below vocab_size 213"),
    ("scenes-blip", lambda d: d.update(vision_config=[1]), "'vision_config' is a list, not an object"),
    ("scenes-blip", lambda d: d.update(architectures="BlipForImageTextRetrieval"),
     "'architectures' is 'BlipForImageTextRetrieval', not a list of architecture names"),
    ("scenes-blip", lambda d: d.update(blipkit_parts=["vision_model", "wings"]),
     "'blipkit_parts' is ['vision_model', 'wings'], not a list of parts including 'vision_model' (known: itm_head, "
     "text_decoder, text_encoder, text_proj, vision_model, vision_proj)"),
    ("scenes-blip2-opt", lambda d: d.update(num_query_tokens=64),
     "'num_query_tokens' is 64, leaving no room in the language model's 64 positions"),
])
def test_related_values_checked(saved, tmp_path, model, change, expected):
    assert _config_error(saved, tmp_path, model, change) == expected + FIX


def test_hidden_act_and_language_model_kind(saved, tmp_path):
    message = _config_error(saved, tmp_path, "scenes-blip", lambda d: d["vision_config"].update(hidden_act="tanh"))
    assert message.startswith("'vision_config.hidden_act': unsupported activation 'tanh'")
    message = _config_error(saved, tmp_path, "scenes-blip2-opt", lambda d: d["text_config"].update(model_type="llama"))
    assert message == ("language model 'llama' ('text_config.model_type') is not supported; blipkit runs BLIP-2 with "
                       "OPT ('opt') and Flan-T5 ('t5')")


def test_t5_language_model_config(saved, tmp_path):
    """The T5 rules, on a config.json alone (a T5 checkpoint need not exist to check its config)."""
    from blipkit.lm import T5Config

    good = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=8, relative_attention_max_distance=12, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)  # fmt: skip
    assert T5Config.from_hf(good, "c.json", "text_config.").dense_act_fn == "gelu_new"
    for change, expected in [
        ({"feed_forward_proj": "gated-swish"},
         "'text_config.feed_forward_proj' is 'gated-swish', not ACT or gated-ACT with ACT one of relu, gelu, gelu_new, "
         "silu"),
        ({"relative_attention_num_buckets": 2}, "'text_config.relative_attention_num_buckets' is 2, fewer than 4"),
        ({"relative_attention_max_distance": 3},
         "'text_config.relative_attention_max_distance' is 3, not above half the 8 buckets"),
        ({"decoder_start_token_id": 64},
         "'text_config.decoder_start_token_id' is 64, out of range (it must be at least 0 and at most 63)"),
        ({"num_decoder_layers": 10**5},
         "'text_config.num_decoder_layers' is 100000, out of range (it must be at least 1 and at most 256)"),
    ]:
        with pytest.raises(CheckpointError, match=exactly("c.json: " + expected + FIX)):
            T5Config.from_hf({**good, **change}, "c.json", "text_config.")


@pytest.mark.parametrize(("content", "expected"), [
    (b"\xff\xfe{}", "not UTF-8 text (byte 0); restore it from the checkpoint"),
    (b"[1, 2]", "holds a JSON list where a JSON object belongs; restore the file from the checkpoint"),
    (b'{"model_type": ', "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_unreadable_json_files(saved, tmp_path, content, expected):
    for file in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
        d = copy(saved["scenes-blip"], tmp_path / file)
        (d / file).write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            blipkit.load(d)
        assert str(info.value).startswith(f"{d / file}: {expected}")


def test_wrong_family_named(saved, tmp_path):
    message = _config_error(saved, tmp_path, "scenes-blip", lambda d: d.update(model_type="clip"))
    assert message == "found a 'clip' checkpoint; blipkit loads BLIP ('blip') and BLIP-2 ('blip-2') checkpoints " \
                      "(config.json 'model_type')"
    message = _config_error(saved, tmp_path, "scenes-blip", lambda d: (d.pop("model_type"), d.update(architectures=5)))
    assert message.startswith("found a <no model_type> checkpoint")


# ---------------------------------------------------------------------------------- preprocessor_config.json
@pytest.mark.parametrize(("key", "value", "expected"), [
    ("size", 100000, "'size' is 100000, whose item 0 is out of range (it must be at least 1 and at most 4096)"),
    ("size", {"height": 128}, "'size' is {'height': 128}, without width: BLIP resizes to a fixed {'height': H, "
                              "'width': W}"),
    ("size", "128", "'size' is '128', not a list of 2 numbers"),
    ("image_std", [0.2, 0.0, 0.2], "'image_std' is [0.2, 0.0, 0.2], whose item 1 is out of range (it must be above "
                                   "0.0)"),
    ("image_mean", [0.5, 0.5], "'image_mean' is [0.5, 0.5], not a list of 3 numbers"),
    ("image_mean", [0.5, math.inf, 0.5], "'image_mean' is [0.5, inf, 0.5], whose item 1 is not a finite number"),
    ("resample", 99, "'resample' is 99, not one of 0, 4, 2, 5, 3, 1, 6, 7"),
    ("rescale_factor", -1, "'rescale_factor' is -1, out of range (it must be above 0.0)"),
    ("do_resize", "false", "'do_resize' is 'false', a string, not a boolean"),
    ("do_convert_rgb", 5, "'do_convert_rgb' is 5, an integer, not a boolean"),
])
def test_preprocessor_values_checked_exactly(saved, tmp_path, key, value, expected):
    message = _config_error(saved, tmp_path, "scenes-blip", lambda d: d.update({key: value}),
                            "preprocessor_config.json")
    assert message == expected + FIX


def test_preprocessor_size_below_patch_size(saved, tmp_path):
    message = _config_error(saved, tmp_path, "scenes-blip", lambda d: d.update(size=8), "preprocessor_config.json")
    assert message == "'size' is (8, 8), smaller than the model's 16-pixel patches" + FIX


def test_image_processor_arguments_checked():
    from blipkit.processing import ImageProcessor

    with pytest.raises(InputError, match=exactly(
            "ImageProcessor got size=(0, 0), whose item 0 is out of range (it must be at least 1 and at most 4096)")):
        ImageProcessor(size=0)
    with pytest.raises(InputError, match=exactly("ImageProcessor got std=(1, 1, 0), whose item 2 is out of range "
                                                 "(it must be above 0.0)")):
        ImageProcessor(std=(1, 1, 0))
    assert ImageProcessor(size=[32, 48]).size == (32, 48)


# --------------------------------------------------------------------------------------- index and tokenizer files
@pytest.mark.parametrize(("weight_map", "expected"), [
    ([], "'weight_map' is [], not an object mapping tensor names to shard files"),
    ({"a": 5}, "'weight_map.a' is 5, not a file name"),
    ({"a": "../model.safetensors"}, "'weight_map.a' is '../model.safetensors', outside the checkpoint directory; "
                                    "shards are named relative to it"),
])
def test_index_checked_exactly(sharded, tmp_path, weight_map, expected):
    d = tmp_path / "ck"
    shutil.copytree(sharded, d, symlinks=True)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=exactly(f"{d / 'model.safetensors.index.json'}: {expected}{FIX}")):
        blipkit.load(d)


def test_index_naming_a_missing_shard(sharded, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(sharded, d, symlinks=True)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"index.json: 'weight_map\.[^']+' names 'model-00002-of-00002"
                                              r"\.safetensors', which is missing from .*download every shard"):
        blipkit.load(d)


def test_index_listing_a_tensor_its_shard_does_not_hold(sharded, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(sharded, d, symlinks=True)
    index = d / "model.safetensors.index.json"
    edit(index, lambda i: i["weight_map"].update({"extra.weight": "model-00001-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match=exactly(
            f"{index}: 'weight_map.extra.weight' names model-00001-of-00002.safetensors, which holds no tensor "
            "'extra.weight'; restore the index (or the shard) from the checkpoint")):
        blipkit.load(d)


@pytest.mark.parametrize(("file", "change", "expected"), [
    ("tokenizer_config.json", lambda d: d.update(bos_token=5),
     "'bos_token' is 5, not a token (a string or an object with a string 'content')" + FIX),
    ("special_tokens_map.json", lambda d: d.update(additional_special_tokens="[ENC]"),
     "'additional_special_tokens' is '[ENC]', not a list of tokens" + FIX),
    ("tokenizer_config.json", lambda d: d.update(model_max_length=1),
     "'model_max_length' is 1, out of range (it must be at least 2)" + FIX),
    ("tokenizer_config.json", lambda d: d.update(added_tokens_decoder={"x": {"content": "a"}}),
     "'added_tokens_decoder.x' is {'content': 'a'}, not an id mapped to an added token" + FIX),
])
def test_tokenizer_files_checked_exactly(saved, tmp_path, file, change, expected):
    assert _config_error(saved, tmp_path, "scenes-blip", change, file) == expected


def test_tokenizer_that_loads_but_cannot_encode(saved, tmp_path):
    d = copy(saved["scenes-blip"], tmp_path / "ck")
    edit(d / "tokenizer.json", lambda t: t["post_processor"].update(single=[]))
    with pytest.raises(CheckpointError, match=exactly(f"{d}: the tokenizer encodes a sample text to no tokens; "
                                                      "restore the tokenizer files from the checkpoint")):
        blipkit.load(d)


def test_non_utf8_vocab_txt(hf_blip_dirs, tmp_path):
    from .conftest import bert_vocab

    d = tmp_path / "ck"
    shutil.copytree(hf_blip_dirs["BlipForImageTextRetrieval"], d)
    (d / "tokenizer.json").unlink(missing_ok=True)
    (d / "vocab.txt").write_bytes(bert_vocab().read_bytes()[:100] + b"\xff\xfe\n")
    with pytest.raises(CheckpointError, match=exactly(f"{d / 'vocab.txt'}: not UTF-8 text (byte 100); restore it "
                                                      "from the checkpoint")):
        blipkit.load(d)


@pytest.mark.parametrize(("entry", "expected"), [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "has dtype ['F32'], which blipkit does not load"),
    ({"dtype": "F32", "shape": "ab", "data_offsets": [0, 4]}, "malformed safetensors header"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "does not fit its shape [2] (4 bytes)"),
    ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "malformed safetensors header"),
])
def test_malformed_safetensors_headers(saved, tmp_path, entry, expected):
    d = copy(saved["scenes-blip"], tmp_path / "ck")
    (d / "model.safetensors").unlink()
    header = json.dumps({"w": entry}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        blipkit.load(d)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int64, torch.bool])
def test_integer_weights_for_a_float_parameter(saved, tmp_path, dtype):
    from safetensors.torch import load_file, save_file

    d = copy(saved["scenes-blip"], tmp_path / "ck")
    weights = load_file(str(d / "model.safetensors"))
    key = sorted(weights)[0]
    weights[key] = weights[key].to(dtype)
    (d / "model.safetensors").unlink()
    save_file(weights, str(d / "model.safetensors"))
    kind = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=exactly(
            f"{d / 'model.safetensors'}: tensor '{key}' is {kind}, where the model has a floating-point parameter; "
            "restore the weights from the checkpoint")):
        blipkit.load(d)


# ------------------------------------------------------------------------------------- load / create arguments
@pytest.mark.parametrize(("device", "expected"), [
    ("nonsense", "device 'nonsense' is not a device: use cpu, cuda, cuda:1, mps ..."),
    (5, "device is a int: pass a device name such as 'cpu' or 'cuda:0'"),
    ("meta", "device meta: blipkit runs on cpu, cuda or mps"),
])
def test_device_checked_before_loading(device, expected):
    with pytest.raises(InputError, match=exactly(expected)):
        blipkit.load("scenes-blip", device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_named():
    with pytest.raises(InputError, match=exactly("device cuda:0: no CUDA device is available here; use cpu")):
        blipkit.load("scenes-blip", device="cuda:0")
    with pytest.raises(InputError, match=exactly("--device cuda: no CUDA device is available here; use cpu")):
        resolve_device("cuda", "--device")


@pytest.mark.parametrize(("dtype", "expected"), [
    ("int8", "unknown dtype 'int8': use one of float32, fp32, bfloat16, bf16, float16, fp16"),
    (torch.int8, "dtype torch.int8 is not a floating-point dtype blipkit runs in: use one of float32, fp32, bfloat16, "
                 "bf16, float16, fp16"),
    (3, "dtype is a int: pass a name (float32, fp32, bfloat16, bf16, float16, fp16) or a torch dtype"),
])
def test_dtype_checked_before_building(dtype, expected, monkeypatch):
    """create() refuses a bad dtype before building: building a BLIP-2 preset would take gigabytes."""
    from blipkit import blip2

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the dtype was checked")

    monkeypatch.setattr(blip2.Blip2, "__init__", never)
    with pytest.raises(InputError, match=exactly(expected)):
        blipkit.create("blip2-opt-2.7b", dtype=dtype)
    with pytest.raises(InputError, match=exactly(expected)):
        blipkit.load("scenes-blip", dtype=dtype)


def test_dtype_names():
    assert resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("BF16") is torch.bfloat16
    assert resolve_dtype(torch.float32) is torch.float32 and resolve_dtype(None) is None
    assert blipkit.load("scenes-blip", dtype="bf16").dtype == torch.bfloat16


@pytest.mark.parametrize(("name", "expected"), [
    (123, "name_or_path is a int: pass a string or a pathlib.Path"),
    (None, "name_or_path is a NoneType: pass a string or a pathlib.Path"),
    (b"scenes-blip", "name_or_path is a bytes: pass a string or a pathlib.Path"),
    ("  ", "name_or_path '  ' is not a usable name or path: pass a model name or a directory"),
    ("a\0b", "name_or_path 'a\\x00b' is not a usable name or path: pass a model name or a directory"),
])
def test_name_or_path_checked(name, expected):
    with pytest.raises(InputError, match=exactly(expected)):
        blipkit.load(name)


def test_create_checks_the_preset_name():
    with pytest.raises(InputError, match=r"^unknown preset \['blip'\] \(known: blip-itm-base-coco, "):
        blipkit.create(["blip"])


# ------------------------------------------------------------------------------------------------ save targets
@pytest.fixture(scope="module")
def blip():
    return blipkit.load("scenes-blip")


def test_save_targets_refused(blip, tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(InputError, match=exactly(f"cannot save to '{a_file}': it is a file; pass a directory (new or "
                                                 "existing)")):
        blipkit.save(blip, a_file)
    with pytest.raises(InputError, match=exactly(f"cannot save to '{a_file / 'sub'}' (Not a directory): pass a "
                                                 "directory you can write")):
        blipkit.save(blip, a_file / "sub")
    with pytest.raises(InputError, match=r"^cannot save to '/proc/blipkit-test' \(.+\): pass a directory you can "
                                         r"write$"):
        blipkit.save(blip, "/proc/blipkit-test")
    with pytest.raises(InputError, match=exactly("save() takes a blipkit model, got a dict")):
        blipkit.save({}, tmp_path / "x")
    with pytest.raises(InputError, match=exactly("directory is a int: pass a string or a pathlib.Path")):
        blipkit.save(blip, 5)


def test_save_over_another_model_replaces_it(blip, saved, tmp_path):
    """Saving into a directory holding another model replaces the files of the same names; it loads as the new one."""
    d = copy(saved["scenes-blip2-itm"], tmp_path / "ck")
    for f in d.glob("*.safetensors"):  # a real file, not the link to the fixture's weights
        f.unlink()
        shutil.copy(saved["scenes-blip2-itm"] / f.name, f)
    blipkit.save(blip, d)
    again = blipkit.load(d)
    assert type(again).__name__ == "Blip"
    assert torch.equal(again.match(IMAGE, ["a red circle"]), blip.match(IMAGE, ["a red circle"]))
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []


def test_failed_save_leaves_the_directory_as_it_was(blip, saved, tmp_path, monkeypatch):
    from blipkit.processing import Tokenizer

    d = tmp_path / "ck"
    shutil.copytree(saved["scenes-blip2-itm"], d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def disk_full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Tokenizer, "save", disk_full)
    with pytest.raises(InputError, match=exactly(f"cannot save to '{d}' (No space left on device); it was left as it "
                                                 "was")):
        blipkit.save(blip, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no half-written model, no staging folder
    assert type(blipkit.load(d)).__name__ == "Blip2"

