"""blipkit vs transformers on identical BLIP-2 weights and inputs, printing ratios (> 1 means blipkit is faster).

    python benchmarks/bench_blip2.py                          # everything (20-30 minutes on 2 busy cores)
    python benchmarks/bench_blip2.py --only retrieval generation
    python benchmarks/bench_blip2.py --only loading --rss-gb 6
    python benchmarks/bench_blip2.py --no-itm-naive           # skip the slow reference ITM run (ViT per text)

Mid-size config (fits 2 cores): ViT 768 wide x 12 layers at 224 px (257 tokens), the real Q-Former (768 wide,
12 layers, 32 queries, cross-attention every 2nd layer), OPT-125m-sized and Flan-T5-small-sized language models
with their real vocabularies (and 4-layer versions of them, where per-step overhead shows). Measures Q-Former
features, ITM of one image against 100 texts, greedy generation tokens/s (OPT and T5), and the peak RSS of loading
a multi-GB random checkpoint in bfloat16 and float32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402
from common import compare, memory_bandwidth, streamed_bytes, timed  # noqa: E402


def row(name: str, ours: float, ref: float, unit: str = "s", higher_is_better: bool = False) -> None:
    common.row(name, ours, ref, unit, higher_is_better, width=52)


def mid_config(lm: str, tok, small_lm: bool = False):
    """A transformers Blip2Config of the benchmark's mid size ("opt", "t5" or "itm"); optionally a 4-layer LM."""
    from transformers import Blip2Config

    vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=14)  # fmt: skip
    qformer = dict(vocab_size=30523, use_qformer_text_input=lm == "itm")
    image_token = None if lm == "itm" else tok.convert_tokens_to_ids("<image>")
    text = {
        "opt": dict(model_type="opt", vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072,
                    num_attention_heads=12, word_embed_proj_dim=768),
        "t5": dict(model_type="t5", vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, bos_token_id=1),
        "itm": None,
    }[lm]  # fmt: skip
    if small_lm and lm == "opt":
        text.update(hidden_size=256, num_hidden_layers=4, ffn_dim=1024, num_attention_heads=4, word_embed_proj_dim=256)
    elif small_lm and lm == "t5":
        text.update(d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8)
    return Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, image_token_index=image_token)


def build(lm: str, directory: str, small_lm: bool = False):
    """Random reference model saved with its tokenizer; returns (blipkit model, reference model, tokenizer)."""
    from transformers import Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    import blipkit
    from tests.test_blip2 import gpt2_tokenizer, itm_tokenizer, t5_tokenizer

    tok = {"opt": gpt2_tokenizer, "t5": t5_tokenizer, "itm": itm_tokenizer}[lm]()
    cls = Blip2ForImageTextRetrieval if lm == "itm" else Blip2ForConditionalGeneration
    torch.manual_seed(0)
    ref = cls(mid_config(lm, tok, small_lm)).eval()
    ref.save_pretrained(directory)
    tok.save_pretrained(directory)
    return blipkit.load(directory), cls.from_pretrained(directory).eval(), tok


