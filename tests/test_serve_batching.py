"""Request batching: the Batcher on its own, and many simultaneous requests whose results equal unbatched calls."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

import blipkit  # noqa: E402
from blipkit.errors import InputError  # noqa: E402
from blipkit.serve import Batcher, create_app, jobs  # noqa: E402
from blipkit.serve.batching import gather_wait  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGES = sorted(EXAMPLES.glob("*.png"))
TEXTS = ["a red circle left of a blue square", "a green triangle", "a yellow star", "a purple square",
         "two blue circles", "a yellow circle right of a purple square"]


def gather(batcher: Batcher, kind: str, items: list, run, key=lambda item: ()) -> list:
    """Submit every item at once (from as many threads) and wait for all the results."""
    futures = [batcher.submit_future(kind, item, run, key(item)) for item in items]
    return [f.result(timeout=30) for f in futures]


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), max_batch=st.integers(1, 8), keys=st.integers(1, 3))
def test_batches_respect_the_size_and_the_key_and_results_go_back(n, max_batch, keys):
    seen: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        seen.append(items)
        return [i * 10 for i in items]

    batcher = Batcher(max_batch=max_batch, max_wait_ms=20)
    try:
        assert gather(batcher, "k", list(range(n)), run, key=lambda i: i % keys) == [i * 10 for i in range(n)]
    finally:
        batcher.close()
    assert sorted(i for batch in seen for i in batch) == list(range(n))
    assert all(1 <= len(b) <= max_batch for b in seen)
    assert all(len({i % keys for i in b}) == 1 for b in seen)  # one key per batch
    if max_batch > 1 and n >= 2 * keys * max_batch:
        assert max(len(b) for b in seen) > 1  # queued together, they ran together


def test_a_bad_item_gets_its_own_error_and_the_others_their_results():
    calls: list[int] = []
    sizes: list[int] = []

    def run(items: list[int]) -> list[int]:
        calls.append(len(items))
        if 3 in items:
            raise InputError("item 3 is bad")
        return [-i for i in items]

    batcher = Batcher(max_batch=8, max_wait_ms=50, on_batch=lambda kind, size, s: sizes.append(size))
    futures = [batcher.submit_future("k", i, run) for i in range(6)]
    for i, f in enumerate(futures):
        if i == 3:
            with pytest.raises(InputError, match="item 3 is bad"):
                f.result(timeout=30)
        else:
            assert f.result(timeout=30) == -i
    assert calls[0] == 6 and sizes == [6]

    # a bug reaches every caller of its batch, and the worker goes on
    def broken(items):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        batcher.submit_future("b", 1, broken).result(timeout=30)
    assert batcher.submit_future("k", 5, run).result(timeout=30) == -5
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit_future("k", 1, run)


def test_unbatched_items_run_alone_one_at_a_time():
    active, most, sizes = [0], [0], []
    lock = threading.Lock()

    def run(items):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        sizes.append(len(items))
        with lock:
            active[0] -= 1
        return items

    batcher = Batcher(max_batch=16, max_wait_ms=20)
    futures = [batcher.submit_future("k", i, run, batch=i % 2 == 0) for i in range(12)]
    assert [f.result(timeout=30) for f in futures] == list(range(12))
    batcher.close()
    assert most[0] == 1  # every model call on the one worker thread
    assert sizes.count(1) >= 6  # the six unbatched ones at least


def test_an_eager_batcher_waits_only_for_requests_on_their_way():
    sizes: list[int] = []
    batcher = Batcher(max_batch=8, max_wait_ms=60_000, eager=True, on_batch=lambda kind, size, s: sizes.append(size))
    try:
        start = time.monotonic()
        assert batcher.submit_future("k", 1, lambda items: items).result(timeout=30) == 1  # nothing else coming
        assert time.monotonic() - start < 5 and sizes == [1]
        with batcher.coming() as arrived:  # a request on its way: the first one waits for it
            first = batcher.submit_future("k", 2, lambda items: items)
            time.sleep(0.2)
            assert not first.done()
            second = batcher.submit_future("k", 3, lambda items: items)
            arrived()
            assert (first.result(timeout=30), second.result(timeout=30)) == (2, 3)
        assert sizes == [1, 2]
        with batcher.coming():  # a request refused before it is queued leaves too
            late = batcher.submit_future("j", 4, lambda items: items)
            time.sleep(0.2)
            assert not late.done()
        assert late.result(timeout=30) == 4 and sizes == [1, 2, 1]
        # after a batch of two, clients that came together wait for each other again (here: until the close)
        together = batcher.submit_future("k", 5, lambda items: items)
        time.sleep(0.2)
        assert not together.done()
    finally:
        batcher.close()
    assert together.result(timeout=30) == 5


def wait_of(queued=1, coming=0, limit=16, recent=1, free=10.0, first=9.0, last=0.2, gather=0.5, max_wait=0.005,
            now=10.0) -> float:
    """`gather_wait` with the model free since t=10 s after a call of 0.2 s, the batch's first request queued at 9 s."""
    return gather_wait(queued, coming, limit, recent, free, first, last, gather, max_wait, now)


