#!/usr/bin/env bash
# The local stack, natively, without Docker: Postgres, Apache Kafka (KRaft), MinIO and the four services.
#   stack.sh up [component...]      install what is missing, start what is not running (idempotent)
#   stack.sh down [component...]    stop what runs (only processes whose pid files we wrote)
#   stack.sh status                 one line per component
#   stack.sh logs [component]       tail the logs
#   stack.sh reset                  stop everything and wipe all data under .local/
# Components, in start order: postgres kafka minio|seaweedfs (STORAGE_BACKEND) [jaeger] api ingest analytics
# notifier [prometheus] (jaeger and prometheus with OBSERVABILITY=1). API_REPLICAS, INGEST_REPLICAS and
# NOTIFIER_REPLICAS (1 each) run more processes of those services: replica k as `api.k` on API_PORT + 10*k.
set -euo pipefail
# shellcheck source=deploy/local/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"

case $STORAGE_BACKEND in
  minio) INFRA=(postgres kafka minio);;
  seaweedfs) INFRA=(postgres kafka seaweedfs);;
  *) die "STORAGE_BACKEND must be minio or seaweedfs, not $STORAGE_BACKEND";;
esac
SERVICES=(api ingest analytics notifier)
ALL=("${INFRA[@]}" "${SERVICES[@]}")
if [ "$OBSERVABILITY" = 1 ]; then ALL=("${INFRA[@]}" jaeger "${SERVICES[@]}" prometheus); fi
# The other S3 server may run beside the chosen one (test.sh starts SeaweedFS next to MinIO): status, down
# and running know it too.
if [ "$STORAGE_BACKEND" = minio ]; then OTHER_STORAGE=seaweedfs; else OTHER_STORAGE=minio; fi

mkdir -p "$DATA_DIR" "$LOG_DIR" "$RUN_DIR" "$REGISTRY_CACHE_DIR"

# ---------------------------------------------------------------- helpers
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
  log "installing Debian packages: $*"
  if [ ! -f "$RUN_DIR/.apt-updated" ]; then as_root apt-get update -qq && touch "$RUN_DIR/.apt-updated"; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pid_of() { [ -f "$RUN_DIR/$1.pid" ] && cat "$RUN_DIR/$1.pid" 2>/dev/null || true; }
is_running() {
  local pid; pid=$(pid_of "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_until() { # wait_until SECONDS WHAT CMD... ; quiet while retrying, shows the last error on failure
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS err="$RUN_DIR/.wait.err"
  until "$@" >/dev/null 2>"$err"; do
    if (( SECONDS - t0 > limit )); then
      cat "$err" >&2; die "$what did not come up within ${limit}s (logs: $LOG_DIR/$what.log)"
    fi
    sleep 0.25
  done
}
start_bg() { # start_bg NAME CMD... ; runs in its own session so `down` can stop the whole group
  local name=$1; shift
  setsid "$@" >>"$LOG_DIR/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN_DIR/$name.pid"
}
stop_pid_file() { # stop_pid_file NAME : TERM the process group, then KILL after 20 s
  local name=$1 pid; pid=$(pid_of "$name")
  if [ -z "$pid" ] || ! kill -0 "$pid" 2>/dev/null; then rm -f "$RUN_DIR/$name.pid"; return 0; fi
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$RUN_DIR/$name.pid"
  log "$name stopped"
}

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    log "installing uv from PyPI"
    python3 -m pip install -q uv || python3 -m pip install -q --user uv
    export PATH="$HOME/.local/bin:$PATH"
  fi
  if [ ! -f "$RUN_DIR/.uv-synced" ] || [ "$ROOT_DIR/uv.lock" -nt "$RUN_DIR/.uv-synced" ]; then
    log "uv sync (workspace, locked)"
    (cd "$ROOT_DIR" && uv sync --locked --all-packages --quiet) && touch "$RUN_DIR/.uv-synced"
  fi
}
py() { (cd "$ROOT_DIR" && uv run --no-sync python "$@"); }

# ---------------------------------------------------------------- postgres
pg_bin() {
  local d; d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
  [ -n "$d" ] && [ -x "$d/initdb" ] && echo "$d"
}
# Postgres refuses to run as root: when we are root, the cluster belongs to the `postgres` user.
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
# The `postgres` user must be able to reach the data folder inside the checkout: grant it the right to
# traverse (x, no read) each parent folder that denies it, and say so.
pg_reach() {
  [ "$(id -u)" -eq 0 ] || return 0
  local d=$1
  while [ "$d" != "/" ]; do
    if ! runuser -u postgres -- test -x "$d" 2>/dev/null; then
      if command -v setfacl >/dev/null 2>&1; then setfacl -m u:postgres:x "$d"; else chmod o+x "$d"; fi
      log "postgres: granted the postgres user traversal of $d"
    fi
    d=$(dirname "$d")
  done
}

up_postgres() {
  local bin; bin=$(pg_bin) || { apt_install postgresql; bin=$(pg_bin) || die "postgresql install failed"; }
  local pgdata="$DATA_DIR/postgres" sock="$RUN_DIR/pgsock"
  mkdir -p "$sock"
  if [ "$(id -u)" -eq 0 ]; then chown postgres: "$sock"; fi
  pg_reach "$DATA_DIR"; pg_reach "$RUN_DIR"; pg_reach "$LOG_DIR"
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    log "postgres: initdb $pgdata"
    mkdir -p "$pgdata"; chmod 700 "$pgdata"
    local pw="$RUN_DIR/pgpass.tmp"; printf '%s\n' "$PG_PASSWORD" > "$pw"
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$pgdata" "$pw"; fi
    as_pg "$bin/initdb" -D "$pgdata" -U "$PG_USER" --pwfile="$pw" --auth=scram-sha-256 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pw"
  fi
  touch "$LOG_DIR/postgres.log"; if [ "$(id -u)" -eq 0 ]; then chown postgres: "$LOG_DIR/postgres.log"; fi
  if ! as_pg "$bin/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
    log "postgres: starting on 127.0.0.1:$PG_PORT"
    as_pg "$bin/pg_ctl" -D "$pgdata" -l "$LOG_DIR/postgres.log" -w -t 60 start \
      -o "-p $PG_PORT -k $sock -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=on" >/dev/null
  fi
  head -n1 "$pgdata/postmaster.pid" > "$RUN_DIR/postgres.pid"
  if ! PGPASSWORD=$PG_PASSWORD "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -Atqc \
      "select 1 from pg_database where datname='$PG_DATABASE'" | grep -q 1; then
    PGPASSWORD=$PG_PASSWORD "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DATABASE"
  fi
}
down_postgres() {
  local bin; bin=$(pg_bin) || return 0
  if [ -f "$DATA_DIR/postgres/postmaster.pid" ]; then
    as_pg "$bin/pg_ctl" -D "$DATA_DIR/postgres" -m fast -w stop >/dev/null 2>&1 || true
    log "postgres stopped"
  fi
  rm -f "$RUN_DIR/postgres.pid"
}

