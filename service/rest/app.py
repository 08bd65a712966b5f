"""The HTTP API: `/classify`, health, readiness, metrics and model metadata (FastAPI)."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp
from swagger_ui_bundle import swagger_ui_path

from service import metrics
from service.core import TIMEOUT_HEADER, Service, Upload, timeout_header
from service.errors import OUTCOMES, BadRequest, NotReady, Outcome, PayloadTooLarge, ServiceError, refuse
from service.rest import page
from service.rest.middleware import RequestContext, error_json, unless_disconnected
from service.rest.schemas import ClassifyOut, ErrorOut, Health
from service.rest.v2 import create_router as v2_router
from service.results import Classification

log = logging.getLogger(__name__)
ROUTES = frozenset(
    {"/classify", "/healthz", "/readyz", "/metrics", "/v1/model", "/docs", "/openapi.json", *page.ROUTES}
)
IMAGE_FIELD = "img"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "bad parameter or request",
        413: "upload or image too large",
        415: "not a supported image format",
        422: "corrupt or truncated image, or invalid parameter",
        500: "model failure in this request's batch",
        503: "queue full (see Retry-After), loading or draining",
        504: "deadline passed before the image was classified",
    }.items()
}
_BODY_DOC = {
    "parameters": [
        {
            "name": TIMEOUT_HEADER,
            "in": "header",
            "required": False,
            "description": "deadline for this request, in milliseconds",
            "schema": {"type": "integer", "minimum": 1},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def error_response(outcome: Outcome, message: str, status: int | None = None) -> JSONResponse:
    status_code, body = error_json(outcome, message)
    return JSONResponse(body, status_code=status or status_code, headers=outcome.headers)


def _filename(upload: UploadFile | str, index: int) -> str:
    name = upload.filename if isinstance(upload, UploadFile) else None
    return name or f"image {index}"


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("image/"):
        return [Upload(request.headers.get("x-filename", "body"), await request.body())]
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(
            f"send multipart/form-data with field '{IMAGE_FIELD}', or an image/* body; got {content_type!r}"
        )
    try:
        form = await request.form(max_files=max_images, max_fields=max_images + 16)
    except HTTPException as error:  # Starlette's multipart parser refusals
        if "Too many files" in str(error.detail):
            raise PayloadTooLarge(f"more than {max_images} images in one request") from None
        raise BadRequest(f"malformed multipart body: {error.detail}") from None
    try:
        parts = form.getlist(IMAGE_FIELD)
        if not parts:
            fields = sorted(set(form.keys()))
            raise BadRequest(f"no file in multipart field '{IMAGE_FIELD}' (fields sent: {fields or 'none'})")
        if not all(isinstance(p, UploadFile) for p in parts):
            raise BadRequest(f"multipart field '{IMAGE_FIELD}' must carry files, not text")
        return [Upload(_filename(p, i), await p.read()) for i, p in enumerate(parts)]
    finally:
        await form.close()


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

    @app.post("/classify", response_model=ClassifyOut, responses=_ERRORS, openapi_extra=_BODY_DOC)
    async def classify(
        request: Request,
        k: Annotated[int | None, Query(ge=1, le=1000, description="number of predictions per image")] = None,
    ) -> JSONResponse:
        """Classify one or more images: multipart field `img` (repeatable) or a raw `image/*` body."""
        service.admit()
        service.check_k(k)
        deadline = service.deadline(timeout_header(request.headers.get(TIMEOUT_HEADER)))
        uploads = await read_uploads(request, settings.max_images_per_request)
        results = await unless_disconnected(request, service.classify(uploads, k, deadline))
        weights = service.weights_id
        # Built as plain JSON: ClassifyOut documents this shape, validating it again per request costs ~10%.
        return JSONResponse(Classification(settings.model, weights, results).to_json())

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

    return RequestContext(app, settings.max_upload_bytes, settings.read_timeout_s, ROUTES)
