"""PromQL in the Grafana dashboard and the prometheus-adapter rules: only the server's metrics, used right."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.deploy.promql import (
    adapter_exprs,
    check_promql,
    dashboard_exprs,
    promql_uses,
    substitute_grafana,
)
from tests.deploy.support import DASHBOARD, METRICS, SERIES, run


def test_metric_contract_is_what_the_server_exports():
    """METRICS is read from service.metrics: every levit_* family the registry exports, no more, no less."""
    from service.metrics import registry

    exported = {f.name: f.type for f in registry().collect() if f.name.startswith("levit_")}
    assert exported == {name: kind for name, (kind, _labels) in METRICS.items()}
    assert {"levit_images_dropped_total", "levit_rejections_total", "levit_batch_size_bucket"} <= set(SERIES)


def test_dashboard_structure():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "levit-serve" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == "${datasource}"
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric = re.match(r"label_values\((\w+)", var["definition"]).group(1)
            assert metric in SERIES, var


def test_dashboard_covers_the_required_views():
    exprs = [e for _, e in dashboard_exprs()]
    text = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    assert has(r"rate\(levit_request_duration_seconds_count"), "request rate"
    request_buckets = r"sum by \(protocol, le\) \(rate\(levit_request_duration_seconds_bucket"
    for q in ("0.5", "0.95", "0.99"):
        assert has(rf"histogram_quantile\({q}, {request_buckets}"), f"p{q} latency by protocol"
    assert "levit_queue_depth" in text, "queue depth"
    assert has(r"sum by \(le\) \(increase\(levit_batch_size_bucket"), "batch-size distribution"
    assert has(r"histogram_quantile\(0.95, .*levit_model_forward_seconds_bucket"), "model forward time"
    assert has(r"sum by \(reason\) \(rate\(levit_rejections_total"), "rejections by reason"
    heatmaps = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] == "heatmap"]
    targets = [t for p in heatmaps for t in p["targets"]]
    assert any("levit_batch_size_bucket" in t["expr"] and t.get("format") == "heatmap" for t in targets)


def test_promql_uses_only_contract_metrics():
    errors = []
    for where, expr in dashboard_exprs():
        errors += check_promql(substitute_grafana(expr), where)
    for where, expr, selector_only in adapter_exprs():
        errors += check_promql(expr, where, selector_only=selector_only)
    assert not errors, "\n".join(errors)


def test_promql_checker_catches_mistakes():
    """The checker above is only worth something if it fails on the usual slips."""
    assert check_promql("rate(levit_requests_total[1m])", "t")  # unknown name
    assert check_promql("sum(levit_rejections_total)", "t")  # counter without rate
    assert check_promql("rate(levit_queue_depth[1m])", "t")  # gauge under rate
    assert check_promql("histogram_quantile(0.9, sum by (protocol) (rate(levit_batch_size_bucket[1m])))", "t")
    assert check_promql("sum by (reason) (levit_inflight_requests)", "t")  # label of another metric
    assert not check_promql('sum by (protocol) (levit_inflight_requests{instance=~".*"})', "t")
    assert not check_promql('sum by (reason) (rate(levit_images_dropped_total{reason="deadline"}[1m]))', "t")
    with pytest.raises(AssertionError):
        promql_uses("sum(rates(levit_batch_size_count[1m]))")


def test_promql_syntax_with_promtool(tools, tmp_path):
    exprs = [(w, substitute_grafana(e)) for w, e in dashboard_exprs()]
    exprs += [(w, e) for w, e, _ in adapter_exprs()]
    rules = {
        "groups": [
            {
                "name": "syntax",
                "rules": [{"record": f"levit:syntax_check_{i}", "expr": expr} for i, (_, expr) in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    run([tools.promtool, "check", "rules", str(path)])