# ---------------------------------------------------------------- kafka
kafka_libs() { echo "$REGISTRY_CACHE_DIR/kafka-$KAFKA_VERSION/libs"; }
up_kafka() {
  command -v java >/dev/null 2>&1 || apt_install openjdk-17-jre-headless
  local libs; libs=$(kafka_libs)
  if [ ! -f "$libs/.complete" ]; then
    command -v mvn >/dev/null 2>&1 || apt_install maven
    log "kafka: gathering kafka_2.13 $KAFKA_VERSION and its runtime dependencies from Maven Central"
    rm -rf "$libs.tmp"
    mvn -q -B -f "$ROOT_DIR/deploy/local/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$libs.tmp"
    rm -rf "$libs"; mv "$libs.tmp" "$libs"; touch "$libs/.complete"
  fi
  local dir="$DATA_DIR/kafka"; mkdir -p "$dir"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/log
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=6
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.retention.hours=168
PROPS
  local java=(java -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
              -Dlog4j2.configurationFile="$ROOT_DIR/deploy/local/kafka-log4j2.properties"
              -Dkafka.logs.dir="$LOG_DIR" -cp "$libs/*")
  if [ ! -f "$dir/log/meta.properties" ]; then
    local cluster_id; cluster_id=$(python3 -c 'import base64,uuid;print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    log "kafka: formatting KRaft storage (cluster $cluster_id)"
    "${java[@]}" kafka.tools.StorageTool format --cluster-id="$cluster_id" -c "$dir/server.properties" >>"$LOG_DIR/kafka.log" 2>&1
  fi
  if ! is_running kafka; then
    log "kafka: starting on 127.0.0.1:$KAFKA_PORT"
    start_bg kafka "${java[@]}" kafka.Kafka "$dir/server.properties"
  fi
  wait_until 90 "kafka" py -m registry_shared.devstack wait-kafka
}

# ---------------------------------------------------------------- minio
minio_bin() { echo "$REGISTRY_CACHE_DIR/minio-$MINIO_VERSION/minio"; }
up_minio() {
  local bin; bin=$(minio_bin)
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || die "MinIO is built from source with Go (>= 1.24); install Go first"
    log "minio: go install github.com/minio/minio@$MINIO_VERSION (first time only, several minutes)"
    GOBIN="$(dirname "$bin")" CGO_ENABLED=0 go install -trimpath "github.com/minio/minio@$MINIO_VERSION"
  fi
  if ! is_running minio; then
    log "minio: starting on 127.0.0.1:$MINIO_PORT (console :$MINIO_CONSOLE_PORT)"
    mkdir -p "$DATA_DIR/minio" "$DATA_DIR/minio-queue"
    # MinIO's own Kafka notification target, id REGISTRY; events queue on disk while Kafka is down.
    MINIO_ROOT_USER=$MINIO_ROOT_USER MINIO_ROOT_PASSWORD=$MINIO_ROOT_PASSWORD \
    MINIO_NOTIFY_KAFKA_ENABLE_REGISTRY=on \
    MINIO_NOTIFY_KAFKA_BROKERS_REGISTRY="127.0.0.1:$KAFKA_PORT" \
    MINIO_NOTIFY_KAFKA_TOPIC_REGISTRY="$MINIO_NOTIFY_TOPIC" \
    MINIO_NOTIFY_KAFKA_QUEUE_DIR_REGISTRY="$DATA_DIR/minio-queue" \
    MINIO_BROWSER=on MINIO_UPDATE=off \
      start_bg minio "$bin" server "$DATA_DIR/minio" --quiet \
        --address "127.0.0.1:$MINIO_PORT" --console-address "127.0.0.1:$MINIO_CONSOLE_PORT"
  fi
  wait_until 60 "minio" curl -fsS -o /dev/null "http://127.0.0.1:$MINIO_PORT/minio/health/ready"
  STORAGE_BACKEND=minio MINIO_ENDPOINT="127.0.0.1:$MINIO_PORT" py -m registry_shared.devstack setup-storage
}

# ---------------------------------------------------------------- seaweedfs
# The second S3 server (STORAGE_BACKEND=seaweedfs, or beside MinIO for the tests: see test.sh). Built from
# the module's own folder: its go.mod has replace directives, which `go install pkg@version` refuses.
seaweedfs_bin() { echo "$REGISTRY_CACHE_DIR/seaweedfs-$SEAWEEDFS_VERSION/weed"; }
up_seaweedfs() {
  local bin; bin=$(seaweedfs_bin)
  if [ ! -x "$bin" ]; then
    command -v go >/dev/null 2>&1 || die "SeaweedFS is built from source with Go (>= 1.26); install Go first"
    log "seaweedfs: go build github.com/seaweedfs/seaweedfs/weed@$SEAWEEDFS_VERSION (first time only, ~15 min)"
    local src; src=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" \
      | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [ -n "$src" ] || die "seaweedfs: go mod download failed"
    mkdir -p "$(dirname "$bin")"
    (cd "$src" && CGO_ENABLED=0 go build -trimpath -o "$bin.tmp" ./weed) && mv "$bin.tmp" "$bin"
  fi
  local p=$SEAWEEDFS_PORT
  if ! is_running seaweedfs; then
    log "seaweedfs: starting on 127.0.0.1:$p (S3; master :$((p + 1)), volume :$((p + 2)), filer :$((p + 3)))"
    mkdir -p "$DATA_DIR/seaweedfs"
    # The project's credentials as the one identity of the S3 gateway.
    local conf="$DATA_DIR/seaweedfs/s3.json"
    ( umask 077; cat > "$conf" <<JSON
{"identities": [{"name": "$MINIO_ROOT_USER",
  "credentials": [{"accessKey": "$MINIO_ROOT_USER", "secretKey": "$MINIO_ROOT_PASSWORD"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
 {"name": "${API_MINIO_ACCESS_KEY:-registry-api}",
  "credentials": [{"accessKey": "${API_MINIO_ACCESS_KEY:-registry-api}", "secretKey": "${API_MINIO_SECRET_KEY:-registry-api-secret}"}],
  "actions": ["Read:$MINIO_BUCKET", "Write:$MINIO_BUCKET", "List:$MINIO_BUCKET"]},
 {"name": "${INGEST_MINIO_ACCESS_KEY:-registry-ingest}",
  "credentials": [{"accessKey": "${INGEST_MINIO_ACCESS_KEY:-registry-ingest}", "secretKey": "${INGEST_MINIO_SECRET_KEY:-registry-ingest-secret}"}],
  "actions": ["Read:$MINIO_BUCKET", "Write:$MINIO_BUCKET", "List:$MINIO_BUCKET"]}]}
JSON
    )
    start_bg seaweedfs "$bin" server -dir="$DATA_DIR/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -master.port=$((p + 1)) -master.port.grpc=$((p + 10001)) \
      -volume.port=$((p + 2)) -volume.port.grpc=$((p + 10002)) \
      -filer.port=$((p + 3)) -filer.port.grpc=$((p + 10003)) \
      -master.volumeSizeLimitMB=1024 -volume.max=0 \
      -s3 -s3.port="$p" -s3.port.grpc=$((p + 10000)) -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$conf"
  fi
  wait_until 120 "seaweedfs" curl -fsS -o /dev/null "http://127.0.0.1:$p/healthz"
  wait_until 60 "seaweedfs" env STORAGE_BACKEND=seaweedfs MINIO_ENDPOINT="127.0.0.1:$p" \
    bash -c 'cd "$ROOT_DIR" && uv run --no-sync python -m registry_shared.devstack setup-storage'
}

# ---------------------------------------------------------------- observability (OBSERVABILITY=1)
go_build() { # go_build DIR MODULE@VERSION... : `go install` into the cache once
  local dir=$1; shift
  command -v go >/dev/null 2>&1 || die "Go is needed to build $* (install Go first)"
  GOBIN="$dir" CGO_ENABLED=0 go install -trimpath "$@"
}
up_jaeger() {
  local dir="$REGISTRY_CACHE_DIR/jaeger-$JAEGER_VERSION"
  if [ ! -x "$dir/jaeger" ]; then
    # Jaeger's go.mod has a replace directive, which `go install pkg@version` refuses: build it as a tool of a
    # throwaway module that repeats the replace (`go get -tool`), then `go build` it.
    log "jaeger: go get -tool github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION + go build (first time only, several minutes)"
    command -v go >/dev/null 2>&1 || die "Go is needed to build Jaeger (install Go first)"
    local mod; mod=$(mktemp -d)
    (cd "$mod" && go mod init registry/jaeger-build >/dev/null 2>&1 \
      && go mod edit -replace github.com/Shopify/sarama=github.com/Shopify/sarama@v1.33.0 \
      && go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_VERSION" \
      && CGO_ENABLED=0 go build -trimpath -o "$dir/jaeger" github.com/jaegertracing/jaeger/cmd/jaeger) \
      || { rm -rf "$mod"; die "jaeger: build failed"; }
    rm -rf "$mod"
  fi
  if ! is_running jaeger; then
    log "jaeger: starting, OTLP on 127.0.0.1:$JAEGER_OTLP_PORT, UI on :$JAEGER_UI_PORT"
    start_bg jaeger "$dir/jaeger" --config "$ROOT_DIR/deploy/observability/jaeger.yaml"
  fi
  wait_until 60 jaeger curl -fsS -o /dev/null "http://127.0.0.1:$JAEGER_UI_PORT/api/services"
}
up_prometheus() {
  local dir="$REGISTRY_CACHE_DIR/prometheus-$PROMETHEUS_VERSION"
  if [ ! -x "$dir/prometheus" ] || [ ! -x "$dir/promtool" ]; then
    log "prometheus: go install github.com/prometheus/prometheus/cmd/{prometheus,promtool}@$PROMETHEUS_VERSION (first time only, several minutes)"
    go_build "$dir" "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION" \
      "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
  fi
  local config="$RUN_DIR/prometheus.yml"
  (cd "$ROOT_DIR" && py -c 'import os,sys; sys.stdout.write(os.path.expandvars(open(sys.argv[1]).read()))' \
    deploy/observability/prometheus.yml.tmpl) > "$config"
  "$dir/promtool" check config "$config" >/dev/null || die "prometheus: $config does not check"
  if ! is_running prometheus; then
    log "prometheus: starting on 127.0.0.1:$PROMETHEUS_PORT"
    mkdir -p "$DATA_DIR/prometheus"
    start_bg prometheus "$dir/prometheus" --config.file="$config" --storage.tsdb.path="$DATA_DIR/prometheus" \
      --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --web.enable-lifecycle --storage.tsdb.retention.time=2d
  fi
  wait_until 60 prometheus curl -fsS -o /dev/null "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
}

# ---------------------------------------------------------------- services
# Replicas: API_REPLICAS, INGEST_REPLICAS and NOTIFIER_REPLICAS processes of each (1 by default, at most
# MAX_REPLICAS). Replica 0 is `api` (api.pid, api.log, API_PORT); replica k is the instance `api.k` (api.k.pid,
# api.k.log) on API_PORT + 10*k, with the same environment otherwise: the same Postgres, Kafka consumer groups
# (Kafka splits the partitions between them) and store. Analytics stays one process (its in-process engine
# belongs to one process; README "Scaling").
REPLICA_PORT_STEP=10
MAX_REPLICAS=10
service_port() { case $1 in api) echo "$API_PORT";; ingest) echo "$INGEST_PORT";;
  analytics) echo "$ANALYTICS_PORT";; notifier) echo "$NOTIFIER_PORT";; esac; }
port_var() { case $1 in api) echo API_PORT;; ingest) echo INGEST_PORT;; analytics) echo ANALYTICS_PORT;;
  notifier) echo NOTIFIER_PORT;; esac; }
