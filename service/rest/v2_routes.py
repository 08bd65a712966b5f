"""The `/v2` HTTP paths as templates: the bounded `route` label of the metrics, and the 404/405 distinction."""

from __future__ import annotations

import re

PROTOCOL = "v2-http"  # the `protocol` label of /v2 requests in levit_request_duration_seconds / inflight

_NAME = r"[^/]+"
TEMPLATES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (method, template, re.compile("^" + template.replace("{name}", _NAME).replace("{version}", _NAME) + "$"))
    for method, template in (
        ("GET", "/v2"),
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/{name}"),
        ("GET", "/v2/models/{name}/versions/{version}"),
        ("GET", "/v2/models/{name}/ready"),
        ("GET", "/v2/models/{name}/versions/{version}/ready"),
        ("GET", "/v2/models/{name}/config"),
        ("GET", "/v2/models/{name}/versions/{version}/config"),
        ("POST", "/v2/models/{name}/infer"),
        ("POST", "/v2/models/{name}/versions/{version}/infer"),
    )
)


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def template_of(path: str) -> tuple[str, str] | None:
    """(method, template) of the route `path` belongs to, or None for a path no v2 route has."""
    for method, template, pattern in TEMPLATES:
        if pattern.match(path):
            return method, template
    return None


def route_label(path: str) -> str:
    """The metrics' `route` for a /v2 path: its template (model names never become label values), or "other"."""
    found = template_of(path)
    return found[1] if found else "other"
