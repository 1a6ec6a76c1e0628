"""Decoding speed with quantized weights and on onnxruntime, bulk captioning throughput, and quality against float32.

    python benchmarks/bench_quantize.py decode      # BLIP-base greedy decoding per token: transformers fp32 vs
                                                   # blipkit fp32 / bf16 / int8 / ONNX fp32 / ONNX int8 (weight-only
                                                   # MatMulNBits, block 32 / 128, int8 or float activations; dynamic)
    python benchmarks/bench_quantize.py blip2       # BLIP-2 OPT (125m size) and Flan-T5 (base size) decoding per token
    python benchmarks/bench_quantize.py bulk        # captions/s for 64 images at batch 8/16/32 vs batched generate
    python benchmarks/bench_quantize.py quality     # shipped models on their test split: captions and metrics vs
                                                   # fp32, ITC/ITM cosine (int8, bf16, onnxruntime int8)
    python benchmarks/bench_quantize.py compile     # torch.compile of the vision tower on CPU
    python benchmarks/bench_quantize.py kernels     # one BLIP-base decoder step on each linear kernel (int8, bf16,
                                                   # fbgemm's dynamic int8 and fp16): what int8 gains on this CPU

Random weights decode forever, so lengths are forced (min_new_tokens = max_new_tokens). Per-token times are
(time for 31 tokens - time for 1 token) / 30: vision and the prompt pass cancel out. All variants of one figure
run interleaved (best of 3), so a busy machine slows them alike; ratios are transformers / blipkit (> 1: faster).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import compare, memory_bandwidth  # noqa: E402

N = 30


def per_token(fns: dict, repeat: int = 3) -> dict[str, float]:
    """Seconds per generated token of each `fn(n_tokens)`, from runs of N + 1 and 1 tokens."""
    calls = [lambda f=f, n=n: f(n) for f in fns.values() for n in (N + 1, 1)]
    best = compare(*calls, repeat=repeat)
    return {k: (best[2 * i] - best[2 * i + 1]) / N for i, k in enumerate(fns)}


def report(title: str, times: dict[str, float], ref: str) -> None:
    print(title)
    for k, t in times.items():
        print(f"  {k:<38} {t * 1000:7.1f} ms/token   {times[ref] / t:5.2f}x {ref}", flush=True)


def _forced(n: int) -> dict:
    return dict(num_beams=1, max_new_tokens=n, min_new_tokens=n)


def decode(onnx: bool = True, torch_variants: bool = True) -> None:
    """BLIP-base (ViT-B/16 at 384 px, 12-layer text decoder, vocabulary 30524), one image, greedy."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    import blipkit
    from blipkit import quantize
    from blipkit.export import export_onnx
    from tests.conftest import blip_tokenizer

    torch.manual_seed(0)
    cfg = BlipConfig(text_config=dict(num_attention_heads=12, num_hidden_layers=12),
                     vision_config=dict(image_size=384, num_hidden_layers=12))
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref = BlipForConditionalGeneration(cfg).eval()
        ref.save_pretrained(tmp)
        blip_tokenizer().save_pretrained(tmp)
        image = torch.randn(1, 3, 384, 384)
        fp32 = blipkit.load(tmp)
        feats = fp32.image_features(image)
        int8 = f"blipkit int8 weights ({quantize.kernel()} kernel)"
        models = {"blipkit fp32": fp32, "blipkit bf16 weights": blipkit.load(tmp, quantize="bf16"),
                  int8: blipkit.load(tmp, quantize="int8")} if torch_variants else {}
        if torch_variants and quantize.kernel() == "inductor":  # the kernel it replaces, for comparison
            models["blipkit int8 weights (torch kernel)"] = blipkit.load(tmp, quantize="int8")
        if onnx:
            with torch.inference_mode(False):
                out = export_onnx(fp32, Path(tmp) / "onnx", parts=["text_decoder_cross", "text_decoder"])
            models["onnxruntime fp32"] = blipkit.load(out)
            head = dict(float_columns=(cfg.text_config.vocab_size,))  # as the export: the vocabulary head float
            for label, kw in (("onnxruntime int8 (the export's)", head), ("onnxruntime int8, head int8 too", {}),
                              ("onnxruntime int8, block 128", dict(block_size=128, **head)),
                              ("onnxruntime int8, float activations", dict(accuracy_level=0, **head)),
                              ("onnxruntime dynamic int8", None)):
                models[label] = blipkit.load(_onnx_int8(out, Path(tmp) / label.replace(" ", "-"), kw))

        def run(key: str, m, n: int):
            kernel = "torch" if "torch kernel" in key else quantize.kernel()
            return _on_kernel(kernel, lambda: m.caption(feats, **_forced(n)))

        for k, m in models.items():  # first call: inductor compiles its int8 products here (per layer and rows)
            t = time.perf_counter()
            for n in (N + 1, 1):
                run(k, m, n)
            print(f"  first captions {k:<36} {time.perf_counter() - t:7.1f} s", flush=True)
        fns = {"transformers fp32": lambda n: ref.generate(pixel_values=image, **_forced(n))}
        fns.update({k: functools.partial(run, k, m) for k, m in models.items()})
        report("BLIP-base greedy decoding", per_token(fns), "transformers fp32")
        same = [k for k, m in models.items() if run(k, m, N) == fp32.caption(feats, **_forced(N))]
        print(f"  same {N}-token caption as blipkit fp32: {', '.join(same)}")
        _floor(models.get(int8) or blipkit.load(tmp, quantize="int8"), feats.shape[1])


