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

{{/*
mTLS inside the cluster (issue 18): "true" when tls.enabled and tls.internal, else empty.
*/}}
{{- define "gazsi.internalTLS" -}}
{{- if and .Values.tls.enabled .Values.tls.internal }}true{{ end }}
{{- end }}

{{/*
Whether a worker group's edges serve mTLS: "true" or empty. A group without `edgeTLS` counts as true.
Call with: dict "ctx" $ "group" <values of workerGroups.<name>>
*/}}
{{- define "gazsi.groupEdgeTLS" -}}
{{- if and (include "gazsi.internalTLS" .ctx) (ternary .group.edgeTLS true (hasKey .group "edgeTLS")) }}true{{ end }}
{{- end }}

{{/*
The scheme a worker group's edges serve and advertise (edge_node/node.py: https exactly when edge.tls is set).
Call with: dict "ctx" $ "group" <values of workerGroups.<name>>
*/}}
{{- define "gazsi.edgeScheme" -}}
{{- ternary "https" "http" (eq (include "gazsi.groupEdgeTLS" .) "true") }}
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
{{- /* gpu/gpunetio refuse edge.tls at start (their CUDA kernels speak plaintext HTTP) and auto may
resolve to gpunetio: say so now rather than let the replicas crash-loop. */}}
{{- if and $g.enabled (include "gazsi.groupEdgeTLS" (dict "ctx" $ "group" $g)) (has $g.dataplane (list "gpu" "gpunetio" "auto")) }}
{{- fail (printf "workerGroups.%s: dataplane %s cannot serve the edges' mTLS (tls.internal): the gpu and gpunetio data planes answer plaintext HTTP from CUDA kernels (auto may pick gpunetio). Set workerGroups.%s.edgeTLS=false (its edges then serve plain HTTP inside the cluster), dataplane fast, or tls.internal=false" $name $g.dataplane $name) }}
{{- end }}
{{- end }}
{{- include "gazsi.validateGatewayDirect" . }}
{{- include "gazsi.validateOutsideEdges" . }}
{{- include "gazsi.validateCpus" . }}
{{- end }}

{{/*
The custom Ray resource that pins gateway replicas to the pods of the direct listener (the head).
*/}}
{{- define "gazsi.gatewayResource" -}}gazsi_gateway{{- end }}

{{/*
The gateway's direct listener port (GAZSI_GATEWAY__PORT) in the head pod: gateway.direct.port, or 0 when off.
*/}}
{{- define "gazsi.gatewayDirectPort" -}}
{{- ternary (int .Values.gateway.direct.port) 0 .Values.gateway.direct.enabled }}
{{- end }}

