"""OpenAPI fragments the routers share: multipart bodies, security schemes, error responses."""
from __future__ import annotations

from typing import Any

from serving import schemas

MULTIPART_IMAGE_TYPES = ("image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff, "
                         "application/octet-stream")


# What an acceptable file is, in the schema's own words: the bytes decide, not the name or the
# declared content type. The limits are this server's (also in GET /v1/models -> limits).
def image_file_description(max_upload_bytes: int, max_pixels: int) -> str:
  return ("an encoded image file: PNG, JPEG, WebP, GIF (first frame), BMP or TIFF, recognised from "
          "its bytes (the file name and the part's content type are not trusted); 1 to "
          f"{max_upload_bytes} bytes and at most {max_pixels} pixels. Other bytes get 415 "
          "`not_an_image` / `unsupported_format`, an empty file 422 `empty_file`, a truncated or "
          "damaged image 422 `corrupt_image`, too many bytes or pixels 413.")


def multipart_body(field: str, many: bool, settings) -> dict[str, Any]:
  file_schema = {"type": "string", "format": "binary", "minLength": 1,
                 "description": image_file_description(settings.max_upload_bytes,
                                                       settings.max_pixels)}
  prop = ({"type": "array", "items": file_schema, "minItems": 1} if many else file_schema)
  return {"requestBody": {"required": True, "content": {"multipart/form-data": {
      "schema": {"type": "object", "required": [field], "properties": {field: prop}},
      "encoding": {field: {"contentType": MULTIPART_IMAGE_TYPES}}}}}}


# The API key is optional (only when the server sets JAXCLF_SERVE_API_KEY): {} = no auth.
PREDICT_SECURITY = {"security": [{}, {"ApiKey": []}]}
OPS_SECURITY = PREDICT_SECURITY  # the same key, when the server runs with --protect-ops
SECURITY_SCHEMES = {
    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "required on predict endpoints when the server has API keys "
                              "(JAXCLF_SERVE_API_KEY, JAXCLF_SERVE_API_KEYS or --api-keys-file), "
                              "and on /metrics, /v1/models, /v1/monitoring and /docs with "
                              "--protect-ops"},
    "AdminToken": {"type": "http", "scheme": "bearer",
                   "description": "JAXCLF_SERVE_ADMIN_TOKEN (or header X-Admin-Token)"},
}

TOP_K_PARAMETER = {"name": "top_k", "in": "query", "required": False,
                   "description": "labels to return (default: the server's top_k)",
                   "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "required": True,
                               "schema": {"type": "integer", "minimum": 1}}}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
  out: dict[str, Any] = {"model": schemas.ErrorResponse, "description": description}
  if headers:
    out["headers"] = headers
  return out


def challenge(scheme: str) -> dict[str, Any]:
  """RFC 9110 §11.6.1: every 401 names how to authenticate."""
  return {"WWW-Authenticate": {"description": f"the {scheme} challenge", "required": True,
                               "schema": {"type": "string"}}}


UNAUTHORIZED = _error("missing or wrong API key (when the server has keys)", challenge("ApiKey"))
FORBIDDEN = _error("`forbidden`: the admin token sent instead of a client's API key")
RATE_LIMITED = _error("over the key's rate or the server's in-flight + queue limit; retry after "
                      "the Retry-After header's seconds", RETRY_AFTER)
UNAVAILABLE = _error("`not_ready`: no model loaded yet; `draining`: shutting down (retry on "
                     "another instance); `backend_unavailable`: the inference server (Triton) is "
                     "down or restarting. Retry after the Retry-After header's seconds",
                     RETRY_AFTER)

# Every status a predict operation answers for a request whose shape the schema allows but whose
# content the server refuses is declared here, with the error body.
ERROR_RESPONSES = {
    400: _error("malformed request (`bad_multipart`, bad Content-Length)"),
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    408: _error("`request_timeout`: the body did not arrive within request_timeout_s"),
    413: _error("body, file or pixel count over a limit (`payload_too_large`, `file_too_large`, "
                "`image_too_large`, `too_many_files`)"),
    415: _error("the bytes are not an image this server decodes (`not_an_image`, "
                "`unsupported_format`), a part declares a non-image content type, or the body is "
                "not multipart/form-data (`unsupported_media_type`)"),
    422: _error("`empty_file` (0 bytes), `corrupt_image` (a truncated or damaged image), "
                "`missing_field`, or an invalid parameter (`invalid_request`)"),
    429: RATE_LIMITED,
    503: UNAVAILABLE,
    504: _error("`timeout`: the request took longer than request_timeout_s"),
}