def test_the_gathering_rule_on_a_fake_clock():
    # a lone client: its last call had one request in flight, so its next one starts at once
    assert wait_of(queued=1, recent=1) <= 0
    # a request on its way is waited for: at most half the last call after the model became free
    assert wait_of(queued=1, coming=1) == pytest.approx(0.1)
    assert wait_of(queued=1, coming=1, now=10.1) <= 0
    # clients taking turns: 16 in flight during the last call, 8 queued now: wait for the other 8
    assert wait_of(queued=8, recent=16) == pytest.approx(0.1)
    assert wait_of(queued=15, recent=16, now=10.06) == pytest.approx(0.04)
    assert wait_of(queued=16, recent=16) <= 0
    assert wait_of(queued=8, coming=3, recent=16, now=10.1) <= 0  # the bound passed: start with what is queued
    # never more than a call takes: 64 in flight, 16 a call
    assert wait_of(queued=16, recent=64, limit=16) <= 0
    assert wait_of(queued=20, recent=64, limit=16) <= 0
    # the bound counts from when the model became free, or from the first request when it came later (an idle model)
    assert wait_of(queued=2, recent=4, free=0.0, first=100.0, now=100.0) == pytest.approx(0.1)
    assert wait_of(queued=2, recent=4, free=10.0, first=2.0, now=10.0) == pytest.approx(0.1)
    # at least max_wait, when the last call was short; the fraction scales with the call
    assert wait_of(queued=2, recent=4, last=0.001) == pytest.approx(0.005)
    assert wait_of(queued=2, recent=4, last=1.0, gather=0.25) == pytest.approx(0.25)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_gathering_batcher_brings_clients_that_take_turns_together():
    """Controlled arrivals on a fake clock: two halves of 8 become one batch of 16, and a lone client after them waits
    once (the bound), then no more."""
    clock, sizes, started = FakeClock(), [], threading.Semaphore(0)
    gates = [threading.Event() for _ in range(8)]

    def run(items: list[int]) -> list[int]:  # each call lasts 0.25 s on the fake clock, once its gate opens
        sizes.append(len(items))
        started.release()
        assert gates[len(sizes) - 1].wait(30)
        clock.t += 0.25
        return items

    def call_started() -> None:
        assert started.acquire(timeout=30)

    batcher = Batcher(max_batch=64, max_wait_ms=0, eager=True, gather=0.5, clock=clock)
    try:
        gates[0].set()  # one client alone: nothing else in flight, its request starts at once
        assert batcher.submit_future("k", -1, run).result(timeout=30) == -1 and sizes == [1]
        with batcher.coming():  # the first half arrives together (the clock stands still: no bound passes)
            first = [batcher.submit_future("k", i, run) for i in range(8)]
        call_started()
        call_started()
        assert sizes == [1, 8]
        second = [batcher.submit_future("k", i, run) for i in range(8, 16)]  # the other half queues meanwhile
        gates[1].set()
        assert [f.result(timeout=30) for f in first] == list(range(8))
        # the model is free with 8 queued, 16 were in flight: it waits for the others
        time.sleep(0.2)
        assert sizes == [1, 8] and not any(f.running() for f in second)
        again = [batcher.submit_future("k", i, run) for i in range(8)]  # the first half comes back
        call_started()
        assert sizes == [1, 8, 16]
        gates[2].set()
        assert [f.result(timeout=30) for f in second + again] == list(range(8, 16)) + list(range(8))
        # all but one client leave: the lone request waits until half the last call has passed, once
        lone = batcher.submit_future("k", 99, run)
        time.sleep(0.2)
        assert sizes == [1, 8, 16] and not lone.running()
        clock.t += 0.125  # half the last call
        with batcher.coming():  # (wakes the worker to read the clock)
            pass
        call_started()
        gates[3].set()
        assert lone.result(timeout=30) == 99 and sizes == [1, 8, 16, 1]
        # its call had one request in flight: the next starts at once, the clock still standing
        gates[4].set()
        assert batcher.submit_future("k", 100, run).result(timeout=30) == 100 and sizes == [1, 8, 16, 1, 1]
    finally:
        for gate in gates:
            gate.set()
        batcher.close()


