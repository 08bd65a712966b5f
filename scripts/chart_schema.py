"""Generate the `config` section of the Helm chart's values.schema.json from service.settings.Settings.

    make chart-schema        # = .venv/bin/python scripts/chart_schema.py

tests/deploy/test_helm.py checks that the committed schema equals what `config_schema` derives, so a new
or changed setting fails the tests until this is run.
"""

from __future__ import annotations

import json
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the project's packages live beside scripts/
    sys.path.insert(0, str(ROOT))
CHART = ROOT / "k8s" / "levit-serve"

# Settings the chart sets itself (from ports / weights / lifecycle values); rejected under `config`.
CHART_MANAGED = ("LEVIT_HTTP_PORT", "LEVIT_GRPC_PORT", "LEVIT_CACHE_DIR", "LEVIT_DRAIN_TIMEOUT_S")
# Constraints that live in validators rather than in field metadata.
SCHEMA_EXTRAS = {
    "LEVIT_DEVICE": {"pattern": r"^(auto|cpu|cuda(:[0-9]+)?)$"},
    "LEVIT_WEIGHTS": {"minLength": 1},
    "LEVIT_HOST": {"minLength": 1},
}


def config_schema(settings_cls) -> dict:
    """The `config` section of values.schema.json, derived from service.settings.Settings."""
    import annotated_types
    from pydantic import ValidationError

    from model.configs import VARIANTS

    bounds = {
        annotated_types.Ge: ("minimum", "ge"),
        annotated_types.Le: ("maximum", "le"),
        annotated_types.Gt: ("exclusiveMinimum", "gt"),
        annotated_types.Lt: ("exclusiveMaximum", "lt"),
    }
    props = {}
    for name, field in settings_cls.model_fields.items():
        env = f"LEVIT_{name.upper()}"
        if env in CHART_MANAGED:
            continue
        prop: dict = {"description": field.description or name.replace("_", " ")}
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal or env == "LEVIT_MODEL":
            values = list(VARIANTS) if env == "LEVIT_MODEL" else list(typing.get_args(annotation))
            for value in list(values):  # spellings a `mode="before"` validator normalises (log level case)
                try:
                    if value.lower() != value and settings_cls(**{name: value.lower()}):
                        values.append(value.lower())
                except ValidationError:
                    pass
            prop |= {"type": ["string", "null"], "enum": [*values, None]}
        else:
            kind = {bool: "boolean", int: "integer", float: "number"}.get(annotation, "string")
            prop["type"] = [kind, "null"]  # null: leave it out of the ConfigMap (server default)
        for meta in field.metadata:
            if type(meta) in bounds:
                key, attr = bounds[type(meta)]
                prop[key] = getattr(meta, attr)
        props[env] = prop | SCHEMA_EXTRAS.get(env, {})
    return {
        "type": "object",
        "additionalProperties": False,
        "description": "LEVIT_* server settings (service.settings.Settings); null = server default. "
        + ", ".join(CHART_MANAGED)
        + " are set by the chart and rejected here.",
        "required": ["LEVIT_MODEL"],
        "properties": props,
    }


def main() -> None:
    """Rewrite the `config` section of values.schema.json from Settings (the rest of the file is kept)."""
    from service.settings import Settings

    path = CHART / "values.schema.json"
    schema = json.loads(path.read_text())
    schema["properties"]["config"] = config_schema(Settings)
    path.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