def _onnx_int8(src: Path, dst: Path, kw: dict | None) -> Path:
    """A copy of the float export `src` whose text_decoder step has int8 weights: blipkit's weight-only MatMulNBits
    with the settings `kw` (`weight_only_int8`'s), or onnxruntime's dynamic int8 (activations quantized per tensor)
    when `kw` is None."""
    import shutil

    import onnx

    from blipkit.export.onnx import weight_only_int8

    shutil.copytree(src, dst)
    path = dst / "text_decoder.onnx"
    if kw is None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src / path.name), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    else:
        model = onnx.load(str(path))
        weight_only_int8(model, **kw)
        onnx.save(model, str(path))
    return dst


def _floor(model, image_tokens: int) -> None:
    """Bytes one int8 decoding step reads (weights once, the vocabulary head's too, the cross-attention cache) and
    the time streaming them takes at this machine's one-row float32 matrix-product rate: the bandwidth floor."""
    from blipkit.quantize import BF16_CROSS_CACHE, Int8Linear

    tc = model.config.text_config
    layers = [m for m in model.text_decoder.modules() if isinstance(m, Int8Linear)]
    # cross-attention keys/values are projected once per image, not per token
    per_image = {id(m) for n, m in model.text_decoder.named_modules() if "crossattention" in n and
                 (n.endswith(".key") or n.endswith(".value"))}
    weights = sum(m.weight.numel() + 2 * m.scales.numel() for m in layers if id(m) not in per_image)
    size = 2 if BF16_CROSS_CACHE else 4  # bytes per cached cross-attention key / value
    cache = tc.num_hidden_layers * 2 * image_tokens * tc.hidden_size * size
    rate = memory_bandwidth()
    print(f"  int8 step reads {weights / 1e6:.0f} MB of weights + {cache / 1e6:.0f} MB of cross-attention cache; "
          f"one-row float32 products stream {rate / 1e9:.1f} GB/s here: floor {(weights + cache) / rate * 1e3:.1f} "
          "ms/token", flush=True)


def _blip2(lm: str):
    """A BLIP-2 with a tiny vision tower and Q-Former and a full-size language model (random weights)."""
    from tests.test_blip2 import gpt2_tokenizer, t5_tokenizer, tiny_config

    tok = gpt2_tokenizer() if lm == "opt" else t5_tokenizer()
    cfg = tiny_config(lm, tok)
    if lm == "opt":  # OPT-125m
        big = dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272,
                   word_embed_proj_dim=768, max_position_embeddings=2048)
    else:  # Flan-T5-base
        big = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                   vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128)
    for k, v in big.items():
        setattr(cfg.text_config, k, v)
    return cfg, tok


