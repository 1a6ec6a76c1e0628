"""CapFilt (`blipkit capfilt`, `blipkit.collections.capfilt`) and the scenes' web noise: wrong captions dropped and true
ones kept on scenes with known noise, synthetic captions added and right, resume after kill -9, the input formats,
bad annotation files as one-line errors naming the entry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("pyarrow")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

import blipkit  # noqa: E402
from blipkit.cli import main  # noqa: E402
from blipkit.collections.capfilt import capfilt, read_annotations  # noqa: E402
from blipkit.data.scenes import COLOURS, SHAPES, generate_split, web_noise, write_dataset  # noqa: E402
from blipkit.errors import InputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE_NOUNS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


def named_pairs(caption: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a scenes caption names: the grammar always writes "[size] colour shape"."""
    w = caption.split()
    return {(a, SHAPE_NOUNS[b]) for a, b in zip(w[:-1], w[1:], strict=True) if a in COLOURS and b in SHAPE_NOUNS}


def objects_of(root: Path, split: str = "train") -> dict[str, set[tuple[str, str]]]:
    boxes = json.loads((root / "annotations" / f"{split}_boxes.json").read_text())
    return {b["image"]: {(o["colour"], o["shape"]) for o in b["objects"]} for b in boxes}


# ------------------------------------------------------------------------------------------------- web noise


def test_web_noise_labels_are_true_and_shares_hold():
    scenes = generate_split(150, seed=21, image_size=64)
    captions = [{"image": f"i{k}", "caption": s.captions, "image_id": k} for k, s in enumerate(scenes)]
    boxes = [{"image": f"i{k}", "objects": [o.to_dict() for o in s.objects]} for k, s in enumerate(scenes)]
    noisy = web_noise(captions, boxes, mismatched=0.3, partial=0.3, seed=1, per_image=3)
    assert noisy == web_noise(captions, boxes, mismatched=0.3, partial=0.3, seed=1, per_image=3)  # seeded
    assert len(noisy) == sum(min(3, len(s.captions)) for s in scenes)
    have = {f"i{k}": {(o.colour, o.shape) for o in s.objects} for k, s in enumerate(scenes)}
    true_texts = {f"i{k}": set(s.captions) for k, s in enumerate(scenes)}
    counts = Counter(e["noise"] for e in noisy)
    assert 0.2 < counts["mismatched"] / len(noisy) < 0.4 and 0.2 < counts["partial"] / len(noisy) < 0.4
    for e in noisy:
        assert e["true_caption"] in true_texts[e["image"]]
        if e["noise"] == "clean":
            assert e["caption"] == e["true_caption"]
        elif e["noise"] == "mismatched":  # another image's caption naming a pair this image lacks
            assert e["caption"] not in true_texts[e["image"]] and named_pairs(e["caption"]) - have[e["image"]]
        else:  # one word swapped, and the caption is false: a pair the image lacks, or a wrong count
            a, b = e["true_caption"].split(), e["caption"].split()
            assert len(a) == len(b) and 1 <= sum(x != y for x, y in zip(a, b, strict=True)) <= 2  # + its article
            assert named_pairs(e["caption"]) - have[e["image"]] or named_pairs(e["caption"]) == named_pairs(
                e["true_caption"]) and e["caption"] != e["true_caption"]


def test_web_noise_checks_its_shares():
    with pytest.raises(InputError, match="exceed 1"):
        web_noise([], [], 0.7, 0.5)
    with pytest.raises(InputError, match="between 0 and 1"):
        web_noise([], [], -0.1, 0.2)
    with pytest.raises(InputError, match="no boxes"):
        web_noise([{"image": "a", "caption": ["x"]}], [], 0.1, 0.1)


# ------------------------------------------------------------------------------------------------- quality


@pytest.fixture(scope="module")
def noisy_scenes(tmp_path_factory) -> Path:
    """16 scenes whose one training caption each is clean, mismatched or partly wrong (labelled)."""
    root = tmp_path_factory.mktemp("noisy")
    write_dataset(root, 16, 1, 1, seed=31, progress=False, web_noise=(0.3, 0.3))
    return root


