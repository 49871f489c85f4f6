#!/usr/bin/env bash
# Register, test and list runners of a running rustci-server.
#
#   manage-runners.sh setup    create a registration token (admin key) and register a runner
#   manage-runners.sh test     send a test job through the server and check its result
#   manage-runners.sh status   list the server's runners with their status and load
#
# Settings (environment):
#   RUSTCI_SERVER     server URL                  (default https://127.0.0.1:8080)
#   RUSTCI_ADMIN_KEY  admin API key               (default: read from $RUSTCI_DATA_DIR/admin.key)
#   RUSTCI_DATA_DIR   the server's data directory (default ./rustci-data)
#   RUSTCI_CA         the server's CA certificate (default: $RUSTCI_DATA_DIR/pki/ca.pem
#                     when it exists, else the system's CA bundle)
#   RUSTCI_CA_FINGERPRINT  the CA's fingerprint (sha256:…) as the server printed it,
#                     instead of RUSTCI_CA: the CA is fetched and checked with
#                     `rustci ca fetch` ($RUSTCI_BIN, default rustci on PATH)
#   RUNNER_NAME       name of the runner to register   (default registered-<kind>); it runs
#                     inside the server process, on the server's host
#   RUNNER_KIND       local, native or docker          (default native)
#   RUNNER_LABELS     comma-separated labels           (default none)
#   RUNNER_SLOTS      jobs at once                     (default 4)
#   TEST_TIMEOUT      seconds the test job may take    (default 60)
set -euo pipefail

SERVER="${RUSTCI_SERVER:-https://127.0.0.1:8080}"
DATA_DIR="${RUSTCI_DATA_DIR:-rustci-data}"
KIND="${RUNNER_KIND:-native}"
NAME="${RUNNER_NAME:-registered-$KIND}"
SLOTS="${RUNNER_SLOTS:-4}"
TEST_TIMEOUT="${TEST_TIMEOUT:-60}"

