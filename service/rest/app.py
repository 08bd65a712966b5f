"""The HTTP API: health, readiness, metrics and model metadata (FastAPI), `/v2` and the page; `/classify`
is `service.rest.classify`'s endpoint, in front of FastAPI's router."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp
from swagger_ui_bundle import swagger_ui_path

from service import metrics
from service.core import Service
from service.errors import OUTCOMES, NotReady, ServiceError, refuse
from service.rest import classify, page
from service.rest.middleware import RequestContext, error_response
from service.rest.schemas import ErrorOut, Health
from service.rest.v2 import create_router as v2_router

log = logging.getLogger(__name__)
ROUTES = frozenset(
    {"/classify", "/healthz", "/readyz", "/metrics", "/v1/model", "/docs", "/openapi.json", *page.ROUTES}
)


def create_app(service: Service) -> ASGIApp:
    settings = service.settings
    app = FastAPI(
        title="levit-serve",
        version="0.1.0",
        description="LeViT image classification with dynamic batching.",
        docs_url=None,
        redoc_url=None,
    )
    app.mount("/static/swagger", StaticFiles(directory=str(swagger_ui_path)), name="swagger")

    async def _refused(_: Request, error: Exception) -> JSONResponse:
        refusal = refuse(error)
        return error_response(refusal.outcome, refusal.message)

    app.add_exception_handler(ServiceError, _refused)  # image errors included
    app.add_exception_handler(Exception, _refused)  # anything unexpected: 500 internal, logged

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())
        OUTCOMES["invalid_parameter"].count()
        return error_response(OUTCOMES["invalid_parameter"], problems)

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, error: HTTPException) -> JSONResponse:
        outcome = OUTCOMES[{404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "bad_request")]
        outcome.count()
        response = error_response(outcome, str(error.detail), error.status_code)
        response.headers.update(error.headers or {})
        return response

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process serves requests (also while loading or draining)."""
        return Health(status="alive")

    @app.get("/readyz", response_model=Health, responses={503: {"model": ErrorOut}})
    async def readyz() -> Health | JSONResponse:
        """Readiness: weights loaded, every batch size warmed up, not draining."""
        if service.ready:
            return Health(status="ready")
        return JSONResponse(
            {"error": {"code": f"not_ready_{service.phase.value}", "message": f"server is {service.phase.value}"}},
            status_code=503,
        )

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", responses={503: {"model": ErrorOut}})
    async def model_metadata() -> dict[str, Any]:
        """Variant, weights (source, SHA-256), parameters, MACs, input size, device, dtype, batching."""
        if service.model_info is None:
            raise NotReady("model is still loading")
        return service.model_info

    app.include_router(v2_router(service))  # /v2: the Open Inference Protocol (docs/v2.md)
    app.include_router(page.create_router())  # `/`: the page, and /v1/stats for its live view (docs/page.md)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="levit-serve API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png",
        )

    classify.document(app)
    endpoints = {classify.PATH: classify.ClassifyEndpoint(service)}
    return RequestContext(app, settings.max_upload_bytes, settings.read_timeout_s, ROUTES, endpoints=endpoints)
