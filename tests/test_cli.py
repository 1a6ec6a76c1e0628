"""The `blipkit` command line: the real entry point in subprocesses (run side by side), JSON parsed, PNGs opened;
bad input gives one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import blipkit
from blipkit import cli, tasks

from .test_tasks import TEXTS, png, scene_files, tiny_blip

COMMANDS = ("match", "classify", "caption", "ask", "ground", "attention", "matrix", "plot-space", "info")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models on one thread


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    blipkit.save(tiny_blip(root / "build"), root / "model")
    blipkit.save(tiny_blip(root / "build-cap", parts=("vision_model", "text_decoder")), root / "captioner")
    images = scene_files(root / "scenes")
    (root / "empty").mkdir()
    (root / "out").mkdir()  # pictures are written into existing folders only
    (root / "texts.txt").write_text("a red circle\na blue square\n")
    return {"root": root, "model": root / "model", "captioner": root / "captioner", "scenes": root / "scenes",
            "scene": images[1], "empty": root / "empty", "texts": root / "texts.txt"}


def argv(s: dict[str, Path]) -> dict[str, list[str]]:
    """The subprocess runs: name -> arguments."""
    m = ["--model", str(s["model"])]
    out = s["root"] / "out"
    return {
        "match": ["match", str(s["scene"]), "-t", *TEXTS, "--json", *m],
        "ground": ["ground", str(s["scene"]), "the red circle", "-t", "a blue square", "-o", str(out / "ground.png"),
                   "--source", "itm", "--json", *m],
        "attention": ["attention", str(s["scene"]), "a red circle", "--suppress-common", "-o",
                      str(out / "attention.png"), "--json", *m],
        "plot-space": ["plot-space", str(s["scenes"]), "--texts-file", str(s["texts"]), "--method", "pca", "-o",
                       str(out / "space.png"), "--json", *m],
        "bad-path": ["match", str(s["root"] / "nope.png"), "-t", "a red circle", *m],
    }


@pytest.fixture(scope="module")
def runs(setup) -> dict[str, subprocess.CompletedProcess]:
    """Every run started at once (each is mostly interpreter start-up), then collected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    commands = {name: [sys.executable, "-m", "blipkit.cli", *args] for name, args in argv(setup).items()}
    commands["imports"] = [sys.executable, "-c", "import sys, blipkit.tasks, blipkit.cli; blipkit.cli.build_parser(); "
                           "print(sorted({'matplotlib', 'sklearn', 'transformers'} & set(sys.modules)))"]
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for name, cmd in commands.items()}
    done = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return done


def ok(runs, name: str):
    r = runs[name]
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout)


def test_match(runs):
    result = ok(runs, "match")  # one image: one JSON line
    hits = result["hits"]
    assert sorted(h["text"] for h in hits) == sorted(TEXTS)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for h in hits:
        assert h["score"] == pytest.approx(h["itm_logit"] + h["itc"], abs=1e-5) and 0 <= h["itm"] <= 1


def run_json(setup, capsys, *args: str):
    """`blipkit ARGS --json` run in this process: the parsed output."""
    assert cli.main([*args, "--json", "--model", str(setup["model"])]) == 0
    return json.loads(capsys.readouterr().out)