@pytest.mark.parametrize("gather", [0.0, 0.5])
def test_a_lone_request_does_not_wait_for_company(model, gather):
    """The app's batcher, gathering or not, does not slow one client alone by --max-wait-ms."""
    with TestClient(create_app(model, max_batch=16, max_wait_ms=60_000, gather=gather)) as client:
        start = time.monotonic()
        r = client.post("/api/match", files=[("image", ("a.png", IMAGES[0].read_bytes(), "image/png"))],
                        data={"texts": TEXTS[:2]})
        assert r.status_code == 200 and time.monotonic() - start < 30


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


def requests_of(n: int) -> list[tuple[Path, list[str]]]:
    """n different requests: each its image and its own texts."""
    return [(IMAGES[i % len(IMAGES)], TEXTS[i % 3 : i % 3 + 2 + i % 4]) for i in range(n)]


def while_busy(client: TestClient, send: list) -> list:
    """Send every request at once while the model is busy with another call, as under load: they queue, and run
    once that call ends, batched as they queued (the batcher starts a batch at once when nothing else is coming)."""
    batcher = client.app.state.batcher
    release = threading.Event()
    busy = batcher.submit_future("busy", None, lambda _: [release.wait(60)], batch=False)
    while not busy.running():
        time.sleep(0.01)
    with ThreadPoolExecutor(len(send)) as pool:
        futures = [pool.submit(s) for s in send]
        deadline = time.monotonic() + 60
        while batcher.queued() < len(send) and time.monotonic() < deadline:
            time.sleep(0.01)
        release.set()
        assert busy.result(timeout=60) is True
        return [f.result() for f in futures]


def post_all(client: TestClient, path: str, requests: list, fields) -> list[dict]:
    send = [partial(client.post, path, files=[("image", (p.name, p.read_bytes(), "image/png"))], data=fields(texts))
            for p, texts in requests]
    responses = while_busy(client, send)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def batch_sizes(client: TestClient, kind: str) -> tuple[int, int]:
    """(model calls, requests in them) of `kind` from /metrics."""
    text = client.get("/metrics").text
    calls = re.search(rf'blipkit_batch_size_count\{{kind="{kind}"\}} (\d+)', text)
    total = re.search(rf'blipkit_batch_size_sum\{{kind="{kind}"\}} ([\d.]+)', text)
    return int(calls.group(1)), int(float(total.group(1)))


def test_simultaneous_match_requests_are_batched_and_equal_unbatched_calls(model):
    requests = requests_of(16)
    with TestClient(create_app(model, max_batch=16)) as client:
        got = post_all(client, "/api/match", requests, lambda texts: {"texts": texts})
        assert batch_sizes(client, "match") == (1, 16)
    for (path, texts), body in zip(requests, got, strict=True):
        image = Image.open(path).convert("RGB")
        itm, itc = model.match(image, texts)[0].tolist(), model.similarity(image, texts)[0].tolist()
        matches = body["results"][0]["matches"]
        assert [m["text"] for m in matches] == texts
        assert [m["itm"] for m in matches] == pytest.approx(itm, abs=1e-5)
        assert [m["itc"] for m in matches] == pytest.approx(itc, abs=1e-5)


