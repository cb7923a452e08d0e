"""Request bodies -> checked images: the multipart parser, the image checks, decode + preprocess.

Every image goes through jaxclf.data.decode.decode_image (format by content, pixel limit) and
jaxclf.data.transforms.preprocess: the code training and evaluation use.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from jaxclf.data.decode import FORMATS, DecodeError, ImageInfo, decode_image, open_image
from jaxclf.data.reference_stats import InputStats, measure_input
from jaxclf.data.transforms import preprocess
from serving.backends import ModelBundle, PreparedImage
from serving.errors import ApiError, BodyTimeout, BodyTooLarge
from serving.settings import ServeSettings

# Decoding a small image costs less than a hop to the thread pool; big ones must not block the loop
# (files above this size always go to the thread; below it, settings.inline_decode_pixels decides).
INLINE_DECODE_BYTES = 256 * 1024
ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")


@dataclasses.dataclass
class Part:
  name: str
  filename: str | None
  content_type: str | None
  data: bytes


# The headers every mainstream client sends, matched whole: anything else (other spacing, case,
# escapes, RFC 2231 `*=` parameters, IE paths) falls through to python-multipart's general parser,
# and tests/test_serving_fastpath.py checks that both give the same result wherever the fast match applies.
_SIMPLE_CONTENT_TYPE = re.compile(rb'multipart/form-data; boundary=(?:"([^"\\;]+)"|([\w.\-+=]+))')
_SIMPLE_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')


def _boundary(content_type: str, fast: bool) -> bytes | None:
  if fast:
    m = _SIMPLE_CONTENT_TYPE.fullmatch(content_type.encode("latin-1"))
    if m:
      return m.group(1) or m.group(2)
  from python_multipart.multipart import parse_options_header
  ctype, params = parse_options_header(content_type)
  return params.get(b"boundary")


def _disposition(value: bytes, fast: bool) -> tuple[bytes | None, bytes | None]:
  """A part's Content-Disposition -> (name, filename); name None when it is not form-data."""
  if fast:
    m = _SIMPLE_DISPOSITION.fullmatch(value)
    if m:
      return m.group(1), m.group(2)
  from python_multipart.multipart import parse_options_header
  disposition, params = parse_options_header(value)
  if disposition != b"form-data":
    return None, None
  return params.get(b"name"), params.get(b"filename")


def parse_multipart(body: bytes, content_type: str, max_parts: int,
                    fast_headers: bool = True) -> list[Part]:
  """RFC 7578 multipart/form-data from a complete, size-limited body.

  The body is already bounded by the gateway's request limit, so parsing it in memory with
  bytes.find is safe and several times cheaper than a streaming parser that spools each file to a
  temporary file: this is on the path of every request. `fast_headers=False` parses every header
  with python-multipart's general parser (bench/serve.py compares the three).
  """
  boundary = _boundary(content_type, fast_headers)
  if not boundary:
    raise ApiError(400, "bad_multipart", "multipart/form-data without a boundary parameter")
  delimiter = b"--" + boundary
  pos = body.find(delimiter)
  if pos < 0:
    raise ApiError(400, "bad_multipart", "malformed multipart body: no boundary found")
  parts: list[Part] = []
  pos += len(delimiter)
  while True:
    if body.startswith(b"--", pos):  # closing delimiter
      return parts
    if not body.startswith(b"\r\n", pos):
      raise ApiError(400, "bad_multipart", "malformed multipart body: no CRLF after a boundary")
    head_end = body.find(b"\r\n\r\n", pos + 2)
    if head_end < 0:
      raise ApiError(400, "bad_multipart", "malformed multipart body: part headers do not end")
    end = body.find(b"\r\n" + delimiter, head_end + 4)
    if end < 0:
      raise ApiError(400, "bad_multipart", "malformed multipart body: no closing boundary")
    headers: dict[bytes, bytes] = {}
    for line in body[pos + 2:head_end].split(b"\r\n"):
      key, sep, value = line.partition(b":")
      if not sep:
        raise ApiError(400, "bad_multipart", "malformed multipart body: bad part header line")
      headers[key.strip().lower()] = value.strip()
    name, filename = _disposition(headers.get(b"content-disposition", b""), fast_headers)
    if name is None:
      raise ApiError(400, "bad_multipart", "malformed multipart body: a part lacks "
                     "Content-Disposition: form-data; name=...")
    if len(parts) >= max_parts:
      raise ApiError(413, "too_many_files", f"more than {max_parts} parts (max_batch_files)",
                     "files")
    parts.append(Part(name.decode("utf-8", "replace"),
                      filename.decode("utf-8", "replace") if filename is not None else None,
                      headers[b"content-type"].decode("latin-1") if b"content-type" in headers
                      else None, body[head_end + 4:end]))
    pos = end + 2 + len(delimiter)


# --------------------------------------------------------------------------- images in

@dataclasses.dataclass
class ImageResult:
  prepared: PreparedImage
  stats: InputStats
  info: dict[str, Any]


def check_part_type(content_type: str | None, source: str, field: str) -> None:
  ctype = (content_type or "").split(";")[0].strip().lower()
  if ctype and not ctype.startswith(ACCEPTED_PART_TYPES):
    raise ApiError(415, "unsupported_media_type",
                   f"{source}: declared content type {ctype!r} is not an image (send image/* or "
                   "application/octet-stream; the format is checked from the bytes)", field)


