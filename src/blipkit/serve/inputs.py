"""The edge of the server: limits, the body-size guard, request parsing (multipart or JSON), image decoding, errors.

Every request body becomes typed values here, once: images as upright RGB PIL images decoded from the bytes the
client sent (never a path: nothing a request says is opened as a file), options as a validated pydantic model.
Every error leaves as a JSON object `{"error": message, "field": name}` (field when one is at fault).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse

from ..errors import BlipkitError, CapabilityError, InputError
from ..processing import load_image
from ..processing.tokenizer import is_blank

#: image formats a request may carry (no EPS/PDF/...: those would run external programs)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")


@dataclass(frozen=True)
class Limits:
    """What one request may carry; over a limit is a 413 (body, image size) or a 422 naming the field."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_images: int = 16
    max_pixels: int = 40_000_000  # an image header claiming more is refused before any decoding
    max_texts: int = 64
    max_text_chars: int = 1000


class ApiError(HTTPException):
    """An HTTP error with a message and, where one is at fault, the request field."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(status, message)
        self.field = field


def error_response(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    """The JSON object every error is sent as."""
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def blipkit_status(error: BlipkitError) -> int:
    """HTTP status of an error blipkit raised: bad input 422, a capability the model lacks 400, else 501."""
    if isinstance(error, InputError):
        return 422
    if isinstance(error, CapabilityError):
        return 400
    return 501  # e.g. a picture asked for without matplotlib installed on the server


def validation_message(error: ValidationError | Any) -> tuple[str, str | None]:
    """(one-line message, field) of a pydantic validation error: its first problem, naming the field."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": str(error)}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    field = loc[0] if loc else None
    where = ".".join(loc) or "request"
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}", field


# ---------------------------------------------------------------------------------------------------- middleware


class BodyTooLarge(ApiError):
    """The body went past the limit while it was being received."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes: send smaller or fewer images")


class Guard:
    """ASGI middleware: the API key, then the body limit (by Content-Length, else counted while it streams in).

    Both are checked before the app reads the body, so an oversized or unauthorised upload is refused without
    being stored. Paths in `open_paths` (the page, its files, the health check, the docs) need no key.
    """

    def __init__(self, app: Any, max_body_bytes: int, api_key: str | None = None,
                 open_paths: tuple[str, ...] = ()) -> None:
        self.app, self.limit, self.api_key, self.open_paths = app, max_body_bytes, api_key, open_paths

    def _authorised(self, scope: dict) -> bool:
        if self.api_key is None or scope["path"] in self.open_paths or scope["path"].startswith("/static/"):
            return True
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-api-key", b"").decode("latin-1")
        auth = headers.get(b"authorization", b"").decode("latin-1")
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorised(scope):
            response = error_response(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY' or "
                                      "'X-API-Key: KEY'", headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await error_response(400, "Content-Length is not a number")(scope, receive, send)
            if int(length) > self.limit:
                return await error_response(413, BodyTooLarge(self.limit).detail)(scope, receive, send)
        received, started = 0, False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge as e:
            if not started:
                await error_response(413, e.detail)(scope, receive, send)


# ---------------------------------------------------------------------------------------------------- images


def decode_image(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Bytes a client sent -> an upright RGB image; 422 for an empty, unknown or broken file, 413 for a bomb."""
    if not data:
        raise ApiError(422, f"{field} is empty (0 bytes): send an image file", field)
    try:
        opened = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        if isinstance(e, Image.DecompressionBombError):
            raise ApiError(413, f"{field} has too many pixels ({e})", field) from None
        raise ApiError(422, f"{field} is not an image ({', '.join(FORMATS)})", field) from None
    with opened:
        w, h = opened.size
        if w * h > limits.max_pixels:
            raise ApiError(413, f"{field} is {w}x{h} = {w * h} pixels, more than the limit of {limits.max_pixels}: "
                           "send a smaller image", field)
        try:
            opened.load()  # decode now: a truncated file fails here
            return load_image(opened)
        except InputError as e:
            raise ApiError(422, f"{field}: {e}", field) from None
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            raise ApiError(422, f"{field} cannot be decoded ({e}): send a complete image file", field) from None


def from_base64(text: Any, field: str) -> bytes:
    """Base64 text (optionally a `data:image/...;base64,` URL) -> bytes; anything else is a 422 for `field`."""
    if not isinstance(text, str):
        raise ApiError(422, f"{field} must be a base64 string, got {type(text).__name__}", field)
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, f"{field} is not base64 image data (images are sent as bytes, never as paths)",
                       field) from None


# ---------------------------------------------------------------------------------------------------- requests


