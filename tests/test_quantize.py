"""Weight-only int8 / bfloat16 quantization: the layer against its own dequantized weights, tiny models against
their float selves (BLIP decoder, BLIP-2 OPT and T5), the shipped model's captions, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import blipkit
from blipkit.errors import InputError
from blipkit.quantize import BF16Linear, Int8Linear, quantize

from .test_blip2 import dirs, gpt2_tokenizer, itm_tokenizer, t5_tokenizer  # noqa: F401  (fixtures)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 40),
    k=st.sampled_from([16, 32, 37, 48, 64]),
    n=st.integers(1, 70),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_linear_equals_its_dequantized_weight(rows, k, n, bias, seed):
    """Both paths (the int8 kernel for few rows and K % 16 == 0, a float32 GEMM over the dequantized weight otherwise)
    compute x W'^T + b for the dequantized W', and W' is within half a quantization step (plus bf16 rounding of the
    scale) of W."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
    q = Int8Linear.from_linear(lin)
    w = q.dequantized().float()
    step = q.scales.float()[:, None]
    assert ((w - lin.weight).abs() <= 0.5 * step + lin.weight.abs() * 2**-8 + 1e-6).all()
    x = torch.randn(3, rows, k, generator=g)
    expected = x.bfloat16().float() @ w.t() + (lin.bias if bias else 0)
    got = q(x)
    assert got.shape == (3, rows, n) and got.dtype == torch.float32
    # the product is accumulated in float32 and rounded to bfloat16 once: relative error 2^-8 of the magnitude
    scale = x.bfloat16().float().abs() @ w.abs().t() + 1e-3
    assert ((got - expected).abs() <= scale * 2**-7).all()


def test_bf16_linear():
    lin = nn.Linear(32, 8)
    b = BF16Linear.from_linear(lin)
    x = torch.randn(5, 32)
    assert b.weight.dtype == torch.bfloat16
    assert torch.allclose(b(x), lin(x), atol=0.05, rtol=0.02)


def _linear_types(module: nn.Module) -> set[type]:
    return {type(m) for m in module.modules() if isinstance(m, (nn.Linear, Int8Linear, BF16Linear))}


@pytest.mark.parametrize("mode", ["int8", "bf16"])
def test_blip_decoder_quantized(hf_blip_dirs, photos, mode):
    path = hf_blip_dirs["BlipForConditionalGeneration"]
    ref, q = blipkit.load(path), blipkit.load(path, quantize=mode)
    assert q.quantized == (mode, ("text_decoder",))
    assert _linear_types(q.text_decoder) == {Int8Linear if mode == "int8" else BF16Linear}
    assert _linear_types(q.vision_model) == {nn.Linear}  # only the decoding part by default
    feats = ref.image_features(photos)
    ids = torch.tensor([[ref.config.text_config.bos_token_id, 2003, 1037, 2417]])
    with torch.inference_mode():
        a, _ = ref.text_decoder(ids.expand(3, -1), context=feats)
        b, _ = q.text_decoder(ids.expand(3, -1), context=feats)
    assert (a - b).abs().max() <= 0.03 * a.abs().max()
    caps = q.caption(photos, num_beams=2, max_new_tokens=6)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)


def test_bf16_cross_attention_cache(hf_blip_dirs, photos, monkeypatch):
    """Opted in, an int8 decoder caches its cross-attention keys/values in bfloat16; by default in float32."""
    import blipkit.quantize as q

    path = hf_blip_dirs["BlipForConditionalGeneration"]
    for opt_in, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(q, "BF16_CROSS_CACHE", opt_in)
        model = blipkit.load(path, quantize="int8")
        ids = torch.tensor([[model.config.text_config.bos_token_id, 2003, 1037]])
        with torch.inference_mode():
            _, cache = model.text_decoder(ids, context=model.image_features(photos[:1]))
        cross = [t for c in cache for t in c[2:] if t is not None]
        assert cross and {t.dtype for t in cross} == {dtype}
        assert len(model.caption(photos[:2], num_beams=2, max_new_tokens=6)) == 2


@pytest.mark.parametrize("name", ["opt", "t5"])
def test_blip2_language_model_quantized(dirs, name):  # noqa: F811
    path = dirs[name]
    ref, q = blipkit.load(path), blipkit.load(path, quantize="int8")
    assert q.quantized == ("int8", ("language_model",))
    assert _linear_types(q.language_model) == {Int8Linear}
    assert _linear_types(q.qformer) == {nn.Linear}
    pixels = torch.randn(2, 3, ref.config.vision_config.image_size, ref.config.vision_config.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        prefix = ref.prefix_embeds(pixels)
        lm_ref, lm_q = ref.language_model, q.language_model
        ids = torch.tensor([[5, 6, 7, 8]] * 2)
        if name == "opt":
            embeds = torch.cat([prefix, lm_ref.get_input_embeddings()(ids)], dim=1)
            a, _ = lm_ref(inputs_embeds=embeds)
            b, _ = lm_q(inputs_embeds=embeds)
        else:
            a, _ = lm_ref(inputs_embeds=prefix, decoder_input_ids=ids)
            b, _ = lm_q(inputs_embeds=prefix, decoder_input_ids=ids)
    # random spread weights through every layer: bf16 activations and int8 weights drift a few percent
    assert (a - b).abs().max() <= 0.06 * a.abs().max()
    assert len(q.generate(pixels, "a photo of", max_new_tokens=4, num_beams=2)) == 2


def test_attention_over_bfloat16_keys():
    """Keys/values kept in bfloat16 (an int8 decoder's cross-attention cache): the product runs in bfloat16, the
    output comes back in the queries' dtype, through SDPA and the recording (eager) path alike."""
    from blipkit.layers import attend, recording

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 16, generator=g) for n in (3, 50, 50))
    mask = torch.zeros(2, 1, 1, 50)
    mask[1, ..., 40:] = torch.finfo(torch.float32).min
    want = attend(q, k.bfloat16().float(), v.bfloat16().float(), mask)
    block = nn.Module()
    got = attend(q, k.bfloat16(), v.bfloat16(), mask)
    with recording(block) as rec:
        eager = attend(q, k.bfloat16(), v.bfloat16(), mask, block=block)
    assert got.dtype == eager.dtype == torch.float32 and rec[block].dtype == torch.bfloat16
    assert torch.allclose(got, want, atol=0.02) and torch.allclose(eager, want, atol=0.02)
    assert float(rec[block][1, ..., 40:].abs().max()) == 0  # the mask holds in bfloat16


