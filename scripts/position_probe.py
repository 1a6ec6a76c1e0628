"""Do a model's image features say where objects are? Train its question encoder and answer decoder on position
questions over frozen image features, and report the validation accuracy as it trains.

    python scripts/position_probe.py MODEL --data data/scenes [--train 4000] [--steps 400] [--lr 2e-4]

The image encoder runs once (no gradient); a copy of the text towers then learns "where is the red circle?" ->
left / right / top / bottom from the cached features, batch 64, and every 100 steps each validation question is
answered by the most likely of the four answers under the answer decoder. When the features carry position this
climbs far above chance (25 %) within a few hundred steps; when it stays at chance, no recipe downstream of the image
encoder can answer position questions (MODEL_CARD.md, "Why the targets are not all reached").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

import blipkit
from blipkit.train.losses import lm_loss

ANSWERS = ("left", "right", "top", "bottom")


def questions(root: Path, split: str, limit: int | None = None) -> list[dict]:
    entries = json.loads((root / "annotations" / f"{split}_vqa.json").read_text())
    return [q for q in entries if q["question_type"] == "position"][:limit]


@torch.inference_mode()
def features(model, root: Path, entries: list[dict]) -> torch.Tensor:
    out = []
    for i in range(0, len(entries), 128):
        images = [Image.open(root / q["image"]).convert("RGB") for q in entries[i:i + 128]]
        out.append(model.vision_model(model.processor(images)))
    return torch.cat(out)


def encode(model, entries: list[dict], feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = model.tokenizer([q["question"] for q in entries], max_length=32)
    if model.enc_token:
        ids = ids.clone()
        ids[:, 0] = model.tokenizer.enc_token_id
    states, _ = model.text_encoder(ids, mask, context=feats)
    return states, mask


def decode(model, states: torch.Tensor, q_mask: torch.Tensor, answers: list[str]):
    ids, mask = model.tokenizer(answers, max_length=8)
    ids = ids.clone()
    ids[:, 0] = model.config.text_config.bos_token_id
    logits, _ = model.text_decoder(ids, attention_mask=mask, context=states, context_mask=q_mask)
    return logits, ids, mask


@torch.no_grad()
def accuracy(model, entries: list[dict], feats: torch.Tensor) -> float:
    right = 0
    for i in range(0, len(entries), 64):
        batch = entries[i:i + 64]
        states, q_mask = encode(model, batch, feats[i:i + 64])
        scores = []
        for answer in ANSWERS:
            logits, ids, mask = decode(model, states, q_mask, [answer] * len(batch))
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            scores.append((logp * mask[:, 1:]).sum(1))
        best = torch.stack(scores, 1).argmax(1).tolist()
        right += sum(ANSWERS[b] in q["answer"] for b, q in zip(best, batch, strict=True))
    return right / len(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="a scenes dataset (blipkit.data.scenes.write_dataset)")
    parser.add_argument("--train", type=int, default=4000, help="training position questions (default 4000)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    root = Path(args.data)
    model = blipkit.load(args.model)
    train, val = questions(root, "train", args.train), questions(root, "val")
    f_train, f_val = features(model, root, train), features(model, root, val)
    print(f"{len(train)} training and {len(val)} validation position questions; step 0: "
          f"{100 * accuracy(model, val, f_val):.1f} %", flush=True)
    params = [p.requires_grad_() for p in (*model.text_encoder.parameters(), *model.text_decoder.parameters())]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    for step in range(1, args.steps + 1):
        rows = torch.randint(len(train), (64,))
        batch = [train[i] for i in rows.tolist()]
        states, q_mask = encode(model, batch, f_train[rows])
        logits, ids, mask = decode(model, states, q_mask, [q["answer"][0] for q in batch])
        loss = lm_loss(logits, ids, mask, 0.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f}, validation {100 * accuracy(model, val, f_val):.1f} %",
                  flush=True)


if __name__ == "__main__":
    main()
