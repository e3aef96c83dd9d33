//! Publishing without hand-building envelopes: the Rust `Publisher`, `wsnotify publish`,
//! `POST /api/publish` (with a broker and standalone), and the README's Python snippet.

use std::process::Stdio;

use crate::support::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use wsnotify::amqp::confirm::PublishError;
use wsnotify::publisher::Publisher;

const KEY: &str = "publish-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_api_reaches_users_through_the_broker_with_confirms() {
    let _load = light().await;
    let q = unique("pubapi");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut alice = gw.connect_user("alice").await;
    let mut bob = gw.connect_user("bob").await;

    let p = Publisher::connect(amqp_url(), &q).await.expect("connect");
    p.notify_user("alice", "welcome", &json!({"message": "Welcome!"}))
        .await
        .expect("confirmed");
    p.notify_users(&["alice", "bob"], "balance_update", &json!({"balance": 3}))
        .await
        .expect("confirmed");
    p.broadcast("announcement", &json!({"severity": "info"}))
        .await
        .expect("confirmed");

    let a: Vec<_> = vec![
        next_frame(&mut alice).await,
        next_frame(&mut alice).await,
        next_frame(&mut alice).await,
    ];
    assert_eq!(a[0]["type"], "welcome");
    assert_eq!(a[0]["data"], json!({"message": "Welcome!"}));
    assert_eq!(a[1]["type"], "balance_update");
    assert_eq!(a[2]["type"], "announcement");
    assert!(a[2].get("user_id").is_none());
    assert_eq!(next_frame(&mut bob).await["type"], "balance_update");
    assert_eq!(next_frame(&mut bob).await["type"], "announcement");

    // An invalid notification is refused before it leaves.
    let err = p
        .notify_user("", "x", &json!(null))
        .await
        .expect_err("empty user id");
    assert!(
        matches!(err, PublishError::Invalid(ref r) if r.contains("payload.user_id")),
        "{err}"
    );
    // A message the broker cannot route (its queue was deleted) is an error, not a log line.
    broker
        .ch
        .queue_delete(amqprs::channel::QueueDeleteArguments::new(&q))
        .await
        .unwrap();
    let err = p
        .broadcast("lost", &json!(1))
        .await
        .expect_err("unroutable");
    assert!(matches!(err, PublishError::Unroutable), "{err}");
    p.close().await;
}