@pytest.fixture(scope="module")
def shipped_run(noisy_scenes, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("capfilt") / "out"
    result = capfilt(noisy_scenes / "annotations" / "train_web.json", out, samples=2, min_new_tokens=1,
                     image_root=noisy_scenes, batch_size=8, workers=0, progress=False)
    return out, result


FRESH_THRESHOLD = 0.2  # chosen on separate splits (seeds 7 and 8), never on this one (seed 31)


def test_shipped_model_drops_wrong_captions_keeps_true_ones_and_adds_right_ones(noisy_scenes, shipped_run):
    """Default threshold 0.5 (the ITM head's argmax) and 0.2, a threshold chosen on separate splits (seeds 7 and 8,
    80 labelled web captions): there every mismatched and partly wrong caption scored at most 0.083 and 26 of 27
    true ones at least 0.32, while 0.5 kept only 15 of the 27 (the shipped head is unsure of counts such as "two
    shapes" and of positions); 55 of 80 synthetic captions passed 0.5, one of them naming a pair the image lacks."""
    out, result = shipped_run
    web = json.loads((noisy_scenes / "annotations" / "train_web.json").read_text())
    label = {(e["image"], e["caption"]): e["noise"] for e in web}
    rows = pq.read_table(out / "candidates.parquet").to_pylist()
    assert result.summary.added == 16 and result.counts["web"] == 16 and result.counts["synthetic"] == 32
    web_rows = [(label[r["image"], r["caption"]], r["score"]) for r in rows if r["source"] == "web"]
    noisy = [score for kind, score in web_rows if kind != "clean"]
    clean = [score for kind, score in web_rows if kind == "clean"]
    assert len(noisy) >= 5 and len(clean) >= 4
    for threshold in (0.5, FRESH_THRESHOLD):
        assert sum(s < threshold for s in noisy) >= 0.9 * len(noisy), (threshold, web_rows)
    assert sum(s >= FRESH_THRESHOLD for s in clean) >= 0.8 * len(clean), web_rows
    assert min(clean) > sorted(noisy)[len(noisy) // 2]  # every true caption above the median wrong one
    have = objects_of(noisy_scenes)
    synthetic = [r for r in rows if r["source"] == "synthetic"]
    assert {r["sample"] for r in synthetic} == {1, 2}
    kept = [r for r in synthetic if r["verdict"] == "keep"]
    # sampled captions differ between CPUs (the logits do in the last bits); on four splits (seeds 7, 8, 9, 31) the
    # filter kept 16 to 26 of 32 at 0.5, several of them scoring within 0.01 of it
    assert len(kept) >= len(synthetic) // 3
    assert sum(not named_pairs(r["caption"]) - have[r["image"]] for r in kept) >= 0.85 * len(kept)
    for r in rows:
        assert (r["verdict"] == "keep") == (r["score"] >= 0.5)
    # the kept pairs, synthetic ones included, in the input's format and readable by training
    kept_pairs = json.loads((out / "annotations.json").read_text())
    assert sorted((e["image"], e["caption"]) for e in kept_pairs) == sorted(
        (r["image"], r["caption"]) for r in rows if r["verdict"] == "keep")
    assert any(e["caption"] in {r["caption"] for r in kept} for e in kept_pairs)
    assert read_annotations(out / "annotations.json", image_root=noisy_scenes).files[0].is_file()


def test_rerun_with_another_threshold_rewrites_outputs_only(noisy_scenes, shipped_run, monkeypatch):
    out, _ = shipped_run
    before = pq.read_table(out / "candidates.parquet").to_pylist()
    monkeypatch.setattr(blipkit.blip.Blip, "match", lambda *a, **k: pytest.fail("the filter ran again"))
    result = capfilt(noisy_scenes / "annotations" / "train_web.json", out, samples=2, min_new_tokens=1,
                     threshold=0.0, image_root=noisy_scenes, workers=0, progress=False)
    assert result.summary.skipped == 16 and result.summary.added == 0
    after = pq.read_table(out / "candidates.parquet").to_pylist()
    assert [r["score"] for r in after] == [r["score"] for r in before]
    assert all(r["verdict"] == "keep" for r in after)
    with pytest.raises(InputError, match="samples=2, not 3"):
        capfilt(noisy_scenes / "annotations" / "train_web.json", out, samples=3, image_root=noisy_scenes,
                progress=False)
    # a directory whose samples were seeded per batch (no "seeding" entry) is not resumed with per-image samples
    older = out.parent / "older"
    older.mkdir()
    record = json.loads((out / "capfilt.json").read_text())
    del record["settings"]["seeding"]
    (older / "capfilt.json").write_text(json.dumps(record))
    with pytest.raises(InputError, match="seeding=None, not 'per-image'"):
        capfilt(noisy_scenes / "annotations" / "train_web.json", older, samples=2, min_new_tokens=1,
                image_root=noisy_scenes, progress=False)


# ------------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random BLIP with every head (fast enough to kill mid-job)."""
    from blipkit.train.model import scratch_model
    from blipkit.train.vocab import build_tokenizer

    words = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
    path = tmp_path_factory.mktemp("tiny") / "model"
    blipkit.save(scratch_model("tiny", build_tokenizer(words, max_length=40), seed=0), path)
    return path


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many")
    write_dataset(root, 40, 1, 1, seed=41, image_size=32, progress=False, web_noise=(0.3, 0.3))
    return root


N_KILL = 60


def test_kill9_then_resume_every_image_once(tiny, tmp_path):
    root = tmp_path / "scenes"
    write_dataset(root, N_KILL, 1, 1, seed=43, image_size=32, progress=False, web_noise=(0.3, 0.3))
    out = tmp_path / "out"
    ann = root / "annotations" / "train_web.json"
    # captions of exactly 20 tokens: each one-image batch takes long enough to be killed among the first ones
    cmd = [sys.executable, "-m", "blipkit.cli", "capfilt", str(ann), "--image-root", str(root), "--out", str(out),
           "--captioner", str(tiny), "--samples", "2", "--batch-size", "1", "--workers", "1",
           "--min-new-tokens", "20", "--max-new-tokens", "20", "--json", "--commit-seconds", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list((out / "parts").glob("part-*.parquet"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the job ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (out / "candidates.parquet").exists()
    parts = sorted((out / "parts").glob("part-*.parquet"))
    done_images = {r["key"] for p in parts for r in pq.read_table(p).to_pylist()}
    assert 3 <= len(done_images) < N_KILL
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert summary["skipped"] == len(done_images) and summary["added"] == N_KILL - len(done_images)
    rows = pq.read_table(out / "candidates.parquet").to_pylist()
    web = [r for r in rows if r["source"] == "web"]
    assert sorted(r["image"] for r in web) == sorted(e["image"] for e in json.loads(ann.read_text()))  # once each
    assert Counter(r["image"] for r in rows if r["source"] == "synthetic") == Counter({r["image"]: 2 for r in web})


@pytest.fixture(scope="module")
def captioners():
    import torch

    models = {name: blipkit.load(name) for name in ("scenes-blip", "scenes-blip2-opt")}
    pixels = {name: torch.randn(6, 3, *m.processor.size, generator=torch.Generator().manual_seed(0))
              for name, m in models.items()}
    return models, pixels


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(["scenes-blip", "scenes-blip2-opt"]),
       picks=st.lists(st.integers(0, 5), min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**63 - 1),
       captions=st.sampled_from([1, 2]))
def test_sampled_captions_with_a_generator_per_image_do_not_depend_on_the_batch(captioners, name, picks, seed,
                                                                                captions):
    """What makes CapFilt's synthetic captions the same whatever the batch, the executor or a resume: any subset of
    images in any order, each with its own generator, gets the captions each image gets alone."""
    import torch

    model, x = captioners[0][name], captioners[1][name]

    def gens(indices):
        return [torch.Generator().manual_seed((seed + i) % 2**63) for i in indices]

    batched = model.caption(x[picks], do_sample=True, num_captions=captions, generator=gens(picks))
    alone = [model.caption(x[i : i + 1], do_sample=True, num_captions=captions, generator=gens([i]))[0]
             for i in picks]
    assert batched == alone
    if len(picks) > 1:
        with pytest.raises(InputError, match=f"got 1 generators for {len(picks)} inputs"):
            model.caption(x[picks], do_sample=True, generator=gens(picks[:1]))

# ------------------------------------------------------------------------------------------------- formats


def test_karpathy_parquet_and_folder_keep_their_format(many, tiny, tmp_path):
    web = json.loads((many / "annotations" / "train_web.json").read_text())[:4]
    karpathy = tmp_path / "dataset_scenes.json"
    karpathy.write_text(json.dumps({"images": [
        {"filepath": str(Path(e["image"]).parent), "filename": Path(e["image"]).name, "split": "train",
         "sentences": [{"raw": e["caption"], "tokens": e["caption"].split()}], "imgid": k} for k, e in enumerate(web)],
        "dataset": "scenes"}))
    r = capfilt(karpathy, tmp_path / "k", captioner=str(tiny), samples=1, threshold=0.0, image_root=many,
                workers=0, max_new_tokens=6, progress=False)
    out = json.loads((tmp_path / "k" / "annotations.json").read_text())
    assert out["dataset"] == "scenes" and [e["imgid"] for e in out["images"]] == [0, 1, 2, 3]
    assert all(len(e["sentences"]) == 2 and e["sentences"][0]["raw"] == w["caption"]
               for e, w in zip(out["images"], web, strict=True))
    assert r.counts["web_kept"] == 4 and r.counts["synthetic_kept"] == 4

    table = tmp_path / "web.parquet"
    pq.write_table(pa.table({"path": [str(many / e["image"]) for e in web], "text": [e["caption"] for e in web]}),
                   table)
    capfilt(table, tmp_path / "p", captioner=str(tiny), samples=0, threshold=1.0, workers=0, progress=False)
    kept = pq.read_table(tmp_path / "p" / "annotations.parquet")
    assert kept.column_names == ["path", "text"] and kept.num_rows == 0  # threshold 1: nothing is that sure
    assert pq.read_table(tmp_path / "p" / "candidates.parquet").num_rows == 4

    folder = tmp_path / "folder"
    folder.mkdir()
    for k, e in enumerate(web):
        (folder / f"{k}.png").write_bytes((many / e["image"]).read_bytes())
        (folder / f"{k}.txt").write_text(e["caption"] + "\n")
    capfilt(folder, tmp_path / "f", captioner=str(tiny), samples=0, threshold=0.0, workers=0, progress=False)
    pairs = json.loads((tmp_path / "f" / "annotations.json").read_text())
    assert [(p["image"], p["caption"]) for p in pairs] == [(f"{k}.png", e["caption"]) for k, e in enumerate(web)]


# ------------------------------------------------------------------------------------------------- bad files


@pytest.fixture()
def image(tmp_path) -> Path:
    scene = generate_split(1, seed=1, image_size=32)[0]
    scene.image.save(tmp_path / "ok.png")
    return tmp_path / "ok.png"


@pytest.mark.parametrize("body, message", [
    ('[{"image": "ok.png", "caption": "a red circle"}, {"image": "gone.png", "caption": "a cat"}]',
     r"entry 1 \(gone.png\): image file .*gone.png does not exist"),
    ('[{"image": "ok.png", "caption": "a red circle"}, {"image": "ok.png", "caption": ""}]',
     r"entry 1 \(ok.png\): has an empty caption"),
    ('[{"image": "ok.png", "caption": "a red circle"}, {"image": "ok.png"}]',
     r"entry 1: needs 'image' \(a path\) and 'caption'"),
    ('[{"image": "ok.png", "caption": "a red circle"},', r"not valid JSON"),
    ('{"image": "ok.png"}', r"expected a list of"),
])
def test_bad_annotation_files_are_one_line_errors_naming_the_entry(image, tmp_path, capsys, body, message):
    ann = tmp_path / "ann.json"
    ann.write_text(body)
    with pytest.raises(InputError, match=message):
        read_annotations(ann)
    assert main(["capfilt", str(ann), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("blipkit capfilt: error: ") and str(ann) in err
    assert not (tmp_path / "out").exists()  # refused before any model loads or anything is written


def test_bad_parquet_rows_name_the_row(image, tmp_path):
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": ["ok.png", "ok.png"], "caption": ["a red circle", " "]}), table)
    with pytest.raises(InputError, match=r"row 1 \(ok.png\): has an empty caption"):
        read_annotations(table)
    pq.write_table(pa.table({"image": ["ok.png", "no.png"], "caption": ["a", "b"]}), table)
    with pytest.raises(InputError, match=r"row 1 \(no.png\): image file .* does not exist"):
        read_annotations(table)
    assert len(read_annotations(table, skip_bad=True)) == 1
    pq.write_table(pa.table({"image": ["ok.png"], "words": ["a"]}), table)
    with pytest.raises(InputError, match="needs an image column .* and a caption column"):
        read_annotations(table)


def test_options_are_checked(image, tmp_path, tiny):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "ok.png", "caption": "a red circle"}]))
    for kwargs, message in (({"threshold": 1.5}, "threshold"), ({"samples": -1}, "samples"),
                            ({"decoding": "greedy"}, "decoding"), ({"decoding": "beam", "samples": 4}, "num_beams")):
        with pytest.raises(InputError, match=message):
            capfilt(ann, tmp_path / "o", captioner=str(tiny), progress=False, **kwargs)
    assert main(["capfilt", str(ann), "--out", str(tmp_path / "o"), "--threshold", "2"]) == 2


def test_outputs_follow_the_annotation_file_of_the_run(many, tiny, tmp_path):
    """Parts written by jobs over other files (a subset, another order) are placed by key, not by their position."""
    web = json.loads((many / "annotations" / "train_web.json").read_text())[:6]
    first, reordered = tmp_path / "first.json", tmp_path / "reordered.json"
    first.write_text(json.dumps(web[3:]))  # a job over the second half only
    reordered.write_text(json.dumps(web[::-1]))
    capfilt(first, tmp_path / "o", captioner=str(tiny), samples=0, image_root=many, workers=0, progress=False)
    r = capfilt(reordered, tmp_path / "o", captioner=str(tiny), samples=0, image_root=many, workers=0, progress=False)
    assert (r.summary.skipped, r.summary.added) == (3, 3)
    rows = pq.read_table(tmp_path / "o" / "candidates.parquet").to_pylist()
    assert [(x["image"], x["caption"]) for x in rows] == [(e["image"], e["caption"]) for e in web[::-1]]
