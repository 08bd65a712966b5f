"""CPU linears by measurement: oneDNN or MKL, whichever this CPU runs faster; same numbers either way."""

from __future__ import annotations

import pytest
import torch

from model.engine import Engine, OneDnnLinear, pick_linears
from model.fuse import fuse
from tests.helpers import random_levit


def _onednn_layers(engine: Engine) -> int:
    return sum(isinstance(m, OneDnnLinear) for m in engine.model.modules())


def test_pick_times_both_and_names_the_faster() -> None:
    fused = fuse(random_levit())
    choice, medians = pick_linears(fused, batch=2, trials=3)
    assert set(medians) == {"onednn", "mkl"} and all(v > 0 for v in medians.values())
    assert choice == min(medians, key=medians.__getitem__)
    assert not any(isinstance(m, OneDnnLinear) for m in fused.modules())  # the candidate was a copy


@pytest.mark.parametrize("linears", ["onednn", "mkl"])
def test_either_choice_computes_the_same_probabilities(linears: str) -> None:
    fused = fuse(random_levit())
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = fused(x).softmax(-1)
    engine = Engine(fuse(random_levit()), "eager", 4, linears=linears)
    assert engine.linears == linears
    assert (_onednn_layers(engine) > 0) == (linears == "onednn")
    torch.testing.assert_close(engine(x).softmax(-1), reference, rtol=1e-4, atol=1e-5)


def test_auto_measures_and_trace_is_always_mkl() -> None:
    auto = Engine(fuse(random_levit()), "eager", 2)
    assert auto.linears in ("onednn", "mkl") and set(auto.linear_ms) == {"onednn", "mkl"}
    assert (_onednn_layers(auto) > 0) == (auto.linears == "onednn")
    traced = Engine(fuse(random_levit()), "trace", 2)
    assert traced.linears == "mkl" and _onednn_layers(traced) == 0
