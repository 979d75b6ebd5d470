{{/* Names, labels and shared values. */}}

{{- define "shipyard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "shipyard.fullname" -}}
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

{{- define "shipyard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shipyard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "shipyard.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "shipyard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "shipyard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shipyard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Where RayJobs are created: kuberay.namespace, else the release namespace. */}}
{{- define "shipyard.jobNamespace" -}}
{{- default .Release.Namespace .Values.kuberay.namespace }}
{{- end }}

{{/* Every namespace RayJobs go to (the job namespace, then each tenant's), space-separated:
the server's Role and RoleBinding are created in each. */}}
{{- define "shipyard.jobNamespaces" -}}
{{- $all := list (include "shipyard.jobNamespace" .) }}
{{- range $ns := sortAlpha (values .Values.kuberay.namespaces) }}
{{- if not (has $ns $all) }}{{- $all = append $all $ns }}{{- end }}
{{- end }}
{{- join " " $all }}
{{- end }}

{{- define "shipyard.image" -}}
{{- printf "%s:%s" (required "image.repository is required: the server image (deploy/Dockerfile.server)" .Values.image.repository) (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "shipyard.workerImage" -}}
{{- $w := .Values.kuberay.workerImage }}
{{- printf "%s:%s" (required "kuberay.workerImage.repository is required: the image Ray pods run (deploy/Dockerfile.worker)" $w.repository) (default .Chart.AppVersion $w.tag) }}
{{- end }}

{{- define "shipyard.claimName" -}}
{{- default (printf "%s-data" (include "shipyard.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* Checks across values that a JSON schema cannot express clearly; they fail at render. */}}
{{- define "shipyard.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.database.existingSecret) }}
{{- fail "replicaCount > 1 needs database.existingSecret (PostgreSQL): SQLite is one file on one volume" }}
{{- end }}
{{- range $key := list "gpuPool" "cpuPool" }}
{{- $pool := index $.Values.kuberay $key }}
{{- if and $pool (not (hasKey $.Values.kuberay.pools $pool)) }}
{{- fail (printf "kuberay.%s: %q is not a key of kuberay.pools" $key $pool) }}
{{- end }}
{{- end }}
{{- end }}
