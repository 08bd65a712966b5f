"""bfloat16 on CPU (`LEVIT_DTYPE=bfloat16`): served where oneDNN can use AMX, refused with one line elsewhere.

The rule is checked on every machine: a CPU without AMX takes the refusal path by itself, and any CPU takes it
when `ONEDNN_MAX_CPU_ISA` holds oneDNN below AMX (a real cap: oneDNN then runs bfloat16 without AMX, which
measured 1.5x slower than float32). Building and serving bfloat16 need an AMX CPU and say so when skipped.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from model.aot import PROBE_RTOL
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
NO_AMX = "this CPU cannot use AMX: bfloat16 is refused here (test_a_server_refuses_bfloat16_where_amx_is_held_back)"
RTOL = PROBE_RTOL["bfloat16"]


def test_float32_everywhere_float16_needs_a_gpu() -> None:
    assert cpu_dtype_problem(torch.float32) is None
    problem = cpu_dtype_problem(torch.float16)
    assert problem is not None and problem.startswith("LEVIT_DTYPE=float16 needs a GPU")


def test_bfloat16_follows_amx_and_onednns_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    usable = amx_usable()
    assert (cpu_dtype_problem(torch.bfloat16) is None) == usable
    assert not usable or torch.cpu._is_amx_tile_supported()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx10_1_512_amx")  # a cap that still allows AMX
    assert amx_usable() == usable
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN reads the older name only when the newer is unset
    assert amx_usable() == usable
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert not amx_usable()
    problem = cpu_dtype_problem(torch.bfloat16)
    assert problem is not None and "needs AMX" in problem
    assert ("held below AMX by ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16" if usable else "cannot use any") in problem


def test_a_server_refuses_bfloat16_where_amx_is_held_back() -> None:
    server = ServerProcess(
        wait=False, LEVIT_DTYPE="bfloat16", LEVIT_DEVICE="cpu", ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16"
    )
    try:
        assert server.proc.wait(timeout=180) == 1, server.logs()
    finally:
        server.proc.kill()
        server.proc.wait()
    log = server.logs()
    assert "Traceback" not in log
    [line] = [ln for ln in log.splitlines() if "cannot start" in ln]
    assert "LEVIT_DTYPE=bfloat16 on CPU needs AMX" in line


def test_the_builder_refuses_bfloat16_where_amx_is_held_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Inductor packs bfloat16 weights for the building CPU's oneDNN: the builder follows the server's rule."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    with pytest.raises(SystemExit) as stopped:
        aot_main(["--weights", "random", "--cache-dir", str(tmp_path), "--out", str(tmp_path), "--dtypes", "bfloat16"])
    assert stopped.value.code == 2
    assert "--dtypes bfloat16: build on a CPU that serves it" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before loading weights or writing anything


@pytest.fixture(scope="module")
def bf16_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A checkpoint (BN and attention biases randomised) and its bfloat16 artifact at batch 1, built the way the
    image's builder stage builds them: `python -m model.aot --dtypes bfloat16`."""
    if not amx_usable():
        pytest.skip(NO_AMX)
    folder = tmp_path_factory.mktemp("bf16")
    weights, store = folder / "levit.pth", folder / "engines"
    torch.save({"model": random_levit().state_dict()}, weights)
    argv = ["--weights", str(weights), "--cache-dir", str(folder), "--out", str(store), "--max-batch-size", "1"]
    assert aot_main([*argv, "--dtypes", "bfloat16"]) == 0
    return weights, store


def _crops() -> torch.Tensor:
    return batch_input([load_image_pixels(photo(n), filename=n, max_pixels=10**8) for n in PHOTOS])


def _clear_top1(logits: torch.Tensor) -> list[int]:
    """Images whose float32 top-1 leads by more than twice bfloat16's tolerance: the ones it must not flip."""
    top2 = logits.topk(2, dim=1).values
    return [i for i, lead in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if lead > 2 * RTOL * logits.abs().max()]


def test_bfloat16_artifacts_built_ahead_are_found_proven_and_close_to_float32(bf16_store: tuple[Path, Path]) -> None:
    """What the builder wrote, a bfloat16 engine finds (not rebuilds): keyed by dtype, proven against the eager
    bfloat16 model at load, within bfloat16's rounding of float32."""
    _, store = bf16_store
    fused, crops = fuse(random_levit()), _crops()
    with torch.inference_mode():
        reference = fused(crops)
    engine = Engine(fused, "aot", 1, dtype=torch.bfloat16, artifact_dirs=[store])
    assert engine.artifact is not None and engine.artifact.origin == "cache"
    assert engine.kind == "aot" and engine.linears == "default"
    assert {k.dtype for k in engine.artifact.keys.values()} == {"bfloat16"}
    got = torch.cat([engine(image[None]) for image in crops])
    assert got.dtype == torch.float32
    rel = ((got - reference).abs().max() / reference.abs().max()).item()
    assert 0 < rel < RTOL  # not float32 (0 would mean the dtype never reached the engine), not garbage
    clear = _clear_top1(reference)
    assert clear  # random weights: the same class leads every photo, by 7% of the largest logit
    assert got[clear].argmax(1).tolist() == reference[clear].argmax(1).tolist()


def test_a_bfloat16_server_answers_as_float32_does(bf16_store: tuple[Path, Path]) -> None:
    """The production path: model processes serving the bfloat16 artifacts (found in LEVIT_ENGINE_PATH)."""
    weights, store = bf16_store
    with torch.inference_mode():
        logits = fuse(random_levit())(_crops())
    want = logits.softmax(-1)
    server = ServerProcess(
        LEVIT_DTYPE="bfloat16", LEVIT_DEVICE="cpu", LEVIT_WEIGHTS=str(weights), LEVIT_ENGINE="aot",
        LEVIT_ENGINE_PATH=str(store), LEVIT_MAX_BATCH_SIZE="1",
    )  # fmt: skip
    try:
        info = httpx.get(server.url + "/v1/model").json()
        assert (info["dtype"], info["engine"], info["linears"]) == ("bfloat16", "aot", "default"), info
        assert info["engine_artifact"]["origin"] == "cache"
        clear = _clear_top1(logits)
        for index, name in enumerate(PHOTOS):
            response = httpx.post(server.url + "/classify", files={"img": (name, photo(name))}, timeout=60)
            assert response.status_code == 200, response.text
            [top, *_] = response.json()["results"][0]["predictions"]
            if index in clear:
                assert top["index"] == int(want[index].argmax())
            expected = float(want[index, top["index"]])
            assert abs(top["score"] - expected) < 0.05 * expected  # the same class's probability, bf16-close
    finally:
        server.stop()