def blip2() -> None:
    from transformers import Blip2ForConditionalGeneration

    import blipkit

    for lm in ("opt", "t5"):
        torch.manual_seed(0)
        cfg, tok = _blip2(lm)
        with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
            ref = Blip2ForConditionalGeneration(cfg).eval()
            ref.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            pixels = torch.randn(1, 3, 32, 32)
            fns = {"transformers fp32": lambda n, r=ref, x=pixels: r.generate(pixel_values=x, **_forced(n))}
            for q in (None, "bf16", "int8"):
                m = blipkit.load(tmp, quantize=q)
                fns[f"blipkit {q or 'fp32'}"] = lambda n, m=m, x=pixels: m.caption(x, **_forced(n))
            name = "OPT-125m" if lm == "opt" else "Flan-T5-base"
            report(f"BLIP-2 {name} greedy decoding (random weights)", per_token(fns), "transformers fp32")


def bulk(n_images: int = 64, batches: tuple[int, ...] = (8, 16, 32), layers: int = 12, repeat: int = 1,
         bf16_vision: bool = False, vision: bool = True) -> None:
    """Captions/s over `n_images` at several batch sizes: transformers' batched generate vs blipkit."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    import blipkit
    from blipkit.quantize import quantize
    from tests.conftest import blip_tokenizer

    torch.manual_seed(0)
    cfg = BlipConfig(text_config=dict(num_attention_heads=12, num_hidden_layers=layers),
                     vision_config=dict(image_size=384, num_hidden_layers=layers))
    kw = _forced(20)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        ref = BlipForConditionalGeneration(cfg).eval()
        ref.save_pretrained(tmp)
        blip_tokenizer().save_pretrained(tmp)
        images = torch.randn(n_images, 3, 384, 384)
        variants = {"blipkit fp32": blipkit.load(tmp), "blipkit int8 decoder": blipkit.load(tmp, quantize="int8")}
        if bf16_vision:  # bfloat16 GEMMs are slower than float32 ones on CPUs without native bf16: off by default
            variants["blipkit int8 decoder + bf16 vision"] = quantize(blipkit.load(tmp, quantize="int8"), "bf16",
                                                                      ["vision_model"])
        print(f"bulk captioning, {n_images} images at 384 px, greedy {kw['max_new_tokens']} tokens, "
              f"{layers}-layer towers", flush=True)
        fns = {"transformers fp32": lambda x: ref.generate(pixel_values=x, **kw)}
        fns.update({k: (lambda x, m=m: m.caption(x, **kw)) for k, m in variants.items()})
        # what bounds it: the vision towers alone over the same images (batch-size independent, once)
        towers = {"transformers vision": lambda x: ref.vision_model(pixel_values=x),
                  "blipkit vision": lambda x: variants["blipkit fp32"].image_features(x)}
        b0 = batches[0]
        for k, f in towers.items() if vision else ():
            f(images[:b0])  # warm-up
            t = time.perf_counter()
            for s in range(0, n_images, b0):
                f(images[s : s + b0])
            t = time.perf_counter() - t
            print(f"  batch {b0:>2}  {k:<36} {t:6.1f} s for {n_images} images ({n_images / t:5.2f} images/s)",
                  flush=True)
        for b in batches:
            for fn in fns.values():  # warm-up: one batch of this size
                fn(images[:b])
            best = [float("inf")] * len(fns)
            for _ in range(repeat):  # interleaved rounds over all images
                for i, fn in enumerate(fns.values()):
                    t = time.perf_counter()
                    for s in range(0, n_images, b):
                        fn(images[s : s + b])
                    best[i] = min(best[i], time.perf_counter() - t)
            for k, t in zip(fns, best, strict=True):
                print(f"  batch {b:>2}  {k:<36} {n_images / t:6.2f} captions/s   {best[0] / t:5.2f}x transformers",
                      flush=True)


def quality(limit: int | None = None, only: list[str] | None = None) -> None:
    """Shipped models on their test split (scenes seed 0, 1000 images): captions identical to float32, metric changes,
    ITC / ITM cosine to float32; int8 and bf16 weights in torch, and the int8 ONNX export on onnxruntime (its decoding
    tower's weights in int8 blocks; the other towers float32)."""
    import blipkit
    from blipkit import quantize
    from blipkit.data.scenes import write_dataset
    from blipkit.export import export_onnx
    from blipkit.train.eval import evaluate

    # the shipped models' layers are small: send them through the kernel that large models' int8 layers use
    quantize.MIN_COMPILED = 0
    print(f"int8 kernel: {quantize.kernel()}", flush=True)
    cos = torch.nn.functional.cosine_similarity
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "scenes"
        write_dataset(root, 0, 0, 1000, seed=0, progress=False)  # the test split of the shipped models' cards
        for name, tasks in (("scenes-blip", ("retrieval", "caption", "vqa")), ("scenes-blip2-opt", ("caption",))):
            ref = blipkit.load(name)
            base = evaluate(ref, root, "test", tasks, limit=limit)
            print(f"{name} fp32: " + ", ".join(f"{k} {v}" for k, v in base["metrics"].items()), flush=True)
            variants = {"int8": lambda n=name: blipkit.load(n, quantize="int8"),
                        "bf16": lambda n=name: blipkit.load(n, quantize="bf16"),
                        "onnxruntime int8": lambda n=name, r=ref: blipkit.load(export_onnx(r, Path(tmp) / n,
                                                                                           quantize="int8"))}
            for label, make in variants.items():
                if only and label not in only:
                    continue
                m = make()
                got = evaluate(m, root, "test", tasks, limit=limit)
                same = sum(a["caption"] == b["caption"] for a, b in zip(got["captions"], base["captions"], strict=True))
                n = len(base["captions"])
                delta = {k: round(got["metrics"][k] - v, 2) for k, v in base["metrics"].items() if k in got["metrics"]}
                worst = max(delta, key=lambda k: abs(delta[k]))
                line = (f"  {label:<17} captions identical to fp32: {same}/{n} ({100 * same / n:.1f} %), "
                        f"largest metric change {worst} {delta[worst]:+.2f}")
                if name == "scenes-blip":
                    images = [str(root / "images" / "test" / f"{i:06d}.png") for i in range(50)]
                    texts = [e["caption"][0] for e in json.loads((root / "annotations" / "test.json").read_text())[:50]]
                    sim = cos(m.similarity(images, texts).flatten(), ref.similarity(images, texts).flatten(), dim=0)
                    itm = cos(m.itm_logits(images, texts).flatten(), ref.itm_logits(images, texts).flatten(), dim=0)
                    line += f", ITC cosine {float(sim):.6f}, ITM logit cosine {float(itm):.6f}"
                print(line, flush=True)
                print("    " + ", ".join(f"{k} {v:+.2f}" for k, v in delta.items()), flush=True)


def compiled() -> None:
    """torch.compile of the BLIP-base vision tower (the one tower with fixed shapes) on CPU."""
    from transformers import BlipConfig, BlipForConditionalGeneration

    from blipkit.export.towers import VisionTower

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        import blipkit
        from tests.conftest import blip_tokenizer

        BlipForConditionalGeneration(BlipConfig(vision_config=dict(image_size=384))).save_pretrained(tmp)
        blip_tokenizer().save_pretrained(tmp)
        tower = VisionTower(blipkit.load(tmp)).eval()
        x = torch.randn(4, 3, 384, 384)
        t0 = time.perf_counter()
        fast = torch.compile(tower)
        fast(x)
        warm = time.perf_counter() - t0
        eager, comp = compare(lambda: tower(x), lambda: fast(x))
        diff = float((tower(x)[0] - fast(x)[0]).abs().max())
        print(f"vision tower, 4 images: eager {eager:.3f} s, compiled {comp:.3f} s ({eager / comp:.2f}x), "
              f"first call {warm:.1f} s, max |difference| {diff:.1e}")


class _FbgemmInt8(torch.nn.Module):
    """fbgemm's dynamic int8 linear (activations quantized per call): a kernel compared in `kernels`, not used."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.k, self.n = w.shape[1], w.shape[0]
        scales = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        q = torch.quantize_per_channel(w, scales, torch.zeros(self.n, dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None if linear.bias is None else linear.bias.detach())

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x.reshape(-1, self.k), self.packed, True).view(*x.shape[:-1], self.n)


class _FbgemmFP16(_FbgemmInt8):
    """fbgemm's float16-weight linear (activations stay float32): a kernel compared in `kernels`, not used."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        torch.nn.Module.__init__(self)
        self.k, self.n = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        self.packed = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach().float(), bias)

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic_fp16(x.reshape(-1, self.k), self.packed).view(*x.shape[:-1], self.n)


