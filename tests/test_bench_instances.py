"""The many-core measurement issue 11 needs from a lent machine: prepared and rehearsed here, run there once.

`bench.instances` is the divisor of the many-core floor (the best model-only processes x threads), and
`bench/device.sh` runs it there in a single call with wheels from `scripts/device_wheels.sh`: a grid that
parsed a shape wrongly, processes that never ran, or a wheel list naming a package that is not what this
checkout runs would each waste a session's only device run.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest

from bench.instances import EngineSpec, GridError, Shape, best, default_grid, measure, measure_grid, parse_grid
from bench.loadgen import LevelResult
from bench.server import GRID_FLOOR, Round, grid_floor, grid_share_line

ROOT = Path(__file__).resolve().parents[1]


def test_shapes_parse_and_the_default_grid_splits_the_cores() -> None:
    assert parse_grid("1x16, 4X4,8x2") == [Shape(1, 16), Shape(4, 4), Shape(8, 2)]
    assert [str(s) for s in default_grid(16)] == ["1x16", "2x8", "4x4", "8x2", "16x1"]
    assert [str(s) for s in default_grid(2)] == ["1x2", "2x1"]
    for text in ("0x4", "16", "4x"):
        with pytest.raises(ValueError, match="PROCESSESxTHREADS"):
            Shape.parse(text)
    assert best({"1x16": 774.0, "4x4": 1400.0, "8x2": 1210.0}) == ("4x4", 1400.0)


def test_every_process_of_a_shape_runs_the_engine() -> None:
    """Two real processes, each loading the engine: the sum is what both ran (trace: builds in seconds)."""
    spec = EngineSpec(engine="trace", max_batch_size=2)
    one = measure(Shape(1, 1), spec, batch=2, seconds=0.5)
    two = measure(Shape(2, 1), spec, batch=2, seconds=0.5)
    assert one > 0 and two > 0
    assert two > 0.5 * one  # two processes did not leave one of them out (on 2 cores each has its own)


def test_a_process_that_dies_fails_its_shape_at_once_and_the_grid_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    """A device run has one try: a shape whose processes cannot load the engine must not hang the benchmark
    until its start timeout (10 minutes), nor cost the shapes after it."""
    bad = EngineSpec(model="LeViT_none", engine="trace", max_batch_size=2)
    with pytest.raises(GridError, match="exited with"):
        measure(Shape(2, 1), bad, batch=2, seconds=0.5)
    assert measure_grid([Shape(1, 1)], bad, batch=2, seconds=0.5) == {}
    assert "1x1: model-only process 0 exited with" in capsys.readouterr().out


def _round(model_ips: float, http_ips: float, grid: dict[str, float]) -> Round:
    r = Round({16: 16 / model_ips}, {16: 16 / model_ips}, 100.0, grid)
    level = LevelResult("http", "photos", 128, 1.0)
    level.latencies = [0.01] * int(http_ips)
    r.levels.append(level)
    return r


def test_the_many_core_floor_is_judged_against_the_best_shape(capsys: pytest.CaptureFixture[str]) -> None:
    grid = {"1x16": 774.0, "4x4": 1400.0}
    assert grid_floor([_round(774.0, int(1400 * GRID_FLOOR) + 10, grid)], ["http"], 128)
    assert not grid_floor([_round(774.0, int(1400 * GRID_FLOOR) - 10, grid)], ["http"], 128)  # 1x16 would pass
    out = capsys.readouterr().out
    assert "PASS: http photos at c=128" in out and "FAIL: http photos at c=128" in out and "of 4x4" in out
    line = grid_share_line(_round(774.0, 700, grid), ["http", "grpc-unary"], 128)
    assert line.endswith("against the best model-only shape (4x4, 1400.0 img/s): http 50%")


def test_device_script_parses_and_its_wheels_are_this_checkouts_packages() -> None:
    subprocess.run(["bash", "-n", str(ROOT / "bench" / "device.sh")], check=True)
    script = (ROOT / "scripts" / "device_wheels.sh").read_text()
    names = re.search(r"packages=\(\n(.*?)\n\)", script, re.S)
    assert names is not None
    for name in names.group(1).split():
        assert importlib.metadata.version(name)  # raises PackageNotFoundError for a name nobody installed
