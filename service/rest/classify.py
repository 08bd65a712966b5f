"""`/classify`, the hot route: a plain ASGI endpoint that `RequestContext` calls without FastAPI's router.

Why not a FastAPI route: per request, the router, dependency solving and exception middleware cost the
front-end's one event loop about 0.2 ms of CPU, which every request's latency and the c=32 throughput pay
(on 2 cores: 147.5 -> 155.2 img/s at 32 clients, c=1 p50 14.0 -> 13.1 ms; docs/benchmarks.md, run Q).
Admission stays the first thing a request meets.

FastAPI still documents the route: `document` puts the same contract (`k`, the timeout header, both body
forms, every error) in /openapi.json, from a signature that is never called.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from service.core import TIMEOUT_HEADER, Service, Upload, timeout_header
from service.errors import OUTCOMES, BadRequest, InvalidParameter, PayloadTooLarge, refuse
from service.rest.middleware import error_response, unless_disconnected
from service.rest.schemas import ClassifyOut, ErrorOut
from service.results import Classification

PATH = "/classify"
IMAGE_FIELD = "img"
MAX_K = 1000  # the API's bound on `k`; LEVIT_MAX_TOP_K may lower it (400 bad_request, `Service.check_k`)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text}
    for status, text in {
        400: "bad parameter or request",
        405: "method other than POST",
        413: "upload or image too large",
        415: "not a supported image format",
        422: "corrupt or truncated image, or invalid parameter",
        500: "model failure in this request's batch",
        503: "queue full (see Retry-After), loading or draining",
        504: "deadline passed before the image was classified",
    }.items()
}
BODY_DOC = {
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


def query_k(query_string: bytes) -> int | None:
    """The `k` query parameter (the last one given), or None; 422 invalid_parameter outside 1..MAX_K."""
    k = None
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name != "k":
            continue
        try:
            k = int(value)
        except ValueError:
            raise InvalidParameter(f"query.k: Input should be a valid integer, got {value[:40]!r}") from None
        if not 1 <= k <= MAX_K:
            raise InvalidParameter(f"query.k: Input should be between 1 and {MAX_K}, got {k}")
    return k


class InMemoryMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, with every file kept in memory.

    Its default spools a file over 1 MB to a temporary file: in the hardened container /tmp is a 64 MiB
    tmpfs (docker/compose.yaml, the Helm chart), which a few large uploads at once would fill, failing them.
    Each chunk after the spill, the seek and the read also become trips through a thread pool. The body is
    already bounded (`LEVIT_MAX_UPLOAD_BYTES`) and read into memory whole to be decoded, so the file buys
    nothing. (`SpooledTemporaryFile(max_size=0)` never rolls over.)
    """

    spool_max_size = 0


def _filename(upload: UploadFile | str, index: int) -> str:
    name = upload.filename if isinstance(upload, UploadFile) else None
    return name or f"image {index}"


async def read_uploads(request: Request, max_images: int) -> list[Upload]:
    """The images of a request: multipart field `img` (repeatable, Starlette's parser) or an `image/*` body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("image/"):
        return [Upload(request.headers.get("x-filename", "body"), await request.body())]
    if not content_type.startswith("multipart/form-data"):
        raise BadRequest(
            f"send multipart/form-data with field '{IMAGE_FIELD}', or an image/* body; got {content_type!r}"
        )
    try:
        parser = InMemoryMultiPartParser(
            request.headers, request.stream(), max_files=max_images, max_fields=max_images + 16
        )
        form = await parser.parse()
    except MultiPartException as error:  # Starlette's parser refusals (outside a Starlette app: no HTTPException)
        if "Too many files" in error.message:
            raise PayloadTooLarge(f"more than {max_images} images in one request") from None
        raise BadRequest(f"malformed multipart body: {error.message}") from None
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


class ClassifyEndpoint:
    """POST /classify, any other method 405; every error through `refuse`, as the FastAPI handlers do."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response
        if scope["method"] != "POST":
            outcome = OUTCOMES["method_not_allowed"]
            outcome.count()
            response = error_response(outcome, "Method Not Allowed")
            response.headers["allow"] = "POST"
        else:
            try:
                response = JSONResponse(await self._classify(Request(scope, receive)))
            except Exception as error:  # the one exception ladder decides (and logs 500s)
                refusal = refuse(error)
                response = error_response(refusal.outcome, refusal.message)
        await response(scope, receive, send)

    async def _classify(self, request: Request) -> dict[str, Any]:
        service = self.service
        with service.admission() as admission:  # first: overload, loading and draining are refused at once
            k = service.check_k(query_k(request.scope.get("query_string", b"")))
            deadline = service.deadline(timeout_header(request.headers.get(TIMEOUT_HEADER)))
            uploads = await read_uploads(request, service.settings.max_images_per_request)
            results = await unless_disconnected(request, service.classify(uploads, k, deadline, admission))
        # Plain JSON: ClassifyOut documents this shape; validating it again per request cost ~10%.
        return Classification(service.settings.model, service.weights_id, results).to_json()


def _documented(
    k: Annotated[int | None, Query(ge=1, le=MAX_K, description="number of predictions per image")] = None,
) -> ClassifyOut:
    """Classify one or more images: multipart field `img` (repeatable) or a raw `image/*` body."""
    raise NotImplementedError("documentation only: ClassifyEndpoint serves /classify")


def document(app: FastAPI) -> None:
    """Put /classify in the app's OpenAPI schema (`/openapi.json`, `/docs`), as a FastAPI route would."""
    route = APIRoute(
        PATH,
        _documented,
        methods=["POST"],
        response_model=ClassifyOut,
        responses=ERRORS,
        openapi_extra=BODY_DOC,
        name="classify",
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=[route, *app.routes]
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