def bench_retrieval(naive: bool, repeat: int) -> None:
    """Q-Former features and ITM of one image against 100 texts."""
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ours, ref, tok = build("itm", tmp)
        pixels = torch.randn(4, 3, 224, 224)

        def ref_qformer(px):
            image = ref.vision_model(pixel_values=px).last_hidden_state
            return ref.qformer(query_embeds=ref.query_tokens.expand(px.shape[0], -1, -1), encoder_hidden_states=image)

        t_ours, t_ref = compare(lambda: ours.qformer_features(pixels), lambda: ref_qformer(pixels), repeat=repeat)
        row("Q-Former features, 4 images (ViT + Q-Former)", t_ours / 4, t_ref / 4, "s/img")
        diff = (ours.qformer_features(pixels) - ref_qformer(pixels).last_hidden_state).abs().max()
        print(f"{'  max |difference|':<52} {float(diff):.2e}")

        texts = [f"a photo of {n} dogs playing with a red ball near tree number {n}" for n in range(100)]
        enc = tok(texts, padding=True, return_tensors="pt")
        image = pixels[:1]

        def ref_cached():  # the reference's ITM pass with the image encoded once and its features repeated
            feats = ref.vision_model(pixel_values=image).last_hidden_state.expand(100, -1, -1)
            queries = ref.query_tokens.expand(100, -1, -1)
            x = ref.embeddings(input_ids=enc.input_ids, query_embeds=queries)
            mask = torch.cat([torch.ones(100, queries.shape[1], dtype=torch.long), enc.attention_mask], dim=1)
            h = ref.qformer(query_embeds=x, query_length=queries.shape[1], attention_mask=mask,
                            encoder_hidden_states=feats).last_hidden_state  # fmt: skip
            return ref.itm_head(h[:, : queries.shape[1]]).mean(dim=1)

        def ref_call():  # the reference as it is called: one (image, text) pair per row, so one ViT pass per text
            out = ref(pixel_values=image.expand(100, -1, -1, -1), input_ids=enc.input_ids,
                      attention_mask=enc.attention_mask, use_image_text_matching_head=True)  # fmt: skip
            return out.logits_per_image

        t_ours, t_cached = compare(lambda: ours.match(image, texts), ref_cached, repeat=repeat)
        row("ITM 1 image x 100 texts (tf: image encoded once)", t_ours, t_cached)
        if naive:
            t_call = timed(ref_call, 1)
            row("ITM 1 image x 100 texts (tf: as called, ViT per pair)", t_ours, t_call)
        diff = (ours.itm_logits(image, texts)[0] - ref_cached()).abs().max()
        print(f"{'  max |logit difference|':<52} {float(diff):.2e}")


def bench_generation(lm: str, repeat: int, small_lm: bool = False) -> None:
    """Greedy tokens/s of `generate` with an instruction prompt (ViT and Q-Former included), and per new token.

    Runs of 1 and 33 new tokens are interleaved; the time per token after the first is their difference, which
    leaves out the image encoding and the prompt's prefill.
    """
    from blipkit.generate import GenerationConfig

    n_new, prompt = 33, "Question: what is in the picture? Answer:"
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ours, ref, tok = build(lm, tmp, small_lm)
        image = torch.randn(1, 3, 224, 224)
        ids = torch.tensor([[ours.config.image_token_index] * ours.config.num_query_tokens + tok(prompt).input_ids])

        def runs(n: int):
            kw = dict(max_new_tokens=n, min_new_tokens=n, num_beams=1)
            return (
                lambda: ours.generate(image, prompt, **kw),
                lambda: ref.generate(pixel_values=image, input_ids=ids, **kw),
            )

        one_ours, one_ref, all_ours, all_ref = compare(*runs(1), *runs(n_new), repeat=repeat)
        name = f"greedy generation {lm.upper()}{' (4-layer LM)' if small_lm else ''}, {n_new} tokens"
        row(name, n_new / all_ours, n_new / all_ref, "tok/s", True)
        per_ours, per_ref = (all_ours - one_ours) / (n_new - 1), (all_ref - one_ref) / (n_new - 1)
        row("  per token after the first", per_ours * 1000, per_ref * 1000, "ms")
        weights = streamed_bytes(ours.language_model)
        if weights > 256 * 2**20:  # smaller weights stay in the caches between tokens: no memory-bound floor
            floor = weights / memory_bandwidth()
            print(f"{'  per-token floor at measured memory bandwidth':<52} {floor * 1000:.1f} ms (the LM's weights; "
                  f"best possible ratio on this machine {per_ref / floor:.2f}x)")
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, num_beams=1)
        got, _ = ours._generate(image, prompt, GenerationConfig(**kw))
        want = ref.generate(pixel_values=image, input_ids=ids, **kw)[0].tolist()
        want = want[1:] if lm == "t5" else want[ids.shape[1] :]
        print(f"{'  same tokens as transformers':<52} {got.tokens[0] == want}")


