"""Bulk captioning (`blipkit caption --write`, `blipkit.collections.caption_images`): batched decoding equals one
image at a time (beams, several captions, sampling, unequal prompts), kill -9 and resume with rows counted,
skip-existing / overwrite, prefix / suffix, bad files as error records in every output, clear errors."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("lance")

import blipkit  # noqa: E402
from blipkit.cli import main  # noqa: E402
from blipkit.collections import CaptionStep, caption_images, decode_batch, read_sources  # noqa: E402
from blipkit.collections.caption import item_seed  # noqa: E402
from blipkit.data.scenes import iter_scenes  # noqa: E402
from blipkit.errors import InputError  # noqa: E402

N = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A folder of N generated scenes (128 px PNGs)."""
    folder = tmp_path_factory.mktemp("caption-scenes")
    for i, scene in enumerate(iter_scenes(N, seed=4)):
        scene.image.save(folder / f"{i:03d}.png")
    return folder


LOADED: dict[str, object] = {}


def _load(name: str):
    """A shipped model, loaded once for the module."""
    if name not in LOADED:
        LOADED[name] = blipkit.load(name)
    return LOADED[name]


@pytest.fixture
def model():
    return _load("scenes-blip")


def _copy(src: Path, dst: Path, n: int = N) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png"))[:n]:
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- batched = one at a time


@pytest.mark.parametrize("options", [
    {"num_beams": 3},
    {"num_beams": 1, "max_new_tokens": 12},
    {"num_beams": 4, "num_captions": 3, "min_new_tokens": 2},
    {"do_sample": True, "top_p": 0.9},
    {"do_sample": True, "num_captions": 2, "temperature": 1.3},
    {"num_beams": 3, "prompt": "a picture of"},
])
@pytest.mark.parametrize("name", ["scenes-blip", "scenes-blip2-opt"])
def test_batched_captions_equal_one_image_at_a_time(scenes, name, options):
    m = _load(name)
    step = CaptionStep(m, seed=5, **options)
    decoded = decode_batch(list(read_sources(scenes))[:7], m.processor)
    together = step(decoded)
    alone = [step([d]) for d in decoded]
    assert together["caption"] == [a["caption"][0] for a in alone]
    if options.get("num_captions", 1) > 1:
        assert together["captions"] == [a["captions"][0] for a in alone]
        assert all(len(cs) == options["num_captions"] for cs in together["captions"])
    if not options.get("do_sample"):  # and what the model gives for the images
        direct = m.caption(torch.from_numpy(decoded[0].pixels)[None], **options)[0]
        assert together["caption"][0] == (direct if isinstance(direct, str) else direct[0])
    if options.get("do_sample"):  # the draws follow the seed and the key
        other = CaptionStep(m, seed=6, **options)(decoded)
        assert other["caption"] != together["caption"]


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, 6), min_size=1, max_size=5, unique=True), seed=st.integers(0, 2**63 - 1),
       captions=st.sampled_from([1, 2]), top_p=st.sampled_from([0.5, 0.9, 1.0]), opt=st.booleans())
def test_sampled_batch_draws_each_image_from_its_own_generator(scenes, picks, seed, captions, top_p, opt):
    """Sampling decodes the batch at once; any batch (subset, order) gives each image the captions it gets alone,
    and the ones a job drew image by image from torch's seeded generator before batched sampling (so captions
    written by earlier runs stay what a rerun would write)."""
    m = _load("scenes-blip2-opt" if opt else "scenes-blip")
    options = {"do_sample": True, "top_p": top_p, "num_captions": captions, "max_new_tokens": 10}
    step = CaptionStep(m, seed=seed, **options)
    decoded = decode_batch(list(read_sources(scenes))[:7], m.processor)
    batch = [decoded[i] for i in picks]
    together = step(batch)
    for d, caption in zip(batch, together["caption"], strict=True):
        with torch.random.fork_rng():
            torch.manual_seed(item_seed(seed, d.item.key))
            before = m.caption(torch.from_numpy(d.pixels)[None], **options)[0]
        assert caption == (before if isinstance(before, str) else before[0]) == step([d])["caption"][0]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.sampled_from([None, "a", "a picture of", "an image of two", "this is a drawing of a"]),
                        min_size=2, max_size=4), beams=st.sampled_from([1, 2, 3]))
def test_left_padded_prompts_decode_as_alone(scenes, model, prompts, beams):
    """Prompts of unequal length are left-padded in a batch: every row still decodes as it would alone."""
    images = [Image.open(p) for p in sorted(scenes.glob("*.png"))[: len(prompts)]]
    together = model.caption(images, prompt=prompts, num_beams=beams, max_new_tokens=12)
    alone = [model.caption([im], prompt=p, num_beams=beams, max_new_tokens=12)[0] for im, p in zip(images, prompts,
                                                                                                    strict=True)]
    assert together == alone


