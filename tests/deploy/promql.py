"""A small PromQL lexer (metric names, function nesting, label names) and the checks built on it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import yaml

from tests.deploy.support import ADAPTER_VALUES, DASHBOARD, METRICS, SERIES, TARGET_LABELS

AGGREGATIONS = set(
    re.findall(
        r"\w+", "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio"
    )
)
FUNCTIONS = AGGREGATIONS | set(
    re.findall(
        r"\w+",
        """abs absent absent_over_time ceil changes clamp clamp_max clamp_min day_of_month day_of_week day_of_year
    days_in_month delta deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
    histogram_stddev histogram_stdvar histogram_sum hour idelta increase irate label_join label_replace ln log10 log2
    minute month predict_linear rate resets round scalar sgn sort sort_desc sqrt time timestamp vector year
    avg_over_time min_over_time max_over_time sum_over_time count_over_time quantile_over_time stddev_over_time
    stdvar_over_time last_over_time present_over_time""",
    )
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "offset", "and", "or", "unless", "atan2", "inf", "nan"}
RATE_FUNCS = {"rate", "irate", "increase", "resets"}

_TOKEN = re.compile(
    r"""\s+|(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)|(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?[a-z]*)"""
    r"""|(?P<id>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<brace>\{)|(?P<bracket>\[[^\]]*\])|(?P<op>[()\],+\-*/%^<>=!~@]+)"""
)


@dataclass
class PromUse:
    metrics: list[tuple[str, tuple[str, ...]]]  # (series name, enclosing functions outermost first)
    labels: set[str]


def promql_uses(expr: str) -> PromUse:
    metrics: list[tuple[str, tuple[str, ...]]] = []
    labels: set[str] = set()
    stack: list[str] = []  # function per open paren ("" for plain grouping parens)
    pos, pending_fn, grouping = 0, None, False
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        assert m, f"cannot lex {expr[pos:]!r} in {expr!r}"
        pos = m.end()
        if m.group("brace"):
            end = expr.index("}", pos)
            body = expr[pos:end]
            for name, _op, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(\"[^\"]*\"|'[^']*')", body):
                if name == "__name__":
                    metrics.append((value[1:-1], tuple(stack)))
                else:
                    labels.add(name)
            pos = end + 1
            continue
        tok = m.group("id")
        if tok:
            nxt = expr[pos:].lstrip()[:1]
            if tok in GROUPING:
                grouping = True
            elif tok in FUNCTIONS:  # `sum(`, but also `sum by (le) (`
                pending_fn = tok
            elif nxt == "(":
                raise AssertionError(f"unknown PromQL function {tok!r} in {expr!r}")
            elif tok not in KEYWORDS:
                metrics.append((tok, tuple(stack)))
            continue
        op = m.group("op") or ""
        for ch in op:
            if ch == "(":
                if grouping:  # a label list: by (a, b)
                    end = expr.index(")", pos)
                    labels.update(x.strip() for x in expr[pos:end].split(",") if x.strip())
                    pos, grouping = end + 1, False
                    break
                stack.append(pending_fn or "")
                pending_fn = None
            elif ch == ")":
                assert stack, f"unbalanced ) in {expr!r}"
                stack.pop()
    assert not stack, f"unbalanced ( in {expr!r}"
    return PromUse(metrics, labels)


def check_promql(expr: str, where: str, *, selector_only: bool = False) -> list[str]:
    """Problems with one expression: unknown series, counters without rate(), gauges under rate(), labels."""
    errors = []
    use = promql_uses(expr)
    assert use.metrics, f"{where}: no metric in {expr!r}"
    allowed_labels = set(TARGET_LABELS)
    for name, funcs in use.metrics:
        if name not in SERIES:
            errors.append(f"{where}: {name!r} is not a series of the server's metrics (service.metrics)")
            continue
        family, kind = SERIES[name]
        allowed_labels |= METRICS[family][1]
        if kind == "bucket":
            allowed_labels.add("le")
        if selector_only:
            continue
        under_rate = any(f in RATE_FUNCS for f in funcs)
        if kind in ("counter", "bucket") and not under_rate:
            errors.append(f"{where}: {name} is a counter; use rate()/increase() in {expr!r}")
        if kind == "gauge" and funcs and funcs[-1] in RATE_FUNCS:
            errors.append(f"{where}: {name} is a gauge; rate()/increase() is meaningless in {expr!r}")
        if kind == "bucket" and "histogram_quantile" in funcs and "le" not in use.labels:
            errors.append(f"{where}: histogram_quantile over {name} must keep `le` in {expr!r}")
    unknown = use.labels - allowed_labels
    if unknown:
        errors.append(f"{where}: labels {sorted(unknown)} not on these metrics in {expr!r}")
    return errors


GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def adapter_exprs() -> list[tuple[str, str, bool]]:
    out = []
    for rule in adapter_rules():
        series = promql_uses(rule["seriesQuery"]).metrics[0][0]
        query = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="levit",pod=~"levit-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
        out.append((f"adapter rule {rule['name']['as']} seriesQuery", rule["seriesQuery"], True))
        out.append((f"adapter rule {rule['name']['as']} metricsQuery", query, False))
    return out


def substitute_grafana(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr
