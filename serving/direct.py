"""A route served straight from the gateway middleware, past the FastAPI router.

POST /v1/predict is the hot path: per request, FastAPI's router, its exception and exit-stack
middleware and its endpoint wrapper cost about as much as the multipart parse and the PNG decode
together (profiled: bench/serve.py, phase `levers.router_path`). The endpoint takes nothing but the
`Request` (top_k is read by hand), so none of that machinery does any work for it. `DirectRoute`
calls the very same endpoint function with the same `Request`, and maps its exceptions through the
app's own exception handlers (looked up by class, as Starlette does), so responses, error bodies,
metrics labels and logs are the same as through the router. The route stays registered, so
/openapi.json and /docs describe it, and every other method or path still goes through the router
(405, 404, trailing-slash redirects).

`--no-predict-fast-path` (ServeSettings.predict_fast_path) turns it off.
"""
from __future__ import annotations

from typing import Any, Callable

from starlette.requests import Request


class DirectRoute:

  def __init__(self, route: Any, exception_handlers: dict[Any, Callable]):
    self.route = route  # the APIRoute: its path labels metrics and logs
    self.endpoint = route.endpoint
    self.exception_handlers = exception_handlers  # the app's own dict (same handlers, same order)

  async def __call__(self, scope, receive, send) -> None:
    scope["route"] = self.route
    scope["endpoint"] = self.endpoint
    request = Request(scope, receive, send)
    try:
      response = await self.endpoint(request)
    except Exception as exc:
      handler = next((self.exception_handlers[c] for c in type(exc).__mro__
                      if c in self.exception_handlers), None)
      if handler is None:
        raise
      response = await handler(request, exc)
    await response(scope, receive, send)


def find_route(routes, path: str, method: str):
  """The registered route for `method path` (so the direct call serves what the docs describe).
  Included routers are searched too (FastAPI keeps them nested)."""
  for route in routes:
    if getattr(route, "path", None) == path and method in (getattr(route, "methods", None) or ()):
      return route
    inner = getattr(route, "original_router", None) or getattr(route, "routes", None)
    inner = getattr(inner, "routes", inner)
    if inner:
      try:
        return find_route(inner, path, method)
      except LookupError:
        pass
  raise LookupError(f"no route {method} {path}")