{{/*
Issue 14: the direct listener binds gateway.direct.port in the head pod beside Ray's and the chart's
own listeners; refuse any port one of them already holds (one of the two would fail to bind), and a
head rayStartParams.resources that would drop the resource the gateways are pinned with.
*/}}
{{- define "gazsi.validateGatewayDirect" -}}
{{- if .Values.gateway.direct.enabled }}
{{- $port := int .Values.gateway.direct.port }}
{{- $p := .Values.head.rayStartParams | default dict }}
{{- $taken := list
      (list (int (index $p "metrics-export-port" | default .Values.metrics.port)) "metrics.port (Ray's metrics export port)")
      (list (int .Values.serve.port) "serve.port (Serve's HTTP proxy)")
      (list (int .Values.edge.port) "edge.port (the edges' data plane)")
      (list (int (index $p "port" | default 6379)) "Ray's GCS port (head.rayStartParams.port, default 6379)")
      (list (int (index $p "dashboard-port" | default 8265)) "Ray's dashboard port (head.rayStartParams.dashboard-port, default 8265)")
      (list (int (index $p "ray-client-server-port" | default 10001)) "Ray's client server port (head.rayStartParams.ray-client-server-port, default 10001)")
      (list (int (index $p "dashboard-agent-listen-port" | default 52365)) "Ray's dashboard agent port (head.rayStartParams.dashboard-agent-listen-port, default 52365)") }}
{{- /* Each Edge replica of a pod (one per GPU) takes the first free operator port of edge.port + 1 .. + 16 (OPERATOR_PORT_SPAN in edge_node/node.py). */}}
{{- range $i := untilStep 1 17 1 }}
{{- $taken = append $taken (list (add (int $.Values.edge.port) $i) (printf "edge.port + %d (an edge replica's operator app: edge.port + 1 .. + 16)" $i)) }}
{{- end }}
{{- range $t := $taken }}
{{- if eq $port (index $t 0) }}
{{- fail (printf "gateway.direct.port %d collides with %s in the head pod, where every gateway replica binds its direct listener: set gateway.direct.port to a free port (the default is 8090), or gateway.direct.enabled=false" $port (index $t 1)) }}
{{- end }}
{{- end }}
{{- with index $p "resources" }}
{{- if not (contains (include "gazsi.gatewayResource" $) .) }}
{{- fail (printf "head.rayStartParams.resources (%s) replaces the custom Ray resource the chart gives the head so that the gateways (gateway.direct) run there: add \"%s\": 1000 to it, or set gateway.direct.enabled=false" . (include "gazsi.gatewayResource" $)) }}
{{- end }}
{{- end }}
{{- else if and .Values.ingress.enabled (eq .Values.ingress.backend "direct") }}
{{- fail "ingress.backend=direct routes to Service <release>-gateway-direct, which gateway.direct.enabled=false does not render: set ingress.backend=proxy or gateway.direct.enabled=true" }}
{{- end }}
{{- end }}

{{/*
A Kubernetes CPU quantity (8, "8", "500m", 0.5) in millicores; 0 when unset.
*/}}
{{- define "gazsi.cpuMillis" -}}
{{- if or (kindIs "invalid" .) (eq (toString .) "") }}0
{{- else if hasSuffix "m" (toString .) }}{{ trimSuffix "m" (toString .) | int }}
{{- else }}{{ mulf (float64 .) 1000 | ceil | int }}
{{- end }}
{{- end }}

{{/*
The CPUs (in millicores) Ray schedules on in one pod: rayStartParams num-cpus, else what KubeRay
passes as num-cpus, the container's CPU limit rounded up to a whole CPU, else its request.
Call with: dict "params" <rayStartParams> "resources" <container resources>
*/}}
{{- define "gazsi.rayCpuMillis" -}}
{{- $params := .params | default dict }}
{{- $limits := (.resources | default dict).limits | default dict }}
{{- $requests := (.resources | default dict).requests | default dict }}
{{- if hasKey $params "num-cpus" }}{{ include "gazsi.cpuMillis" (index $params "num-cpus") }}
{{- else if $limits.cpu }}{{ mul (ceil (divf (include "gazsi.cpuMillis" $limits.cpu | int) 1000)) 1000 }}
{{- else }}{{ mul (ceil (divf (include "gazsi.cpuMillis" $requests.cpu | int) 1000)) 1000 }}
{{- end }}
{{- end }}

{{- define "gazsi.cpuText" -}}
{{- $m := int . }}{{ if eq (mod $m 1000) 0 }}{{ div $m 1000 }}{{ else }}{{ divf $m 1000 }}{{ end }}
{{- end }}

