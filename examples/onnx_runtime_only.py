"""Run a `blipkit export ... --format onnx` directory with onnxruntime alone (numpy, Pillow and `tokenizers`; no torch,
no blipkit): ITC similarity and a greedy caption for BLIP, a greedy caption for BLIP-2 OPT.

    blipkit export scenes-blip --format onnx --out scenes-blip-onnx
    python examples/onnx_runtime_only.py scenes-blip-onnx examples/red-circle-blue-square.png "a red circle"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer


def pixels(path: str, pre: dict) -> np.ndarray:
    """The model's preprocessing: RGB, bicubic resize, scale to [0, 1], normalise by mean / std -> (1, 3, H, W)."""
    size = pre["size"]
    image = Image.open(path).convert("RGB").resize((size["width"], size["height"]), Image.BICUBIC)
    x = np.asarray(image, dtype=np.float32) * np.float32(pre["rescale_factor"])
    x = (x - np.array(pre["image_mean"], np.float32)) / np.array(pre["image_std"], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def empty_cache(text: dict, rows: int = 1) -> np.ndarray:
    """A key/value cache with no positions: (rows, layers, 2, heads, 0, head size)."""
    heads = text["num_attention_heads"]
    return np.zeros((rows, text["num_hidden_layers"], 2, heads, 0, text["hidden_size"] // heads), np.float32)


def blip(directory: Path, image: np.ndarray, texts: list[str], tok: Tokenizer, cfg: dict, steps: int) -> None:
    """ITC similarity of the image with each text, then a greedy caption."""
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(directory / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    text = cfg["text_config"]
    feats, image_embeds = session("vision_encoder").run(None, {"pixels": image})
    if texts:
        enc = tok.encode_batch(texts)
        width = max(len(e.ids) for e in enc)
        ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in enc], np.int64)
        mask = np.array([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in enc], np.int64)
        (text_embeds,) = session("text_encoder").run(None, {"input_ids": ids, "attention_mask": mask})
        for t, s in zip(texts, (image_embeds @ text_embeds.T)[0], strict=True):
            print(f"ITC {s:+.3f}  {t}")
    cross_tower = session("text_decoder_cross")  # each layer's cross-attention keys and values, once per image
    cross = dict(zip([o.name for o in cross_tower.get_outputs()], cross_tower.run(None, {"context": feats}),
                     strict=True))
    step = session("text_decoder")
    out, past = [text["bos_token_id"]], empty_cache(text)
    for _ in range(steps):
        n = len(out)
        logits, past = step.run(None, {
            "input_ids": np.array([[out[-1]]], np.int64), "positions": np.array([[n - 1]], np.int64),
            "attention_mask": np.ones((1, n), np.int64), "context_mask": np.ones(feats.shape[:2], np.int64),
            "past_kv": past, **cross})
        nxt = int(logits[0, -1].argmax())
        if nxt == text["sep_token_id"]:
            break
        out.append(nxt)
    print("caption:", tok.decode(out[1:]))


def blip2_opt(directory: Path, image: np.ndarray, tok: Tokenizer, cfg: dict, steps: int) -> None:
    """A greedy caption: the Q-Former's prefix, then the language model one token at a time."""
    def session(name: str) -> ort.InferenceSession:
        return ort.InferenceSession(str(directory / f"{name}.onnx"), providers=["CPUExecutionProvider"])

    text = cfg["text_config"]
    (feats,) = session("vision_encoder").run(None, {"pixels": image})
    (prefix,) = session("qformer").run(None, {"image_features": feats})
    step = session("language_model")
    ids, past, out = [text["bos_token_id"]], empty_cache(text), []
    for i in range(steps):
        pre = prefix if i == 0 else prefix[:, :0]
        length = prefix.shape[1] + len(ids) + len(out)
        logits, past = step.run(None, {
            "prefix_embeds": pre, "input_ids": np.array([ids if i == 0 else out[-1:]], np.int64),
            "attention_mask": np.ones((1, length), np.int64), "past_kv": past})
        nxt = int(logits[0].argmax())
        if nxt == text["eos_token_id"]:
            break
        out.append(nxt)
    print("caption:", tok.decode(out).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("image")
    parser.add_argument("texts", nargs="*")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()
    cfg = json.loads((args.directory / "config.json").read_text())
    pre = json.loads((args.directory / "preprocessor_config.json").read_text())
    tok = Tokenizer.from_file(str(args.directory / "tokenizer.json"))
    tok.no_padding()
    image = pixels(args.image, pre)
    if cfg["model_type"] == "blip":
        blip(args.directory, image, args.texts, tok, cfg, args.max_new_tokens)
    else:
        blip2_opt(args.directory, image, tok, cfg, args.max_new_tokens)


if __name__ == "__main__":
    main()
