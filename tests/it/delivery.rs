//! Messages published to RabbitMQ reach exactly the connections they are meant for, as the
//! contract's frame, with `data` unchanged.

use crate::support::*;
use serde_json::json;

/// The frame's fields are exactly the contract's, in a broadcast and in a user frame.
fn assert_frame_shape(f: &serde_json::Value, user: Option<&str>) {
    let obj = f.as_object().expect("frame is an object");
    let mut keys: Vec<_> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec!["data", "id", "timestamp", "type"];
    if user.is_some() {
        want.push("user_id");
    }
    want.sort_unstable();
    assert_eq!(keys, want, "frame fields: {f}");
    assert_eq!(f["user_id"].as_str(), user);
    let ts = f["timestamp"].as_str().unwrap();
    assert_eq!(ts.len(), 24, "RFC 3339 UTC with milliseconds: {ts}");
    assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_message_reaches_every_connection_of_that_user_and_nobody_else() {
    let _load = light().await;
    let q = unique("user");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut alice_tab1 = gw.connect_user("alice").await;
    let mut alice_tab2 = gw.connect_user("alice").await;
    let mut bob = gw.connect_user("bob").await;

    broker
        .publish_json(
            &q,
            &to_user("alice", "welcome", json!({"message": "Welcome!"})),
        )
        .await;
    // A broadcast published after it is the next thing bob may see: if the user message had
    // leaked to him, it would arrive first.
    broker
        .publish_json(&q, &to_all("marker", json!(null)))
        .await;

    let a1 = next_frame(&mut alice_tab1).await;
    let a2 = next_frame(&mut alice_tab2).await;
    assert_frame_shape(&a1, Some("alice"));
    assert_eq!(a1["type"], "welcome");
    assert_eq!(a1["data"], json!({"message": "Welcome!"}));
    assert_eq!(a1, a2, "both tabs get the same frame");
    assert_eq!(next_frame(&mut bob).await["type"], "marker");
    assert_eq!(next_frame(&mut alice_tab1).await["type"], "marker");
    gw.wait_metric("wsnotify_messages_total{outcome=\"delivered\"}", 2)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_ids_reach_each_listed_user_with_their_own_user_id() {
    let _load = light().await;
    let q = unique("users");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut a = gw.connect_user("a").await;
    let mut b = gw.connect_user("b").await;
    let mut c = gw.connect_user("c").await;

    let env = json!({"type": "websocket_notification",
        "payload": {"user_ids": ["a", "b", "nobody"], "message_type": "balance_update", "data": {"balance": 10}}});
    broker.publish_json(&q, &env).await;
    broker.publish_json(&q, &to_all("marker", json!(1))).await;

    let fa = next_frame(&mut a).await;
    let fb = next_frame(&mut b).await;
    assert_frame_shape(&fa, Some("a"));
    assert_frame_shape(&fb, Some("b"));
    assert_eq!(fa["id"], fb["id"], "one message, one id");
    assert_eq!(fa["timestamp"], fb["timestamp"]);
    assert_eq!(fb["data"], json!({"balance": 10}));
    assert_eq!(
        next_frame(&mut c).await["type"],
        "marker",
        "c was not listed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_connection_with_one_id_and_data_unchanged() {
    let _load = light().await;
    let q = unique("broadcast");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut clients = Vec::new();
    for user in ["u1", "u2", "u2", "u3"] {
        clients.push(gw.connect_user(user).await);
    }
    // Unicode, escapes, nesting, numbers, empty containers.
    let data = json!({
        "message": "System maintenance \"tonight\" — 22:00 ✓ 日本語 😀",
        "escapes": "tab\tnewline\nbackslash\\ quote\" control\u{1}",
        "nested": {"list": [1, -2.5, 1e-7, true, null, {"deep": [[]]}], "empty": {}},
        "big": 9007199254740993u64,
        "severity": "info"
    });
    broker
        .publish_json(&q, &to_all("announcement", data.clone()))
        .await;
    let mut ids = Vec::new();
    for ws in &mut clients {
        let f = next_frame(ws).await;
        assert_frame_shape(&f, None);
        assert_eq!(f["type"], "announcement");
        assert_eq!(f["data"], data, "data is equal as JSON");
        ids.push(f["id"].as_str().unwrap().to_owned());
    }
    assert!(
        ids.windows(2).all(|w| w[0] == w[1]),
        "same id for every recipient: {ids:?}"
    );
    assert_eq!(
        uuid::Uuid::parse_str(&ids[0]).unwrap().get_version_num(),
        7,
        "gateway ids are UUID v7"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_id_is_kept_and_data_defaults_to_null() {
    let _load = light().await;
    let q = unique("ids");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut ws = gw.connect_user("u").await;
    let env = json!({"type": "websocket_notification",
        "payload": {"user_id": "u", "message_type": "notification", "id": "order-42"}});
    broker.publish_json(&q, &env).await;
    let f = next_frame(&mut ws).await;
    assert_eq!(f["id"], "order-42");
    assert!(f["data"].is_null());
    assert!(f.as_object().unwrap().contains_key("data"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_one_user_arrive_in_publish_order() {
    let _load = light().await;
    let q = unique("order");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut ws = gw.connect_user("ordered").await;
    for i in 0..300 {
        let env = if i % 10 == 0 {
            to_all("seq", json!(i))
        } else {
            to_user("ordered", "seq", json!(i))
        };
        broker.publish_json(&q, &env).await;
    }
    for i in 0..300 {
        assert_eq!(next_frame(&mut ws).await["data"], json!(i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_to_an_absent_user_is_acked_and_counted() {
    let _load = light().await;
    let q = unique("absent");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    broker
        .publish_json(&q, &to_user("ghost", "welcome", json!({})))
        .await;
    gw.wait_metric("wsnotify_messages_total{outcome=\"no_recipient\"}", 1)
        .await;
    assert_eq!(broker.count(&q).await, 0, "acked, not left in the queue");
}
