"""Parity of blipkit's OPT and T5 language models with transformers, on tiny random models saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from blipkit.lm import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; shapes must agree."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def reorder(state, index: torch.Tensor):
    """What beam search does to a step state: index_select(0, index) on every tensor, other leaves kept."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, (list, tuple)):
        return type(state)(reorder(s, index) for s in state)
    if isinstance(state, dict):
        return {k: reorder(v, index) for k, v in state.items()}
    return state


def load_strict(model: torch.nn.Module, directory: Path) -> None:
    """Copy a saved safetensors state dict into `model`; key sets and shapes must agree up to tied/unused keys."""
    sd = load_file(directory / "model.safetensors")
    for name in getattr(model, "unused_checkpoint_keys", ()):
        sd.pop(name, None)
    own = model.state_dict()
    tied = model.tied_weights_keys
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd[tied["lm_head.weight"]]):
        model.untie_lm_head()  # the checkpoint's head is its own tensor even though the config says tied
        own = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    missing = {k for k in own.keys() - sd.keys() if not (k in tied and params[k] is params[tied[k]])}
    assert not missing, f"missing keys: {sorted(missing)}"
    assert not sd.keys() - own.keys(), f"unexpected keys: {sorted(sd.keys() - own.keys())}"
    with torch.no_grad():
        for name, value in sd.items():
            assert own[name].shape == value.shape, (name, own[name].shape, value.shape)
            own[name].copy_(value)


def save_and_load(hf: torch.nn.Module, tmp_path: Path, ours_cls: type, cfg_cls: type, edit=None) -> torch.nn.Module:
    """Save the reference model, rebuild ours from its config.json (optionally edited) and load the weights."""
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if edit:
        cfg.update(edit)
    ours = ours_cls(cfg_cls.from_hf(cfg)).eval()
    load_strict(ours, tmp_path)
    return ours


# ----------------------------------------------------------------------------------------------------------- OPT


@pytest.fixture(params=["pre_norm", "post_norm_proj"])
def opt_pair(request, tmp_path):
    """A reference OPT and ours with the same weights; also the 350m-style layout (post-norm, projections)."""
    torch.manual_seed(0)
    extra = {} if request.param == "pre_norm" else {"do_layer_norm_before": False, "word_embed_proj_dim": 24}
    cfg = transformers.OPTConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, ffn_dim=64, num_attention_heads=4,
        max_position_embeddings=64, dropout=0.0, **extra,
    )  # fmt: skip
    hf = transformers.OPTForCausalLM(cfg).eval()
    ours = save_and_load(hf, tmp_path, OPTForCausalLM, OPTConfig)
    return hf, ours


def test_opt_state_dict_keys_equal_reference(opt_pair):
    hf, ours = opt_pair
    assert list(ours.state_dict()) == list(hf.state_dict())
    assert ours.lm_head.weight is ours.model.decoder.embed_tokens.weight


