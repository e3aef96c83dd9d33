#!/usr/bin/env python3
"""Checks docker-compose.swarm.yml and the Dockerfile without a Docker engine.

1. Interpolates the stack file the way Compose does (`${VAR}`, `${VAR:-default}`, `${VAR-default}`,
   `${VAR:?error}`, `${VAR:+alt}`, `$$`), once with the defaults and once per `--env NAME=VALUE`
   set, and validates every result against the Compose Specification JSON schema (`--schema`).
2. Checks the rules the deployment depends on (replica count, rolling update, drain vs. grace
   period, limits, open files, routing, secrets), which a schema cannot express.
3. With `--overlay FILE` (docker-compose.rabbitmq-cluster.yml), does the same for the stack file
   merged with the overlay, as `docker stack deploy -c stack -c overlay` would, and checks the
   RabbitMQ cluster's rules: nodes rabbitmq-1..N (odd, >= 3), one volume per node, nodes pinned
   to different hosts, the Erlang cookie a secret shared by every node, the peer discovery list
   in the mounted config file naming exactly those nodes, the single broker scaled to 0.

Exit status 0 when everything holds, 1 otherwise. Used by deploy/check.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import jsonschema
import yaml

GATEWAY = "wsnotify"
# Environment variables that would put a secret's value in the stack file or the task spec.
SECRET_VARS = {"AMQP_URL", "JWT_SECRET", "PUBLISH_API_KEY", "RABBITMQ_DEFAULT_PASS", "RABBITMQ_ERLANG_COOKIE"}
# Paths whose interpolated values Compose casts to integers.
INT_PATHS = [
    ("services", "*", "deploy", "replicas"),
    ("services", "*", "healthcheck", "retries"),
    ("services", "*", "ulimits", "*", "soft"),
    ("services", "*", "ulimits", "*", "hard"),
    ("services", "*", "ports", "*", "published"),
    ("services", "*", "ports", "*", "target"),
]
PUBLIC_PATHS = {"/ws", "/healthz"}


class Failures(list):
    def check(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


# ---------------------------------------------------------------- interpolation


def interpolate(text: str, env: dict[str, str], where: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "$":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            end, depth = i + 2, 1
            while end < len(text) and depth:
                depth += {"{": 1, "}": -1}.get(text[end], 0)
                end += 1
            if depth:
                raise ValueError(f"{where}: unterminated ${{ in {text!r}")
            out.append(expand(text[i + 2 : end - 1], env, where))
            i = end
        else:
            m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i + 1 :])
            if not m:
                raise ValueError(f"{where}: invalid $ in {text!r} (write $$ for a literal $)")
            out.append(env.get(m.group(0), ""))
            i += 1 + m.end()
    return "".join(out)


def expand(expr: str, env: dict[str, str], where: str) -> str:
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", expr, re.S)
    if not m:
        raise ValueError(f"{where}: invalid substitution ${{{expr}}}")
    name, op, arg = m.group(1), m.group(2), m.group(3) or ""
    value = env.get(name)
    is_set = value is not None
    is_nonempty = bool(value)
    present = is_nonempty if op and op.startswith(":") else is_set
    if op in (":-", "-"):
        return value if present else interpolate(arg, env, where)
    if op in (":?", "?"):
        if not present:
            raise ValueError(f"{where}: required variable {name} is missing: {arg}")
        return value
    if op in (":+", "+"):
        return interpolate(arg, env, where) if present else ""
    return value or ""


def walk(node, env, path=()):
    if isinstance(node, dict):
        return {k: walk(v, env, path + (str(k),)) for k, v in node.items()}
    if isinstance(node, list):
        return [walk(v, env, path + (str(i),)) for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:
        return interpolate(node, env, ".".join(path))
    return node


def cast_ints(doc, pattern, path=()):
    if not pattern:
        return
    head, rest = pattern[0], pattern[1:]
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, value in list(items):
        if head != "*" and key != head:
            continue
        if not rest:
            if isinstance(value, str):
                if not re.fullmatch(r"-?\d+", value.strip()):
                    raise ValueError(f"{'.'.join(map(str, path + (key,)))}: {value!r} is not an integer")
                doc[key] = int(value)
        else:
            cast_ints(value, rest, path + (key,))


def load(compose_text: str, env: dict[str, str]):
    doc = walk(yaml.safe_load(compose_text), env)
    for p in INT_PATHS:
        cast_ints(doc, p)
    return doc


def merge(base, overlay, f: "Failures", path=()):
    """`overlay` laid over `base`: mappings merge key by key, scalars override. An overlay that
    touches a list the base file already has is refused: Compose tools merge lists differently
    (by target, by source, or appended), so such an override would not mean one thing."""
    out = dict(base)
    for key, value in overlay.items():
        where = ".".join(path + (str(key),))
        if key not in base:
            out[key] = value
        elif isinstance(base[key], dict) and isinstance(value, dict):
            out[key] = merge(base[key], value, f, path + (str(key),))
        elif isinstance(base[key], (dict, list)) or isinstance(value, (dict, list)):
            f.append(f"overlay changes {where}, a list or mapping of the stack file: only add services "
                     "and top-level entries, or override scalars")
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------- rules


def seconds(duration) -> float:
    """Compose durations: `20s`, `1m30s`, `1h`, `500ms`, `1.5s`."""
    if isinstance(duration, (int, float)):
        return float(duration)
    total, rest = 0.0, str(duration).strip()
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", rest):
        total += float(num) * {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}[unit]
    if not re.fullmatch(r"(\d+(?:\.\d+)?(us|ms|s|m|h))+", rest):
        raise ValueError(f"bad duration {duration!r}")
    return total


def mem_bytes(value) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", str(value).strip().lower())
    if not m:
        raise ValueError(f"bad memory size {value!r}")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(m.group(2) or " "))


def env_dict(service) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def labels_dict(labels) -> dict[str, str]:
    if isinstance(labels, list):
        return dict(item.split("=", 1) for item in labels)
    return dict(labels or {})


def check_stack(doc, env: dict[str, str], f: Failures) -> None:
    services = doc.get("services", {})
    gw = services.get(GATEWAY)
    f.check(gw is not None, f"no `{GATEWAY}` service")
    if gw is None:
        return
    deploy = gw.get("deploy", {})
    genv = env_dict(gw)

    want = int(env.get("WEBSOCKET_REPLICAS") or 3)
    f.check(deploy.get("replicas") == want,
            f"{GATEWAY}: deploy.replicas is {deploy.get('replicas')!r}, expected {want} (WEBSOCKET_REPLICAS)")
    upd = deploy.get("update_config", {})
    f.check(upd.get("order") == "start-first", f"{GATEWAY}: update_config.order must be start-first")
    f.check(upd.get("parallelism", 1) >= 1, f"{GATEWAY}: update_config.parallelism must be >= 1")

    drain = int(genv.get("SHUTDOWN_TIMEOUT_MS") or 10000) / 1000
    grace = seconds(gw.get("stop_grace_period", "10s"))
    f.check(grace >= drain + 5,
            f"{GATEWAY}: stop_grace_period {grace:g}s must exceed SHUTDOWN_TIMEOUT_MS ({drain:g}s) by >= 5s")
    f.check(gw.get("stop_signal", "SIGTERM") == "SIGTERM", f"{GATEWAY}: stop_signal must be SIGTERM")

    hc = gw.get("healthcheck", {})
    f.check(hc.get("test", [None])[:3] == ["CMD", "/wsnotify", "healthcheck"],
            f"{GATEWAY}: healthcheck must run [CMD, /wsnotify, healthcheck]")
    f.check(seconds(hc.get("timeout", "30s")) > 3,
            f"{GATEWAY}: healthcheck timeout must exceed the subcommand's own 3 s budget")

    limits = deploy.get("resources", {}).get("limits", {})
    f.check("cpus" in limits and "memory" in limits, f"{GATEWAY}: deploy.resources.limits needs cpus and memory")

    nofile = (gw.get("ulimits") or {}).get("nofile")
    f.check(nofile is not None, f"{GATEWAY}: ulimits.nofile is not set")
    if nofile is not None:
        soft = nofile["soft"] if isinstance(nofile, dict) else nofile
        maxc = genv.get("MAX_CONNECTIONS")
        f.check(maxc is not None, f"{GATEWAY}: set MAX_CONNECTIONS (the default, nofile - 128, ignores the memory limit)")
        if maxc is not None:
            f.check(soft >= int(maxc) + 192,
                    f"{GATEWAY}: ulimits nofile {soft} must be >= MAX_CONNECTIONS {maxc} + 192")
            if "memory" in limits:
                need = int(maxc) * 15 * 1024 + 100 * 1024 * 1024
                if mem_bytes(limits["memory"]) < need:
                    print(f"warning: {GATEWAY}: memory limit {limits['memory']} is below the "
                          f"~{need / 2**20:.0f} MiB that MAX_CONNECTIONS={maxc} may need (15 KB each + 100 MB)")

    # Secrets: values only through files that Swarm mounts; every secret created outside the file.
    for name, svc in services.items():
        senv = env_dict(svc)
        leaked = SECRET_VARS & senv.keys()
        f.check(not leaked, f"{name}: {sorted(leaked)} set in the stack file; use the *_FILE variable and a secret")
        mounted = set()
        for s in svc.get("secrets", []):
            target = s if isinstance(s, str) else s.get("target") or s["source"]
            mounted.add(target if target.startswith("/") else f"/run/secrets/{target}")
        for var, value in senv.items():
            if var.endswith("_FILE") and value and value.startswith("/run/secrets/"):
                f.check(value in mounted, f"{name}: {var}={value} but no secret is mounted there")
    for name, spec in (doc.get("secrets") or {}).items():
        f.check(bool(spec) and spec.get("external") is True,
                f"secret {name}: must be external (docker secret create), not defined in the repository")

    # Routing: /ws (and /healthz) only, no stickiness, readiness-based.
    labels = labels_dict(deploy.get("labels"))
    f.check(labels.get("traefik.enable") == "true", f"{GATEWAY}: traefik.enable=true missing")
    rules = {k: v for k, v in labels.items() if re.fullmatch(r"traefik\.http\.routers\.[^.]+\.rule", k)}
    f.check(bool(rules), f"{GATEWAY}: no Traefik router rule")
    for key, rule in rules.items():
        f.check("PathPrefix" not in rule and "PathRegexp" not in rule,
                f"{key}: use exact Path() matchers; a prefix would publish more than /ws")
        paths = set(re.findall(r"Path\(\s*`([^`]*)`\s*\)", rule))
        f.check(paths and paths <= PUBLIC_PATHS, f"{key}: routes {sorted(paths)}; only {sorted(PUBLIC_PATHS)} may be public")
    f.check(not any("sticky" in k for k in labels), f"{GATEWAY}: sticky sessions are configured; they are not needed")
    hc_paths = [v for k, v in labels.items() if k.endswith(".loadbalancer.healthcheck.path")]
    f.check(hc_paths == ["/readyz"], f"{GATEWAY}: Traefik must health-check /readyz (found {hc_paths})")
    net = labels.get("traefik.swarm.network")
    names = {(spec or {}).get("name", key) for key, spec in (doc.get("networks") or {}).items()}
    f.check(net in names, f"{GATEWAY}: traefik.swarm.network={net!r} is not one of the stack's networks {sorted(names)}")
    traefik = services.get("traefik", {})
    f.check("--providers.swarm.exposedByDefault=false" in (traefik.get("command") or []),
            "traefik: --providers.swarm.exposedByDefault=false missing (every service would be published)")

    rabbit = services.get("rabbitmq", {})
    f.check(bool(rabbit.get("healthcheck")), "rabbitmq: no healthcheck")
    f.check(any(str(v).split(":")[1:2] == ["/var/lib/rabbitmq"] if isinstance(v, str) else v.get("target") == "/var/lib/rabbitmq"
                for v in rabbit.get("volumes", [])), "rabbitmq: /var/lib/rabbitmq is not on a volume")
    f.check(bool(rabbit.get("hostname")), "rabbitmq: set a fixed hostname (the node name and data directory follow it)")


CLUSTER_NODE = re.compile(r"rabbitmq-(\d+)")
RABBITMQ_DATA = "/var/lib/rabbitmq"
COOKIE_PATH = "/var/lib/rabbitmq/.erlang.cookie"
RABBITMQ_UID = "100"  # the rabbitmq user of the official Alpine image


def mounts(svc, key):
    """(source, target) of a service's volumes / secrets / configs, short or long syntax."""
    out = []
    for m in svc.get(key) or []:
        if isinstance(m, str):
            if key == "volumes":
                parts = m.split(":")
                out.append((parts[0], parts[1] if len(parts) > 1 else parts[0], {}))
            else:
                out.append((m, f"/run/secrets/{m}" if key == "secrets" else f"/{m}", {}))
        else:
            target = m.get("target") or m.get("source")
            if key == "secrets" and not target.startswith("/"):
                target = f"/run/secrets/{target}"
            out.append((m.get("source"), target, m))
    return out


