{{/*
Names and labels, as in KubeRay's charts.
*/}}
{{- define "gazsi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release + chart name, cut to 40 characters because KubeRay appends suffixes
(-raycluster-xxxxx-head-svc and the like) and Service names must stay within 63.
*/}}
{{- define "gazsi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gazsi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gazsi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gazsi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gazsi.labels" -}}
helm.sh/chart: {{ include "gazsi.chart" . }}
{{ include "gazsi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gazsi-cluster
{{- end }}

{{/*
Image of the Ray pods. The gpu profile defaults to the `-gpu` variant of the Dockerfile.
*/}}
{{- define "gazsi.image" -}}
{{- $suffix := ternary "-gpu" "" (eq .Values.serve.profile "gpu") }}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion $suffix) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
A Secret value that is generated once and then kept: on upgrade the live Secret's value is
reused (lookup), so passwords, the join token and the admin key never change under a running
system. `helm template` and --dry-run cannot look up and render a fresh value.
Call with: dict "ctx" $ "name" <secret name> "key" <data key> "value" <generated plain value>
*/}}
{{- define "gazsi.keptSecretValue" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- .value | b64enc }}
{{- end }}
{{- end }}

{{- define "gazsi.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "gazsi.fullname" .) }}
{{- end }}

{{- define "gazsi.redis.fullname" -}}
{{- printf "%s-redis" (include "gazsi.fullname" .) }}
{{- end }}

{{- define "gazsi.postgresql.passwordSecret" -}}
{{- .Values.postgresql.auth.existingSecret | default (include "gazsi.postgresql.fullname" .) }}
{{- end }}

{{- define "gazsi.redis.passwordSecret" -}}
{{- .Values.redis.auth.existingSecret | default (include "gazsi.redis.fullname" .) }}
{{- end }}

{{- define "gazsi.adminSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-admin" (include "gazsi.fullname" .)) }}
{{- end }}

{{- define "gazsi.joinTokenSecret" -}}
{{- .Values.controlPlane.existingSecret | default (printf "%s-join-token" (include "gazsi.fullname" .)) }}
{{- end }}

{{- define "gazsi.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "gazsi.fullname" .)) }}
{{- end }}

{{- define "gazsi.externalSecret" -}}
{{- printf "%s-external" (include "gazsi.fullname" .) }}
{{- end }}

{{/*
Fail early, with a message that names the value, when an external service is chosen but not given.
*/}}
{{- define "gazsi.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.postgresql.external.url) (not .Values.postgresql.external.existingSecret) }}
{{- fail "postgresql.enabled=false needs postgresql.external.url or postgresql.external.existingSecret" }}
{{- end }}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) }}
{{- fail "redis.enabled=false needs redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- range $name, $g := .Values.workerGroups }}
{{- if and $g.enabled (gt (int $g.minReplicas) (int $g.replicas)) }}
{{- fail (printf "workerGroups.%s: minReplicas (%d) exceeds replicas (%d)" $name (int $g.minReplicas) (int $g.replicas)) }}
{{- end }}
{{- if and $g.enabled (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "workerGroups.%s: replicas (%d) exceeds maxReplicas (%d)" $name (int $g.replicas) (int $g.maxReplicas)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
GAZSI_* settings every Ray container gets (gazsi_cluster/config.py: nested fields joined by `__`).
The URLs are composed with Kubernetes' $(VAR) expansion so passwords stay in Secrets.
*/}}
{{- define "gazsi.env" -}}
- name: GAZSI_DATA_DIR
  value: /data/gazsi
- name: GAZSI_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: GAZSI_EDGE__REGION
  value: {{ .Values.region | quote }}
- name: GAZSI_EDGE__HOST
  value: "0.0.0.0"
- name: GAZSI_EDGE__PORT
  value: {{ .Values.edge.port | quote }}
- name: GAZSI_AUTH__ENABLED
  value: {{ .Values.auth.enabled | quote }}
- name: GAZSI_AUTH__KEY_ENV
  value: {{ .Values.auth.keyEnv | quote }}
- name: GAZSI_AUTH__BOOTSTRAP_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "gazsi.adminSecret" . }}
      key: admin-key
- name: GAZSI_CONTROL_PLANE__JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "gazsi.joinTokenSecret" . }}
      key: join-token
{{- if .Values.postgresql.enabled }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "gazsi.postgresql.passwordSecret" . }}
      key: password
- name: GAZSI_AUTH__DATABASE_URL
  value: {{ printf "postgresql://%s:$(PGPASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "gazsi.postgresql.fullname" .) .Values.postgresql.auth.database | quote }}
{{- else }}
- name: GAZSI_AUTH__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.external.existingSecret | default (include "gazsi.externalSecret" .) }}
      key: {{ ternary .Values.postgresql.external.existingSecretKey "database-url" (ne .Values.postgresql.external.existingSecret "") }}
{{- end }}
# The control plane keeps heartbeat samples and node events in the same database.
- name: GAZSI_CONTROL_PLANE__DATABASE_URL
  value: "$(GAZSI_AUTH__DATABASE_URL)"
{{- if .Values.tls.enabled }}
- name: GAZSI_CONTROL_PLANE__CA_FILE
  value: /etc/gazsi/tls/ca.crt
{{- end }}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "gazsi.redis.passwordSecret" . }}
      key: password
- name: GAZSI_AUTH__REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" (include "gazsi.redis.fullname" .) | quote }}
{{- else }}
- name: GAZSI_AUTH__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret | default (include "gazsi.externalSecret" .) }}
      key: {{ ternary .Values.redis.external.existingSecretKey "redis-url" (ne .Values.redis.external.existingSecret "") }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Volumes every Ray pod mounts: scratch space (the root filesystem may be read-only), Ray's
shared-memory object store, the data dir and the TLS material.
*/}}
{{- define "gazsi.rayVolumes" -}}
- name: tmp
  emptyDir: {}
- name: data
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "gazsi.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "gazsi.rayVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: data
  mountPath: /data
- name: dshm
  mountPath: /dev/shm
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/gazsi/tls
  readOnly: true
{{- end }}
{{- end }}