def left_padded(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (ids, mask)."""
    T = max(len(r) for r in batch)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in batch])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in batch])
    return ids, mask


@torch.no_grad()
def test_opt_forward_and_loss_match(opt_pair):
    hf, ours = opt_pair
    ids = torch.randint(3, 97, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    ref = hf(input_ids=ids, labels=labels)
    logits, loss = ours(ids, labels=labels)
    assert max_diff(logits, ref.logits) <= TOL
    assert abs(loss.item() - ref.loss.item()) <= TOL


@torch.no_grad()
def test_opt_left_padding_matches_reference_and_single_rows(opt_pair):
    hf, ours = opt_pair
    rows = [torch.randint(3, 97, (n,)).tolist() for n in (7, 4, 1)]
    ids, mask = left_padded(rows, pad=1)
    logits, _ = ours(ids, mask)
    ref = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_diff(logits[real], ref[real]) <= TOL
    for i, r in enumerate(rows):
        single, _ = ours(torch.tensor([r]))
        assert max_diff(logits[i, -len(r) :], single[0]) <= TOL


@torch.no_grad()
def test_opt_prefix_embeds_match_reference(opt_pair):
    hf, ours = opt_pair
    E = ours.config.word_embed_proj_dim
    prefix = torch.randn(2, 3, E)
    ids, mask = left_padded([torch.randint(3, 97, (n,)).tolist() for n in (5, 2)], pad=1)
    embeds = torch.cat([prefix, ours.get_input_embeddings()(ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
    logits, _ = ours(inputs_embeds=embeds, attention_mask=full_mask)
    ref = hf(inputs_embeds=embeds, attention_mask=full_mask).logits
    real = full_mask.bool()
    assert max_diff(logits[real], ref[real]) <= TOL


@torch.no_grad()
def test_opt_cached_steps_equal_full_forward(opt_pair):
    hf, ours = opt_pair
    E = ours.config.word_embed_proj_dim
    prefix = torch.randn(2, 3, E)
    ids, mask = left_padded([torch.randint(3, 97, (n,)).tolist() for n in (5, 2)], pad=1)
    new = torch.randint(3, 97, (2, 4))
    step = ours.make_step(mask, prefix_embeds=prefix)
    got = [step(ids, None)]
    for t in range(new.shape[1]):
        got.append(step(new[:, t : t + 1], got[-1][1]))
    all_ids = torch.cat([ids, new], dim=1)
    embeds = torch.cat([prefix, ours.get_input_embeddings()(all_ids)], dim=1)
    full_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask, torch.ones_like(new)], dim=1)
    ref = hf(inputs_embeds=embeds, attention_mask=full_mask).logits
    T0 = 3 + ids.shape[1]
    for t, (logits, _) in enumerate(got):
        assert max_diff(logits, ref[:, T0 - 1 + t]) <= TOL


@torch.no_grad()
def test_opt_step_state_survives_beam_reorder(opt_pair):
    _, ours = opt_pair
    ids, mask = left_padded([torch.randint(3, 97, (n,)).tolist() for n in (6, 3)], pad=1)
    step = ours.make_step(mask, rows=2)  # rows (a0, a1, b0, b1)
    _, state = step(ids.repeat_interleave(2, 0), None)
    order = torch.tensor([1, 1, 3, 2])  # beams swap and duplicate, as beam search does
    tok = torch.randint(3, 97, (4, 1))
    logits, _ = step(tok, reorder(state, order))
    # recompute from scratch: each reordered row is its source prompt with the new token appended
    src = order // 2
    fresh = ours.make_step(mask[src])
    _, s = fresh(ids[src], None)
    expect, _ = fresh(tok, s)
    assert max_diff(logits, expect) <= TOL
    bad = ours.make_step(mask, rows=2)
    with pytest.raises(ValueError):
        bad(ids, None)


# ------------------------------------------------------------------------------------------------------------ T5


# T5's reference init (std 1 embeddings and head) gives logits of ~20, where float32 noise between cached and full
# attention (different reduction order) reaches 1e-5; halving the init keeps them at ~5 and the noise near 1e-6
T5_INIT = 0.5


def tiny_t5(**kw) -> transformers.T5ForConditionalGeneration:
    """A small random reference T5 (short max_distance so the logarithmic buckets are exercised)."""
    cfg = transformers.T5Config(
        vocab_size=101, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
        decoder_start_token_id=0, initializer_factor=T5_INIT, **kw,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.fixture(params=["flan_untied", "flan_hub_config", "relu_tied"])
def t5_pair(request, tmp_path):
    """Reference and ours: Flan-style gated GELU with its own head (as saved now, and with a hub-style config
    that says untied), and original T5 with relu, tied head and the d_model**-0.5 rescale."""
    torch.manual_seed(0)
    if request.param == "relu_tied":
        hf = tiny_t5(feed_forward_proj="relu")
        ours = save_and_load(hf, tmp_path, T5ForConditionalGeneration, T5Config)
        assert ours.lm_head.weight is ours.shared.weight and ours.config.scale_decoder_outputs
        return hf, ours
    hf = tiny_t5(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    # Flan-T5's head is its own tensor, not `shared`
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * T5_INIT)
    edit = {"tie_word_embeddings": False} if request.param == "flan_hub_config" else None
    ours = save_and_load(hf, tmp_path, T5ForConditionalGeneration, T5Config, edit)
    assert ours.lm_head.weight is not ours.shared.weight and not ours.config.scale_decoder_outputs
    return hf, ours


def test_t5_state_dict_keys_equal_reference(t5_pair):
    hf, ours = t5_pair
    assert list(ours.state_dict()) == list(hf.state_dict())


@torch.no_grad()
def test_t5_encoder_decoder_and_loss_match(t5_pair):
    hf, ours = t5_pair
    ids = torch.randint(2, 101, (3, 20))  # longer than max_distance: the far buckets are used
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 5:] = 0
    labels = torch.randint(2, 101, (3, 16))
    labels[2, 10:] = -100
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    embeds = ours.get_input_embeddings()(ids)
    enc = ours.encode(embeds, mask)
    real = mask.bool()
    assert max_diff(enc[real], ref.encoder_last_hidden_state[real]) <= TOL
    logits, loss = ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert max_diff(logits, ref.logits) <= TOL
    assert abs(loss.item() - ref.loss.item()) <= TOL
    # inputs_embeds path (BLIP-2 feeds projected queries before the text)
    embeds = torch.cat([torch.randn(3, 4, 32), embeds], dim=1)
    mask = torch.cat([torch.ones(3, 4, dtype=torch.long), mask], dim=1)
    dec = ours.shift_right(labels)
    dec_mask = (labels != -100).long()
    ref = hf(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
    logits, _ = ours(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    assert max_diff(logits, ref) <= TOL


@torch.no_grad()
def test_t5_cached_steps_equal_full_forward(t5_pair):
    hf, ours = t5_pair
    ids = torch.randint(2, 101, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(2, 101, (2, 15))], dim=1)
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    step = ours.make_step(ours.encode(ours.shared(ids), mask), mask)
    logits, state = step(dec[:, :0], None)  # empty prompt: the step inserts the start token
    assert max_diff(logits, ref[:, 0]) <= TOL
    for t in range(1, dec.shape[1]):
        logits, state = step(dec[:, t : t + 1], state)
        assert max_diff(logits, ref[:, t]) <= TOL
    logits, _ = ours.make_step(ours.encode(ours.shared(ids), mask), mask)(dec[:, :5], None)  # explicit prompt
    assert max_diff(logits, ref[:, 4]) <= TOL


@torch.no_grad()
def test_t5_step_state_survives_beam_reorder(t5_pair):
    _, ours = t5_pair
    ids = torch.randint(2, 101, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    enc = ours.encode(ours.shared(ids), mask)
    step = ours.make_step(enc, mask, rows=2)
    start = torch.zeros(4, 1, dtype=torch.long)
    _, state = step(start, None)
    first = torch.randint(2, 101, (4, 1))
    _, state = step(first, state)
    order = torch.tensor([3, 0, 0, 2])
    tok = torch.randint(2, 101, (4, 1))
    logits, _ = step(tok, reorder(state, order))
    src = order // 2  # which input each reordered row came from
    fresh = ours.make_step(enc[src], mask[src])
    _, s = fresh(start, None)
    _, s = fresh(first[order], s)
    expect, _ = fresh(tok, s)
    assert max_diff(logits, expect) <= TOL


@torch.no_grad()
def test_t5_half_precision_clamps_overflow():
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4, feed_forward_proj="gated-gelu"
    )
    model = T5ForConditionalGeneration(cfg).eval().half()
    ff = model.decoder.block[0].layer[-1]
    # constant positive weights make the decoder's MLP output large and one-signed: past float16's range
    model.shared.weight.abs_()
    ff.DenseReluDense.wi_0.weight.fill_(1.0)
    ff.DenseReluDense.wi_1.weight.fill_(1.0)
    ff.DenseReluDense.wo.weight.fill_(1e3)
    ids = torch.randint(0, 50, (2, 6))
    assert not torch.isfinite(ff(model.shared(ids))).all()  # the raw sub-layer overflows ...
    logits, _ = model(ids, decoder_input_ids=ids)
    assert logits.dtype == torch.float16 and torch.isfinite(logits).all()  # ... the block clamps it
