"""Throw several hundred bad or unusual inputs at blipkit's API and command line and count how each is handled.

    python scripts/try_inputs.py                 # the checkout this script is in
    python scripts/try_inputs.py --src DIR       # another checkout (DIR/src goes first on sys.path)
    python scripts/try_inputs.py --only texts --show-clean

Each input is "clean" when blipkit gives the right answer or a BlipkitError whose one-line message names the input
(the command line: exit status 2, one line on stderr, no traceback), and "bad" otherwise: another exception, a
traceback, a silently wrong result, a result that requires grad, a hang or a huge allocation. Every case runs in a
forked child with a time limit and an address-space limit (RLIMIT_AS), so a hang or a runaway allocation costs one
case, and state a failing call leaves behind cannot leak into the next. Prints a Markdown table (category -> tried,
clean, bad) and one line per bad case.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GB = 1 << 30


# ------------------------------------------------------------------------------------------------------ cases, verdicts


@dataclass
class Case:
    """One input: `run()` returns None (clean) or the reason it is bad."""

    category: str
    name: str
    run: Callable[[], str | None]
    timeout: float = 60.0
    memory: int = 2 * GB  # address space allowed on top of what the process already has


@dataclass
class Survey:
    cases: list[Case] = field(default_factory=list)

    def add(self, category: str, name: str, run: Callable[[], str | None], **kw: Any) -> None:
        self.cases.append(Case(category, name, run, **kw))


class Wrong(Exception):
    """A result that is not the right answer (the message says how)."""


def first_line(text: str, width: int = 150) -> str:
    line = next((s for s in str(text).splitlines() if s.strip()), "")
    return line if len(line) <= width else line[: width - 3] + "..."


def error_problem(exc: BaseException, names: tuple[str, ...]) -> str | None:
    """None when `exc` is a BlipkitError with a one-line message naming one of `names`, else what is wrong."""
    from blipkit.errors import BlipkitError

    if isinstance(exc, Wrong):
        return f"wrong result: {exc}"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "allocate" in str(exc)):
        return f"huge allocation: {type(exc).__name__}: {first_line(exc)}"
    if not isinstance(exc, BlipkitError):
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
        return f"{type(exc).__name__}{at}: {first_line(exc)}"
    message = str(exc).strip()
    if "\n" in message:
        return f"{type(exc).__name__} message of several lines: {first_line(message)}"
    if names and not names_in(names, message):
        return f"{type(exc).__name__} does not name {names[0]!r}: {first_line(message)}"
    return None


def names_in(names: tuple[str, ...], message: str) -> bool:
    """Whether `message` names one of `names` (an option may be spelt num_beams, num beams, --num-beams)."""
    low = message.lower()
    for n in names:
        n = n.lower()
        bare = n.lstrip("-")
        if any(v in low for v in (n, bare.replace("_", " "), bare.replace("_", "-"), bare.replace("-", "_"))):
            return True
    return False


def outputs_problem(value: Any, grad: bool) -> str | None:
    """NaN or infinite values in a result; with `grad`, also tensors that require grad (they keep the whole graph
    alive: counted in the memory category only, so the other categories show what else is wrong)."""
    import torch

    seen: list[Any] = []

    def walk(x: Any, depth: int = 0) -> None:
        if depth > 4:
            return
        if isinstance(x, torch.Tensor):
            seen.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x[:50]:
                walk(y, depth + 1)
        elif isinstance(x, dict):
            for y in list(x.values())[:50]:
                walk(y, depth + 1)
        elif hasattr(x, "__dataclass_fields__"):
            for k in x.__dataclass_fields__:
                walk(getattr(x, k, None), depth + 1)

    walk(value)
    if grad and any(t.requires_grad for t in seen):
        return "result requires grad"
    if any(t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()) for t in seen):
        return "result holds NaN or infinite values"
    return None


def api(call: Callable[[], Any], expect: str = "error", names: tuple[str, ...] = (),
        check: Callable[[Any], Any] | None = None, grad: bool = False) -> Callable[[], str | None]:
    """A case calling the API. expect: "error" (must raise a BlipkitError), "ok" (must return a right answer that
    `check` accepts), "either" (a right answer or a BlipkitError)."""

    def run() -> str | None:
        try:
            value = call()
        except BaseException as e:  # noqa: BLE001 - every outcome is a verdict
            problem = error_problem(e, names)
            if problem is None and expect == "ok":
                return f"refused a valid input: {first_line(e)}"
            return problem
        if expect == "error":
            return f"accepted: returned {first_line(repr(value), 100)}"
        problem = outputs_problem(value, grad)
        if problem:
            return problem
        if check is not None:
            try:
                verdict = check(value)
            except Wrong as e:
                return f"wrong result: {e}"
            except Exception as e:  # noqa: BLE001
                return f"wrong result: {type(e).__name__}: {first_line(e)}"
            if isinstance(verdict, str):
                return f"wrong result: {verdict}"
        return None

    return run


# ---------------------------------------------------------------------------------------------------- isolation


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def in_child(case: Case) -> str | None:
    """Run `case` in a forked child under its time and memory limits; returns its verdict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            os.setsid()
            limit = vm_size() + case.memory
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            verdict = case.run()
        except BaseException as e:  # noqa: BLE001
            verdict = f"survey error: {type(e).__name__}: {first_line(e)}"
        try:
            os.write(w, pickle.dumps(("done", verdict)))
        finally:
            os._exit(0)
    os.close(w)
    data, deadline = b"", time.monotonic() + case.timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.killpg(pid, signal.SIGKILL) if _alive(pid) else None
            os.close(r)
            os.waitpid(pid, 0)
            return f"hang: no result within {case.timeout:.0f} s"
        ready, _, _ = select.select([r], [], [], min(left, 1.0))
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    try:
        os.killpg(pid, signal.SIGKILL)  # threads or grandchildren a case left behind
    except (ProcessLookupError, PermissionError):
        pass
    if not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        return f"crashed: child died (signal {sig}, status {status})"
    return pickle.loads(data)[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------------------------------------------- fixtures


class Fixtures:
    """Files and models the cases use; models load once in the parent and are shared by the forked children."""

    def __init__(self, root: Path, src: Path):
        from PIL import Image

        import blipkit

        self.root, self.src = root, src
        self.examples = src / "examples"
        self.good = str(self.put("good.png", (self.examples / "red-circle-blue-square.png").read_bytes()))
        self.good2 = str(self.put("good2.png", (self.examples / "purple-square-yellow-circle.png").read_bytes()))
        self.good_img = Image.open(self.good).convert("RGB")
        self.blip = blipkit.load("scenes-blip")
        self.blip.eval()
        self._blip2: dict[str, Any] = {n: blipkit.load(n) for n in ("scenes-blip2-opt", "scenes-blip2-itm")}
        self._ref: dict[str, Any] = {}
        self.shipped = Path(blipkit.__file__).parent / "models"

    def put(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def blip2(self, name: str = "scenes-blip2-opt"):
        import blipkit

        if name not in self._blip2:
            self._blip2[name] = blipkit.load(name)
        return self._blip2[name]

    def ref(self, key: str, make: Callable[[], Any]) -> Any:
        """A right answer computed once from good inputs (in the parent, before forking)."""
        if key not in self._ref:
            self._ref[key] = make()
        return self._ref[key]


# ------------------------------------------------------------------------------------------------ helpers for checks


def shape_is(*shape: int) -> Callable[[Any], str | None]:
    def check(x: Any) -> str | None:
        return None if tuple(x.shape) == shape else f"shape {tuple(x.shape)}, expected {shape}"

    return check


def close_to(ref: Any, tol: float = 1e-4, what: str = "the same input given plainly") -> Callable[[Any], str | None]:
    def check(x: Any) -> str | None:
        if tuple(x.shape) != tuple(ref.shape):
            return f"shape {tuple(x.shape)}, expected {tuple(ref.shape)}"
        diff = float((x.float().cpu() - ref.float().cpu()).abs().max()) if x.numel() else 0.0
        return None if diff <= tol else f"differs from the answer for {what} by {diff:.3g}"

    return check


def str_list(n: int) -> Callable[[Any], str | None]:
    def check(x: Any) -> str | None:
        if not isinstance(x, list) or len(x) != n or not all(isinstance(s, str) for s in x):
            return f"expected {n} strings, got {first_line(repr(x), 100)}"
        return None

    return check


# ---------------------------------------------------------------------------------------------------- the inputs

NAMES_TEXT = ("text", "prompt", "question", "label", "answer", "phrase", "instruction")


def png16(width: int, height: int, rgb: bool) -> bytes:
    """A 16-bit PNG (grey or RGB), written by hand: PIL cannot write 16-bit RGB."""
    import zlib

    import numpy as np

    yy, xx = np.mgrid[0:height, 0:width]
    grey = ((xx + yy) * 65535 // (width + height)).astype(">u2")
    pixels = np.stack([grey, grey[::-1], grey[:, ::-1]], -1) if rgb else grey
    raw = b"".join(b"\0" + pixels[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2 if rgb else 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def eight_bit_of(data16: bytes) -> Any:
    """The 8-bit image a 16-bit PNG should read as (each value / 257)."""
    import io
    import zlib

    import numpy as np
    from PIL import Image

    width, height, depth, kind = struct.unpack(">IIBB", data16[16:26])
    idat = data16.index(b"IDAT")
    size = struct.unpack(">I", data16[idat - 4: idat])[0]
    raw = zlib.decompress(data16[idat + 4: idat + 4 + size])
    channels = 3 if kind == 2 else 1
    rows = [np.frombuffer(raw[y * (1 + 2 * width * channels) + 1: (y + 1) * (1 + 2 * width * channels)], ">u2")
            for y in range(height)]
    arr = (np.stack(rows).reshape(height, width, channels).astype(np.float64) / 257).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def pixels_close(fx: Fixtures, reference: Any, tol: float = 0.05) -> Callable[[Any], str | None]:
    """Check for image_features: equal to those of `reference` (a PIL image) within `tol`."""
    ref = fx.ref(f"feats-{id(reference)}", lambda: fx.blip.image_features(reference).detach())
    return close_to(ref, tol, "the image converted to 8-bit RGB first")


def image_files(s: Survey, fx: Fixtures) -> None:
    """Image files: missing, empty, truncated, not images, bombs, 16-bit, CMYK, odd shapes and names."""
    import numpy as np
    from PIL import Image

    good = Path(fx.good).read_bytes()
    files: dict[str, tuple[str, str]] = {}  # name -> (path, expectation)

    def put(name: str, data: bytes, expect: str = "error") -> None:
        files[name] = (str(fx.put(f"img/{name}", data)), expect)

    def save(name: str, image: Any, expect: str = "ok", **kw: Any) -> None:
        path = fx.root / "img" / name
        path.parent.mkdir(exist_ok=True)
        image.save(path, **kw)
        files[name] = (str(path), expect)

    files["missing.png"] = (str(fx.root / "img" / "missing.png"), "error")
    (fx.root / "img" / "folder.png").mkdir(parents=True)
    files["folder.png (a directory)"] = (str(fx.root / "img" / "folder.png"), "error")
    put("zero.png", b"")
    for cut in (8, 33, 100, 300, len(good) // 2, len(good) * 3 // 4):
        put(f"cut{cut}.png", good[:cut])
    put("text.png", b"this is not an image\n")
    put("random.jpg", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)))
    put("pdf.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n")
    put("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>')
    put("header-only.png", good[:8] + b"\x00" * 64)
    put("huge-header.png", png16(1, 1, False)[:16] + struct.pack(">II", 10 ** 6, 10 ** 6) + png16(1, 1, False)[24:])
    bomb = Image.new("1", (30000, 30000))
    save("bomb-900M-pixels.png", bomb, "error")
    del bomb
    put("16bit-grey.png", png16(96, 64, False), "16bit")
    put("16bit-rgb.png", png16(96, 64, True), "16bit")
    rgb = fx.good_img
    save("cmyk.jpg", rgb.convert("CMYK"), "ok")
    save("palette-transparent.png", rgb.convert("P"), "ok", transparency=0)
    save("grey-alpha.png", rgb.convert("LA"), "ok")
    save("one-bit.png", rgb.convert("1"), "ok")
    save("tall-1x4000.png", Image.new("RGB", (1, 4000), (200, 20, 20)), "ok")
    save("wide-4000x1.png", Image.new("RGB", (4000, 1), (200, 20, 20)), "ok")
    save("one-pixel.png", Image.new("RGB", (1, 1), (200, 20, 20)), "ok")
    save("anim.gif", rgb.convert("P"), "ok", save_all=True, append_images=[rgb.rotate(90).convert("P")])
    save("pic.webp", rgb, "ok")
    save("pic.bmp", rgb, "ok")
    save("pic.tiff", rgb, "ok")
    save("float.tiff", rgb.convert("F"), "either")
    exif = Image.Exif()
    exif[0x0112] = 6
    save("rotated-exif.jpg", rgb, "ok", exif=exif.tobytes())
    put("png-named.jpg", good, "ok")
    put("unicode-名前 ü.png", good, "ok")
    weird = os.fsencode(fx.root / "img") + b"/bad-\xff\xfe.png"
    with open(weird, "wb") as f:
        f.write(good)
    files["non-UTF-8 file name"] = (os.fsdecode(weird), "ok")
    with open(os.fsencode(fx.root / "img") + b"/zero-\xff.png", "wb"):
        pass
    files["non-UTF-8 name, zero bytes"] = (os.fsdecode(os.fsencode(fx.root / "img") + b"/zero-\xff.png"), "error")

    m = fx.blip
    ref_match = fx.ref("match-good", lambda: m.match(fx.good, "a red circle").detach())
    methods = {
        "match": (lambda x: m.match(x, "a red circle"), shape_is(1, 1)),
        "caption": (lambda x: m.caption(x, num_beams=1, max_new_tokens=6), str_list(1)),
        "image_features": (lambda x: m.image_features(x), None),
    }
    for name, (path, expect) in files.items():
        base = Path(path).name
        names = (base, repr(base)[1:-1], base.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        for method, (call, check) in methods.items():
            if expect == "16bit":
                if method != "image_features":
                    continue
                reference = eight_bit_of(Path(path).read_bytes())
                s.add("image files", f"image_features({name}) equals its 8-bit version",
                      api(lambda p=path: m.image_features(p), "either", names, pixels_close(fx, reference)))
                continue
            s.add("image files", f"{method}({name})",
                  api(lambda c=call, p=path: c(p), expect if expect != "16bit" else "either", names, check),
                  memory=3 * GB)
    # other ways of naming a file
    others: list[tuple[str, Callable[[], Any], str, tuple[str, ...], Any]] = [
        ("pathlib.Path", lambda: m.match(Path(fx.good), "a red circle"), "ok", (), close_to(ref_match)),
        ("path as bytes", lambda: m.match(os.fsencode(fx.good), "a red circle"), "either", ("image", "bytes"),
         close_to(ref_match)),
        ("path with NUL", lambda: m.match(fx.good + "\0x", "a red circle"), "error", ("image", "NUL", "\\x00"), None),
        ("empty path string", lambda: m.match("", "a red circle"), "error", ("image", "''"), None),
        ("path as int", lambda: m.match(5, "a red circle"), "error", ("image", "int"), None),
        ("None as image", lambda: m.match(None, "a red circle"), "error", ("image", "None"), None),
        ("URL string", lambda: m.match("http://example.com/a.png", "a red circle"), "error", ("http", "image"),
         None),
        ("glob pattern", lambda: m.match(str(fx.root / "*.png"), "a red circle"), "error", ("*.png", "image"), None),
        ("empty list", lambda: m.match([], "a red circle"), "error", ("image",), None),
        ("nested list", lambda: m.match([[fx.good]], "a red circle"), "error", ("image", "list"), None),
        ("tuple of two", lambda: m.match((fx.good, fx.good2), "a red circle"), "ok", (), shape_is(2, 1)),
        ("generator", lambda: m.match((p for p in [fx.good]), "a red circle"), "either", ("image", "generator"),
         shape_is(1, 1)),
        ("list with a missing file in the middle", lambda: m.match([fx.good, str(fx.root / "nope.png"), fx.good2],
                                                                    "a red circle"), "error", ("nope.png",), None),
        ("list with None", lambda: m.match([fx.good, None], "a red circle"), "error", ("image", "None"), None),
        ("dict as image", lambda: m.match({"image": fx.good}, "a red circle"), "error", ("image", "dict"), None),
        ("file object", lambda: m.match(open(fx.good, "rb"), "a red circle"), "either", ("image",),
         close_to(ref_match)),
    ]
    for name, call, expect, names, check in others:
        s.add("image files", f"match({name})", api(call, expect, names, check))


def pil_images(s: Survey, fx: Fixtures) -> None:
    """PIL images of every mode and odd sizes."""
    import numpy as np
    from PIL import Image

    m, rgb = fx.blip, fx.good_img
    grey = rgb.convert("L")
    wide = np.asarray(grey).astype(np.uint16) * 257
    wide16 = Image.fromarray(wide)  # mode I;16
    wide16b = Image.frombytes("I;16B", grey.size, wide.astype(">u2").tobytes())
    modes: dict[str, tuple[Any, str, Any]] = {
        "1": (rgb.convert("1"), "ok", None), "L": (grey, "ok", None), "LA": (rgb.convert("LA"), "ok", None),
        "P": (rgb.convert("P"), "ok", None), "PA": (rgb.convert("PA"), "ok", None), "RGB": (rgb, "ok", None),
        "RGBA": (rgb.convert("RGBA"), "ok", None), "CMYK": (rgb.convert("CMYK"), "ok", None),
        "YCbCr": (rgb.convert("YCbCr"), "ok", None), "RGBX": (rgb.convert("RGBX"), "ok", None),
        "LAB": (rgb.convert("LAB"), "either", None), "HSV": (rgb.convert("HSV"), "either", None),
        "I (0-255)": (grey.convert("I"), "either", grey),
        "I (0-65535)": (Image.fromarray(np.asarray(grey).astype(np.int32) * 257), "either", grey),
        "F (0-255)": (grey.convert("F"), "either", grey),
        "F (0-1)": (Image.fromarray(np.asarray(grey).astype(np.float32) / 255), "either", grey),
        "I;16": (wide16, "either", grey),
        "I;16B": (wide16b, "either", grey),
        "P with transparency": (rgb.convert("P"), "ok", None),
    }
    modes["P with transparency"][0].info["transparency"] = 0
    for name, (image, expect, reference) in modes.items():
        check = pixels_close(fx, reference) if reference is not None else None
        s.add("PIL images", f"image_features(mode {name})",
              api(lambda i=image: m.image_features(i), expect, ("mode", name.split()[0]), check))
        s.add("PIL images", f"match(mode {name})", api(lambda i=image: m.match(i, "a red circle"),
                                                       "either" if expect != "ok" else "ok", ("mode",),
                                                       shape_is(1, 1)))
    sizes = {"1x1": (1, 1), "3x1": (3, 1), "1x5000": (1, 5000), "5000x1": (5000, 1), "3000x2000": (3000, 2000)}
    for name, size in sizes.items():
        image = Image.new("RGB", size, (10, 200, 30))
        s.add("PIL images", f"match(size {name})", api(lambda i=image: m.match(i, "a green square"), "ok", (),
                                                       shape_is(1, 1)))
    s.add("PIL images", "match(size 0x0)", api(lambda: m.match(Image.new("RGB", (0, 0)), "x"), "error",
                                               ("size", "0", "empty")))
    s.add("PIL images", "match(size 0x10)", api(lambda: m.match(Image.new("RGB", (0, 10)), "x"), "error",
                                                ("size", "0", "empty")))

    def closed() -> Any:
        image = Image.open(fx.good)
        image.load()
        image.close()
        return m.match(image, "x")

    s.add("PIL images", "match(closed image)", api(closed, "either", ("image", "closed")))
    s.add("PIL images", "match(lazy Image.open)", api(lambda: m.match(Image.open(fx.good), "a red circle"), "ok", (),
                                                      close_to(fx.ref("match-good", lambda: None))))
    exif = rgb.copy()
    exif.getexif()[0x0112] = 3
    s.add("PIL images", "image_features(EXIF orientation 3 on a PIL image)",
          api(lambda: m.image_features(exif), "ok", (), pixels_close(fx, rgb.rotate(180))))
    s.add("PIL images", "match(list of PIL of different modes)",
          api(lambda: m.match([rgb, grey, rgb.convert("P")], "x"), "ok", (), shape_is(3, 1)))
    s.add("PIL images", "match(numpy HxWx3 uint8 array)",
          api(lambda: m.match(np.asarray(rgb), "a red circle"), "either", ("image", "ndarray", "numpy"),
              close_to(fx.ref("match-good", lambda: None), 1e-3)))


def tensors(s: Survey, fx: Fixtures) -> None:
    """Tensors: dtypes, shapes, values, features."""
    import torch

    m = fx.blip
    size = 128
    px = fx.ref("pixels", lambda: m.pixels(fx.good).detach())  # (1, 3, 128, 128), the processor's own
    ref = fx.ref("match-good", lambda: m.match(fx.good, "a red circle").detach())
    feats = fx.ref("feats-good", lambda: m.image_features(fx.good).detach())
    raw = torch.from_numpy(__import__("numpy").asarray(fx.good_img.resize((size, size)))).permute(2, 0, 1).contiguous()
    nan = px.clone()
    nan[0, 0, 0, 0] = float("nan")
    inf = px.clone()
    inf[0, 1, 5, 5] = float("inf")
    grad = px.clone().requires_grad_(True)
    enc = fx.ref("enc-good", lambda: m.encode_images(fx.good).detach())
    # (name, tensor maker, expectation, names, rows of the answer, tolerance against the file's answer or None)
    cases: list[tuple[str, Callable[[], Any], str, tuple[str, ...], int, float | None]] = [
        ("float32 (1, 3, H, W) pixels", lambda: px, "ok", (), 1, 1e-4),
        ("float32 (3, H, W) pixels", lambda: px[0], "ok", (), 1, 1e-4),
        ("float16 pixels", lambda: px.half(), "either", ("dtype", "float16"), 1, 2e-2),
        ("bfloat16 pixels", lambda: px.bfloat16(), "either", ("dtype", "bfloat16"), 1, 5e-2),
        ("float64 pixels", lambda: px.double(), "either", ("dtype", "float64"), 1, 1e-4),
        ("uint8 (3, H, W) raw pixels", lambda: raw, "either", ("uint8", "dtype"), 1, 3e-2),
        ("uint8 (1, 3, H, W) raw pixels", lambda: raw[None], "either", ("uint8", "dtype"), 1, 3e-2),
        ("int64 pixels", lambda: raw.long(), "either", ("int64", "dtype"), 1, 3e-2),
        ("bool pixels", lambda: px > 0, "error", ("bool", "dtype"), 1, None),
        ("complex pixels", lambda: px.to(torch.complex64), "error", ("complex", "dtype"), 1, None),
        ("two images (2, 3, H, W)", lambda: px.repeat(2, 1, 1, 1), "ok", (), 2, 1e-4),
        ("empty batch (0, 3, H, W)", lambda: px[:0], "either", ("image", "0", "empty"), 0, None),
        ("(3, 64, 64) wrong size", lambda: px[0, :, :64, :64], "either", ("shape", "size", "64"), 1, None),
        ("(3, 256, 256) wrong size", lambda: px.repeat(1, 1, 2, 2)[0], "either", ("shape", "size", "256"), 1, None),
        ("HWC (H, W, 3)", lambda: px[0].permute(1, 2, 0).contiguous(), "error", ("shape", "(128, 128, 3)"), 1, None),
        ("2-D (H, W)", lambda: px[0, 0], "error", ("shape",), 1, None),
        ("5-D (1, 1, 3, H, W)", lambda: px[None], "error", ("shape",), 1, None),
        ("1 channel (1, 1, H, W)", lambda: px[:, :1], "error", ("shape", "channel"), 1, None),
        ("4 channels (1, 4, H, W)", lambda: torch.cat([px, px[:, :1]], 1), "error", ("shape", "channel"), 1, None),
        ("0-d tensor", lambda: torch.tensor(1.0), "error", ("shape", "tensor"), 1, None),
        ("NaN pixel", lambda: nan, "error", ("NaN", "finite"), 1, None),
        ("inf pixel", lambda: inf, "error", ("inf", "finite"), 1, None),
        ("huge finite values 1e30", lambda: px * 1e30, "either", ("pixel",), 1, None),
        ("pixels that require grad", lambda: grad, "either", ("grad",), 1, 1e-4),
        ("non-contiguous pixels", lambda: px.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), "ok", (), 1, 1e-4),
        ("list of two (3, H, W) tensors", lambda: [px[0], px[0]], "either", ("image", "tensor"), 2, 1e-4),
        ("numpy float pixels", lambda: px.numpy(), "either", ("image", "ndarray", "numpy"), 1, 1e-4),
        ("features from image_features", lambda: feats, "ok", (), 1, 1e-4),
        ("features as a plain tensor copy", lambda: feats.clone().as_subclass(torch.Tensor), "ok", (), 1, 1e-4),
        ("(1, 5, hidden) float, not features", lambda: torch.randn(1, 5, 192), "error", ("shape", "feature"), 1,
         None),
        ("(3, H, 192) pixel-like, width = hidden size", lambda: px[0].repeat(1, 1, 2)[:, :, :192], "either",
         ("shape", "size", "192"), 1, None),
        ("features with NaN", lambda: feats.clone().index_fill_(1, torch.tensor([3]), float("nan")), "error",
         ("NaN", "finite"), 1, None),
        ("features as int", lambda: feats.long(), "error", ("dtype", "int64", "feature", "shape"), 1, None),
        ("features of the wrong width (1, 65, 100)", lambda: torch.randn(1, 65, 100), "error", ("shape", "feature"),
         1, None),
        ("features (0, 65, hidden)", lambda: feats[:0], "either", ("feature", "empty", "0"), 0, None),
    ]
    for name, make, expect, names, rows, tol in cases:
        names = (*names, "tensor") if names else names
        check = close_to(ref.repeat(rows, 1), tol) if tol is not None else shape_is(rows, 1)
        s.add("tensors", f"match({name})", api(lambda mk=make: m.match(mk(), "a red circle"), expect, names, check))
        if "features" not in name:
            check = close_to(enc.repeat(rows, 1), 10 * tol) if tol is not None else shape_is(rows, enc.shape[1])
            s.add("tensors", f"encode_images({name})", api(lambda mk=make: m.encode_images(mk()), expect, names, check))
    m2 = lambda: fx.blip2("scenes-blip2-itm")  # noqa: E731
    px2 = fx.ref("pixels2", lambda: fx.blip2("scenes-blip2-itm").pixels(fx.good).detach())
    ref2 = fx.ref("match2-good", lambda: fx.blip2("scenes-blip2-itm").match(fx.good, "a red circle").detach())
    for name, make, expect, names, check in [
        ("float32 pixels", lambda: px2, "ok", (), close_to(ref2, 1e-4)),
        ("uint8 raw pixels", lambda: raw, "either", ("uint8", "dtype"), close_to(ref2, 2e-2)),
        ("NaN pixels", lambda: px2 * float("nan"), "error", ("NaN", "finite"), None),
        ("HWC pixels", lambda: px2[0].permute(1, 2, 0).contiguous(), "error", ("shape",), None),
        ("(1, 5, hidden) float", lambda: torch.randn(1, 5, 192), "error", ("shape", "feature"), None),
    ]:
        s.add("tensors", f"BLIP-2 match({name})", api(lambda mk=make: m2().match(mk(), "a red circle"), expect,
                                                      (*names, "tensor") if names else names, check))


class Str(str):
    """A str subclass, as some libraries hand out."""


# (name, value, kind): kind "one" = a valid single text, "many:N" = a valid list of N texts, "bad" = must be refused,
# "either:N" = a right answer of N texts or a BlipkitError
TEXTS: list[tuple[str, Any, str]] = [
    ("None", None, "bad"),
    ("empty string", "", "bad"),
    ("spaces", "   ", "bad"),
    ("tab and newline", "\t\n", "bad"),
    ("NUL", "\x00", "bad"),
    ("control characters only", "\x01\x02\x7f", "bad"),
    ("zero-width space only", "\u200b", "bad"),
    ("lone surrogate", "\udcff", "bad"),
    ("surrogate inside", "a red \udcff circle", "bad"),
    ("huge text (260k chars)", "a red circle " * 20000, "one"),
    ("one 100k-char word", "x" * 100_000, "one"),
    ("emoji", "a 🔴 circle", "one"),
    ("CJK", "红色的圆圈", "one"),
    ("right-to-left", "دائرة حمراء", "one"),
    ("combining marks", "a re\u0301d circle", "one"),
    ("special tokens", "[CLS] [SEP] [PAD] [DEC] [ENC] [UNK] [MASK]", "one"),
    ("newline inside", "a red\ncircle", "one"),
    ("text with NUL inside", "a red\x00circle", "either:1"),
    ("int", 5, "bad"),
    ("float NaN", float("nan"), "bad"),
    ("bytes", b"a red circle", "bad"),
    ("list with None", ["a red circle", None], "bad"),
    ("list with an int", ["a red circle", 5], "bad"),
    ("list with an empty string", ["a red circle", ""], "bad"),
    ("list with control characters", ["a red circle", "\x01"], "bad"),
    ("nested list", [["a red circle"]], "bad"),
    ("empty list", [], "bad"),
    ("tuple of two", ("a red circle", "a blue square"), "many:2"),
    ("set", {"a red circle"}, "bad"),
    ("dict", {"a red circle": 1}, "bad"),
    ("generator", (t for t in ["a red circle"]), "either:1"),
    ("numpy str_", __import__("numpy").str_("a red circle"), "one"),
    ("str subclass", Str("a red circle"), "one"),
    ("list of 600 texts", [f"a red circle number {i}" for i in range(600)], "many:600"),
    ("list of 2 texts", ["a red circle", "a blue square"], "many:2"),
]


def texts(s: Survey, fx: Fixtures) -> None:
    """Texts of every odd kind through every method that reads text."""
    from blipkit import tasks

    m = fx.blip
    q = "what color is the circle?"

    def rows(kind: str) -> int:
        return 1 if kind == "one" else int(kind.split(":")[1]) if ":" in kind else 0

    for name, value, kind in TEXTS:
        n = rows(kind)
        expect = "error" if kind == "bad" else "either" if kind.startswith("either") else "ok"

        def v(value: Any = value, name: str = name) -> Any:
            return (t for t in ["a red circle"]) if name == "generator" else value

        users = {
            "match": (lambda v=v: m.match(fx.good, v()), shape_is(1, n)),
            "similarity": (lambda v=v: m.similarity(fx.good, v()), shape_is(1, n)),
            "encode_texts": (lambda v=v: m.encode_texts(v()), shape_is(n, 128)),
            "classify labels": (lambda v=v: tasks.classify(m, fx.good, v(), k=1),
                                lambda r: None if len(r) == 1 and len(r[0]) == 1 else f"got {r!r:.80}"),
            "rank_texts": (lambda v=v: tasks.rank_texts(m, fx.good, v()),
                           lambda r, n=n: None if len(r) == n else f"{len(r)} hits for {n} texts"),
        }
        if n <= 2:
            users["answer question"] = (lambda v=v: m.answer(fx.good, v()),
                                        str_list(1) if n == 1 else None)
            users["answer candidates"] = (lambda v=v: m.answer(fx.good, q, answers=v()),
                                          (lambda r, v=value: None if isinstance(r, list) and len(r) == 1 and
                                           r[0] in (list(v) if isinstance(v, (list, tuple)) else [v]) else
                                           f"answered {r!r:.60}, not one of the candidates"))
            users["caption prompt"] = (lambda v=v: m.caption(fx.good, prompt=v(), num_beams=1, max_new_tokens=5),
                                       str_list(1))
            users["ground phrase"] = (lambda v=v: tasks.ground(m, fx.good, v()),
                                      lambda g: None if len(g.box) == 4 else "no box")
        for method, (call, check) in users.items():
            e = expect
            if method == "answer question" and n == 2:
                e = "error"  # two questions for one image
            if method == "ground phrase" and n != 1 and kind != "bad":
                e = "either"
            if method == "caption prompt" and name in ("None", "empty string", "spaces", "tab and newline"):
                e = "ok"  # no prompt
            if method == "caption prompt" and n == 2:
                e = "error"  # two prompts for one image
            if method == "answer candidates" and name == "list with an empty string":
                e = "either"
            if method == "answer candidates" and name == "None":
                e, check = "ok", str_list(1)  # no candidates: the answer is generated
            if method == "caption prompt" and name.startswith(("huge", "one 100k")):
                e = "either"  # a prompt that does not fit the decoder may be refused
            s.add("texts", f"{method}: {name}", api(call, e, NAMES_TEXT + ("None", "empty", "string")
                                                    if e != "ok" else (), check))
    s.add("texts", "answer(answers='red') ranks the word, not its letters",
          api(lambda: m.answer(fx.good, q, answers="red"), "either", ("answers", "string", "list"),
              lambda r: None if r == ["red"] else f"answered {r!r}: the string was ranked as its characters"))
    s.add("texts", "answer(answers=('red', 'blue'))",
          api(lambda: m.answer(fx.good, q, answers=("red", "blue")), "ok", (),
              lambda r: None if r in (["red"], ["blue"]) else f"answered {r!r}"))
    s.add("texts", "answer(answers=300 candidates) > num_candidates",
          api(lambda: m.answer(fx.good, q, answers=[f"colour {i}" for i in range(300)] + ["red"]), "ok", (),
              lambda r: None if len(r) == 1 and r[0].startswith(("colour", "red")) else f"answered {r!r}"))
    s.add("texts", "two questions for two images",
          api(lambda: m.answer([fx.good, fx.good2], [q, "how many shapes are there?"]), "ok", (), str_list(2)))
    s.add("texts", "one question for two images",
          api(lambda: m.answer([fx.good, fx.good2], q), "either", ("question",), str_list(2)))
    s.add("texts", "three questions for two images",
          api(lambda: m.answer([fx.good, fx.good2], [q, q, q]), "error", ("question",)))
    s.add("texts", "two prompts for one image",
          api(lambda: m.caption(fx.good, prompt=["a", "b"], num_beams=1, max_new_tokens=5), "error", ("prompt",)))
    b2 = fx.blip2("scenes-blip2-opt")
    b2i = fx.blip2("scenes-blip2-itm")
    for name, value, kind in TEXTS:
        if rows(kind) > 2:
            continue
        n = rows(kind)
        expect = "error" if kind == "bad" else "either" if kind.startswith("either") else "ok"
        v = (lambda: (t for t in ["a red circle"])) if name == "generator" else (lambda value=value: value)
        s.add("texts", f"BLIP-2 match: {name}", api(lambda v=v: b2i.match(fx.good, v()), expect, NAMES_TEXT,
                                                    shape_is(1, n)))
        e = expect if n <= 1 else "error"
        if name.startswith(("huge", "one 100k")) or name in ("None", "empty string", "spaces", "tab and newline"):
            e = "either"  # too long to fit, or no instruction (a caption)
        s.add("texts", f"BLIP-2 generate instruction: {name}",
              api(lambda v=v: b2.generate(fx.good, v(), max_new_tokens=4), e, NAMES_TEXT, str_list(1)))


def gen_options(s: Survey, fx: Fixtures) -> None:
    """Generation options: types, ranges and combinations, for BLIP and BLIP-2."""
    m, b2 = fx.blip, fx.blip2("scenes-blip2-opt")
    two = [fx.good, fx.good2]
    solo = fx.ref("greedy-solo", lambda: [m.caption(p, num_beams=1)[0] for p in two])
    solo2 = fx.ref("greedy-solo2", lambda: [b2.caption(p, num_beams=1)[0] for p in two])
    fast = dict(max_new_tokens=8)
    bad: dict[str, list[Any]] = {
        "num_beams": [0, -1, 1.5, "3", None, True, 10 ** 6],
        "max_new_tokens": [0, -1, 1.5, "5", None, 10 ** 7],
        "min_new_tokens": [-1, 1.5, "2", 10 ** 6],
        "repetition_penalty": [0, -1, float("nan"), float("inf"), "1"],
        "length_penalty": [float("nan"), "x", None],
        "num_captions": [0, -1, 2.5, "2", None],
        "do_sample": ["yes", None, 2],
        "return_scores": ["no", 2],
    }
    sampled: dict[str, list[Any]] = {"temperature": [0, -1, float("nan"), float("inf"), "1"],
                                      "top_p": [0, -0.1, 1.5, float("nan"), "0.9"]}
    for family, model in (("BLIP", m), ("BLIP-2", b2)):
        for key, values in bad.items():
            for value in values:
                opts = {**fast, key: value}
                if key == "max_new_tokens":
                    opts = {key: value}
                heavy = value in (10 ** 6, 10 ** 7)
                s.add("generation options", f"{family} caption({key}={value!r})",
                      api(lambda o=opts, mm=model: mm.caption(fx.good, **o), "error", (key,)),
                      timeout=60, memory=(1 * GB if heavy else 2 * GB))
        for key, values in sampled.items():
            for value in values:
                s.add("generation options", f"{family} caption(do_sample=True, {key}={value!r})",
                      api(lambda o={**fast, "do_sample": True, key: value}, mm=model: mm.caption(fx.good, **o),
                          "error", (key,)))
        s.add("generation options", f"{family} caption(min_new_tokens=20, max_new_tokens=10)",
              api(lambda mm=model: mm.caption(fx.good, min_new_tokens=20, max_new_tokens=10), "error",
                  ("min_new_tokens", "max_new_tokens")))
        s.add("generation options", f"{family} caption(min_new_tokens=100) beyond the position table",
              api(lambda mm=model: mm.caption(fx.good, min_new_tokens=100, max_new_tokens=100, num_beams=1), "either",
                  ("min_new_tokens", "max_new_tokens", "position", "token"),
                  lambda r: None if len(r) == 1 else "wrong count"), memory=1 * GB)
        s.add("generation options", f"{family} caption(40-word prompt, min_new_tokens=100)",
              api(lambda mm=model: mm.caption(fx.good, prompt="red " * 40, min_new_tokens=100, max_new_tokens=100,
                                              num_beams=1), "either",
                  ("min_new_tokens", "max_new_tokens", "prompt", "position", "token"), str_list(1)), memory=1 * GB)
        s.add("generation options", f"{family} caption(prompt=5)",
              api(lambda mm=model: mm.caption(fx.good, prompt=5, **fast), "error", ("prompt",)))
        s.add("generation options", f"{family} caption(prompt=['a'] * 3) for one image",
              api(lambda mm=model: mm.caption(fx.good, prompt=["a"] * 3, **fast), "error", ("prompt",)))
        ref = solo if family == "BLIP" else solo2

        def grouped(k: int, ref: list[str] = ref) -> Callable[[Any], str | None]:
            def check(r: Any) -> str | None:
                if not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, list) and len(x) == k for x in r)):
                    return f"expected 2 lists of {k} captions, got {r!r:.120}"
                if ref and k and r[1][0] != ref[1] and ref[1] in r[0]:
                    return f"image 2's caption {ref[1]!r} is filed under image 1: {r!r:.120}"
                return None

            return check

        s.add("generation options", f"{family} caption(2 images, num_captions=3, num_beams=1): grouping",
              api(lambda mm=model: mm.caption(two, num_captions=3, num_beams=1), "either",
                  ("num_captions", "num_beams", "beam"), grouped(3)))
        s.add("generation options", f"{family} caption(2 images, num_captions=3, num_beams=3)",
              api(lambda mm=model: mm.caption(two, num_captions=3, num_beams=3, **fast), "ok", (), grouped(3)))
        s.add("generation options", f"{family} caption(2 images, num_captions=4, num_beams=2)",
              api(lambda mm=model: mm.caption(two, num_captions=4, num_beams=2, **fast), "either",
                  ("num_captions", "num_beams"), grouped(4)))
        s.add("generation options", f"{family} caption(2 images, num_captions=2, do_sample=True)",
              api(lambda mm=model: mm.caption(two, num_captions=2, do_sample=True, **fast), "ok", (), grouped(2)))
        s.add("generation options", f"{family} caption(2 images, return_scores=True)",
              api(lambda mm=model: mm.caption(two, return_scores=True, **fast), "ok", (),
                  lambda r: None if len(r) == 2 and all(isinstance(t, tuple) and math.isfinite(t[1]) for t in r)
                  else f"got {r!r:.100}"))
        s.add("generation options", f"{family} caption(num_beams=1 vs solo): batch equals one-by-one",
              api(lambda mm=model: mm.caption(two, num_beams=1), "ok", (),
                  lambda r, ref=ref: None if r == ref else f"batch {r} != one-by-one {ref}"))
    q = "what color is the circle?"
    for key, value in [("num_beams", 0), ("num_beams", -2), ("max_new_tokens", -1), ("max_new_tokens", "3"),
                       ("min_new_tokens", -5), ("num_candidates", 0), ("num_candidates", -1),
                       ("num_candidates", 1.5), ("temperature", -1), ("top_p", 2.0), ("repetition_penalty", 0),
                       ("foo", 1), ("num_captions", 3), ("return_scores", True), ("prompt", "a")]:
        opts = {key: value}
        if key in ("temperature", "top_p"):
            opts["do_sample"] = True
        # options of caption that have a meaning for answers too: a right answer (one per question) or an error
        expect = "either" if key in ("num_captions", "return_scores", "prompt") else "error"
        check = str_list(1)
        s.add("generation options", f"BLIP answer({key}={value!r})",
              api(lambda o=opts: m.answer(fx.good, q, **o), expect, (key,), check))
        if key != "num_candidates":
            s.add("generation options", f"BLIP-2 generate({key}={value!r})",
                  api(lambda o={"max_new_tokens": 4, **opts}: b2.generate(fx.good, q, **o), expect, (key,), check))
    s.add("generation options", "BLIP answer(num_candidates=1, 3 answers)",
          api(lambda: m.answer(fx.good, q, answers=["red", "blue", "green"], num_candidates=1), "ok", (),
              lambda r: None if r[0] in ("red", "blue", "green") else f"{r}"))
    s.add("generation options", "BLIP-2 generate(max_new_tokens=10**7)",
          api(lambda: b2.generate(fx.good, q, max_new_tokens=10 ** 7), "error", ("max_new_tokens",)), memory=1 * GB)


def task_options(s: Survey, fx: Fixtures) -> None:
    """Options of the tasks in blipkit.tasks: classify, ranking, matrix, grounding, attention, space."""
    from blipkit import tasks

    m, g = fx.blip, fx.good
    labels = ["circle", "square", "triangle"]
    ok = lambda r: None  # noqa: E731
    cases: list[tuple[str, Callable[[], Any], str, tuple[str, ...], Any]] = [
        ("classify(labels='circle') one string", lambda: tasks.classify(m, g, "circle"), "either", ("label",),
         lambda r: None if [x[0] for x in r[0]] == ["circle"] else f"labels {r!r:.80}"),
        ("classify(labels=[])", lambda: tasks.classify(m, g, []), "error", ("label",), None),
        ("classify(templates=[])", lambda: tasks.classify(m, g, labels, templates=[]), "error", ("template",), None),
        ("classify(templates='a {}') one string", lambda: tasks.classify(m, g, labels, templates="a photo of {}"),
         "either", ("template",), lambda r: None if len(r[0]) == 3 else f"{r!r:.80}"),
        ("classify(template without {})", lambda: tasks.classify(m, g, labels, templates=["a photo"]), "error",
         ("template", "{}"), None),
        ("classify(template '{} {}')", lambda: tasks.classify(m, g, labels, templates=["{} and {}"]), "either",
         ("template", "{}"), lambda r: None if len(r[0]) == 3 else f"{r!r:.80}"),
        ("classify(template '{x}')", lambda: tasks.classify(m, g, labels, templates=["a {x}"]), "error",
         ("template", "{x}"), None),
        ("classify(template '{0}')", lambda: tasks.classify(m, g, labels, templates=["a {0}"]), "either",
         ("template",), lambda r: None if len(r[0]) == 3 else f"{r!r:.80}"),
        ("classify(template '{')", lambda: tasks.classify(m, g, labels, templates=["a {"]), "error",
         ("template",), None),
        ("classify(head='xyz')", lambda: tasks.classify(m, g, labels, head="xyz"), "error", ("head",), None),
        ("classify(head=None)", lambda: tasks.classify(m, g, labels, head=None), "error", ("head",), None),
        ("classify(k=0)", lambda: tasks.classify(m, g, labels, k=0), "error", ("k",), None),
        ("classify(k=-1)", lambda: tasks.classify(m, g, labels, k=-1), "error", ("k",), None),
        ("classify(k=1.5)", lambda: tasks.classify(m, g, labels, k=1.5), "error", ("k",), None),
        ("classify(k='3')", lambda: tasks.classify(m, g, labels, k="3"), "error", ("k",), None),
        ("classify(k=100) more than labels", lambda: tasks.classify(m, g, labels, k=100), "ok", (),
         lambda r: None if len(r[0]) == 3 else f"{len(r[0])} labels"),
        ("classify(temperature=0)", lambda: tasks.classify(m, g, labels, temperature=0), "error", ("temperature",),
         None),
        ("classify(temperature=-1)", lambda: tasks.classify(m, g, labels, temperature=-1), "error",
         ("temperature",), None),
        ("classify(temperature=nan)", lambda: tasks.classify(m, g, labels, temperature=float("nan")), "error",
         ("temperature",), None),
        ("classify(batch_size=0)", lambda: tasks.classify(m, g, labels, batch_size=0), "error", ("batch_size",),
         None),
        ("classify(batch_size=-1)", lambda: tasks.classify(m, g, labels, batch_size=-1), "error", ("batch_size",),
         None),
        ("classify(batch_size='8')", lambda: tasks.classify(m, g, labels, batch_size="8"), "error", ("batch_size",),
         None),
        ("classify(duplicate labels)", lambda: tasks.classify(m, g, ["circle", "circle"]), "either", ("label",),
         ok),
        ("rank_texts(k=0)", lambda: tasks.rank_texts(m, g, labels, k=0), "error", ("k",), None),
        ("rank_texts(k=-1)", lambda: tasks.rank_texts(m, g, labels, k=-1), "error", ("k",), None),
        ("rank_texts(k=100)", lambda: tasks.rank_texts(m, g, labels, k=100), "ok", (),
         lambda r: None if len(r) == 3 else f"{len(r)} hits"),
        ("rank_texts(top_n=0)", lambda: tasks.rank_texts(m, g, labels, top_n=0), "error", ("top_n",), None),
        ("rank_texts(top_n=-3)", lambda: tasks.rank_texts(m, g, labels, top_n=-3), "error", ("top_n",), None),
        ("rank_texts(top_n=1.5)", lambda: tasks.rank_texts(m, g, labels, top_n=1.5), "error", ("top_n",), None),
        ("rank_texts(head='xyz')", lambda: tasks.rank_texts(m, g, labels, head="xyz"), "error", ("head",), None),
        ("rank_texts(two images)", lambda: tasks.rank_texts(m, [g, fx.good2], labels), "error", ("image",), None),
        ("rank_images(images=[])", lambda: tasks.rank_images(m, "a red circle", []), "error", ("image",), None),
        ("rank_images(k=0)", lambda: tasks.rank_images(m, "a red circle", [g, fx.good2], k=0), "error", ("k",),
         None),
        ("rank_images(text=None)", lambda: tasks.rank_images(m, None, [g]), "error", ("text",), None),
        ("rank_images(text=['a', 'b'])", lambda: tasks.rank_images(m, ["a", "b"], [g]), "error", ("text",), None),
        ("score_matrix(head='xyz')", lambda: tasks.score_matrix(m, g, labels, head="xyz"), "error", ("head",), None),
        ("score_matrix(batch_size=0)", lambda: tasks.score_matrix(m, g, labels, batch_size=0), "error",
         ("batch_size",), None),
        ("score_matrix(texts=[])", lambda: tasks.score_matrix(m, g, []), "error", ("text",), None),
        ("ground(threshold=-1)", lambda: tasks.ground(m, g, "the red circle", threshold=-1), "error",
         ("threshold",), None),
        ("ground(threshold=2)", lambda: tasks.ground(m, g, "the red circle", threshold=2), "error",
         ("threshold",), None),
        ("ground(threshold=nan)", lambda: tasks.ground(m, g, "the red circle", threshold=float("nan")), "error",
         ("threshold",), None),
        ("ground(threshold='0.5')", lambda: tasks.ground(m, g, "the red circle", threshold="0.5"), "error",
         ("threshold",), None),
        ("ground(threshold=0)", lambda: tasks.ground(m, g, "the red circle", threshold=0), "either",
         ("threshold",), lambda r: None if len(r.box) == 4 else "no box"),
        ("ground(layer=100)", lambda: tasks.ground(m, g, "the red circle", layer=100), "error", ("layer",), None),
        ("ground(layer=-100)", lambda: tasks.ground(m, g, "the red circle", layer=-100), "error", ("layer",), None),
        ("ground(layer='1')", lambda: tasks.ground(m, g, "the red circle", layer="1"), "error", ("layer",), None),
        ("ground(layer=1.5)", lambda: tasks.ground(m, g, "the red circle", layer=1.5), "error", ("layer",), None),
        ("ground(layer=True)", lambda: tasks.ground(m, g, "the red circle", layer=True), "error", ("layer",), None),
        ("ground(two images)", lambda: tasks.ground(m, [g, fx.good2], "the red circle"), "error", ("image",), None),
        ("gradcam(layer=99)", lambda: tasks.gradcam(m, g, "a red circle", layer=99), "error", ("layer",), None),
        ("gradcam(text=None)", lambda: tasks.gradcam(m, g, None), "error", ("text",), None),
        ("gradcam(text=['a', 'b'])", lambda: tasks.gradcam(m, g, ["a", "b"]), "error", ("text",), None),
        ("cross_attention_maps(layer=99)", lambda: tasks.cross_attention_maps(m, g, "a red circle", layer=99),
         "error", ("layer",), None),
        ("cross_attention_maps(layer=-99)", lambda: tasks.cross_attention_maps(m, g, "a red circle", layer=-99),
         "error", ("layer",), None),
        ("cross_attention_maps(layer='0')", lambda: tasks.cross_attention_maps(m, g, "a red circle", layer="0"),
         "error", ("layer",), None),
        ("cross_attention_maps(text=None) on BLIP", lambda: tasks.cross_attention_maps(m, g, None), "error",
         ("text",), None),
        ("cross_attention_maps(text='')", lambda: tasks.cross_attention_maps(m, g, ""), "error", ("text",), None),
        ("cross_attention_maps(text=5)", lambda: tasks.cross_attention_maps(m, g, 5), "error", ("text",), None),
        ("cross_attention_maps(two images)", lambda: tasks.cross_attention_maps(m, [g, fx.good2], "a"), "error",
         ("image",), None),
        ("embedding_space(method='xyz')", lambda: tasks.embedding_space(m, texts=labels, method="xyz"), "error",
         ("method",), None),
        ("embedding_space(nothing)", lambda: tasks.embedding_space(m), "error", ("image", "text"), None),
        ("embedding_space(one text)", lambda: tasks.embedding_space(m, texts=["a"]), "either", ("two", "point",
                                                                                               "text"), ok),
        ("embedding_space(method='umap') without umap-learn",
         lambda: tasks.embedding_space(m, texts=labels, method="umap"), "either", ("umap",), ok),
        ("embedding_space(seed='x')", lambda: tasks.embedding_space(m, texts=labels, seed="x"), "error", ("seed",),
         None),
        ("image_paths('missing')", lambda: tasks.image_paths(str(fx.root / "nope")), "error", ("nope",), None),
        ("image_paths(empty dir)", lambda: tasks.image_paths(str(fx.root / "img" / "folder.png")), "error",
         ("folder.png", "image"), None),
        ("read_texts(file=binary)", lambda: tasks.read_texts(file=fx.put("bin.txt", b"\xff\xfe\x00\x80")), "error",
         ("bin.txt",), None),
        ("read_texts(file=missing)", lambda: tasks.read_texts(file=fx.root / "nope.txt"), "error", ("nope.txt",),
         None),
        ("read_texts(file=empty)", lambda: tasks.read_texts(file=fx.put("empty.txt", b"")), "error",
         ("empty.txt",), None),
        ("read_texts(file=a directory)", lambda: tasks.read_texts(file=fx.root / "img"), "error", ("img",), None),
        ("read_texts(texts=None, file=None)", lambda: tasks.read_texts(None, None), "error", ("text",), None),
    ]
    b2i = fx.blip2("scenes-blip2-itm")
    cases += [
        ("BLIP-2 classify(head='itm', k=0)", lambda: tasks.classify(b2i, g, labels, head="itm", k=0), "error",
         ("k",), None),
        ("BLIP-2 cross_attention_maps(layer=99)", lambda: tasks.cross_attention_maps(b2i, g, layer=99), "error",
         ("layer",), None),
        ("BLIP-2 ground(threshold=5)", lambda: tasks.ground(b2i, g, "a red circle", threshold=5), "error",
         ("threshold",), None),
        ("BLIP-2 caption on an ITM-only checkpoint", lambda: b2i.caption(g), "error", ("caption", "scenes-blip2-itm"),
         None),
        ("BLIP-2 generate on an ITM-only checkpoint", lambda: b2i.generate(g, "what?"), "error",
         ("scenes-blip2-itm", "generat", "instruction"), None),
        ("BLIP-2 OPT match (no ITM head)", lambda: fx.blip2().match(g, "a"), "error", ("scenes-blip2-opt", "match"),
         None),
    ]
    for name, call, expect, names, check in cases:
        s.add("task options", name, api(call, expect, names, check))


def capabilities(s: Survey, fx: Fixtures) -> None:
    """Methods on checkpoints that lack the parts: refused, naming checkpoints that really can."""
    vqa = fx.vqa_dir()
    cap = fx.caption_dir()
    itm = fx.itm_dir()
    import blipkit
    from blipkit import tasks

    q = "what color is the circle?"
    for kind, path, calls in [
        ("VQA", vqa, {"caption": "error", "match": "error", "similarity": "error", "answer": "ok",
                      "classify": "error", "ground": "error"}),
        ("captioning", cap, {"caption": "ok", "match": "error", "similarity": "error", "answer": "error",
                             "classify": "error", "ground": "error"}),
        ("retrieval", itm, {"caption": "error", "match": "ok", "similarity": "ok", "answer": "error",
                            "classify": "ok", "ground": "ok"}),
    ]:
        for method, expect in calls.items():
            def call(method: str = method, path: Path = path) -> Any:
                from blipkit.errors import BlipkitError

                try:
                    return calls_(method, blipkit.load(path))
                except BlipkitError as e:
                    # the checkpoints named as able must really be able
                    wrong = {"caption": ("vqa", "itm"), "answer": ("itm", "captioning")}.get(
                        method, ("vqa", "captioning"))
                    listed = str(e).split(":", 1)[-1].lower()
                    if any(f"blip-{w}" in listed for w in wrong):
                        raise Wrong(f"names checkpoints that cannot {method}: {first_line(e)}") from None
                    raise

            def calls_(method: str, m: Any) -> Any:
                if method == "caption":
                    return m.caption(fx.good, max_new_tokens=5)
                if method == "answer":
                    return m.answer(fx.good, q, max_new_tokens=3)
                if method == "classify":
                    return tasks.classify(m, fx.good, ["circle", "square"])
                if method == "ground":
                    return tasks.ground(m, fx.good, "a circle")
                return getattr(m, method)(fx.good, "a red circle")

            names = ("blip-",) if expect == "error" else ()
            s.add("capabilities", f"{method} on a {kind} checkpoint", api(call, expect, names))


def _tiny_hf(fx: Fixtures, cls_name: str) -> Path:
    """A tiny reference checkpoint of one BLIP architecture with the shipped model's tokenizer files."""
    path = fx.root / "ckpt" / cls_name
    if path.exists():
        return path
    import torch
    import transformers

    cfg = transformers.BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=213, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32, bos_token_id=5,
                         eos_token_id=3, pad_token_id=0, sep_token_id=3),
        image_text_hidden_size=16)
    torch.manual_seed(0)
    getattr(transformers, cls_name)(cfg).save_pretrained(path)
    for f in fx.shipped.joinpath("scenes-blip").iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, path / f.name)
    pre = json.loads(fx.shipped.joinpath("scenes-blip", "preprocessor_config.json").read_text())
    pre["size"] = {"height": 32, "width": 32}
    (path / "preprocessor_config.json").write_text(json.dumps(pre))
    return path


