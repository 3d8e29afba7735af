{{/*
The RayService's serveConfigV2: deployments/<profile>.yaml (read through the symlinks in
files/serve/, so the chart and `serve deploy deployments/*.yaml` share one file) with the chart's
overrides applied on top:
  - http_options.host is 0.0.0.0 (a pod must accept traffic from its Service), port = serve.port;
  - proxy_location = serve.proxyLocation when set;
  - per deployment (Gateway <- serve.gateway, Edge <- serve.edge): num_replicas,
    max_ongoing_requests, ray_actor_options.num_cpus / num_gpus, user_config deep-merged;
  - gateway.direct.enabled: Gateway.ray_actor_options.resources.gazsi_gateway = 1, a custom Ray resource
    only the head pod has, so every gateway replica (and its direct listener) runs where
    Service <release>-gateway-direct sends traffic;
  - Edge.num_replicas, when not set, is one replica per `num_gpus` of the enabled worker groups
    (gpu profile); with autoscaling on it becomes Serve autoscaling over the same GPU range.
tests/helm/test_serve_config.py re-applies these rules in Python and compares.
*/}}
{{- define "gazsi.serveConfig" -}}
{{- $v := .Values.serve }}
{{- $path := printf "files/serve/%s.yaml" $v.profile }}
{{- $raw := .Files.Get $path }}
{{- if not $raw }}
{{- fail (printf "serve.profile %q: %s is not in the chart" $v.profile $path) }}
{{- end }}
{{- $cfg := fromYaml $raw }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "%s is not valid YAML: %s" $path $cfg.Error) }}
{{- end }}
{{- $http := $cfg.http_options | default dict }}
{{- $_ := set $http "host" "0.0.0.0" }}
{{- $_ := set $http "port" (int $v.port) }}
{{- $_ := set $cfg "http_options" $http }}
{{- with $v.proxyLocation }}
{{- $_ := set $cfg "proxy_location" . }}
{{- end }}
{{- /* GPUs the enabled worker groups bring: now, at least and at most. */}}
{{- $gpus := 0 }}
{{- $gpusMin := 0 }}
{{- $gpusMax := 0 }}
{{- range $name, $g := $.Values.workerGroups }}
{{- if $g.enabled }}
{{- $gpus = add $gpus (mul (int $g.replicas) (int $g.gpus)) }}
{{- $gpusMin = add $gpusMin (mul (int $g.minReplicas) (int $g.gpus)) }}
{{- $gpusMax = add $gpusMax (mul (int $g.maxReplicas) (int $g.gpus)) }}
{{- end }}
{{- end }}
{{- range $app := $cfg.applications }}
{{- range $d := $app.deployments }}
{{- $o := dict }}
{{- if eq $d.name "Gateway" }}{{ $o = $v.gateway }}{{ else if eq $d.name "Edge" }}{{ $o = $v.edge }}{{ end }}
{{- if not (kindIs "invalid" $o.numReplicas) }}
{{- $_ := set $d "num_replicas" (int $o.numReplicas) }}
{{- end }}
{{- if not (kindIs "invalid" $o.maxOngoingRequests) }}
{{- $_ := set $d "max_ongoing_requests" (int $o.maxOngoingRequests) }}
{{- end }}
{{- $opts := $d.ray_actor_options | default dict }}
{{- if not (kindIs "invalid" $o.numCpus) }}
{{- $_ := set $opts "num_cpus" $o.numCpus }}
{{- end }}
{{- if not (kindIs "invalid" $o.numGpus) }}
{{- $_ := set $opts "num_gpus" $o.numGpus }}
{{- end }}
{{- if and (eq $d.name "Gateway") $.Values.gateway.direct.enabled }}
{{- /* Pinned to the pods behind <release>-gateway-direct (the head): see gazsi.gatewayResource. */}}
{{- $_ := set $opts "resources" (merge (dict (include "gazsi.gatewayResource" $) 1) ($opts.resources | default dict)) }}
{{- end }}
{{- if $opts }}
{{- $_ := set $d "ray_actor_options" $opts }}
{{- end }}
{{- with $o.userConfig }}
{{- $_ := set $d "user_config" (mergeOverwrite ($d.user_config | default dict) (deepCopy .)) }}
{{- end }}
{{- $perReplica := float64 ($opts.num_gpus | default 0) }}
{{- if and (eq $d.name "Edge") (kindIs "invalid" $o.numReplicas) (eq $v.profile "gpu") (gt $perReplica 0.0) (gt $gpus 0) }}
{{- if $.Values.autoscaling.enabled }}
{{- $_ := unset $d "num_replicas" }}
{{- $_ := set $d "autoscaling_config" (dict
      "min_replicas" (max 1 (int (floor (divf $gpusMin $perReplica))))
      "initial_replicas" (max 1 (int (floor (divf $gpus $perReplica))))
      "max_replicas" (max 1 (int (floor (divf $gpusMax $perReplica))))
      "target_ongoing_requests" (int $.Values.autoscaling.targetOngoingRequests)) }}
{{- else }}
{{- $_ := set $d "num_replicas" (max 1 (int (floor (divf $gpus $perReplica)))) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}