replicas_of() { # replicas_of SERVICE : how many processes `up` runs
  local n
  case $1 in api) n=${API_REPLICAS:-1};; ingest) n=${INGEST_REPLICAS:-1};; notifier) n=${NOTIFIER_REPLICAS:-1};;
    *) n=1;; esac
  [[ $n =~ ^[0-9]+$ ]] && (( n >= 1 && n <= MAX_REPLICAS )) \
    || die "${1^^}_REPLICAS must be a number from 1 to $MAX_REPLICAS, not '$n'"
  echo "$n"
}
instance_index() { if [[ $1 == *.* ]]; then echo "${1#*.}"; else echo 0; fi; }
instance_port() { echo $(( $(service_port "${1%%.*}") + REPLICA_PORT_STEP * $(instance_index "$1") )); }
is_instance() { # api, ingest.3 ... : a service process this script runs
  [[ $1 =~ ^(api|ingest|analytics|notifier)(\.([1-9]))?$ ]] || return 1
  [ -z "${BASH_REMATCH[3]}" ] || [ "${BASH_REMATCH[1]}" != analytics ]
}
wanted_instances() { # the processes `up` runs for SERVICE
  local n k; n=$(replicas_of "$1"); echo "$1"
  for (( k=1; k<n; k++ )); do echo "$1.$k"; done
}
known_instances() { # the wanted ones and any other replica with a pid file (started with more replicas)
  local n k; n=$(replicas_of "$1"); echo "$1"
  for (( k=1; k<MAX_REPLICAS; k++ )); do
    if (( k < n )) || [ -f "$RUN_DIR/$1.$k.pid" ]; then echo "$1.$k"; fi
  done
}
for _svc in api ingest notifier; do replicas_of "$_svc" >/dev/null; done  # a wrong count stops here
healthy() { curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$(instance_port "$1")/healthz" 2>/dev/null; }
up_service() { # up_service INSTANCE : start it unless it runs, wait for its /healthz
  local name=$1 svc=${1%%.*} port; port=$(instance_port "$1")
  if ! is_running "$name"; then
    log "$name: starting on 127.0.0.1:$port"
    (cd "$ROOT_DIR" && export "$(port_var "$svc")=$port" && start_bg "$name" uv run --no-sync "registry-$svc")
  fi
  wait_until 90 "$name" curl -fsS -o /dev/null "http://127.0.0.1:$port/healthz"
}

# ---------------------------------------------------------------- commands
# Components on the command line: postgres, kafka, ... as below; a service (api, ingest, analytics, notifier)
# means its replicas (`up`: API_REPLICAS of them; down/status/logs: also any other replica still running); one
# replica is named by its instance (api.1).
expand() { # expand up|known COMPONENT... : one instance a line
  local how=$1 c; shift
  for c in "$@"; do
    case $c in
      api|ingest|analytics|notifier) "${how}_instances" "$c";;
      *) if is_instance "$c" || [[ $c =~ ^(postgres|kafka|minio|seaweedfs|jaeger|prometheus)$ ]]; then echo "$c"
         else die "unknown component: $c"; fi;;
    esac
  done
}
status_line() {
  local c=$1 where state
  case $c in
    postgres) where="127.0.0.1:$PG_PORT";; kafka) where="127.0.0.1:$KAFKA_PORT";;
    minio) where="http://127.0.0.1:$MINIO_PORT (console :$MINIO_CONSOLE_PORT)";;
    prometheus) where="http://127.0.0.1:$PROMETHEUS_PORT";;
    jaeger) where="http://127.0.0.1:$JAEGER_UI_PORT (OTLP :$JAEGER_OTLP_PORT)";;
    seaweedfs) where="http://127.0.0.1:$SEAWEEDFS_PORT (S3)";;
    *) where="http://127.0.0.1:$(instance_port "$c")";;
  esac
  if is_running "$c"; then
    state="up (pid $(pid_of "$c"))"
    if is_instance "$c" && ! healthy "$c"; then state="$state, /healthz failing"; fi
  else state="down"; fi
  printf '  %-12s %-28s %s\n' "$c" "$state" "$where"
}

