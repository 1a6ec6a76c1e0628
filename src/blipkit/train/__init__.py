"""Training and evaluation: objectives, samples and batches, the loop, metrics (commands: `blipkit.cli.train`).

BLIP trains directly (`train(model, ...)`); the BLIP-2 stages and the small language model are `Recipe`s for the
same loop (`blip2_stages`, `lm`; see docs/training.md).

    from blipkit.train import TrainConfig, train, evaluate
    from blipkit.data.readers import load_items
    items = load_items("data/scenes", "train").items
    train(model, items, TrainConfig(out="runs/x", steps=1000))
    evaluate(blipkit.load("runs/x"), "data/scenes", "test")["metrics"]
"""

from .eval import evaluate
from .loop import Recipe, TrainConfig, TrainResult, train
from .model import ARCHS, scratch_model
from .vocab import build_tokenizer

__all__ = ["ARCHS", "Recipe", "TrainConfig", "TrainResult", "build_tokenizer", "evaluate", "scratch_model", "train"]
