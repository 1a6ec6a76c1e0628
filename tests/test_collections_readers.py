"""Readers of the collection engine: every source kind yields the same items with the same stable keys, and the
worker-side decoder turns every file into pixels or a reason (property-based where the inputs vary)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from blipkit.collections import read_sources
from blipkit.collections.decode import Decoded, Failure, decode, decode_batch, normalise
from blipkit.collections.readers import file_item
from blipkit.errors import InputError
from blipkit.processing import ImageProcessor

PROCESSOR = ImageProcessor(size=32)
names = st.text(st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x2FF), min_size=1, max_size=8)
suffixes = st.sampled_from([".png", ".PNG", ".jpg", ".webp", ".txt", ".json", ""])


def _png(seed: int, size: tuple[int, int] = (20, 14)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["", "sub", "sub/deeper"]), names, suffixes), max_size=12,
                      unique_by=lambda t: (t[0], t[1].lower(), t[2].lower())))
def test_folder_list_and_tables_yield_the_same_keys(files):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        root.mkdir()
        for i, (folder, name, suffix) in enumerate(files):
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{name}{suffix}").write_bytes(_png(i))
        images = sorted(str((root / f / f"{n}{s}").resolve()) for f, n, s in files
                        if s.lower() in (".png", ".jpg", ".webp"))
        if not images:
            assert list(read_sources(root, recursive=True)) == []
            return
        from_folder = list(read_sources(root, recursive=True))
        assert sorted(it.path for it in from_folder) == images
        assert [it.key for it in read_sources(root, recursive=True)] == [it.key for it in from_folder]  # stable
        top = [it.path for it in read_sources(root)]
        assert top == sorted(p for p in images if Path(p).parent == root.resolve())
        rel = [os.path.relpath(p, tmp) for p in images]
        (Path(tmp) / "list.txt").write_text("\n".join(rel) + "\n")
        (Path(tmp) / "t.jsonl").write_text("".join(json.dumps({"image": r, "text": f"t{i}"}) + "\n"
                                                   for i, r in enumerate(rel)))
        (Path(tmp) / "t.csv").write_text("path,caption\n" + "".join(f'"{r}",c\n' for r in rel))
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"file_name": rel}), Path(tmp) / "t.parquet")
        want = sorted(it.key for it in from_folder)
        for source in ("list.txt", "t.jsonl", "t.csv", "t.parquet"):
            got = list(read_sources(Path(tmp) / source))
            assert sorted(it.key for it in got) == want, source
        assert [it.text for it in read_sources(Path(tmp) / "t.jsonl")] == [f"t{i}" for i in range(len(rel))]


def test_key_changes_when_the_file_does(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_png(0))
    before = file_item(path).key
    assert file_item(path).key == before
    path.write_bytes(_png(1, (21, 14)))
    assert file_item(path).key != before


def test_tar_shard_items_decode_like_files(tmp_path):
    members = {}
    for i in range(4):
        members[f"s{i:03d}.png"] = _png(i)
        members[f"s{i:03d}.txt"] = f"caption {i}".encode()
    members["s004.json"] = b"{}"  # a sample without an image is no item
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(4):
        (folder / f"s{i:03d}.png").write_bytes(members[f"s{i:03d}.png"])
    items = list(read_sources(str(tmp_path / "shard-*.tar")))
    assert [it.path for it in items] == [f"{shard}/s{i:03d}.png" for i in range(4)]
    assert [it.text for it in items] == [f"caption {i}" for i in range(4)]
    for item, file in zip(items, sorted(folder.iterdir()), strict=True):
        a, b = decode(item, PROCESSOR), decode(file_item(file), PROCESSOR)
        assert isinstance(a, Decoded) and np.array_equal(a.pixels, b.pixels) and (a.width, a.height) == (20, 14)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=400), cut=st.integers(0, 2000))
def test_decode_gives_pixels_or_a_reason(data, cut):
    png = _png(3)
    for blob in (data, png[:cut], png[:cut] + data):
        with tempfile.NamedTemporaryFile(suffix=".png") as f:
            f.write(blob)
            f.flush()
            out = decode(file_item(f.name), PROCESSOR)
        if isinstance(out, Failure):
            assert out.reason and "\n" not in out.reason
        else:
            assert out.pixels.shape == (3, 32, 32) and np.isfinite(out.pixels).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.tuples(st.integers(1, 90), st.integers(1, 90)),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "I;16"]), side=st.sampled_from([16, 32, (24, 40)]))
def test_raw_decoding_then_normalise_is_the_processor_exactly(seed, size, mode, side):
    """Workers send uint8 images; `normalise` makes the processor's float pixels from them, bit for bit."""
    processor = ImageProcessor(size=side)
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        items = [file_item(f.name)] * 2 + [file_item(f.name + ".gone")]
        raw, done = decode_batch(items, processor, raw=True), decode_batch(items, processor)
    assert raw[0].pixels.dtype == np.uint8 and isinstance(raw[2], Failure)
    for a, b in zip(normalise(raw, processor), done, strict=True):
        assert type(a) is type(b)
        if isinstance(a, Decoded):
            assert a.pixels.dtype == np.float32 and np.array_equal(a.pixels, b.pixels)
            assert (a.width, a.height) == (b.width, b.height) == size


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_sources(tmp_path / "nope")
    with pytest.raises(InputError, match="no sources"):
        read_sources([])
    (tmp_path / "t.csv").write_text("name\nx.png\n")
    with pytest.raises(InputError, match="no path column"):
        list(read_sources(tmp_path / "t.csv"))
    (tmp_path / "t.jsonl").write_text('{"path": "a.png"}\nnot json\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        list(read_sources(tmp_path / "t.jsonl"))
    (tmp_path / "list.txt").write_text("gone.png\n")
    [item] = read_sources(tmp_path / "list.txt")  # a listed file that is gone: an error record, not a crash
    assert item.error.startswith("cannot stat the file") and decode(item, PROCESSOR).reason == item.error