/// Runs `wsnotify publish` with `args`, feeding `stdin`; returns (exit code, stdout, stderr).
async fn cli(args: &[&str], env: &[(&str, &str)], stdin: &str) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsnotify"));
    cmd.arg("publish")
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.kill_on_drop(true).spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = within("wsnotify publish", child.wait_with_output())
        .await
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_user_users_broadcast_and_bulk_stdin() {
    let _load = light().await;
    let q = unique("pubcli");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut a = gw.connect_user("a").await;
    let mut b = gw.connect_user("b").await;
    let env = [("AMQP_URL", amqp_url()), ("NOTIFY_QUEUE", q.as_str())];

    let (code, out, err) = cli(
        &["--user", "a", "--type", "welcome", "--data", r#"{"k":1}"#],
        &env,
        "",
    )
    .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("confirmed 1"), "{out}");
    let f = next_frame(&mut a).await;
    assert_eq!(
        (f["type"].as_str(), &f["data"]),
        (Some("welcome"), &json!({"k": 1}))
    );

    assert_eq!(
        cli(&["--users", "a,b", "--type", "t2"], &env, "").await.0,
        Some(0)
    );
    assert_eq!(
        cli(&["--broadcast", "--type", "t3", "--id", "my-id"], &env, "")
            .await
            .0,
        Some(0)
    );
    assert_eq!(next_frame(&mut a).await["type"], "t2");
    assert_eq!(next_frame(&mut b).await["type"], "t2");
    assert_eq!(next_frame(&mut a).await["id"], "my-id");
    assert_eq!(next_frame(&mut b).await["id"], "my-id");

    // Bulk: payloads or whole envelopes, one per line.
    let mut lines = String::new();
    for i in 0..100 {
        if i % 2 == 0 {
            lines.push_str(&format!(
                "{{\"user_id\":\"a\",\"message_type\":\"bulk\",\"data\":{i}}}\n"
            ));
        } else {
            lines.push_str(&format!("{}\n", to_user("a", "bulk", json!(i))));
        }
    }
    let (code, out, err) = cli(&["--stdin"], &env, &lines).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("published 100, confirmed 100"), "{out}");
    for i in 0..100 {
        assert_eq!(next_frame(&mut a).await["data"], json!(i));
    }

    // Refusals: bad data, an invalid payload line, and an unreachable broker.
    let (code, _, err) = cli(&["--user", "a", "--type", "t", "--data", "{nope"], &env, "").await;
    assert_eq!(code, Some(1));
    assert!(err.contains("--data is not JSON"), "{err}");
    let (code, _, err) = cli(&["--stdin"], &env, "{\"message_type\":\"m\"}\n").await;
    assert_eq!(code, Some(1));
    assert!(err.contains("no_target"), "{err}");
    let down = [
        ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ("NOTIFY_QUEUE", q.as_str()),
    ];
    let (code, _, err) = cli(&["--broadcast", "--type", "t"], &down, "").await;
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot reach RabbitMQ"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_stdin_publishes_each_line_as_it_arrives() {
    let _load = light().await;
    let q = unique("pubstream");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut a = gw.connect_user("a").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wsnotify"))
        .args(["publish", "--stdin"])
        .env_clear()
        .env("AMQP_URL", amqp_url())
        .env("NOTIFY_QUEUE", &q)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    // Each line reaches the user while standard input is still open: nothing waits for the
    // end of the input (a large file starts at once, and memory stays flat).
    for i in 0..3 {
        let line = format!("{{\"user_id\":\"a\",\"message_type\":\"live\",\"data\":{i}}}\n");
        input.write_all(line.as_bytes()).await.unwrap();
        assert_eq!(next_frame(&mut a).await["data"], json!(i));
    }
    // A bad line stops the stream and says how far it got; what came before is confirmed.
    input.write_all(b"{not json\n").await.unwrap();
    drop(input);
    let out = within("wsnotify publish", child.wait_with_output())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("line 4: not JSON"), "{err}");
    assert!(err.contains("3 published before it, 3 confirmed"), "{err}");
}

