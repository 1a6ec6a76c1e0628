"""Bad command lines, swept: every subcommand with bad numbers, files, texts and outputs must end with exit status 2
and one line on stderr (no traceback, nothing on stdout), before any work is done; and bulk commands keep what
succeeded when some of their images are bad.

The sweep runs `blipkit.cli.main` in this process with the shipped `scenes-blip` model (it loads in well under a
second), so hundreds of cases stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blipkit import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "red-circle-blue-square.png"
SURROGATE = os.fsdecode(b"\xff\xfe")  # what Python makes of a non-UTF-8 byte in sys.argv or a file name

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs of every kind the sweep passes."""
    root = tmp_path_factory.mktemp("inputs")
    good = root / "good.png"
    shutil.copy(EXAMPLE, good)
    (root / "zero.png").write_bytes(b"")
    (root / "cut.png").write_bytes(EXAMPLE.read_bytes()[:300])
    (root / "text.png").write_text("not an image\n")
    (root / "folder").mkdir()
    (root / "nothing").mkdir()
    (root / "folder" / "a.png").write_bytes(EXAMPLE.read_bytes())
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("  \n\t\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad\x80\n")
    (root / "controls.txt").write_text("\x01\x02\n")
    (root / "texts.txt").write_text("a red circle\na blue square\n")
    (root / "binary.json").write_bytes(b"\x89PNG\x00\xff")
    (root / "empty.json").write_text("")
    (root / "list.json").write_text("[]")
    (root / "data.json").write_text(json.dumps([{"image": "good.png", "caption": "a red circle"}]))
    (root / "zero-data.json").write_text(json.dumps([{"image": "good.png", "caption": "a red circle"},
                                                      {"image": "zero.png", "caption": "a blue square"}]))
    weird = os.fsencode(root) + b"/\xff\xfe.png"
    with open(weird, "wb") as f:
        f.write(b"")
    return {"root": str(root), "good": str(good), **{k: str(root / v) for k, v in {
        "zero": "zero.png", "cut": "cut.png", "text": "text.png", "folder": "folder", "nothing": "nothing",
        "empty": "empty.txt", "blank": "blank.txt", "binary": "binary.txt", "controls": "controls.txt",
        "texts": "texts.txt", "binjson": "binary.json", "emptyjson": "empty.json", "listjson": "list.json",
        "data": "data.json", "zerodata": "zero-data.json"}.items()},
        "weird": os.fsdecode(weird), "missing": str(root / "missing.png"), "nodir": str(root / "no" / "dir" / "x.png"),
        "under_file": str(root / "texts.txt" / "x.png")}


# ------------------------------------------------------------------------------------------------------- the cases

# A valid command line for each subcommand; the sweep breaks one thing in it at a time.
BASE = {
    "match": ["match", "{good}", "-t", "a red circle", "a blue square"],
    "classify": ["classify", "{good}", "-l", "circle", "square"],
    "caption": ["caption", "{good}"],
    "ask": ["ask", "{good}", "-q", "what color is the circle?"],
    "ground": ["ground", "{good}", "the red circle"],
    "attention": ["attention", "{good}", "a red circle"],
    "matrix": ["matrix", "{good}", "-t", "a red circle"],
    "plot-space": ["plot-space", "{good}", "-t", "a red circle", "a blue square"],
    "info": ["info"],
    "eval": ["eval", "--data", "{data}", "--tasks", "retrieval"],
    "train": ["train", "--data", "{data}", "--out", "{root}/run", "--steps", "1", "--batch-size", "1"],
}

