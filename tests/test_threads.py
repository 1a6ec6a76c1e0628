"""Concurrent calls on one model: attention maps, GradCAM and grounding from several threads, while other threads
match and caption with the same model, give exactly the single-threaded results.

What a call records (attention probabilities) belongs to that call alone (`layers.recording`); nothing is kept on
the shared modules, so no thread can read another's maps or find its own missing.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from blipkit import tasks

from .test_tasks import TEXTS, scene_files, tiny_blip, tiny_blip2

pytestmark = pytest.mark.usefixtures("one_thread")  # deterministic kernels: equal results, bit for bit
ROUNDS = 4  # each round runs every job once in a pool of WORKERS threads (the old shared state failed in round 1)
WORKERS = 4
BACKGROUND = 2  # threads running match / caption on the same model all along


def jobs(model, images) -> dict[tuple[str, int, int], object]:
    """Every (task, image, text) the test runs, as zero-argument calls returning plain tensors and numbers."""
    out = {}
    blip = model.family == "BLIP"
    for i, image in enumerate(images):
        for j, text in enumerate(TEXTS[:2] if i % 2 else TEXTS[2:]):
            out["maps", i, j] = lambda im=image, t=text: tasks.cross_attention_maps(model, im, t if blip else None).maps
            out["gradcam", i, j] = lambda im=image, t=text: tasks.gradcam(model, im, t).token_maps
            out["ground", i, j] = lambda im=image, t=text: torch.tensor(tasks.ground(model, im, t).box)
    return out


def background(model, images, stop: threading.Event, done: list[int]) -> None:
    """match (and caption, for BLIP) in a loop until told to stop; every result checked against the first."""
    first_match = model.match(images[0], TEXTS)
    short = dict(num_beams=1, max_new_tokens=4, min_new_tokens=1)
    first_caption = model.caption(images[1], **short) if model.family == "BLIP" else None
    while not stop.is_set():
        assert torch.equal(model.match(images[0], TEXTS), first_match)
        if first_caption is not None:
            assert model.caption(images[1], **short) == first_caption
        done[0] += 1


@pytest.fixture(scope="module", params=["BLIP", "BLIP-2"])
def model_and_images(request, tmp_path_factory):
    work = tmp_path_factory.mktemp("threads")
    model = tiny_blip(work) if request.param == "BLIP" else tiny_blip2(work)
    return model, scene_files(work / "scenes", n=3, size=48)


def test_concurrent_maps_equal_single_threaded(model_and_images):
    model, images = model_and_images
    calls = jobs(model, images)
    expected = {key: call() for key, call in calls.items()}  # one thread, nothing else running
    stop, done = threading.Event(), [0]
    with ThreadPoolExecutor(BACKGROUND) as side:
        running = [side.submit(background, model, images, stop, done) for _ in range(BACKGROUND)]
        try:
            with ThreadPoolExecutor(WORKERS) as pool:
                for _ in range(ROUNDS):
                    futures = {key: pool.submit(call) for key, call in calls.items()}
                    for key, future in futures.items():
                        got = future.result()
                        assert torch.equal(got, expected[key]), key  # exactly the single-threaded result
        finally:
            stop.set()
        for f in running:
            f.result()  # the matching / captioning threads saw their own results throughout
    assert done[0] > 0  # they really ran alongside


def test_gradcam_under_inference_mode_and_no_grad(model_and_images):
    """GradCAM takes its gradients itself, whatever the caller's autograd mode, and returns tensors without a graph."""
    model, images = model_and_images
    ref = tasks.gradcam(model, images[0], TEXTS[0])
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            cam = tasks.gradcam(model, images[0], TEXTS[0])
        assert torch.equal(cam.token_maps, ref.token_maps) and not cam.token_maps.requires_grad
    assert all(p.grad is None for p in model.parameters())
