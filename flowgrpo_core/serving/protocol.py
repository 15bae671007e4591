"""The reward-server wire format: JSON with base64 PNG images, validated against explicit limits.

Request  ``POST /score``: ``{"prompts": [str], "images": [base64 PNG], "metadata": [object] | null}``
Response ``200``: ``{"scores": [float | null], "details": {key: [value per image]}}``; errors: ``{"error": str}``.

Nothing here ever unpickles or evaluates data. Every limit bounds memory before it is spent:
- the body is read as that one JSON object, field by field (:func:`parse_request`), never as a generic
  document: anything but an object is refused at its first byte, a list stops at ``max_items + 1``
  entries, each prompt and metadata object is parsed from a window of bounded size, and image strings
  are never copied into Python text (their base64 is decoded straight from the body). A body of
  millions of tiny JSON values therefore costs about its own size, where ``json.loads`` built ~26 bytes
  of Python objects per byte of it (a 32 MiB body: 0.9 GB and 3.7 s, before it could be refused);
- each image is a PNG whose header is checked (magic bytes, then the declared size against the per-image
  and per-request pixel limits) before a single pixel is inflated, so a decompression bomb costs 33
  bytes of parsing, and the decoded pixels of one request are bounded (``max_request_pixels``; PIL keeps
  RGB at 4 bytes a pixel) whatever the PNGs' compression ratio;
- images are inflated by at most ``DECODE_WORKERS`` threads at a time, after the whole request passed its
  checks, and the body is dropped as soon as they are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
_DATA_URI_PREFIX = b"data:image/png;base64,"
_REQUEST_FIELDS = ("prompts", "images", "metadata")
# images inflated at once: each holds its PNG bytes and, while converting to RGB, a second copy of its
# pixels, so this bounds the transient memory of decoding beside the request's own decoded pixels
DECODE_WORKERS = 8
# a metadata object may take this many times ``max_metadata_bytes`` as sent (whitespace, escapes): its
# JSON is parsed from a window of that size, so a huge value costs a bounded parse, not the whole body
METADATA_WINDOW = 4
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of bytes that are not UTF-8
_JSON_KINDS = {ord('"'): "string", ord("{"): "object", ord("["): "array", ord("t"): "boolean"}
_JSON_KINDS.update({ord("f"): "boolean", ord("n"): "null", ord("-"): "number"})
_JSON_KINDS.update({c: "number" for c in b"0123456789"})
_LITERALS = (b"true", b"false", b"null")
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Limits:
    """What one request may carry. Defaults fit a 64-image batch of 1024 px PNGs.

    ``max_request_pixels`` bounds the decoded size of a whole request, whatever its PNGs compress to
    (a blank 2048 px PNG is 7 KB on the wire and 16 MiB in memory): 64 x 1024 x 1024 pixels by default,
    exactly the documented batch, i.e. 256 MiB of PIL RGB images (4 bytes a pixel); 16 images of
    2048 x 2048 also fit, 64 of them do not."""

    max_body_bytes: int = 256 * 2**20
    max_items: int = 64  # images per request
    max_image_pixels: int = 2048 * 2048
    max_image_side: int = 4096
    # what a prompt file may hold (prompts.sets.MAX_PROMPT_CHARS, pinned equal by a test; not imported: the
    # prompts package needs torch, which the light reward images do not install)
    max_prompt_chars: int = 4096
    max_metadata_bytes: int = 64 * 2**10  # JSON size of one image's metadata object
    max_request_pixels: int = 64 * 1024 * 1024  # width * height summed over the images of one request

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ProtocolError(ValueError):
    """A request the server refuses; ``status`` is the HTTP status (4xx) to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ScoreRequest:
    """A decoded, validated request: B RGB images, B prompts, B metadata dicts."""

    images: list[Image.Image]
    prompts: list[str]
    metadata: list[dict]

    def __len__(self) -> int:
        return len(self.images)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def png_bytes(image: Image.Image) -> bytes:
    """The image as an 8-bit RGB PNG.

    Written here, not by PIL: PIL tries five filters on every row, which made encoding the client's
    largest cost (~18 ms per noisy 512 px image). One filter for all rows (Sub: each byte minus the byte
    one pixel to its left, mod 256) plus zlib's run-length mode is ~3.5x faster at the same size on
    textured images; PNG stays lossless whatever the filter, and any decoder reads it.
    """
    array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # (H, W, 3) uint8
    height, width, channels = array.shape
    rows = array.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # PNG filter type 1 (Sub)
    filtered[:, 1 : channels + 1] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, channels + 1 :])  # wraps mod 256
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    pixels = compressor.compress(filtered.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour, no interlace
    return PNG_SIGNATURE + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def encode_image(image: Image.Image) -> str:
    """An image as base64 PNG text."""
    return base64.b64encode(png_bytes(image)).decode("ascii")


def encode_request(
    images: Sequence[Image.Image], prompts: Sequence[str], metadata: Sequence[dict] | None = None
) -> bytes:
    # PNG compression is most of the client's cost; numpy and zlib release the GIL
    if len(images) > 1:
        with ThreadPoolExecutor(min(len(images), os.cpu_count() or 1, 8)) as pool:
            encoded = list(pool.map(encode_image, images))
    else:
        encoded = [encode_image(image) for image in images]
    body = {"prompts": list(prompts), "images": encoded, "metadata": metadata}
    return json.dumps(body, allow_nan=False).encode("utf-8")


def png_size(raw: bytes) -> tuple[int, int]:
    """(width, height) declared in the PNG header, read without decoding; ValueError if the header is not PNG."""
    if not raw.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG (bad signature)")
    # the first chunk must be IHDR: length 13, type, then width and height as big-endian uint32
    if len(raw) < 33 or raw[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise ValueError("not a PNG (missing IHDR header)")
    width, height = struct.unpack(">II", raw[16:24])
    return width, height


def _b64decode(text: bytes | memoryview) -> bytes:
    """``base64.b64decode(text, validate=True)`` without its copy of the input (which may be a view of
    a 256 MiB body); binascii.Error if ``text`` is not strict base64."""
    if not _BASE64.fullmatch(text):
        raise binascii.Error("Non-base64 digit found")
    return binascii.a2b_base64(text)


def _decode_png(raw: bytes, where: str) -> Image.Image:
    """PNG bytes whose header already passed the limits -> RGB image, or ProtocolError 400."""
    if not raw.endswith(PNG_END):
        raise ProtocolError(400, f"{where} is a truncated PNG (it does not end with the IEND chunk)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=["PNG"])
            image.load()
    except (
        OSError,
        SyntaxError,
        ValueError,
        EOFError,
        struct.error,
        zlib.error,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as error:
        raise ProtocolError(400, f"{where} is not a decodable PNG: {error}") from None
    return image if image.mode == "RGB" else image.convert("RGB")


@dataclass
class ParsedRequest:
    """A request whose JSON and PNG headers passed every limit, with its images not yet decoded: each is
    a span of base64 text in the body (or, rarely, the bytes of a JSON string with escapes).

    ``pixels`` (the decoded size) is known here, before any memory is spent on pixels, so that a server
    can reserve it; :meth:`decode_images` then inflates them and drops the body."""

    prompts: list[str]
    metadata: list[dict]
    sizes: list[tuple[int, int]]  # (width, height) of each image, from its PNG header
    _sources: list[tuple[int, int] | bytes] = field(repr=False)
    _body: bytes | bytearray | None = field(repr=False)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def pixels(self) -> int:
        return sum(width * height for width, height in self.sizes)

    def _decode_one(self, index: int) -> Image.Image:
        where = f"images[{index}]"
        source = self._sources[index]
        text = memoryview(self._body)[source[0] : source[1]] if isinstance(source, tuple) else source
        try:
            raw = _b64decode(text)
        except (binascii.Error, ValueError) as error:
            raise ProtocolError(400, f"{where} is not valid base64: {error}") from None
        del text
        return _decode_png(raw, where)

    def decode_images(self) -> list[Image.Image]:
        """The RGB images (ProtocolError 400 for a bad one); the body is released either way, so this
        can be called once."""
        if self._body is None:
            raise RuntimeError("the images of this request were decoded already")
        try:
            if len(self) > 1:  # PNG inflation releases the GIL
                with ThreadPoolExecutor(min(len(self), os.cpu_count() or 1, DECODE_WORKERS)) as pool:
                    return list(pool.map(self._decode_one, range(len(self))))
            return [self._decode_one(0)]
        finally:
            self._body, self._sources = None, []


class _Cursor:
    """A position in the body, with the few JSON steps the request's fixed shape needs."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data
        self.pos = 0

    def peek(self) -> int:
        """The next byte after whitespace (-1 at the end); the cursor moves to it."""
        self.pos = _WHITESPACE.match(self.data, self.pos).end()
        return self.data[self.pos] if self.pos < len(self.data) else -1

    def kind(self) -> str:
        """The JSON type of the value starting at the next byte, for error messages."""
        byte = self.peek()
        if byte < 0:
            return "the end of the body"
        if byte in b"tfn" and not any(self.data.startswith(word, self.pos) for word in _LITERALS):
            return "invalid JSON"
        return _JSON_KINDS.get(byte, "invalid JSON")

    def expect(self, char: bytes, what: str) -> None:
        if self.peek() != char[0]:
            found = "the end of the body" if self.pos >= len(self.data) else repr(chr(self.data[self.pos]))
            raise ProtocolError(400, f"request body is not valid JSON: expected {what}, found {found}")
        self.pos += 1

    def value(self, window: int, where: str, what: str, status: int = 413) -> Any:
        """The JSON value at the cursor, parsed from at most ``window`` bytes: a value that does not end
        within them is refused (``status``; ``what`` says why) before it is built."""
        self.peek()
        stop = min(len(self.data), self.pos + window)
        # surrogateescape keeps a multi-byte character cut by the window (after the value) from failing
        text = self.data[self.pos : stop].decode("utf-8", "surrogateescape")
        try:
            value, end = _DECODER.raw_decode(text)
        except json.JSONDecodeError as error:
            # the parse ran into the window's end: an unterminated string, or an error in the last token
            runs_on = error.msg.startswith("Unterminated string") or error.pos >= len(text) - 12
            if stop < len(self.data) and runs_on:
                raise ProtocolError(status, f"{where} does not end within {window} bytes; {what}") from None
            raise ProtocolError(400, f"{where} is not valid JSON: {error}") from None
        except RecursionError:
            raise ProtocolError(400, f"{where} is nested too deeply") from None
        if _NOT_UTF8.search(text, 0, end):
            raise ProtocolError(400, f"{where} is not UTF-8")
        self.pos += len(text[:end].encode("utf-8", "surrogateescape"))
        return value

    def string_span(self, where: str) -> tuple[int, int] | bytes:
        """A JSON string of any length, not copied: its (start, end) in the body, or its bytes when it
        holds escapes (which base64 never needs)."""
        start = end = self.pos + 1
        while True:
            end = self.data.find(b'"', end)
            if end < 0:
                raise ProtocolError(400, f"request body ends inside {where}")
            backslashes = end - start - len(self.data[start:end].rstrip(b"\\"))
            if backslashes % 2 == 0:  # an unescaped quote: the string's end
                break
            end += 1
        if self.data.find(b"\\", start, end) < 0:
            self.pos = end + 1
            return start, end
        text = self.value(end + 1 - self.pos, where, "")
        if not text.isascii():
            raise ProtocolError(400, f"{where} is not valid base64: non-ASCII characters")
        return text.encode("ascii")

    def array(self, where: str, max_count: int, too_many: str):
        """Yield the index of each element of a JSON array; the caller parses the element itself."""
        if self.peek() != ord("["):
            raise ProtocolError(400, f"field {where!r} must be a list, got {self.kind()}")
        self.pos += 1
        if self.peek() == ord("]"):
            self.pos += 1
            return
        index = 0
        while True:
            if index >= max_count:
                raise ProtocolError(413, too_many)
            yield index
            if self.peek() == ord("]"):
                self.pos += 1
                return
            self.expect(b",", f"',' or ']' after {where}[{index}]")
            index += 1


def parse_request(body: bytes | bytearray, limits: Limits) -> ParsedRequest:
    """Parse and validate a ``/score`` body, images up to their PNG headers (see the module docstring).

    Raises ProtocolError with the status (400 malformed, 413 over a limit, 422 counts that disagree)."""
    if len(body) > limits.max_body_bytes:
        raise ProtocolError(
            413, f"request body of {len(body)} bytes exceeds the limit of {limits.max_body_bytes}"
        )
    cursor = _Cursor(body)
    if cursor.peek() != ord("{"):
        raise ProtocolError(400, f"request body must be a JSON object, got {cursor.kind()}")
    cursor.pos += 1
    fields: dict[str, Any] = {}
    if cursor.peek() == ord("}"):
        cursor.pos += 1
    else:
        while True:
            if cursor.peek() != ord('"'):
                raise ProtocolError(
                    400, f"request body is not valid JSON: expected a field name, got {cursor.kind()}"
                )
            key = cursor.value(256, "a field name", "it is no field of a request", status=400)
            if key not in _REQUEST_FIELDS:
                raise ProtocolError(400, f"unknown field {key[:100]!r}; expected {sorted(_REQUEST_FIELDS)}")
            if key in fields:
                raise ProtocolError(400, f"field {key!r} is given twice")
            cursor.expect(b":", f"':' after {key!r}")
            fields[key] = _FIELD_PARSERS[key](cursor, limits)
            if cursor.peek() == ord("}"):
                cursor.pos += 1
                break
            cursor.expect(b",", "',' or '}' between the fields")
    if cursor.peek() >= 0:
        raise ProtocolError(400, "request body is not valid JSON: extra data after the object")
    for key in ("prompts", "images"):
        if key not in fields:
            raise ProtocolError(400, f"missing field {key!r}")
    prompts, (sizes, sources) = fields["prompts"], fields["images"]
    if not sizes:
        raise ProtocolError(400, "no images to score")
    if len(prompts) != len(sizes):
        raise ProtocolError(422, f"{len(prompts)} prompts for {len(sizes)} images; send one prompt per image")
    metadata = fields.get("metadata")
    if metadata is None:
        metadata = [{} for _ in sizes]
    elif len(metadata) != len(sizes):
        raise ProtocolError(
            422, f"{len(metadata)} metadata entries for {len(sizes)} images; send one per image (or null)"
        )
    return ParsedRequest(prompts, metadata, sizes, sources, body)


def _parse_prompts(cursor: _Cursor, limits: Limits) -> list[str]:
    prompts = []
    too_many = f"more than {limits.max_items} prompts; the limit is {limits.max_items} images per request"
    for i in cursor.array("prompts", limits.max_items, too_many):
        if cursor.peek() != ord('"'):
            raise ProtocolError(400, f"prompts[{i}] must be a string, got {cursor.kind()}")
        # 12 bytes is the longest a character can be sent as (an escaped surrogate pair)
        too_long = f"the limit is {limits.max_prompt_chars} characters"
        prompt = cursor.value(12 * limits.max_prompt_chars + 2, f"prompts[{i}]", too_long)
        if len(prompt) > limits.max_prompt_chars:
            raise ProtocolError(
                413, f"prompts[{i}] has {len(prompt)} characters; the limit is {limits.max_prompt_chars}"
            )
        prompts.append(prompt)
    return prompts


def _parse_images(cursor: _Cursor, limits: Limits) -> tuple[list[tuple[int, int]], list]:
    sizes: list[tuple[int, int]] = []
    sources: list[tuple[int, int] | bytes] = []
    total = 0
    too_many = f"more than {limits.max_items} images in one request; the limit is {limits.max_items}"
    for i in cursor.array("images", limits.max_items, too_many):
        where = f"images[{i}]"
        if cursor.peek() != ord('"'):
            raise ProtocolError(400, f"{where} must be a base64 string, got {cursor.kind()}")
        source = cursor.string_span(where)
        if isinstance(source, tuple):
            start, end = source
            if cursor.data.startswith(_DATA_URI_PREFIX, start, end):
                start += len(_DATA_URI_PREFIX)
            source = (start, end)
            # 44 base64 characters are the first 33 bytes: signature and IHDR, all the header check needs
            head_text = cursor.data[start : min(end, start + 44)]
        else:
            source = source.removeprefix(_DATA_URI_PREFIX)
            head_text = source[:44]
        try:
            width, height = png_size(_b64decode(head_text))
        except binascii.Error as error:
            raise ProtocolError(400, f"{where} is not valid base64: {error}") from None
        except ValueError as error:
            raise ProtocolError(400, f"{where} is {error}; images must be PNG") from None
        if width == 0 or height == 0:
            raise ProtocolError(400, f"{where} declares an empty image ({width}x{height})")
        if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
            raise ProtocolError(
                413,
                f"{where} is {width}x{height} ({width * height} pixels); the limits are {limits.max_image_side} px "
                f"per side and {limits.max_image_pixels} pixels",
            )
        total += width * height
        if total > limits.max_request_pixels:
            raise ProtocolError(
                413,
                f"images[0..{i}] hold {total} pixels; the limit is {limits.max_request_pixels} pixels per "
                "request (send fewer or smaller images per request)",
            )
        sizes.append((width, height))
        sources.append(source)
    return sizes, sources


def _parse_metadata(cursor: _Cursor, limits: Limits) -> list[dict] | None:
    if cursor.peek() == ord("n") and cursor.data.startswith(b"null", cursor.pos):
        cursor.pos += 4
        return None
    if cursor.peek() != ord("["):
        raise ProtocolError(400, f"field 'metadata' must be a list or null, got {cursor.kind()}")
    metadata = []
    too_many = (
        f"more than {limits.max_items} metadata entries; the limit is {limits.max_items} images per request"
    )
    window = METADATA_WINDOW * limits.max_metadata_bytes
    too_large = f"the limit is {limits.max_metadata_bytes} bytes of JSON"
    for i in cursor.array("metadata", limits.max_items, too_many):
        if cursor.peek() != ord("{"):
            raise ProtocolError(400, f"metadata[{i}] must be an object, got {cursor.kind()}")
        item = cursor.value(window, f"metadata[{i}]", too_large)
        if len(json.dumps(item)) > limits.max_metadata_bytes:
            raise ProtocolError(
                413, f"metadata[{i}] is larger than {limits.max_metadata_bytes} bytes of JSON"
            )
        metadata.append(item)
    return metadata


_FIELD_PARSERS = {"prompts": _parse_prompts, "images": _parse_images, "metadata": _parse_metadata}


def decode_request(body: bytes | bytearray, limits: Limits) -> ScoreRequest:
    """Parse, validate and decode a ``/score`` body. Raises ProtocolError with the status and a message."""
    parsed = parse_request(body, limits)
    return ScoreRequest(images=parsed.decode_images(), prompts=parsed.prompts, metadata=parsed.metadata)


def jsonable(value: Any) -> Any:
    """Details as plain JSON: numpy values become Python ones, non-finite floats become null."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def encode_response(scores: Sequence[float], details: dict[str, list]) -> bytes:
    body = {"scores": jsonable([float(s) for s in scores]), "details": jsonable(details)}
    return json.dumps(body, allow_nan=False).encode("utf-8")


def decode_response(body: bytes, count: int) -> tuple[np.ndarray, dict[str, list]]:
    """Scores (null -> NaN) and details of a ``/score`` answer; ValueError if it is not well formed."""
    payload = json.loads(body.decode("utf-8"))
    if not isinstance(payload, dict) or not isinstance(payload.get("scores"), list):
        raise ValueError("answer has no 'scores' list")
    scores = payload["scores"]
    if len(scores) != count:
        raise ValueError(f"answer has {len(scores)} scores for {count} images")
    if not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores):
        raise ValueError("answer has a score that is not a number")
    details = payload.get("details") or {}
    if not isinstance(details, dict) or any(
        not isinstance(v, list) or len(v) != count for v in details.values()
    ):
        raise ValueError("answer details must be lists with one value per image")
    return np.array([np.nan if s is None else float(s) for s in scores], dtype=np.float64), details