INT, FLOAT = "int", "float"
# Numeric options: (command, option, kind, lowest valid value); each gets values below it, non-numbers and huge ones.
NUMERIC = [
    ("match", "--top-k", INT, 1), ("match", "--top-n", INT, 1),
    ("classify", "--top-k", INT, 1), ("classify", "--batch-size", INT, 1),
    ("caption", "--beams", INT, 1), ("caption", "--max-new-tokens", INT, 1), ("caption", "--min-new-tokens", INT, 0),
    ("caption", "--num-captions", INT, 1), ("caption", "--batch-size", INT, 1), ("caption", "--seed", INT, 0),
    ("caption", "--top-p", FLOAT, 0.01), ("caption", "--temperature", FLOAT, 0.01),
    ("ask", "--beams", INT, 1), ("ask", "--batch-size", INT, 1),
    ("ground", "--threshold", FLOAT, 0.01), ("ground", "--layer", INT, None),
    ("attention", "--layer", INT, None),
    ("matrix", "--batch-size", INT, 1),
    ("plot-space", "--seed", INT, 0), ("plot-space", "--batch-size", INT, 1),
    ("eval", "--k", INT, 1), ("eval", "--limit", INT, 1), ("eval", "--batch-size", INT, 1),
    ("eval", "--num-beams", INT, 1), ("eval", "--layer", INT, None),
    ("train", "--steps", INT, 1), ("train", "--batch-size", INT, 1), ("train", "--lr", FLOAT, 1e-9),
    ("train", "--warmup", INT, 0), ("train", "--weight-decay", FLOAT, 0), ("train", "--clip", FLOAT, 0),
    ("train", "--save-every", INT, 1), ("train", "--log-every", INT, 1), ("train", "--seed", INT, 0),
    ("train", "--workers", INT, 0), ("train", "--stop-after", INT, 1),
]
# Upper limits the command line sets, so a typo cannot ask for gigabytes or hours before anything is checked.
HUGE = {"--beams": "100000", "--num-beams": "100000", "--max-new-tokens": "10000000", "--min-new-tokens": "10000000",
        "--num-captions": "100000", "--workers": "100000", "--seed": str(2**70), "--layer": str(2**70),
        "--top-p": "1.5", "--threshold": "1.5", "--batch-size": "100000000", "--lr": "1e6"}


def numeric_cases() -> list[tuple[str, list[str]]]:
    """Bad values of every numeric option, each in an otherwise valid command line."""
    cases = []
    for command, option, kind, low in NUMERIC:
        bad = ["abc", "", "nan", "inf", "-inf", "1e999", "0x10", "1,5"] + (["2.5", "1e3"] if kind == INT else [])
        if low is not None:
            bad.append(str(low - 1) if kind == INT else str(-abs(low) - 1.0))
            if low > 0:
                bad.append("0")
        if option in HUGE:
            bad.append(HUGE[option])
        cases += [(f"{command} {option}={v!r}", [*BASE[command], option, v]) for v in bad]
    return cases


IMAGE_COMMANDS = ("match", "classify", "caption", "ask", "ground", "attention", "matrix", "plot-space")
BAD_IMAGES = ("{missing}", "{zero}", "{cut}", "{text}", "{nothing}", "{weird}", "{root}/*.jpeg", "{root}/no*.png")
TEXT_FILES = {"match": "--texts-file", "classify": "--labels-file", "ask": "--answers-file",
              "ground": "--texts-file", "matrix": "--texts-file", "plot-space": "--texts-file"}
BAD_TEXT_FILES = ("{missing}", "{folder}", "{empty}", "{blank}", "{binary}", "{controls}", "{weird}")
TEXT_OPTIONS = {"match": "-t", "classify": "-l", "ask": "--answers", "ground": "-t", "attention": "-t",
                "matrix": "-t", "plot-space": "-t", "caption": "--prompt"}
BAD_TEXTS = ("", "   ", "\x01\x02", SURROGATE, f"a red {SURROGATE} circle")
PICTURES = ("ground", "attention", "matrix", "plot-space")
BAD_OUTS = ("{nodir}", "{folder}", "{good}", "{under_file}", "{root}/x.jpg", "{root}")


def file_cases() -> list[tuple[str, list[str]]]:
    """Bad images, text files, texts and outputs."""
    cases = []
    for command in IMAGE_COMMANDS:
        base = BASE[command]
        for bad in BAD_IMAGES:
            cases.append((f"{command} image {bad}", [base[0], bad, *base[2:]]))
    for command, option in TEXT_FILES.items():
        for bad in BAD_TEXT_FILES:
            args = [*BASE[command], option, bad]
            if command == "classify":
                args = ["classify", "{good}", option, bad]
            cases.append((f"{command} {option} {bad}", args))
    for command, option in TEXT_OPTIONS.items():
        for bad in BAD_TEXTS:
            cases.append((f"{command} {option} {bad!r}", [*BASE[command], option, bad]))
    for bad in BAD_TEXTS:
        cases.append((f"ask -q {bad!r}", ["ask", "{good}", "-q", bad]))
        cases.append((f"classify --template {bad!r}", [*BASE["classify"], "--template", bad]))
    for command in PICTURES:
        for bad in BAD_OUTS:
            cases.append((f"{command} -o {bad}", [*BASE[command], "-o", bad]))
    return cases


