"""BLIP parity against the reference implementation on tiny random checkpoints written with save_pretrained."""

from __future__ import annotations

import pytest
import torch

import blipkit
from blipkit.errors import CapabilityError, CheckpointError, InputError

TEXTS = ["a red circle on the left", "two dogs", "an extremely long caption " * 3, "x"]
TOL = 1e-5


def ref_inputs(path, images, texts):
    from transformers import BlipImageProcessorPil

    from .conftest import blip_tokenizer

    proc = BlipImageProcessorPil(size={"height": 32, "width": 32})
    pixels = proc(images, return_tensors="pt")["pixel_values"]
    enc = blip_tokenizer()(texts, padding=True, return_tensors="pt")
    return pixels, enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def itm(hf_blip_dirs):
    from transformers import BlipForImageTextRetrieval

    path = hf_blip_dirs["BlipForImageTextRetrieval"]
    return blipkit.load(path), BlipForImageTextRetrieval.from_pretrained(path).eval(), path


def test_image_features_and_itc(itm, photos):
    ours, ref, path = itm
    pixels, ids, mask = ref_inputs(path, photos, TEXTS)
    assert torch.allclose(ours.pixels(photos), pixels, atol=1e-6)
    with torch.no_grad():
        ref_feats = ref.vision_model(pixel_values=pixels).last_hidden_state
        ref_sim = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
        sim = ours.similarity(photos, TEXTS)
        feats = ours.image_features(photos)
    assert (feats - ref_feats).abs().max() <= TOL
    assert sim.shape == (len(photos), len(TEXTS))
    assert (sim - ref_sim).abs().max() <= TOL
    assert torch.allclose(ours.encode_texts(TEXTS).norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)


def test_itm_every_pair(itm, photos):
    ours, ref, path = itm
    pixels, ids, mask = ref_inputs(path, photos, TEXTS)
    with torch.no_grad():
        probs = ours.match(photos, TEXTS)
        for i in range(len(photos)):
            for j in range(len(TEXTS)):
                n = int(mask[j].sum())
                logits = ref(input_ids=ids[j : j + 1, :n], pixel_values=pixels[i : i + 1], use_itm_head=True).itm_score
                assert abs(float(logits.softmax(-1)[0, 1]) - float(probs[i, j])) <= TOL
    # one text against many images takes the other loop order and must agree
    with torch.no_grad():
        col = ours.match(photos, TEXTS[:1])
    assert (col[:, 0] - probs[:, 0]).abs().max() <= TOL
    assert len(set(probs.flatten().tolist())) > 4  # the weights really discriminate


def test_first_position_alone_in_the_last_layer(itm, photos):
    """The heads read the first position alone: its last layer computed alone gives the same states, padded texts
    and cross-attention included, and the same ITM logits and ITC embeddings as the full pass."""
    ours, _, _ = itm
    ids, mask = ours.tokens(TEXTS)
    with torch.no_grad():
        feats = ours.image_features(photos[:1]).expand(len(TEXTS), -1, -1)
        for kw in ({}, {"context": feats}):
            full, _ = ours.text_encoder(ids, mask, **kw)
            first, _ = ours.text_encoder(ids, mask, first_only=True, **kw)
            assert first.shape == (len(TEXTS), 1, full.shape[-1])
            assert (first[:, 0] - full[:, 0]).abs().max() <= 1e-5
        assert (ours.forward_itm(photos, TEXTS, first_only=True) - ours.forward_itm(photos, TEXTS)).abs().max() <= 1e-5
        ref = torch.nn.functional.normalize(ours.text_proj(ours.text_encoder(ids, mask)[0][:, 0]), dim=-1)
        assert (ours.encode_texts(TEXTS) - ref).abs().max() <= 1e-6
        # a decoder pass (causal) never takes the shortcut
        dec, _ = ours.text_encoder(ids, mask, causal=True, first_only=True)
        assert dec.shape[1] == ids.shape[1]


def test_itm_features_reused(itm, photos):
    ours, _, _ = itm
    with torch.no_grad():
        feats = ours.image_features(photos)
        assert torch.allclose(ours.match(feats, TEXTS), ours.match(photos, TEXTS), atol=1e-6)


@pytest.fixture(scope="module")
def cap(hf_blip_dirs):
    from transformers import BlipForConditionalGeneration

    path = hf_blip_dirs["BlipForConditionalGeneration"]
    return blipkit.load(path), BlipForConditionalGeneration.from_pretrained(path).eval(), path


