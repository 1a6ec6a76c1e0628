"""BLIP-2 parity against the reference implementation on tiny random checkpoints written with save_pretrained.

Three checkpoints: OPT and Flan-T5 generation models (tokenizers trained here with `tokenizers`, so both sides
tokenize alike) and a retrieval model (BERT tokenizer with [DEC], as the Hub's). The T5 one stores its own LM head
next to the shared embedding, as the Hub's Flan-T5 checkpoints do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import blipkit
from blipkit.errors import CapabilityError, CheckpointError, InputError
from blipkit.generate import GenerationConfig

from .conftest import bert_vocab, spread_weights

TOL = 1e-5
Q = 8  # query tokens of the tiny models (32 in the real ones)
SENTENCES = [
    "a red circle on the left of a blue square",
    "two dogs play in the park near the river",
    "Question: what color is the ball? Answer: red",
    "a photo of a cat sitting on a couch",
    "an old photograph showing a busy street at night",
    "how many shapes are there in the picture?",
]
TEXTS = ["a red circle on the left", "two dogs", "an extremely long caption " * 3, "x"]
PROMPTS = ["a photo of", "two", "an old photograph showing a"]
# Peak RSS of the running process from here on, in MB: Linux's VmHWM restarted at the current RSS (getrusage's peak
# also counts exited threads and imports), else getrusage. For measuring in a fresh interpreter.
PEAK_RSS = """
import contextlib, resource
with contextlib.suppress(OSError):
    open("/proc/self/clear_refs", "w").write("5")
def peak_mb():
    with contextlib.suppress(OSError, StopIteration):
        return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""


# --------------------------------------------------------------------------------------------------------- fixtures


