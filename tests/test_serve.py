"""The HTTP API of `blipkit serve` (TestClient): every endpoint against the library calls it wraps, every limit and
error, the page and the docs."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import torch  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

import blipkit  # noqa: E402
from blipkit import tasks  # noqa: E402
from blipkit.serve import Limits, create_app  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCENE = EXAMPLES / "red-circle-blue-square.png"
OTHER = EXAMPLES / "green-triangle.png"
TEXTS = ["a red circle left of a blue square", "a green triangle", "a yellow star"]
STATIC = Path(blipkit.__file__).parent / "serve" / "static"


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_wait_ms=1)) as c:
        yield c


def png(path: Path = SCENE) -> bytes:
    return path.read_bytes()


def files(*paths: Path) -> list:
    return [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]


def rgb(path: Path = SCENE) -> Image.Image:
    return Image.open(path).convert("RGB")


def error(r, status: int, field: str | None = None) -> str:
    """The error message of a response, after checking its status, its JSON object and the field it names."""
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    assert body.get("field") == field, body
    return body["error"]


# ------------------------------------------------------------------------------------------------ endpoints


def test_match_gives_itc_and_itm_of_every_image_and_text(client, model):
    r = client.post("/api/match", files=files(SCENE, OTHER), data={"texts": TEXTS})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    itm = model.match([rgb(SCENE), rgb(OTHER)], TEXTS)
    itc = model.similarity([rgb(SCENE), rgb(OTHER)], TEXTS)
    assert [res["image"] for res in results] == [0, 1]
    for i, res in enumerate(results):
        assert [m["text"] for m in res["matches"]] == TEXTS
        assert set(res["matches"][0]) == {"text", "itc", "itm"}
        assert [m["itm"] for m in res["matches"]] == pytest.approx(itm[i].tolist(), abs=1e-5)
        assert [m["itc"] for m in res["matches"]] == pytest.approx(itc[i].tolist(), abs=1e-5)
    # the trained model matches each scene to its own description
    assert max(results[0]["matches"], key=lambda m: m["itm"])["text"] == TEXTS[0]
    assert max(results[1]["matches"], key=lambda m: m["itm"])["text"] == TEXTS[1]


def test_json_base64_images_and_data_urls_equal_multipart(client):
    form = client.post("/api/match", files=files(SCENE), data={"texts": TEXTS}).json()
    b64 = base64.b64encode(png()).decode()
    plain = client.post("/api/match", json={"images": [b64], "texts": TEXTS}).json()
    url = client.post("/api/match", json={"image": "data:image/png;base64," + b64, "texts": TEXTS}).json()
    assert plain == form == url


def test_similarity_is_the_itc_matrix(client, model):
    r = client.post("/api/similarity", files=files(SCENE, OTHER), data={"texts": TEXTS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["texts"] == TEXTS[:2]
    expected = model.similarity([rgb(SCENE), rgb(OTHER)], TEXTS[:2]).tolist()
    assert torch.tensor(body["scores"]) == pytest.approx(torch.tensor(expected), abs=1e-5)


def test_caption_with_options_equals_the_model(client, model):
    r = client.post("/api/caption", files=files(SCENE, OTHER))
    assert r.status_code == 200, r.text
    assert [x["caption"] for x in r.json()["results"]] == model.caption([rgb(SCENE), rgb(OTHER)])
    data = {"num_beams": "2", "max_new_tokens": "12", "num_captions": "2", "return_scores": "true",
            "prompt": "a drawing of"}
    r = client.post("/api/caption", files=files(SCENE), data=data)
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]["captions"]
    want = model.caption(rgb(SCENE), num_beams=2, max_new_tokens=12, num_captions=2, return_scores=True,
                         prompt="a drawing of")[0]
    assert [c["text"] for c in got] == [t for t, _ in want]
    assert [c["score"] for c in got] == pytest.approx([s for _, s in want], abs=1e-4)
    assert all(c["text"].startswith("a drawing of") for c in got)


def test_sampled_captions_follow_the_seed(client):
    def sample(seed: int) -> list[str]:
        data = {"do_sample": "true", "seed": str(seed), "num_captions": "3", "top_p": "0.95", "temperature": "1.5"}
        r = client.post("/api/caption", files=files(SCENE), data=data)
        assert r.status_code == 200, r.text
        return r.json()["results"][0]["captions"]

    assert sample(7) == sample(7)
    assert any(sample(seed) != sample(7) for seed in (1, 2, 3))


def test_ask_generates_or_ranks(client, model):
    q = "what color is the circle?"
    r = client.post("/api/ask", files=files(SCENE, OTHER), data={"question": q})
    assert r.status_code == 200, r.text
    assert [x["answer"] for x in r.json()["results"]] == model.answer([rgb(SCENE), rgb(OTHER)], [q, q])
    assert r.json()["results"][0]["question"] == q
    answers = ["blue", "red", "green"]
    r = client.post("/api/ask", files=files(SCENE), data={"question": q, "answers": answers})
    assert r.json()["results"][0]["answer"] == model.answer(rgb(SCENE), q, answers=answers)[0]


def test_classify_equals_the_task(client, model):
    labels = ["circle", "triangle", "star"]
    for head in ("itc", "itm"):
        r = client.post("/api/classify", files=files(SCENE, OTHER), data={"labels": labels, "head": head, "k": "2"})
        assert r.status_code == 200, r.text
        want = tasks.classify(model, [rgb(SCENE), rgb(OTHER)], labels, head=head, k=2)
        got = [[(t["label"], t["score"]) for t in res["top"]] for res in r.json()["results"]]
        assert [[lab for lab, _ in row] for row in got] == [[lab for lab, _ in row] for row in want]
        assert [s for row in got for _, s in row] == pytest.approx([s for row in want for _, s in row], abs=1e-5)


def test_ground_gives_the_tasks_boxes_and_a_picture(client, model):
    phrases = ["the red circle", "the blue square"]
    r = client.post("/api/ground", files=files(SCENE), data={"phrases": phrases, "picture": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == rgb().size
    for res, phrase in zip(body["results"], phrases, strict=True):
        want = tasks.ground(model, rgb(), phrase)
        assert res["phrase"] == phrase
        assert res["box"] == pytest.approx(want.box, abs=1e-6)
        assert res["match"] == pytest.approx(want.match, abs=1e-5)
    picture = Image.open(io.BytesIO(base64.b64decode(body["picture"].split(",", 1)[1])))
    assert picture.format == "PNG" and picture.width > 200
    r = client.post("/api/ground", files=files(SCENE), data={"phrases": phrases[:1], "source": "itm"})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["box"] == pytest.approx(tasks.ground(model, rgb(), phrases[0], source="itm").box)
    assert r.json()["results"][0]["source"] == "itm"
    r = client.post("/api/ground", files=files(SCENE), data={"phrases": phrases[:1], "source": "words"})
    assert r.status_code == 422 and "source" in r.text


def test_attention_gives_each_tokens_map(client, model):
    text = "a red circle"
    r = client.post("/api/attention", files=files(SCENE), data={"text": text})
    assert r.status_code == 200, r.text
    body = r.json()
    want = tasks.cross_attention_maps(model, rgb(), text)
    assert body["tokens"] == want.tokens and body["layer"] == want.layer
    assert torch.tensor(body["heat"]) == pytest.approx(want.mean_heads(), abs=1e-6)
    assert body["picture"] is None
    # BLIP reads a text: without one, a 422 with the model's message
    assert "need a text" in error(client.post("/api/attention", files=files(SCENE)), 422)


def test_models_health_metrics(client):
    info = client.get("/api/models").json()
    assert info["model"]["name"] == "scenes-blip" and info["model"]["family"] == "BLIP"
    assert all(info["model"]["capabilities"].values())
    assert info["search"] is False and "scenes-blip2-itm" in info["available"]
    assert client.get("/api/health").json() == {"status": "ok", "model": "scenes-blip"}
    before = client.get("/metrics").text
    client.post("/api/match", files=files(SCENE), data={"texts": TEXTS})
    text = client.get("/metrics").text

    def count(metrics: str, pattern: str) -> float:
        m = re.search(pattern, metrics)
        return float(m.group(1)) if m else 0.0

    requests = r'blipkit_requests_total\{path="/api/match",method="POST",status="200"\} (\d+)'
    assert count(text, requests) == count(before, requests) + 1
    assert count(text, r'blipkit_batch_size_count\{kind="match"\} (\d+)') >= 1
    assert 'blipkit_request_seconds_bucket{path="/api/match",le="+Inf"}' in text


def test_page_and_docs_need_no_network(client):
    for path in ("/", "/docs", "/static/app.js", "/static/app.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", r.text), path  # nothing loaded from elsewhere
        assert "fetch(\"http" not in r.text
    spec = client.get("/openapi.json").json()
    assert {"/api/match", "/api/similarity", "/api/caption", "/api/ask", "/api/classify", "/api/ground",
            "/api/attention", "/api/search", "/api/models", "/api/health", "/metrics"} <= set(spec["paths"])
    body = spec["paths"]["/api/caption"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} == set(body)
    assert "num_beams" in body["multipart/form-data"]["schema"]["properties"]


# ------------------------------------------------------------------------------------------------ limits and errors


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb: the data never comes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND",
                                                                                                           b"")


def test_bad_images_are_4xx_naming_the_field(client):
    cases = [
        (b"this is not an image", 422, "not an image"),
        (png()[:300], 422, "truncated"),
        (b"", 422, "empty"),
        (bomb_png(), 413, "pixels"),
    ]
    for data, status, words in cases:
        r = client.post("/api/match", files=[("image", ("x.png", data, "image/png"))], data={"texts": TEXTS})
        assert words in error(r, status, "image[0]")
    # the second of two images is the bad one: named as such
    r = client.post("/api/caption", files=files(SCENE) + [("image", ("b.png", b"GIF89a", "image/gif"))])
    error(r, 422, "image[1]")


def test_pixel_and_body_limits():
    model = blipkit.load("scenes-blip")
    with TestClient(create_app(model, limits=Limits(max_body_bytes=4000, max_pixels=10_000))) as c:
        # over the pixel limit (256 x 256): refused from the header
        r = c.post("/api/caption", files=files(SCENE))
        assert r.status_code == 413  # the body limit comes first here (the file is larger than 4000 bytes)
        small = io.BytesIO()
        Image.new("RGB", (200, 200), "red").save(small, format="PNG")
        r = c.post("/api/caption", files=[("image", ("r.png", small.getvalue(), "image/png"))])
        assert "200x200" in error(r, 413, "image[0]")
        # a body that says it is too large is refused before it is read
        r = c.post("/api/match", content=b"x" * 5000, headers={"content-type": "application/json"})
        assert "larger than the limit of 4000 bytes" in error(r, 413)

        # a streamed body without Content-Length is counted as it comes and cut at the limit, unread beyond
        app = c.app
        reads, sent = [], []

        async def receive():
            reads.append(1)
            return {"type": "http.request", "body": b"x" * 1000, "more_body": len(reads) < 100}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/match", "raw_path": b"/api/match",
                 "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
                 "scheme": "http", "server": ("testserver", 80), "client": ("testclient", 1), "root_path": ""}
        c.portal.call(app, scope, receive, send)
        assert sent[0]["status"] == 413 and len(reads) == 5
        assert b"larger than the limit" in sent[1]["body"]
        assert c.get("/api/health").status_code == 200


def test_texts_and_options_are_checked(client):
    long = "a " * 600
    cases = [
        ("/api/match", {"texts": [f"text {i}" for i in range(65)]}, "texts", "at most 64"),
        ("/api/match", {"texts": ["a red circle", long]}, "texts", "characters"),
        ("/api/match", {"texts": ["  "]}, "texts", "blank"),
        ("/api/match", {"texts": ["a red circle", "\u200b\x00 "]}, "texts", "texts[1] is blank"),
        ("/api/match", {"texts": TEXTS, "colour": "red"}, "colour", "Extra inputs"),
        ("/api/match", {}, "texts", "Field required"),
        ("/api/caption", {"num_beams": "0"}, "num_beams", "greater than or equal to 1"),
        ("/api/caption", {"top_p": "1.5"}, "top_p", "less than or equal to 1"),
        ("/api/caption", {"do_sample": "maybe"}, "do_sample", "boolean"),
        ("/api/classify", {"labels": ["circle"], "head": "xyz"}, "head", "'itc' or 'itm'"),
        ("/api/classify", {"labels": ["circle"], "k": "many"}, "k", "integer"),
        ("/api/classify", {"labels": ["circle"], "templates": ["no slot"]}, "templates", "exactly once"),
        ("/api/ground", {"phrases": ["the red circle"], "threshold": "2"}, "threshold", "less than 1"),
        ("/api/ask", {"question": " "}, "question", "blank"),
    ]
    for path, data, field, words in cases:
        r = client.post(path, files=files(SCENE), data=data)
        assert words in error(r, 422, field), (path, data)


def test_image_counts_and_bodies(client):
    assert "got 0" in error(client.post("/api/match", json={"texts": TEXTS}), 422, "image")
    r = client.post("/api/ground", files=files(SCENE, OTHER), data={"phrases": ["x"]})
    assert "send 1 images" in error(r, 422, "image")
    r = client.post("/api/match", files=files(*[SCENE] * 17), data={"texts": TEXTS})
    assert "at most 16" in error(r, 422, "image")
    error(client.post("/api/match", content=b"{nope", headers={"content-type": "application/json"}), 400)
    error(client.post("/api/match", json=[1, 2]), 422)
    error(client.post("/api/match", content=b"x", headers={"content-type": "text/plain"}), 415)
    assert error(client.get("/api/nothing"), 404)
    assert error(client.get("/api/match"), 405)


def test_no_request_makes_the_server_read_a_file(client, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    r = client.post("/api/match", json={"images": [str(secret)], "texts": TEXTS})
    assert "never as paths" in error(r, 422, "images[0]")
    r = client.post("/api/match", data={"image": str(secret), "texts": TEXTS},
                    files=[("unused", ("u.txt", b"", "text/plain"))])
    assert "file upload" in error(r, 422, "image")
    r = client.post("/api/search", json={"text": "a red circle"})
    assert "--db" in error(r, 404)


def test_capabilities_the_model_lacks_are_400(tmp_path):
    model = blipkit.load("scenes-blip2-itm")
    with TestClient(create_app(model)) as c:
        assert c.get("/api/models").json()["model"]["capabilities"]["caption"] is False
        assert "cannot caption" in error(c.post("/api/caption", files=files(SCENE)), 400)
        r = c.post("/api/match", files=files(SCENE), data={"texts": TEXTS})
        assert r.status_code == 200
        assert [m["itm"] for m in r.json()["results"][0]["matches"]] == pytest.approx(
            model.match(rgb(), TEXTS)[0].tolist(), abs=1e-5)


def test_api_key():
    model = blipkit.load("scenes-blip")
    with TestClient(create_app(model, api_key="s3cret")) as c:
        assert "API key" in error(c.post("/api/match", files=files(SCENE), data={"texts": TEXTS}), 401)
        error(c.get("/api/models", headers={"Authorization": "Bearer wrong"}), 401)
        error(c.get("/metrics"), 401)
        assert c.get("/api/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        r = c.post("/api/match", files=files(SCENE), data={"texts": TEXTS}, headers={"X-API-Key": "s3cret"})
        assert r.status_code == 200
        for path in ("/", "/api/health", "/docs", "/static/app.js"):
            assert c.get(path).status_code == 200, path


@pytest.mark.parametrize(("flags", "message"), [
    (["--threads", "0"], "--threads 0: use 1 or more"), (["--max-batch", "0"], "--max-batch 0: use 1"),
    (["--max-wait-ms", "-1"], "--max-wait-ms -1.0: use 0 or more"), (["--port", "70000"], "--port 70000"),
    (["--api-key", " "], "--api-key is blank"), (["--gather", "-1"], "--gather -1.0: use 0")])
def test_serve_command_checks_its_options_before_loading(flags, message, capsys):
    from blipkit import cli

    assert cli.main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a"]))
def test_any_bytes_are_an_answer_or_a_4xx(client, data, prefix):
    r = client.post("/api/caption", files=[("image", ("x", prefix + data, "application/octet-stream"))])
    assert 400 <= r.status_code < 500 and r.json()["field"] == "image[0]"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.fixed_dictionaries({}, optional={
    "num_beams": st.integers(-2, 10), "max_new_tokens": st.integers(-1, 200), "min_new_tokens": st.integers(-1, 70),
    "num_captions": st.integers(0, 9), "top_p": st.floats(-0.5, 1.5), "temperature": st.floats(-1, 3),
    "do_sample": st.booleans(), "length_penalty": st.floats(-12, 12), "repetition_penalty": st.floats(-1, 3),
}))
def test_any_caption_options_are_an_answer_or_a_422(client, options):
    r = client.post("/api/caption", files=files(SCENE), data={k: str(v).lower() for k, v in options.items()})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 200:
        result = r.json()["results"][0]
        assert ("captions" in result) == (options.get("num_captions", 1) > 1)
    else:
        assert r.json()["error"]


def test_search_the_served_index(model, tmp_path):
    pytest.importorskip("lance")
    from blipkit.collections import Index

    index = Index(tmp_path / "db", model)
    index.add([EXAMPLES], workers=0)
    with TestClient(create_app(model, index=index)) as c:
        assert c.get("/api/models").json()["search"] is True
        r = c.post("/api/search", json={"text": "a green triangle", "k": 2})
        assert r.status_code == 200, r.text
        hits = r.json()["results"]
        want = index.search_text("a green triangle", k=2)
        assert [h["path"] for h in hits] == [w["path"] for w in want]
        assert [h["score"] for h in hits] == pytest.approx([w["score"] for w in want], abs=1e-5)
        assert Path(hits[0]["path"]).name == "green-triangle.png"
        thumb = Image.open(io.BytesIO(base64.b64decode(hits[0]["thumbnail"].split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 160
        r = c.post("/api/search", files=files(OTHER), data={"k": "1", "thumbnails": "false"})
        assert Path(r.json()["results"][0]["path"]).name == "green-triangle.png"
        assert "thumbnail" not in r.json()["results"][0]
        assert "either a text or one image" in error(c.post("/api/search", json={}), 422, "text")
        r = c.post("/api/search", files=files(OTHER), data={"text": "a red circle"})
        error(r, 422, "text")