die() { echo "manage-runners: $*" >&2; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 is required but not installed"; }
need curl
need python3

# Plain HTTP only to loopback: the admin key would cross the network in clear.
if [[ "$SERVER" == http://* ]]; then
  host=${SERVER#http://}; host=${host%%/*}; host=${host%:*}; host=${host#[}; host=${host%]}
  case "$host" in
    localhost|127.*|::1) ;;
    *) die "RUSTCI_SERVER $SERVER: plain http:// only to a loopback address; use https://" ;;
  esac
fi

# How curl checks an https:// server: a CA file given, fetched by fingerprint, or found
# beside the server.
tls=()
if [[ "$SERVER" == https://* ]]; then
  ca="${RUSTCI_CA:-}"
  if [[ -z "$ca" && -n "${RUSTCI_CA_FINGERPRINT:-}" ]]; then
    bin="${RUSTCI_BIN:-rustci}"
    command -v "$bin" >/dev/null 2>&1 || die "RUSTCI_CA_FINGERPRINT needs the rustci command (set RUSTCI_BIN)"
    ca=$(mktemp)
    trap 'rm -f "$ca"' EXIT
    "$bin" ca fetch --server "$SERVER" --ca-fingerprint "$RUSTCI_CA_FINGERPRINT" -o "$ca" \
      || die "could not fetch the server's CA with the fingerprint $RUSTCI_CA_FINGERPRINT"
  fi
  if [[ -z "$ca" && -r "$DATA_DIR/pki/ca.pem" ]]; then ca="$DATA_DIR/pki/ca.pem"; fi
  if [[ -n "$ca" ]]; then
    [[ -r "$ca" ]] || die "cannot read the CA file $ca"
    tls=(--cacert "$ca")
  fi
fi

admin_key() {
  if [[ -n "${RUSTCI_ADMIN_KEY:-}" ]]; then
    printf '%s' "$RUSTCI_ADMIN_KEY"
  elif [[ -r "$DATA_DIR/admin.key" ]]; then
    tr -d '\n' < "$DATA_DIR/admin.key"
  else
    die "no admin key: set RUSTCI_ADMIN_KEY or RUSTCI_DATA_DIR (no $DATA_DIR/admin.key)"
  fi
}

# json FIELD-PATH < body: prints one field of a JSON document ("" when absent).
json() {
  python3 -c '
import json, sys
doc = json.load(sys.stdin)
for part in sys.argv[1].split("."):
    doc = doc[int(part)] if isinstance(doc, list) else (doc or {}).get(part)
print("" if doc is None else doc)' "$1"
}

# api METHOD PATH KEY [BODY]: prints the body, then the status on the last line.
api() {
  local method=$1 path=$2 key=$3 body=${4:-}
  local args=(-sS ${tls[@]+"${tls[@]}"} -X "$method" -H "X-API-Key: $key" -w '\n%{http_code}')
  if [[ -n "$body" ]]; then args+=(-H 'Content-Type: application/json' --data-binary "$body"); fi
  curl "${args[@]}" "$SERVER$path" || die "cannot reach the server at $SERVER (is it running? start it with: cargo run)"
}

# call METHOD PATH KEY [BODY]: the body on success; the error envelope explained otherwise.
call() {
  local out status body
  out=$(api "$@")
  status=${out##*$'\n'}
  body=${out%$'\n'*}
  if [[ "$status" != 2* ]]; then
    local code message
    code=$(printf '%s' "$body" | json error.code 2>/dev/null || true)
    message=$(printf '%s' "$body" | json error.message 2>/dev/null || true)
    die "$1 $2 failed: HTTP $status ${code:-} ${message:-$body}"
  fi
  printf '%s' "$body"
}

setup() {
  local key labels_json token runner
  key=$(admin_key)
  labels_json=$(python3 -c 'import json,sys; print(json.dumps([l for l in sys.argv[1].split(",") if l]))' "${RUNNER_LABELS:-}")
  token=$(call POST /api/tokens "$key" '{"ttl_seconds": 600}' | json token)
  [[ -n "$token" ]] || die "the server returned no registration token"
  runner=$(call POST /api/runners "$token" \
    "{\"name\": \"$NAME\", \"kind\": \"$KIND\", \"labels\": $labels_json, \"slots\": $SLOTS}")
  echo "registered runner $(printf '%s' "$runner" | json name) ($(printf '%s' "$runner" | json kind)) with id $(printf '%s' "$runner" | json id)"
  echo "status: $(printf '%s' "$runner" | json status)"
}

test_job() {
  local key id state log
  key=$(admin_key)
  id=$(call POST /api/jobs "$key" \
    '{"name": "runner-connectivity-test", "timeout": "'"$TEST_TIMEOUT"'s", "steps": [{"run": "echo rustci-runner-ok; uname -sm"}]}' | json id)
  echo "submitted test job $id"
  # Follow the log until the job ends (server-sent events).
  curl -sS -N ${tls[@]+"${tls[@]}"} --max-time "$((TEST_TIMEOUT + 10))" -H "X-API-Key: $key" \
    "$SERVER/api/jobs/$id/logs?follow=true" | while IFS= read -r line; do
      [[ "$line" == "event: end" ]] && break
    done || true
  local job
  job=$(call GET "/api/jobs/$id" "$key")
  state=$(printf '%s' "$job" | json state)
  log=$(call GET "/api/jobs/$id/logs" "$key")
  if [[ "$state" == succeeded && "$log" == *rustci-runner-ok* ]]; then
    echo "test job $id succeeded on runner $(printf '%s' "$job" | json runner_id)"
    printf '%s\n' "$log" | sed 's/^/  | /'
  else
    echo "test job $id did not succeed: state ${state:-unknown}" >&2
    local why outcome
    why=$(printf '%s' "$job" | json why_pending)
    outcome=$(printf '%s' "$job" | json outcome.summary)
    [[ -n "$why" ]] && echo "  waiting because: $why" >&2
    [[ -n "$outcome" ]] && echo "  outcome: $outcome" >&2
    [[ -n "$log" ]] && printf '%s\n' "$log" | sed 's/^/  | /' >&2
    exit 1
  fi
}

status() {
  local key
  key=$(admin_key)
  call GET /api/runners "$key" | python3 -c '
import json, sys
runners = json.load(sys.stdin)["runners"]
fmt = "{:<20} {:<8} {:<10} {:<8} {:<10} {}"
print(fmt.format("NAME", "KIND", "STATUS", "RUNNING", "HEALTH", "ID"))
for r in runners:
    slots = r.get("slots")
    load = "%s/%s" % (r["running"], "-" if slots is None else slots)
    print(fmt.format(r["name"], r["kind"], r["status"], load, r["health"].split(":")[0], r["id"]))
if not runners:
    print("(no runners)")'
}

case "${1:-}" in
  setup) setup ;;
  test) test_job ;;
  status) status ;;
  *) echo "usage: $0 setup|test|status" >&2; exit 2 ;;
esac