{{/*
Issue 14: every pod's CPUs hold the replicas Serve puts there, in Ray's CPUs (else the replicas are never
placed) and in the pod's CPU request (else they run on CPUs Kubernetes did not reserve):
  - gpu profile: each worker group's Edge replicas per pod (gpus / Edge num_gpus) x Edge num_cpus, which
    is the node process (2: the engine's threads and the node's loop) plus the fast front's HTTP workers
    (deployments/edge.py sizes them from the reservation: num_cpus - 2);
  - any profile: one Edge replica must fit some Ray pod;
  - gateway.direct: every gateway replica is pinned to the head, so the head holds all of them.
*/}}
{{- define "gazsi.validateCpus" -}}
{{- $cfg := include "gazsi.serveConfig" . | fromYaml }}
{{- $deps := dict }}
{{- range $app := $cfg.applications }}{{ range $d := $app.deployments }}{{ $_ := set $deps $d.name $d }}{{ end }}{{ end }}
{{- $edge := index $deps "Edge" | default dict }}
{{- $edgeOpts := $edge.ray_actor_options | default dict }}
{{- $edgeCpus := int (mulf (float64 (ternary 1 $edgeOpts.num_cpus (kindIs "invalid" $edgeOpts.num_cpus))) 1000) }}
{{- $edgeGpus := float64 ($edgeOpts.num_gpus | default 0) }}
{{- $headRay := include "gazsi.rayCpuMillis" (dict "params" .Values.head.rayStartParams "resources" .Values.head.resources) | int }}
{{- $best := $headRay }}
{{- range $name, $g := .Values.workerGroups }}
{{- if $g.enabled }}
{{- $ray := include "gazsi.rayCpuMillis" (dict "params" $g.rayStartParams "resources" $g.resources) | int }}
{{- $req := include "gazsi.cpuMillis" (($g.resources | default dict).requests | default dict).cpu | int }}
{{- $best = max $best $ray }}
{{- if and (gt $edgeGpus 0.0) (gt (int $g.gpus) 0) }}
{{- $per := int (floor (divf (int $g.gpus) $edgeGpus)) }}
{{- $need := mul $per $edgeCpus }}
{{- $why := printf "its %d Edge replica(s) per pod (gpus %d / Edge num_gpus %v) reserve %s CPUs (Edge num_cpus %s: 2 for the node process, the rest the fast front's HTTP workers)" $per (int $g.gpus) $edgeGpus (include "gazsi.cpuText" $need) (include "gazsi.cpuText" $edgeCpus) }}
{{- if lt $ray $need }}
{{- fail (printf "workerGroups.%s: %s, but the pod gives Ray %s CPUs (rayStartParams num-cpus, else resources.limits.cpu, else resources.requests.cpu), so Serve could never place them: raise workerGroups.%s.resources (requests and limits) to at least %s CPUs plus room for Ray's own processes, or lower serve.edge.numCpus" $name $why (include "gazsi.cpuText" $ray) $name (include "gazsi.cpuText" $need)) }}
{{- end }}
{{- if lt $req $need }}
{{- fail (printf "workerGroups.%s: %s, but resources.requests.cpu is only %s, so they would run on CPUs Kubernetes did not reserve: raise workerGroups.%s.resources.requests.cpu to at least %s (plus room for Ray's own processes), or lower serve.edge.numCpus" $name $why (include "gazsi.cpuText" $req) $name (include "gazsi.cpuText" $need)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $edge (lt $best $edgeCpus) }}
{{- fail (printf "no Ray pod has the %s CPUs one Edge replica reserves (Edge num_cpus): the largest gives Ray %s; raise a worker group's (or the head's) CPUs, or lower serve.edge.numCpus" (include "gazsi.cpuText" $edgeCpus) (include "gazsi.cpuText" $best)) }}
{{- end }}
{{- if .Values.gateway.direct.enabled }}
{{- $gw := index $deps "Gateway" | default dict }}
{{- $gwOpts := $gw.ray_actor_options | default dict }}
{{- $gwCpus := int (mulf (float64 (ternary 1 $gwOpts.num_cpus (kindIs "invalid" $gwOpts.num_cpus))) 1000) }}
{{- $gwReplicas := int (ternary (($gw.autoscaling_config | default dict).max_replicas | default 1) ($gw.num_replicas | default 1) (hasKey $gw "autoscaling_config")) }}
{{- $need := mul $gwReplicas $gwCpus }}
{{- $headReq := include "gazsi.cpuMillis" ((.Values.head.resources | default dict).requests | default dict).cpu | int }}
{{- $why := printf "gateway.direct pins all %d gateway replica(s) to the head pod, %s CPUs (Gateway num_cpus %s each)" $gwReplicas (include "gazsi.cpuText" $need) (include "gazsi.cpuText" $gwCpus) }}
{{- if lt $headRay $need }}
{{- fail (printf "%s, but the head gives Ray %s CPUs (head.rayStartParams num-cpus, else head.resources.limits.cpu, else the request): raise head.resources, or lower serve.gateway.numReplicas / numCpus" $why (include "gazsi.cpuText" $headRay)) }}
{{- end }}
{{- if lt $headReq $need }}
{{- fail (printf "%s, but head.resources.requests.cpu is only %s: raise it to at least %s, or lower serve.gateway.numReplicas / numCpus" $why (include "gazsi.cpuText" $headReq) (include "gazsi.cpuText" $need)) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
GAZSI_* settings every Ray container gets (gazsi_cluster/config.py: nested fields joined by `__`).
The URLs are composed with Kubernetes' $(VAR) expansion so passwords stay in Secrets.
Call with: dict "ctx" $ "edgeTLS" <whether this pod's edges serve mTLS>
*/}}
{{- define "gazsi.env" -}}
{{- $edgeTLS := .edgeTLS }}
{{- with .ctx }}
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
{{- if include "gazsi.outsideEdges" . }}
{{- include "gazsi.outsideControlPlaneEnv" . | nindent 0 }}
{{- else }}
- name: GAZSI_CONTROL_PLANE__JOIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "gazsi.joinTokenSecret" . }}
      key: join-token
{{- end }}
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
{{- include "gazsi.internalTLSEnv" (dict "ctx" . "server" $edgeTLS) }}
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
{{- end }}

{{/*
mTLS inside the cluster (issue 18), from the one certificate every Ray pod mounts (serverAuth and
clientAuth) and the cluster CA. Every pod gets the client side, since a gateway replica
(gateway.edge_tls) or a forwarding edge (edge.peer_tls) may run on any of them. check_hostname is
false because edges advertise their pod IP, which no certificate names; the chain is still verified
against the cluster CA, the only CA these clients trust. The server side (edge.tls, client
certificates required) only where the pod's edges can serve TLS.
Call with: dict "ctx" $ "server" <bool>
*/}}
{{- define "gazsi.internalTLSEnv" -}}
{{- if include "gazsi.internalTLS" .ctx }}
{{- range $client := list "GAZSI_GATEWAY__EDGE_TLS" "GAZSI_EDGE__PEER_TLS" }}
- name: {{ $client }}__CA_FILE
  value: /etc/gazsi/tls/ca.crt
- name: {{ $client }}__CERTFILE
  value: /etc/gazsi/tls/tls.crt
- name: {{ $client }}__KEYFILE
  value: /etc/gazsi/tls/tls.key
- name: {{ $client }}__CHECK_HOSTNAME
  value: "false"
{{- end }}
{{- if .server }}
- name: GAZSI_EDGE__TLS__CERTFILE
  value: /etc/gazsi/tls/tls.crt
- name: GAZSI_EDGE__TLS__KEYFILE
  value: /etc/gazsi/tls/tls.key
- name: GAZSI_EDGE__TLS__CLIENT_CA_FILE
  value: /etc/gazsi/tls/ca.crt
- name: GAZSI_EDGE__TLS__REQUIRE_CLIENT_CERT
  value: "true"
{{- end }}
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
    # Not ca.key (the generated Secret holds it): only the head's control plane signs, see gazsi.headVolumes.
    items:
      - key: ca.crt
        path: ca.crt
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- if include "gazsi.outsideEdges" . }}
- name: join-token
  secret:
    secretName: {{ include "gazsi.joinTokenSecret" . }}
    defaultMode: 0440
    items:
      - key: join-token
        path: join-token
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
{{- if include "gazsi.outsideEdges" . }}
- name: join-token
  mountPath: /etc/gazsi/join
  readOnly: true
{{- end }}
{{- end }}

{{/*
Edges outside the cluster (issue 17, outsideEdges): "true" when enabled, else empty.
*/}}
{{- define "gazsi.outsideEdges" -}}
{{- if .Values.outsideEdges.enabled }}true{{ end }}
{{- end }}

{{- define "gazsi.tunnelSecret" -}}
{{- .Values.outsideEdges.tunnel.existingSecret | default (printf "%s-tunnel-tls" (include "gazsi.fullname" .)) }}
{{- end }}

{{/*
The names in the tunnel listener's certificate, split as x509 wants them (JSON lists): outsideEdges.hosts that
parse as IP addresses, and the DNS names (plus the tunnel Service's in-cluster names and loopback).
*/}}
{{- define "gazsi.outsideIPs" -}}
{{- $ips := list "127.0.0.1" }}
{{- range $h := .Values.outsideEdges.hosts }}
{{- if or (regexMatch "^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$" $h) (contains ":" $h) }}{{ $ips = append $ips $h }}{{ end }}
{{- end }}
{{- toJson (uniq $ips) }}
{{- end }}

{{- define "gazsi.outsideDNS" -}}
{{- $fullname := include "gazsi.fullname" . }}
{{- $dns := list }}
{{- range $h := .Values.outsideEdges.hosts }}
{{- if not (or (regexMatch "^[0-9]+\\.[0-9]+\\.[0-9]+\\.[0-9]+$" $h) (contains ":" $h)) }}{{ $dns = append $dns $h }}{{ end }}
{{- end }}
{{- $dns = concat $dns (list (printf "%s-tunnel" $fullname) (printf "%s-tunnel.%s.svc" $fullname .Release.Namespace) "localhost") }}
{{- toJson (uniq $dns) }}
{{- end }}

{{/*
outsideEdges needs the cluster CA (tls.enabled), the gateways pinned to the head (gateway.direct.enabled: the
tunnel Service selects the head pod) and the addresses edges dial (hosts, for the certificates).
*/}}
{{- define "gazsi.validateOutsideEdges" -}}
{{- if include "gazsi.outsideEdges" . }}
{{- $o := .Values.outsideEdges }}
{{- if not .Values.tls.enabled }}
{{- fail "outsideEdges.enabled needs tls.enabled: the join API, node certificates and the tunnel listener use the cluster CA" }}
{{- end }}
{{- if not .Values.gateway.direct.enabled }}
{{- fail "outsideEdges.enabled needs gateway.direct.enabled: it pins the gateways (and their tunnel listeners) and the control plane actor to the head pod, which the control-plane and tunnel Services select" }}
{{- end }}
{{- if not $o.hosts }}
{{- fail "outsideEdges.enabled needs outsideEdges.hosts: the DNS names or IPs edges outside dial (a LoadBalancer's address, a node's IP for NodePort); the certificates must name them" }}
{{- end }}
{{- if and .Values.tls.existingSecret (not $o.tunnel.existingSecret) }}
{{- fail "outsideEdges with tls.existingSecret needs outsideEdges.tunnel.existingSecret (a tls.crt/tls.key signed by that CA): the chart cannot sign with a CA it did not make" }}
{{- end }}
{{- $ports := dict "gateway.direct.port" (int .Values.gateway.direct.port) "serve.port" (int .Values.serve.port) "metrics.port" (int .Values.metrics.port) "edge.port" (int .Values.edge.port) }}
{{- range $what, $port := dict "outsideEdges.controlPlane.port" (int $o.controlPlane.port) "outsideEdges.tunnel.port" (int $o.tunnel.port) }}
{{- range $other, $p := $ports }}
{{- if eq $port $p }}
{{- fail (printf "%s %d collides with %s in the head pod: choose another port" $what $port $other) }}
{{- end }}
{{- end }}
{{- end }}
{{- if eq (int $o.controlPlane.port) (int $o.tunnel.port) }}
{{- fail "outsideEdges.controlPlane.port and outsideEdges.tunnel.port must differ" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Control plane settings every Ray pod gets with outsideEdges (the control plane actor takes the settings of
whichever replica creates it, gateway or edge), as `gazsi up` sets them (gazsi_cli/outside.py): the HTTPS API
on 0.0.0.0:<port> with the outside names in its certificate, pinned to the head (where its Service points)
by the gateways' custom Ray resource, and the join token as a file.
*/}}
{{- define "gazsi.outsideControlPlaneEnv" -}}
- name: GAZSI_CONTROL_PLANE__SERVE_HTTPS
  value: "true"
