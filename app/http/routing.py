"""The app's route table, flattened: what labels metrics and lists routes for the tests.

FastAPI ≥ 0.16x keeps included routers as lazy branches in ``app.routes``;
``fastapi.routing.iter_route_contexts`` walks them and yields each route with its full path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.routing import BaseRoute, compile_path

try:  # FastAPI with lazily included routers
    from fastapi.routing import iter_route_contexts
except ImportError:  # pragma: no cover — older FastAPI flattens routers into app.routes
    iter_route_contexts = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """One path: its template, the methods its routes answer, and a matcher for paths."""

    path: str  # template, e.g. "/v1/jobs/{job_id}"
    methods: frozenset[str]  # empty for non-HTTP routes
    regex: re.Pattern[str]  # full match of a request path
    streams_body: bool = False  # its endpoint reads a non-JSON body as it arrives (an upload)

    def matches(self, path: str) -> bool:
        return self.regex.match(path) is not None


def route_table(routes: Sequence[BaseRoute]) -> list[RouteInfo]:
    """Every path of ``routes`` (an app's ``router.routes``, included routers flattened), with
    the methods of all the routes that serve it (GET and POST /v1/jobs are two routes)."""
    flat = iter_route_contexts(routes) if iter_route_contexts is not None else routes
    out: dict[str, RouteInfo] = {}  # one entry per path: the methods of all its routes
    for r in flat:
        path = getattr(r, "path", None)
        if path is None:
            continue
        methods = frozenset(getattr(r, "methods", None) or ())
        streams = bool(getattr(getattr(r, "endpoint", None), "streams_body", False))
        if (seen := out.get(path)) is not None:
            out[path] = RouteInfo(
                path, seen.methods | methods, seen.regex, seen.streams_body or streams
            )
        else:
            out[path] = RouteInfo(path, methods, compile_path(path)[0], streams)
    return list(out.values())
