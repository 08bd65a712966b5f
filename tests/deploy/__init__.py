"""Static validation of the deployment side: Dockerfiles, compose stack, Prometheus/Grafana, Helm chart.

Real tools do the checking (hadolint, helm, kubernetes-validate, docker-compose, promtool, checkov). They
live in .tools/ and are installed by scripts/ci_deploy_tools.sh, which the `tools` fixture runs first (a
no-op taking milliseconds when everything is there). Nothing is skipped: a missing tool is a failure.

The metric contract of the server is `service.metrics` itself (`support.METRICS` is read from its metric
objects); the dashboard, the prometheus-adapter rules and the HPA may only use those names. The settings
contract is `service.settings.Settings`: every LEVIT_* name used in a Dockerfile, the compose file or the
chart must be one of its fields, with a valid value.

Modules: `support` (paths, tools, contracts, a fake HTTP server), `dockerfile` (Dockerfile and
.dockerignore parsers), `promql` (a PromQL lexer and checker); one test module per subject.
"""
