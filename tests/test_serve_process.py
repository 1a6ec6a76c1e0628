"""The model in a process of its own (`create_app(..., process=True)`, `blipkit serve --model-process`): the same
answers and errors as in the server's process, and a child that dies is replaced."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

import blipkit  # noqa: E402
from blipkit.errors import InputError  # noqa: E402
from blipkit.serve import create_app, jobs  # noqa: E402
from blipkit.serve.worker import ModelProcess  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCENE = EXAMPLES / "red-circle-blue-square.png"
TEXTS = ["a red circle left of a blue square", "a green triangle", "a yellow star"]


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def pair(model):
    """Two apps of the model: its calls in this process, and in a child process."""
    with TestClient(create_app(model, max_wait_ms=1)) as here, TestClient(create_app(model, process=True)) as there:
        yield here, there


def files(*paths: Path) -> list:
    return [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]


@pytest.mark.parametrize(("path", "fields"), [
    ("/api/match", {"texts": TEXTS}),
    ("/api/similarity", {"texts": TEXTS}),
    ("/api/caption", {"num_beams": "2"}),
    ("/api/ask", {"question": "what color is the circle?"}),
    ("/api/classify", {"labels": ["circle", "square", "star"]}),
    ("/api/ground", {"phrases": ["a red circle"], "maps": "true"}),
    ("/api/attention", {"text": "a red circle"}),
])
def test_every_endpoint_answers_as_in_the_servers_process(pair, path, fields):
    here, there = (c.post(path, files=files(SCENE), data=fields) for c in pair)
    assert there.status_code == here.status_code == 200, there.text
    a, b = here.json(), there.json()
    assert a.keys() == b.keys()
    assert str(b) == str(a) or _close(a, b)


def _close(a, b) -> bool:
    """Equal up to float rounding (1e-5)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return b == pytest.approx(a, abs=1e-5)
    return a == b


def test_bad_input_is_a_4xx_and_the_batch_counts(pair):
    _, there = pair
    r = there.post("/api/match", files=[("image", ("x.png", b"hello", "image/png"))], data={"texts": TEXTS})
    assert r.status_code == 422 and r.json()["field"] == "image[0]"
    r = there.post("/api/caption", files=files(SCENE), data={"num_beams": "0"})
    assert r.status_code == 422
    assert there.post("/api/match", files=files(SCENE), data={"texts": TEXTS}).status_code == 200
    assert 'blipkit_batch_size_count{kind="match"}' in there.get("/metrics").text


def test_errors_of_the_model_come_back_as_they_are(model):
    process = ModelProcess(model)
    try:
        with pytest.raises(InputError, match="num_beams"):
            process.run("caption", [jobs.Job([Image.open(SCENE).convert("RGB")], options={"num_beams": 0})])
        job = jobs.Job([Image.open(SCENE).convert("RGB")], TEXTS[:2])
        assert _close(jobs.match(model, [job]), process.run("match", [job]))
    finally:
        process.close()
    assert process._process is None


def test_a_child_that_dies_is_replaced(pair, monkeypatch):
    _, there = pair
    child = there.app.state.process
    assert there.post("/api/match", files=files(SCENE), data={"texts": TEXTS}).status_code == 200
    os.kill(child._process.pid, signal.SIGKILL)
    child._process.join(timeout=30)
    r = there.post("/api/match", files=files(SCENE), data={"texts": TEXTS})  # a new child answers
    assert r.status_code == 200, r.text

    # a child that dies during a call: that call fails (its requests get a JSON 503), the next one starts a new child
    os.kill(child._process.pid, signal.SIGKILL)
    child._process.join(timeout=30)
    monkeypatch.setattr(child._process, "is_alive", lambda: True)  # as if it died after the call began
    r = there.post("/api/match", files=files(SCENE), data={"texts": TEXTS})
    assert r.status_code == 503 and "model's process stopped" in r.json()["error"]
    monkeypatch.undo()
    assert there.post("/api/match", files=files(SCENE), data={"texts": TEXTS}).status_code == 200


def test_a_model_that_cannot_go_to_a_process_is_served_here(model, monkeypatch, capsys):
    def refuse() -> None:
        raise TypeError("cannot share")

    monkeypatch.setattr(model, "share_memory", refuse)
    with TestClient(create_app(model, process=True)) as client:
        assert client.app.state.process is None
        assert client.post("/api/match", files=files(SCENE), data={"texts": TEXTS}).status_code == 200
    assert "its calls run in the server's process" in capsys.readouterr().err


def test_blipkit_serve_runs_the_model_apart_and_stops_cleanly():
    """`blipkit serve` (model process by default) answers, and on SIGTERM its model's process ends with it."""
    httpx = pytest.importorskip("httpx")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "blipkit.cli", "serve", "--port", str(port), "--quiet"],
                              stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "blipkit serve did not start"
            try:
                if httpx.get(url + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.get(url + "/api/models").json()["batching"]["model_process"] is True
        r = httpx.post(url + "/api/match", files=files(SCENE), data={"texts": TEXTS}, timeout=60)
        assert r.status_code == 200 and len(r.json()["results"][0]["matches"]) == 3
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children")
        kids = [int(p) for p in children.read_text().split()] if children.exists() else []
        assert kids or not children.exists()  # the model's process, where the kernel lists children
    finally:
        server.terminate()
        server.wait(timeout=60)
    # uvicorn shuts down gracefully, then raises the signal again: its exit tells it came from SIGTERM
    assert server.returncode in (0, -signal.SIGTERM), server.stderr.read().decode()[-2000:]
    for pid in kids:  # the model's process (and spawn's helper) ended with the server
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (Path(f"/proc/{pid}").exists() and _running(pid)), f"process {pid} outlived the server"


def _running(pid: int) -> bool:
    """Whether a process is alive (not a zombie waiting to be collected)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