def open_upload(data: bytes, source: str, field: str, settings: ServeSettings):
  """The checks that need no pixels (empty, size, header, format) -> the opened image."""
  if not data:
    # Well-formed request, unusable content: 422 (the schema says minLength 1), not 400.
    raise ApiError(422, "empty_file", f"{source}: empty file (0 bytes)", field)
  if len(data) > settings.max_upload_bytes:
    raise ApiError(413, "file_too_large", f"{source}: {len(data)} bytes exceeds the per-image "
                   f"limit of {settings.max_upload_bytes} bytes", field)
  try:
    img = open_image(data, source)
  except DecodeError as e:
    if e.stage == "limit":  # Pillow's own bomb guard fires while reading the header
      raise ApiError(413, "image_too_large", str(e), field) from None
    raise ApiError(415, "not_an_image", str(e), field) from None
  if img.format not in FORMATS:
    img.close()
    raise ApiError(415, "unsupported_format", f"{source}: {img.format or 'unknown'} images are not "
                   f"accepted (accepted: {', '.join(FORMATS)})", field)
  return img


def prepare_image(data: bytes, source: str, field: str, settings: ServeSettings,
                  bundle: ModelBundle, needs_tensor: bool, opened=None) -> ImageResult:
  """Bytes -> checked, decoded, measured and (for in-process inference) preprocessed image.
  `opened`: the image open_upload already opened and checked (its header is not parsed again)."""
  img = opened if opened is not None else open_upload(data, source, field, settings)
  header = ImageInfo(img.format or "unknown", img.width, img.height, img.mode)
  spec = bundle.spec
  try:
    pixels = decode_image(img, spec.channels, max_pixels=settings.max_pixels,
                          target_size=spec.image_size, background=spec.background, source=source)
  except DecodeError as e:
    if e.stage == "limit":
      raise ApiError(413, "image_too_large", str(e), field) from None
    raise ApiError(422, "corrupt_image", str(e), field) from None
  stats = measure_input(pixels, header.width, header.height, header.mode)
  tensor = preprocess(pixels, spec) if needs_tensor else None
  info = {"width": header.width, "height": header.height, "channels": stats.channels,
          "format": header.format}
  return ImageResult(PreparedImage(data, tensor), stats, info)


async def prepare_image_async(data: bytes, source: str, field: str, settings: ServeSettings,
                              bundle: ModelBundle, needs_tensor: bool) -> ImageResult:
  """Small images are decoded right here: cheaper than the hop to a thread. Big ones (or all,
  with --inline-decode-pixels 0) go to the thread pool so they never block the event loop."""
  if len(data) <= INLINE_DECODE_BYTES:
    img = open_upload(data, source, field, settings)  # the header only
    if img.width * img.height <= settings.inline_decode_pixels:
      return prepare_image(data, source, field, settings, bundle, needs_tensor, img)
    return await run_in_threadpool(prepare_image, data, source, field, settings, bundle,
                                   needs_tensor, img)
  return await run_in_threadpool(prepare_image, data, source, field, settings, bundle, needs_tensor)


def top_k_predictions(probs: np.ndarray, labels: list[str], k: int) -> list[dict[str, Any]]:
  k = min(k, len(labels))
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"label": labels[i], "index": int(i), "confidence": round(float(probs[i]), 6)}
          for i in order]


def parse_top_k(request: Request) -> int | None:
  if not request.scope.get("query_string"):  # the usual case: no query to parse
    return None
  raw = request.query_params.get("top_k")
  if raw is None:
    return None
  if not raw.strip().isdigit() or not 1 <= int(raw) <= 1000:
    raise ApiError(422, "invalid_request", f"query.top_k: must be an integer from 1 to 1000, got "
                   f"{raw[:40]!r}", "query.top_k")
  return int(raw)


async def read_form(request: Request, settings: ServeSettings, many: bool) -> list[Part]:
  """The multipart body of a predict request, parsed; the size and time limits are the
  middleware's (it raises BodyTooLarge / BodyTimeout out of receive)."""
  ctype = request.headers.get("content-type", "")
  if not ctype.lower().startswith("multipart/form-data"):
    raise ApiError(415, "unsupported_media_type",
                   f"send multipart/form-data with the image in field "
                   f"{'files' if many else 'file'!r}, got {ctype or 'no content type'}"
                   + ("; for JSON use POST /v1/predict/json" if "json" in ctype else ""))
  try:
    body = await _read_body(request)
  except BodyTooLarge:
    raise ApiError(413, "payload_too_large", "request body exceeds the limit") from None
  except BodyTimeout:
    raise ApiError(408, "request_timeout", f"the request body did not arrive within "
                   f"{settings.request_timeout_s} s") from None
  # A few non-file fields are tolerated (clients add them); everything counts against the cap.
  return parse_multipart(body, ctype, settings.max_batch_files + 16 if many else 16)


async def _read_body(request: Request) -> bytes:
  """Request.body() without its async-generator layers (on every request): the same messages read
  the same way, ClientDisconnect on a disconnect."""
  chunks = []
  while True:
    message = await request.receive()
    if message["type"] == "http.request":
      chunks.append(message.get("body", b""))
      if not message.get("more_body", False):
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    elif message["type"] == "http.disconnect":
      raise ClientDisconnect()
