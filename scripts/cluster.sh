#!/usr/bin/env bash
# A throwaway RabbitMQ cluster on loopback, beside the shared broker (rabbit@localhost on 5672 /
# 25672 is never touched): for tests of the gateway against several nodes, quorum queues and a
# node lost.
#
#   scripts/cluster.sh start NAME [NODES]   start NODES (default 3, at most 7) nodes and cluster them;
#                                           prints KEY=VALUE lines (below) on stdout
#   scripts/cluster.sh status NAME          the same lines plus PID_i / STATE_i / RUNNING_NODES;
#                                           exit 0 if every node runs, 1 if some do not, 3 if no such cluster
#   scripts/cluster.sh pid NAME NODE        OS pid of node NODE (1-based) of NAME (exit 1 if not running)
#   scripts/cluster.sh kill NAME NODE       SIGKILL node NODE (its whole process group, like a crash)
#                                           and wait until it is gone
#   scripts/cluster.sh restart NAME NODE    start a killed node again; returns once it is back in the cluster
#   scripts/cluster.sh ctl NAME NODE ARGS…  rabbitmqctl ARGS against node NODE (with the cluster's cookie)
#   scripts/cluster.sh stop NAME            kill every process of the cluster and delete its files
#                                           (also after a failed or interrupted start; no-op if absent)
#   scripts/cluster.sh list                 names of the clusters that exist, one per line
#   scripts/cluster.sh prune                stop the clusters whose starting process has exited
#
# Output of start and status, one KEY=VALUE per line (eval-able in sh):
#   CLUSTER=NAME  CLUSTER_DIR=…  NODES=3
#   NODE_1=NAME-1@localhost  AMQP_PORT_1=…  DIST_PORT_1=…  AMQP_URL_1=amqp://guest:guest@127.0.0.1:P1/%2f
#   … one group per node …
#   AMQP_URL=amqp://…:P1/%2f,amqp://…:P2/%2f,amqp://…:P3/%2f
# Progress and errors go to stderr.
#
# Names: [A-Za-z0-9_-], 1-40 characters. Ports (AMQP and Erlang distribution, two per node) are
# probed free in 20000-24999, away from the shared broker and the kernel's ephemeral range, and
# reserved under a lock against every other cluster of this script, so two clusters never collide.
# Each cluster lives in $WSNOTIFY_CLUSTER_ROOT/NAME (default /tmp/wsnotify-clusters/NAME): data,
# logs, config and its own Erlang cookie. Run as root, the nodes run as the `rabbitmq` user;
# otherwise as the caller. No plugins, guest may log in over loopback, nothing listens beyond
# 127.0.0.1. Every wait is bounded: WSNOTIFY_CLUSTER_TIMEOUT (default 180) seconds for start and
# restart. Installs Debian's rabbitmq-server if it is missing. Forming 3 nodes took 30-40 s on
# a 2-core machine busy with other builds; stop takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROOT="${WSNOTIFY_CLUSTER_ROOT:-/tmp/wsnotify-clusters}"
TIMEOUT="${WSNOTIFY_CLUSTER_TIMEOUT:-180}"
PORT_MIN=20000
PORT_SPAN=5000

