#!/usr/bin/env bash
# Creates the Swarm secrets docker-compose.swarm.yml (and docker-compose.rabbitmq-cluster.yml) expects,
# on a manager node:
#
#   wsnotify_rabbitmq_credentials  RabbitMQ config lines: default_user / default_pass
#   wsnotify_amqp_url              amqp://wsnotify:<password>@rabbitmq:5672/%2f (gateway's AMQP_URL_FILE);
#                                  with --rabbitmq-cluster the three nodes' URLs, comma-separated
#   wsnotify_jwt_secret            HS256 key your token issuer signs with (gateway's JWT_SECRET_FILE)
#   wsnotify_rabbitmq_erlang_cookie  with --rabbitmq-cluster: the Erlang cookie the nodes share
#
# Usage: deploy/create-secrets.sh [--rabbitmq-cluster] --jwt-secret-file FILE   (the issuer's key, at least 16 bytes)
#        deploy/create-secrets.sh [--rabbitmq-cluster] --generate-jwt-secret    (new random key; give it to the issuer)
# --rabbitmq-cluster: for docker-compose.rabbitmq-cluster.yml (nodes rabbitmq-1..3).
# The broker password is $RABBITMQ_PASSWORD when set (letters, digits, . _ ~ - only, so it needs
# no escaping in the URL or the config file), else 32 random characters. Values go to
# `docker secret create` on stdin: nothing is written to disk or shown, except a generated JWT
# key, which is printed once because the issuer needs it.
# Secrets are immutable: to rotate one, create it under a new name and update the stack file.
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

jwt_file="" generate_jwt="" cluster=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rabbitmq-cluster) cluster=1; shift ;;
    --jwt-secret-file) jwt_file="${2:?--jwt-secret-file needs a file}"; shift 2 ;;
    --generate-jwt-secret) generate_jwt=1; shift ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$jwt_file" ] || [ -n "$generate_jwt" ] || usage

# $1 random letters and digits (2048 random bytes keep ~480 of them; no SIGPIPE under pipefail).
random() {
  local s
  s="$(head -c 2048 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')"
  printf '%s' "${s:0:$1}"
}

password="${RABBITMQ_PASSWORD:-$(random 32)}"
if ! [[ "$password" =~ ^[A-Za-z0-9._~-]{12,}$ ]]; then
  echo "RABBITMQ_PASSWORD: use at least 12 of A-Z a-z 0-9 . _ ~ -" >&2
  exit 1
fi

if [ -n "$jwt_file" ]; then
  jwt="$(cat -- "$jwt_file")"
else
  jwt="$(random 48)"
fi
jwt="${jwt%$'\n'}"
if [ "${#jwt}" -lt 16 ]; then
  echo "JWT secret: at least 16 bytes (the gateway refuses shorter ones)" >&2
  exit 1
fi

create() { # name, value on stdin
  if docker secret inspect "$1" >/dev/null 2>&1; then
    echo "secret $1 exists already; left as it is" >&2
    cat >/dev/null
  else
    docker secret create "$1" - >/dev/null
    echo "created secret $1"
  fi
}

printf 'default_user = wsnotify\ndefault_pass = %s\n' "$password" | create wsnotify_rabbitmq_credentials
if [ -n "$cluster" ]; then
  # The gateway fails over between the nodes in this order.
  printf 'amqp://wsnotify:%s@rabbitmq-1:5672/%%2f,amqp://wsnotify:%s@rabbitmq-2:5672/%%2f,amqp://wsnotify:%s@rabbitmq-3:5672/%%2f' \
    "$password" "$password" "$password" | create wsnotify_amqp_url
  random 64 | create wsnotify_rabbitmq_erlang_cookie
else
  printf 'amqp://wsnotify:%s@rabbitmq:5672/%%2f' "$password" | create wsnotify_amqp_url
fi
printf '%s' "$jwt" | create wsnotify_jwt_secret

if [ -n "$generate_jwt" ]; then
  echo "generated JWT signing key (HS256), give it to your token issuer: $jwt"
fi