def test_batch_size_does_not_change_the_output(scenes, model, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    caption_images(scenes, model, write="jsonl", out=a, batch_size=5, workers=0, num_beams=3)  # 5 + 5 + 2
    caption_images(scenes, model, write="jsonl", out=b, batch_size=1, workers=1, num_beams=3)
    assert [(r["path"], r["caption"]) for r in _jsonl(a)] == [(r["path"], r["caption"]) for r in _jsonl(b)]
    assert len(_jsonl(a)) == N


# ----------------------------------------------------------------------------------------- kill -9 and resume


def _progress(write: str, out: Path) -> int:
    if write == "sidecar":
        return len(list(out.glob("*.txt")))
    if write == "jsonl":
        return out.read_bytes().count(b"\n") if out.exists() else 0
    parts = out.with_name(out.name + ".parts")
    return len(list(parts.glob("part-*"))) if parts.is_dir() else 0


@pytest.mark.parametrize("write", ["sidecar", "jsonl", "parquet"])
def test_kill9_then_resume_captions_every_image_once(scenes, model, write, tmp_path):
    folder = _copy(scenes, tmp_path / "imgs")
    reference = {r["path"]: r["caption"] for r in _jsonl(_reference(folder, model, tmp_path))}
    out = {"sidecar": folder, "jsonl": tmp_path / "c.jsonl", "parquet": tmp_path / "c.parquet"}[write]
    cmd = [sys.executable, "-m", "blipkit.cli", "caption", str(folder), "--write", write, "--batch-size", "2",
           "--workers", "1", "--beams", "2", "--json", "--commit-seconds", "0"]  # each batch committed
    cmd += [] if write == "sidecar" else ["--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random({"sidecar": 1, "jsonl": 2, "parquet": 3}[write])
    killed = 0
    for target in sorted(rng.sample(range(1, N // 2), 2)):  # kill once this much was committed, and a bit later
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while _progress(write, out) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.1))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed += 1
        proc.communicate()
    assert killed >= 1
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["added"] + summary["skipped"] == N and summary["failed"] == 0 and summary["skipped"] > 0
    if write == "sidecar":
        got = {str(p.with_suffix(".png")): p.read_text().rstrip("\n") for p in folder.glob("*.txt")}
        assert not list(folder.glob(".*.tmp"))  # no temporary file left behind
    elif write == "jsonl":
        rows = _jsonl(out)
        assert len(rows) == N  # every image exactly once
        got = {r["path"]: r["caption"] for r in rows}
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
        assert len(rows) == N and not out.with_name(out.name + ".parts").exists()
        got = {r["path"]: r["caption"] for r in rows}
    assert got == reference  # and the captions of an uninterrupted run


def _reference(folder: Path, model, tmp_path: Path) -> Path:
    out = tmp_path / "reference.jsonl"
    caption_images(folder, model, write="jsonl", out=out, batch_size=4, workers=0, num_beams=2)
    return out


def test_torn_last_line_is_cut_and_redone(scenes, model, tmp_path):
    out = tmp_path / "c.jsonl"
    caption_images(scenes, model, write="jsonl", out=out, workers=0, max_new_tokens=8)
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # as if killed inside the write of line 6
    summary = caption_images(scenes, model, write="jsonl", out=out, workers=0, max_new_tokens=8)
    assert (summary.added, summary.skipped) == (N - 5, 5)
    assert sorted(r["path"] for r in _jsonl(out)) == sorted(str(p) for p in scenes.glob("*.png"))


# ----------------------------------------------------------------------------------------- skip / overwrite / affixes


def test_sidecar_skip_existing_then_overwrite_with_prefix_and_suffix(scenes, model, tmp_path, capsys):
    folder = _copy(scenes, tmp_path / "imgs", 4)
    (folder / "001.txt").write_text("my own caption\n")
    code = main(["caption", str(folder), "--write", "sidecar", "--workers", "0", "--prefix", "photo of sks, ",
                 "--suffix", ", best quality", "--max-new-tokens", "10", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and (summary["added"], summary["skipped"]) == (3, 1)
    assert (folder / "001.txt").read_text() == "my own caption\n"  # skipped: the caption file exists
    plain = model.caption(sorted(folder.glob("*.png")), max_new_tokens=10)
    for path, caption in zip(sorted(folder.glob("*.png")), plain, strict=True):
        if path.stem != "001":
            assert path.with_suffix(".txt").read_text() == f"photo of sks, {caption}, best quality\n"
    code = main(["caption", str(folder), "--write", "sidecar", "--workers", "0", "--overwrite", "--ext", ".caption",
                 "--max-new-tokens", "10", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["added"] == 4
    assert [p.read_text() for p in sorted(folder.glob("*.caption"))] == [c + "\n" for c in plain]
    code = main(["caption", str(folder), "--write", "sidecar", "--workers", "0", "--overwrite", "--json",
                 "--max-new-tokens", "10"])
    assert code == 0 and (folder / "001.txt").read_text() == plain[1] + "\n"  # overwritten now


def test_recursive_and_same_stem_conflict(scenes, model, tmp_path):
    folder = _copy(scenes, tmp_path / "imgs", 2)
    _copy(scenes, folder / "sub" / "deeper", 2)
    Image.open(folder / "000.png").convert("RGB").save(folder / "000.jpg")  # 000.jpg would write 000.txt too
    flat = caption_images(folder, model, write="sidecar", workers=0, max_new_tokens=6)
    assert (flat.added, flat.failed) == (2, 1)
    assert "also 000.jpg's" in flat.extra["failures"][0]["reason"] or "also 000.png's" in flat.extra["failures"][0][
        "reason"]
    deep = caption_images(folder, model, write="sidecar", workers=0, max_new_tokens=6, recursive=True)
    assert (deep.added, deep.skipped, deep.failed) == (2, 2, 1)
    assert sorted(p.name for p in (folder / "sub" / "deeper").glob("*.txt")) == ["000.txt", "001.txt"]


@pytest.mark.parametrize("write", ["jsonl", "parquet", "table"])
def test_overwrite_keeps_one_row_per_image(scenes, model, write, tmp_path):
    out = {"jsonl": tmp_path / "c.jsonl", "parquet": tmp_path / "c.parquet", "table": tmp_path / "db"}[write]
    # a table keeps the settings it was made with; the files take new ones (here: another suffix)
    second = " (1)" if write == "table" else " (2)"
    first = caption_images(scenes, model, write=write, out=out, workers=0, max_new_tokens=6, suffix=" (1)")
    skip = caption_images(scenes, model, write=write, out=out, workers=0, max_new_tokens=6, suffix=second)
    again = caption_images(scenes, model, write=write, out=out, workers=0, max_new_tokens=6, suffix=second,
                           overwrite=True)
    assert (first.added, skip.added, skip.skipped, again.added) == (N, 0, N, N)
    rows = _rows(write, out)
    assert len(rows) == N and len({r["path"] for r in rows}) == N
    assert all(r["caption"].endswith(second) for r in rows)
    if write == "parquet":  # the file others read as it is
        import duckdb
        import polars as pl

        assert duckdb.sql(f"SELECT count(DISTINCT path), count(error) FROM '{out}'").fetchall() == [(N, 0)]
        assert pl.read_parquet(out)["caption"].to_list() == [r["caption"] for r in rows]


def _rows(write: str, out: Path) -> list[dict]:
    if write == "jsonl":
        return _jsonl(out)
    if write == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    from blipkit.collections.store import open_table

    return open_table(out, "captions").to_table().to_pylist()


# ----------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def bad_folder(scenes, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    for i in range(2):
        (root / f"good{i}.png").write_bytes((scenes / f"00{i}.png").read_bytes())
    (root / "zero.png").write_bytes(b"")
    (root / "text.jpg").write_text("not an image at all")
    png = (root / "good0.png").read_bytes()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    Image.new("1", (12_000, 8_000)).save(root / "bomb.png")
    return root


BAD = {"zero.png": "empty file (0 bytes)", "text.jpg": "not an image Pillow can read", "truncated.png": "cannot decode",
       "bomb.png": "decompression bomb"}


@pytest.mark.parametrize("write", ["sidecar", "jsonl", "parquet", "table"])
def test_bad_files_become_error_records(bad_folder, model, write, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in bad_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    out = {"sidecar": None, "jsonl": tmp_path / "c.jsonl", "parquet": tmp_path / "c.parquet", "table": tmp_path / "db"}
    errors = tmp_path / "errors.jsonl" if write == "sidecar" else None
    summary = caption_images(folder, model, write=write, out=out[write], errors=errors, batch_size=2, workers=1,
                             max_new_tokens=6)
    assert (summary.added, summary.failed) == (2, 4)
    if write == "sidecar":
        records = _jsonl(errors)
        assert sorted(p.name for p in folder.glob("*.txt")) == ["good0.txt", "good1.txt"]
    elif write == "table":
        from blipkit.collections.store import open_table

        records = [{"path": r["path"], "error": r["reason"]} for r in open_table(out[write], "captions_errors")
                   .to_table().to_pylist()]
    else:
        records = [r for r in _rows(write, out[write]) if r.get("error")]
    reasons = {Path(r["path"]).name: r["error"] for r in records}
    assert sorted(reasons) == sorted(BAD)
    assert all(reasons[name].startswith(start) for name, start in BAD.items())
    again = caption_images(folder, model, write=write, out=out[write], errors=errors, batch_size=2, workers=0,
                           max_new_tokens=6)
    assert (again.added, again.skipped, again.failed) == (0, 6, 0)  # error records are final for their key
    if write == "sidecar":
        assert sorted(p.name for p in folder.glob(".*.caption-error")) == sorted(f".{n}.caption-error" for n in BAD)


def test_sidecar_rerun_skips_known_bad_files_until_they_change(bad_folder, model, tmp_path, monkeypatch):
    """Sidecar failures are state (a marker next to each bad image): a rerun decodes nothing; an image edited since
    (a new key) is tried again, and a bad image made good loses its marker."""
    from blipkit.collections import engine

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in bad_folder.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    decoded: list[str] = []
    real = engine.decode_batch

    def counted(batch, *args, **kwargs):
        decoded.extend(Path(item.path).name for item in batch)
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(engine, "decode_batch", counted)

    def run(**options):
        return caption_images(folder, model, write="sidecar", batch_size=2, workers=0, max_new_tokens=6, **options)

    first = run()
    assert (first.added, first.failed) == (2, 4) and sorted(decoded) == sorted([*BAD, "good0.png", "good1.png"])
    decoded.clear()
    again = run()
    assert (again.added, again.skipped, again.failed) == (0, 6, 0) and decoded == []  # nothing decoded again
    (folder / "zero.png").write_bytes((bad_folder / "good1.png").read_bytes())  # fixed: a new size and mtime
    with open(folder / "text.jpg", "a") as f:
        f.write(" still not an image")  # edited, still bad
    third = run()
    assert sorted(decoded) == ["text.jpg", "zero.png"]
    assert (third.added, third.skipped, third.failed) == (1, 4, 1)
    assert (folder / "zero.txt").is_file() and not (folder / ".zero.png.caption-error").exists()
    assert json.loads((folder / ".text.jpg.caption-error").read_text())["reason"].startswith(BAD["text.jpg"])
    decoded.clear()
    over = run(overwrite=True)
    assert (over.added, over.failed) == (3, 3) and len(decoded) == 6  # --overwrite tries everything again


def test_tar_shards_caption_to_jsonl_and_refuse_sidecars(scenes, model, tmp_path):
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            data = (scenes / f"00{i}.png").read_bytes()
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary = caption_images(shard, model, write="jsonl", out=tmp_path / "c.jsonl", workers=0, max_new_tokens=6)
    assert summary.added == 3 and [r["path"] for r in _jsonl(tmp_path / "c.jsonl")] == [f"{shard}/s{i}.png"
                                                                                        for i in range(3)]
    refused = caption_images(shard, model, write="sidecar", workers=0)
    assert (refused.added, refused.failed) == (0, 3) and "tar member" in refused.extra["failures"][0]["reason"]


# ----------------------------------------------------------------------------------------- errors


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_clear_errors(scenes, model, tmp_path, capsys):
    one = str(scenes / "000.png")
    db = tmp_path / "db"
    caption_images(one, model, write="table", out=db, workers=0, max_new_tokens=6)
    cases = {
        (one, "--prefix", "x"): "--prefix applies to bulk captioning",
        (one, "--recursive"): "--recursive applies to bulk captioning",
        (one, "--write", "jsonl"): "--write jsonl needs --out",
        (one, "--write", "sidecar", "--ext", ".png"): "image suffix",
        (one, "--write", "sidecar", "--ext", "txt"): "starting with a dot",
        (one, "--write", "sidecar", "--out", str(tmp_path / "c.jsonl")): "drop --out",
        (one, "--write", "parquet", "--out", str(tmp_path / "c.jsonl")): "ending in .parquet",
        (one, "--write", "jsonl", "--out", str(tmp_path / "no" / "c.jsonl")): "does not exist",
        (str(tmp_path / "missing"), "--write", "sidecar"): "does not exist",
        (str(tmp_path), "--write", "sidecar"): "hold no images",
        (one, "--write", "table", "--db", str(db), "--max-new-tokens", "7"): "captioned with other settings",
        (one, "--write", "table", "--db", str(db), "--model", "scenes-blip2-opt"): "was built with model",
        (one, "--write", "jsonl", "--out", str(tmp_path / "c.jsonl"), "--errors", str(tmp_path / "e.jsonl")):
            "--errors is for --write sidecar",
        (one, "--overwrite", "--skip-existing"): "not allowed with argument",
    }
    for argv, message in cases.items():
        code, _, err = _cli(capsys, "caption", *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    (tmp_path / "other.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="not a file this command wrote"):
        caption_images(one, model, write="jsonl", out=tmp_path / "other.jsonl")
    with pytest.raises(InputError, match="holds captions, not image embeddings"):
        blipkit.Index(db, model, table="captions").search_text("a red circle")
    with pytest.raises(InputError, match="not one of"):
        CaptionStep(model, beams=3)