def gpt2_tokenizer():
    """A tiny OPT-style tokenizer: byte-level BPE, `</s>` as bos/eos prepended to every text, `<image>` added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=330, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(SENTENCES, trainer)
    backend.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def t5_tokenizer():
    """A tiny T5-style tokenizer: unigram with metaspace, `</s>` appended to every text, `<image>` added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(SENTENCES, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tok.add_tokens(["<image>"], special_tokens=True)
    return tok


def itm_tokenizer():
    """The retrieval checkpoints' tokenizer: BERT uncased with [DEC] as bos (30523 ids)."""
    from transformers import BertTokenizer

    return BertTokenizer.from_pretrained(str(bert_vocab().parent), bos_token="[DEC]")


def tiny_config(lm: str, tok):
    """A reference Blip2Config with every tower tiny: 3 Q-Former layers (cross-attention in 0 and 2), Q queries."""
    from transformers import Blip2Config

    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)  # fmt: skip
    qformer = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
                   max_position_embeddings=64)  # fmt: skip
    image_token = tok.convert_tokens_to_ids("<image>") if lm != "itm" else None
    if lm == "opt":
        # "\u0120a" ends generation sometimes: the real checkpoints also stop at a common token ("\n")
        text = dict(model_type="opt", vocab_size=len(tok) + 5, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1,
                    bos_token_id=2, eos_token_id=tok.convert_tokens_to_ids("\u0120a"))  # fmt: skip
    elif lm == "t5":
        text = dict(model_type="t5", vocab_size=len(tok) + 3, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                    num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=12, feed_forward_proj="gated-gelu", bos_token_id=1,
                    eos_token_id=1, decoder_start_token_id=0, n_positions=64)  # fmt: skip
    else:
        text = None
        qformer.update(vocab_size=len(tok), use_qformer_text_input=True)
    return Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=Q, image_text_hidden_size=16,
        image_token_index=image_token,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Reference checkpoints: "opt", "t5" (with its own LM head, as on the Hub) and "itm"."""
    from safetensors.torch import load_file, save_file
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    out = {}
    for i, (name, make_tok) in enumerate((("opt", gpt2_tokenizer), ("t5", t5_tokenizer), ("itm", itm_tokenizer))):
        torch.manual_seed(i)
        tok = make_tok()
        cls = Blip2ForImageTextRetrieval if name == "itm" else Blip2ForConditionalGeneration
        model = cls(tiny_config(name, tok)).eval()
        spread_weights(model, seed=i)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        if name == "t5":  # Flan-T5's head is not the embedding: store one, and say so in the config as the Hub does
            sd = load_file(str(path / "model.safetensors"))
            sd["language_model.lm_head.weight"] = torch.randn_like(sd["language_model.shared.weight"]) * 0.5
            save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
            cfg = json.loads((path / "config.json").read_text())
            cfg["text_config"]["tie_word_embeddings"] = False
            cfg["text_config"].pop("scale_decoder_outputs", None)
            (path / "config.json").write_text(json.dumps(cfg))
        out[name] = path
    return out


def _pair(dirs, name):
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    cls = Blip2ForImageTextRetrieval if name == "itm" else Blip2ForConditionalGeneration
    tok = itm_tokenizer() if name == "itm" else AutoTokenizer.from_pretrained(dirs[name])
    return blipkit.load(dirs[name]), cls.from_pretrained(dirs[name]).eval(), tok


@pytest.fixture(scope="module")
def opt(dirs):
    return _pair(dirs, "opt")


@pytest.fixture(scope="module")
def t5(dirs):
    return _pair(dirs, "t5")


@pytest.fixture(scope="module")
def itm(dirs):
    return _pair(dirs, "itm")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------ structure, features


@pytest.mark.parametrize("name", ["opt", "t5", "itm"])
def test_parameter_names_and_qformer_features(request, name, pixels):
    ours, ref, _ = request.getfixturevalue(name)
    assert set(ours.state_dict()) == set(ref.state_dict())
    with torch.no_grad():
        image = ref.vision_model(pixel_values=pixels).last_hidden_state
        want = ref.qformer(query_embeds=ref.query_tokens.expand(3, -1, -1), encoder_hidden_states=image)
        got = ours.qformer_features(pixels)
    assert got.shape == (3, Q, 32)
    assert max_diff(ours.image_features(pixels), image) <= TOL
    assert max_diff(got, want.last_hidden_state) <= TOL


@pytest.mark.parametrize(
    "preset, billions",
    [("blip2-opt-2.7b", 3.745), ("blip2-opt-6.7b-coco", 7.753), ("blip2-flan-t5-xxl", 12.230),
     ("blip2-itm-vit-g", 1.172)],
)  # fmt: skip
def test_presets_equal_reference_architectures(preset, billions):
    """Every preset's `to_hf()` builds the reference with the same names and shapes (on the meta device)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    from blipkit.blip2 import Blip2
    from blipkit.blip2_config import PRESETS

    cfg = PRESETS[preset][1]
    cls = Blip2ForImageTextRetrieval if "itm" in preset else Blip2ForConditionalGeneration
    with torch.device("meta"):
        ours, ref = Blip2(cfg), cls(Blip2Config.from_dict(cfg.to_hf()))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert round(sum(p.numel() for p in ours.parameters()) / 1e9, 3) == billions


def test_tied_and_untied_heads(opt, t5):
    assert opt[0].language_model.lm_head.weight is opt[0].language_model.model.decoder.embed_tokens.weight
    lm = t5[0].language_model
    assert lm.lm_head.weight is not lm.shared.weight  # the stored head is kept, as the reference keeps it
    assert lm.encoder.embed_tokens.weight is lm.shared.weight
    assert torch.equal(lm.lm_head.weight, t5[1].language_model.lm_head.weight)


def test_image_preprocessing_matches_reference(itm, photos):
    from transformers import BlipImageProcessorPil

    ours, _, _ = itm
    want = BlipImageProcessorPil(size={"height": 32, "width": 32})(photos, return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours.pixels(photos), want, atol=1e-6)


# --------------------------------------------------------------------------------------------------------- retrieval


