# Shared settings of the local stack. Sourced by stack.sh and test.sh; every value can be
# overridden from the environment (or from a .env file at the checkout's root).
# shellcheck shell=bash

ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [ -f "$ROOT_DIR/.env" ]; then
  set -a; # shellcheck disable=SC1091
  . "$ROOT_DIR/.env"; set +a
fi

# Everything the stack writes: data, logs, pid files. Git-ignored.
: "${LOCAL_DIR:=$ROOT_DIR/.local}"
# Downloads and builds kept between runs, outside the checkout.
: "${REGISTRY_CACHE_DIR:=${XDG_CACHE_HOME:-$HOME/.cache}/model-registry}"

: "${PG_PORT:=55432}"
: "${PG_USER:=registry}"
: "${PG_PASSWORD:=registry}"
: "${PG_DATABASE:=registry}"

: "${KAFKA_VERSION:=4.1.1}"
: "${KAFKA_PORT:=19092}"
: "${KAFKA_CONTROLLER_PORT:=19093}"

# MinIO has no semver tags; this is the pseudo-version of the pinned commit (2026-02-12).
: "${MINIO_VERSION:=v0.0.0-20260212201848-7aac2a2c5b7c}"
: "${MINIO_PORT:=19000}"
: "${MINIO_CONSOLE_PORT:=19001}"
: "${MINIO_ROOT_USER:=registry}"
: "${MINIO_ROOT_PASSWORD:=registry-secret}"
: "${MINIO_BUCKET:=models}"
: "${MINIO_SECURE:=false}"
: "${MINIO_NOTIFY_TOPIC:=minio.bucket-events}"

: "${API_PORT:=8081}"
: "${INGEST_PORT:=8082}"
: "${ANALYTICS_PORT:=8083}"
: "${NOTIFIER_PORT:=8084}"
# Development only: the spec's quick start uses this token. Never use it in production.
: "${REGISTRY_ADMIN_TOKEN:=changeme}"
# Development only, as in .env.example: the key webhook signing secrets are sealed with.
: "${WEBHOOK_SECRET_KEY:=Jm7kc3VgRIN1LRkidzDsPTYhhrKrNb/SoNYPUugovqQ=}"

# Rate limits stay on locally, but high: the test suite registers thousands of users from one IP and the
# download benchmark drives one key hard (tests/integration/test_security_rate_limits.py starts its own
# api processes with low limits).
: "${RATE_LIMIT_DEVELOPER_PER_MINUTE:=1000000}"
: "${RATE_LIMIT_PLATFORM_PER_MINUTE:=10000000}"
: "${RATE_LIMIT_ADMIN_PER_MINUTE:=1000000}"
: "${RATE_LIMIT_REGISTER_PER_MINUTE:=1000000}"
export RATE_LIMIT_DEVELOPER_PER_MINUTE RATE_LIMIT_PLATFORM_PER_MINUTE RATE_LIMIT_ADMIN_PER_MINUTE
export RATE_LIMIT_REGISTER_PER_MINUTE

# Each service's own MinIO user, created by `registry-devstack setup-minio` with a policy limited to what the
# service does (development values). Presigned URLs are signed with the api's.
: "${API_MINIO_ACCESS_KEY:=registry-api}"
: "${API_MINIO_SECRET_KEY:=registry-api-secret}"
: "${INGEST_MINIO_ACCESS_KEY:=registry-ingest}"
: "${INGEST_MINIO_SECRET_KEY:=registry-ingest-secret}"
export API_MINIO_ACCESS_KEY API_MINIO_SECRET_KEY INGEST_MINIO_ACCESS_KEY INGEST_MINIO_SECRET_KEY

# The observability stack (OBSERVABILITY=1): Prometheus scraping the four services with the alert rules of
# deploy/observability/alerts.yml, and Jaeger receiving their traces (OTLP/HTTP). Both are built from source
# with `go install` the first time (several minutes each), like MinIO.
: "${OBSERVABILITY:=0}"
: "${PROMETHEUS_VERSION:=v0.316.0}"
: "${PROMETHEUS_PORT:=9090}"
: "${PROMETHEUS_SCRAPE_INTERVAL:=5s}"
: "${JAEGER_VERSION:=v1.75.0}"
: "${JAEGER_UI_PORT:=16686}"
: "${JAEGER_GRPC_PORT:=16685}"
: "${JAEGER_OTLP_PORT:=4318}"
if [ "$OBSERVABILITY" = 1 ] && [ -z "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then
  OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$JAEGER_OTLP_PORT"
fi
export OBSERVABILITY PROMETHEUS_VERSION PROMETHEUS_PORT PROMETHEUS_SCRAPE_INTERVAL JAEGER_VERSION JAEGER_UI_PORT
export JAEGER_GRPC_PORT JAEGER_OTLP_PORT
if [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then export OTEL_EXPORTER_OTLP_ENDPOINT; fi

export ROOT_DIR LOCAL_DIR REGISTRY_CACHE_DIR
export PG_PORT PG_USER PG_PASSWORD PG_DATABASE KAFKA_VERSION KAFKA_PORT KAFKA_CONTROLLER_PORT
export MINIO_VERSION MINIO_PORT MINIO_CONSOLE_PORT MINIO_ROOT_USER MINIO_ROOT_PASSWORD MINIO_BUCKET
export MINIO_SECURE MINIO_NOTIFY_TOPIC API_PORT INGEST_PORT ANALYTICS_PORT NOTIFIER_PORT REGISTRY_ADMIN_TOKEN WEBHOOK_SECRET_KEY

# What the Python services read (pydantic-settings, see shared/src/registry_shared/settings.py).
export DATABASE_URL="${DATABASE_URL:-postgresql://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DATABASE}"
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:$KAFKA_PORT}"
export MINIO_ENDPOINT="${MINIO_ENDPOINT:-127.0.0.1:$MINIO_PORT}"
export ANALYTICS_URL="${ANALYTICS_URL:-http://127.0.0.1:$ANALYTICS_PORT}"
export CLICKHOUSE_MODE="${CLICKHOUSE_MODE:-chdb}"
export CHDB_PATH="${CHDB_PATH:-$LOCAL_DIR/data/chdb}"
export API_BASE_URL="${API_BASE_URL:-http://127.0.0.1:$API_PORT}"

DATA_DIR="$LOCAL_DIR/data"
LOG_DIR="$LOCAL_DIR/logs"
RUN_DIR="$LOCAL_DIR/run"
export DATA_DIR LOG_DIR RUN_DIR

log() { printf '\033[1m[stack]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[31m[stack] %s\033[0m\n' "$*" >&2; exit 1; }
