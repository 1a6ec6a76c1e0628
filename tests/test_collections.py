"""The collection engine, `blipkit index` / `blipkit search` and `blipkit.Index`: resume after kill -9, error records,
reruns without model calls, search quality on generated scenes, BLIP-2's multivector ITC, interop, clear errors."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lance")

import blipkit  # noqa: E402
from blipkit.cli import main  # noqa: E402
from blipkit.collections import Index  # noqa: E402
from blipkit.collections.store import open_table  # noqa: E402
from blipkit.data.scenes import iter_scenes  # noqa: E402
from blipkit.errors import InputError  # noqa: E402

N = 60
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Path, list]:
    """A folder of N generated scenes (128 px PNGs) and their scene descriptions."""
    root = tmp_path_factory.mktemp("scenes")
    made = list(iter_scenes(N, seed=7))
    for i, s in enumerate(made):
        s.image.save(root / f"{i:03d}.png")
    return root, made


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def reference(scenes, model, tmp_path_factory) -> dict[str, np.ndarray]:
    """Embeddings of an uninterrupted run, by path."""
    db = tmp_path_factory.mktemp("ref") / "db"
    summary = Index(db, model).add(scenes[0], batch_size=16, workers=0)
    assert (summary.added, summary.skipped, summary.failed) == (N, 0, 0)
    rows = Index(db, model).to_arrow(["path", "embedding"]).to_pylist()
    return {r["path"]: np.array(r["embedding"]) for r in rows}


def _rows(db: Path, table: str = "images") -> list[dict]:
    return open_table(db, table).to_table(columns=["key", "path", "embedding"]).to_pylist()


def test_embeddings_equal_the_model(scenes, model, reference):
    paths = sorted(reference)
    assert paths == [str(p) for p in sorted(scenes[0].glob("*.png"))]
    with torch.no_grad():
        direct = model.encode_images([Path(p) for p in paths[:8]]).numpy()
    assert np.abs(np.stack([reference[p] for p in paths[:8]]) - direct).max() < 1e-5


def _versions(db: Path) -> int:
    folder = db / "images.lance" / "_versions"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_kill9_at_random_moments_then_resume(scenes, reference, tmp_path):
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "blipkit.cli", "index", str(scenes[0]), "--db", str(db), "--batch-size", "3",
           "--workers", "1", "--commit-seconds", "0", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(12)
    killed = 0
    for target in sorted(rng.sample(range(2, N // 3), 3)):  # kill once the table reached this many versions
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while _versions(db) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.08))  # anywhere: decoding, the model, a commit
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.communicate()
        keys = [r["key"] for r in _rows(db)]
        assert len(keys) == len(set(keys)), "a row was written twice"
    assert killed >= 2
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    rows = _rows(db)
    assert summary["added"] + summary["skipped"] == N and summary["failed"] == 0
    assert sorted(r["path"] for r in rows) == sorted(reference)  # every image exactly once
    assert max(np.abs(np.array(r["embedding"]) - reference[r["path"]]).max() for r in rows) < 1e-5


@pytest.fixture(scope="module")
def bad_folder(scenes, tmp_path_factory) -> Path:
    """Three good scenes and every kind of bad file."""
    root = tmp_path_factory.mktemp("bad")
    for i in range(3):
        scenes[1][i].image.save(root / f"good{i}.png")
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    png = (root / "good0.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("1", (12_000, 8_000)).save(root / "bomb.png")  # 96 M pixels in a few kB
    return root


def test_bad_files_become_error_records(bad_folder, model, tmp_path):
    index = Index(tmp_path / "db", model)
    summary = index.add(bad_folder, batch_size=2)
    assert (summary.added, summary.failed) == (3, 4)
    reasons = {Path(r["path"]).name: r["reason"] for r in index.errors().to_pylist()}
    assert sorted(reasons) == ["bomb.png", "text.jpg", "truncated.png", "zero.png"]
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["text.jpg"] == "not an image Pillow can read"
    assert reasons["bomb.png"].startswith("decompression bomb")
    assert reasons["truncated.png"].startswith("cannot decode")
    assert len(index) == 3
    again = index.add(bad_folder, batch_size=2)  # failures are recorded once, not retried
    assert (again.added, again.skipped, again.failed) == (0, 7, 0)


class _Recorder:
    """A writer that keeps what it is given, and how many commits it took."""

    def __init__(self) -> None:
        self.commits, self.rows = 0, []

    def done(self, keys: list[str]) -> list[bool]:
        return [False] * len(keys)

    def write(self, batch, columns, failures) -> None:
        self.commits += 1
        self.rows += [(d.item.path, d.width, *[np.asarray(v[i]).tolist() for v in columns.values()])
                      for i, d in enumerate(batch)] + [(f.item.path, f.reason) for f in failures]

    def finish(self) -> dict:
        return {}


def test_commits_group_batches_by_time(scenes, bad_folder, model):
    from blipkit.collections import read_sources, run_job
    from blipkit.collections.steps import EmbedStep

    items = read_sources([scenes[0] / "00*.png", bad_folder])
    every, grouped = _Recorder(), _Recorder()
    run_job(items, EmbedStep(model, caption=True), every, batch_size=3, workers=1, progress=False, commit_seconds=0)
    run_job(items, EmbedStep(model, caption=True), grouped, batch_size=3, workers=1, progress=False,
            commit_seconds=3600)
    assert (every.commits, grouped.commits) == (6, 1)  # 17 items in batches of 3; one commit at the end
    assert sorted(grouped.rows, key=str) == sorted(every.rows, key=str) and len(every.rows) == 17


def test_rerun_adds_nothing_and_calls_no_model(scenes, model, tmp_path):
    index = Index(tmp_path / "db", model)
    index.add(scenes[0], workers=0)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was called on a rerun")

    calls = {name: getattr(model, name) for name in ("image_features", "encode_images", "forward")}
    try:
        for name in calls:
            setattr(model, name, forbidden)
        summary = index.add(scenes[0])
    finally:
        for name in calls:
            delattr(model, name)
    assert (summary.added, summary.skipped, summary.failed) == (0, N, 0)
    assert len(index) == N


def test_edited_file_replaces_its_row(scenes, model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        scenes[1][i].image.save(folder / f"{i}.png")
    index = Index(tmp_path / "db", model)
    index.add(folder, workers=0)
    before = {r["path"]: r["embedding"] for r in index.to_arrow(["path", "embedding"]).to_pylist()}
    scenes[1][5].image.save(folder / "1.png")  # new content, size and mtime: a new key
    os.utime(folder / "1.png", ns=(time.time_ns() + 10**9,) * 2)
    summary = index.add(folder, workers=0)
    after = {r["path"]: r["embedding"] for r in index.to_arrow(["path", "embedding"]).to_pylist()}
    assert (summary.added, summary.skipped) == (1, 2) and len(index) == 3
    changed = [p for p in after if after[p] != before[p]]
    assert changed == [str(folder / "1.png")]


def _has(scene, colour: str, shape: str) -> bool:
    return any(o.colour == colour and o.shape == shape for o in scene.objects)


def test_search_finds_the_true_colour_and_shape(scenes, model, reference, tmp_path):
    root, made = scenes
    index = Index(tmp_path / "db", model)
    index.add(root, workers=0)
    by_path = {str(root / f"{i:03d}.png"): s for i, s in enumerate(made)}
    pairs = random.Random(0).sample(sorted({(o.colour, o.shape) for s in made for o in s.objects}), 16)
    hits_rerank = hits_itc = 0
    chance = np.mean([np.mean([_has(s, c, sh) for s in made]) for c, sh in pairs])
    for colour, shape in pairs:
        top = index.search_text(f"a {colour} {shape}", k=1, rerank=8)[0]
        assert top["score"] == pytest.approx(top["itm"] + top["itc"], abs=1e-5)
        hits_rerank += _has(by_path[top["path"]], colour, shape)
        hits_itc += _has(by_path[index.search_text(f"a {colour} {shape}", k=1, rerank=0)[0]["path"]], colour, shape)
    rate, rate_itc = hits_rerank / len(pairs), hits_itc / len(pairs)
    print(f"top-1 right: {rate:.2f} re-ranked, {rate_itc:.2f} ITC only, chance {chance:.3f}, {len(pairs)} queries")
    assert rate >= 0.6 and rate >= 5 * chance


def test_stored_features_rerank_like_reencoding(scenes, model, tmp_path):
    plain, feats = Index(tmp_path / "a", model), Index(tmp_path / "b", model, features=True)
    for index in (plain, feats):
        index.add(scenes[0], workers=0)
    for text in ("a red circle", "two blue squares", "a green triangle above a yellow star"):
        a, b = plain.search_text(text, k=8, rerank=8), feats.search_text(text, k=8, rerank=8)
        assert [h["path"] for h in a][:3] == [h["path"] for h in b][:3]
        assert max(abs(x["itm"] - y["itm"]) for x, y in zip(a, b, strict=True)) < 0.05  # fp16 features


def test_where_filter_and_image_query(scenes, model, tmp_path):
    index = Index(tmp_path / "db", model)
    index.add(scenes[0], workers=0)
    query = scenes[0] / "004.png"
    assert index.search_image(query, k=1)[0]["path"] == str(query)  # an image is its own nearest neighbour
    hits = index.search_text("a red circle", k=5, where="path NOT LIKE '%/00%'")
    assert len(hits) == 5 and all("/00" not in h["path"] for h in hits)
    with pytest.raises(InputError, match="not a filter"):
        index.search_text("a red circle", where="no_such_column > 1")


def test_blip2_multivector_search_is_blip2_itc(scenes, tmp_path):
    model = blipkit.load("scenes-blip2-itm")
    index = Index(tmp_path / "db", model)
    index.add(scenes[0], workers=0)
    assert index.to_arrow(["queries"]).column(0).type.value_type.list_size == model.config.image_text_hidden_size
    text = "a blue square left of a red circle"
    hits = index.search_text(text, k=N, rerank=0)
    paths = [Path(h["path"]) for h in hits]
    with torch.no_grad():
        itc = model.similarity(paths, [text])[:, 0].numpy()  # BLIP-2's ITC: the best query's cosine
    assert np.abs(np.array([h["itc"] for h in hits]) - itc).max() < 1e-5
    assert all(np.diff(itc) <= 1e-6)  # and the order is ITC's order
    top = index.search_text(text, k=3, rerank=8)
    assert all(h["score"] == pytest.approx(h["itm"] + h["itc"], abs=1e-5) for h in top)


def test_multivector_ann_first_stage_equals_exact_maxsim(tmp_path):
    """With the IVF-PQ index `blipkit index` builds on a BLIP-2 column, the first stage's scores are exact MaxSim's
    (the candidates are re-scored from the stored vectors), best first, and it finds the true top 10 (at least 48 of
    the 50 of five queries: the index's k-means is not seeded, and one build in several misses one row)."""
    import lance
    import pyarrow as pa

    from blipkit.collections.search import _first_stage
    from blipkit.collections.store import ensure_index, vector_indices

    rng = np.random.default_rng(0)
    rows, q, d = 3000, 16, 32  # Lance asked for k=10 with refine 20 missed some of the true 10 here
    centres = rng.normal(size=(200, d))
    vectors = centres[rng.integers(0, 200, rows * q)] + 0.5 * rng.normal(size=(rows * q, d))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32).reshape(rows, q, d)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), d)
    column = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32) * q), inner)
    ds = lance.write_dataset(pa.table({"key": [str(i) for i in range(rows)], "queries": column}),
                             str(tmp_path / "mv.lance"))
    ensure_index(ds, {"dim": d, "queries": q}, "ivf_pq")
    ds = lance.dataset(ds.uri)
    assert vector_indices(ds, "queries") == ["IVF_PQ"]
    true = 0
    for text in rng.normal(size=(5, d)).astype(np.float32):
        text /= np.linalg.norm(text)
        maxsim = np.einsum("nqd,d->nq", vectors, text).max(1)
        found = _first_stage(ds, "queries", text, 10, None)
        keys = [int(k) for k in found.column("key").to_pylist()]
        scores = 1 - found.column("_distance").to_numpy()
        assert len(keys) == 10 and list(scores) == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, maxsim[keys], atol=1e-5)  # each row's exact MaxSim
        true += len(set(keys) & set(np.argsort(-maxsim)[:10].tolist()))
    assert true >= 48


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_index_search_json_and_errors(scenes, tmp_path, capsys):
    db = str(tmp_path / "db")
    code, out, _ = _cli(capsys, "index", str(scenes[0] / "00*.png"), "--db", db, "--workers", "0", "--json")
    assert code == 0 and json.loads(out)["added"] == 10
    code, out, _ = _cli(capsys, "search", "--db", db, "a red circle", "-k", "3", "--json")
    hits = json.loads(out)
    assert code == 0 and len(hits) == 3 and all({"path", "score", "itc", "itm"} <= set(h) for h in hits)
    errors = {
        ("search", "--db", str(tmp_path / "none"), "x"): "error: no database at",
        ("search", "--db", db, "x", "--model", "scenes-blip2-itm"): "was built with model 'scenes-blip'",
        ("index", str(tmp_path / "missing"), "--db", db): "does not exist",
        ("index", str(tmp_path), "--db", str(tmp_path / "db2"), "--table", "t"): "hold no images",
        ("search", "--db", db, "--image", str(scenes[0] / "001.png"), "--rerank", "4"): "--rerank applies to text",
        ("search", "--db", db, "x", "--table", "other"): "has no table 'other'",
    }
    for argv, message in errors.items():
        code, _, err = _cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_read_only_database_is_refused(scenes, tmp_path, capsys, monkeypatch):
    db = tmp_path / "ro"
    db.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == db else real(p, mode))  # as if chmod 555
    code, _, err = _cli(capsys, "index", str(scenes[0] / "001.png"), "--db", str(db))
    assert code == 2 and "is read-only" in err


def test_table_opens_in_lancedb_and_exports_to_duckdb_and_polars(scenes, model, tmp_path):
    import duckdb
    import lancedb
    import polars as pl
    import pyarrow.parquet as pq

    db = tmp_path / "db"
    Index(db, model).add(scenes[0], workers=0)
    table = lancedb.connect(str(db)).open_table("images")
    assert table.count_rows() == N
    meta = json.loads(table.schema.metadata[b"blipkit"])
    assert meta["model"] == "scenes-blip" and meta["dim"] == 128
    first = table.search(np.array(table.to_arrow()["embedding"][0].as_py())).metric("cosine").limit(1).to_list()
    assert first[0]["path"] == table.to_arrow()["path"][0].as_py()
    parquet = tmp_path / "images.parquet"
    pq.write_table(Index(db, model).to_arrow(), parquet)
    assert duckdb.sql(f"SELECT count(DISTINCT path), min(width) FROM '{parquet}'").fetchall() == [(N, 128)]
    frame = pl.read_parquet(parquet)
    assert frame.height == N and frame["embedding"].dtype == pl.Array(pl.Float32, 128)
    assert np.allclose(frame["embedding"].to_numpy()[0], Index(db, model).to_arrow(["embedding"])[0][0].as_py())
