# syntax=docker/dockerfile:1
#
# wsnotify image: one static executable on an empty base (FROM scratch), run as a non-root user.
#
#   docker build -t wsnotify .
#   docker run --rm -p 8081:8081 --ulimit nofile=1048576:1048576 \
#     -e AMQP_URL=amqp://user:pass@rabbitmq:5672/%2f -e JWT_SECRET=... wsnotify
#
# Open files. Every WebSocket is one file descriptor, so the open-file limit caps how many
# connections a replica can hold. An image cannot set it: the runtime does (`docker run --ulimit
# nofile=N:N`, compose/stack `ulimits: nofile`). At start the process raises its soft limit to the
# hard one, and MAX_CONNECTIONS defaults to that limit minus 128. The runtime default varies:
# 1024 soft on Docker >= 29 (containerd 2.1.5), up to 1048576 or more on older engines. So set
# `nofile` explicitly, and size MAX_CONNECTIONS for the memory limit (docker-compose.swarm.yml
# does both).
#
# Static build. The build stage is Debian bookworm (glibc 2.36) with
# `-C target-feature=+crt-static` on the gnu target, which gives a static-pie executable with no
# program interpreter. glibc >= 2.34 has the `files` and `dns` NSS back ends built in, so host
# names (/etc/hosts, and Swarm's DNS through /etc/resolv.conf) resolve with no shared library in
# the image. `deploy/check.sh --build` repeats this build outside Docker and checks the result.
# `--target` is spelled out so that build scripts and proc macros stay ordinary host binaries.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
ARG TARGETARCH
WORKDIR /src
COPY . .
# objcopy keeps the symbols (panic backtraces still name functions) and drops the DWARF line
# tables, most of the size. The readelf guard refuses a dynamically linked result: the final
# image has no loader and no libc to run it with.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    set -eu; \
    case "${TARGETARCH:-amd64}" in \
      amd64) triple=x86_64-unknown-linux-gnu ;; \
      arm64) triple=aarch64-unknown-linux-gnu ;; \
      *) echo "unsupported TARGETARCH=${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    RUSTFLAGS="-C target-feature=+crt-static" \
      cargo build --release --locked --target "$triple" -p wsnotify --bin wsnotify; \
    mkdir -p /out; \
    objcopy --strip-debug "target/$triple/release/wsnotify" /out/wsnotify; \
    if readelf -l /out/wsnotify | grep -q 'program interpreter'; then \
      echo "wsnotify is dynamically linked; the scratch image cannot run it" >&2; exit 1; \
    fi; \
    /out/wsnotify --version

FROM scratch
COPY --from=build /out/wsnotify /wsnotify
# A numeric uid:gid needs no /etc/passwd (65532 is the usual "nonroot").
USER 65532:65532
EXPOSE 8081
STOPSIGNAL SIGTERM
# `wsnotify healthcheck` GETs http://127.0.0.1:$SERVER_PORT/healthz and exits 0 on a 200, else 1
# (3 s budget). That is liveness only: the load balancer routes on /readyz itself (see
# docker-compose.swarm.yml), so a broker outage takes replicas out of rotation without getting
# every one of them restarted.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
  CMD ["/wsnotify", "healthcheck"]
ENTRYPOINT ["/wsnotify"]
CMD ["serve"]
