//! Invalid broker messages are moved, unchanged, to `<queue>.dead` with the reason in
//! `x-wsnotify-error`; the main queue is acked and consuming goes on.

use crate::support::*;
use amqprs::FieldValue;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_are_dead_lettered_with_a_reason_and_the_consumer_goes_on() {
    let _load = light().await;
    let q = unique("dead");
    let mut broker = Broker::connect().await;
    // A backend declared the queue first, plain and durable, with no arguments.
    broker.declare(&q).await;
    let gw = Gateway::start(
        &q,
        &[
            ("MAX_MESSAGE_BYTES", "1024"),
            ("CLIENT_QUEUE_BYTES", "4096"),
        ],
    )
    .await;
    let mut ws = gw.connect_user("u").await;

    let big = format!(
        r#"{{"type":"websocket_notification","payload":{{"broadcast":true,"message_type":"m","data":"{}"}}}}"#,
        "x".repeat(2000)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not_json"),
        (vec![0xff, 0xfe, b'{', b'}'], "not_json"),
        (json!({"type": "email", "payload": {"user_id": "u", "message_type": "m"}}).to_string().into_bytes(), "wrong_type"),
        (json!({"type": "websocket_notification", "payload": {"message_type": "m"}}).to_string().into_bytes(), "no_target"),
        (
            json!({"type": "websocket_notification", "payload": {"message_type": "m", "user_id": "u", "broadcast": true}})
                .to_string()
                .into_bytes(),
            "two_targets",
        ),
        (
            json!({"type": "websocket_notification", "payload": {"message_type": "m", "user_id": 42}}).to_string().into_bytes(),
            "payload.user_id",
        ),
        (
            json!({"type": "websocket_notification", "payload": {"message_type": 7, "broadcast": true}}).to_string().into_bytes(),
            "payload.message_type",
        ),
        (big.into_bytes(), "too_large"),
    ];
    for (body, _) in &cases {
        broker.publish(&q, body).await;
    }
    // The consumer keeps going: a valid message after the bad ones is delivered.
    broker
        .publish_json(&q, &to_user("u", "after", json!("still here")))
        .await;
    assert_eq!(next_frame(&mut ws).await["data"], "still here");

    let dead = broker.take(&format!("{q}.dead"), cases.len()).await;
    for ((body, reason), (headers, got)) in cases.iter().zip(&dead) {
        assert_eq!(got, body, "body kept unchanged");
        let headers = headers.as_ref().expect("headers");
        let value = headers
            .get(&"x-wsnotify-error".try_into().unwrap())
            .expect("x-wsnotify-error header");
        let FieldValue::S(text) = value else {
            panic!("header is a string: {value:?}")
        };
        let text: &str = text.as_ref();
        assert!(
            text.contains(reason),
            "reason {text:?} should mention {reason}"
        );
    }
    gw.wait_metric(
        "wsnotify_messages_total{outcome=\"dead_lettered\"}",
        cases.len() as u64,
    )
    .await;
    assert_eq!(
        broker.count(&q).await,
        0,
        "every message acked from the main queue"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_declares_its_queues_when_nobody_did() {
    let _load = light().await;
    let q = unique("declare");
    let mut broker = Broker::connect().await;
    broker.cleanup(&q);
    let gw = Gateway::start(&q, &[]).await;
    let mut ws = gw.connect_user("u").await;
    broker.publish(&q, b"{}").await;
    broker.publish_json(&q, &to_user("u", "ok", json!(1))).await;
    assert_eq!(next_frame(&mut ws).await["type"], "ok");
    assert_eq!(broker.take(&format!("{q}.dead"), 1).await[0].1, b"{}");
}
