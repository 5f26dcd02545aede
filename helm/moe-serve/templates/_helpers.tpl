{{/* Names and labels shared by every object of the release. */}}
{{- define "moe-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moe-serve.serveServiceName" -}}
{{- printf "%s-serve" (include "moe-serve.fullname" .) -}}
{{- end -}}

{{- define "moe-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "moe-serve.labels" -}}
{{ include "moe-serve.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "moe-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/*
Refuse value sets that render a valid RayService whose shards could never all be scheduled (Ray
would leave them pending forever, and the RayService would never turn ready).
*/}}
{{- define "moe-serve.validate" -}}
{{- $s := .Values.shards -}}
{{- $w := .Values.workers -}}
{{- if and (gt (int $s.count) 0) (gt (float64 $s.gpusPerShard) (float64 $w.gpus)) -}}
{{- fail (printf "shards.gpusPerShard (%v) exceeds workers.gpus (%v): no worker could hold a shard" $s.gpusPerShard $w.gpus) -}}
{{- end -}}
{{- if and $s.onePerWorker (gt (int $s.count) (int $w.replicas)) -}}
{{- fail (printf "shards.count (%d) > workers.replicas (%d): with shards.onePerWorker each shard needs a worker pod of its own" (int $s.count) (int $w.replicas)) -}}
{{- end -}}
{{- if and (not $s.onePerWorker) (gt (float64 $s.gpusPerShard) 0.0) -}}
{{- $perPod := floor (divf $w.gpus $s.gpusPerShard) -}}
{{- if gt (float64 $s.count) (mulf $perPod $w.replicas) -}}
{{- fail (printf "shards.count (%d) needs more GPUs than workers.replicas (%d) x workers.gpus (%v) provide" (int $s.count) (int $w.replicas) $w.gpus) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The Serve config (serveConfigV2): one application built by serve_app's build_app. */}}
{{- define "moe-serve.serveConfig" -}}
{{- $args := dict "expert_shards" (int .Values.shards.count) "shard_num_gpus" .Values.shards.gpusPerShard "dtype" .Values.model.dtype -}}
{{- with .Values.model.path }}{{ $_ := set $args "model" . }}{{ end -}}
{{- with .Values.model.servedName }}{{ $_ := set $args "served_model_name" . }}{{ end -}}
{{- with .Values.shards.placement }}{{ $_ := set $args "placement" . }}{{ end -}}
{{- if .Values.shards.onePerWorker }}{{ $_ := set $args "shard_resources" (dict "moe_expert_slot" 1) }}{{ end -}}
{{- with .Values.engine }}{{ $_ := set $args "engine" . }}{{ end -}}
{{- with .Values.precision }}
{{- $_ := set $args "quantized_precisions" .quantized -}}
{{- $_ := set $args "int4_group_size" (int .int4GroupSize) -}}
{{- $_ := set $args "fast_lane_kv_fraction" .fastLaneKvFraction -}}
{{- $_ := set $args "full_lane_max_defer_s" .fullLaneMaxDeferS -}}
{{- end -}}
{{- range $key, $value := .Values.app }}{{ $_ := set $args $key $value }}{{ end -}}
{{- $onHead := dict "moe_head" 1 -}}
{{- $router := dict "num_cpus" .Values.head.routerCpus "resources" $onHead -}}
{{- $routerGpus := .Values.head.gpus -}}
{{- if eq .Values.router.placement "gpuWorker" -}}
{{- $routerGpus = .Values.router.gpuWorker.gpus -}}
{{- $router = dict "num_cpus" .Values.head.routerCpus "num_gpus" $routerGpus "resources" (dict "moe_router" 1) -}}
{{- end -}}
{{- $_ := set $args "router_num_gpus" $routerGpus -}}
{{- $deployments := list
      (dict "name" "Ingress" "ray_actor_options" (dict "num_cpus" .Values.head.ingressCpus "resources" $onHead))
      (dict "name" "Router" "ray_actor_options" $router) -}}
{{- $app := dict "name" "moe-serve" "route_prefix" "/" "import_path" "serve_app.deployments.app:build_app" "args" $args "deployments" $deployments -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Ray's --resources flag value, in the quoting KubeRay's rayStartParams expect. */}}
{{- define "moe-serve.rayResources" -}}
{{- printf "%q" (toJson .) | squote -}}
{{- end -}}

{{/* Environment shared by head and workers: API keys from the Secret, then the user's extras. */}}
{{- define "moe-serve.env" -}}
{{- if .Values.apiKeys.existingSecret }}
- name: MOE_SERVE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ .Values.apiKeys.existingSecret }}
      key: {{ .Values.apiKeys.secretKey }}
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of a Ray pod: /dev/shm for the object store, and the model when it lives on a volume. */}}
{{- define "moe-serve.volumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- with .root.Values.model.volume }}
- name: model
{{ toYaml . | indent 2 }}
{{- end }}
{{- end -}}

{{- define "moe-serve.volumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* requests/limits with nvidia.com/gpu added to both when the group has GPUs. */}}
{{- define "moe-serve.resources" -}}
{{- $res := deepCopy .resources -}}
{{- if gt (float64 .gpus) 0.0 -}}
{{- $gpu := dict "nvidia.com/gpu" (int .gpus) -}}
{{- $_ := set $res "requests" (merge (get $res "requests" | default (dict)) $gpu) -}}
{{- $_ := set $res "limits" (merge (get $res "limits" | default (dict)) $gpu) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* One Ray worker group: .root (the chart), .w (its values), .component (pod label), .rayResources
   (custom Ray resources its pods advertise, or nil) and .why (the comment on them). */}}
{{- define "moe-serve.workerGroup" -}}
- groupName: {{ .w.groupName }}
  replicas: {{ int .w.replicas }}
  minReplicas: {{ int .w.replicas }}
  maxReplicas: {{ int .w.replicas }}
  rayStartParams:
    metrics-export-port: {{ .root.Values.metrics.port | int | quote }}
    {{- with .rayResources }}
    # {{ $.why }}
    resources: {{ include "moe-serve.rayResources" . }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "moe-serve.selectorLabels" .root | nindent 8 }}
        app.kubernetes.io/component: {{ .component }}
      {{- with .w.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- with .root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-worker
          image: {{ include "moe-serve.image" .root }}
          imagePullPolicy: {{ .root.Values.image.pullPolicy }}
          ports:
            - {name: serve, containerPort: 8000}
            - {name: metrics, containerPort: {{ int .root.Values.metrics.port }}}
          resources:
            {{- include "moe-serve.resources" .w | nindent 12 }}
          {{- with (include "moe-serve.env" .root | trim) }}
          env:
            {{- . | nindent 12 }}
          {{- end }}
          volumeMounts:
            {{- include "moe-serve.volumeMounts" .root | nindent 12 }}
      volumes:
        {{- include "moe-serve.volumes" (dict "root" .root "shmSize" .w.shmSize) | nindent 8 }}
      {{- with .w.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .w.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .w.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end -}}