def option_cases() -> list[tuple[str, list[str]]]:
    """Global options, eval and train data and outputs, option combinations."""
    cases = []
    for command, base in BASE.items():
        cases += [
            (f"{command} --device", [*base, "--device", "nonsense"]),
            (f"{command} --device cuda:7", [*base, "--device", "cuda:7"]),
            (f"{command} --dtype", [*base, "--dtype", "int8"]),
            (f"{command} --model missing", [*base, "--model", "{root}/no-such-model"]),
            (f"{command} --model file", [*base, "--model", "{texts}"]),
            (f"{command} --model empty dir", [*base, "--model", "{nothing}"]),
            (f"{command} unknown option", [*base, "--frobnicate"]),
        ]
    for name in ("eval", "train"):
        base = BASE[name]
        for bad in ("{missing}", "{binjson}", "{emptyjson}", "{listjson}", "{nothing}", "{texts}", "{zerodata}",
                    "{weird}"):
            cases.append((f"{name} --data {bad}", [name, "--data", bad, *base[3:]]))
        for option in ("--vqa", "--image-root"):
            cases.append((f"{name} {option} missing", [*base, option, "{missing}"]))
        cases.append((f"{name} --vqa binary", [*base, "--vqa", "{binjson}"]))
        cases.append((f"{name} --split none", [*base, "--split", "nosuchsplit", "--data", "{root}"]))
    ev = BASE["eval"]
    cases += [
        ("eval --out missing dir", [*ev, "--out", "{nodir}"]),
        ("eval --out folder", [*ev, "--out", "{folder}"]),
        ("eval --out under file", [*ev, "--out", "{under_file}"]),
        ("eval --out = --data", [*ev, "--out", "{data}"]),
        ("eval --tasks bogus", [*ev, "--tasks", "bogus"]),
        ("eval --tasks empty", [*ev, "--tasks", ","]),
        ("eval --boxes binary", [*ev, "--boxes", "{binjson}"]),
        ("eval --boxes missing", [*ev, "--boxes", "{missing}"]),
    ]
    tr = BASE["train"]
    cases += [
        ("train --out is a file", [*tr, "--out", "{texts}"]),
        ("train --out under file", [*tr, "--out", "{under_file}"]),
        ("train --objectives bogus", [*tr, "--objectives", "itc,bogus"]),
        ("train --lm-filter bad regex", [*tr, "--lm-filter", "("]),
        ("train --stage bogus", [*tr, "--stage", "bogus"]),
        ("train --amp bogus", [*tr, "--amp", "fp8"]),
        ("train --arch bogus", [*tr, "--arch", "huge"]),
        ("train --lm-arch for blip", [*tr, "--lm-arch", "small"]),
        ("train qformer2 without init", [*tr, "--stage", "qformer2"]),
        ("train qformer1 without vision", [*tr, "--stage", "qformer1"]),
        ("train --dtype float16", [*tr, "--dtype", "float16"]),
        ("train --num-queries huge", [*tr, "--stage", "qformer1", "--init-vision", "scenes-blip", "--num-queries",
                                      "1000000000"]),
        ("train --qformer-layers 0", [*tr, "--stage", "qformer1", "--init-vision", "scenes-blip", "--qformer-layers",
                                      "0"]),
        ("train --vocab-size -1", [*tr, "--stage", "lm", "--vocab-size", "-1"]),
        ("train --text-length 0", [*tr, "--stage", "lm", "--text-length", "0"]),
        ("train --tag-min-count 0", [*tr, "--stage", "tags", "--tag-min-count", "0"]),
        ("caption min > max", [*BASE["caption"], "--min-new-tokens", "9", "--max-new-tokens", "3"]),
        ("ground two images", ["ground", "{good}", "{folder}/a.png", "the red circle"]),
        ("ground second image name", ["ground", "{good}", "other.png", "the red circle"]),
        ("attention two images", ["attention", "{good}", "{folder}/a.png", "a red circle"]),
        ("attention folder", ["attention", "{folder}", "a red circle"]),
        ("plot-space one point", ["plot-space", "{good}"]),
        ("no command", []),
        ("unknown command", ["frobnicate"]),
    ]
    return cases


CASES = numeric_cases() + file_cases() + option_cases()


