"""BLIP-2 training: stage-1 losses by hand, the ITG mask position by position and through the stack, a few dozen
steps of each stage lowering its loss, the stage-1 checkpoint read back by blipkit and transformers, bad inputs;
then `blipkit train --stage qformer1 / lm / qformer2` on a tiny generated dataset (losses fall, stage 1 resumes
exactly, the outputs load in blipkit and transformers), BLIP's ViT as BLIP-2's image encoder, the Q-Former started
from BLIP's text encoder, and hard negatives drawn across two processes."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

import blipkit
from blipkit.blip2 import Blip2
from blipkit.blip2_config import ARCHITECTURES, RETRIEVAL, Blip2Config
from blipkit.config import TextConfig, VisionConfig
from blipkit.errors import CheckpointError, InputError
from blipkit.lm import OPTConfig, T5Config
from blipkit.train.blip2_losses import (
    GenerativeObjectives,
    QFormerObjectives,
    caption_labels,
    itg_mask,
    max_query_similarity,
    opt_batch,
    qformer_itc_loss,
    split_prefix,
    t5_batch,
    train_steps,
)
from blipkit.train.model import init_weights
from blipkit.train.vocab import build_tokenizer

from .conftest import spread_weights, torchrun

Q = 4
MASK = 4  # `[MASK]`, unused by the captions: the image placeholder of the generation models
CAPTIONS = ["a red circle on the left", "two blue squares", "a green triangle above a square", "one yellow star"]


# ------------------------------------------------------------------------------------------------ tiny models


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and leave the other cores alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tokenizer():
    return build_tokenizer(CAPTIONS)


def tiny(lm: str | None, hidden: int = 32, seed: int = 0) -> Blip2:
    """A freshly initialised tiny BLIP-2: retrieval (lm None), or generation with a tiny OPT / T5."""
    tok = tokenizer()
    vision = VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                          image_size=32, patch_size=8, layer_norm_eps=1e-6)
    qformer = TextConfig(vocab_size=tok.vocab_size, hidden_size=hidden, encoder_hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, pad_token_id=0,
                         cross_attention_frequency=2, query_ffn=True, text_ffn=lm is None)
    if lm is None:
        cfg = Blip2Config(vision, qformer, None, num_query_tokens=Q, image_text_hidden_size=16,
                          architecture=RETRIEVAL, parts=ARCHITECTURES[RETRIEVAL])
    elif lm == "opt":
        text = OPTConfig(vocab_size=tok.vocab_size, hidden_size=24, num_hidden_layers=1, ffn_dim=32,
                         num_attention_heads=2, max_position_embeddings=64, dropout=0.0, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
        cfg = Blip2Config(vision, qformer, text, num_query_tokens=Q, prompt_bos_token_id=2, image_token_index=MASK)
    else:
        text = T5Config(vocab_size=tok.vocab_size, d_model=24, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=12,
                        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
                        dropout_rate=0.0, tie_word_embeddings=False)
        cfg = Blip2Config(vision, qformer, text, num_query_tokens=Q, prompt_bos_token_id=3, image_token_index=MASK)
    torch.manual_seed(seed)
    model = Blip2(cfg)
    init_weights(model)
    model.tokenizer = tok
    model.processor = model.default_processor()
    return model


def pixels(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def stage1_batch(model: Blip2) -> dict[str, torch.Tensor]:
    ids, mask = model.tokens(CAPTIONS, max_length=40)
    n = len(CAPTIONS)
    return {"pixels": pixels(n), "image_keys": torch.arange(n), "caption_rows": torch.arange(n),
            "caption_ids": ids, "caption_mask": mask, "caption_keys": torch.arange(n) + 100}


def repeat(batch):
    while True:
        yield batch


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


# ------------------------------------------------------------------------------------------------ stage-1 losses


def test_itc_takes_the_best_query():
    # image 0's best query for text 0 is its first, image 1's for text 1 its second: sim = identity
    image = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[-1.0, 0.0], [0.0, 1.0]]])  # (2, Q=2, D=2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.equal(max_query_similarity(image, text), torch.eye(2))
    p = math.e / (math.e + 1)
    assert qformer_itc_loss(image, text, 1.0).item() == pytest.approx(-math.log(p), abs=1e-6)
    p2 = math.e**2 / (math.e**2 + 1)  # temperature 0.5 doubles the logits
    assert qformer_itc_loss(image, text, 0.5).item() == pytest.approx(-math.log(p2), abs=1e-6)
    smoothed = -(0.95 * math.log(p) + 0.05 * math.log(1 - p))
    assert qformer_itc_loss(image, text, 1.0, label_smoothing=0.1).item() == pytest.approx(smoothed, abs=1e-6)
    # one process's rows against the gathered batch: row 1 alone, positive at column 1
    pos = torch.tensor([[False, True]])
    got = qformer_itc_loss(image[1:], text[1:], 1.0, pos, all_image=image, all_text=text)
    assert got.item() == pytest.approx(-math.log(p), abs=1e-6)


def test_itg_mask_position_by_position():
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    m = itg_mask(text_mask, num_queries=2)
    assert m.shape == (2, 1, 6, 6)
    seen = m[:, 0] == 0  # (B, 6, 6): row = who looks, column = what it sees
    q, t = 2, 4
    for b in range(2):
        for i in range(q + t):
            for j in range(q + t):
                if j < q:
                    want = True  # every position sees every query
                elif i < q:
                    want = False  # queries never see text
                else:
                    want = j <= i and bool(text_mask[b, j - q])  # causal over real text tokens
                assert bool(seen[b, i, j]) == want, (b, i, j)
    assert (m[~(m == 0)] == torch.finfo(torch.float32).min).all()


def test_itg_mask_through_the_stack():
    model = tiny(None)
    obj = QFormerObjectives(model).eval()
    feats = model.image_features(pixels(2)).clone()  # an inference tensor until cloned: autograd runs on it below
    ids, mask = model.tokens(["a red circle on the left", "two blue squares"], max_length=40)
    changed = ids.clone()
    changed[:, 3] = 7  # alter the third word piece of each text
    with torch.no_grad():
        a, b = obj.itg_logits(feats, ids, mask), obj.itg_logits(feats, changed, mask)
        qa = obj._stack(torch.cat([model.query_tokens.expand(2, -1, -1), model.embeddings(ids)], 1),
                        itg_mask(mask, Q), Q, feats)[:, :Q]
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)  # earlier text does not see later text
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-3)
    assert torch.allclose(qa, obj.query_outputs(feats), atol=1e-5)  # queries never see the text


def test_caption_labels_and_prefix_split():
    ids = torch.tensor([[2, 5, 6, 7, 0], [2, 8, 9, 0, 0]])
    mask = (ids != 0).long()
    labels = caption_labels(ids, mask, torch.tensor([2, 1]), num_queries=3)
    assert labels.tolist() == [[-100] * 3 + [-100, -100, 6, 7, -100], [-100] * 3 + [-100, 8, 9, -100, -100]]
    rng = random.Random(0)
    for _ in range(20):
        first, rest = split_prefix("a red circle on the left", rng)
        assert rest and f"{first} {rest}".strip() == "a red circle on the left"
    assert split_prefix("word", rng) == ("", "word")
    with pytest.raises(InputError, match="empty caption"):
        split_prefix("  ", rng)


def test_itm_pairs_and_itg_by_hand():
    model = tiny(None)
    obj = QFormerObjectives(model, objectives=("itm", "itg"), itg_label_smoothing=0.0)
    batch = stage1_batch(model)
    seen = []

    def fake_itm(feats, ids, mask):  # records the pairs, predicts "don't know"
        seen.append((feats, ids))
        return torch.zeros(len(ids), 2, requires_grad=True)

    obj.itm_logits = fake_itm
    with torch.no_grad():
        obj.itg_head.transform.LayerNorm.weight.zero_()  # the head's input is 0, so every logit is its bias: 0
        obj.itg_head.transform.LayerNorm.bias.zero_()
    losses = obj(batch)
    assert losses["itm"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert losses["itg"].item() == pytest.approx(math.log(model.config.qformer_config.vocab_size), abs=1e-5)
    feats, ids = seen[0]
    B = len(CAPTIONS)
    assert len(ids) == 3 * B  # positives, a negative text per image, a negative image per text
    assert torch.equal(ids[:B], batch["caption_ids"])
    img = model.vision_model(batch["pixels"])
    image_of = [int(next(j for j in range(B) if torch.equal(f, img[j]))) for f in feats]
    text_of = [int(next(j for j in range(B) if torch.equal(t, batch["caption_ids"][j]))) for t in ids]
    assert image_of[:B] == text_of[:B] == list(range(B))
    assert all(i != t for i, t in zip(image_of[B:], text_of[B:], strict=True))  # negatives are never pairs
    assert image_of[B : 2 * B] == list(range(B)) and text_of[2 * B :] == list(range(B))
    # one image for every caption: no negative exists, only the positives are classified
    seen.clear()
    obj({**batch, "image_keys": torch.zeros(B, dtype=torch.long)})
    assert len(seen[0][1]) == B


# ------------------------------------------------------------------------------------------------ training


def test_stage1_steps_lower_every_loss():
    model = tiny(None)
    obj = QFormerObjectives(model, itc_label_smoothing=0.0, itg_label_smoothing=0.0)
    vision_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    hist = train_steps(obj, repeat(stage1_batch(model)), steps=60, lr=2e-3)  # ITC sits at ln(batch) for ~20 steps first
    assert set(hist[0]) == {"itc", "itm", "itg", "loss"}
    assert hist[0]["loss"] == pytest.approx(hist[0]["itc"] + hist[0]["itm"] + hist[0]["itg"], rel=1e-5)
    for k in ("itc", "itg", "loss"):
        assert mean([h[k] for h in hist[-5:]]) < 0.7 * mean([h[k] for h in hist[:5]]), k
    assert mean([h["itm"] for h in hist[-5:]]) < mean([h["itm"] for h in hist[:5]])
    assert all(torch.equal(v, model.vision_model.state_dict()[k]) for k, v in vision_before.items())
    assert not model.vision_model.training and obj.training


def test_stage1_checkpoint_reads_in_blipkit_and_transformers(tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    model = tiny(None)
    obj = QFormerObjectives(model)
    train_steps(obj, repeat(stage1_batch(model)), steps=3, lr=1e-3)
    model.eval()
    out = blipkit.save(model, tmp_path / "stage1")
    obj.save_itg_head(out)
    again = blipkit.load(out)
    ref = Blip2ForImageTextRetrieval.from_pretrained(out).eval()
    px = pixels(3)
    ids, mask = model.tokens(CAPTIONS, max_length=40)
    with torch.no_grad():
        itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
        assert (model.similarity(px, CAPTIONS) - itc).abs().max() <= 1e-5
        assert torch.allclose(again.similarity(px, CAPTIONS), model.similarity(px, CAPTIONS), atol=1e-6)
        # what training computes is what the model's public methods compute
        feats = model.image_features(px)
        assert torch.allclose(obj.query_outputs(feats), model.qformer_features(px), atol=1e-5)
        assert torch.allclose(obj.text_embeddings(ids, mask), model.encode_texts(CAPTIONS), atol=1e-5)
        pairs = obj.itm_logits(feats, ids[:3], mask[:3])
        assert torch.allclose(pairs, model.itm_logits(px, CAPTIONS[:3]).diagonal().t(), atol=1e-5)
        for i in range(3):
            want = ref(pixel_values=px[i : i + 1].expand(len(CAPTIONS), -1, -1, -1), input_ids=ids,
                       attention_mask=mask, use_image_text_matching_head=True).logits_per_image
            assert (model.itm_logits(px[i : i + 1], CAPTIONS)[0] - want).abs().max() <= 1e-5
        # the ITG head, kept in its own file, comes back with the loaded model
        obj2 = QFormerObjectives(again).eval()
        obj2.load_itg_head(out)
        feats = model.image_features(px[:2])
        assert torch.allclose(obj2.itg_logits(feats, ids[:2], mask[:2]), obj.eval().itg_logits(feats, ids[:2],
                                                                                               mask[:2]), atol=1e-5)
    with pytest.raises(CheckpointError, match="ITG head"):
        obj2.load_itg_head(tmp_path)


@pytest.fixture(scope="module")
def stage1() -> Blip2:
    model = tiny(None)
    train_steps(QFormerObjectives(model), repeat(stage1_batch(model)), steps=2, lr=1e-3)
    return model.eval()


@pytest.mark.parametrize("lm", ["opt", "t5"])
def test_stage2_steps_lower_the_loss_and_save(lm, stage1, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    model = tiny(lm, seed=1)
    spread_weights(model.language_model, seed=1)  # a frozen LM whose outputs the queries can move, as a trained one
    obj = GenerativeObjectives(model, stage1)
    assert torch.equal(model.query_tokens, stage1.query_tokens)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision_model.", "language_model."))}
    if lm == "opt":
        batch = opt_batch(model, pixels(), CAPTIONS, prompt="a photo of")
        plen = int(batch["prompt_length"][0])
        assert plen == int(model.tokens("a photo of")[1].sum())
    else:
        batch = t5_batch(model, pixels(), CAPTIONS, random.Random(0))
        assert batch["input_mask"].sum() > 0 and (batch["output_mask"].sum(dim=1) > 1).all()
    hist = train_steps(obj, repeat(batch), steps=30, lr=1e-2)
    assert mean([h["lm"] for h in hist[-5:]]) < 0.9 * mean([h["lm"] for h in hist[:5]])
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen.items())
    assert not torch.equal(model.query_tokens, stage1.query_tokens)
    # the saved model: blipkit reads it back, and transformers computes the same captioning loss
    obj.eval()
    out = blipkit.save(model, tmp_path / "stage2")
    again = blipkit.load(out)
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    B, key = len(CAPTIONS), "caption" if lm == "opt" else "input"
    ids = torch.cat([torch.full((B, Q), MASK), batch[f"{key}_ids"]], dim=1)  # the reference's image placeholders
    mask = torch.cat([torch.ones(B, Q, dtype=torch.long), batch[f"{key}_mask"]], dim=1)
    if lm == "opt":
        extra = {"labels": caption_labels(batch["caption_ids"], batch["caption_mask"], batch["prompt_length"], Q)}
    else:
        extra = {"labels": batch["output_ids"].masked_fill(batch["output_mask"] == 0, -100),
                 "decoder_attention_mask": batch["output_mask"]}
    with torch.no_grad():
        want = ref(pixel_values=batch["pixels"], input_ids=ids, attention_mask=mask, **extra).loss
        assert obj(batch)["lm"].item() == pytest.approx(want.item(), abs=1e-5)
        assert torch.allclose(again.prefix_embeds(batch["pixels"]), model.prefix_embeds(batch["pixels"]), atol=1e-6)


def test_stage2_bad_starts(stage1):
    with pytest.raises(InputError, match="stage-1"):
        GenerativeObjectives(tiny("opt"), None)
    with pytest.raises(CheckpointError, match="Q-Former"):
        GenerativeObjectives(tiny("opt", hidden=16), stage1)  # a stage-1 Q-Former of another width
    with pytest.raises(CheckpointError, match="stage-1"):
        GenerativeObjectives(tiny("opt"), tiny("t5"))  # a generation model is no stage-1 checkpoint
    model = tiny("opt")
    model.language_projection = torch.nn.Linear(32, 40)  # the language model is 24 wide
    with pytest.raises(InputError, match="24 wide"):
        GenerativeObjectives(model, stage1)


# ------------------------------------------------------------------------------------------------ the training command


def run(*args: str) -> dict:
    """`blipkit train ...` in this process; returns its JSON summary."""
    from blipkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train", *args, "--json"]) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def log(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "train_log.jsonl").read_text().splitlines()]


def falls(values: list[float]) -> bool:
    return mean(values[-5:]) < mean(values[:5])


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    from blipkit.data.scenes import write_dataset

    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, n_train=48, n_val=4, n_test=6, seed=3, image_size=32, progress=False)
    return root


def tiny_blip(scenes: Path):
    from blipkit.data.readers import load_items
    from blipkit.train.model import scratch_model

    items = load_items(scenes, "train").items
    return scratch_model("tiny", build_tokenizer([c for it in items for c in it.captions]), seed=0)


@pytest.fixture(scope="module")
def blip_dir(scenes, tmp_path_factory) -> Path:
    """A tiny BLIP (all heads) whose image encoder and text encoder BLIP-2 starts from."""
    model = tiny_blip(scenes)
    spread_weights(model, seed=5)  # weights with a spread: images and texts get distinct features
    return blipkit.save(model, tmp_path_factory.mktemp("blip"))


COMMON = ("--batch-size", "8", "--warmup", "2", "--log-every", "1", "--save-every", "100")


def stage1_args(scenes: Path, blip_dir: Path, out: Path, steps: int) -> list[str]:
    return ["--stage", "qformer1", "--data", str(scenes), "--init-vision", str(blip_dir), "--out", str(out),
            "--num-queries", str(Q), "--steps", str(steps), "--lr", "1e-3", *COMMON]


@pytest.fixture(scope="module")
def stage1_dir(scenes, blip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qformer1")
    run(*stage1_args(scenes, blip_dir, out, 30))
    return out


@pytest.fixture(scope="module")
def lm_dir(scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    run("--stage", "lm", "--data", str(scenes), "--lm-arch", "tiny", "--out", str(out), "--steps", "100",
        "--lr", "3e-3", *COMMON)
    return out


def test_blip_vit_is_blip2_image_encoder(scenes):
    from blipkit.train.blip2_stages import vision_from_blip

    blip = tiny_blip(scenes)
    spread_weights(blip, seed=1)
    vision = vision_from_blip(blip)
    bias, W = vision.encoder.layers[0].self_attn.qkv.bias, blip.config.vision_config.hidden_size
    old = blip.vision_model.encoder.layers[0].self_attn.qkv.bias
    assert old[W : 2 * W].abs().min() > 0 and bias[W : 2 * W].eq(0).all()  # the key bias is gone...
    assert torch.equal(bias[:W], old[:W]) and torch.equal(bias[2 * W :], old[2 * W :])  # ...query and value kept
    px = pixels(3)
    with torch.no_grad():
        assert (vision(px) - blip.image_features(px)).abs().max() < 1e-5  # ...and the features are the same


def test_qformer_starts_from_blip_text_encoder(scenes):
    from blipkit.train.blip2_stages import stage1_model

    blip = tiny_blip(scenes)
    spread_weights(blip, seed=2)
    model, fresh = stage1_model(blip, num_queries=Q), stage1_model(blip, num_queries=Q, qformer_init="random")
    layer = model.qformer.encoder.layer[0]
    assert torch.equal(layer.intermediate_query.dense.weight, layer.intermediate.dense.weight)
    assert not model.qformer.encoder.layer[1].has_cross  # cross-attention every second layer
    with torch.no_grad():
        assert (model.encode_texts(CAPTIONS) - blip.encode_texts(CAPTIONS)).abs().max() < 1e-6
        assert not torch.allclose(fresh.encode_texts(CAPTIONS), blip.encode_texts(CAPTIONS), atol=1e-2)
    with pytest.raises(InputError, match="--qformer-init random"):
        stage1_model(blip, width=16)  # another width cannot take BLIP's weights


def test_cli_stage1_trains_and_reads_in_transformers(stage1_dir, scenes):
    from transformers import Blip2ForImageTextRetrieval

    for key in ("loss", "itg"):
        assert falls(log(stage1_dir, key)), key
    assert (stage1_dir / "itg_head.safetensors").is_file()
    model = blipkit.load(stage1_dir)
    assert model.config.architecture == RETRIEVAL and model.config.num_query_tokens == Q
    ref = Blip2ForImageTextRetrieval.from_pretrained(stage1_dir).eval()
    from blipkit.data.readers import load_items

    items = load_items(scenes, "test").items[:3]
    px = model.pixels([str(it.image) for it in items])
    texts = [it.captions[0] for it in items]
    ids, mask = model.tokens(texts, max_length=model.config.qformer_config.max_position_embeddings)
    with torch.no_grad():
        itc = ref(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image
        assert (model.similarity(px, texts) - itc).abs().max() <= 1e-5
        for i in range(3):
            want = ref(pixel_values=px[i : i + 1].expand(3, -1, -1, -1), input_ids=ids, attention_mask=mask,
                       use_image_text_matching_head=True).logits_per_image
            assert (model.itm_logits(px[i : i + 1], texts)[0] - want).abs().max() <= 1e-5


def test_cli_stage1_resume_is_exact(scenes, blip_dir, tmp_path):
    run(*stage1_args(scenes, blip_dir, tmp_path / "a", 6))
    assert run(*stage1_args(scenes, blip_dir, tmp_path / "b", 6), "--stop-after", "3")["step"] == 3
    assert run(*stage1_args(scenes, blip_dir, tmp_path / "b", 6))["step"] == 6
    for name in ("model.safetensors", "itg_head.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_cli_lm_trains_an_opt_transformers_reads(lm_dir):
    from transformers import AutoTokenizer, OPTForCausalLM

    from blipkit.train.lm import load_language_model

    assert falls(log(lm_dir, "lm"))
    lm, tok = load_language_model(lm_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 2, 1)  # OPT's `</s>` and `<pad>`
    assert 262 <= tok.vocab_size <= 768
    texts = ["a red circle on the left", "two blue squares and a zebra!"]  # unseen words are spelled in bytes
    ids, mask = tok(texts)
    hf_tok = AutoTokenizer.from_pretrained(lm_dir)
    assert hf_tok(texts, padding=True)["input_ids"] == ids.tolist()
    assert tok.decode(ids[1]) == texts[1]
    ref = OPTForCausalLM.from_pretrained(lm_dir).eval()
    with torch.no_grad():
        ours, _ = lm(input_ids=ids, attention_mask=mask)
        assert (ours - ref(input_ids=ids, attention_mask=mask).logits).abs().max() <= 1e-5


def test_cli_stage2_trains_and_captions(stage1_dir, lm_dir, scenes, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    from blipkit.train.blip2_losses import caption_labels, opt_tensors

    out = tmp_path / "blip2"
    run("--stage", "qformer2", "--data", str(scenes), "--init", str(stage1_dir), "--lm", str(lm_dir),
        "--out", str(out), "--steps", "40", "--lr", "3e-3", *COMMON)
    assert falls(log(out, "lm"))
    model = blipkit.load(out)
    from blipkit.data.readers import load_items

    images = [str(it.image) for it in load_items(scenes, "test").items[:2]]
    captions = model.caption(images, num_beams=2, max_new_tokens=8)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    # transformers reads the directory and computes the same captioning loss
    ref = Blip2ForConditionalGeneration.from_pretrained(out).eval()
    px, n, q = model.pixels(images), 2, model.config.num_query_tokens
    t = opt_tensors(model.tokens, ["a red circle", "two squares"], end="</s>")
    ids = torch.cat([torch.full((n, q), model.config.image_token_index), t["caption_ids"]], dim=1)
    mask = torch.cat([torch.ones(n, q, dtype=torch.long), t["caption_mask"]], dim=1)
    labels = caption_labels(t["caption_ids"], t["caption_mask"], 1, q)
    with torch.no_grad():
        want = ref(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels).loss
        prefix = model.prefix_embeds(px)
        embeds = torch.cat([prefix, model.language_model.get_input_embeddings()(t["caption_ids"])], dim=1)
        _, loss = model.language_model(inputs_embeds=embeds, attention_mask=mask, labels=labels)
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)


def tiny_t5_dir(scenes: Path, directory: Path) -> Path:
    """A tiny random Flan-T5-style model written by transformers, with a byte-level BPE tokenizer in T5's ids."""
    import transformers
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    from blipkit.data.readers import load_items
    from blipkit.processing import Tokenizer

    backend = Backend(BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([c for it in load_items(scenes, "train").items for c in it.captions], trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = Tokenizer(backend, {"eos": "</s>", "pad": "<pad>", "unk": "<unk>"}, [], 64)
    cfg = transformers.T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                                relative_attention_num_buckets=8, relative_attention_max_distance=16)
    torch.manual_seed(0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(directory)
    tok.save(directory)
    return directory


def test_cli_stage2_with_flan_t5(stage1_dir, scenes, tmp_path, capsys):
    from blipkit.cli import main

    t5 = tiny_t5_dir(scenes, tmp_path / "t5")
    args = ["--stage", "qformer2", "--data", str(scenes), "--init", str(stage1_dir), "--lm", str(t5)]
    assert main(["train", *args, "--out", str(tmp_path / "x"), "--prompt", "a photo of"]) == 2
    assert "--prompt is for OPT" in capsys.readouterr().err
    out = tmp_path / "blip2-t5"
    run(*args, "--out", str(out), "--steps", "30", "--lr", "3e-3", *COMMON)
    assert falls(log(out, "lm"))
    model = blipkit.load(out)
    assert model.config.lm_type == "t5"
    assert len(model.caption(pixels(2), max_new_tokens=4, num_beams=1)) == 2


def test_cli_stage2_errors(stage1_dir, lm_dir, scenes, tmp_path, capsys):
    import shutil

    from blipkit.cli import main
    from blipkit.train.lm import load_language_model, save_language_model

    base = ["train", "--stage", "qformer2", "--data", str(scenes), "--out", str(tmp_path / "out"), "--steps", "1"]

    def error(*args: str) -> str:
        assert main([*base, *args]) == 2
        return capsys.readouterr().err

    msg = error("--lm", str(lm_dir))
    assert "--init" in msg and "stage 1" in msg
    assert "run stage 1 first" in error("--init", str(tmp_path / "none"), "--lm", str(lm_dir))
    assert "--lm" in error("--init", str(stage1_dir))
    assert "--init-vision is for --stage qformer1" in error("--init-vision", "scenes-blip")
    # an OPT whose embeddings are narrower than its hidden size (as OPT-350m): the projection cannot feed it
    from blipkit.lm import OPTForCausalLM

    lm, tok = load_language_model(lm_dir)
    cfg = lm.config
    narrow = dataclasses.replace(cfg, word_embed_proj_dim=cfg.hidden_size // 2)
    save_language_model(OPTForCausalLM(narrow), tok, tmp_path / "narrow")
    msg = error("--init", str(stage1_dir), "--lm", str(tmp_path / "narrow"))
    assert f"{cfg.hidden_size // 2} wide" in msg
    # weights that do not fit the config, and a directory without weights
    bad = tmp_path / "bad"
    shutil.copytree(lm_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 48, "word_embed_proj_dim": 48}))
    assert "shape mismatch" in error("--init", str(stage1_dir), "--lm", str(bad))
    (bad / "model.safetensors").unlink()
    assert "no weights" in error("--init", str(stage1_dir), "--lm", str(bad))


# ------------------------------------------------------------------------------------------------ two processes

DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist

import blipkit
from blipkit.cli import main
from blipkit.train.blip2_losses import QFormerObjectives
from blipkit.train.blip2_stages import stage1_model

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
blip_dir, scenes, out = sys.argv[1:4]
model = stage1_model(blipkit.load(blip_dir), num_queries=4)
obj = QFormerObjectives(model)
seen = []

def record(feats, ids, mask):
    seen.append((feats, ids, mask))
    return torch.zeros(len(ids), 2, requires_grad=True)

obj.itm_logits = record
captions = [["a red circle", "two red circles on the left", "a red star"],
            ["a blue square", "three blue squares", "blue"]][rank]  # different lengths on the two processes
ids, mask = model.tokens(captions, max_length=40)
pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
# one image per process: on its own, a process has no negative at all
batch = {"pixels": pixels, "image_keys": torch.full((3,), rank), "caption_rows": torch.arange(3),
         "caption_ids": ids, "caption_mask": mask, "caption_keys": torch.arange(3) + 10 * rank}
losses = obj(batch)
sum(losses.values()).backward()
with torch.no_grad():
    feats = model.vision_model(pixels)
both = [None, None]
dist.all_gather_object(both, (feats, captions))
other_feats, other_captions = both[1 - rank]
g_feats, g_ids, g_mask = seen[0]
assert len(g_ids) == 9, len(g_ids)  # 3 pairs, a negative text for each image, a negative image for each text
texts = [model.tokenizer.decode(row[m.bool()]) for row, m in zip(g_ids, g_mask)]
assert texts[:3] == captions and texts[6:] == captions, texts
assert all(t in other_captions for t in texts[3:6]), texts  # the images' negative texts: the other process's
assert all(any(torch.equal(f, o) for o in other_feats) for f in g_feats[6:])  # the texts' negative images too
assert all(torch.equal(f, feats[i % 3]) for i, f in enumerate(g_feats[:6]))
print("negatives ok", rank, flush=True)
sys.exit(main(["train", "--stage", "qformer1", "--data", scenes, "--init-vision", blip_dir, "--out", out,
               "--num-queries", "4", "--steps", "2", "--batch-size", "4", "--save-every", "2", "--json"]))
"""


def test_hard_negatives_across_two_processes(blip_dir, scenes, tmp_path):
    """torchrun, two CPU processes (gloo): a text's negative image comes from the other process, and stage 1 runs
    on the shared loop under DDP."""
    script = tmp_path / "negatives.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    proc = torchrun(script, str(blip_dir), str(scenes), str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("negatives ok") == 2
    from blipkit.train import loop

    state = torch.load(out / loop.STATE_FILE, weights_only=False)
    assert state["step"] == 2 and state["world_size"] == 2 and "itg_head.bias" in state["objectives"]
    assert blipkit.load(out).config.num_query_tokens == 4
