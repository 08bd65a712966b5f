"""Fuzzing: schemathesis against the live OpenAPI schema, hypothesis against the decode entry point."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.imaging import ImageError, load_image_tensor
from tests.conftest import ServerThread, photo


@pytest.fixture(scope="module")
def live() -> Iterator[ServerThread]:
    srv = ServerThread(max_batch_size=8, max_upload_bytes=512 * 1024).start()
    yield srv
    srv.stop()


def test_api_never_answers_5xx_and_matches_its_schema(live: ServerThread) -> None:
    """Every operation of /openapi.json, with generated (and schema-violating) inputs, bounded."""
    schema = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/classify", "/v1/model", "/readyz", "/healthz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(timeout=60)
            timeout_ms = (case.headers or {}).get("X-Request-Timeout-Ms")
            if response.status_code == 504:  # documented: the client asked for a deadline shorter than the work
                assert int(timeout_ms) < 1000 and response.json()["error"]["code"] == "deadline_exceeded"
            else:
                assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
            # Binary fields cannot say "a decodable image" in JSON Schema, so schema-valid random bytes are
            # rightly refused (415/422); the 5xx check is the one above, which knows the documented 504.
            case.validate_response(response, excluded_checks=[positive_data_acceptance, not_a_server_error])

        check()


def _tiny_images() -> list[bytes]:
    out = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), (120, 30, 200)).save(buffer, fmt)
        out.append(buffer.getvalue())
    return out


SEEDS = [*_tiny_images(), photo("cat.jpg")[:4000]]


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            data[position] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[position:]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@given(data=st.one_of(mutated_images(), st.binary(max_size=512)))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_decode_raises_only_documented_errors(data: bytes) -> None:
    try:
        tensor = load_image_tensor(data, filename="fuzz", max_pixels=4_000_000)
    except ImageError as error:
        assert error.status in (413, 415, 422) and "fuzz" in error.message
    else:
        assert tuple(tensor.shape) == (3, 224, 224)