def test_vocab_head_top_scores_are_exact():
    """A vocabulary head recomputes its top scores with the float weight: the best tokens equal the float layer's."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 500)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(500, 64, generator=g))
    q = Int8Linear.from_linear(lin, keep_exact=True)
    x = torch.randn(70, 64, generator=g)  # more rows than one refinement chunk
    ref, got = lin(x), q(x)
    top = ref.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(1, top), ref.gather(1, top), atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_shipped_captions_unchanged_by_int8():
    from blipkit.data.scenes import iter_scenes

    images = [s.image for s in iter_scenes(40, seed=20261202)]
    ref, q = blipkit.load("scenes-blip"), blipkit.load("scenes-blip", quantize="int8")
    same = sum(a == b for a, b in zip(q.caption(images), ref.caption(images), strict=True))
    assert same >= 38  # at least 95 % identical to float32
    cos = torch.nn.functional.cosine_similarity(q.similarity(images, ["a red circle"]).flatten(),
                                                ref.similarity(images, ["a red circle"]).flatten(), dim=0)
    assert float(cos) > 0.9999


def test_errors(hf_blip_dirs, tmp_path):
    path = hf_blip_dirs["BlipForConditionalGeneration"]
    with pytest.raises(InputError, match=r"^unknown quantization 'int4': use one of int8, bf16"):
        blipkit.load(path, quantize="int4")
    model = blipkit.load(path)
    with pytest.raises(InputError, match=r"has no part 'qformer' to quantize; its parts with linear layers: "
                                         r"vision_model, text_decoder"):
        quantize(model, "int8", parts=["qformer"])
    q = quantize(model, "int8")
    with pytest.raises(InputError, match=r": text_decoder is already quantized \(int8\): load the model again"):
        quantize(q, "bf16")
    quantize(q, "bf16", parts=["vision_model"])  # another part may take another mode
    assert q.quantized == ("int8", ("text_decoder", "vision_model"))
    assert _linear_types(q.vision_model) == {BF16Linear}
    with pytest.raises(InputError, match=r": vision_model is already quantized \(bf16\): load the model again"):
        quantize(q, "int8", parts=["vision_model"])
    with pytest.raises(InputError, match=r"has int8 weights, which save\(\) does not write"):
        blipkit.save(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with torch.device("meta"):
        meta = type(model)(model.config)
    with pytest.raises(InputError, match=r"^cannot quantize a model on the meta device"):
        quantize(meta, "int8")


def test_device_without_int8_kernel(hf_blip_dirs, monkeypatch):
    """A device whose torch build lacks the int8 kernel (as the probe finds it) is refused, naming what to do."""
    import blipkit.quantize as q

    def missing(device):
        raise NotImplementedError("Could not run 'aten::_weight_int8pack_mm' with arguments from the 'XPU' backend.\n"
                                  "more detail")

    monkeypatch.setattr(q, "_probe_int8", missing)
    model = blipkit.load(hf_blip_dirs["BlipForConditionalGeneration"])
    with pytest.raises(InputError, match=r"^int8 weights are not supported on device 'cpu' by this torch build "
                                         r"\(Could not run 'aten::_weight_int8pack_mm' .* 'XPU' backend\.\); load "
                                         r"the model on cpu, or use dtype='bfloat16' / quantize='bf16' there$"):
        quantize(model, "int8")
    assert not getattr(model, "quantized", None)  # nothing was swapped
    assert quantize(model, "bf16").quantized == ("bf16", ("text_decoder",))  # bf16 needs no int8 kernel


def test_cli_quantize_flag(capsys, tmp_path):
    from pathlib import Path

    from blipkit import cli

    image = str(Path(__file__).parents[1] / "examples" / "red-circle-blue-square.png")
    assert cli.main(["caption", image, "--quantize", "int8", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["caption"]
    assert got == blipkit.load("scenes-blip", quantize="int8").caption(image)[0]
    assert cli.main(["caption", image, "--quantize", "int4"]) == 2
    assert "--quantize: invalid choice: 'int4'" in capsys.readouterr().err
    assert cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--quantize", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize is for inference commands" in err
