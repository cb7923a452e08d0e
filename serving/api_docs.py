"""OpenAPI fragments the routers share: multipart bodies, security schemes, error responses."""
from __future__ import annotations

from typing import Any

from serving import schemas

MULTIPART_IMAGE_TYPES = ("image/png, image/jpeg, image/webp, image/gif, image/bmp, image/tiff, "
                         "application/octet-stream")


def multipart_body(field: str, many: bool) -> dict[str, Any]:
  file_schema = {"type": "string", "format": "binary",
                 "description": "an encoded image file (format checked from its bytes)"}
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


ERROR_RESPONSES = {
    400: {"model": schemas.ErrorResponse, "description": "malformed request"},
    401: {"model": schemas.ErrorResponse, "description": "missing or wrong API key"},
    413: {"model": schemas.ErrorResponse, "description": "body, file or pixel count over a limit"},
    415: {"model": schemas.ErrorResponse, "description": "not multipart, or not an image"},
    422: {"model": schemas.ErrorResponse, "description": "invalid field, or corrupt image"},
    429: {"model": schemas.ErrorResponse, "description": "over the key's rate or the server's "
          "in-flight + queue limit; retry after the Retry-After header's seconds"},
    503: {"model": schemas.ErrorResponse, "description": "no model loaded yet, or draining for "
          "shutdown"},
}
