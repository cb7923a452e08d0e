"""Client-facing errors: a status, a stable code, a message that says what to fix, the field."""
from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse


class ApiError(Exception):
  """A client-facing error: status, a stable code, and a message that says what to fix."""

  def __init__(self, status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.code, self.message, self.field = status, code, message, field
    self._headers = headers

  def headers(self) -> dict[str, str] | None:
    """Response headers the status calls for (WWW-Authenticate on 401, Retry-After on 503)."""
    return self._headers

  def detail(self) -> dict[str, Any]:
    return {"code": self.code, "message": self.message, "field": self.field}


class BodyTooLarge(Exception):
  pass


class BodyTimeout(Exception):
  pass


def error_response(status: int, code: str, message: str, field: str | None = None,
                   request_id: str | None = None, headers: dict[str, str] | None = None,
                   **extra: Any) -> JSONResponse:
  return JSONResponse({"error": {"code": code, "message": message, "field": field},
                       "request_id": request_id, **extra}, status_code=status, headers=headers)


def api_error_response(exc: "ApiError", request_id: str | None) -> JSONResponse:
  return error_response(exc.status, exc.code, exc.message, exc.field, request_id, exc.headers())


class RateLimited(ApiError):
  """429 (or 503 while draining) with the seconds to wait: the Retry-After header."""

  def __init__(self, retry_after_s: float, message: str, code: str = "rate_limited",
               status: int = 429):
    super().__init__(status, code, message)
    self.retry_after_s = retry_after_s
    self.close_connection = code == "draining"

  def headers(self) -> dict[str, str]:
    headers = {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}
    if self.close_connection:  # draining: this connection ends here, the client reconnects elsewhere
      headers["Connection"] = "close"
    return headers