def rabbitmq_conf(path: Path) -> dict[str, str]:
    """`key = value` lines of a RabbitMQ (sysctl-format) config file."""
    conf = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            conf[k] = v
    return conf


def check_cluster(doc, base_dir: Path, f: Failures) -> int:
    """Rules for a RabbitMQ cluster (services rabbitmq-1..N); returns the number of nodes."""
    services = doc.get("services", {})
    nodes = {int(m.group(1)): name for name in services if (m := CLUSTER_NODE.fullmatch(name))}
    if not nodes:
        return 0
    n = len(nodes)
    f.check(sorted(nodes) == list(range(1, n + 1)), f"cluster nodes must be rabbitmq-1..rabbitmq-{n}, got {sorted(nodes.values())}")
    f.check(n >= 3 and n % 2 == 1, f"{n} cluster nodes: use an odd number >= 3 so that a majority survives a node lost")
    single = services.get("rabbitmq")
    if single is not None:
        f.check((single.get("deploy") or {}).get("replicas") == 0,
                "rabbitmq: the single broker must have 0 replicas beside the cluster (two brokers would split the traffic)")

    users = {}
    for name, svc in services.items():
        for source, _, _ in mounts(svc, "volumes"):
            users.setdefault(source, set()).add(name)
    declared_volumes = set((doc.get("volumes") or {}).keys())

    placements, cookies, confs = {}, set(), set()
    for i in sorted(nodes):
        name = nodes[i]
        svc = services[name]
        deploy = svc.get("deploy") or {}
        f.check(svc.get("hostname") == name,
                f"{name}: hostname must be {name} (the node name rabbit@{name} follows it, and peer discovery lists it)")
        if single is not None:
            f.check(svc.get("image") == single.get("image"),
                    f"{name}: image {svc.get('image')} differs from the single broker's {single.get('image')}")
        f.check(deploy.get("mode", "replicated") == "replicated" and deploy.get("replicas", 1) == 1,
                f"{name}: exactly one task per node (mode replicated, replicas 1)")
        f.check(deploy.get("endpoint_mode") == "dnsrr",
                f"{name}: endpoint_mode dnsrr, so that the node's name resolves to the node itself")
        hc = svc.get("healthcheck") or {}
        f.check(bool(hc.get("test")) and not hc.get("disable"), f"{name}: no healthcheck")
        f.check("backend" in (svc.get("networks") or []), f"{name}: not on the backend network")

        data = [src for src, target, _ in mounts(svc, "volumes") if target == RABBITMQ_DATA]
        f.check(len(data) == 1, f"{name}: {RABBITMQ_DATA} must be on exactly one volume")
        for src in data:
            f.check(src in declared_volumes, f"{name}: volume {src} is not a named volume of the stack")
            f.check(users.get(src) == {name}, f"{name}: volume {src} is shared with {sorted(users.get(src, set()) - {name})}; one volume per node")

        constraints = tuple(sorted(((deploy.get("placement") or {}).get("constraints") or [])))
        f.check(bool(constraints), f"{name}: no placement constraint; its local volume must stay on one host")
        placements[name] = constraints

        cookie = [(src, m) for src, target, m in mounts(svc, "secrets") if target == COOKIE_PATH]
        f.check(len(cookie) == 1, f"{name}: the Erlang cookie must be a secret mounted at {COOKIE_PATH}")
        for src, m in cookie:
            cookies.add(src)
            f.check(m.get("mode") == 0o400 and str(m.get("uid")) == RABBITMQ_UID,
                    f"{name}: the cookie must be mode 0400 and owned by uid {RABBITMQ_UID} (Erlang refuses a readable cookie)")

        conf = [src for src, target, _ in mounts(svc, "configs")
                if target.startswith("/etc/rabbitmq/conf.d/") and target.endswith(".conf")]
        f.check(len(conf) == 1, f"{name}: mount the cluster config into /etc/rabbitmq/conf.d/")
        confs.update(conf)

    f.check(len(cookies) == 1, f"every node must mount the same cookie secret, got {sorted(cookies)}")
    for src in cookies:
        f.check(((doc.get("secrets") or {}).get(src) or {}).get("external") is True, f"secret {src}: must be external")
    f.check(len(set(placements.values())) == len(placements),
            f"nodes share placement constraints {placements}: two of them could land on one host")

    f.check(len(confs) == 1, f"every node must mount the same cluster config, got {sorted(confs)}")
    for src in confs:
        spec = (doc.get("configs") or {}).get(src) or {}
        f.check("file" in spec, f"config {src}: expected `file:` (the repository's deploy/rabbitmq-cluster.conf)")
        if "file" not in spec:
            continue
        path = (base_dir / spec["file"]).resolve()
        if not path.is_file():
            f.append(f"config {src}: {path} does not exist")
            continue
        conf = rabbitmq_conf(path)
        f.check(conf.get("cluster_formation.peer_discovery_backend") in ("classic_config", "rabbit_peer_discovery_classic_config"),
                f"{path.name}: cluster_formation.peer_discovery_backend must be classic_config")
        listed = {v for k, v in conf.items() if re.fullmatch(r"cluster_formation\.classic_config\.nodes\.\d+", k)}
        want = {f"rabbit@{services[name].get('hostname')}" for name in nodes.values()}
        f.check(listed == want, f"{path.name}: peer discovery lists {sorted(listed)}, the stack runs {sorted(want)}")
    return n


