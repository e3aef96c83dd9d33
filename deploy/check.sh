#!/usr/bin/env bash
# Checks the deployment files without a Docker engine.
#
#   deploy/check.sh          docker-compose.swarm.yml against the Compose Specification schema,
#                            interpolation (default and overridden WEBSOCKET_REPLICAS), the rules
#                            the deployment relies on (deploy/check_compose.py), the Dockerfile's
#                            shape, and `docker stack config` when a docker CLI is installed; the
#                            same for it merged with docker-compose.rabbitmq-cluster.yml (the
#                            optional 3-node RabbitMQ cluster) plus the cluster's own rules
#   deploy/check.sh --build  also the Dockerfile's static build, done here with cargo, and a run
#                            of the result in an empty root directory, as FROM scratch would
#                            (that part needs root for chroot and mknod)
#
# The schema is the compose-spec.json that check-jsonschema (PyPI) vendors; it and PyYAML are
# installed once into a virtualenv under $WSNOTIFY_CHECK_CACHE (default ~/.cache/wsnotify-deploy-check).
# --build honours CARGO_TARGET_DIR (default: target/).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECK_JSONSCHEMA_VERSION=0.39.0
PYYAML_VERSION=6.0.3
COMPOSE=docker-compose.swarm.yml
CLUSTER=docker-compose.rabbitmq-cluster.yml
build=""
case "${1:-}" in
  --build) build=1 ;;
  "") ;;
  *) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
failed=0
fail() { echo "FAIL $*"; failed=1; }

# --- tools: check-jsonschema (validator + vendored compose-spec.json), PyYAML
cache="${WSNOTIFY_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wsnotify-deploy-check}"
venv="$cache/venv-$CHECK_JSONSCHEMA_VERSION"
if ! "$venv/bin/python" -c 'import check_jsonschema, yaml' 2>/dev/null; then
  step "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION and PyYAML $PYYAML_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" "PyYAML==$PYYAML_VERSION"
fi
py="$venv/bin/python"
schema="$("$py" -c 'import importlib.resources as r; print(r.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json")')"

step "$COMPOSE, as written, against the Compose Specification schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$COMPOSE" || fail "schema (raw file)"

step "$CLUSTER, as written, against the Compose Specification schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec "$CLUSTER" || fail "schema ($CLUSTER)"

step "$COMPOSE interpolated (defaults, WEBSOCKET_REPLICAS=7, WEBSOCKET_REPLICAS=1), alone and with $CLUSTER: schema and rules; Dockerfile"
"$py" deploy/check_compose.py --compose "$COMPOSE" --overlay "$CLUSTER" --dockerfile Dockerfile --schema "$schema" \
  --vars-example deploy/stack.env.example \
  --env WEBSOCKET_REPLICAS=7 --env WEBSOCKET_REPLICAS=1 || fail "check_compose.py"

step "docker stack config (the loader and schema \`docker stack deploy\` itself uses)"
if command -v docker >/dev/null 2>&1 && docker stack config --help >/dev/null 2>&1; then
  for replicas in "" 7; do
    want="${replicas:-3}"
    if [ -n "$replicas" ]; then vars=("WEBSOCKET_REPLICAS=$replicas"); else vars=(-u WEBSOCKET_REPLICAS); fi
    if out="$(env "${vars[@]}" docker stack config -c "$COMPOSE" 2>&1)"; then
      got="$(printf '%s' "$out" | "$py" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["services"]["wsnotify"]["deploy"]["replicas"])')"
      [ "$got" = "$want" ] && echo "ok -- WEBSOCKET_REPLICAS=${replicas:-<unset>}: replicas $got" \
        || fail "docker stack config: replicas $got, expected $want"
    else
      fail "docker stack config: $out"
    fi
  done
  if env WEBSOCKET_REPLICAS=three docker stack config -c "$COMPOSE" >/dev/null 2>&1; then
    fail "docker stack config accepted WEBSOCKET_REPLICAS=three"
  else
    echo "ok -- WEBSOCKET_REPLICAS=three is refused"
  fi
  # The cluster file merged by docker itself: three nodes, the single broker at 0 replicas.
  if out="$(env -u WEBSOCKET_REPLICAS docker stack config -c "$COMPOSE" -c "$CLUSTER" 2>&1)"; then
    got="$(printf '%s' "$out" | "$py" -c 'import sys, yaml