Fixtures.vqa_dir = lambda self: _tiny_hf(self, "BlipForQuestionAnswering")  # type: ignore[attr-defined]
Fixtures.caption_dir = lambda self: _tiny_hf(self, "BlipForConditionalGeneration")  # type: ignore[attr-defined]
Fixtures.itm_dir = lambda self: _tiny_hf(self, "BlipForImageTextRetrieval")  # type: ignore[attr-defined]


def checkpoint_files(s: Survey, fx: Fixtures) -> None:
    """config.json, preprocessor_config.json, tokenizer and weight files malformed in each key."""
    import blipkit

    shipped = fx.shipped / "scenes-blip"
    config = json.loads((shipped / "config.json").read_text())
    counter = [0]

    def variant(files: dict[str, bytes | str | None]) -> Path:
        """A copy of scenes-blip (weights linked) with some files replaced (None: removed)."""
        counter[0] += 1
        d = fx.root / "variants" / str(counter[0])
        d.mkdir(parents=True)
        for f in shipped.iterdir():
            if f.name == "model.safetensors":
                os.symlink(f, d / f.name)
            else:
                shutil.copy(f, d / f.name)
        for name, data in files.items():
            if data is None:
                (d / name).unlink(missing_ok=True)
            else:
                (d / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return d

    def loads(d: Path, expect: str, names: tuple[str, ...], label: str, **kw: Any) -> None:
        def call() -> Any:
            m = blipkit.load(d)
            return m.match(fx.good, "a red circle")

        s.add("checkpoint files", label, api(call, expect, names, shape_is(1, 1)), **kw)

    def with_value(path: list[str], value: Any) -> str:
        cfg = json.loads(json.dumps(config))
        node = cfg
        for k in path[:-1]:
            node = node[k]
        if value is DELETE:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
        return json.dumps(cfg)

    for label, data in [("missing", None), ("empty", ""), ("not JSON", "{model_type: blip"), ("a list", "[]"),
                        ("null", "null"), ("binary", b"\x89PNG\r\n\x00\xff"), ("non-UTF-8", b'{"model_type": "\xff"}'),
                        ("deeply nested", "[" * 100000 + "]" * 100000)]:
        loads(variant({"config.json": data}), "error", ("config.json",), f"config.json {label}")
    top = [("model_type", ["bert", 5, None, DELETE]), ("vision_config", [[], "x", None, DELETE]),
           ("text_config", [[], "x", None, DELETE]), ("architectures", [["Nope"], "x", 5]),
           ("blipkit_parts", [["nope"], "x", []]), ("image_text_hidden_size", ["x", -1, 0, 10 ** 9])]
    for key, values in top:
        for value in values:
            shown = "deleted" if value is DELETE else repr(value)
            # a missing or null sub-config means transformers' defaults: the weights then do not fit
            defaults = key.endswith("_config") and value in (None, DELETE)
            names = ("config.json", key) + (("model.safetensors",) if defaults else ())
            expect = "either" if key == "architectures" and isinstance(value, list) else "error"
            loads(variant({"config.json": with_value([key], value)}), expect, names,
                  f"config.json {key} = {shown}", memory=1 * GB)
    sizes = ["x", -1, 0, None, 10 ** 9, 1.5, True]
    vision = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
              "patch_size", "layer_norm_eps", "hidden_act"]
    text = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "bos_token_id", "pad_token_id", "sep_token_id", "layer_norm_eps",
            "encoder_hidden_size"]
    for part, keys in (("vision_config", vision), ("text_config", text)):
        for key in keys:
            values = sizes if key != "hidden_act" else ["nonsense", 5, None]
            if key == "layer_norm_eps":
                values = ["x", -1, None, float("inf")]
            if key.endswith("_token_id"):
                values = ["x", -1, None, 10 ** 9, 1.5]
            for value in values:
                loads(variant({"config.json": with_value([part, key], value)}), "error",
                      ("config.json", key), f"config.json {part}.{key} = {value!r}", timeout=60, memory=1 * GB)
    for label, change in [("num_hidden_layers 1000000", (["text_config", "num_hidden_layers"], 10 ** 6)),
                          ("vision hidden_size 190 (not divisible by heads)", (["vision_config", "hidden_size"], 190)),
                          ("patch_size 200 > image_size", (["vision_config", "patch_size"], 200))]:
        loads(variant({"config.json": with_value(*change)}), "error", ("config.json", change[0][-1]),
              f"config.json {label}", timeout=60, memory=1 * GB)
    pre = json.loads((shipped / "preprocessor_config.json").read_text())

    def pre_with(key: str, value: Any) -> str:
        p = dict(pre)
        if value is DELETE:
            p.pop(key, None)
        else:
            p[key] = value
        return json.dumps(p)

    for label, data, expect in [("missing", None, "ok"), ("empty", "", "error"), ("not JSON", "{", "error"),
                                ("a list", "[]", "error"), ("binary", b"\xff\xfe\x00", "error")]:
        loads(variant({"preprocessor_config.json": data}), expect, ("preprocessor_config.json",),
              f"preprocessor_config.json {label}")
    for key, value, expect in [
        ("size", {"height": 100000, "width": 100000}, "error"), ("size", {"height": 0, "width": 0}, "error"),
        ("size", -1, "error"), ("size", "x", "error"), ("size", {"height": 7, "width": 7}, "error"),
        ("size", {"shortest_edge": 128}, "either"), ("size", 128, "either"), ("size", {"height": 128}, "error"),
        ("image_mean", [0.5], "error"), ("image_mean", "x", "error"), ("image_mean", [float("nan")] * 3, "error"),
        ("image_std", [0, 0, 0], "error"), ("image_std", [-1, -1, -1], "error"), ("image_std", None, "error"),
        ("rescale_factor", "x", "error"), ("rescale_factor", 0, "error"), ("rescale_factor", -1, "error"),
        ("do_normalize", "yes", "error"), ("do_resize", "no", "error"), ("resample", 99, "error"),
        ("resample", "bicubic", "error"), ("do_convert_rgb", 5, "error"),
    ]:
        loads(variant({"preprocessor_config.json": pre_with(key, value)}), expect,
              ("preprocessor_config.json", key), f"preprocessor_config.json {key} = {value!r}", memory=1 * GB)
    tok = (shipped / "tokenizer.json").read_bytes()
    for label, files, expect in [
        ("tokenizer.json missing", {"tokenizer.json": None}, "error"),
        ("tokenizer.json empty", {"tokenizer.json": ""}, "error"),
        ("tokenizer.json not JSON", {"tokenizer.json": "{"}, "error"),
        ("tokenizer.json truncated", {"tokenizer.json": tok[: len(tok) // 2]}, "error"),
        ("tokenizer.json {}", {"tokenizer.json": "{}"}, "error"),
        ("tokenizer.json binary", {"tokenizer.json": b"\xff\xfe\x00\x01"}, "error"),
        ("tokenizer_config.json not JSON", {"tokenizer_config.json": "{"}, "error"),
        ("tokenizer_config.json a list", {"tokenizer_config.json": "[]"}, "error"),
        ("special_tokens_map.json not JSON", {"special_tokens_map.json": "{"}, "error"),
        ("tokenizer.json replaced by a 5-token vocab.txt", {"tokenizer.json": None,
                                                            "vocab.txt": "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n"},
         "either"),
    ]:
        loads(variant(files), expect, ("tokenizer", "vocab", "special_tokens"), label)
    weights = (shipped / "model.safetensors").read_bytes()
    header = struct.unpack("<Q", weights[:8])[0]
    meta = json.loads(weights[8: 8 + header])
    first = next(k for k in meta if k != "__metadata__")

    def safetensors_with(meta_new: dict, body: bytes | None = None) -> bytes:
        h = json.dumps(meta_new).encode()
        return struct.pack("<Q", len(h)) + h + (weights[8 + header:] if body is None else body)

    renamed = {(k + ".renamed" if k == first else k): v for k, v in meta.items()}
    dropped = {k: v for k, v in meta.items() if k != first}
    reshaped = json.loads(json.dumps(meta))
    reshaped[first]["shape"] = [reshaped[first]["shape"][0] * 2] + reshaped[first]["shape"][1:] \
        if reshaped[first]["shape"] else [2]
    int_dtype = json.loads(json.dumps(meta))
    int_dtype[first]["dtype"] = "I16"
    for label, data, names in [
        ("model.safetensors missing", None, ("model.safetensors", "weights", "pytorch_model.bin")),
        ("model.safetensors empty", b"", ("model.safetensors",)),
        ("model.safetensors truncated", weights[: len(weights) // 2], ("model.safetensors",)),
        ("model.safetensors garbage", b"\x00" * 64, ("model.safetensors",)),
        ("model.safetensors header length 10**12", struct.pack("<Q", 10 ** 12) + weights[8:], ("model.safetensors",)),
        ("model.safetensors header not JSON", struct.pack("<Q", 4) + b"{{{{" + weights[8:], ("model.safetensors",)),
        ("model.safetensors a key renamed", safetensors_with(renamed), (first,)),
        ("model.safetensors a key missing", safetensors_with(dropped), (first,)),
        ("model.safetensors a shape doubled", safetensors_with(reshaped), (first, "model.safetensors")),
        ("model.safetensors an int16 tensor", safetensors_with(int_dtype), (first, "model.safetensors")),
    ]:
        d = variant({})
        (d / "model.safetensors").unlink()
        if data is not None:
            (d / "model.safetensors").write_bytes(data)
        loads(d, "error", names, label, memory=1 * GB)
    index_meta = {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in meta
                                                 if k != "__metadata__"}}
    for label, index, shard, names in [
        ("sharded: good", json.dumps(index_meta), True, ()),
        ("sharded: index not JSON", "{", True, ("model.safetensors.index.json",)),
        ("sharded: index a list", "[]", True, ("model.safetensors.index.json",)),
        ("sharded: weight_map missing", json.dumps({"metadata": {}}), True, ("weight_map", "index.json")),
        ("sharded: weight_map a list", json.dumps({"weight_map": []}), True, ("weight_map", "index.json")),
        ("sharded: shard file missing", json.dumps(index_meta), False, ("model-00001-of-00001.safetensors",)),
        ("sharded: shard name escapes the directory", json.dumps({"weight_map": {k: "../../etc/passwd"
                                                                                 for k in index_meta["weight_map"]}}),
         True, ("passwd", "index.json", "weight_map")),
        ("sharded: key listed but not in the shard",
         json.dumps({"weight_map": {**index_meta["weight_map"], "extra.weight": "model-00001-of-00001.safetensors"}}),
         True, ("extra.weight",)),
    ]:
        d = variant({})
        (d / "model.safetensors").unlink()
        (d / "model.safetensors.index.json").write_text(index)
        if shard:
            os.symlink(shipped / "model.safetensors", d / "model-00001-of-00001.safetensors")
        loads(d, "ok" if label == "sharded: good" else "error", names, label)
    d = variant({})
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    loads(d, "error", ("pytorch_model.bin",), "pytorch_model.bin garbage")


DELETE = object()


def load_create_save(s: Survey, fx: Fixtures) -> None:
    """load / create / save: names, devices, dtypes, targets."""
    import torch

    import blipkit

    name = "scenes-blip"
    for device, expect in [("cuda", "error"), ("gpu", "error"), ("cuda:0", "error"), (5, "either"), ("", "error"),
                           ("meta", "error"), ("mps", "error"), ("xla", "error"), ("cpu", "ok"), ("cpu:0", "ok"),
                           (torch.device("cpu"), "ok"), (None, "ok"), ("CPU", "either"), (["cpu"], "error")]:
        s.add("load/create/save", f"load(device={device!r})",
              api(lambda d=device: blipkit.load(name, device=d).match(fx.good, "a red circle"), expect,
                  ("device",), shape_is(1, 1)))
    for dtype, expect in [("int8", "error"), ("float8", "error"), ("fp16", "either"), ("half", "either"),
                          (torch.int8, "error"), (torch.float16, "either"), ("bfloat16", "ok"), (16, "error"),
                          ("", "error"), ("float32", "ok"), (torch.float64, "either"), (torch.bool, "error"),
                          ("torch.float32", "either")]:
        s.add("load/create/save", f"load(dtype={dtype!r})",
              api(lambda d=dtype: blipkit.load(name, dtype=d).match(fx.good, "a red circle"), expect,
                  ("dtype",), shape_is(1, 1)))
    for label, value, expect, names in [
        ("None", None, "error", ("name",)), ("''", "", "error", ("name", "''")),
        ("NUL", "scenes\0blip", "error", ("name", "NUL", "\\x00")), ("5", 5, "error", ("name", "int")),
        ("bytes", b"scenes-blip", "either", ("name", "bytes")),
        ("missing dir", str(fx.root / "no-such-model"), "error", ("no-such-model",)),
        ("an image file", fx.good, "error", ("good.png",)),
        ("an empty directory", str(fx.root / "img" / "folder.png"), "error", ("folder.png", "config.json")),
        ("unknown Hub repo offline", "Salesforce/no-such-model", "error", ("Salesforce/no-such-model",)),
        ("'..'", "..", "error", ("'..'", "config.json")),
        ("Path of the shipped model", fx.shipped / "scenes-blip", "ok", ()),
        ("shipped name in capitals", "SCENES-BLIP", "either", ("SCENES-BLIP",)),
    ]:
        s.add("load/create/save", f"load({label})",
              api(lambda v=value: blipkit.load(v).match(fx.good, "a red circle"), expect, names, shape_is(1, 1)))
    for label, call, names in [
        ("create('nope')", lambda: blipkit.create("nope"), ("nope",)),
        ("create(None)", lambda: blipkit.create(None), ("preset", "None")),
        ("create(5)", lambda: blipkit.create(5), ("preset", "5")),
        ("create('blip-itm-base-coco', dtype='int8')", lambda: blipkit.create("blip-itm-base-coco", dtype="int8"),
         ("dtype", "int8")),
        ("create('blip-itm-base-coco', device='cuda')", lambda: blipkit.create("blip-itm-base-coco", device="cuda"),
         ("device", "cuda")),
        ("create('blip-itm-base-coco', device='gpu')", lambda: blipkit.create("blip-itm-base-coco", device="gpu"),
         ("device", "gpu")),
        ("create('blip-itm-base-coco', dtype=torch.int64)",
         lambda: blipkit.create("blip-itm-base-coco", dtype=torch.int64), ("dtype", "int64")),
    ]:
        s.add("load/create/save", label, api(call, "error", names), memory=int(0.4 * GB), timeout=30)

    m = fx.blip
    afile = fx.put("save/a-file", b"x")
    ro = fx.root / "save" / "read-only"
    ro.mkdir(parents=True)
    os.chmod(ro, 0o500)
    root_user = os.geteuid() == 0
    for label, target, expect, names in [
        ("an existing file", afile, "error", ("a-file",)),
        ("a path under a file", afile / "sub", "error", ("a-file",)),
        ("''", "", "error", ("directory", "''")),
        ("None", None, "error", ("directory", "None")),
        ("5", 5, "error", ("directory", "int")),
        ("NUL in the path", str(fx.root / "save" / "x\0y"), "error", ("directory", "NUL", "\\x00")),
        ("a read-only directory", ro / "model", "error" if not root_user else "either", ("read-only",)),
        ("a new nested directory", fx.root / "save" / "new" / "deeper", "ok", ()),
    ]:
        def call(t: Any = target) -> Any:
            out = blipkit.save(m, t)
            return blipkit.load(out).match(fx.good, "a red circle")

        s.add("load/create/save", f"save(model, {label})",
              api(call, expect, names, close_to(fx.ref("match-good", lambda: None), 1e-4)))
    s.add("load/create/save", "save(not a model)", api(lambda: blipkit.save(5, fx.root / "save" / "n"), "error",
                                                       ("model", "int")))
    s.add("load/create/save", "save(torch module)", api(lambda: blipkit.save(torch.nn.Linear(2, 2),
                                                                             fx.root / "save" / "lin"),
                                                        "error", ("model", "Linear")))

    def twice() -> Any:
        blipkit.save(m, fx.root / "save" / "twice")
        out = blipkit.save(m, fx.root / "save" / "twice")
        return blipkit.load(out).match(fx.good, "a red circle")

    s.add("load/create/save", "save twice into the same directory",
          api(twice, "ok", (), close_to(fx.ref("match-good", lambda: None), 1e-4)))


def run_cli(argv: list[str], stdin: bytes = b"") -> tuple[int, str, str]:
    """`blipkit ARGV` in this (already forked) process: exit status, stdout, stderr."""
    from blipkit.cli import main

    out, err, inp = tempfile.TemporaryFile(), tempfile.TemporaryFile(), tempfile.TemporaryFile()
    inp.write(stdin)
    inp.seek(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(inp.fileno(), 0)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    sys.argv = ["blipkit", *argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    out.seek(0)
    err.seek(0)
    return int(code or 0), out.read().decode(errors="replace"), err.read().decode(errors="replace")


def records(stdout: str) -> list[dict]:
    """The JSON records a command printed: one document or JSON lines, flattened to dicts with an "image"."""
    try:
        docs = [json.loads(stdout)]
    except ValueError:
        docs = []
        for line in stdout.splitlines():
            try:
                docs.append(json.loads(line))
            except ValueError:
                pass
    found: list[dict] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "image" in x:
                found.append(x)
            for v in x.values():
                if isinstance(v, (list, dict)):
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for d in docs:
        walk(d)
    return found


def cli(argv: list[str], expect: str = "error", names: tuple[str, ...] = (),
        check: Callable[[str, str], str | None] | None = None, untouched: list[str] = ()) -> Callable[[], str | None]:
    """A command-line case. expect: "error" (exit 2, one line on stderr naming one of `names`, no traceback), "ok"
    (exit 0 and `check(stdout, stderr)`), "partial" (good results kept, the bad inputs named, non-zero exit),
    "either" (ok or error). `untouched` files must keep their bytes."""

    def run() -> str | None:
        before = {p: Path(p).read_bytes() for p in untouched}
        code, out, err = run_cli(argv)
        for p, data in before.items():
            if not Path(p).exists() or Path(p).read_bytes() != data:
                return f"overwrote the input {Path(p).name} (exit {code})"
        if "Traceback" in err:
            lines = [x for x in err.splitlines() if x.strip()]
            return f"traceback: {first_line(lines[-1] if lines else err)}"
        # progress bars (tqdm redraws with \r) and "wrote FILE" notes are not error lines
        lines = [x for x in err.replace("\r", "\n").splitlines()
                 if x.strip() and not x.startswith("wrote ") and not re.search(r"\d+%\|", x)]
        if expect == "error" or (expect == "either" and code != 0):
            if code != 2:
                return f"exit {code}, expected 2: {first_line(lines[-1] if lines else out)}"
            if len(lines) != 1:
                return f"{len(lines)} lines on stderr: {first_line(' / '.join(lines), 200)}"
            if names and not names_in(names, lines[0]):
                return f"message does not name {names[0]!r}: {first_line(lines[0])}"
            return None
        if expect == "partial":
            if code == 2 and len(lines) == 1 and names_in(names, lines[0]):
                return None  # refused before any work: nothing lost
            if code == 0:
                return f"exit 0 although some inputs were bad: {first_line(err or out)}"
            if code not in (1, 2):
                return f"exit {code}: {first_line(err)}"
            if names and not names_in(names, err):
                return f"stderr does not name {names[0]!r}: {first_line(err)}"
        elif code != 0:
            return f"exit {code}: {first_line(lines[-1] if lines else out)}"
        if check is not None:
            problem = check(out, err)
            if problem:
                return f"wrong output: {problem}"
        return None

    return run


def cli_cases(s: Survey, fx: Fixtures) -> None:
    """Every subcommand with bad numbers, missing files, output paths, odd texts and bad images."""
    good, good2 = fx.good, fx.good2
    root = fx.root / "cli"
    root.mkdir()
    bulk = root / "bulk"
    bulk.mkdir()
    shutil.copy(good, bulk / "a.png")
    shutil.copy(good2, bulk / "b.png")
    (bulk / "zz-unreadable.png").write_bytes(b"")
    zero = fx.put("cli/zero.png", b"")
    cut = fx.put("cli/cut.png", Path(good).read_bytes()[:300])
    notimg = fx.put("cli/text.png", "hello\n")
    texts = fx.put("cli/texts.txt", "a red circle\na blue square\n")
    binary = fx.put("cli/binary.txt", b"\xff\xfe\x00bad\x80\n")
    latin1 = fx.put("cli/latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    empty = fx.put("cli/empty.txt", b"")
    blank = fx.put("cli/blank.txt", " \n\t\n")
    controls = fx.put("cli/controls.txt", "\x01\x02\n")
    weird = os.fsdecode(os.fsencode(root) + b"/\xff\xfe.png")
    with open(os.fsencode(weird), "wb") as f:
        f.write(Path(good).read_bytes())
    out_png = str(root / "out.png")
    missing = str(root / "missing.png")
    nodir = str(root / "no" / "dir" / "x.png")
    under_file = str(texts / "x.png")
    data = fx.put("cli/data.json", json.dumps([{"image": good, "caption": "a red circle left of a blue square"},
                                               {"image": good2, "caption": "a purple square"}]))
    zero_data = fx.put("cli/zero-data.json", json.dumps([{"image": good, "caption": "a red circle"},
                                                         {"image": str(zero), "caption": "a blue square"}]))
    bin_json = fx.put("cli/binary.json", b"\x89PNG\x00\xff")
    list_json = fx.put("cli/list.json", "[]")

    def has_images(*paths: str) -> Callable[[str, str], str | None]:
        def check(out: str, err: str) -> str | None:
            missing_ = [Path(p).name for p in paths if Path(p).name not in out]
            return f"no result for {', '.join(missing_)}" if missing_ else None

        return check

    base = {
        "match": ["match", good, "-t", "a red circle", "a blue square"],
        "classify": ["classify", good, "-l", "circle", "square"],
        "caption": ["caption", good],
        "ask": ["ask", good, "-q", "what color is the circle?"],
        "ground": ["ground", good, "the red circle"],
        "attention": ["attention", good, "a red circle"],
        "matrix": ["matrix", good, "-t", "a red circle"],
        "plot-space": ["plot-space", good, "-t", "a red circle", "a blue square"],
        "info": ["info"],
    }
    E = "error"
    cases: list[tuple[str, list[str], str, tuple[str, ...], Any, list[str]]] = []

    def add(name: str, argv: list[str], expect: str = E, names: tuple[str, ...] = (), check: Any = None,
            untouched: list[str] = ()) -> None:
        cases.append((name, [str(a) for a in argv], expect, names, check, list(untouched)))

    for cmd, argv in base.items():
        add(f"{cmd} (good)", argv, "ok")
        add(f"{cmd} --device gpu", argv + ["--device", "gpu"], E, ("gpu", "--device"))
        add(f"{cmd} --device cuda", argv + ["--device", "cuda"], E, ("cuda", "--device"))
        add(f"{cmd} --dtype int8", argv + ["--dtype", "int8"], E, ("int8", "--dtype"))
        add(f"{cmd} --model missing dir", argv + ["--model", str(root / "nope")], E, ("nope",))
        add(f"{cmd} --model ''", argv + ["--model", ""], E, ("--model", "''", "model"))
        add(f"{cmd} --model an image", argv + ["--model", good], E, ("good.png",))
        add(f"{cmd} --model a broken config", argv + ["--model", str(fx.broken_model())], E, ("config.json",))
        if cmd in ("info", "plot-space"):
            continue
        image_at = 1
        for label, bad, names in [("missing image", missing, ("missing.png",)), ("zero-byte image", zero,
                                                                                    ("zero.png",)),
                                  ("truncated image", cut, ("cut.png",)), ("text file as image", notimg,
                                                                             ("text.png",)),
                                  ("folder without images", root / "no-images", ("no-images",))]:
            (root / "no-images").mkdir(exist_ok=True)
            argv2 = list(argv)
            argv2[image_at] = str(bad)
            expect = "either" if cmd in ("match", "classify", "caption", "ask") else E
            add(f"{cmd} {label}", argv2, expect, names)
        argv2 = list(argv)
        argv2[image_at] = weird
        add(f"{cmd} non-UTF-8 image file name", argv2, "ok")
    # bulk commands keep what succeeded past an unreadable file
    for cmd, extra in (("match", ["-t", "a red circle"]), ("classify", ["-l", "circle", "square"]),
                       ("caption", []), ("ask", ["-q", "what color is it?"]), ("matrix", ["-t", "a red circle"])):
        add(f"{cmd} DIR with an unreadable file at the end", [cmd, str(bulk), *extra], "partial", ("zz-unreadable",),
            has_images(bulk / "a.png", bulk / "b.png"))
        add(f"{cmd} good + missing + good", [cmd, good, missing, good2, *extra], "partial", ("missing.png",),
            has_images(good, good2))

    def grouped(out: str, err: str) -> str | None:
        recs = records(out)
        caps = {Path(r["image"]).name: r.get("captions", r.get("caption")) for r in recs}
        if set(caps) != {"good.png", "good2.png"}:
            return f"results for {sorted(caps)}"
        bad_ = [k for k, v in caps.items() if not isinstance(v, list) or len(v) != 3]
        return f"not 3 captions for {bad_}: {caps}" if bad_ else None

    add("caption 2 images --num-captions 3 --beams 1 --json", ["caption", good, good2, "--num-captions", "3",
                                                               "--beams", "1", "--json"], "either",
        ("--num-captions", "--beams"), grouped)
    add("caption 2 images --num-captions 3 --json", ["caption", good, good2, "--num-captions", "3", "--json"], "ok",
        (), grouped)
    numbers = {
        "caption": {"--beams": ["0", "-1", "abc", "1.5", "100000"], "--max-new-tokens": ["0", "-1", "1000000000"],
                    "--min-new-tokens": ["-1", "1000"], "--top-p": ["0", "1.5", "nan"],
                    "--temperature": ["0", "-1", "nan", "inf"], "--num-captions": ["0", "-1", "x"],
                    "--batch-size": ["0", "-1"], "--seed": ["x", "-1"]},
        "ask": {"--beams": ["0", "-1", "x"], "--batch-size": ["0"]},
        "match": {"-k": ["0", "-1", "x"], "--top-n": ["0", "-5"]},
        "classify": {"-k": ["0", "-1"], "--batch-size": ["0", "-3"], "--head": ["xyz"]},
        "ground": {"--layer": ["100", "-100", "x"], "--threshold": ["-1", "2", "nan", "x"]},
        "attention": {"--layer": ["99", "-99", "x"]},
        "matrix": {"--head": ["xyz"], "--batch-size": ["0"]},
        "plot-space": {"--method": ["xyz"], "--batch-size": ["0"], "--seed": ["x"]},
    }
    for cmd, options in numbers.items():
        for opt, values in options.items():
            for value in values:
                sample = ["--sample"] if opt in ("--top-p", "--temperature") else []
                add(f"{cmd} {opt} {value}", base[cmd] + sample + [opt, value], E, (opt, value))
    add("caption --min-new-tokens 20 --max-new-tokens 10", base["caption"] + ["--min-new-tokens", "20",
                                                                             "--max-new-tokens", "10"], E,
        ("--min-new-tokens", "--max-new-tokens"))
    add("caption --prompt of 60 words --min-new-tokens 50", base["caption"] + ["--prompt", "red " * 60,
                                                                              "--min-new-tokens", "50"], "either",
        ("--prompt", "--min-new-tokens", "token"))
    add("caption --prompt ''", base["caption"] + ["--prompt", ""], "either", ("--prompt",))
    add("caption --prompt control characters", base["caption"] + ["--prompt", "\x01\x02"], E, ("prompt",))
    # texts and text files
    for cmd, flag in (("match", "--texts-file"), ("matrix", "--texts-file"), ("classify", "--labels-file"),
                      ("ask", "--answers-file"), ("ground", "--texts-file")):
        argv = base[cmd]
        for label, path, names in [("missing", root / "nope.txt", ("nope.txt",)), ("non-UTF-8", binary,
                                                                                   ("binary.txt",)),
                                   ("latin-1", latin1, ("latin1.txt",)), ("empty", empty, ("empty.txt",)),
                                   ("blank lines", blank, ("blank.txt",)), ("control chars", controls,
                                                                            ("controls.txt", "\\x01")),
                                   ("a directory", root, ("cli",))]:
            expect = E
            if label in ("empty", "blank lines") and cmd in ("match", "matrix", "classify", "ground"):
                expect = "either"  # the texts on the command line are enough
            add(f"{cmd} {flag} {label}", argv + [flag, str(path)], expect, names)
    for cmd, argv in (("match", ["match", good, "-t"]), ("matrix", ["matrix", good, "-t"]),
                      ("classify", ["classify", good, "-l"])):
        for label, text in [("''", ""), ("spaces", "   "), ("control chars", "\x01\x02"),
                            ("surrogate (non-UTF-8 argv)", os.fsdecode(b"\xff\xfe"))]:
            add(f"{cmd} text {label}", argv + [text], E, ("text", "label", "-t", "--labels", "argument"))
    add("match without texts", ["match", good], E, ("text", "-t"))
    add("classify without labels", ["classify", good], E, ("label",))
    add("ask -q ''", ["ask", good, "-q", ""], E, ("question", "-q"))
    add("ask -q control chars", ["ask", good, "-q", "\x01"], E, ("question", "-q"))
    add("ask -q surrogate", ["ask", good, "-q", os.fsdecode(b"\xff")], E, ("question", "-q"))
    add("ask --answers ''", ["ask", good, "-q", "what?", "--answers", ""], E, ("answer",))
    add("ask --answers red (one)", ["ask", good, "-q", "what color is the circle?", "--answers", "red"], "ok", (),
        lambda out, err: None if "red" in out else f"{out!r:.80}")
    add("ground without phrase", ["ground", good], E, ("phrase",))
    add("ground a.png b.png phrase", ["ground", good, good2, "the red circle", "--json"], "either",
        ("image", "good2.png"), lambda out, err: "grounded the file name good2.png" if "good2.png" in out else None)
    add("attention a.png b.png text", ["attention", good, good2, "a red circle", "--json"], "either",
        ("image", "good2.png"), lambda out, err: "read the file name good2.png" if "good2.png" in out else None)
    add("attention without text", ["attention", good], E, ("text",))
    for cmd in ("ground", "attention", "matrix", "plot-space"):
        argv = base[cmd]
        add(f"{cmd} -o x.txt", argv + ["-o", str(root / "x.txt")], E, ("x.txt", ".png"))
        add(f"{cmd} -o missing/dir/x.png", argv + ["-o", nodir], "either", ("x.png", "dir"))
        add(f"{cmd} -o a path under a file", argv + ["-o", under_file], E, ("texts.txt", "x.png"))
        add(f"{cmd} -o a directory", argv + ["-o", str(root)], E, ("cli", "--out", "-o"))
        victim = fx.put(f"cli/victim-{cmd}.png", Path(good).read_bytes())  # its own copy: it may be overwritten
        argv_v = [str(victim) if a == good else a for a in argv]
        add(f"{cmd} -o the input image", argv_v + ["-o", str(victim)], E, (victim.name,), None, [str(victim)])
        add(f"{cmd} -o good", argv + ["-o", out_png], "ok")
    add("plot-space no inputs", ["plot-space", "-o", out_png], E, ("image", "text"))
    add("plot-space one text", ["plot-space", "-t", "a", "-o", out_png], E, ("two", "image", "text"))
    add("plot-space --method umap", base["plot-space"] + ["--method", "umap"], "either", ("umap",))
    add("info --arrays", ["info", "--arrays"], "ok")
    # eval and train
    ev = ["eval", "--data", str(data), "--tasks", "retrieval"]
    add("eval (good)", ev, "ok")
    for opt, values in {"--k": ["0", "-1", "x"], "--limit": ["0", "-1"], "--batch-size": ["0", "-1"],
                        "--num-beams": ["0", "x"], "--layer": ["99", "-99"], "--tasks": ["xyz", "", "retrieval,,"],
                        "--split": [""]}.items():
        for value in values:
            lenient = value in ("retrieval,,",) or opt == "--split"  # an empty item or an unused split may be ignored
            add(f"eval {opt} {value!r}", ev + [opt, value], "either" if lenient else E,
                (opt, value) if value else (opt,))
    for label, path, names in [("missing", root / "nope.json", ("nope.json",)), ("binary", bin_json,
                                                                                  ("binary.json",)),
                               ("empty", empty, ("empty.txt",)), ("a list of nothing", list_json, ("list.json",)),
                               ("a directory without data", root / "no-images", ("no-images",))]:
        add(f"eval --data {label}", ["eval", "--data", str(path), "--tasks", "retrieval"], E, names)
    add("eval --out missing/dir/x.json", ev + ["--out", str(root / "no" / "dir" / "x.json")], "either",
        ("x.json", "dir"))
    add("eval --out a path under a file", ev + ["--out", str(texts / "x.json")], E, ("texts.txt", "x.json"))
    victim = fx.put("cli/victim-data.json", data.read_bytes())  # its own copy: it may be overwritten
    add("eval --out the data file", ["eval", "--data", victim, "--tasks", "retrieval", "--out", victim], E,
        (victim.name,), None, [str(victim)])
    add("eval zero-byte image", ["eval", "--data", str(zero_data), "--tasks", "retrieval"], E, ("zero.png",))
    add("eval --skip-bad zero-byte image", ["eval", "--data", str(zero_data), "--tasks", "retrieval", "--skip-bad"],
        "ok")
    add("eval --vqa missing", ev + ["--vqa", str(root / "nope.json")], E, ("nope.json",))
    add("eval --boxes binary", ev + ["--boxes", str(bin_json)], E, ("binary.json",))
    tr = ["train", "--data", str(data), "--steps", "1", "--batch-size", "1", "--log-every", "1"]
    run_dir = root / "runs"
    counter = [0]

    def out_dir() -> str:
        counter[0] += 1
        return str(run_dir / str(counter[0]))

    add("train (good, 1 step)", tr + ["--out", out_dir()], "ok")
    for opt, values in {"--steps": ["0", "-1", "x"], "--batch-size": ["0", "-1"], "--lr": ["-1", "nan", "x"],
                        "--warmup": ["-1"], "--weight-decay": ["nan", "-1"], "--clip": ["-1", "nan"],
                        "--save-every": ["0"], "--log-every": ["0"], "--workers": ["-1"],
                        "--objectives": ["xyz", ""], "--stage": ["xyz"], "--amp": ["xyz"], "--arch": ["xyz"],
                        "--lm-filter": ["("], "--stop-after": ["0", "-1"]}.items():
        for value in values:
            argv = [a for a in tr]
            if opt in argv:
                i = argv.index(opt)
                argv[i + 1] = value
            else:
                argv += [opt, value]
            lenient = opt == "--objectives" and value == ""  # empty: the default objectives
            add(f"train {opt} {value!r}", argv + ["--out", out_dir()], "either" if lenient else E,
                (opt, value) if value else (opt,))
    add("train --out an existing file", tr + ["--out", str(texts)], E, ("texts.txt",))
    add("train --data missing", ["train", "--data", str(root / "nope.json"), "--out", out_dir()], E, ("nope.json",))
    add("train --data binary", ["train", "--data", str(bin_json), "--out", out_dir()], E, ("binary.json",))
    add("train zero-byte image", ["train", "--data", str(zero_data), "--steps", "1", "--batch-size", "2",
                                  "--out", out_dir()], E, ("zero.png",))
    add("train --skip-bad zero-byte image", ["train", "--data", str(zero_data), "--steps", "1", "--batch-size", "1",
                                             "--skip-bad", "--out", out_dir()], "ok")
    add("no subcommand", [], E, ("command",))
    add("unknown subcommand", ["nope"], E, ("nope",))
    add("unknown option", ["caption", good, "--nope"], E, ("--nope",))
    for name, argv, expect, names, check, untouched in cases:
        heavy = name.startswith(("train", "eval"))
        s.add("CLI", name, cli(argv, expect, names, check, untouched), timeout=180 if heavy else 90,
              memory=3 * GB)


def _broken_model(fx: Fixtures) -> Path:
    path = fx.root / "broken-model"
    if not path.exists():
        shutil.copytree(fx.shipped / "scenes-blip", path)
        cfg = json.loads((path / "config.json").read_text())
        cfg["text_config"]["hidden_size"] = "wide"
        (path / "config.json").write_text(json.dumps(cfg))
    return path


Fixtures.broken_model = lambda self: _broken_model(self)  # type: ignore[attr-defined]


def concurrency(s: Survey, fx: Fixtures) -> None:
    """Attention maps and GradCAM from threads while other threads use the same model."""
    import torch

    from blipkit import tasks

    m, b2i = fx.blip, fx.blip2("scenes-blip2-itm")
    a, b = fx.good, fx.good2
    ta, tb = "a red circle left of a blue square", "a purple square and a yellow circle"
    ref_att = {k: fx.ref(f"att-{k}", lambda k=k: tasks.cross_attention_maps(m, *k).maps.detach().clone())
               for k in ((a, ta), (b, tb))}
    ref_cam = {k: fx.ref(f"cam-{k}", lambda k=k: tasks.gradcam(m, *k).phrase_map.detach().clone())
               for k in ((a, ta), (b, tb))}
    ref_att2 = fx.ref("att2", lambda: tasks.cross_attention_maps(b2i, a, ta).maps.detach().clone())

    def threaded(jobs: list[Callable[[], str | None]], rounds: int = 10) -> str | None:
        """Run each job `rounds` times in its own thread, all at once; the first problem or None."""
        problems: list[str] = []
        barrier = threading.Barrier(len(jobs))

        def worker(job: Callable[[], str | None]) -> None:
            barrier.wait()
            for _ in range(rounds):
                try:
                    p = job()
                except BaseException as e:  # noqa: BLE001
                    p = f"{type(e).__name__}: {first_line(e)}"
                if p:
                    problems.append(p)

        threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if problems:
            return f"{len(problems)} of {rounds * len(jobs)} calls wrong, e.g. {problems[0]}"
        return None

    def att(model: Any, image: str, text: str, ref: Any) -> Callable[[], str | None]:
        def job() -> str | None:
            got = tasks.cross_attention_maps(model, image, text).maps
            if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-4):
                return "attention maps of another call"
            return None

        return job

    def cam(image: str, text: str) -> Callable[[], str | None]:
        def job() -> str | None:
            got = tasks.gradcam(m, image, text).phrase_map
            ref = ref_cam[(image, text)]
            if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-3):
                return "GradCAM map of another call"
            return None

        return job

    def match() -> str | None:
        m.match([a, b], [ta, tb, "a green triangle"])
        return None

    def caption() -> str | None:
        m.caption(a, num_beams=1, max_new_tokens=8)
        return None

    plans = {
        "attention maps while match runs": [att(m, a, ta, ref_att[(a, ta)]), match],
        "attention maps from two threads": [att(m, a, ta, ref_att[(a, ta)]), att(m, b, tb, ref_att[(b, tb)])],
        "GradCAM while match runs": [cam(a, ta), match],
        "GradCAM from two threads": [cam(a, ta), cam(b, tb)],
        "attention maps while GradCAM runs": [att(m, a, ta, ref_att[(a, ta)]), cam(b, tb)],
        "attention maps while caption runs": [att(m, a, ta, ref_att[(a, ta)]), caption],
        "BLIP-2 attention maps while match runs": [att(b2i, a, ta, ref_att2),
                                                   lambda: (b2i.match(b, [tb, ta]), None)[1]],
    }
    for name, jobs in plans.items():
        s.add("concurrency", name, lambda jobs=jobs: threaded(jobs), timeout=240)

    def same_results() -> str | None:
        ref = m.match([a, b], [ta, tb]).detach()
        out: list[Any] = []

        def one() -> None:
            out.append(m.match([a, b], [ta, tb]).detach())

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return None if all(torch.allclose(o, ref, atol=1e-5) for o in out) else "concurrent match differs"

    s.add("concurrency", "four threads of match equal one", same_results, timeout=120)


def memory(s: Survey, fx: Fixtures) -> None:
    """Results must not require grad (each keeps its whole graph alive); generation must stay within bounds."""
    from blipkit import tasks

    m, b2i, b2 = fx.blip, fx.blip2("scenes-blip2-itm"), fx.blip2("scenes-blip2-opt")
    g = fx.good
    t = ["a red circle", "a blue square"]
    calls = {
        "BLIP match": lambda: m.match(g, t), "BLIP similarity": lambda: m.similarity(g, t),
        "BLIP itm_logits": lambda: m.itm_logits(g, t), "BLIP encode_images": lambda: m.encode_images(g),
        "BLIP encode_texts": lambda: m.encode_texts(t), "BLIP image_features": lambda: m.image_features(g),
        "BLIP match on features": lambda: m.match(m.image_features(g), t),
        "BLIP-2 match": lambda: b2i.match(g, t), "BLIP-2 similarity": lambda: b2i.similarity(g, t),
        "BLIP-2 itm_logits": lambda: b2i.itm_logits(g, t), "BLIP-2 encode_images": lambda: b2i.encode_images(g),
        "BLIP-2 encode_texts": lambda: b2i.encode_texts(t), "BLIP-2 image_features": lambda: b2i.image_features(g),
        "BLIP-2 qformer_features": lambda: b2i.qformer_features(g),
        "BLIP-2 OPT image_features": lambda: b2.image_features(g),
        "tasks.encode_images": lambda: tasks.encode_images(m, [g]),
        "tasks.encode_texts": lambda: tasks.encode_texts(m, t),
        "tasks.label_scores": lambda: tasks.label_scores(m, g, ["circle", "square"]),
        "tasks.score_matrix itm": lambda: tasks.score_matrix(m, g, t, head="itm"),
        "tasks.cross_attention_maps": lambda: tasks.cross_attention_maps(m, g, t[0]),
        "tasks.gradcam": lambda: tasks.gradcam(m, g, t[0]),
        "tasks.embedding_space": lambda: tasks.embedding_space(m, texts=t + ["a green star"]),
    }
    for name, call in calls.items():
        s.add("memory", f"{name} result without grad", api(call, "ok", grad=True))

    def weights_untouched() -> str | None:
        tasks.gradcam(m, g, t[0])
        grads = [n for n, p in m.named_parameters() if p.grad is not None]
        return f"gradcam left .grad on {len(grads)} weights, e.g. {grads[0]}" if grads else None

    s.add("memory", "gradcam leaves no .grad on the weights", weights_untouched)
    s.add("memory", "BLIP caption(max_new_tokens=10**7) bounded",
          api(lambda: m.caption(g, max_new_tokens=10 ** 7, num_beams=1), "either", ("max_new_tokens",),
              str_list(1)), memory=1 * GB, timeout=60)
    s.add("memory", "BLIP caption(num_beams=10**5) bounded",
          api(lambda: m.caption(g, num_beams=10 ** 5, max_new_tokens=5), "either", ("num_beams",), str_list(1)),
          memory=1 * GB, timeout=60)
    s.add("memory", "BLIP answer(max_new_tokens=10**7) bounded",
          api(lambda: m.answer(g, "what?", max_new_tokens=10 ** 7, num_beams=1), "either", ("max_new_tokens",),
              str_list(1)), memory=1 * GB, timeout=60)
    s.add("memory", "BLIP match(1 image, 20000 texts) within 1 GB",
          api(lambda: m.match(g, ["a red circle"] * 20000), "ok", (), shape_is(1, 20000)),
          memory=1 * GB, timeout=120)

    def many_results() -> Any:
        kept = [m.match(g, [f"text {i}" for i in range(100)]) for _ in range(20)]
        return kept[-1]

    s.add("memory", "20 results of match(image, 100 texts) kept within 1 GB", api(many_results, "ok", grad=True),
          memory=1 * GB, timeout=120)


def add_all(s: Survey, fx: Fixtures) -> None:
    """Every category, in the order of the table."""
    for add in (image_files, pil_images, tensors, texts, gen_options, task_options, capabilities, checkpoint_files,
                load_create_save, cli_cases, concurrency, memory):
        add(s, fx)




def print_table(results: list[tuple[Case, str | None]], show_clean: bool) -> int:
    cats: dict[str, list[int]] = {}
    for case, verdict in results:
        row = cats.setdefault(case.category, [0, 0, 0])
        row[0] += 1
        row[1 if verdict is None else 2] += 1
    print("| category | tried | clean | bad |")
    print("| --- | ---: | ---: | ---: |")
    for cat, (n, ok, bad) in cats.items():
        print(f"| {cat} | {n} | {ok} | {bad} |")
    total = [sum(r[i] for r in cats.values()) for i in range(3)]
    print(f"| **total** | **{total[0]}** | **{total[1]}** | **{total[2]}** |")
    print()
    bad = [(c, v) for c, v in results if v is not None]
    if bad:
        print(f"### bad cases ({len(bad)})")
        for case, verdict in bad:
            print(f"- [{case.category}] {case.name}: {verdict}")
    if show_clean:
        print("\n### clean cases")
        for case, verdict in results:
            if verdict is None:
                print(f"- [{case.category}] {case.name}")
    return total[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=str(ROOT), help="checkout to survey (default: this one)")
    parser.add_argument("--only", nargs="*", default=None, help="categories (prefixes) to run")
    parser.add_argument("--match", default=None, help="run only cases whose name contains this")
    parser.add_argument("--show-clean", action="store_true", help="list the clean cases too")
    parser.add_argument("--json", default=None, help="also write every verdict to this JSON file")
    args = parser.parse_args()
    src = Path(args.src).resolve()
    sys.path.insert(0, str(src / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(src / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the children are forked
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # forked children must not inherit a busy OpenMP pool
    import blipkit

    if not Path(blipkit.__file__).resolve().is_relative_to(src / "src"):
        raise SystemExit(f"imported blipkit from {blipkit.__file__}, not from {src / 'src'}")
    start = time.process_time()
    here = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="try-inputs-") as tmp:
        # relative paths (a save to '', an output named 'x.png') land in a scratch folder, not in the caller's
        scratch = Path(tmp) / "cwd"
        scratch.mkdir()
        os.chdir(scratch)
        fx = Fixtures(Path(tmp), src)
        survey = Survey()
        add_all(survey, fx)
        cases = [c for c in survey.cases if (not args.only or any(c.category.startswith(o) for o in args.only))
                 and (not args.match or args.match in c.name)]
        results = []
        for i, case in enumerate(cases):
            verdict = in_child(case)
            results.append((case, verdict))
            if verdict is not None or (i + 1) % 50 == 0:
                print(f"{i + 1}/{len(cases)} [{case.category}] {case.name}: {verdict or 'clean'}", file=sys.stderr,
                      flush=True)
        os.chdir(here)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = time.process_time() - start + children.ru_utime + children.ru_stime
    print(f"blipkit from {src} ({len(cases)} inputs, {cpu:.0f} s CPU)\n")
    bad = print_table(results, args.show_clean)
    if args.json:
        Path(args.json).write_text(json.dumps([{"category": c.category, "name": c.name, "verdict": v}
                                               for c, v in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
