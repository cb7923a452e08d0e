"""POST /v1/predict (one image), /v1/predict/batch (multipart files), /v1/predict/json (base64 or
URLs). Auth, rate limits and admission happened in the middleware, before any body was read.

A batch answers 200 with per-item results while at least one item succeeded, and 422
`all_items_failed` (with the same per-item errors) when none did: a client that checks only the
status code must not take a batch with no prediction for a success.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import time
from typing import Any, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serving import schemas
from serving.api_docs import (ERROR_RESPONSES, PREDICT_SECURITY, TOP_K_PARAMETER,
                              multipart_body)
from serving.backends import softmax
from serving.context import Gateway, rid_of
from serving.errors import ApiError, error_response
from serving.inputs import (ImageResult, check_part_type, parse_top_k, prepare_image_async,
                            read_form, top_k_predictions)

BATCH_RESPONSES = {**ERROR_RESPONSES, 422: {"model": schemas.ErrorResponse, "description":
                   "every image of the batch failed (`all_items_failed`, with the per-item errors "
                   "in `results`: `empty_file`, `not_an_image`, `corrupt_image`, ...), or a field "
                   "is missing or invalid (`missing_field`, `invalid_request`)"}}
JSON_RESPONSES = {**BATCH_RESPONSES, 415: {"model": schemas.ErrorResponse, "description":
                  "the body is not application/json (`unsupported_media_type`)"}, 422: {
                  "model": schemas.ErrorResponse, "description": "every image failed "
                  "(`all_items_failed`, per-item errors in `results`: `bad_base64`, "
                  "`not_an_image`, `url_fetch_disabled`, `url_not_allowed`, ...), or the body "
                  "does not match the schema (`invalid_request`)"}}


def _timeout(settings) -> ApiError:
  return ApiError(504, "timeout", f"request took longer than {settings.request_timeout_s} s "
                  "(request_timeout_s)")


def create_predict_router(gw: Gateway) -> APIRouter:
  router = APIRouter(tags=["predict"])
  settings, holder, monitor, metrics = gw.settings, gw.holder, gw.monitor, gw.metrics

  def resolve_k(top_k: int | None) -> int:
    return int(top_k or settings.top_k)

  @router.post("/v1/predict", response_model=schemas.PredictResponse, responses=ERROR_RESPONSES,
               openapi_extra={**multipart_body("file", many=False, settings=settings),
                              "parameters": [TOP_K_PARAMETER], **PREDICT_SECURITY},
               summary="Classify one image (multipart field `file`)")
  async def predict(request: Request):
    # top_k is read by hand (documented in TOP_K_PARAMETER): FastAPI's parameter machinery costs
    # more than the rest of the request on this hot path.
    start = time.perf_counter()
    top_k = parse_top_k(request)
    with holder.use() as model:
      batcher = model.backend.batcher
      if batcher is not None:
        batcher.announce()  # lets the batcher hold a batch open for this request
      submitted = False
      try:
        # Body arrival has its own deadline (408 from the gateway middleware); this one is for work.
        parts = await read_form(request, settings, many=False)
        async with asyncio.timeout(settings.request_timeout_s):
          upload = next((p for p in parts if p.name == "file"), None)
          # A part without a filename is taken as the file too (RFC 7578 makes filename
          # optional); its bytes decide, like every upload's.
          if upload is None:
            raise ApiError(422, "missing_field", "multipart field 'file' with an image file is "
                           "required", "file")
          source = f"file {upload.filename!r}" if upload.filename else "file"
          check_part_type(upload.content_type, source, "file")
          result = await prepare_image_async(upload.data, source, "file", settings, model.bundle,
                                             model.backend.needs_tensor)
          if batcher is not None:
            batcher.withdraw()
            submitted = True
          logits = await gw.run_model(model, [result])
      except TimeoutError:
        raise _timeout(settings) from None
      finally:
        if batcher is not None and not submitted:
          batcher.withdraw()
    probs = softmax(logits[0])
    monitor.record(result.stats, probs)
    metrics.images_ok.inc()
    request.state.images = 1
    return JSONResponse({
        "request_id": rid_of(request), "model": model.ref(),
        "predictions": top_k_predictions(probs, model.bundle.labels, resolve_k(top_k)),
        "image": result.info, "latency_ms": round((time.perf_counter() - start) * 1000, 3)})

  @router.post("/v1/predict/batch", response_model=schemas.BatchResponse,
               responses=BATCH_RESPONSES,
               openapi_extra={**multipart_body("files", many=True, settings=settings),
                              **PREDICT_SECURITY},
               summary="Classify many images (repeat multipart field `files`)")
  async def predict_batch(request: Request,
                          top_k: Optional[int] = Query(None, ge=1, le=1000)):
    with holder.use() as model:
      try:
        parts = await read_form(request, settings, many=True)
        async with asyncio.timeout(settings.request_timeout_s):
          return await predict_many(gw, request, _batch_items(parts, settings), top_k, model,
                                    "files")
      except TimeoutError:
        raise _timeout(settings) from None

  @router.post("/v1/predict/json", response_model=schemas.BatchResponse,
               responses=JSON_RESPONSES, openapi_extra=PREDICT_SECURITY,
               summary="Classify images sent as base64 or URLs (JSON)")
  async def predict_json(request: Request, body: schemas.JsonPredictRequest):
    if len(body.images) > settings.max_batch_files:
      raise ApiError(413, "too_many_files", f"{len(body.images)} images exceeds max_batch_files "
                     f"{settings.max_batch_files}", "images")
    with holder.use() as model:
      try:
        async with asyncio.timeout(settings.request_timeout_s):
          items = [(im.name, await _json_item(gw, im, f"images[{i}]"))
                   for i, im in enumerate(body.images)]
          return await predict_many(gw, request, items, body.top_k, model, "images")
      except TimeoutError:
        raise _timeout(settings) from None

  return router


async def predict_many(gw: Gateway, request: Request, items: list[tuple[str | None, Any]],
                       top_k: int | None, model, field_name: str):
  """items: (filename, bytes | ApiError). Bad images become per-item errors."""
  settings, monitor, metrics = gw.settings, gw.monitor, gw.metrics
  start = time.perf_counter()
  good: list[tuple[int, ImageResult]] = []
  results: list[dict[str, Any]] = []
  for i, (name, payload) in enumerate(items):
    field = f"{field_name}[{i}]"
    source = f"{field} {name!r}" if name else field
    try:
      if isinstance(payload, ApiError):
        raise payload
      res = await prepare_image_async(payload, source, field, settings, model.bundle,
                                      model.backend.needs_tensor)
      good.append((i, res))
      results.append({"index": i, "filename": name, "ok": True, "image": res.info})
    except ApiError as e:
      results.append({"index": i, "filename": name, "ok": False, "error": e.detail()})
  if good:
    logits = await gw.run_model(model, [r for _, r in good])
    probs = softmax(logits)
    k = int(top_k or settings.top_k)
    for (i, res), p in zip(good, probs):
      results[i]["predictions"] = top_k_predictions(p, model.bundle.labels, k)
      monitor.record(res.stats, p)
  n_bad = len(items) - len(good)
  metrics.images_ok.inc(len(good))
  metrics.images_error.inc(n_bad)
  request.state.images = len(items)
  if not good:
    request.state.error_code = "all_items_failed"
    first = results[0]["error"]
    return error_response(422, "all_items_failed", f"none of the {len(items)} images could be "
                          f"classified (first: {first['message']})", first["field"],
                          rid_of(request), results=results, succeeded=0, failed=n_bad)
  return JSONResponse({"request_id": rid_of(request), "model": model.ref(), "results": results,
                       "succeeded": len(good), "failed": n_bad,
                       "latency_ms": round((time.perf_counter() - start) * 1000, 3)})


def _batch_items(parts, settings) -> list[tuple[str | None, Any]]:
  uploads = [p for p in parts if p.name == "files"]
  if not uploads:
    raise ApiError(422, "missing_field", "multipart field 'files' (one or more image files) "
                   "is required", "files")
  if len(uploads) > settings.max_batch_files:
    raise ApiError(413, "too_many_files", f"{len(uploads)} files exceeds max_batch_files "
                   f"{settings.max_batch_files}", "files")
  items: list[tuple[str | None, Any]] = []
  for i, up in enumerate(uploads):
    try:  # parts without a filename count as files too: the bytes decide
      source = f"files[{i}] {up.filename!r}" if up.filename else f"files[{i}]"
      check_part_type(up.content_type, source, f"files[{i}]")
      items.append((up.filename, up.data))
    except ApiError as e:
      items.append((up.filename, e))
  return items


async def _json_item(gw: Gateway, im: schemas.JsonImage, field: str) -> bytes | ApiError:
  """One JSON image -> its bytes (decoded base64, or fetched through the SSRF-safe fetcher), or
  the ApiError that item reports."""
  settings = gw.settings
  try:
    if im.b64 is None:  # the schema holds exactly one of b64 / url
      return await run_in_threadpool(gw.fetcher.fetch, im.url, field)
    if len(im.b64) > settings.max_upload_bytes * 4 // 3 + 4:
      raise ApiError(413, "file_too_large", f"{field}: over the per-image limit of "
                     f"{settings.max_upload_bytes} bytes", field)
    try:
      return base64.b64decode(im.b64, validate=True)
    except (binascii.Error, ValueError) as e:
      raise ApiError(422, "bad_base64", f"{field}.b64: not valid base64 ({e})", field) from None
  except ApiError as e:
    return e
