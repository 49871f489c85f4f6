#!/usr/bin/env bash
# An isolated second Docker engine for testing DockerRunner against a remote engine over
# TLS, the way a Docker-in-Docker setup is reached. No docker:dind image can be pulled
# here, so it runs this machine's own dockerd with its own data root, its own containerd,
# its own bridge (rustci-dind0, 172.31.250.0/24, no NAT; never `--bridge none`, which makes
# dockerd delete the main engine's docker0) and no iptables changes, listening
# with mutual TLS on a loopback port.
#
#   setup-dind-environment.sh start     generate certificates, start the engine
#   setup-dind-environment.sh status    is it running and answering over TLS?
#   setup-dind-environment.sh test      build the test image there, run a job on it
#   setup-dind-environment.sh stop      stop the engine (keeps its data)
#   setup-dind-environment.sh cleanup   stop and delete everything it made
#
# Settings: RUSTCI_DIND_DIR (default /tmp/rustci-dind), RUSTCI_DIND_PORT (default 23760),
# RUSTCI_DIND_BRIDGE (default rustci-dind0), RUSTCI_DIND_SUBNET (default 172.31.250).
# Needs root (dockerd) and openssl.
set -euo pipefail

dir=${RUSTCI_DIND_DIR:-/tmp/rustci-dind}
bridge=${RUSTCI_DIND_BRIDGE:-rustci-dind0}
subnet=${RUSTCI_DIND_SUBNET:-172.31.250}
port=${RUSTCI_DIND_PORT:-23760}
certs=$dir/certs
host=tcp://127.0.0.1:$port
here=$(cd "$(dirname "$0")/../.." && pwd)

client_env() {
  echo "export DOCKER_HOST=$host"
  echo "export DOCKER_TLS_VERIFY=1"
  echo "export DOCKER_CERT_PATH=$certs"
}

cli() {
  docker --tlsverify --tlscacert "$certs/ca.pem" --tlscert "$certs/cert.pem" \
    --tlskey "$certs/key.pem" -H "$host" "$@"
}

make_certs() {
  mkdir -p "$certs"
  # Reuse certificates only while they are valid for another day.
  if [ -f "$certs/cert.pem" ] && openssl x509 -checkend 86400 -noout -in "$certs/cert.pem" >/dev/null 2>&1 \
     && openssl x509 -checkend 86400 -noout -in "$certs/server-cert.pem" >/dev/null 2>&1; then
    return
  fi
  (
    cd "$certs"
    openssl genrsa -out ca-key.pem 2048 2>/dev/null
    openssl req -x509 -new -key ca-key.pem -days 30 -subj "/CN=rustci-dind-ca" -out ca.pem
    openssl genrsa -out server-key.pem 2048 2>/dev/null
    openssl req -new -key server-key.pem -subj "/CN=localhost" -out server.csr
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
      -extfile server.ext -out server-cert.pem 2>/dev/null
    openssl genrsa -out key.pem 2048 2>/dev/null
    openssl req -new -key key.pem -subj "/CN=rustci-client" -out client.csr
    printf 'extendedKeyUsage=clientAuth\n' > client.ext
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
      -extfile client.ext -out cert.pem 2>/dev/null
    rm -f ./*.csr ./*.ext ca.srl
    chmod 600 ./*key.pem
  )
}

running() {
  # The pid file must name a live dockerd (a reused pid is someone else).
  [ -f "$dir/dockerd.pid" ] || return 1
  local pid
  pid=$(cat "$dir/dockerd.pid")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ]
}

start() {
  if running; then
    echo "already running (pid $(cat "$dir/dockerd.pid"))"
  else
    command -v dockerd >/dev/null || { echo "dockerd is not installed" >&2; exit 1; }
    mkdir -p "$dir/data" "$dir/exec"
    make_certs
    # Its own (empty) configuration: the machine's /etc/docker/daemon.json is the main
    # engine's and may name the same settings as the flags below.
    echo '{}' > "$dir/daemon.json"
    if ! ip link show "$bridge" >/dev/null 2>&1; then
      ip link add "$bridge" type bridge
      ip addr add "$subnet.1/24" dev "$bridge"
      ip link set "$bridge" up
    fi
    # setsid: the engine outlives this script and the caller's process group.
    setsid dockerd --config-file "$dir/daemon.json" \
      --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
      -H "$host" --tlsverify --tlscacert "$certs/ca.pem" \
      --tlscert "$certs/server-cert.pem" --tlskey "$certs/server-key.pem" \
      --bridge "$bridge" --iptables=false --ip-masq=false --shutdown-timeout 10 \
      --exec-opt native.cgroupdriver=cgroupfs --cgroup-parent rustci-dind \
      > "$dir/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 1 100); do
      if cli version >/dev/null 2>&1; then break; fi
      if ! kill -0 $! 2>/dev/null; then
        echo "dockerd exited; see $dir/dockerd.log" >&2
        tail -n 20 "$dir/dockerd.log" >&2
        exit 1
      fi
      sleep 0.2
    done
    cli version >/dev/null || { echo "the engine does not answer; see $dir/dockerd.log" >&2; exit 1; }
    echo "started an engine at $host (data in $dir)"
  fi
  echo "point a client at it with:"
  client_env
  echo "DockerRunner: Engine::Tls { address: \"$host\", ca: \"$certs/ca.pem\", cert: \"$certs/cert.pem\", key: \"$certs/key.pem\" }"
}

status() {
  if running && cli version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo "running: pid $(cat "$dir/dockerd.pid"), engine $(cli version --format '{{.Server.Version}}') at $host over TLS"
    client_env
  else
    echo "not running"
    return 1
  fi
}

test_env() {
  status >/dev/null || { echo "not running: start it first" >&2; exit 1; }
  eval "$(client_env)"
  "$here/scripts/build-test-image" >/dev/null
  job=$(mktemp --suffix=.yaml)
  trap 'rm -f "$job"' RETURN
  printf 'name: dind-check\nimage: rustci-busybox:local\nsteps:\n  - run: echo "hello from $(hostname) via TLS"; uname -s\n' > "$job"
  (cd "$here" && cargo run -q --features docker -- run "$job" --runner docker)
}

stop() {
  if running; then
    pid=$(cat "$dir/dockerd.pid")
    kill "$pid"
    # dockerd stops its containers (--shutdown-timeout 10) and its containerd first.
    for _ in $(seq 1 250); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$dir/dockerd.pid"
    echo "stopped"
  else
    echo "not running"
  fi
  # A containerd left behind by a killed dockerd.
  local cpid
  cpid=$(cat "$dir/exec/containerd/containerd.pid" 2>/dev/null || true)
  if [ -n "$cpid" ] && [ "$(cat "/proc/$cpid/comm" 2>/dev/null)" = containerd ]; then
    kill -9 "$cpid" 2>/dev/null || true
  fi
}

cleanup() {
  if running; then
    cli ps -aq | xargs -r docker --tlsverify --tlscacert "$certs/ca.pem" --tlscert "$certs/cert.pem" \
      --tlskey "$certs/key.pem" -H "$host" rm -f >/dev/null 2>&1 || true
  fi
  stop
  ip link del "$bridge" 2>/dev/null || true
  # The engine's own mounts under its data root go with it; unmount what is left.
  { awk -v d="$dir" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts || true; } \
    | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$dir" || true
  echo "removed $dir and the $bridge bridge"
}

case "${1:-start}" in
  start) start ;;
  status) status ;;
  test) test_env ;;
  stop) stop ;;
  cleanup) cleanup ;;
  *) echo "usage: $0 start|status|test|stop|cleanup" >&2; exit 2 ;;
esac
