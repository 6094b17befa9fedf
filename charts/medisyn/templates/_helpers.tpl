{{/* Chart name, truncated to 63 chars (DNS label). */}}
{{- define "medisyn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already contains it. */}}
{{- define "medisyn.fullname" -}}
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

{{- define "medisyn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Common labels; pass (dict "ctx" $ "component" "mlflow"). */}}
{{- define "medisyn.labels" -}}
helm.sh/chart: {{ include "medisyn.chart" .ctx }}
{{ include "medisyn.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: medisyn
{{- end }}

{{- define "medisyn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medisyn.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "medisyn.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "medisyn.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: repository@digest when a digest is set, else repository:tag. */}}
{{- define "medisyn.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* Hardened container securityContext (KubeRay/bitnami style); pass the uid. */}}
{{- define "medisyn.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "medisyn.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ . }}
runAsGroup: {{ . }}
fsGroup: {{ . }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "medisyn.mlflow.fullname" -}}{{ include "medisyn.fullname" . }}-mlflow{{- end }}
{{- define "medisyn.postgresql.fullname" -}}{{ include "medisyn.fullname" . }}-postgresql{{- end }}
{{- define "medisyn.minio.fullname" -}}{{ include "medisyn.fullname" . }}-minio{{- end }}

{{/* Secret holding AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / MEDISYN_S3_ENDPOINT_URL. */}}
{{- define "medisyn.s3.secretName" -}}
{{- if .Values.s3.existingSecret }}{{ .Values.s3.existingSecret }}{{ else }}{{ include "medisyn.fullname" . }}-s3{{ end }}
{{- end }}

{{/* S3 endpoint: explicit value, else the bundled MinIO service, else empty (AWS). */}}
{{- define "medisyn.s3.endpoint" -}}
{{- if .Values.s3.endpoint }}{{ .Values.s3.endpoint }}{{- else if .Values.minio.enabled }}http://{{ include "medisyn.minio.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.minio.service.port }}{{- end }}
{{- end }}

{{/* Secret holding MLFLOW_BACKEND_STORE_URI (the database URI, password included). */}}
{{- define "medisyn.mlflow.backendSecretName" -}}
{{- if .Values.mlflow.backendStore.existingSecret }}{{ .Values.mlflow.backendStore.existingSecret }}{{ else }}{{ include "medisyn.mlflow.fullname" . }}-backend{{ end }}
{{- end }}

{{/* Secret read by pipeline steps: MLFLOW_TRACKING_URI (+ basic-auth user/password). */}}
{{- define "medisyn.mlflow.clientSecretName" -}}{{ include "medisyn.fullname" . }}-mlflow-client{{- end }}

{{- define "medisyn.mlflow.url" -}}
{{- if .Values.mlflow.enabled }}http://{{ include "medisyn.mlflow.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.mlflow.service.port }}{{ else }}{{ .Values.mlflow.externalUrl }}{{ end }}
{{- end }}

{{/* Resources block; pass the resources dict. */}}
{{- define "medisyn.resources" -}}
requests:
  {{- toYaml .requests | nindent 2 }}
limits:
  {{- toYaml .limits | nindent 2 }}
{{- end }}

{{/* MLflow auth (issue #10): the admin Secret (username, password, flask-secret-key) and one Secret per
platform identity (username, password), all created by the operator; nothing is looked up. */}}
{{- define "medisyn.mlflow.adminSecretName" -}}
{{- .Values.mlflow.auth.existingSecret | default (printf "%s-mlflow-admin" (include "medisyn.fullname" .)) }}
{{- end }}
{{- define "medisyn.mlflow.identitySecretName" -}}
{{- get .ctx.Values.mlflow.auth.identitySecrets .identity | default (printf "%s-mlflow-%s" (include "medisyn.fullname" .ctx) .identity) }}
{{- end }}
{{/* The patient-ID salt Secret (key MEDISYN_ID_SALT). */}}
{{- define "medisyn.idSalt.secretName" -}}
{{- .Values.idSalt.existingSecret | default (printf "%s-id-salt" (include "medisyn.fullname" .)) }}
{{- end }}
{{/* Signing (issue #21): the key Secrets (key.pem) and the trust ConfigMap (<role>-N.pub). */}}
{{- define "medisyn.signing.gateKeySecretName" -}}
{{- .Values.signing.gateKeySecret | default (printf "%s-gate-key" (include "medisyn.fullname" .)) }}
{{- end }}
{{- define "medisyn.signing.promoterKeySecretName" -}}
{{- .Values.signing.promoterKeySecret | default (printf "%s-promoter-key" (include "medisyn.fullname" .)) }}
{{- end }}
{{- define "medisyn.signing.trustConfigMapName" -}}
{{- printf "%s-trust" (include "medisyn.fullname" .) }}
{{- end }}