def _list_fields(options: type[BaseModel]) -> set[str]:
    """Names of the option fields that hold lists (repeatable in a form)."""
    out = set()
    for name, info in options.model_fields.items():
        kinds = typing.get_args(info.annotation) or (info.annotation,)
        if any(typing.get_origin(k) is list or k is list for k in (info.annotation, *kinds)):
            out.add(name)
    return out


async def _form(request: Request, options: type[BaseModel], limits: Limits) -> tuple[list[tuple[str, bytes]], dict]:
    try:
        form = await request.form(max_files=limits.max_images, max_fields=4 * limits.max_texts + 64)
    except (MultiPartException, StarletteHTTPException) as e:  # Starlette raises the latter for the former
        if isinstance(e, ApiError):
            raise
        message = getattr(e, "message", None) or str(getattr(e, "detail", e))
        if "Too many files" in message:
            raise ApiError(422, f"too many images: at most {limits.max_images} per request", "image") from None
        raise ApiError(422 if "Too many" in message else 400, f"multipart body: {message}") from None
    images = []
    for i, value in enumerate(form.getlist("image")):
        if isinstance(value, str):  # a text field named image: never taken for a path
            raise ApiError(422, f"image[{i}] is text; send the image as a file upload", "image")
        images.append((f"image[{i}]", await value.read()))
    lists = _list_fields(options)
    data: dict[str, Any] = {}
    for key in form.keys():
        if key == "image":
            continue
        values = form.getlist(key)
        if any(not isinstance(v, str) for v in values):
            raise ApiError(422, f"{key} must be a text field, not a file", key)
        data[key] = values if key in lists else values[-1]
    return images, data


async def _json(request: Request) -> tuple[list[tuple[str, bytes]], dict]:
    try:
        data = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ApiError(422, f"the JSON body must be an object, got {type(data).__name__}")
    images = []
    if "image" in data:
        images.append(("image", from_base64(data.pop("image"), "image")))
    raw = data.pop("images", [])
    if not isinstance(raw, list):
        raise ApiError(422, "images must be a list of base64 strings", "images")
    images += [(f"images[{i}]", from_base64(v, f"images[{i}]")) for i, v in enumerate(raw)]
    return images, data


class Decoded(list):
    """A request's images, decoded; with `pixels` made from them in the same step when the endpoint asks for them."""

    pixels: Any = None


async def parse(request: Request, options: type[BaseModel], limits: Limits, images: tuple[int, int] = (1, 1 << 30),
                prepare: Callable[[list[Image.Image]], Any] | None = None) -> tuple[Decoded, BaseModel]:
    """A request's images (decoded) and options (validated), from multipart form data or a JSON object.

    `images` is the (fewest, most) images the endpoint takes; the most is also capped by `limits.max_images`.
    `prepare` (e.g. `model.pixels`) runs on the decoded images in the same worker thread, as `Decoded.pixels`.
    """
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        raw, data = await _form(request, options, limits)
    elif kind in ("application/json", ""):
        raw, data = await _json(request)
    else:
        raise ApiError(415, f"content type {kind!r}: send multipart/form-data or application/json")
    try:
        parsed = options.model_validate(data)
    except ValidationError as e:
        message, field = validation_message(e)
        raise ApiError(422, message, field) from None
    low, high = images[0], min(images[1], limits.max_images)
    if not low <= len(raw) <= high:
        many = f"{low}" if low == high else f"{low} to {high}"
        raise ApiError(422, f"send {many} images (as 'image' file fields or base64 in JSON), got {len(raw)}",
                       "image")
    def decode() -> Decoded:
        out = Decoded(decode_image(data, name, limits) for name, data in raw)
        if prepare is not None and out:
            out.pixels = prepare(out)
        return out

    return await run_in_threadpool(decode), parsed


def check_texts(texts: list[str] | None, field: str, limits: Limits, required: bool = True) -> list[str]:
    """Texts of a request: present when `required`, at most `max_texts`, none blank or over `max_text_chars`."""
    texts = list(texts or [])
    if required and not texts:
        raise ApiError(422, f"{field}: give at least one", field)
    if len(texts) > limits.max_texts:
        raise ApiError(422, f"{field}: {len(texts)} given, at most {limits.max_texts} per request", field)
    for i, t in enumerate(texts):
        if is_blank(t):
            raise ApiError(422, f"{field}[{i}] is blank: every one needs some words", field)
        if len(t) > limits.max_text_chars:
            raise ApiError(422, f"{field}[{i}] has {len(t)} characters, more than {limits.max_text_chars}", field)
    return texts
