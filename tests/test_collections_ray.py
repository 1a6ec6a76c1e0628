"""The Ray executor of the collection jobs (`--executor ray`): the same table as the local executor (BLIP with every
column kind, BLIP-2's multivectors), skips before any model call, kill -9 of the driver then resume, a worker that
dies, bad files, clear errors for an unreachable cluster and misplaced flags; CapFilt's outputs the same from both
executors, a local run resumed on Ray, the local executor's options refused with Ray; a job into an S3 bucket (a
local S3-compatible server). One local Ray for the module."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lance")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import blipkit  # noqa: E402
from blipkit.cli import main  # noqa: E402
from blipkit.collections import Index, read_sources  # noqa: E402
from blipkit.collections.ray_executor import ModelStep, RayOptions, run_job_ray  # noqa: E402
from blipkit.collections.steps import EmbedStep  # noqa: E402
from blipkit.collections.store import TableWriter, open_table, settings_of  # noqa: E402
from blipkit.data.scenes import iter_scenes  # noqa: E402
from tests import test_collections_s3  # noqa: E402

N = 24
FLOATS = {"embedding": 1e-5, "queries": 1e-5, "label_scores": 1e-5}  # largest absolute difference
FP16 = {"features": 2 ** -10}  # relative: one float16 step (float32 sums in another order can round the other way)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster() -> str:
    """A local Ray of two CPUs for the module; its address, for drivers started as subprocesses."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import this file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    for i, s in enumerate(iter_scenes(N, seed=11)):
        s.image.save(root / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model():
    return blipkit.load("scenes-blip")


@pytest.fixture(scope="module")
def reference(scenes, model, tmp_path_factory) -> Path:
    """The database of an uninterrupted local run over the scenes."""
    db = tmp_path_factory.mktemp("reference") / "db"
    Index(db, model).add(scenes, workers=0)
    return db


def _table(db: Path, name: str = "images") -> dict[str, dict]:
    rows = open_table(db, name).to_table().to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "a key was written twice"
    return by_key


def _same_tables(a: Path, b: Path) -> None:
    """Same schema, settings, keys and values (floats within FLOATS and FP16)."""
    ta, tb = open_table(a, "images"), open_table(b, "images")
    assert ta.schema == tb.schema
    sa, sb = settings_of(ta), settings_of(tb)
    assert {k: v for k, v in sa.items() if k != "created"} == {k: v for k, v in sb.items() if k != "created"}
    ra, rb = _table(a), _table(b)
    assert sorted(ra) == sorted(rb)
    for key, row in ra.items():
        for column, value in row.items():
            if column in FLOATS:
                assert np.abs(np.array(value, np.float32) - np.array(rb[key][column], np.float32)).max() <= \
                    FLOATS[column], (key, column)
            elif column in FP16:
                x, y = np.array(value, np.float32), np.array(rb[key][column], np.float32)
                assert (np.abs(x - y) <= FP16[column] * np.abs(x) + 1e-6).all(), (key, column)
            else:
                assert value == rb[key][column], (key, column)


@pytest.mark.parametrize("name, options", [
    ("scenes-blip", {"features": True, "labels": ["red circle", "blue square"]}),
    ("scenes-blip2-itm", {}),
])
def test_both_executors_write_the_same_table(cluster, scenes, tmp_path, name, options):
    model = blipkit.load(name)
    local = Index(tmp_path / "local", model, **options).add(scenes, batch_size=5, workers=0)
    remote = Index(tmp_path / "ray", model, **options).add(scenes, batch_size=5, executor="ray")
    assert (local.added, local.failed) == (remote.added, remote.failed) == (N, 0)
    assert remote.extra["rows"] == N and remote.extra["errors"] == 0
    _same_tables(tmp_path / "local", tmp_path / "ray")


s3_server, s3 = test_collections_s3.s3_server, test_collections_s3.s3  # a bucket on a local S3-compatible server


def test_ray_job_into_a_bucket_writes_the_same_table(cluster, scenes, model, reference, s3):
    """Only the driver writes: the table goes to the object store as to a directory (the workers never see it)."""
    uri = f"{s3}/photos"
    summary = Index(uri, model).add(scenes, batch_size=6, executor="ray", ray=RayOptions(commit_rows=12))
    assert (summary.added, summary.failed, summary.extra["rows"]) == (N, 0, N)
    _same_tables(reference, uri)


def _forbidden_step():
    raise AssertionError("a model was loaded for keys already in the table")


def test_done_keys_are_skipped_before_any_model_call(cluster, scenes, model, tmp_path):
    db = tmp_path / "db"
    Index(db, model).add(scenes / "00*.png", workers=0)  # 10 of the 24, locally
    summary = Index(db, "scenes-blip").add(scenes, batch_size=4, executor="ray", ray=RayOptions(actors=2))
    assert (summary.added, summary.skipped, summary.failed) == (N - 10, 10, 0)
    assert len(_table(db)) == N
    step = EmbedStep(model)
    writer = TableWriter(db, "images", step.settings())
    again = run_job_ray(read_sources(scenes), _forbidden_step, writer, step.processor, progress=False)
    assert (again.added, again.skipped, again.failed) == (0, N, 0)


def _versions(db: Path) -> int:
    folder = db / "images.lance" / "_versions"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


@pytest.mark.full  # two drivers started as processes: about a minute
def test_kill9_of_the_driver_then_resume(cluster, scenes, reference, tmp_path):
    db = tmp_path / "db"
    cmd = [sys.executable, "-m", "blipkit.cli", "index", str(scenes), "--db", str(db), "--batch-size", "2",
           "--executor", "ray", "--ray-address", cluster, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while _versions(db) < 5 and proc.poll() is None and time.monotonic() < deadline:  # a few batches in
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # mid-job: batches in flight in the decoding tasks and the actor
    proc.communicate()
    first = _table(db)  # no key twice
    assert 2 <= len(first) < N  # some batches committed, not all
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["added"], summary["skipped"], summary["failed"]) == (N - len(first), len(first), 0)
    _same_tables(reference, db)  # every image exactly once, as an uninterrupted local run


class DiesOnce:
    """A step whose actor process dies on its first batch (once for the whole job: a marker file says so)."""

    def __init__(self, marker: Path) -> None:
        self.marker, self.step = marker, ModelStep(EmbedStep, "scenes-blip")()
        self.processor = self.step.processor

    def __call__(self, batch):
        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return self.step(batch)


def test_a_worker_that_dies_is_retried_without_duplicates(cluster, scenes, model, reference, tmp_path):
    step = EmbedStep(model)
    writer = TableWriter(tmp_path / "db", "images", step.settings())
    marker = tmp_path / "died"
    summary = run_job_ray(read_sources(scenes), partial(DiesOnce, marker), writer, step.processor, batch_size=4,
                          progress=False)
    assert marker.exists() and (summary.added, summary.failed) == (N, 0)
    _same_tables(reference, tmp_path / "db")


def test_bad_files_become_the_same_error_records(cluster, scenes, model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    png = (scenes / "000.png").read_bytes()
    (folder / "good.png").write_bytes(png)
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    local = Index(tmp_path / "local", model).add(folder, batch_size=2, workers=0)
    index = Index(tmp_path / "ray", model)
    remote = index.add(folder, batch_size=2, executor="ray")
    assert (local.added, local.failed) == (remote.added, remote.failed) == (1, 3)
    errors = {Path(r["path"]).name: r["reason"] for r in index.errors().to_pylist()}
    local_errors = {Path(r["path"]).name: r["reason"] for r in Index(tmp_path / "local", model).errors().to_pylist()}
    assert errors == local_errors and errors["zero.png"] == "empty file (0 bytes)"
    _same_tables(tmp_path / "local", tmp_path / "ray")
    again = index.add(folder, batch_size=2, executor="ray")  # failures are final for their keys
    assert (again.added, again.skipped, again.failed) == (0, 4, 0)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_unreachable_address_and_misplaced_flags_are_clear_errors(cluster, scenes, tmp_path, capsys):
    db = str(tmp_path / "db")
    errors = {
        ("--executor", "ray", "--ray-address", "127.0.0.1:1"): "no Ray cluster answers at --ray-address '127.0.0.1:1'",
        ("--executor", "ray", "--ray-address", "nohost"): "is not HOST:PORT",
        ("--executor", "ray", "--actors", "0"): "--actors 0: use 1 or more",
        ("--executor", "ray", "--workers", "2"): "--workers is for --executor local",
        ("--actors", "2", "--gpus-per-actor", "1"): "--actors, --gpus-per-actor apply to --executor ray",
    }
    for argv, message in errors.items():
        code, err = _cli(capsys, "index", str(scenes), "--db", db, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not Path(db).exists()  # refused at the door: no table, no model


def test_bulk_captions_are_the_same_from_both_executors(cluster, scenes, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for path in sorted(scenes.glob("*.png"))[:8]:
        os.link(path, tmp_path / "imgs" / path.name)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not an image")
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / f"{executor}.jsonl"
        extra = ["--workers", "0"] if executor == "local" else ["--executor", "ray"]
        code = main(["caption", str(tmp_path / "imgs"), "--write", "jsonl", "--out", str(out), "--num-captions", "2",
                     "--beams", "2", "--json", *extra])
        summary = json.loads(capsys.readouterr().out)
        assert code == 0 and (summary["added"], summary["failed"]) == (8, 1)
        outputs[executor] = sorted(json.dumps({k: v for k, v in json.loads(line).items() if k != "time"})
                                   for line in out.read_text().splitlines())
    assert len(outputs["ray"]) == 9 and outputs["ray"] == outputs["local"]
    code, err = _cli(capsys, "caption", str(tmp_path / "imgs"), "--executor", "ray")
    assert code == 2 and "--executor ray runs bulk captioning" in err


# ------------------------------------------------------------------------------------------------- capfilt on Ray

N_CAPFILT = 10


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, Path]:
    """Scenes with noisy web captions (the root, its annotation file); the last image cut short (its header reads,
    its pixels do not: a decoding failure, not an annotation error)."""
    from blipkit.data.scenes import write_dataset

    root = tmp_path_factory.mktemp("noisy")
    write_dataset(root, N_CAPFILT, 1, 1, seed=43, image_size=64, progress=False, web_noise=(0.3, 0.3))
    ann = root / "annotations" / "train_web.json"
    last = root / json.loads(ann.read_text())[-1]["image"]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return root, ann


CAPFILT = {"samples": 2, "batch_size": 4, "progress": False}


@pytest.fixture(scope="module")
def capfilt_reference(noisy, model, tmp_path_factory) -> Path:
    """The outputs of an uninterrupted local capfilt run."""
    from blipkit.collections.capfilt import capfilt

    out = tmp_path_factory.mktemp("capfilt") / "local"
    result = capfilt(noisy[1], out, model, image_root=noisy[0], workers=0, **CAPFILT)
    assert (result.summary.added, result.summary.failed) == (N_CAPFILT - 1, 1)
    return out


def _same_capfilt(a: Path, b: Path) -> None:
    """Same candidates (scores within 1e-5), kept annotations and error records."""
    import pyarrow.parquet as pq

    ra, rb = (pq.read_table(d / "candidates.parquet").to_pylist() for d in (a, b))
    assert len(ra) == len(rb) == 3 * (N_CAPFILT - 1)  # one web and two sampled captions an image
    for x, y in zip(ra, rb, strict=True):
        assert abs(x.pop("score") - y.pop("score")) <= 1e-5 and x == y
    for name in ("annotations.json", "errors.json"):
        assert (a / name).read_text() == (b / name).read_text()
    assert json.loads((a / "capfilt.json").read_text())["counts"]["errors"] == 1


def test_capfilt_writes_the_same_outputs_from_both_executors(cluster, noisy, model, capfilt_reference, tmp_path):
    from blipkit.collections.capfilt import capfilt

    # batches of 3, not 4: sampled captions depend on the image, not on its batch
    result = capfilt(noisy[1], tmp_path / "ray", model, image_root=noisy[0], executor="ray",
                     ray=RayOptions(commit_rows=3), **{**CAPFILT, "batch_size": 3})
    assert (result.summary.added, result.summary.failed) == (N_CAPFILT - 1, 1)
    _same_capfilt(capfilt_reference, tmp_path / "ray")
    assert len(list((tmp_path / "ray" / "parts").glob("part-*.parquet"))) == 4  # 10 items, 3 rows a commit


def test_capfilt_on_ray_resumes_a_local_run(cluster, noisy, model, capfilt_reference, tmp_path):
    from blipkit.collections.capfilt import capfilt

    root, ann = noisy
    first = tmp_path / "first.json"
    first.write_text(json.dumps(json.loads(ann.read_text())[:4]))  # 4 of the good images, locally
    out = tmp_path / "out"
    capfilt(first, out, model, image_root=root, workers=0, **CAPFILT)
    rest = capfilt(ann, out, model, image_root=root, executor="ray", **{**CAPFILT, "batch_size": 3})
    assert (rest.summary.added, rest.summary.skipped, rest.summary.failed) == (N_CAPFILT - 5, 4, 1)
    _same_capfilt(capfilt_reference, out)
    again = capfilt(ann, out, model, image_root=root, executor="ray", **CAPFILT)  # the failure is final too
    assert (again.summary.added, again.summary.skipped, again.summary.failed) == (0, N_CAPFILT, 0)
    _same_capfilt(capfilt_reference, out)


def test_local_only_options_are_refused_with_ray(noisy, scenes, tmp_path, capsys):
    from blipkit.collections import caption_images
    from blipkit.collections.capfilt import capfilt
    from blipkit.errors import InputError

    root, ann = noisy
    commands = {
        ("capfilt", str(ann), "--image-root", str(root), "--out", str(tmp_path / "cf")): "--commit-seconds",
        ("caption", str(scenes), "--write", "jsonl", "--out", str(tmp_path / "c.jsonl")): "--commit-seconds",
        ("index", str(scenes), "--db", str(tmp_path / "db")): "--commit-seconds",
    }
    for argv in commands:
        code, err = _cli(capsys, *argv, "--executor", "ray", "--commit-seconds", "5")
        assert code == 2 and len(err.strip().splitlines()) == 1, (argv, err)
        assert "--commit-seconds is for --executor local (with ray, commits go by --commit-rows)" in err
    code, err = _cli(capsys, *next(iter(commands)), "--executor", "ray", "--workers", "1")
    assert code == 2 and "--workers is for --executor local" in err
    assert not any((tmp_path / name).exists() for name in ("cf", "c.jsonl", "db"))
    calls = [
        lambda: capfilt(ann, tmp_path / "cf", image_root=root, executor="ray", commit_seconds=5),
        lambda: capfilt(ann, tmp_path / "cf", image_root=root, executor="ray", workers=2),
        lambda: caption_images(scenes, write="jsonl", out=tmp_path / "c.jsonl", executor="ray", commit_seconds=5),
        lambda: Index(tmp_path / "db", "scenes-blip").add(scenes, executor="ray", commit_seconds=5),
    ]
    for call in calls:
        with pytest.raises(InputError, match="is for executor='local'"):
            call()