def test_requests_of_several_images_and_ragged_texts_are_one_model_call(model):
    """Requests with 1 to 3 images and 1 to 5 texts each: one ViT pass and one ITM pass, each result as alone."""
    shapes = [(1 + i % 3, TEXTS[i % 4 : i % 4 + 1 + i % 5]) for i in range(8)]
    requests = [([IMAGES[(i + j) % len(IMAGES)] for j in range(n)], texts) for i, (n, texts) in enumerate(shapes)]
    with TestClient(create_app(model, max_batch=8)) as client:
        bodies = [r.json() for r in while_busy(client, [
            partial(client.post, "/api/match", data={"texts": texts},
                    files=[("image", (p.name, p.read_bytes(), "image/png")) for p in paths])
            for paths, texts in requests])]
        assert batch_sizes(client, "match") == (1, 8)
    for (paths, texts), body in zip(requests, bodies, strict=True):
        images = [Image.open(p).convert("RGB") for p in paths]
        itm, itc = model.match(images, texts), model.similarity(images, texts)
        assert [r["image"] for r in body["results"]] == list(range(len(paths)))
        for i, result in enumerate(body["results"]):
            assert [m["text"] for m in result["matches"]] == texts
            assert [m["itm"] for m in result["matches"]] == pytest.approx(itm[i].tolist(), abs=1e-5)
            assert [m["itc"] for m in result["matches"]] == pytest.approx(itc[i].tolist(), abs=1e-5)


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 3), st.lists(st.sampled_from(TEXTS), min_size=1, max_size=5)),
                       min_size=1, max_size=6),
       edge=st.booleans())
def test_a_batch_of_jobs_gives_each_job_what_it_gives_alone(model, shapes, edge):
    """The match and similarity steps over any batch (images per job, ragged and repeated texts) equal each job
    run alone; with `edge`, the jobs carry pixels made at the door, as the app makes them."""
    decoded = [Image.open(p).convert("RGB") for p in IMAGES]
    batch = [jobs.Job([decoded[(i + j) % len(decoded)] for j in range(n)], texts) for i, (n, texts) in
             enumerate(shapes)]
    if edge:
        for job in batch:
            job.pixels = model.pixels(job.images)
    for job, got, sims in zip(batch, jobs.match(model, batch), jobs.similarity(model, batch), strict=True):
        alone, sims_alone = jobs.match(model, [job])[0], jobs.similarity(model, [job])[0]
        assert [[m["text"] for m in row] for row in got] == [job.texts] * len(job.images)
        scores = [[v for row in rows for m in row for v in (m["itm"], m["itc"])] for rows in (got, alone)]
        assert scores[0] == pytest.approx(scores[1], abs=1e-5)
        assert sum(sims, []) == pytest.approx(sum(sims_alone, []), abs=1e-5)


def test_simultaneous_captions_and_answers_equal_unbatched_calls(model):
    requests = requests_of(8)
    questions = ["what color is the circle?", "what shape is on the left?"]
    with TestClient(create_app(model, max_batch=8)) as client:
        captions = post_all(client, "/api/caption", requests, lambda texts: {"num_beams": "2"})
        answers = post_all(client, "/api/ask", requests, lambda texts: {"question": questions[len(texts) % 2]})
        assert batch_sizes(client, "caption") == (1, 8)
        assert batch_sizes(client, "ask")[1] == 8
    for (path, texts), c, a in zip(requests, captions, answers, strict=True):
        image = Image.open(path).convert("RGB")
        assert c["results"][0]["caption"] == model.caption(image, num_beams=2)[0]
        assert a["results"][0]["answer"] == model.answer(image, questions[len(texts) % 2])[0]


def test_without_batching_every_request_is_its_own_call(model):
    requests = requests_of(6)
    with TestClient(create_app(model, max_batch=1)) as client:
        post_all(client, "/api/match", requests, lambda texts: {"texts": texts})
        assert batch_sizes(client, "match") == (6, 6)


def test_pixels_made_at_the_edge_go_to_the_vision_tower_unchecked(model, monkeypatch):
    """The app's jobs carry `model.pixels` of decoded images: the model step does not check them again (a pass over
    every pixel), and its scores equal the model's."""
    image = Image.open(IMAGES[0]).convert("RGB")
    batch = [jobs.Job([image], TEXTS[:3], pixels=model.pixels([image])) for _ in range(2)]

    def checked_again(*args, **kwargs):
        raise AssertionError("pixels made at the edge were checked again")

    monkeypatch.setattr("blipkit.processing.image.check_pixels", checked_again)
    got, sims = jobs.match(model, batch), jobs.similarity(model, batch)
    monkeypatch.undo()
    itm, itc = model.match(image, TEXTS[:3])[0].tolist(), model.similarity(image, TEXTS[:3])[0].tolist()
    for rows, row_sims in zip(got, sims, strict=True):
        assert [m["itm"] for m in rows[0]] == pytest.approx(itm, abs=1e-5)
        assert [m["itc"] for m in rows[0]] == pytest.approx(itc, abs=1e-5)
        assert row_sims[0] == pytest.approx(itc, abs=1e-5)
