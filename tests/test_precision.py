"""bfloat16 on CPU (`LEVIT_DTYPE=bfloat16`): served where oneDNN can use AMX, refused with one line elsewhere.

The rule is checked on every machine: a CPU without AMX takes the refusal path by itself, and any CPU takes it
when `ONEDNN_MAX_CPU_ISA` holds oneDNN below AMX (a real cap: oneDNN then runs bfloat16 without AMX, which
measured 1.5x slower than float32). Serving bfloat16 needs an AMX CPU and says so when skipped.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from model.aot import main as aot_main
from model.engine import Engine
from model.fuse import fuse
from model.precision import amx_usable, cpu_dtype_problem
from model.transforms import batch_input
from service.imaging import load_image_pixels
from tests.conftest import photo
from tests.helpers import random_levit
from tests.stress.procs import ServerProcess

PHOTOS = ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.jpg")
NO_AMX = "this CPU has no AMX: bfloat16 is refused here (test_a_server_refuses_bfloat16_where_amx_is_held_back)"


def test_float32_everywhere_float16_needs_a_gpu() -> None:
    assert cpu_dtype_problem(torch.float32) is None
    problem = cpu_dtype_problem(torch.float16)
    assert problem is not None and problem.startswith("LEVIT_DTYPE=float16 needs a GPU")


def test_bfloat16_follows_amx_and_onednns_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    has_amx = torch.cpu._is_amx_tile_supported()
    assert amx_usable() == has_amx
    assert (cpu_dtype_problem(torch.bfloat16) is None) == has_amx
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx10_1_512_amx")  # a cap that still allows AMX
    assert amx_usable() == has_amx
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not amx_usable()
    problem = cpu_dtype_problem(torch.bfloat16)
    assert problem is not None and "needs AMX" in problem
    assert ("held below AMX by ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" if has_amx else "it has none") in problem


def test_a_server_refuses_bfloat16_where_amx_is_held_back() -> None:
    server = ServerProcess(wait=False, LEVIT_DTYPE="bfloat16", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16")
    try:
        assert server.proc.wait(timeout=180) == 1, server.logs()
    finally:
        server.proc.kill()
        server.proc.wait()
    log = server.logs()
    assert "Traceback" not in log
    [line] = [ln for ln in log.splitlines() if "cannot start" in ln]
    assert "LEVIT_DTYPE=bfloat16 on CPU needs AMX" in line


def _crops() -> torch.Tensor:
    return batch_input([load_image_pixels(photo(n), filename=n, max_pixels=10**8) for n in PHOTOS])


def test_bfloat16_artifacts_built_ahead_are_found_proven_and_close_to_float32(tmp_path: Path) -> None:
    """`python -m model.aot --dtypes bfloat16` (the image's builder) writes what a bfloat16 engine then finds: keyed
    by dtype, proven against the eager bfloat16 model at load, within bfloat16's rounding of float32. Any CPU
    compiles and runs it; only the speed needs AMX."""
    weights = tmp_path / "levit.pth"
    torch.save({"model": random_levit().state_dict()}, weights)
    store = tmp_path / "engines"
    argv = ["--weights", str(weights), "--cache-dir", str(tmp_path), "--out", str(store), "--max-batch-size", "1"]
    assert aot_main([*argv, "--dtypes", "bfloat16"]) == 0
    fused = fuse(random_levit())
    reference = fused(_crops())
    engine = Engine(fused, "aot", 1, dtype=torch.bfloat16, artifact_dirs=[store])
    assert engine.artifact is not None and engine.artifact.origin == "cache"  # found, not compiled again
    assert engine.kind == "aot" and engine.linears == "default"
    assert {k.dtype for k in engine.artifact.keys.values()} == {"bfloat16"}
    got = torch.cat([engine(image[None]) for image in _crops()])
    assert got.dtype == torch.float32
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    assert 0 < rel < 2.5e-2  # not float32 (0 would mean the dtype never reached the engine), not garbage
    assert got.argmax(1).tolist() == reference.argmax(1).tolist()


@pytest.mark.skipif(not amx_usable(), reason=NO_AMX)
def test_a_bfloat16_server_answers_as_float32_does(tmp_path: Path) -> None:
    weights = tmp_path / "levit.pth"
    torch.save({"model": random_levit().state_dict()}, weights)
    fused = fuse(random_levit())
    with torch.inference_mode():
        want = fused(_crops()).softmax(-1)
    server = ServerProcess(LEVIT_DTYPE="bfloat16", LEVIT_WEIGHTS=str(weights), LEVIT_MAX_BATCH_SIZE="4")
    try:
        info = httpx.get(server.url + "/v1/model").json()
        assert info["dtype"] == "bfloat16"
        for index, name in enumerate(PHOTOS):
            response = httpx.post(server.url + "/classify", files={"img": (name, photo(name))}, timeout=60)
            assert response.status_code == 200, response.text
            [top, *_] = response.json()["results"][0]["predictions"]
            assert top["index"] == int(want[index].argmax())
            assert abs(top["score"] - float(want[index].max())) < 0.02
    finally:
        server.stop()
