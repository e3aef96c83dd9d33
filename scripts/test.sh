#!/usr/bin/env bash
# Runs every test: Rust unit and integration tests against the real local RabbitMQ, and the
# browser client's tests in headless Chromium. Installs and starts what is missing (RabbitMQ,
# Chromium, npm packages). Ends with one line: "tests: N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
ensure_cargo || exit 1
ensure_rabbitmq || exit 1
ensure_pika || exit 1

passed=0; failed=0; status=0
out=$(mktemp); trap 'rm -f "$out"' EXIT

count_cargo() {
  local p f
  p=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) passed.*/\1/' | paste -sd+ - | bc 2>/dev/null || echo 0)
  f=$(grep -E '^test result:' "$out" | sed -E 's/.* ([0-9]+) failed.*/\1/' | paste -sd+ - | bc 2>/dev/null || echo 0)
  passed=$((passed + ${p:-0})); failed=$((failed + ${f:-0}))
}

log "cargo test (unit + integration, real RabbitMQ)"
cargo test --locked --all-targets --no-fail-fast 2>&1 | tee "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
count_cargo

log "alert rules: promtool check rules, promtool test rules"
if ensure_promtool; then
  for check in "check rules deploy/prometheus/alerts.yml" "test rules deploy/prometheus/alerts.test.yml"; do
    # shellcheck disable=SC2086
    if "$PROMTOOL" $check; then passed=$((passed + 1)); else failed=$((failed + 1)); status=1; fi
  done
else
  log "promtool could not be installed: alert rules not checked"
  failed=$((failed + 1)); status=1
fi

if [ -f client/package.json ]; then
  ensure_node && ensure_chromium || exit 1
  log "client: npm ci, build, test (headless Chromium)"
  cargo build --locked --bin wsnotify >/dev/null 2>&1
  # The browser tests start the binary just built, wherever CARGO_TARGET_DIR puts it.
  target_dir="${CARGO_TARGET_DIR:-target}"
  case "$target_dir" in /*) ;; *) target_dir="$PWD/$target_dir" ;; esac
  export WSNOTIFY_BIN="${WSNOTIFY_BIN:-$target_dir/debug/wsnotify}"
  ( cd client && npm ci --no-audit --no-fund --loglevel=error && npm run build && npm test ) 2>&1 | tee "$out"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  p=$(grep -E '^# pass ' "$out" | awk '{s+=$3} END {print s+0}')
  f=$(grep -E '^# fail ' "$out" | awk '{s+=$3} END {print s+0}')
  passed=$((passed + p)); failed=$((failed + f))
fi

# Last, alone: this test stops and restarts the shared RabbitMQ (see tests/it/broker_restart.rs).
# The integration tests are one binary (tests/it); the filter picks this module's test.
log "broker restart fault test (stops RabbitMQ for 10 s; runs alone)"
cargo test --locked --test it -- --ignored --test-threads=1 broker_restart:: 2>&1 | tee "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
count_cargo
ensure_rabbitmq || status=1

# Alone too: forming a 3-node RabbitMQ cluster (scripts/cluster.sh, beside the shared broker)
# takes 15-40 s of both cores, which would slow the timed tests above. Clusters left behind by
# an interrupted earlier run are removed first.
log "RabbitMQ cluster tests (a 3-node cluster on loopback; runs alone)"
scripts/cluster.sh prune || true
cargo test --locked --test it -- --ignored --test-threads=1 cluster:: 2>&1 | tee "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
count_cargo
scripts/cluster.sh prune || true

if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo
echo "tests: $passed passed, $failed failed"
exit "$status"