def run(args: list[str], files: dict[str, str], capsys, raw: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`blipkit ARGS RAW` with ARGS' {placeholders} filled in: (exit status, stdout, stderr); a SystemExit from the
    parser counts as its status."""
    args = [a.format(**files) for a in args] + list(raw)
    try:
        code = cli.main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def is_clean(code: int, out: str, err: str) -> bool:
    """Exit status 2, nothing on stdout, one line on stderr, no traceback."""
    return code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line_is_one_line(files, capsys, args):
    code, out, err = run(args, files, capsys)
    assert is_clean(code, out, err), (code, out[-500:], err[-1500:])
    assert err.startswith("blipkit"), err


def test_the_sweep_is_large():
    assert len(CASES) >= 300


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=st.sampled_from([(c, o) for c, o, _, _ in NUMERIC]), value=st.text(max_size=12))
def test_any_text_as_a_number(files, capsys, option, value):
    """Any text given to a numeric option is either taken or refused in one line before the work starts."""
    command, flag = option
    try:
        float(value)
    except ValueError:
        code, out, err = run(BASE[command], files, capsys, (flag, value))
        assert is_clean(code, out, err), (flag, value, code, err)


# ------------------------------------------------------------------------------------------------------- no lost output


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before the work starts."""
    import blipkit

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad option was found")

    monkeypatch.setattr(blipkit, "load", refuse)


@pytest.mark.parametrize("args, message", [
    (["eval", "--data", "{data}", "--out", "{nodir}"], "does not exist (create it first)"),
    (["eval", "--data", "{data}", "--out", "{folder}"], "is a folder"),
    (["eval", "--data", "{data}", "--out", "{data}"], "is an input of this command and would be overwritten"),
    (["ground", "{good}", "the red circle", "-o", "{good}"], "is an input of this command and would be overwritten"),
    (["attention", "{good}", "a red circle", "-o", "{under_file}"], "is not a folder"),
    (["matrix", "{folder}", "-t", "a red circle", "-o", "{folder}/a.png"], "would be overwritten"),
    (["train", "--data", "{data}", "--out", "{texts}"], "is a file: give a folder"),
    (["train", "--data", "{data}", "--out", "{under_file}/run"], "is a file, so the folder cannot be created"),
    (["eval", "--data", "{zerodata}"], "zero.png is empty (fix the entry, or pass --skip-bad"),
    (["train", "--data", "{zerodata}", "--out", "{root}/run"], "zero.png is empty (fix the entry, or pass --skip-bad"),
    (["eval", "--data", "{data}", "--steps", "0"], "unrecognized arguments: --steps 0"),
])
def test_checked_before_the_model_loads(files, capsys, no_model, args, message):
    code, out, err = run(args, files, capsys)
    assert is_clean(code, out, err) and message in err, err


@pytest.mark.parametrize("command", ["ground", "attention"])
def test_a_second_image_is_not_read_as_text(files, capsys, no_model, command):
    code, out, err = run([command, "{good}", "{folder}/a.png", "a red circle"], files, capsys)
    assert is_clean(code, out, err)
    assert f"{command} takes one image file, and the " in err and "looks like another one" in err


def test_ground_reads_a_file_name_given_after_t(files, capsys):
    """The documented escape: a phrase that is a file name goes after -t."""
    code, out, err = run(["ground", "{good}", "-t", "b.png", "--json"], files, capsys)
    assert code == 0, err
    assert [r["phrase"] for r in json.loads(out)["results"]] == ["b.png"]


@pytest.fixture
def mixed(files, tmp_path) -> Path:
    """A folder of two readable images and three bad ones (empty, cut short, text), sorted among them."""
    for name in ("a-good.png", "c-good.png"):
        shutil.copy(EXAMPLE, tmp_path / name)
    (tmp_path / "b-empty.png").write_bytes(b"")
    (tmp_path / "d-cut.png").write_bytes(EXAMPLE.read_bytes()[:300])
    (tmp_path / "e-text.png").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize("command, extra, key", [
    ("caption", ["--beams", "1", "--max-new-tokens", "5"], "caption"),
    ("ask", ["-q", "what color is the circle?"], "answer"),
    ("classify", ["-l", "circle", "square", "-k", "1"], "top"),
    ("match", ["-t", "a red circle", "a blue square"], "hits"),
])
def test_bulk_commands_keep_what_succeeded(mixed, capsys, command, extra, key):
    code = cli.main([command, str(mixed), *extra, "--json"])
    captured = capsys.readouterr()
    assert code == 1
    lines = [json.loads(line) for line in captured.out.splitlines()]
    done = {Path(r["image"]).name: r for r in lines}
    assert sorted(done) == ["a-good.png", "b-empty.png", "c-good.png", "d-cut.png", "e-text.png"]
    assert all(key in done[n] for n in ("a-good.png", "c-good.png"))
    assert all("error" in done[n] and key not in done[n] for n in ("b-empty.png", "d-cut.png", "e-text.png"))
    err = captured.err.strip().splitlines()
    assert [line.split(": ")[1] for line in err[:3]] == [f"skipped {mixed / n}" for n in
                                                         ("b-empty.png", "d-cut.png", "e-text.png")]
    assert err[3].startswith(f"blipkit {command}: 3 of 5 images could not be read and have no result: ")
    assert len(err) == 4


def test_results_are_written_as_they_are_computed(mixed, capsys, monkeypatch):
    """Each caption reaches stdout before the next image is captioned (a run stopped half-way keeps its half)."""
    import blipkit
    from blipkit.cli import common

    events: list[str] = []
    load, write = blipkit.load, common.write_line

    def loaded(*args, **kwargs):
        model = load(*args, **kwargs)
        caption = model.caption
        model.caption = lambda *a, **k: (events.append("caption"), caption(*a, **k))[1]
        return model

    monkeypatch.setattr(blipkit, "load", loaded)
    monkeypatch.setattr(common, "write_line", lambda text, stream=None: (events.append(
        "write" if stream is None else "warn"), write(text, stream))[1])
    args = ["--batch-size", "1", "--beams", "1", "--min-new-tokens", "1", "--max-new-tokens", "4"]
    assert cli.main(["caption", str(mixed), *args]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [Path(line.split("\t")[0]).name for line in out] == ["a-good.png", "c-good.png"]
    assert events == ["caption", "write", "warn", "caption", "write", "warn", "warn", "warn"]


def test_one_bad_image_alone_is_an_error(files, capsys):
    code, out, err = run(["caption", "{zero}"], files, capsys)
    assert is_clean(code, out, err) and "zero.png" in err


def test_non_utf8_file_name_in_the_output(files, tmp_path, capsys):
    """A file name that is not UTF-8 is written with backslash escapes, which JSON reads back as the same name."""
    name = os.fsencode(tmp_path) + b"/\xe9t\xe9.png"
    with open(name, "wb") as f:
        f.write(EXAMPLE.read_bytes())
    assert cli.main(["caption", os.fsdecode(name), "--beams", "1", "--max-new-tokens", "4", "--json"]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert result["image"] == os.fsdecode(name) and isinstance(result["caption"], str)


# ------------------------------------------------------------------------------------------------------- --skip-bad


def bad_data(root: Path) -> Path:
    """A Karpathy JSON of two readable images and three bad ones (empty, cut short, text)."""
    entries = []
    for name, content in (("a.png", EXAMPLE.read_bytes()), ("b.png", b""), ("c.png", EXAMPLE.read_bytes()[:300]),
                          ("d.png", b"not an image"), ("e.png", EXAMPLE.read_bytes())):
        (root / name).write_bytes(content)
        entries.append({"image": name, "caption": f"caption of {name}"})
    (root / "data.json").write_text(json.dumps(entries))
    return root / "data.json"


def test_readers_skip_unreadable_images(tmp_path):
    from blipkit.data.readers import load_items

    loaded = load_items(bad_data(tmp_path), skip_bad=True)
    assert [it.key for it in loaded.items] == ["a.png", "e.png"] and loaded.skipped == 3
    with pytest.raises(Exception, match=r"entry 1 \(b.png\): image file .*b.png is empty"):
        load_items(tmp_path / "data.json")


def test_eval_skips_bad_images(tmp_path, capsys):
    data = bad_data(tmp_path)
    out = tmp_path / "report.json"
    assert cli.main(["eval", "--data", str(data), "--tasks", "retrieval", "--skip-bad", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["counts"]["images"] == 2 and report["counts"]["skipped_entries"] == 3
    assert "skipped 3 bad entries" in capsys.readouterr().err


def test_eval_skips_images_that_fail_to_decode(tmp_path):
    """An image whose header reads but whose data does not (found only when decoding) is skipped too."""
    import blipkit
    from blipkit.data.readers import Item, Loaded
    from blipkit.train.eval import evaluate

    data = bad_data(tmp_path)
    items = [Item(tmp_path / n, n, [f"caption of {n}"]) for n in ("a.png", "c.png", "e.png")]
    model = blipkit.load("scenes-blip")
    report = evaluate(model, data, tasks=("retrieval",), skip_bad=True, loaded=Loaded(items, 0))
    assert report["counts"]["images"] == 2 and report["counts"]["skipped_entries"] == 1
    with pytest.raises(Exception, match=r"entry c.png: cannot read image file"):
        evaluate(model, data, tasks=("retrieval",), loaded=Loaded(items, 0))


def test_train_skips_bad_images(tmp_path, capsys):
    data = bad_data(tmp_path)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2",
            "--save-every", "1", "--json"]
    assert cli.main([*args, "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["skipped"] == 3 and json.loads(captured.out)["step"] == 1
    assert cli.main(args) == 2
    assert "b.png is empty (fix the entry, or pass --skip-bad" in capsys.readouterr().err