def test_itc_similarity_and_embeddings(itm, pixels):
    ours, ref, tok = itm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = ref(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        sim = ours.similarity(pixels, TEXTS)
        img, txt = ours.encode_images(pixels), ours.encode_texts(TEXTS)
    assert sim.shape == (3, len(TEXTS))
    assert max_diff(sim, want.logits_per_image) <= TOL
    assert img.shape == (3, Q, 16) and txt.shape == (len(TEXTS), 16)
    assert max_diff(img, want.image_embeds) <= TOL and max_diff(txt, want.text_embeds) <= TOL
    assert torch.allclose(txt.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_itm_every_pair(itm, pixels):
    ours, ref, tok = itm
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = ours.itm_logits(pixels, TEXTS)
        probs = ours.match(pixels, TEXTS)
        for i in range(3):
            # the batched reference (padding masked) equals one text at a time
            want = ref(pixel_values=pixels[i : i + 1].expand(len(TEXTS), -1, -1, -1), input_ids=enc.input_ids,
                       attention_mask=enc.attention_mask, use_image_text_matching_head=True)  # fmt: skip
            assert max_diff(logits[i], want.logits_per_image) <= TOL
            n = int(enc.attention_mask[1].sum())
            one = ref(pixel_values=pixels[i : i + 1], input_ids=enc.input_ids[1:2, :n],
                      attention_mask=enc.attention_mask[1:2, :n], use_image_text_matching_head=True)  # fmt: skip
            assert abs(float(one.logits_per_image.softmax(-1)[0, 1]) - float(probs[i, 1])) <= TOL
        ours.itm_chunk = 3  # chunking and reusing computed features change nothing
        again = ours.match(ours.image_features(pixels), TEXTS)
        ours.itm_chunk = 128
    assert max_diff(again, probs) <= 1e-6
    assert len(set(probs.flatten().tolist())) > 6


# -------------------------------------------------------------------------------------------------------- generation


def ref_ids(ours, tok, prompt: str) -> list[int]:
    """Reference input ids as Blip2Processor builds them: Q image placeholders, then the tokenized prompt."""
    return [ours.config.image_token_index] * Q + tok(prompt)["input_ids"]


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_language_model_logits(request, name, pixels):
    ours, ref, tok = request.getfixturevalue(name)
    ids = torch.tensor([ref_ids(ours, tok, "a photo of a cat")] * 3)
    lm = ours.language_model
    with torch.no_grad():
        embeds = torch.cat([ours.prefix_embeds(pixels), lm.get_input_embeddings()(ids[:, Q:])], dim=1)
        if name == "opt":
            want = ref(pixel_values=pixels, input_ids=ids).logits
            got, _ = lm(inputs_embeds=embeds)
        else:
            dec = torch.tensor([[0, 5, 9, 12, 7]] * 3)
            want = ref(pixel_values=pixels, input_ids=ids, decoder_input_ids=dec).logits
            got, _ = lm(inputs_embeds=embeds, decoder_input_ids=dec)
    assert max_diff(got, want) <= TOL


def _ref_generate(ours, ref, tok, pixels, prompt, **kw) -> list[int]:
    """New tokens of the reference's generate (prompt and T5's start token removed)."""
    with torch.no_grad():
        if prompt is None:
            out = ref.generate(pixel_values=pixels, **kw)[0].tolist()
            n_in = Q + 1
        else:
            ids = ref_ids(ours, tok, prompt)
            out = ref.generate(pixel_values=pixels, input_ids=torch.tensor([ids]), **kw)[0].tolist()
            n_in = len(ids)
    return out[1:] if ours.config.lm_type == "t5" else out[n_in:]


@pytest.mark.parametrize("name", ["opt", "t5"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prompt", [None, "a photo of"])
def test_generation_tokens_equal_reference(request, name, num_beams, prompt, pixels):
    ours, ref, tok = request.getfixturevalue(name)
    kw = dict(num_beams=num_beams, max_new_tokens=10, min_new_tokens=2, repetition_penalty=1.3)
    wants = [_ref_generate(ours, ref, tok, pixels[i : i + 1], prompt, **kw) for i in range(3)]
    for i in range(3):
        with torch.no_grad():
            got, _ = ours._generate(pixels[i : i + 1], prompt, GenerationConfig(**kw))
        assert got.tokens[0] == wants[i], (i, got.tokens[0], wants[i])
    start = tok(prompt)["input_ids"] if prompt and name == "opt" else []  # OPT's caption starts with the prompt
    want_text = tok.decode(start + wants[0], skip_special_tokens=True).strip()
    assert ours.caption(pixels[:1], prompt=prompt, **kw)[0] == want_text


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_answer_equals_reference(request, name, pixels):
    ours, ref, tok = request.getfixturevalue(name)
    questions = ["what color is the ball?", "how many?", "is it a dog in the park?"]
    got = ours.answer(pixels, questions, num_beams=1, max_new_tokens=6)
    for i, q in enumerate(questions):
        want = _ref_generate(ours, ref, tok, pixels[i : i + 1], f"Question: {q} Answer:", max_new_tokens=6,
                             min_new_tokens=1)  # fmt: skip
        assert got[i] == tok.decode(want, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_batch_equals_single(request, name, pixels):
    ours = request.getfixturevalue(name)[0]
    for num_beams in (1, 3):
        kw = dict(num_beams=num_beams, max_new_tokens=8, return_scores=True, repetition_penalty=1.2)
        batch = ours.caption(pixels, prompt=PROMPTS, **kw)
        for i, p in enumerate(PROMPTS):
            ((text, score),) = ours.caption(pixels[i : i + 1], prompt=p, **kw)
            assert batch[i][0] == text and abs(batch[i][1] - score) < 1e-4
    if name == "opt":
        assert all(t.startswith(p) for (t, _), p in zip(batch, PROMPTS, strict=True))
    assert ours.generate(pixels, PROMPTS) == [ours.generate(pixels[i : i + 1], p)[0] for i, p in enumerate(PROMPTS)]


def test_sampling_and_many_captions(opt, t5, pixels):
    for ours in (opt[0], t5[0]):
        torch.manual_seed(0)
        many = ours.caption(pixels[:2], do_sample=True, num_captions=4, max_new_tokens=8, top_p=0.9, temperature=1.5)
        assert len(many) == 2 and all(len(c) == 4 for c in many)
        assert len(set(many[0])) > 1
        beams = ours.caption(pixels[:1], num_beams=4, num_captions=3, return_scores=True, max_new_tokens=6)
        assert len(beams) == 1 and len(beams[0]) == 3 and all(s < 0 for _, s in beams[0])


# ------------------------------------------------------------------------------------------------------------ errors


def test_capability_errors(opt, itm, pixels):
    with pytest.raises(CapabilityError, match="blip2-opt-2.7b.*blip2-flan-t5-xl"):
        itm[0].generate(pixels, "describe the image")
    with pytest.raises(CapabilityError, match="blip2-opt-2.7b"):
        itm[0].caption(pixels)
    with pytest.raises(CapabilityError, match="blip2-itm-vit-g"):
        opt[0].match(pixels, "x")
    with pytest.raises(CapabilityError, match="blip2-itm-vit-g"):
        opt[0].encode_texts("x")
    assert itm[0].qformer_features(pixels).shape == (3, Q, 32)  # every checkpoint has the Q-Former


def test_bad_inputs(opt, t5, itm, pixels):
    long = "a red circle on the left " * 20
    with pytest.raises(InputError, match="context of 64"):
        opt[0].caption(pixels[:1], prompt=long)
    with pytest.raises(InputError, match="max_new_tokens"):
        opt[0].caption(pixels[:1], prompt="a photo of " * 7, max_new_tokens=30)
    with pytest.raises(InputError, match="context of 64"):
        t5[0].answer(pixels[:1], long)
    with pytest.raises(InputError, match="3 prompts for 2 images"):
        opt[0].caption(pixels[:2], prompt=PROMPTS)
    with pytest.raises(InputError, match=r"question 0 \(''\) is blank: pass text with visible characters"):
        opt[0].answer(pixels[:1], [""])
    with pytest.raises(InputError, match="empty"):
        opt[0].caption([])
    with pytest.raises(InputError, match="empty"):
        itm[0].encode_texts([])
    with pytest.raises(InputError, match="missing.png"):
        itm[0].encode_images("missing.png")
    assert itm[0].encode_texts("word " * 500).shape == (1, 16)  # truncated to the Q-Former's positions


def test_strict_loading(dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    for case, key in (
        ("missing", "qformer.layernorm.weight"),
        ("unexpected", "qformer.extra"),
        ("shape", "itm_head.bias"),
    ):
        d = tmp_path / case
        shutil.copytree(dirs["itm"], d)
        sd = load_file(str(d / "model.safetensors"))
        if case == "missing":
            sd.pop(key)
        else:
            sd[key] = torch.zeros(5)
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=key):
            blipkit.load(d)
    cfg = json.loads((dirs["opt"] / "config.json").read_text())
    cfg["text_config"]["model_type"] = "llama"
    bad = tmp_path / "llama"
    shutil.copytree(dirs["opt"], bad)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="llama"):
        blipkit.load(bad)


# ------------------------------------------------------------------------------------------------ saving, precision


@pytest.mark.parametrize("name", ["opt", "t5", "itm"])
def test_save_roundtrip_reads_in_reference(request, name, tmp_path, pixels):
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    ours = request.getfixturevalue(name)[0]
    out = blipkit.save(ours, tmp_path / "saved")
    again = blipkit.load(out)
    cls = Blip2ForImageTextRetrieval if name == "itm" else Blip2ForConditionalGeneration
    ref = cls.from_pretrained(out).eval()
    with torch.no_grad():
        if name == "itm":
            ids, mask = ours.tokens(TEXTS)
            want = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits_per_image
            assert max_diff(ours.similarity(pixels, TEXTS), want) <= TOL
            assert torch.equal(again.match(pixels, TEXTS), ours.match(pixels, TEXTS))
            return
        ids = torch.tensor([[ours.config.image_token_index] * Q + [2, 7, 9, 11]] * 3)
        dec = {"decoder_input_ids": torch.tensor([[0, 4, 6]] * 3)} if name == "t5" else {}
        want = ref(pixel_values=pixels, input_ids=ids, **dec).logits
        lm = ours.language_model
        embeds = torch.cat([ours.prefix_embeds(pixels), lm.get_input_embeddings()(ids[:, Q:])], dim=1)
        assert max_diff(lm(inputs_embeds=embeds, **dec)[0], want) <= TOL
    assert again.caption(pixels, max_new_tokens=6) == ours.caption(pixels, max_new_tokens=6)


def test_loading_into_bfloat16_peaks_at_about_its_size(tmp_path):
    """Float32 weights loaded as bfloat16 do not hold the float32 file in memory too (fresh process)."""
    import subprocess
    import sys
    import textwrap

    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=16,
                  image_size=224, patch_size=14)  # fmt: skip
    qformer = dict(vocab_size=30523, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   use_qformer_text_input=True)  # fmt: skip
    Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision, qformer_config=qformer)).save_pretrained(tmp_path)
    itm_tokenizer().save_pretrained(tmp_path)
    code = PEAK_RSS + textwrap.dedent(f"""
        import torch, blipkit, blipkit.blip2, blipkit.checkpoint, blipkit.processing  # imports before measuring
        with torch.device("meta"):  # indexing on the meta device imports torch's symbolic shapes (~70 MB), once
            torch.nn.Embedding(2, 2, padding_idx=0)
        before = peak_mb()
        m = blipkit.load({str(tmp_path)!r}, dtype="bfloat16")
        with torch.no_grad():
            total = sum(float(p.sum()) for p in m.parameters())  # every weight resident
        print(peak_mb() - before, sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20)
    """)
    out = subprocess.check_output([sys.executable, "-c", code], text=True).strip().splitlines()[-1]
    grown, loaded = map(float, out.split())
    size = (tmp_path / "model.safetensors").stat().st_size / 2**20
    assert size > 250 and loaded < 0.55 * size
    assert grown < 1.25 * loaded, f"{size:.0f} MB loaded as {loaded:.0f} MB of bfloat16 grew peak RSS {grown:.0f} MB"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_keeps_qformer_float32(t5, dirs, dtype, pixels):
    """The Q-Former stays float32 in both half types (the reference does it for float16 only)."""
    from transformers import Blip2ForConditionalGeneration

    ours = blipkit.load(dirs["t5"], dtype=dtype)
    half = getattr(torch, dtype)
    assert ours.query_tokens.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in ours.qformer.parameters())
    assert ours.vision_model.embeddings.class_embedding.dtype == half
    assert ours.language_model.lm_head.weight.dtype == half
    ref = Blip2ForConditionalGeneration.from_pretrained(dirs["t5"], dtype=half).eval()

    def ref_features(model, dt):
        image = model.vision_model(pixel_values=pixels.to(dt)).last_hidden_state
        return model.qformer(query_embeds=model.query_tokens.expand(3, -1, -1), encoder_hidden_states=image)[0]

    with torch.no_grad():
        exact = ref_features(t5[1], torch.float32)
        got, want = ours.qformer_features(pixels), ref_features(ref, half)
        assert got.dtype == torch.float32 and ours.prefix_embeds(pixels).dtype == half
    if dtype == "float16":
        assert max_diff(got, want) <= 1e-3
    else:
        assert max_diff(got, exact) < max_diff(want, exact)  # a float32 Q-Former is closer to exact
    assert len(ours.caption(pixels, max_new_tokens=5)) == 3