def check_dockerfile(text: str, compose_doc, f: Failures) -> None:
    lines, cur = [], ""
    for raw in text.splitlines():
        if re.match(r"\s*#", raw) and not cur:
            continue
        cur += raw.rstrip("\\").strip() + " " if raw.rstrip().endswith("\\") else raw.strip()
        if not raw.rstrip().endswith("\\"):
            if cur.strip():
                lines.append(cur.strip())
            cur = ""
    stages = [i for i, l in enumerate(lines) if l.upper().startswith("FROM ")]
    f.check(len(stages) >= 2, "Dockerfile: expected a multi-stage build")
    final = lines[stages[-1]:] if stages else []
    f.check(bool(final) and final[0].split()[1] == "scratch", "Dockerfile: the final stage must be FROM scratch")
    users = [l.split()[1] for l in final if l.upper().startswith("USER ")]
    f.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"), "Dockerfile: the final stage must run as a non-root USER")
    f.check(any(l.upper().startswith("EXPOSE ") and "8081" in l.split()[1:] for l in final), "Dockerfile: EXPOSE 8081 missing")
    hc = [l for l in final if l.upper().startswith("HEALTHCHECK ")]
    f.check(len(hc) == 1, "Dockerfile: one HEALTHCHECK expected in the final stage")
    if hc:
        m = re.search(r"\bCMD\s+(\[.*\])\s*$", hc[0])
        f.check(m is not None, "Dockerfile: HEALTHCHECK must use the exec form (the image has no shell)")
        if m:
            cmd = json.loads(m.group(1))
            f.check(cmd[:2] == ["/wsnotify", "healthcheck"], f"Dockerfile: HEALTHCHECK runs {cmd}")
            gw_test = compose_doc["services"][GATEWAY]["healthcheck"]["test"][1:]
            f.check(gw_test == cmd, f"compose healthcheck {gw_test} differs from the Dockerfile's {cmd}")
    f.check(not any(l.upper().startswith("RUN ") for l in final), "Dockerfile: RUN in the final stage (scratch has no shell)")
    f.check("+crt-static" in text, "Dockerfile: the build no longer asks for a static binary (+crt-static)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compose", required=True, type=Path)
    ap.add_argument("--dockerfile", required=True, type=Path)
    ap.add_argument("--schema", required=True, type=Path)
    ap.add_argument("--vars-example", required=True, type=Path,
                    help="file listing every variable the stack file reads (NAME=default lines)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="an extra environment to interpolate with (repeatable)")
    ap.add_argument("--overlay", type=Path,
                    help="a stack file deployed together with --compose (docker stack deploy -c A -c B)")
    args = ap.parse_args()

    text = args.compose.read_text()
    overlay_text = args.overlay.read_text() if args.overlay else ""
    schema = json.loads(args.schema.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    validator = validator_cls(schema, format_checker=validator_cls.FORMAT_CHECKER)
    f = Failures()

    # Every variable the file reads is documented in the example, and the example has no extras.
    # ... with the same defaults.
    plain = re.sub(r"\$\$", "", text + "\n" + overlay_text)
    used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", plain))
    defaults = dict(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?-([^}]*)\}", plain))
    documented = dict(l.split("=", 1) for l in args.vars_example.read_text().splitlines()
                      if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", l))
    f.check(used == documented.keys(),
            f"{args.vars_example}: documents {sorted(documented)}, the stack file reads {sorted(used)}")
    for var, value in defaults.items():
        f.check(documented.get(var, value) == value,
                f"{args.vars_example}: {var}={documented.get(var)} but the stack file defaults to {value}")

    # Defaults (the caller's values for these variables removed), the caller's own environment
    # when it sets any of them (what `docker stack deploy` would see), then each --env set.
    base = {k: v for k, v in os.environ.items() if k not in used}
    envs = [("defaults", base)]
    if used & os.environ.keys():
        envs.append(("caller's environment", dict(os.environ)))
    for spec in args.env:
        extra = dict(item.split("=", 1) for item in spec.split(","))
        envs.append((spec, {**base, **extra}))
    doc = None
    for label, env in envs:
        try:
            d = load(text, env)
        except ValueError as e:
            f.append(f"[{label}] interpolation: {e}")
            continue
        errors = sorted(validator.iter_errors(d), key=lambda e: list(e.absolute_path))
        for e in errors:
            f.append(f"[{label}] schema: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
        before = len(f)
        check_stack(d, env, f)
        f[before:] = [f"[{label}] {m}" for m in f[before:]]
        print(f"[{label}] {GATEWAY} replicas={d['services'][GATEWAY]['deploy']['replicas']} "
              f"schema errors={len(errors)}")
        doc = doc or d
        if not args.overlay:
            continue
        tag = f"{label} + {args.overlay.name}"
        before = len(f)
        merged = None
        try:
            over = load(overlay_text, env)
            if isinstance(over, dict):
                merged = merge(d, over, f)
            else:
                f.append(f"{args.overlay}: not a Compose file")
        except ValueError as e:
            f.append(f"interpolation: {e}")
        if merged is not None:
            errors = sorted(validator.iter_errors(merged), key=lambda e: list(e.absolute_path))
            for e in errors:
                f.append(f"schema: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
            check_stack(merged, env, f)
            nodes = check_cluster(merged, args.compose.parent, f)
            f.check(nodes > 0, f"{args.overlay}: no rabbitmq-N services")
            print(f"[{tag}] rabbitmq nodes={nodes} single broker replicas="
                  f"{(merged['services'].get('rabbitmq', {}).get('deploy') or {}).get('replicas')} "
                  f"schema errors={len(errors)}")
        f[before:] = [f"[{tag}] {m}" for m in f[before:]]
    if doc is not None:
        check_dockerfile(args.dockerfile.read_text(), doc, f)

    for m in f:
        print(f"FAIL {m}")
    return 1 if f else 0


if __name__ == "__main__":
    sys.exit(main())
