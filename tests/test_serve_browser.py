"""The page of `blipkit serve` in a real browser: Debian's chromium driven by Playwright against a real uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

from PIL import Image  # noqa: E402

import blipkit  # noqa: E402
from blipkit import tasks  # noqa: E402
from blipkit.serve import create_app  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
SCENE = Path(__file__).resolve().parent.parent / "examples" / "red-circle-blue-square.png"
QUESTION = "what color is the circle?"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no browser at {CHROMIUM}: apt-get install chromium (.ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def server(model):
    """uvicorn serving the app on a free loopback port, in a thread; stopped at the end."""
    port = free_port()
    config = uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        yield page
        browser.close()


def test_the_page_runs_every_task_on_an_uploaded_image(server, page, model, tmp_path):
    # what the library says, computed before the page starts: the test does not share the model with the server
    image = Image.open(SCENE).convert("RGB")
    texts = ["a red circle left of a blue square", "a green triangle", "a yellow star"]  # the page's defaults
    caption, itm = model.caption(image)[0], model.match(image, texts)[0].tolist()
    answer = model.answer(image, QUESTION)[0]
    box = tasks.ground(model, image, "the red circle").box
    maps = tasks.cross_attention_maps(model, image, "a red circle left of a blue square")
    words = [t for t, s in zip(maps.tokens, maps.special, strict=True) if not s]

    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(server) or r.url.startswith("data:")
            else outside.append(r.url))
    page.goto(server + "/")
    sync_api.expect(page.locator("#model-name")).to_contain_text("scenes-blip")
    page.set_input_files("#file", str(SCENE))
    sync_api.expect(page.locator("#caption")).to_have_text(caption, timeout=30_000)
    rows = page.locator("#match-table tbody tr")
    sync_api.expect(rows).to_have_count(3, timeout=30_000)
    assert [t.strip() for t in page.input_value("#match-texts").splitlines() if t.strip()] == texts
    for i, text in enumerate(texts):
        cells = rows.nth(i).locator("td")
        assert cells.nth(0).inner_text() == text
        assert float(cells.nth(2).inner_text()) == pytest.approx(itm[i], abs=1e-3)
    best = texts[max(range(len(texts)), key=lambda i: itm[i])]
    assert page.locator("#match-table tr.best td").first.inner_text() == best

    page.fill("#question", QUESTION)
    page.click("#ask-run")
    sync_api.expect(page.locator("#answer")).to_have_text(answer, timeout=30_000)

    page.fill("#phrases", "the red circle")
    page.click("#ground-run")
    sync_api.expect(page.locator("#ground-list li")).to_have_count(1, timeout=30_000)
    assert f"[{', '.join(f'{v:.2f}' for v in box)}]" in page.inner_text("#ground-list")
    # the box is drawn: the overlay's pixels on the box's left edge are opaque, the box's inside is not
    drawn = page.evaluate("""([x1, y1, x2, y2]) => {
        const o = document.getElementById('overlay'), ctx = o.getContext('2d');
        const alpha = (x, y) => ctx.getImageData(Math.round(x * o.width), Math.round(y * o.height), 1, 1).data[3];
        return [alpha(x1, (y1 + y2) / 2), alpha((x1 + x2) / 2, (y1 + y2) / 2)];
    }""", box)
    assert drawn[0] > 200 and drawn[1] == 0

    assert page.input_value("#attention-text") == "a red circle left of a blue square"
    page.click("#attention-run")
    sync_api.expect(page.locator("#attention-grid figure")).to_have_count(len(words), timeout=30_000)
    assert page.locator("#attention-grid figcaption").all_inner_texts() == words
    page.locator("#attention-grid figure").first.click()  # the token's map laid over the picture

    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert outside == []  # the page loaded nothing from anywhere else
    assert not page.locator("#status.error").count()