def run_lines(setup, capsys, *args: str) -> list:
    """`blipkit ARGS --json` of a bulk command: one JSON object per line."""
    assert cli.main([*args, "--json", "--model", str(setup["model"])]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_classify_caption_ask(setup, capsys):
    labels = ["red circle", "blue square", "star"]
    results = run_lines(setup, capsys, "classify", str(setup["scenes"]), "-l", *labels, "-k", "2")
    assert len(results) == 4 and all(set(r) == {"image", "top"} for r in results)
    assert all(len(r["top"]) == 2 and r["top"][0]["score"] >= r["top"][1]["score"] for r in results)
    captions = run_lines(setup, capsys, "caption", str(setup["scene"]), str(setup["scenes"] / "scene0.png"),
                         "--max-new-tokens", "4")
    assert [Path(c["image"]).name for c in captions] == [setup["scene"].name, "scene0.png"]
    assert all(isinstance(c["caption"], str) for c in captions)
    answers = run_lines(setup, capsys, "ask", str(setup["scenes"] / "*.png"), "-q", "what color is it?", "--answers",
                        "red", "blue")
    assert len(answers) == 4 and {a["answer"] for a in answers} <= {"red", "blue"}


def test_ground(runs, setup):
    data = ok(runs, "ground")
    assert [r["phrase"] for r in data["results"]] == ["the red circle", "a blue square"]
    for r in data["results"]:
        assert len(r["box"]) == 4 and all(0 <= v <= 1 for v in r["box"]) and r["layer"] == 0
        assert r["source"] == "itm"
    png(Path(data["picture"]))


def test_attention(runs):
    data = ok(runs, "attention")
    assert data["tokens"] == ["[CLS]", "a", "red", "circle", "[SEP]"]
    assert data["shape"] == [5, 4, 4, 4]
    maps = np.array(data["maps"])
    assert maps.shape == (5, 4, 4, 4) and np.allclose(maps.min(axis=0), 0, atol=1e-7)  # common pattern suppressed
    png(Path(data["picture"]))


def test_matrix_and_plot_space(runs, setup, capsys):
    data = run_json(setup, capsys, "matrix", str(setup["scenes"]), "-t", *TEXTS[:3], "--head", "itm", "-o",
                    str(setup["root"] / "out" / "matrix.png"))
    scores = np.array(data["scores"])
    assert scores.shape == (4, 3) and ((scores >= 0) & (scores <= 1)).all()
    png(Path(data["picture"]))
    space = ok(runs, "plot-space")
    assert space["method"] == "pca" and [p["kind"] for p in space["points"]] == ["image"] * 4 + ["text"] * 2
    png(Path(space["picture"]))


def test_info(setup, capsys):
    data = run_json(setup, capsys, "info")
    assert data["total_parameters"] == tasks.model_facts(blipkit.load(setup["model"]))["total_parameters"]
    assert data["config"]["vision"]["grid"] == 4


def test_error_in_subprocess_is_one_line(runs):
    r, message = runs["bad-path"], "nope.png' does not exist"
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (["classify", "{empty}", "-l", "x"], "holds no images"),
    (["ground", "{scene}", "-t", "a red circle", "--layer", "9"], "layer 9 does not exist"),
    (["classify", "{scene}"], "no labels given"),
    (["classify", "{scene}", "--labels-file", "{root}/missing.txt"], "does not exist"),
    (["ground", "{scenes}", "-t", "a red circle"], "takes one image"),
    (["matrix", "{scene}", "-t", "x", "-o", "{root}/m.jpg"], "ending in .png"),
    (["match", "{scene}", "-t", "x", "--device", "nonsense"], "is not a device"),
    (["attention", "{scene}"], "need a text"),
    (["classify", "{scene}", "-l", "circle", "--model", "{captioner}"], "cannot classify images zero-shot"),
    (["caption", "{scene}", "--beams", "0"], "argument --beams: 0 is out of range: use 1 to 64"),
    (["caption", "{scene}", "--min-new-tokens", "9", "--max-new-tokens", "3"], "more than --max-new-tokens"),
    (["match", "{scene}", "-t", "x", "-k", "0"], "argument -k/--top-k: 0 is out of range: use at least 1"),
])
def test_bad_input_is_one_line(setup, capsys, args, message):
    args = [a.format(**setup) for a in args]
    args += [] if "--model" in args else ["--model", str(setup["model"])]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and message in captured.err


def test_help_has_examples_for_every_command(capsys):
    parser = cli.build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert "examples:" in text and f"blipkit {name}" in text and "--model" in text and "--json" in text


def test_progress_bar_on_many_images(setup, tmp_path, capsys):
    many = scene_files(tmp_path / "many", n=16, seed=5, size=32)
    assert cli.main(["classify", str(many[0].parent), "-l", "circle", "square", "--model", str(setup["model"])]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 16 and "/16 [" in captured.err  # a tqdm bar on stderr


def test_plotting_libraries_load_only_when_drawing(runs):
    r = runs["imports"]
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