cmd_up() {
  local t0=$SECONDS comps c out; [ $# -gt 0 ] || set -- "${ALL[@]}"
  out=$(expand wanted "$@") || exit 1; mapfile -t comps <<<"$out"
  ensure_uv
  for c in "${comps[@]}"; do
    case $c in postgres|kafka|minio|seaweedfs|jaeger|prometheus) "up_$c";; *) up_service "$c";; esac
  done
  log "ready in $((SECONDS - t0)) s"
  for c in "${comps[@]}"; do status_line "$c"; done
  printf '  data, logs, pids under %s\n' "$LOCAL_DIR"
}
cmd_down() {
  local comps i out; [ $# -gt 0 ] || set -- "${ALL[@]}" "$OTHER_STORAGE"
  out=$(expand known "$@") || exit 1; mapfile -t comps <<<"$out"
  for (( i=${#comps[@]}-1; i>=0; i-- )); do
    case ${comps[$i]} in postgres) down_postgres;; *) stop_pid_file "${comps[$i]}";; esac
  done
}
cmd_status() {
  local c
  for c in $(expand known "${ALL[@]}"); do
    if is_running "$c" || ! [[ $c == *.* ]] || (( $(instance_index "$c") < $(replicas_of "${c%%.*}") )); then
      status_line "$c"
    fi
  done
  if is_running "$OTHER_STORAGE"; then status_line "$OTHER_STORAGE"; fi
}
cmd_running() {
  local c; for c in $(expand known "${ALL[@]}" "$OTHER_STORAGE"); do if is_running "$c"; then echo "$c"; fi; done
}
cmd_logs() {
  local files=() c out
  if [ $# -eq 0 ]; then tail -n 20 -F "$LOG_DIR"/*.log; return; fi
  out=$(expand known "$@") || exit 1
  for c in $out; do [ -f "$LOG_DIR/$c.log" ] && files+=("$LOG_DIR/$c.log"); done
  [ ${#files[@]} -gt 0 ] || die "no log of $* under $LOG_DIR"
  tail -n 100 -F "${files[@]}"
}
cmd_reset() {
  cmd_down
  rm -rf "${DATA_DIR:?}" "${LOG_DIR:?}" "${RUN_DIR:?}"
  log "all data under $LOCAL_DIR removed"
}

case "${1:-}" in
  up) shift; cmd_up "$@";;
  down) shift; cmd_down "$@";;
  status) cmd_status;;
  running) cmd_running;;
  logs) shift; cmd_logs "$@";;
  reset) cmd_reset;;
  *) sed -n '2,10p' "$0"; exit 2;;
esac
