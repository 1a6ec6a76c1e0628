"""blipkit vs transformers on identical BLIP-base weights and inputs, one run, printing ratios.

    python benchmarks/bench_blip.py            # full BLIP-base size (ViT-B/16 at 384 px, 12-layer text stack)
    python benchmarks/bench_blip.py --small    # a quick mid-size run

Measures: image embeddings (fp32 and bf16, with cosine to fp32), ITM of one image against 100 texts,
greedy caption decoding (tokens/s), and the import time of blipkit beyond torch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import memory_bandwidth, row, streamed_bytes, timed  # noqa: E402


def decode_bytes(model, context_tokens: int) -> int:
    """Bytes one greedy decoding step must read: the decoder's weights and the image's cross-attention keys/values."""
    tc = model.config.text_config
    return streamed_bytes(model.text_decoder) + tc.num_hidden_layers * 2 * context_tokens * tc.hidden_size * 4


def vision_tokens(model) -> int:
    """Patch tokens + class token the decoder attends to."""
    vc = model.config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def import_cost() -> float:
    """Seconds `import blipkit` adds after `import torch` (median of 5 fresh interpreters)."""
    code = "import time, torch; t=time.perf_counter(); import blipkit; print(time.perf_counter()-t)"
    runs = sorted(float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(5))
    return runs[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="6-layer towers at 224 px instead of BLIP-base")
    args = parser.parse_args()
    from conftest import blip_tokenizer
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipForImageTextRetrieval

    import blipkit

    torch.manual_seed(0)
    layers, size = (6, 224) if args.small else (12, 384)
    cfg = BlipConfig(
        text_config=dict(num_attention_heads=12, num_hidden_layers=layers),
        vision_config=dict(image_size=size, num_hidden_layers=layers),
    )
    tok = blip_tokenizer()
    texts = [f"a photo of {n} dogs playing with a red ball number {n}" for n in range(100)]
    pixels = torch.randn(4, 3, size, size)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, layers {layers}, image {size}px")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref = BlipForImageTextRetrieval(cfg).eval()
        ref.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        ours = blipkit.load(tmp)
        ours_bf16 = blipkit.load(tmp, dtype="bfloat16")
        ref_bf16 = BlipForImageTextRetrieval.from_pretrained(tmp, dtype=torch.bfloat16).eval()

        t_ours = timed(lambda: ours.encode_images(pixels))
        t_ref = timed(lambda: ref.vision_model(pixel_values=pixels))
        row("image embeddings, 4 images, fp32", t_ours / 4, t_ref / 4, "s/img")
        t_ours16 = timed(lambda: ours_bf16.encode_images(pixels))
        t_ref16 = timed(lambda: ref_bf16.vision_model(pixel_values=pixels.bfloat16()))
        row("image embeddings, 4 images, bf16 (vs tf fp32)", t_ours16 / 4, t_ref / 4, "s/img")
        row("image embeddings, 4 images, bf16 (vs tf bf16)", t_ours16 / 4, t_ref16 / 4, "s/img")
        cos = torch.nn.functional.cosine_similarity(ours.encode_images(pixels), ours_bf16.encode_images(pixels).float())
        print(f"{'  bf16 vs fp32 embedding cosine (min)':<46} {float(cos.min()):.5f}")

        enc = tok(texts, padding=True, return_tensors="pt")
        feats = ref.vision_model(pixel_values=pixels[:1]).last_hidden_state
        atts = torch.ones(feats.shape[:-1], dtype=torch.long)

        def ref_itm():  # the reference with cached image features: one batched call over the 100 pairs
            h = ref.text_encoder(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                encoder_hidden_states=feats.expand(100, -1, -1),
                encoder_attention_mask=atts.expand(100, -1),
            ).last_hidden_state
            return ref.itm_head(h[:, 0])

        ours_feats = ours.image_features(pixels[:1])
        t_ours = timed(lambda: ours.match(ours_feats, texts), 2)
        t_ref = timed(ref_itm, 2)
        row("ITM 1 image x 100 texts (cached features)", t_ours, t_ref)
        diff = (ours.itm_logits(ours_feats, texts)[0] - ref_itm()).abs().max()
        print(f"{'  max |logit difference|':<46} {float(diff):.2e}")

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        ref = BlipForConditionalGeneration(cfg).eval()
        ref.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        ours = blipkit.load(tmp)
        n_new = 30
        kw = dict(num_beams=1, max_new_tokens=n_new, min_new_tokens=n_new)
        image = pixels[:1]
        t_ours = timed(lambda: ours.caption(image, **kw), 2)
        t_ref = timed(lambda: ref.generate(pixel_values=image, **kw), 2)
        vision = timed(lambda: ours.image_features(image), 2)
        row("greedy caption, 30 tokens", n_new / t_ours, n_new / t_ref, "tok/s", higher_is_better=True)
        print(
            f"{'  per token excl. vision, blipkit / tf':<46} {(t_ours - vision) / n_new * 1000:.1f} ms / "
            f"{(t_ref - vision) / n_new * 1000:.1f} ms"
        )
        floor = decode_bytes(ours, vision_tokens(ours)) / memory_bandwidth()
        ref_ms = (t_ref - vision) / n_new
        print(
            f"{'  per-token floor at measured memory bandwidth':<46} {floor * 1000:.1f} ms "
            f"(fp32 weights; best possible ratio on this machine {ref_ms / floor:.2f}x)"
        )
        same = ours.caption(image, **kw)[0] == tok.decode(
            ref.generate(pixel_values=image, **kw)[0], skip_special_tokens=True
        )
        print(f"{'  same caption as transformers':<46} {same}")
    print(f"{'import blipkit beyond torch':<46} {import_cost():.3f} s")


if __name__ == "__main__":
    main()
