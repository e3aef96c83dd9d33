#!/usr/bin/env bash
# A/B two (or more) wsnotify builds with the same loadtest options, alternating the order each
# round so neither build always runs first on a shared machine. Prints one line per run.
#
#   loadtest/ab.sh OUTDIR ROUNDS "LOADTEST OPTIONS" BIN_A BIN_B [BIN_C…]
#   loadtest/ab.sh /tmp/ab 2 "-n 19000 --scenarios idle,fanout,disconnect" ./wsnotify-before ./wsnotify-after
#
# Each run is `loadtest compare --only wsnotify --wsnotify BIN …` (a fresh server, queue and
# port); its JSON lands in OUTDIR/<bin name>.<round>.json. Needs jq.
set -euo pipefail
out=$1 rounds=$2 opts=$3
shift 3
lt=${LOADTEST:-target/release/loadtest}
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
  bins=("$@")
  if [ $((r % 2)) -eq 0 ]; then mapfile -t bins < <(printf '%s\n' "$@" | tac); fi
  for b in "${bins[@]}"; do
    f="$out/$(basename "$b").$r.json"
    # shellcheck disable=SC2086
    timeout 1800 "$lt" compare --only wsnotify --wsnotify "$b" --quiet --json $opts >"$f" 2>"${f%.json}.log"
    jq -r --arg b "$(basename "$b")" --arg r "$r" '.wsnotify[0] | [$b, "round " + $r,
      "idle B/conn " + ((.idle_bytes_per_conn // 0) | floor | tostring),
      "burst kept B/conn " + ((.burst_kept_bytes_per_conn // 0) | floor | tostring),
      "after disconnect MB " + (((.rss_after_disconnect_over_start // 0) / 1e6) * 10 | floor / 10 | tostring),
      "fan-out f/s " + ((.fanout.frames_per_sec // 0) | floor | tostring),
      "sustained p99 ms " + (((.sustained.latency.p99_us // 0) / 1000) | floor | tostring),
      "unicast p99 ms " + (((.unicast.latency.p99_us // 0) / 1000) | floor | tostring),
      "gateway p99 µs " + ((.unicast.gateway_p99_us // 0) | tostring),
      "handshakes/s " + (.handshakes_per_sec | floor | tostring)] | join("  ")' "$f"
  done
done
