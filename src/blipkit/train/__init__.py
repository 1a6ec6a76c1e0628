"""Training and evaluation of BLIP: objectives, data readers, the loop, metrics, and the `train` / `eval` commands.

    from blipkit.train import TrainConfig, train, evaluate
    from blipkit.train.data import load_items
    items = load_items("data/scenes", "train").items
    train(model, items, TrainConfig(out="runs/x", steps=1000))
    evaluate(blipkit.load("runs/x"), "data/scenes", "test")["metrics"]
"""

from .eval import evaluate
from .loop import TrainConfig, TrainResult, train
from .model import ARCHS, scratch_model
from .vocab import build_tokenizer

__all__ = ["ARCHS", "TrainConfig", "TrainResult", "build_tokenizer", "evaluate", "scratch_model", "train"]