die() { printf 'cluster.sh: %s\n' "$*" >&2; exit 1; }
say() { printf 'cluster.sh: %s\n' "$*" >&2; }
usage() { sed -n '6,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

now_ms() { date +%s%3N; }
elapsed() { local ms=$(( $(now_ms) - $1 )); printf '%d.%d s' $((ms / 1000)) $((ms % 1000 / 100)); }

# --- where RabbitMQ lives and whom its nodes run as -------------------------------------------

find_sbin() {
  # Debian's /usr/sbin/rabbitmq-server is a wrapper that switches user and redirects output to
  # /var/log/rabbitmq: use the real scripts it calls.
  if [ -n "${RABBITMQ_SBIN:-}" ]; then echo "$RABBITMQ_SBIN"; return; fi
  if [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then echo /usr/lib/rabbitmq/bin; return; fi
  local p
  p="$(command -v rabbitmq-server 2>/dev/null)" || return 1
  dirname "$(readlink -f "$p")"
}

SBIN="$(find_sbin || true)"
ensure_installed() {
  if [ -z "$SBIN" ] || [ ! -x "$SBIN/rabbitmq-server" ]; then
    apt_install rabbitmq-server
    SBIN="$(find_sbin)" || die "rabbitmq-server not found after installing it"
  fi
  command -v pgrep >/dev/null || apt_install procps
  command -v setsid >/dev/null || die "setsid (util-linux) is missing"
}

RUN_AS=""
if [ "$(id -u)" = 0 ] && id rabbitmq >/dev/null 2>&1; then RUN_AS=rabbitmq; fi

# Sets CMD to a command line that runs "$@" as the nodes' user, in a clean environment plus the
# leading VAR=value words.
node_cmd() {
  local -a envs=()
  while [ $# -gt 0 ] && [[ "$1" == *=* ]]; do envs+=("$1"); shift; done
  CMD=(env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="$DIR/home"
    LANG=C.UTF-8 LC_ALL=C.UTF-8 ERL_EPMD_ADDRESS=127.0.0.1
    RABBITMQ_CONF_ENV_FILE="$DIR/conf/rabbitmq-env.conf" "${envs[@]}" "$@")
  if [ -n "$RUN_AS" ]; then
    CMD=(setpriv --reuid="$RUN_AS" --regid="$RUN_AS" --init-groups -- "${CMD[@]}")
  fi
}

# --- names, state ---------------------------------------------------------------------------

check_name() {
  [[ "${1:-}" =~ ^[A-Za-z0-9_-]{1,40}$ ]] || die "cluster name must be 1-40 of A-Z a-z 0-9 _ - (got '${1:-}')"
}

# Loads $DIR/cluster.env into the shell (NODES, NODE_i, AMQP_PORT_i, TOKEN, ...). Returns 1 if
# the cluster does not exist.
load() {
  NAME="$1"; DIR="$ROOT/$NAME"
  [ -d "$DIR" ] || return 1
  if [ -f "$DIR/cluster.env" ]; then
    # shellcheck disable=SC1091
    . "$DIR/cluster.env"
    # shellcheck disable=SC1091
    . "$DIR/private.env"
  else
    NODES=0
  fi
}

check_node() {
  if ! [[ "${1:-}" =~ ^[1-9]$ ]] || [ "$1" -gt "$NODES" ]; then
    die "node must be 1..$NODES (got '${1:-}')"
  fi
}

var() { eval "printf '%s' \"\${$1_$2}\""; }

# TCP ports something listens on (IPv4 and IPv6), from /proc: no tools needed.
listening_ports() {
  local hex
  awk 'NR > 1 && $4 == "0A" { n = split($2, a, ":"); print a[n] }' /proc/net/tcp /proc/net/tcp6 2>/dev/null |
    sort -u | while read -r hex; do echo $((16#$hex)); done
}

# (Not `grep -q`: it would stop reading early and, under pipefail, fail the pipeline.)
listening() { [[ $'\n'"$(listening_ports)"$'\n' == *$'\n'"$1"$'\n'* ]]; }

# Chooses 2*N free ports, starting at an offset derived from the name, skipping ports that
# listen now or that another cluster of this script has reserved. Called under the ports lock.
choose_ports() {
  local n="$1" busy start p i picked=()
  busy="$( { listening_ports; cat "$ROOT"/*/cluster.env 2>/dev/null || true; } | sed -n 's/^\([A-Z]*_PORT_[0-9]*=\)\{0,1\}\([0-9][0-9]*\)$/\2/p' | sort -u)"
  start=$(( $(printf '%s' "$NAME" | cksum | cut -d' ' -f1) % PORT_SPAN ))
  for ((i = 0; i < PORT_SPAN && ${#picked[@]} < 2 * n; i++)); do
    p=$(( PORT_MIN + (start + i) % PORT_SPAN ))
    grep -qx "$p" <<<"$busy" || picked+=("$p")
  done
  [ "${#picked[@]}" -eq $((2 * n)) ] || return 1
  echo "${picked[@]}"
}

# --- processes ------------------------------------------------------------------------------

# Each node runs in its own session (setsid); its id is in run/N.sid. The beam process carries
# a tag argument naming the cluster, the node and a random token.
node_tag() { printf '%s-%s:%s' "$NAME" "$1" "$TOKEN"; }

node_pid() {
  [ -n "${TOKEN:-}" ] || return 1
  pgrep -f "wsnotify_cluster_node $(node_tag "$1")( |\$)" | head -1 | grep .
}

node_sid() { grep -xE '[0-9]+' "$DIR/run/$1.sid" 2>/dev/null; }

# Every live process of node $1: its session's process group (if the session leader is still
# this node's: a stale id may have been reused) and its tagged beam.
node_procs() {
  local sid p
  {
    if sid="$(node_sid "$1")" && ours "$sid"; then pgrep -g "$sid"; fi
    node_pid "$1" || true
  } 2>/dev/null | sort -u | while read -r p; do
    if alive "$p"; then echo "$p"; fi
  done
}

# True if pid $1 runs with this cluster's data directory in its environment.
ours() { grep -qzx "RABBITMQ_MNESIA_BASE=$DIR/data" "/proc/$1/environ" 2>/dev/null; }

cluster_procs() {
  local i
  for ((i = 1; i <= NODES; i++)); do node_procs "$i"; done
  if [ -n "${TOKEN:-}" ]; then pgrep -f "wsnotify_cluster_node ${NAME}-[0-9]+:${TOKEN}( |\$)" || true; fi
}

# True while pid $1 exists and is not a zombie (a killed node's parent may reap it late).
alive() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  [ "${stat%% *}" != Z ]
}

# SIGKILLs the given pids and waits (at most 15 s) until none of them is left.
kill_wait() {
  local pids="$1" left p
  [ -n "$pids" ] || return 0
  # shellcheck disable=SC2086
  kill -9 $pids 2>/dev/null || true
  for _ in $(seq 1 150); do
    left=""
    for p in $pids; do alive "$p" && left="$left $p"; done
    [ -z "$left" ] && return 0
    sleep 0.1
  done
  say "processes still alive after SIGKILL:$left"
  return 1
}

# rabbitmqctl against node $1, bounded by $2 seconds.
ctl_node() {
  local i="$1" t="$2"; shift 2
  node_cmd timeout -k 5 "$t" "$SBIN/rabbitmqctl" -n "$(var NODE "$i")" "$@"
  "${CMD[@]}"
}

# Starts node $1 in the background, in its own session (whose id goes to run/N.sid).
launch() {
  local i="$1"
  node_cmd \
    RABBITMQ_NODENAME="$(var NODE "$i")" \
    RABBITMQ_DIST_PORT="$(var DIST_PORT "$i")" \
    RABBITMQ_CONFIG_FILE="$DIR/conf/$i.conf" \
    RABBITMQ_CONFIG_FILES="$DIR/conf/conf.d" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/conf/advanced.config" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/conf/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$DIR/data" \
    RABBITMQ_LOG_BASE="$DIR/log" \
    RABBITMQ_PID_FILE="$DIR/run/$i.pid" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} -wsnotify_cluster_node $(node_tag "$i")" \
    "$SBIN/rabbitmq-server"
  rm -f "$DIR/run/$i.sid"
  # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
  setsid bash -c 'echo $$ >"$1"; shift; exec "$@"' _ "$DIR/run/$i.sid" "${CMD[@]}" \
    >"$DIR/log/$i.out" 2>&1 </dev/null &
  disown $!  # no "Killed" notice from bash when stop kills it
  # The sid file appears as soon as the session exists: stop relies on it.
  for _ in $(seq 1 50); do node_sid "$i" >/dev/null && return 0; sleep 0.1; done
  die "node $i did not start a session"
}

# Waits until node $1 listens on its AMQP port (the listener opens once the node has booted and
# joined its peers), failing early if its processes are gone.
await_listener() {
  local i="$1" deadline="$2" port
  port="$(var AMQP_PORT "$i")"
  while :; do
    listening "$port" && return 0
    if [ -z "$(node_procs "$i")" ]; then
      say "node $i exited during start-up; its output and log:"
      tail -n 20 "$DIR/log/$i.out" "$DIR/log/$(var NODE "$i").log" >&2 2>/dev/null || true
      return 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "node $i is not listening on $port after ${TIMEOUT} s; its log:"
      tail -n 20 "$DIR/log/$(var NODE "$i").log" >&2 2>/dev/null || true
      return 1
    fi
    sleep 0.2
  done
}

remaining() { local r=$(( $1 - $(date +%s) )); [ "$r" -gt 1 ] && echo "$r" || echo 1; }

print_env() { cat "$DIR/cluster.env"; }

# --- commands -------------------------------------------------------------------------------

cmd_start() {
  NAME="${1:-}"; check_name "$NAME"
  NODES="${2:-3}"
  [[ "$NODES" =~ ^[1-7]$ ]] || die "NODES must be 1..7 (got '$NODES')"
  ensure_installed
  local t0 deadline i ports
  t0="$(now_ms)"; deadline=$(( $(date +%s) + TIMEOUT ))
  mkdir -p "$ROOT" 2>/dev/null || true
  [ -w "$ROOT" ] || die "cannot write to $ROOT: set WSNOTIFY_CLUSTER_ROOT to a directory of yours"
  DIR="$ROOT/$NAME"
  # mkdir is the claim on the name: it fails if the cluster exists.
  mkdir "$DIR" 2>/dev/null || die "cluster $NAME exists ($DIR): scripts/cluster.sh stop $NAME first"
  # Whatever ends this start early (an error, a timeout, a signal) removes what it made.
  STARTED=""
  trap '[ -n "$STARTED" ] || { say "start of $NAME failed; removing it"; cmd_stop "$NAME" || true; }' EXIT
  trap 'exit 130' INT TERM
  mkdir -p "$DIR"/{home,conf/conf.d,data,log,run}
  TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  local owner="${WSNOTIFY_CLUSTER_OWNER:-$PPID}"
  {
    echo "TOKEN=$TOKEN"
    echo "OWNER_PID=$owner"
    echo "OWNER_START=$(cut -d' ' -f22 "/proc/$owner/stat" 2>/dev/null || echo 0)"
  } >"$DIR/private.env"

  # Reserve ports under a lock so that concurrent starts pick different ones.
  exec 9>"$ROOT/.ports.lock"
  flock -w 30 9 || die "could not lock $ROOT/.ports.lock"
  read -ra ports <<<"$(choose_ports "$NODES" || true)"
  [ "${#ports[@]}" -eq $((2 * NODES)) ] ||
    die "no $((2 * NODES)) free ports in $PORT_MIN-$((PORT_MIN + PORT_SPAN - 1))"
  {
    echo "CLUSTER=$NAME"
    echo "CLUSTER_DIR=$DIR"
    echo "NODES=$NODES"
    local urls=""
    for ((i = 1; i <= NODES; i++)); do
      local ap="${ports[$((2 * i - 2))]}" dp="${ports[$((2 * i - 1))]}"
      local url="amqp://guest:guest@127.0.0.1:$ap/%2f"
      echo "NODE_$i=$NAME-$i@localhost"
      echo "AMQP_PORT_$i=$ap"
      echo "DIST_PORT_$i=$dp"
      echo "AMQP_URL_$i=$url"
      urls="${urls:+$urls,}$url"
    done
    echo "AMQP_URL=$urls"
  } >"$DIR/cluster.env"
  flock -u 9; exec 9>&-
  load "$NAME"

  # Configuration: the listener on loopback only, guest allowed over loopback, no plugins.
  # Node 1 forms the cluster and nodes 2..N, which list only node 1 for classic_config peer
  # discovery, join it as they boot (together, once node 1 is up). That needs no stop_app /
  # join_cluster / start_app; it is also the mechanism the Swarm file uses.
  echo '[].' >"$DIR/conf/enabled_plugins"
  : >"$DIR/conf/rabbitmq-env.conf"
  for ((i = 1; i <= NODES; i++)); do
    {
      echo "listeners.tcp.default = 127.0.0.1:$(var AMQP_PORT "$i")"
      echo "loopback_users = none"
      # Small disk and memory alarms never fire on a developer machine full of test data.
      echo "disk_free_limit.absolute = 50MB"
      if [ "$i" -gt 1 ]; then
        echo "cluster_formation.peer_discovery_backend = classic_config"
        echo "cluster_formation.classic_config.nodes.1 = $NODE_1"
        # Keep looking for node 1 (every 0.5 s) rather than giving up after 5 s and running
        # alone.
        echo "cluster_formation.discovery_retry_limit = $((TIMEOUT * 2))"
        echo "cluster_formation.discovery_retry_interval = 500"
      fi
    } >"$DIR/conf/$i.conf"
  done
  # Its own cookie: CLI commands of this script reach only this cluster's nodes.
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$DIR/home/.erlang.cookie"
  chmod 400 "$DIR/home/.erlang.cookie"
  if [ -n "$RUN_AS" ]; then chown -R "$RUN_AS:" "$DIR"/{home,conf,data,log,run}; fi

  say "starting $NAME: $NODES nodes, AMQP ports $(for ((i = 1; i <= NODES; i++)); do printf '%s ' "$(var AMQP_PORT "$i")"; done)(dir $DIR)"
  # A node opens its AMQP listener last, once it has booted and joined its peers. Node 1 boots
  # alone first: a node that joins it while it is still creating its schema can fail with
  # schema_integrity_check_failed (seen here); nodes 2..N then boot together.
  launch 1
  await_listener 1 "$deadline"
  say "node 1 up after $(elapsed "$t0")"
  for ((i = 2; i <= NODES; i++)); do launch "$i"; done
  for ((i = 2; i <= NODES; i++)); do
    await_listener "$i" "$deadline"
    say "node $i up after $(elapsed "$t0")"
  done
  # The cluster's own word that every node is in it (a node that failed to join would run alone).
  ctl_node 1 "$(remaining "$deadline")" await_online_nodes "$NODES" --timeout "$(remaining "$deadline")" >/dev/null
  STARTED=1
  say "cluster $NAME formed: $NODES nodes in $(elapsed "$t0")"
  print_env
}

cmd_stop() {
  NAME="${1:-}"; check_name "$NAME"
  load "$NAME" || return 0
  local t0; t0="$(now_ms)"
  kill_wait "$(cluster_procs | sort -u | tr '\n' ' ')" || true
  # Processes are gone: their files can go (as root the files belong to the nodes' user).
  rm -rf "$DIR"
  [ ! -e "$DIR" ] || die "could not remove $DIR"
  say "stopped $NAME in $(elapsed "$t0")"
}

cmd_status() {
  NAME="${1:-}"; check_name "$NAME"
  load "$NAME" || { say "no cluster $NAME"; exit 3; }
  print_env
  local i pid all=0 running=""
  for ((i = 1; i <= NODES; i++)); do
    if pid="$(node_pid "$i")" && listening "$(var AMQP_PORT "$i")"; then
      echo "PID_$i=$pid"; echo "STATE_$i=running"
      [ -n "$running" ] || running="$i"
    elif pid="$(node_pid "$i")"; then
      echo "PID_$i=$pid"; echo "STATE_$i=starting"; all=1
    else
      echo "PID_$i="; echo "STATE_$i=stopped"; all=1
    fi
  done
  if [ -n "$running" ]; then
    # The cluster's own view, from a running node.
    local nodes
    nodes="$(ctl_node "$running" 30 eval 'rabbit_nodes:all_running().' 2>/dev/null |
      tr -d "[]' \n" || true)"
    echo "RUNNING_NODES=$nodes"
  else
    echo "RUNNING_NODES="
  fi
  return "$all"
}

cmd_pid() {
  load "${1:-}" || die "no cluster ${1:-}"
  check_node "${2:-}"
  node_pid "$2" || die "node $2 of $NAME is not running"
}

cmd_kill() {
  load "${1:-}" || die "no cluster ${1:-}"
  check_node "${2:-}"
  local procs
  procs="$(node_procs "$2" | sort -u | tr '\n' ' ')"
  [ -n "${procs// /}" ] || die "node $2 of $NAME is not running"
  kill_wait "$procs"
  rm -f "$DIR/run/$2.sid"
  say "killed node $2 of $NAME (pids $procs)"
}

cmd_restart() {
  load "${1:-}" || die "no cluster ${1:-}"
  check_node "${2:-}"
  local i="$2" t0 deadline
  [ -z "$(node_procs "$i")" ] || die "node $i of $NAME is running; kill it first"
  t0="$(now_ms)"; deadline=$(( $(date +%s) + TIMEOUT ))
  launch "$i"
  await_listener "$i" "$deadline"
  say "node $i of $NAME back after $(elapsed "$t0")"
}

cmd_ctl() {
  load "${1:-}" || die "no cluster ${1:-}"
  check_node "${2:-}"
  local i="$2"; shift 2
  ctl_node "$i" "$TIMEOUT" "$@"
}

cmd_list() {
  local d
  for d in "$ROOT"/*/; do [ -d "$d" ] && basename "$d"; done
  return 0
}

cmd_prune() {
  local name owner start
  for name in $(cmd_list); do
    [[ "$name" =~ ^[A-Za-z0-9_-]{1,40}$ ]] || continue
    owner="$(sed -n 's/^OWNER_PID=//p' "$ROOT/$name/private.env" 2>/dev/null)"
    start="$(sed -n 's/^OWNER_START=//p' "$ROOT/$name/private.env" 2>/dev/null)"
    if [ -n "$owner" ] && [ "$(cut -d' ' -f22 "/proc/$owner/stat" 2>/dev/null)" = "$start" ]; then
      continue
    fi
    # No private.env: a start that died before writing it, or one in its first milliseconds.
    if [ -z "$owner" ] && [ -n "$(find "$ROOT/$name" -maxdepth 0 -newermt '60 seconds ago')" ]; then
      continue
    fi
    say "pruning $name (its owner $owner has exited)"
    ( cmd_stop "$name" ) || true
  done
}

case "${1:-}" in
  start) shift; cmd_start "$@" ;;
  stop) shift; cmd_stop "$@" ;;
  status) shift; cmd_status "$@" ;;
  pid) shift; cmd_pid "$@" ;;
  kill) shift; cmd_kill "$@" ;;
  restart) shift; cmd_restart "$@" ;;
  ctl) shift; cmd_ctl "$@" ;;
  list) cmd_list ;;
  prune) cmd_prune ;;
  *) usage ;;
esac