def _ref_caption(ref, tok, pixels, prompt=None, **kw):
    with torch.no_grad():
        if prompt:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            out = ref.generate(pixel_values=pixels, input_ids=ids, **kw)
        else:
            out = ref.generate(pixel_values=pixels, **kw)
    return [tok.decode(o, skip_special_tokens=True) for o in out]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("prompt", [None, "a picture of"])
def test_caption_tokens_equal_reference(cap, photos, num_beams, prompt):
    from .conftest import blip_tokenizer

    ours, ref, path = cap
    tok = blip_tokenizer()
    pixels, _, _ = ref_inputs(path, photos, ["x"])
    for i in range(len(photos)):
        want = _ref_caption(
            ref,
            tok,
            pixels[i : i + 1],
            prompt,
            num_beams=num_beams,
            max_new_tokens=12,
            min_new_tokens=3,
            repetition_penalty=1.3,
        )
        got = ours.caption(
            photos[i], prompt=prompt, num_beams=num_beams, max_new_tokens=12, min_new_tokens=3, repetition_penalty=1.3
        )
        assert got == want


def test_caption_logits_equal_reference(cap, photos):
    ours, ref, path = cap
    pixels, ids, mask = ref_inputs(path, photos[:1], ["a picture of a dog"])
    ids[:, 0] = 30522
    with torch.no_grad():
        want = ref(pixel_values=pixels, input_ids=ids, attention_mask=mask).logits
        logits, _ = ours.text_decoder(ids, attention_mask=mask, context=ours.image_features(photos[:1]))
    assert (logits - want).abs().max() <= TOL


def test_caption_batch_equals_single(cap, photos):
    ours, _, _ = cap
    prompts = ["a picture of", "a", "an old photograph showing"]
    batch = ours.caption(photos, prompt=prompts, num_beams=3, max_new_tokens=10, return_scores=True)
    for i, p in enumerate(prompts):
        ((text, score),) = ours.caption(photos[i], prompt=p, num_beams=3, max_new_tokens=10, return_scores=True)
        assert batch[i][0] == text and abs(batch[i][1] - score) < 1e-4
        assert text.startswith(p)


def test_caption_sampling_and_many(cap, photos):
    ours, _, _ = cap
    torch.manual_seed(0)
    many = ours.caption(photos[:2], do_sample=True, num_captions=4, max_new_tokens=8, top_p=0.9)
    assert len(many) == 2 and all(len(c) == 4 for c in many)
    assert len(set(many[0])) > 1  # sampling gives different captions
    beams = ours.caption(photos[0], num_beams=4, num_captions=3, return_scores=True, max_new_tokens=8)
    assert len(beams) == 1 and len(beams[0]) == 3
    scores = [s for _, s in beams[0]]
    assert all(s < 0 for s in scores)


