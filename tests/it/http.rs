//! The HTTP face of the gateway: health, readiness, metrics, refusals, limits, configuration.

use std::collections::BTreeSet;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const UPGRADE: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_metrics_and_unknown_paths() {
    let _load = light().await;
    let q = unique("http");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    assert_eq!(gw.get("/healthz").await.0, 200);
    assert_eq!(gw.get("/readyz").await.0, 200);
    assert_eq!(gw.get("/").await.0, 404);
    assert_eq!(gw.get("/ws/other").await.0, 404);
    let post = http_raw(
        gw.addr,
        "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    let _ws = gw.connect_user("m").await;
    let (status, body) = gw.get("/metrics").await;
    assert_eq!(status, 200);
    for series in [
        "wsnotify_connections 1",
        "wsnotify_users 1",
        "wsnotify_frames_sent_total ",
        "wsnotify_messages_total{outcome=\"delivered\"} ",
        "wsnotify_messages_total{outcome=\"no_recipient\"} ",
        "wsnotify_messages_total{outcome=\"dead_lettered\"} ",
        "wsnotify_closes_total{reason=\"slow_consumer\"} ",
        "wsnotify_broker_up 1",
        "# TYPE wsnotify_frames_sent_total counter",
    ] {
        assert!(body.contains(series), "missing {series:?} in\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_handshakes_get_an_http_status() {
    let _load = light().await;
    let q = unique("handshake");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_HEADER_BYTES", "2048")]).await;
    let cases = [
        ("plain GET", "GET /ws?user_id=u HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 426),
        ("POST", format!("POST /ws?user_id=u HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n"), 405),
        ("HTTP/1.0", format!("GET /ws?user_id=u HTTP/1.0\r\nHost: x\r\n{UPGRADE}\r\n"), 400),
        (
            "bad key",
            "GET /ws?user_id=u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n\r\n".to_owned(),
            400,
        ),
        (
            "old version",
            "GET /ws?user_id=u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_owned(),
            426,
        ),
        ("no user", format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n"), 401),
        ("oversized head", format!("GET /ws HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(4000)), 431),
        ("not HTTP", "\x16\x03\x01\x02\x00\x01\x00\x01\x7c\x03\x03\r\n\r\n".to_owned(), 400),
    ];
    for (what, req, want) in cases {
        let resp = http_raw(gw.addr, &req).await;
        assert!(
            resp.starts_with(&format!("HTTP/1.1 {want} ")),
            "{what}: {resp}"
        );
    }
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(format!("GET /ws?user_id=u HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    within("the 101 head", async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
    })
    .await;
    let ok = String::from_utf8(head).unwrap();
    assert!(ok.starts_with("HTTP/1.1 101 "), "{ok}");
    assert!(
        ok.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"),
        "RFC 6455 example key: {ok}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_finishes_its_request_head_is_closed() {
    let _load = light().await;
    let q = unique("slowloris");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("HANDSHAKE_TIMEOUT_MS", "300")]).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /ws?user_id=u HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    within("the gateway to hang up", s.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408"));
    gw.wait_metric("wsnotify_handshakes_total{result=\"timeout\"}", 1)
        .await;
    // The scrape itself is the one socket left.
    gw.wait_metric("wsnotify_sockets", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_extra_sockets_with_503() {
    let _load = light().await;
    let q = unique("maxconn");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CONNECTIONS", "2")]).await;
    let _a = gw.connect_user("a").await;
    let _b = gw.connect_user("b").await;
    assert_eq!(connect_status(&gw.ws_url("user_id=c"), &[]).await, 503);
    drop(_a);
    gw.wait_metric("wsnotify_connections", 1).await;
    assert_eq!(
        connect_status(&gw.ws_url("user_id=c"), &[]).await,
        101,
        "a freed slot is reused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_per_user_refuses_the_next_with_429() {
    let _load = light().await;
    let q = unique("peruser");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CONNECTIONS_PER_USER", "3")]).await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        tabs.push(gw.connect_user("a").await);
    }
    let resp = http_raw(
        gw.addr,
        &format!("GET /ws?user_id=a HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 429 "), "{resp}");
    assert!(
        resp.ends_with("too many connections for this user\n"),
        "{resp}"
    );
    assert_eq!(
        gw.metric("wsnotify_handshakes_total{result=\"user_limit\"}")
            .await,
        1
    );
    // Other users are not affected, and the user's three tabs keep receiving.
    let mut b = gw.connect_user("b").await;
    broker
        .publish_json(&q, &to_user("a", "m", serde_json::json!(1)))
        .await;
    broker
        .publish_json(&q, &to_user("b", "m", serde_json::json!(2)))
        .await;
    for tab in tabs.iter_mut() {
        assert_eq!(next_frame(tab).await["data"], 1);
    }
    assert_eq!(next_frame(&mut b).await["data"], 2);
    // A closed tab frees its place.
    drop(tabs.pop());
    gw.wait_metric("wsnotify_connections", 3).await;
    assert_eq!(connect_status(&gw.ws_url("user_id=a"), &[]).await, 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_the_broker_is_unreachable() {
    let _load = light().await;
    let q = unique("noready");
    let gw = Gateway::spawn(&q, &[("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")]).await;
    assert_eq!(gw.get("/healthz").await.0, 200);
    gw.wait_log("broker link down").await;
    assert_eq!(gw.get("/readyz").await.0, 503);
    assert_eq!(gw.metric("wsnotify_broker_up").await, 0);
    // Clients can still connect; they receive once the broker is back.
    assert_eq!(connect_status(&gw.ws_url("user_id=u"), &[]).await, 101);
}

/// Runs the binary with `env` and returns (exit code, stderr).
async fn start_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsnotify"));
    cmd.env_clear()
        .env("SERVER_HOST", "127.0.0.1")
        .env("SERVER_PORT", "0")
        .env("AUTH_MODE", "insecure");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = within(
        "wsnotify to refuse its config",
        cmd.kill_on_drop(true).output(),
    )
    .await
    .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_stops_start_up_with_one_line_naming_the_variable() {
    let _load = light().await;
    let cases = [
        (vec![("SERVER_PORT", "eighty")], "SERVER_PORT"),
        (vec![("SERVER_HOST", "not-an-ip")], "SERVER_HOST"),
        (vec![("AUTH_MODE", "maybe")], "AUTH_MODE"),
        (vec![("AUTH_MODE", "jwt")], "JWT_SECRET"),
        (
            vec![("AUTH_MODE", "jwt"), ("JWT_SECRET", "short")],
            "JWT_SECRET",
        ),
        (
            vec![
                ("AUTH_MODE", "jwt"),
                ("JWT_PUBLIC_KEY_FILE", "/nonexistent.pem"),
            ],
            "JWT_PUBLIC_KEY_FILE",
        ),
        (vec![("AMQP_URL", "http://localhost")], "AMQP_URL"),
        (vec![("CLIENT_QUEUE_BYTES", "10")], "CLIENT_QUEUE_BYTES"),
        (
            vec![("CLIENT_QUEUE_BYTES", "2000000000")],
            "CLIENT_QUEUE_BYTES",
        ),
        (
            vec![
                ("CLIENT_QUEUE_BYTES", "1048576"),
                ("CLIENT_QUEUE_BUDGET_BYTES", "1000000"),
            ],
            "CLIENT_QUEUE_BUDGET_BYTES",
        ),
        (vec![("CLOSE_TIMEOUT_MS", "0")], "CLOSE_TIMEOUT_MS"),
        (
            vec![("MAX_CONNECTIONS_PER_USER", "-1")],
            "MAX_CONNECTIONS_PER_USER",
        ),
        (vec![("MAX_CONNECTIONS", "0")], "MAX_CONNECTIONS"),
        (vec![("NOTIFY_QUEUE", "")], "NOTIFY_QUEUE"),
    ];
    for (env, var) in cases {
        let (code, stderr) = start_with(&env).await;
        assert_eq!(code, Some(2), "{env:?}: {stderr}");
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{env:?}: one line, got {stderr:?}");
        assert!(
            lines[0].contains(var),
            "{env:?}: {:?} should name {var}",
            lines[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_variable() {
    let _load = light().await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsnotify"))
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // What --help documents: every `[env: NAME` of an option.
    let in_help: BTreeSet<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .collect();
    // What the README's configuration table documents: the backquoted names in the first
    // column of the table headed `| variable | default | meaning |`.
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let in_readme: BTreeSet<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| variable | default | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .filter_map(|row| row.split('|').nth(1))
        .flat_map(|cell| cell.split('`').skip(1).step_by(2))
        .filter(|name| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(
        in_readme.len() >= 30,
        "the README's configuration table was not found or is short: {in_readme:?}"
    );
    // RUST_LOG is read by the log filter (tracing), not by the option parser.
    let missing: Vec<_> = in_readme
        .iter()
        .filter(|v| **v != "RUST_LOG" && !in_help.contains(*v))
        .collect();
    assert!(
        missing.is_empty(),
        "--help lacks {missing:?}, which the README documents:\n{help}"
    );
    let undocumented: Vec<_> = in_help.difference(&in_readme).collect();
    assert!(
        undocumented.is_empty(),
        "the README's configuration table lacks {undocumented:?}, which --help lists"
    );
}