def write_checkpoint(directory: Path, gigabytes: float) -> float:
    """A random float32 BLIP-2 OPT checkpoint (real ViT-g and Q-Former, OPT sized to reach `gigabytes`), sharded.

    Returns the size in GB of its weights in bfloat16 (the Q-Former counted in float32, as it is loaded).
    """
    from safetensors.torch import save_file

    from blipkit.blip2 import Blip2
    from blipkit.blip2_config import Blip2Config
    from blipkit.lm import OPTConfig
    from tests.test_blip2 import gpt2_tokenizer

    base = Blip2Config()  # ViT-g/14 at 224 px and the Q-Former, ~1.1 B parameters
    layers = max(1, round((gigabytes * 2**30 / 4 - 1.1e9) / (12 * 2048**2)))
    base.text_config = OPTConfig(
        vocab_size=50272, hidden_size=2048, num_hidden_layers=layers, ffn_dim=8192, num_attention_heads=32
    )
    tok = gpt2_tokenizer()
    base.image_token_index = tok.convert_tokens_to_ids("<image>")
    with torch.device("meta"):
        model = Blip2(base)
    directory.mkdir(parents=True, exist_ok=True)
    shard, size, files, weight_map, bf16 = {}, 0, 0, {}, 0.0
    gen = torch.Generator().manual_seed(0)

    def flush():
        nonlocal shard, size, files
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, files = {}, 0, files + 1

    for name, p in model.named_parameters():
        shard[name] = torch.randn(p.shape, generator=gen) * 0.02
        size += p.numel() * 4
        bf16 += p.numel() * (4 if model.keep_float32(name) else 2)
        if size > 2**30:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(base.to_hf()))
    tok.save_pretrained(directory)
    return bf16 / 2**30


def peak_rss(loader: str, directory: Path, dtype: str) -> tuple[float, float]:
    """(peak RSS growth in GB, load seconds) of loading the checkpoint in a fresh process and reading every weight.

    The peak is measured from the RSS after imports (see tests/test_blip2.py `PEAK_RSS`). Reading every weight
    matters: weights kept in their stored dtype may be mapped lazily from the file (both libraries do this), so
    their pages only become resident when used.
    """
    from tests.test_blip2 import PEAK_RSS

    load = {
        "blipkit": f"m = blipkit.load({str(directory)!r}, dtype={dtype!r})",
        "transformers": f"m = Blip2ForConditionalGeneration.from_pretrained({str(directory)!r}, dtype=torch.{dtype})",
    }[loader]
    code = (
        textwrap.dedent("""
        import time, torch, blipkit, blipkit.blip2, blipkit.checkpoint, blipkit.processing, transformers
        from transformers import Blip2ForConditionalGeneration
    """)
        + PEAK_RSS
        + textwrap.dedent(f"""
        before = peak_mb()
        t = time.perf_counter()
        {load}
        t = time.perf_counter() - t
        with torch.no_grad():
            total = sum(float(p.sum()) for p in m.parameters())
        print((peak_mb() - before) / 1024, t)
    """)
    )
    out = subprocess.check_output([sys.executable, "-c", code], text=True, stderr=subprocess.DEVNULL)
    grown, seconds = out.strip().splitlines()[-1].split()
    return float(grown), float(seconds)


def bench_loading(gigabytes: float) -> None:
    """Peak RSS of loading a multi-GB float32 checkpoint straight into bfloat16, and as stored."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        t = time.perf_counter()
        bf16 = write_checkpoint(directory, gigabytes)
        size = sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 2**30
        print(f"wrote a {size:.2f} GB float32 checkpoint in {time.perf_counter() - t:.0f} s (as loaded in bf16: "
              f"{bf16:.2f} GB, the Q-Former kept float32)")  # fmt: skip
        for dtype, target in (("bfloat16", bf16), ("float32", size)):
            ours, t_ours = peak_rss("blipkit", directory, dtype)
            ref, t_ref = peak_rss("transformers", directory, dtype)
            row(f"peak RSS growth, load {dtype} + read all weights", ours, ref, "GB")
            print(f"{'  x the weights as loaded, blipkit / tf':<52} {ours / target:.2f} / {ref / target:.2f}")
            row(f"  load time, {dtype}", t_ours, t_ref, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ("retrieval", "generation", "loading")
    parser.add_argument("--only", nargs="+", choices=parts, default=parts, help="what to measure")
    parser.add_argument("--rss-gb", type=float, default=6.0, help="size of the random checkpoint in GB")
    parser.add_argument("--no-itm-naive", action="store_true", help="skip the reference ITM as called (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved timing rounds (best of)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    if "retrieval" in args.only:
        bench_retrieval(not args.no_itm_naive, args.repeat)
    if "generation" in args.only:
        for small_lm in (False, True):
            bench_generation("opt", args.repeat, small_lm)
            bench_generation("t5", args.repeat, small_lm)
    if "loading" in args.only:
        bench_loading(args.rss_gb)


if __name__ == "__main__":
    main()
