{{/* Chart name, truncated to the 63 characters DNS labels allow. */}}
{{- define "levit-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already contains the chart name. */}}
{{- define "levit-serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "levit-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "levit-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "levit-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "levit-serve.labels" -}}
helm.sh/chart: {{ include "levit-serve.chart" . }}
{{ include "levit-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: levit-serve
{{- end }}

{{- define "levit-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "levit-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the GPU image defaults to "<appVersion>-gpu". */}}
{{- define "levit-serve.image" -}}
{{- $img := .Values.image }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- $tag := $img.tag }}
{{- if not $tag }}
{{- $tag = ternary (default (printf "%s-gpu" .Chart.AppVersion) .Values.gpu.imageTag) .Chart.AppVersion .Values.gpu.enabled }}
{{- end }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/* LEVIT_CACHE_DIR for the chosen weights source. */}}
{{- define "levit-serve.cacheDir" -}}
{{- if eq .Values.weights.source "image" }}
{{- .Values.weights.imageDir }}
{{- else }}
{{- .Values.weights.mountPath }}
{{- end }}
{{- end }}

{{/* Whether an init container downloads the weights before the server starts. */}}
{{- define "levit-serve.downloadWeights" -}}
{{- if or (eq .Values.weights.source "initContainer") (and (eq .Values.weights.source "pvc") .Values.weights.pvc.download) }}true{{- end }}
{{- end }}

{{- define "levit-serve.pvcName" -}}
{{- default (printf "%s-weights" (include "levit-serve.fullname" .)) .Values.weights.pvc.existingClaim }}
{{- end }}

{{/* Effective LEVIT_DEVICE: gpu.enabled turns cpu/auto into cuda. */}}
{{- define "levit-serve.device" -}}
{{- $device := toString (default "auto" .Values.config.LEVIT_DEVICE) }}
{{- if and .Values.gpu.enabled (not (hasPrefix "cuda" $device)) }}
{{- $device = "cuda" }}
{{- end }}
{{- $device }}
{{- end }}

{{/*
A value as an env string. Helm parses numbers in values files as float64, so 20971520 would print as
"2.097152e+07"; integral floats are printed as integers, everything else as is.
*/}}
{{- define "levit-serve.envValue" -}}
{{- $v := . }}
{{- if and (kindIs "float64" $v) (eq $v (floor $v)) }}
{{- int64 $v }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* Cross-field checks that a JSON schema cannot express; fail early with a readable message. */}}
{{- define "levit-serve.validate" -}}
{{- $lc := .Values.lifecycle }}
{{- if le (float64 $lc.terminationGracePeriodSeconds) (addf $lc.preStopSleepSeconds $lc.drainTimeoutSeconds) }}
{{- fail (printf "lifecycle.terminationGracePeriodSeconds (%v) must be greater than preStopSleepSeconds (%v) + drainTimeoutSeconds (%v), or the kubelet kills the pod mid-drain" $lc.terminationGracePeriodSeconds $lc.preStopSleepSeconds $lc.drainTimeoutSeconds) }}
{{- end }}
{{- $device := include "levit-serve.device" . }}
{{- if and (hasPrefix "cuda" $device) (not .Values.gpu.enabled) }}
{{- fail (printf "config.LEVIT_DEVICE=%s needs gpu.enabled=true (GPU resource limit + the GPU image)" $device) }}
{{- end }}
{{- if and (not .Values.gpu.enabled) (eq (toString .Values.config.LEVIT_DTYPE) "float16") }}
{{- fail "config.LEVIT_DTYPE=float16 is GPU-only; use float32 (or bfloat16 on nodes whose CPUs have AMX), or set gpu.enabled=true" }}
{{- end }}
{{- if eq .Values.ports.http .Values.ports.grpc }}
{{- fail "ports.http and ports.grpc must differ" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if and (not .Values.autoscaling.podMetrics) (not .Values.autoscaling.targetCPUUtilizationPercentage) }}
{{- fail "autoscaling.enabled needs at least one of autoscaling.podMetrics / autoscaling.targetCPUUtilizationPercentage" }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.autoscaling.targetCPUUtilizationPercentage (not (dig "requests" "cpu" "" .Values.resources)) }}
{{- fail "autoscaling.targetCPUUtilizationPercentage needs resources.requests.cpu (utilization is relative to requests)" }}
{{- end }}
{{- end }}
{{- $pdb := .Values.podDisruptionBudget }}
{{- if and $pdb.enabled (kindIs "invalid" $pdb.maxUnavailable) (or (kindIs "invalid" $pdb.minAvailable) (eq (toString $pdb.minAvailable) "")) }}
{{- fail "podDisruptionBudget.enabled needs maxUnavailable or minAvailable" }}
{{- end }}
{{- if and (eq .Values.weights.source "pvc") .Values.weights.pvc.readOnly .Values.weights.pvc.download }}
{{- fail "weights.pvc.readOnly=true cannot be combined with weights.pvc.download=true" }}
{{- end }}
{{- end }}

{{/* The security context every container of the chart runs with. */}}
{{- define "levit-serve.containerSecurityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}