s = yaml.safe_load(sys.stdin)["services"]
print(sorted(n for n in s if n.startswith("rabbitmq-")), s["rabbitmq"]["deploy"]["replicas"], s["wsnotify"]["deploy"]["replicas"])')"
    [ "$got" = "['rabbitmq-1', 'rabbitmq-2', 'rabbitmq-3'] 0 3" ] && echo "ok -- with $CLUSTER: nodes rabbitmq-1..3, single broker 0 replicas, wsnotify 3" \
      || fail "docker stack config with $CLUSTER: $got"
  else
    fail "docker stack config with $CLUSTER: $out"
  fi
else
  echo "skipped: no docker CLI with \`stack config\` (Docker >= 25 CLI; no engine needed)"
fi

if [ -n "$build" ]; then
  case "$(uname -m)" in
    x86_64) triple=x86_64-unknown-linux-gnu ;;
    aarch64) triple=aarch64-unknown-linux-gnu ;;
    *) echo "no static target known for $(uname -m)"; exit 1 ;;
  esac
  target_dir="${CARGO_TARGET_DIR:-target}"
  step "static build as in the Dockerfile: RUSTFLAGS=+crt-static cargo build --release --target $triple"
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked --target "$triple" -p wsnotify --bin wsnotify
  tmp="$(mktemp -d)"
  pid=""
  cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
  trap cleanup EXIT
  objcopy --strip-debug "$target_dir/$triple/release/wsnotify" "$tmp/wsnotify"
  command -v file >/dev/null && file "$tmp/wsnotify"
  if readelf -l "$tmp/wsnotify" | grep -q 'program interpreter'; then
    fail "the binary is dynamically linked"
  else
    echo "ok -- no program interpreter: static ($(du -h "$tmp/wsnotify" | cut -f1) after --strip-debug)"
  fi
  "$tmp/wsnotify" --version
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  if SERVER_PORT="$port" "$tmp/wsnotify" healthcheck 2>/dev/null; then
    fail "healthcheck succeeded with nothing listening"
  else
    echo "ok -- healthcheck exits 1 when nothing listens"
  fi

  step "the static binary in an empty root (no libc, no NSS modules, uid 65532), like FROM scratch"
  if [ "$(id -u)" != 0 ] || ! command -v chroot >/dev/null; then
    echo "skipped: needs root and chroot"
  else
    root="$tmp/root"
    mkdir -p "$root/etc" "$root/dev"
    cp "$tmp/wsnotify" "$root/wsnotify"
    # What Docker puts into every container: /etc/hosts, /etc/resolv.conf, /dev nodes.
    printf '127.0.0.1 localhost\n127.0.0.1 broker.check\n' >"$root/etc/hosts"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    for node in "null 1 3" "zero 1 5" "random 1 8" "urandom 1 9"; do
      set -- $node
      mknod -m 666 "$root/dev/$1" c "$2" "$3"
    done
    # A name only /etc/hosts knows, on a closed port: "refused" proves the lookup worked.
    env -i SERVER_PORT="$port" AUTH_MODE=insecure AMQP_URL="amqp://guest:guest@broker.check:1/%2f" \
      "$(command -v chroot)" --userspec=65532:65532 "$root" /wsnotify serve >"$tmp/serve.log" 2>&1 &
    pid=$!
    ok=""
    for _ in $(seq 1 50); do
      if env -i SERVER_PORT="$port" "$(command -v chroot)" --userspec=65532:65532 "$root" /wsnotify healthcheck 2>/dev/null; then
        ok=1; break
      fi
      sleep 0.2
    done
    [ -n "$ok" ] && echo "ok -- serving; \`wsnotify healthcheck\` inside the root exits 0" || fail "healthcheck never passed"
    sleep 1
    if grep -q 'failed to lookup' "$tmp/serve.log"; then
      fail "host name lookup failed without NSS modules: $(grep -m1 'failed to lookup' "$tmp/serve.log")"
    elif grep -q 'refused' "$tmp/serve.log"; then
      echo "ok -- broker.check resolved through /etc/hosts (connection refused on port 1, as intended)"
    else
      fail "no broker connection attempt in the log"
    fi
    kill -TERM "$pid"
    rc=0; wait "$pid" || rc=$?
    pid=""
    [ "$rc" = 0 ] && echo "ok -- SIGTERM: exit 0" || fail "SIGTERM: exit $rc"
    [ "$failed" = 0 ] || cat "$tmp/serve.log"
  fi
fi

echo
if [ "$failed" = 0 ]; then echo "deploy/check.sh: all checks passed"; else echo "deploy/check.sh: FAILED"; fi
exit "$failed"
