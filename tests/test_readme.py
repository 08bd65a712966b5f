"""The README documents every setting and every metric the server really has."""

from __future__ import annotations

import re

from prometheus_client import REGISTRY

from service.settings import Settings
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"`(LEVIT_[A-Z_]+)`", README))
    assert {f"LEVIT_{name.upper()}" for name in Settings.model_fields} <= documented


def test_every_metric_is_documented_and_exists() -> None:
    import service.metrics  # noqa: F401  (registers the metrics)

    exported = {m.name for m in REGISTRY.collect() if m.name.startswith("levit_")}
    rows = set(re.findall(r"^\| `(levit_[a-z_]+)`", README, flags=re.M))
    counters = {m.name for m in REGISTRY.collect() if m.type == "counter" and m.name.startswith("levit_")}
    assert rows == {f"{n}_total" if n in counters else n for n in exported}
