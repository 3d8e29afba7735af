{{/*
One KubeRay worker group (an item of workerGroupSpecs).
Call with: dict "ctx" $ "name" <group name> "group" <values of workerGroups.<name>>
GPUs, extended resources (RDMA devices) and hugepages go into requests and limits alike:
Kubernetes requires that for extended resources and hugepages.
*/}}
{{- define "gazsi.workerGroup" -}}
{{- $ctx := .ctx }}
{{- $g := .group }}
{{- $edgeTLS := include "gazsi.groupEdgeTLS" . }}
{{- $res := deepCopy ($g.resources | default dict) }}
{{- $req := $res.requests | default dict }}
{{- $lim := $res.limits | default dict }}
{{- if gt (int $g.gpus) 0 }}
{{- $_ := set $req "nvidia.com/gpu" (int $g.gpus) }}
{{- $_ := set $lim "nvidia.com/gpu" (int $g.gpus) }}
{{- end }}
{{- range $k, $v := $g.extraResources }}
{{- $_ := set $req $k $v }}
{{- $_ := set $lim $k $v }}
{{- end }}
{{- with $g.hugepages2Mi }}
{{- $_ := set $req "hugepages-2Mi" . }}
{{- $_ := set $lim "hugepages-2Mi" . }}
{{- end }}
{{- $_ := set $res "requests" $req }}
{{- $_ := set $res "limits" $lim }}
{{- $sc := deepCopy $ctx.Values.securityContext }}
{{- with $g.capabilities }}
{{- $caps := $sc.capabilities | default dict }}
{{- $_ := set $caps "add" . }}
{{- $_ := set $sc "capabilities" $caps }}
{{- end }}
- groupName: {{ .name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  {{- if $ctx.Values.autoscaling.enabled }}
  idleTimeoutSeconds: {{ $ctx.Values.autoscaling.idleTimeoutSeconds }}
  {{- end }}
  rayStartParams:
    num-gpus: {{ $g.gpus | quote }}
    metrics-export-port: {{ $ctx.Values.metrics.port | quote }}
    {{- with $g.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "gazsi.labels" $ctx | nindent 8 }}
        app.kubernetes.io/component: worker
        gazsi.io/worker-group: {{ .name }}
        # What this group's edges serve on edge.port: the edge Services select on it.
        gazsi.io/edge-scheme: {{ include "gazsi.edgeScheme" . }}
      {{- with $g.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      containers:
        - name: ray-worker
          image: {{ include "gazsi.image" $ctx }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          securityContext:
            {{- toYaml $sc | nindent 12 }}
          ports:
            - name: serve
              containerPort: {{ $ctx.Values.serve.port }}
            - name: edge
              containerPort: {{ $ctx.Values.edge.port }}
            - name: metrics
              containerPort: {{ $ctx.Values.metrics.port }}
          env:
            - name: GAZSI_EDGE__DATAPLANE
              value: {{ $g.dataplane | quote }}
            # No direct gateway listener on workers: with gateway.direct the gateways run on the head only;
            # without it a gateway placed here serves through Serve's proxy and leaves metrics.port alone.
            - name: GAZSI_GATEWAY__PORT
              value: "0"
            {{- include "gazsi.env" (dict "ctx" $ctx "edgeTLS" $edgeTLS) | nindent 12 }}
            {{- with $g.env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          resources:
            {{- toYaml $res | nindent 12 }}
          volumeMounts:
            {{- include "gazsi.rayVolumeMounts" $ctx | nindent 12 }}
            {{- if $g.hugepages2Mi }}
            - name: hugepages
              mountPath: /dev/hugepages
            {{- end }}
      volumes:
        {{- include "gazsi.rayVolumes" $ctx | nindent 8 }}
        {{- if $g.hugepages2Mi }}
        - name: hugepages
          emptyDir:
            medium: HugePages-2Mi
        {{- end }}
      {{- with $g.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $g.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