@pytest.fixture(scope="module")
def vqa(hf_blip_dirs):
    from transformers import BlipForQuestionAnswering

    path = hf_blip_dirs["BlipForQuestionAnswering"]
    return blipkit.load(path), BlipForQuestionAnswering.from_pretrained(path).eval(), path


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vqa_equals_reference(vqa, photos, num_beams):
    from .conftest import blip_tokenizer

    ours, ref, path = vqa
    tok = blip_tokenizer()
    questions = ["what color is it?", "how many shapes are there in the picture?", "is it big?"]
    pixels, _, _ = ref_inputs(path, photos, ["x"])
    got = ours.answer(photos, questions, num_beams=num_beams, max_new_tokens=8, min_new_tokens=1)
    for i, q in enumerate(questions):
        ids = tok(q, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = ref.generate(
                input_ids=ids, pixel_values=pixels[i : i + 1], num_beams=num_beams, max_new_tokens=8, min_new_tokens=1
            )
        assert got[i] == tok.decode(out[0], skip_special_tokens=True)


def test_vqa_rank_mode(vqa, photos):
    ours, _, _ = vqa
    cands = ["red", "blue", "two", "yes", "a green triangle"]
    with torch.no_grad():
        states, qmask = ours._question_states(photos[:2], ["what color?", "how many?"])
        lp = ours.answer_logprobs(states, qmask, cands)
    ranked = ours.answer(photos[:2], ["what color?", "how many?"], answers=cands)
    assert ranked == [cands[int(i)] for i in lp.argmax(-1)]
    # the first-token pre-selection keeping every candidate scores exactly as full scoring
    with torch.no_grad():
        pre = ours._topk_rank(states, qmask, cands, len(cands))
    assert torch.allclose(pre, lp, atol=1e-5)
    two = ours.answer(photos[:2], ["what color?", "how many?"], answers=cands, num_candidates=2)
    assert all(a in cands for a in two)
    assert torch.isfinite(lp).all() and (lp < 0).all()


def test_capability_errors(itm, cap):
    ours_itm, ours_cap = itm[0], cap[0]
    with pytest.raises(CapabilityError, match="blip-image-captioning-base"):
        ours_itm.caption("missing.png")
    with pytest.raises(CapabilityError, match="blip-itm-base-coco"):
        ours_cap.match(torch.zeros(1, 3, 32, 32), "x")
    with pytest.raises(CapabilityError, match="blip-vqa-base"):
        ours_itm.answer(torch.zeros(1, 3, 32, 32), "what?")


def test_bad_inputs(itm, tmp_path):
    ours = itm[0]
    with pytest.raises(InputError, match="empty"):
        ours.encode_texts([])
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(InputError, match="not-an-image.png"):
        ours.encode_images(str(bad))
    long = ours.encode_texts("word " * 500)  # truncated to the model's maximum, not an error
    assert long.shape == (1, 16)


def test_strict_loading(hf_blip_dirs, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src = hf_blip_dirs["BlipForImageTextRetrieval"]
    for case in ("missing", "unexpected", "shape"):
        d = tmp_path / case
        shutil.copytree(src, d)
        sd = load_file(str(d / "model.safetensors"))
        if case == "missing":
            sd.pop("itm_head.weight")
        elif case == "unexpected":
            sd["itm_head.extra"] = torch.zeros(2)
        else:
            sd["text_proj.weight"] = torch.zeros(3, 3)
        save_file(sd, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match="itm_head.weight|itm_head.extra|text_proj.weight"):
            blipkit.load(d)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    with pytest.raises(CheckpointError, match="clip"):
        blipkit.load(clip)
    with pytest.raises(CheckpointError, match="no-such-dir"):
        blipkit.load("./no-such-dir")


def test_save_roundtrip_reads_in_reference(itm, tmp_path, photos):
    from transformers import BlipForImageTextRetrieval

    ours, _, _ = itm
    out = blipkit.save(ours, tmp_path / "saved")
    again = blipkit.load(out)
    ref = BlipForImageTextRetrieval.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again.match(photos, TEXTS), ours.match(photos, TEXTS))
        pixels = ours.pixels(photos[:1])
        ids, mask = ours.tokens(TEXTS[:1])
        ref_p = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels).itm_score.softmax(-1)[0, 1]
        assert abs(float(ref_p) - float(ours.match(photos[:1], TEXTS[:1])[0, 0])) <= TOL


def test_dtype_and_enc_token(hf_blip_dirs, photos):
    path = hf_blip_dirs["BlipForImageTextRetrieval"]
    fp32 = blipkit.load(path)
    bf16 = blipkit.load(path, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    with torch.no_grad():
        a, b = fp32.encode_images(photos), bf16.encode_images(photos).float()
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    with torch.no_grad():
        cls_scores = fp32.match(photos, TEXTS)
        fp32.enc_token = True
        enc_scores = fp32.match(photos, TEXTS)
    assert not torch.allclose(cls_scores, enc_scores)


def test_position_interpolation(itm):
    """The ViT interpolates its positions to other sizes; the public methods take pixels of the processor's size."""
    ours = itm[0]
    with torch.no_grad():
        f = ours.vision_model(torch.randn(1, 3, 48, 64))
    assert f.shape == (1, 1 + 6 * 8, 32)
    with pytest.raises(InputError, match=r"shape \(1, 3, 48, 64\); preprocessed pixels are \(3, 32, 32\)"):
        ours.image_features(torch.randn(1, 3, 48, 64))


@pytest.mark.full
def test_full_size_blip_base_itm(tmp_path):
    """BLIP-base size (random weights): the real architecture loads and matches the reference."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from .conftest import blip_tokenizer

    cfg = BlipConfig(text_config=dict(num_attention_heads=12), vision_config=dict(image_size=384))
    ref = BlipForImageTextRetrieval(cfg).eval()
    ref.save_pretrained(tmp_path)
    blip_tokenizer().save_pretrained(tmp_path)
    ours = blipkit.load(tmp_path)
    pixels = torch.randn(1, 3, 384, 384)
    ids, mask = ours.tokens(["a photo of a dog on the beach", "two cats"])
    with torch.no_grad():
        want = torch.stack(
            [ref(input_ids=ids[j : j + 1, : int(mask[j].sum())], pixel_values=pixels).itm_score for j in range(2)]
        ).softmax(-1)[:, 0, 1]
        got = ours.match(pixels, ["a photo of a dog on the beach", "two cats"])[0]
        want_sim = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
        got_sim = ours.similarity(pixels, ["a photo of a dog on the beach", "two cats"])
    assert (got - want).abs().max() <= 1e-4
    assert (got_sim - want_sim).abs().max() <= 1e-4
