{{/* Names, labels and the checks the chart makes on its values. */}}

{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it already contains the chart name. */}}
{{- define "gateway.fullname" -}}
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

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gateway
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gateway.configMapName" -}}
{{- default (printf "%s-config" (include "gateway.fullname" .)) .Values.config.existingConfigMap }}
{{- end }}

{{- define "gateway.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* StatefulSet when the spool is persistent, Deployment otherwise. */}}
{{- define "gateway.workloadKind" -}}
{{- if .Values.spool.persistence.enabled }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* The whole grace period: preStop sleep, then SIGTERM and the drain, then the margin. */}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopSleepSeconds .Values.drainSeconds .Values.terminationGraceMarginSeconds }}
{{- end }}

{{/* A routes.yaml duration (10, "10s", "500ms", "5m", "1h") in seconds, as a float. */}}
{{- define "gateway.durationSeconds" -}}
{{- $v := toString . | trim }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $v }}
{{- $unit := trimPrefix $num $v | trim }}
{{- $factor := dict "" 1.0 "s" 1.0 "ms" 0.001 "m" 60.0 "h" 3600.0 "d" 86400.0 }}
{{- if or (eq $num "") (not (hasKey $factor $unit)) }}
{{- fail (printf "config.routes: gateway.drain %q is not a duration like 10, \"10s\" or \"1m\"" $v) }}
{{- end }}
{{- mulf (float64 $num) (get $factor $unit) }}
{{- end }}

{{/*
Checks a pod needs from routes.yaml, made only when the chart renders routes.yaml itself
(config.existingConfigMap is the user's responsibility).
*/}}
{{- define "gateway.validateRoutes" -}}
{{- if not .Values.config.existingConfigMap }}
{{- $routes := fromYaml .Values.config.routes }}
{{- if hasKey $routes "Error" }}
{{- fail (printf "config.routes is not valid YAML: %s" (get $routes "Error")) }}
{{- end }}
{{- $gw := default (dict) (get $routes "gateway") }}
{{- $admin := default (dict) (get $gw "admin") }}
{{- $listen := toString (default "127.0.0.1:8081" (get $admin "listen")) }}
{{- $host := regexReplaceAll ":[0-9]+$" $listen "" }}
{{- $port := regexFind "[0-9]+$" $listen }}
{{- if or (has $host (list "127.0.0.1" "localhost" "[::1]" "::1")) (ne $port (toString .Values.ports.admin)) }}
{{- fail (printf "config.routes: gateway.admin.listen is %q; in a pod it must be \"0.0.0.0:%v\" (ports.admin) so that probes and Prometheus can reach it" $listen .Values.ports.admin) }}
{{- end }}
{{- /* The gateway's own default drain is 10 s. */}}
{{- $drain := include "gateway.durationSeconds" (default 10 (get $gw "drain")) | float64 }}
{{- if gt $drain (float64 .Values.drainSeconds) }}
{{- fail (printf "config.routes: gateway.drain (%v s) is longer than drainSeconds (%v): the kubelet would kill the pod mid-drain; raise drainSeconds" $drain .Values.drainSeconds) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The MQTT connectors routes.yaml receives from with a persistent session (a route reads `from:`
them and clean_start is not true), comma-separated; "" when there are none. Only meaningful when
the chart renders routes.yaml itself.
*/}}
{{- define "gateway.mqttInboundConnectors" -}}
{{- $routes := fromYaml .Values.config.routes }}
{{- $connectors := default (dict) (get $routes "connectors") }}
{{- $sources := list }}
{{- range (default (list) (get $routes "routes")) }}
{{- $from := get . "from" }}
{{- $sources = concat $sources (kindIs "slice" $from | ternary $from (list $from)) }}
{{- end }}
{{- $found := list }}
{{- range $name, $c := $connectors }}
{{- if and (kindIs "map" $c) (eq (toString (get $c "type")) "mqtt") (has $name $sources) (ne (toString (get $c "clean_start")) "true") }}
{{- $found = append $found $name }}
{{- end }}
{{- end }}
{{- join "," $found }}
{{- end }}

