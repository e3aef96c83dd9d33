#!/usr/bin/env bash
# Runs the gateway against a local RabbitMQ (installed and started if none answers at AMQP_URL).
# Local development defaults: AUTH_MODE=insecure (clients connect with ?user_id=), port 8081.
# Every setting can be overridden by its environment variable; extra arguments go to wsnotify.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

export AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export AUTH_MODE="${AUTH_MODE:-insecure}"
export RUST_LOG="${RUST_LOG:-info}"
ensure_cargo
ensure_rabbitmq
log "building and starting wsnotify (AUTH_MODE=$AUTH_MODE, port ${SERVER_PORT:-8081})"
exec cargo run --release --locked --bin wsnotify -- "$@"
