"""BLIP-2 training: stage-1 losses by hand, the ITG mask position by position and through the stack, a few dozen
steps of each stage lowering its loss, the stage-1 checkpoint read back by blipkit and transformers, bad inputs."""

from __future__ import annotations

import math
import random

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

from .conftest import spread_weights

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
    feats = model.image_features(pixels(2))
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
    hist = train_steps(obj, repeat(stage1_batch(model)), steps=30, lr=2e-3)
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