{{/*
Several replicas of MQTT inbound on a Deployment lose messages silently: each rollout gives the
pods new names, so new "${POD_NAME}" client ids, and the persistent session an old pod leaves on
the broker keeps receiving its share of a shared subscription until it expires, when Mosquitto
drops what it queued although the publishers had their PUBACKs. Refuse that unless
mqtt.acceptOrphanedSessionLoss says the user knows better.
*/}}
{{- define "gateway.validateMqttReplicas" -}}
{{- $explicit := .Values.mqtt.inbound }}
{{- $names := "" }}
{{- if not .Values.config.existingConfigMap }}
{{- $names = include "gateway.mqttInboundConnectors" . }}
{{- if and (not (kindIs "invalid" $explicit)) (ne (toString $explicit) (toString (ne $names ""))) }}
{{- if $names }}
{{- fail (printf "mqtt.inbound is false, but config.routes receives over MQTT with a persistent session (connector %s); leave mqtt.inbound unset (null): the chart reads config.routes" $names) }}
{{- else }}
{{- fail "mqtt.inbound is true, but no route in config.routes reads from an MQTT connector with a persistent session; leave mqtt.inbound unset (null): the chart reads config.routes" }}
{{- end }}
{{- end }}
{{- end }}
{{- $several := or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled }}
{{- if and $several (not .Values.spool.persistence.enabled) (not .Values.mqtt.acceptOrphanedSessionLoss) }}
{{- if and .Values.config.existingConfigMap (kindIs "invalid" $explicit) }}
{{- fail "several replicas (replicaCount > 1 or autoscaling.enabled) as a Deployment, and config.existingConfigMap hides routes.yaml from the chart: set mqtt.inbound=false if no route reads from an MQTT connector with a persistent session (clean_start false, the default), or mqtt.inbound=true if one does (see the chart README, \"Scaling\")" }}
{{- end }}
{{- if or $names (and .Values.config.existingConfigMap $explicit) }}
{{- $what := ne $names "" | ternary (printf "config.routes receives over MQTT with a persistent session (%s %s)" (contains "," $names | ternary "connectors" "connector") (replace "," ", " $names)) "routes.yaml receives over MQTT with a persistent session (mqtt.inbound=true)" }}
{{- fail (printf "%s, and several replicas (replicaCount > 1 or autoscaling.enabled) would run as a Deployment: its pods get new names, so new \"${POD_NAME}\" client ids, on every rollout, and the session each old pod leaves on the broker keeps receiving its share of the shared subscription until session_expiry, when Mosquitto drops those messages although the publishers had their PUBACKs. Set spool.persistence.enabled=true (a StatefulSet: stable pod names, each pod resumes its own session and spool), or, if your broker or settings rule this out, mqtt.acceptOrphanedSessionLoss=true (see the chart README, \"Scaling\")" $what) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pod template shared by the Deployment and the StatefulSet. */}}
{{- define "gateway.podTemplate" -}}
metadata:
  labels:
    {{- include "gateway.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /*
  No checksum/config annotation on purpose: routes.yaml is mounted as a directory and the
  gateway reloads it live, so a config change must not roll the pods.
  */}}
  {{- if or .Values.metrics.podAnnotations .Values.podAnnotations }}
  annotations:
    {{- if .Values.metrics.podAnnotations }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ .Values.ports.admin | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  serviceAccountName: {{ include "gateway.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  terminationGracePeriodSeconds: {{ include "gateway.terminationGracePeriodSeconds" . }}
  # Service links would inject variables like GATEWAY_PORT into the environment, where routes.yaml
  # reads "${...}" references and the gateway its GATEWAY_* settings.
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: gateway
      image: {{ include "gateway.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command: ["gateway"]
      args:
        - run
        - --config
        - /etc/gateway/{{ .Values.config.fileName }}
      workingDir: /var/lib/gateway
      env:
        - name: GATEWAY_CONFIG
          value: /etc/gateway/{{ .Values.config.fileName }}
        - name: HOME
          value: /var/lib/gateway
        - name: TMPDIR
          value: /tmp
        # For routes.yaml: per-replica identities, e.g. an MQTT client_id
        # "gateway-${POD_NAMESPACE}-${POD_NAME}" (stable across restarts only in a StatefulSet).
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- with .Values.admin.sessionKeySecret }}
        {{- if .name }}
        # routes.yaml: gateway.admin.session_key: "${ADMIN_SESSION_KEY}", one key for every replica.
        - name: ADMIN_SESSION_KEY
          valueFrom:
            secretKeyRef:
              name: {{ .name }}
              key: {{ .key }}
        {{- end }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if or .Values.envFromSecrets .Values.envFromConfigMaps }}
      envFrom:
        {{- range .Values.envFromConfigMaps }}
        - configMapRef:
            name: {{ . }}
        {{- end }}
        {{- range .Values.envFromSecrets }}
        - secretRef:
            name: {{ . }}
        {{- end }}
      {{- end }}
      ports:
        - name: http
          containerPort: {{ .Values.ports.http }}
          protocol: TCP
        - name: admin
          containerPort: {{ .Values.ports.admin }}
          protocol: TCP
        - name: smtp
          containerPort: {{ .Values.ports.smtp }}
          protocol: TCP
      startupProbe:
        httpGet:
          path: /healthz
          port: admin
        {{- toYaml .Values.startupProbe | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: admin
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: admin
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          # Keep serving until endpoints and load balancers have dropped this pod; SIGTERM
          # (readiness false, listeners stop, drain) follows when the hook returns.
          exec:
            command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        # A directory mount, never subPath: subPath mounts do not receive ConfigMap updates.
        - name: config
          mountPath: /etc/gateway
          readOnly: true
        # The working directory: spool (var/spool.db) and connector state (var/state).
        - name: data
          mountPath: /var/lib/gateway
        - name: tmp
          mountPath: /tmp
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "gateway.configMapName" . }}
    {{- if not .Values.spool.persistence.enabled }}
    - name: data
      {{- if .Values.spool.emptyDirSizeLimit }}
      emptyDir:
        sizeLimit: {{ .Values.spool.emptyDirSizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Replicas the chart may run at the least: autoscaling.minReplicas, or replicaCount. */}}
{{- define "gateway.minReplicas" -}}
{{- if .Values.autoscaling.enabled }}{{ int .Values.autoscaling.minReplicas }}{{ else }}{{ int .Values.replicaCount }}{{ end }}
{{- end }}

{{/*
The data-plane listeners in config.routes against ports.http / ports.smtp and the Service: a
listener on another port than the container's, or on loopback, is unreachable; a Service port
with no listener behind it refuses every connection. Only when the chart renders routes.yaml.
*/}}
{{- define "gateway.validateListeners" -}}
{{- if not .Values.config.existingConfigMap }}
{{- $routes := fromYaml .Values.config.routes }}
{{- $found := dict "http" (list) "smtp" (list) }}
{{- range $name, $c := default (dict) (get $routes "connectors") }}
{{- if kindIs "map" $c }}
{{- $type := toString (get $c "type") }}
{{- $listens := list }}
{{- if and (eq $type "rest") (hasKey $c "listen") }}
{{- $listens = list (list "http" (printf "connectors.%s.listen" $name) (get $c "listen")) }}
{{- else if eq $type "soap" }}
{{- range $part := list "serve" "rest_facade" }}
{{- $section := get $c $part }}
{{- if and (kindIs "map" $section) (hasKey $section "listen") }}
{{- $listens = append $listens (list "http" (printf "connectors.%s.%s.listen" $name $part) (get $section "listen")) }}
{{- end }}
{{- end }}
{{- else if and (eq $type "smtp") (hasKey $c "listen") }}
{{- $listens = list (list "smtp" (printf "connectors.%s.listen" $name) (get $c "listen")) }}
{{- end }}
{{- range $listens }}
{{- $port := index . 0 }}
{{- $where := index . 1 }}
{{- $listen := toString (index . 2) }}
{{- $host := regexReplaceAll ":[0-9]+$" $listen "" }}
{{- $expected := get $.Values.ports $port }}
{{- if or (has $host (list "127.0.0.1" "localhost" "[::1]" "::1")) (ne (regexFind "[0-9]+$" $listen) (toString $expected)) }}
{{- fail (printf "config.routes: %s is %q, but the pod's %s port is ports.%s=%v: the listener must be \"0.0.0.0:%v\" (or change ports.%s) for the Service and its clients to reach it" $where $listen $port $port $expected $expected $port) }}
{{- end }}
{{- $_ := set $found $port (append (get $found $port) $where) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.service.http.enabled (not (get $found "http")) }}
{{- fail "service.http.enabled is true, but no REST or SOAP connector in config.routes listens: the Service's http port would refuse every connection; set service.http.enabled=false, or add a listener on ports.http" }}
{{- end }}
{{- if and .Values.service.smtp.enabled (not (get $found "smtp")) }}
{{- fail "service.smtp.enabled is true, but no SMTP connector in config.routes listens: the Service's smtp port would refuse every connection; add an smtp connector with listen: \"0.0.0.0:<ports.smtp>\", or set service.smtp.enabled=false" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Each replica needs MQTT client ids of its own: the broker disconnects a client when another
connects with the same id, so replicas sharing one take each other's connection in turn. The
chart passes POD_NAME and POD_NAMESPACE (downward API) for routes.yaml to build them from; pod
names are unique within a namespace only, so both. Only when the chart renders routes.yaml.
*/}}
{{- define "gateway.validateMqttClientIds" -}}
{{- if and (not .Values.config.existingConfigMap) (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) }}
{{- $routes := fromYaml .Values.config.routes }}
{{- range $name, $c := default (dict) (get $routes "connectors") }}
{{- if and (kindIs "map" $c) (eq (toString (get $c "type")) "mqtt") }}
{{- $id := toString (default (printf "gateway-%s" $name) (get $c "client_id")) }}
{{- if not (contains "${POD_NAME}" $id) }}
{{- fail (printf "config.routes: connectors.%s.client_id is %q%s, and several replicas (replicaCount > 1 or autoscaling.enabled) would connect with it: the broker lets one client per id connect and drops the other, so they would take each other's connection in turn. Build it from the pod: client_id: \"gateway-${POD_NAMESPACE}-${POD_NAME}\"" $name $id (hasKey $c "client_id" | ternary "" " (the default)")) }}
{{- else if not (contains "${POD_NAMESPACE}" $id) }}
{{- fail (printf "config.routes: connectors.%s.client_id is %q: pod names are unique within a namespace only, so a release of the same name in another namespace would connect to the broker with the same ids and take the connections of these replicas in turn. Build it from the pod's name and namespace: client_id: \"gateway-${POD_NAMESPACE}-${POD_NAME}\"" $name $id) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget that can never allow an eviction blocks every node drain for good. */}}
{{- define "gateway.validatePdb" -}}
{{- with .Values.podDisruptionBudget }}
{{- if .enabled }}
{{- $replicas := int (include "gateway.minReplicas" $) }}
{{- $what := $.Values.autoscaling.enabled | ternary (printf "autoscaling.minReplicas=%d" $replicas) (printf "replicaCount=%d" $replicas) }}
{{- if not (kindIs "invalid" .minAvailable) }}
{{- $min := 0 }}
{{- if kindIs "string" .minAvailable }}
{{- /* Kubernetes rounds a percentage of minAvailable up. */}}
{{- $min = div (add (mul (int (trimSuffix "%" .minAvailable)) $replicas) 99) 100 | int }}
{{- else }}
{{- $min = int .minAvailable }}
{{- end }}
{{- if ge $min $replicas }}
{{- fail (printf "podDisruptionBudget.minAvailable=%v with %s never allows an eviction, so every node drain would hang on these pods; use a lower minAvailable or podDisruptionBudget.maxUnavailable" .minAvailable $what) }}
{{- end }}
{{- else if eq (toString .maxUnavailable) "0" "0%" }}
{{- fail (printf "podDisruptionBudget.maxUnavailable=%v never allows an eviction, so every node drain would hang on these pods; use 1 or more" .maxUnavailable) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Scraping: a ServiceMonitor and the prometheus.io annotations would each scrape every pod, so
every series would be stored (and every alert fire) twice; a NetworkPolicy that admits nobody to
the admin port keeps the ServiceMonitor's Prometheus out.
*/}}
{{- define "gateway.validateMonitoring" -}}
{{- if .Values.metrics.serviceMonitor.enabled }}
{{- if .Values.metrics.podAnnotations }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podAnnotations are both true: Prometheus would scrape every pod twice (double series, double alerts); set metrics.podAnnotations=false" }}
{{- end }}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.adminFrom) }}
{{- fail "metrics.serviceMonitor.enabled with networkPolicy.enabled and an empty networkPolicy.adminFrom: the NetworkPolicy lets nobody but the node reach the admin port, so Prometheus could not scrape /metrics; add Prometheus's namespace (or pods) to networkPolicy.adminFrom" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The admin session key Secret is only of use when routes.yaml reads it: gateway.admin.session_key
must be "${ADMIN_SESSION_KEY}", the variable the chart sets from it.
*/}}
{{- define "gateway.validateSessionKey" -}}
{{- if and .Values.admin.sessionKeySecret.name (not .Values.config.existingConfigMap) }}
{{- $routes := fromYaml .Values.config.routes }}
{{- $admin := default (dict) (get (default (dict) (get $routes "gateway")) "admin") }}
{{- if ne (toString (get $admin "session_key")) "${ADMIN_SESSION_KEY}" }}
{{- fail (printf "admin.sessionKeySecret.name is %q, but config.routes does not read it: set gateway.admin.session_key: \"${ADMIN_SESSION_KEY}\"" .Values.admin.sessionKeySecret.name) }}
{{- end }}
{{- end }}
{{- end }}
