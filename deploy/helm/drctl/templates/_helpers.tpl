{{/* The chart's name, at most 63 characters. */}}
{{- define "drctl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: the release name when it contains the chart's name (release
"drctl" gives drctl-worker, as the kustomization), else "<release>-<chart>". 63 characters at most
less the longest suffix ("-alert-receiver").
*/}}
{{- define "drctl.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := include "drctl.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "drctl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object's metadata: Helm's, and the kustomization's part-of. */}}
{{- define "drctl.labels" -}}
helm.sh/chart: {{ include "drctl.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: drctl
{{- end }}

{{/*
A component's selector labels, e.g. (dict "root" . "component" "worker"). The same as the
kustomization's (selectors are immutable: a chart and the kustomization can take over each other's
workloads).
*/}}
{{- define "drctl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "drctl.fullname" .root }}-{{ .component }}
{{- end }}

{{/* A component's pod labels. */}}
{{- define "drctl.podLabels" -}}
{{ include "drctl.selectorLabels" . }}
app.kubernetes.io/part-of: drctl
{{- end }}

{{/* A component's object labels. */}}
{{- define "drctl.componentLabels" -}}
{{ include "drctl.selectorLabels" . }}
{{ include "drctl.labels" .root }}
{{- end }}

{{- define "drctl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "drctl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "drctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "drctl.envConfigMap" -}}
{{ include "drctl.fullname" . }}-env
{{- end }}

{{- define "drctl.policyConfigMap" -}}
{{- .Values.policy.existingConfigMap | default (printf "%s-policy" (include "drctl.fullname" .)) }}
{{- end }}

{{/* The policy's text: policy.content, else the chart's example policy. */}}
{{- define "drctl.policy" -}}
{{- .Values.policy.content | default (.Files.Get "files/dr-policy.yaml") }}
{{- end }}

{{/* Pod annotations that roll the pods when their configuration changes. */}}
{{- define "drctl.checksums" -}}
checksum/env: {{ include (print .Template.BasePath "/configmap-env.yaml") . | sha256sum }}
{{- if not .Values.policy.existingConfigMap }}
checksum/policy: {{ include "drctl.policy" . | sha256sum }}
{{- end }}
{{- end }}

{{/* The image, and its pull policy when one is set. */}}
{{- define "drctl.container.image" -}}
image: {{ include "drctl.image" . }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end }}

{{/* A drctl container's securityContext: nothing to escalate, nothing to write but its volumes. */}}
{{- define "drctl.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end }}

{{/* Is the Temporal TLS Secret mounted? Validates the TLS values on the way. */}}
{{- define "drctl.temporalTlsMounted" -}}
{{- $tls := .Values.temporal.tls }}
{{- if and $tls.secretName (not $tls.enabled) }}
{{- fail "temporal.tls.secretName is set but temporal.tls.enabled is false: set temporal.tls.enabled=true" }}
{{- end }}
{{- if and $tls.caKey (not $tls.secretName) }}
{{- fail "temporal.tls.caKey names a key of temporal.tls.secretName, which is empty" }}
{{- end }}
{{- if and $tls.enabled $tls.secretName }}true{{ end }}
{{- end }}

{{/* Env of a container that talks to Temporal: the API key from its Secret, when there is one. */}}
{{- define "drctl.temporalEnv" -}}
{{- with .Values.temporal.apiKey.existingSecret }}
- name: DRCTL_TEMPORAL_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.temporal.apiKey.key }}
{{- end }}
{{- end }}

{{/* The volume mount of a container that talks to Temporal. */}}
{{- define "drctl.temporalVolumeMounts" -}}
{{- if include "drctl.temporalTlsMounted" . }}
- name: temporal-tls
  mountPath: /etc/drctl/temporal-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The volume of a pod whose containers talk to Temporal. */}}
{{- define "drctl.temporalVolumes" -}}
{{- if include "drctl.temporalTlsMounted" . }}
- name: temporal-tls
  secret:
    secretName: {{ .Values.temporal.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The policy's volume mount and volume, the same in every drctl pod. */}}
{{- define "drctl.policyVolumeMount" -}}
- name: policy
  mountPath: /etc/drctl/dr-policy.yaml
  subPath: dr-policy.yaml
  readOnly: true
{{- end }}

{{- define "drctl.policyVolume" -}}
- name: policy
  configMap:
    name: {{ include "drctl.policyConfigMap" . }}
{{- end }}

{{/* The pod securityContext of drctl's pods (the image's user 10001). */}}
{{- define "drctl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
{{- if .fsGroup }}
fsGroup: 10001
{{- end }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Are the node agents' fault endpoints on? nodeAgent.faultInjection.enabled, or drills.enabled (drills
inject Xids through them). Validates the token Secret on the way.
*/}}
{{- define "drctl.faultInjection" -}}
{{- $fault := .Values.nodeAgent.faultInjection }}
{{- if or $fault.enabled .Values.drills.enabled }}
{{- $_ := required "nodeAgent.faultInjection.existingSecret is required when nodeAgent.faultInjection.enabled or drills.enabled: the agent refuses fault injection without a token" $fault.existingSecret }}
{{- true }}
{{- end }}
{{- end }}

{{/* The fault-injection token: the file a container reads, its mount and its volume. */}}
{{- define "drctl.faultTokenFile" -}}
{{- printf "/etc/drctl/fault-token/%s" .Values.nodeAgent.faultInjection.key }}
{{- end }}

{{- define "drctl.faultTokenMount" -}}
- name: fault-token
  mountPath: /etc/drctl/fault-token
  readOnly: true
{{- end }}

{{- define "drctl.faultTokenVolume" -}}
- name: fault-token
  secret:
    secretName: {{ .Values.nodeAgent.faultInjection.existingSecret }}
{{- end }}