- name: GAZSI_CONTROL_PLANE__HOST
  value: "0.0.0.0"
- name: GAZSI_CONTROL_PLANE__PORT
  value: {{ .Values.outsideEdges.controlPlane.port | quote }}
- name: GAZSI_CONTROL_PLANE__SERVER_HOSTS
  value: {{ concat .Values.outsideEdges.hosts (list (printf "%s-control-plane" (include "gazsi.fullname" .)) (printf "%s-control-plane.%s.svc" (include "gazsi.fullname" .) .Release.Namespace)) | uniq | toJson | quote }}
- name: GAZSI_CONTROL_PLANE__RAY_RESOURCES
  value: {{ dict (include "gazsi.gatewayResource" .) 1 | toJson | quote }}
- name: GAZSI_CONTROL_PLANE__JOIN_TOKEN_FILE
  value: /etc/gazsi/join/join-token
{{- end }}

{{/*
The head's gateways: the reverse-tunnel listener (gateway.tunnel_*), as `gazsi up` sets it.
*/}}
{{- define "gazsi.tunnelEnv" -}}
{{- if include "gazsi.outsideEdges" . }}
- name: GAZSI_GATEWAY__TUNNEL_HOST
  value: "0.0.0.0"
- name: GAZSI_GATEWAY__TUNNEL_PORT
  value: {{ .Values.outsideEdges.tunnel.port | quote }}
- name: GAZSI_GATEWAY__TUNNEL_TLS__CERTFILE
  value: /etc/gazsi/tunnel/tls.crt
- name: GAZSI_GATEWAY__TUNNEL_TLS__KEYFILE
  value: /etc/gazsi/tunnel/tls.key
- name: GAZSI_GATEWAY__TUNNEL_TLS__CLIENT_CA_FILE
  value: /etc/gazsi/tls/ca.crt
- name: GAZSI_GATEWAY__TUNNEL_TLS__REQUIRE_CLIENT_CERT
  value: "true"
{{- end }}
{{- end }}

{{/*
Head-only volumes with outsideEdges: the cluster CA with its key (copied into the data dir by an init
container, where control_plane/ca.py loads it and writes the HTTPS API's certificate beside it) and the
tunnel listener's certificate.
*/}}
{{- define "gazsi.headVolumes" -}}
{{- if include "gazsi.outsideEdges" . }}
- name: cluster-ca
  secret:
    secretName: {{ include "gazsi.tlsSecret" . }}
    defaultMode: 0440
    items:
      - key: ca.crt
        path: ca.crt
      - key: ca.key
        path: ca.key
- name: tunnel-tls
  secret:
    secretName: {{ include "gazsi.tunnelSecret" . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "gazsi.headVolumeMounts" -}}
{{- if include "gazsi.outsideEdges" . }}
- name: tunnel-tls
  mountPath: /etc/gazsi/tunnel
  readOnly: true
{{- end }}
{{- end }}

{{- define "gazsi.headInitContainers" -}}
{{- if include "gazsi.outsideEdges" . }}
# The control plane loads <data dir>/ca/ca.{crt,key} and writes its server certificate there, so the
# directory must be writable: a copy on the data emptyDir, not the read-only Secret mount.
- name: cluster-ca
  image: {{ include "gazsi.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  command: ["sh", "-c", "install -d -m 0700 /data/gazsi/ca && install -m 0644 /etc/gazsi/cluster-ca/ca.crt /data/gazsi/ca/ca.crt && install -m 0600 /etc/gazsi/cluster-ca/ca.key /data/gazsi/ca/ca.key"]
  volumeMounts:
    - name: data
      mountPath: /data
    - name: cluster-ca
      mountPath: /etc/gazsi/cluster-ca
      readOnly: true
{{- end }}
{{- end }}
