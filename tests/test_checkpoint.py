"""Checkpoint resolution and reading: Hub cache layout, sharded / .bin weights, memory use, offline errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

import blipkit
from blipkit.checkpoint import write_safetensors
from blipkit.errors import CheckpointError


def _hub_cache(tmp_path, src, repo: str):
    """Lay out `src` as huggingface_hub's cache holds a downloaded snapshot of `repo`."""
    root = tmp_path / "hub"
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(src, folder / "snapshots" / commit)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    return root


def test_repo_id_and_preset_load_from_hub_cache(hf_blip_dirs, tmp_path, monkeypatch, photos):
    src = hf_blip_dirs["BlipForImageTextRetrieval"]
    cache = _hub_cache(tmp_path, src, "Salesforce/blip-itm-base-coco")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    local = blipkit.load(src)
    by_repo = blipkit.load("Salesforce/blip-itm-base-coco")
    by_preset = blipkit.load("blip-itm-base-coco")
    with torch.no_grad():
        want = local.match(photos, ["a red circle", "two dogs"])
        assert torch.equal(by_repo.match(photos, ["a red circle", "two dogs"]), want)
        assert torch.equal(by_preset.match(photos, ["a red circle", "two dogs"]), want)


def test_offline_error_names_repo_and_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"Salesforce/blip-vqa-base.*local-dir"):
        blipkit.load("blip-vqa-base")
    with pytest.raises(CheckpointError, match="not a model name"):
        blipkit.load("no-such-model")


def test_sharded_and_bin_weights(hf_blip_dirs, tmp_path, photos):
    from safetensors.torch import load_file, save_file

    src = hf_blip_dirs["BlipForConditionalGeneration"]
    want = blipkit.load(src).caption(photos[0], max_new_tokens=6)
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    sharded = tmp_path / "sharded"
    shutil.copytree(src, sharded)
    (sharded / "model.safetensors").unlink()
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for fname, ks in halves.items():
        save_file({k: sd[k] for k in ks}, str(sharded / fname))
        weight_map.update({k: fname for k in ks})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert blipkit.load(sharded).caption(photos[0], max_new_tokens=6) == want

    binary = tmp_path / "bin"
    shutil.copytree(src, binary)
    (binary / "model.safetensors").unlink()
    torch.save(sd, binary / "pytorch_model.bin")
    assert blipkit.load(binary).caption(photos[0], max_new_tokens=6) == want


def test_unreadable_weights_name_the_file(hf_blip_dirs, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(hf_blip_dirs["BlipForImageTextRetrieval"], d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        blipkit.load(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        blipkit.load(d)


def test_peak_memory_is_about_one_copy(tmp_path):
    """Loading ~400 MB of weights must not hold two copies at once (measured in a fresh process)."""
    from transformers import BlipConfig, BlipForImageTextRetrieval

    from .conftest import blip_tokenizer

    cfg = BlipConfig(
        text_config=dict(num_hidden_layers=6, num_attention_heads=12),
        vision_config=dict(num_hidden_layers=12, image_size=224),
    )
    BlipForImageTextRetrieval(cfg).save_pretrained(tmp_path)
    blip_tokenizer().save_pretrained(tmp_path)
    size_mb = (tmp_path / "model.safetensors").stat().st_size / 2**20
    code = textwrap.dedent(f"""
        import resource, torch, blipkit, blipkit.checkpoint, blipkit.blip, blipkit.processing, safetensors.torch
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        m = blipkit.load({str(tmp_path)!r})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) / 1024)
    """)
    grown = float(subprocess.check_output([sys.executable, "-c", code], text=True).strip().splitlines()[-1])
    assert size_mb > 300
    assert grown < 1.3 * size_mb, f"loading {size_mb:.0f} MB grew peak RSS by {grown:.0f} MB"


def test_saved_weights_follow_the_umask(hf_blip_dirs, tmp_path):
    """safetensors writes files private (0600); a saved model gets the mode of any new file, as others can read it."""
    model = blipkit.load(hf_blip_dirs["BlipForImageTextRetrieval"])
    old = os.umask(0o022)
    try:
        out = blipkit.save(model, tmp_path / "saved")
        head = write_safetensors({"w": torch.ones(2)}, tmp_path / "saved" / "head.safetensors")  # side files too
    finally:
        os.umask(old)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(head.stat().st_mode) == 0o644
