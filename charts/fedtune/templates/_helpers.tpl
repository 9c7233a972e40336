{{- define "fedtune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fedtune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "fedtune.labels" -}}
{{ include "fedtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fedtune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedtune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is needed when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fedtune.peeringName" -}}
{{- default (include "fedtune.fullname" .) .Values.peeringName -}}
{{- end -}}

{{- define "fedtune.namespaced" -}}
{{- if eq .Values.rbac.scope "namespaced" }}true{{ end -}}
{{- end -}}

{{/* The rules on namespaced resources, shared by the ClusterRole and the Role. */}}
{{- define "fedtune.namespacedRules" -}}
- apiGroups: [fedtune.io]
  resources: [federatedfinetunes]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [fedtune.io]
  resources: [federatedfinetunes/status]
  verbs: [patch]
- apiGroups: [fedtune.io]
  resources: [federatedfinetunes/finalizers]
  verbs: [update]
# Clients of runs coordinated in other clusters, run here (in a silo's cluster).
- apiGroups: [fedtune.io]
  resources: [federatedclients]
  verbs: [get, list, watch, patch]
- apiGroups: [fedtune.io]
  resources: [federatedclients/status]
  verbs: [patch]
- apiGroups: [batch]
  resources: [jobs]
  # patch: a queued run's Jobs are suspended until Kueue admits the run, and again if it is evicted.
  verbs: [create, get, list, watch, patch, delete]
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  # The one Kueue Workload through which a queued run (spec.queueName) is admitted as a gang.
  verbs: [create, get, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [create, get]
- apiGroups: [""]
  resources: [secrets]
  # list: read the Secrets labelled fedtune.io/credentials (the operator selects by that label and reads
  # no other); create: the signing keys it generates for parties that bring none.
  verbs: [list, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