/// `POST /api/publish` with `body`, `Authorization: Bearer <key>` if given.
async fn post(gw: &Gateway, key: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let raw = http_raw(
        gw.addr,
        &format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}", body.len()),
    )
    .await;
    let (status, body) = parse_response(&raw);
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_through_the_broker_and_every_error_status() {
    let _load = light().await;
    let q = unique("pubhttp");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(
        &q,
        &[
            ("PUBLISH_API_KEY", KEY),
            ("MAX_MESSAGE_BYTES", "1024"),
            ("MAX_PUBLISH_BYTES", "4096"),
        ],
    )
    .await;
    let mut ws = gw.connect_user("u").await;

    let one = to_user("u", "one", json!({"n": 1})).to_string();
    assert_eq!(
        post(&gw, Some(KEY), &one).await,
        (202, json!({"accepted": 1}))
    );
    let batch = json!([to_user("u", "two", json!(2)), to_all("three", json!(3))]).to_string();
    assert_eq!(
        post(&gw, Some(KEY), &batch).await,
        (202, json!({"accepted": 2}))
    );
    for t in ["one", "two", "three"] {
        assert_eq!(next_frame(&mut ws).await["type"], t);
    }

    assert_eq!(post(&gw, None, &one).await.0, 401);
    assert_eq!(post(&gw, Some("wrong-key-0123456789"), &one).await.0, 403);
    let (status, err) = post(&gw, Some(KEY), "{not json").await;
    assert_eq!(status, 400);
    assert!(
        err["error"].as_str().unwrap().starts_with("not_json"),
        "{err}"
    );
    let bad_batch = json!([to_user("u", "ok", json!(1)), {"type": "websocket_notification", "payload": {"user_id": 5, "message_type": "m"}}]);
    let (status, err) = post(&gw, Some(KEY), &bad_batch.to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(err["index"], 1, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("payload.user_id"),
        "{err}"
    );
    assert_eq!(post(&gw, Some(KEY), "[]").await.0, 400);
    let big_one = to_all("big", json!("x".repeat(2000))).to_string();
    assert_eq!(
        post(&gw, Some(KEY), &big_one).await.0,
        413,
        "envelope over MAX_MESSAGE_BYTES"
    );
    assert_eq!(
        post(&gw, Some(KEY), &"x".repeat(5000)).await.0,
        413,
        "body over MAX_PUBLISH_BYTES"
    );
    let get = http_raw(gw.addr, "GET /api/publish HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(get.starts_with("HTTP/1.1 405"), "{get}");
    let chunked = http_raw(
        gw.addr,
        &format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 411"), "{chunked}");
    // Nothing refused reached the user: the next frame is the next accepted message.
    assert_eq!(
        post(
            &gw,
            Some(KEY),
            &to_user("u", "last", json!(null)).to_string()
        )
        .await
        .0,
        202
    );
    assert_eq!(next_frame(&mut ws).await["type"], "last");

    // Without a key the endpoint does not exist; with the broker down it says so.
    let off = Gateway::start(&q, &[]).await;
    assert_eq!(post(&off, Some(KEY), &one).await.0, 404);
    let down = Gateway::spawn(
        &unique("pubdown"),
        &[
            ("PUBLISH_API_KEY", KEY),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    )
    .await;
    assert_eq!(post(&down, Some(KEY), &one).await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_mode_runs_without_a_broker() {
    let _load = light().await;
    let q = unique("standalone");
    let gw = Gateway::spawn_without_broker(&q, &[("PUBLISH_API_KEY", KEY)]).await;
    gw.wait_log("standalone mode").await;
    gw.wait_ready().await;
    let mut a = gw.connect_user("a").await;
    let mut b = gw.connect_user("b").await;
    let (status, _) = post(
        &gw,
        Some(KEY),
        &json!([
            to_user("a", "direct", json!({"x": 1})),
            to_all("all", json!(2))
        ])
        .to_string(),
    )
    .await;
    assert_eq!(status, 202);
    let f = next_frame(&mut a).await;
    assert_eq!(
        (f["type"].as_str(), f["user_id"].as_str()),
        (Some("direct"), Some("a"))
    );
    assert_eq!(next_frame(&mut a).await["type"], "all");
    assert_eq!(next_frame(&mut b).await["type"], "all");
    assert_eq!(gw.metric("wsnotify_broker_up").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_snippet_publishes() {
    let _load = light().await;
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let snippet = readme
        .split("<!-- python-publish-example -->")
        .nth(1)
        .and_then(|s| s.split("```python").nth(1))
        .and_then(|s| s.split("```").next())
        .expect("README has a python block after <!-- python-publish-example -->");
    let q = unique("python");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut ws = gw.connect_user("3f0c-user").await;
    let out = within(
        "python3",
        tokio::process::Command::new("python3")
            .arg("-c")
            .arg(snippet)
            .env("AMQP_URL", amqp_url())
            .env("NOTIFY_QUEUE", &q)
            .env("USER_ID", "3f0c-user")
            .output(),
    )
    .await
    .expect("python3");
    assert!(
        out.status.success(),
        "the snippet failed (is pika installed? scripts/test.sh installs it):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = next_frame(&mut ws).await;
    assert_eq!(f["type"], "welcome");
    assert_eq!(f["data"]["message"], "Welcome to our service!");
    assert_eq!(next_frame(&mut ws).await["type"], "announcement");
}
