# Shared helpers for run.sh and test.sh: install and start what the project needs when it is
# missing. Sourced, not executed.

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then
    log "apt-get update"
    apt-get update -qq >/dev/null
    apt_updated=1
  fi
  log "apt-get install -y $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# True if something accepts TCP connections on host:port.
port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; }

# Host and port of an amqp:// URL (defaults 127.0.0.1:5672).
amqp_host() { local u="${1#amqp://}"; u="${u##*@}"; u="${u%%/*}"; u="${u%%\?*}"; echo "${u%%:*}"; }
amqp_port() { local u="${1#amqp://}"; u="${u##*@}"; u="${u%%/*}"; u="${u%%\?*}"; case "$u" in *:*) echo "${u##*:}";; *) echo 5672;; esac; }

# Makes sure a RabbitMQ answers at $AMQP_URL; installs and starts a local one if the URL points
# at this machine and nothing answers.
ensure_rabbitmq() {
  local url="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  local host port
  host=$(amqp_host "$url"); port=$(amqp_port "$url")
  if port_open "$host" "$port"; then return 0; fi
  case "$host" in
    127.*|localhost) ;;
    *) log "RabbitMQ at $host:$port does not answer (AMQP_URL); start it and retry"; return 1;;
  esac
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  log "starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    if port_open "$host" "$port"; then
      # The port opens a little before the broker accepts logins.
      rabbitmqctl await_startup >/dev/null 2>&1 || true
      log "RabbitMQ is up at $host:$port"
      return 0
    fi
    sleep 1
  done
  log "RabbitMQ did not start within 120 s"
  return 1
}

ensure_cargo() {
  command -v cargo >/dev/null 2>&1 || { log "cargo is missing: install a Rust toolchain (rustup) first"; return 1; }
}

# Debian's Chromium for the browser tests (no browser download).
ensure_chromium() {
  [ -x /usr/bin/chromium ] || apt_install chromium
}

# promtool, for deploy/prometheus/alerts.yml: the one binary unpacked from Debian's prometheus
# package into a cache, not the package installed (it also holds the Prometheus server, which a
# systemd host would start on :9090). Sets PROMTOOL.
PROMTOOL=""
ensure_promtool() {
  if command -v promtool >/dev/null 2>&1; then PROMTOOL=promtool; return 0; fi
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/wsnotify/promtool"
  if [ ! -x "$cache/usr/bin/promtool" ]; then
    command -v apt-get >/dev/null 2>&1 || return 1
    if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
    local tmp; tmp=$(mktemp -d)
    log "unpacking promtool from Debian's prometheus package into $cache"
    if (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) && mkdir -p "$cache" \
      && dpkg-deb -x "$tmp"/prometheus_*.deb "$cache"; then
      rm -rf "$tmp"
    else
      rm -rf "$tmp"; return 1
    fi
  fi
  PROMTOOL="$cache/usr/bin/promtool"
}

ensure_node() {
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
}

# pika, for the README's Python publishing snippet (run by tests/it/publish.rs).
ensure_pika() {
  python3 -c 'import pika' 2>/dev/null && return 0
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-pip
  log "pip install pika"
  python3 -m pip install -q pika 2>/dev/null || python3 -m pip install -q --break-system-packages pika
}
