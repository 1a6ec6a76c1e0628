"""Databases in an object store: `--db s3://BUCKET/PATH` for `index` and `search` against a local S3-compatible
server (moto's, on 127.0.0.1), credentials and endpoint from the AWS_* environment Lance reads; the same rows and
hits as a local directory; an unknown bucket, an empty prefix and an endpoint that does not answer as one-line
errors. (The Ray executor's run into a bucket is in test_collections_ray.py, which shares these fixtures.)"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lance")

import blipkit  # noqa: E402
from blipkit.cli import main  # noqa: E402
from blipkit.collections import Index  # noqa: E402
from blipkit.collections.store import open_table  # noqa: E402
from blipkit.data.scenes import write_dataset  # noqa: E402

N = 8
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def s3_server() -> str:
    """A local S3-compatible server for the module (moto's); its endpoint."""
    server_module = pytest.importorskip("moto.server")  # here, not at import: test_collections_ray imports these
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> str:
    """A new bucket on the local server and the environment Lance reads to reach it; the bucket's s3:// URI."""
    boto3 = pytest.importorskip("boto3")
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_REGION": "us-east-1", "AWS_ALLOW_HTTP": "true"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"blipkit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A folder of N generated scenes."""
    root = tmp_path_factory.mktemp("scenes")
    write_dataset(root, N, 1, 1, seed=5, image_size=64, progress=False)
    return root / "images" / "train"


def _rows(db) -> dict[str, dict]:
    return {r["key"]: r for r in open_table(db, "images").to_table().to_pylist()}


def test_index_and_search_in_a_bucket_as_in_a_directory(s3, scenes, tmp_path, capsys):
    model = blipkit.load("scenes-blip")
    uri = f"{s3}/photos/"  # a trailing slash is the same database
    local = Index(tmp_path / "db", model).add(scenes, batch_size=3, workers=0)
    remote = Index(uri, model).add(scenes, batch_size=3, workers=0)
    assert (local.added, remote.added, remote.extra["rows"]) == (N, N, N)
    a, b = _rows(tmp_path / "db"), _rows(f"{s3}/photos")
    assert sorted(a) == sorted(b)
    for key, row in a.items():
        assert np.abs(np.array(row["embedding"]) - np.array(b[key]["embedding"])).max() <= 1e-6
    again = Index(uri, "scenes-blip").add(scenes, workers=0)  # resume: every key found in the bucket
    assert (again.added, again.skipped) == (0, N)
    hits = {}
    for db in (str(tmp_path / "db"), f"{s3}/photos"):
        assert main(["search", "--db", db, "a red circle", "-k", "3", "--json"]) == 0
        hits[db] = [(h["path"], round(h["score"], 4)) for h in json.loads(capsys.readouterr().out)]
    assert len(hits[f"{s3}/photos"]) == 3 and hits[f"{s3}/photos"] == hits[str(tmp_path / "db")]
    code = main(["index", str(scenes), "--db", f"{s3}/photos", "--json"])  # the CLI into the same table
    assert code == 0 and json.loads(capsys.readouterr().out)["skipped"] == N


def test_unknown_bucket_empty_prefix_and_silent_endpoint_are_one_line_errors(s3, scenes, capsys, monkeypatch):
    cases = [
        (["search", "--db", f"{s3}/nothing", "a red circle"], f"no database at '{s3}/nothing'"),
        (["index", str(scenes), "--db", "s3://no-such-bucket-here/db"],
         "cannot reach database 's3://no-such-bucket-here/db' (NoSuchBucket): check the bucket exists"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert main(["search", "--db", f"{s3}/photos", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert "(connection refused)" in err and len(err.strip().splitlines()) == 1, err


def test_caption_table_in_a_bucket_as_in_a_directory(s3, scenes, tmp_path, capsys):
    """`caption --write table --db s3://...`: the same captions as a local table, resumed from the bucket."""
    base = ["--write", "table", "--max-new-tokens", "6", "--batch-size", "3", "--workers", "0", "--json"]
    for db in (str(tmp_path / "db"), f"{s3}/captions"):
        assert main(["caption", str(scenes), "--db", db, *base]) == 0
        assert json.loads(capsys.readouterr().out)["added"] == N
    local, remote = ({r["key"]: r["caption"] for r in open_table(db, "captions").to_table().to_pylist()}
                     for db in (tmp_path / "db", f"{s3}/captions"))
    assert len(remote) == N and remote == local
    assert main(["caption", str(scenes), "--db", f"{s3}/captions", *base]) == 0  # resume: every key found
    summary = json.loads(capsys.readouterr().out)
    assert (summary["added"], summary["skipped"]) == (0, N)