def _on_kernel(name: str, fn):
    """fn() with blipkit's int8 layers on kernel `name` ("torch" or "inductor")."""
    from blipkit import quantize

    was, quantize.KERNEL = quantize.KERNEL, name
    try:
        return fn()
    finally:
        quantize.KERNEL = was


def kernels(rounds: int = 10) -> None:
    """One cached step of the BLIP-base text decoder (12 layers, 577 image tokens, 10 tokens so far) with its linear
    layers on each kernel: why int8 weights gain what they gain on this CPU."""
    import copy
    import time
    import warnings

    from blipkit.config import TextConfig
    from blipkit.quantize import BF16Linear, Int8Linear, _swap, _vocab_head
    from blipkit.text import TextLMHeadModel

    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512)
    fp32 = TextLMHeadModel(cfg).eval()

    def swapped(convert, exact_head: bool = True) -> torch.nn.Module:
        m = copy.deepcopy(fp32)
        head = _vocab_head(m)
        linear = getattr(*head)
        _swap(m, convert)
        if exact_head:  # as quantize() does: the vocabulary head recomputes its top scores in float
            setattr(*head, Int8Linear.from_linear(linear, keep_exact=True))
        return m

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notes on quantized tensors
        models = {"fp32": fp32, "int8 (torch kernel)": swapped(Int8Linear.from_linear),
                  "int8 (inductor kernel)": swapped(Int8Linear.from_linear),
                  "bf16 weights": swapped(BF16Linear.from_linear, exact_head=False),
                  "fbgemm int8 dynamic": swapped(_FbgemmInt8), "fbgemm fp16 weights": swapped(_FbgemmFP16, False)}
    ctx = torch.randn(1, 577, 768)
    ids, mask, pos = torch.tensor([[1000]]), torch.ones(1, 11, dtype=torch.long), torch.tensor([[10]])
    with torch.inference_mode():
        fns = {}
        for k, m in models.items():
            _, cache = m(torch.arange(100, 110)[None], context=ctx)
            step = lambda m=m, c=cache: m(ids, attention_mask=mask, cache=c, positions=pos)  # noqa: E731
            fns[k] = functools.partial(_on_kernel, "inductor" if "inductor" in k else "torch", step)
        best = dict.fromkeys(fns, float("inf"))
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            print(f"  first step {k:<28} {time.perf_counter() - t:7.2f} s", flush=True)
        for _ in range(rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t)
    print(f"BLIP-base decoder step ({torch.backends.cpu.get_cpu_capability()}), best of {rounds}")
    for k, t in best.items():
        print(f"  {k:<28} {t * 1000:7.1f} ms/step   {best['fp32'] / t:5.2f}x fp32", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    figures = ["decode", "blip2", "bulk", "quality", "compile", "kernels"]
    parser.add_argument("what", nargs="*", default=figures, choices=figures)
    parser.add_argument("--images", type=int, default=64, help="images for the bulk figure")
    parser.add_argument("--batches", default="8,16,32", help="batch sizes for the bulk figure (default: 8,16,32)")
    parser.add_argument("--no-vision", action="store_true", help="bulk: leave out the vision towers' own times")
    parser.add_argument("--bf16-vision", action="store_true", help="bulk: also int8 decoder + bf16 vision")
    parser.add_argument("--limit", type=int, default=None, help="test images for the quality figure (default: all)")
    parser.add_argument("--variants", default=None,
                        help="quality: comma-separated subset of int8,bf16,onnxruntime int8 (default: all)")
    parser.add_argument("--no-onnx", action="store_true", help="decode: leave out the onnxruntime rows")
    parser.add_argument("--onnx-only", action="store_true",
                        help="decode: transformers and the onnxruntime rows only (no blipkit torch rows)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for what in args.what:
        run = {"decode": lambda: decode(not args.no_onnx, not args.onnx_only), "blip2": blip2,
               "quality": lambda: quality(args.limit, args.variants and args.variants.split(",")), "compile": compiled,
             "kernels": kernels, "bulk": lambda: bulk(args.images, tuple(int(b) for b in args.batches.split(",")),
                                         bf16_vision=args.bf16_vision, vision=not args.no_vision)}
        run[what]()


if __name__ == "__main__":
    main()
