//! A connection's life: keepalive, slow readers, oversized frames, client messages, broker
//! link loss, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Completes a WebSocket handshake by hand and returns the raw socket: a peer that then never
/// reads nor answers pings.
async fn silent_peer(gw: &Gateway, user: &str) -> TcpStream {
    raw_ws(gw.addr, &format!("user_id={user}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peers_are_closed_and_removed_while_live_ones_stay() {
    let _load = light().await;
    let q = unique("keepalive");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("PING_INTERVAL_MS", "200")]).await;
    let mut live = gw.connect_user("live").await;
    // The live client answers pings because it keeps reading.
    let (tx, mut frames) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = live.next().await {
            if let Message::Text(t) = m {
                let _ = tx.send(t.to_string());
            }
        }
    });
    let _silent = silent_peer(&gw, "silent").await;
    gw.wait_metric("wsnotify_connections", 2).await;
    gw.wait_metric("wsnotify_closes_total{reason=\"dead_peer\"}", 1)
        .await;
    gw.wait_metric("wsnotify_connections", 1).await;
    gw.wait_metric("wsnotify_users", 1).await;
    broker
        .publish_json(&q, &to_user("live", "still", json!(true)))
        .await;
    let got = within("frame for the live client", frames.recv())
        .await
        .expect("live client still connected");
    assert!(got.contains("\"still\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_too_slowly_is_closed_with_1013_and_others_get_everything() {
    let _load = light().await;
    let q = unique("slow");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(
        &q,
        &[
            ("MAX_MESSAGE_BYTES", "8192"),
            ("CLIENT_QUEUE_BYTES", "1048576"),
        ],
    )
    .await;

    // The slow client: a tiny receive buffer, and it does not read until the end.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let stream = sock.connect(gw.addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(gw.ws_url("user_id=slow"), stream)
        .await
        .unwrap();

    let fast = gw.connect_user("fast").await;
    gw.wait_metric("wsnotify_connections", 2).await;
    let received = Arc::new(AtomicUsize::new(0));
    let progress = Arc::new(tokio::sync::Notify::new());
    let (counter, notify) = (received.clone(), progress.clone());
    tokio::spawn(async move {
        let mut fast = fast;
        while let Some(Ok(m)) = fast.next().await {
            if m.is_text() {
                counter.fetch_add(1, Ordering::Relaxed);
                notify.notify_waiters();
            }
        }
        notify.notify_waiters();
    });
    // 6 MB in ten rounds; the healthy client keeps up with each round, the slow one cannot.
    let data = "x".repeat(6000);
    for round in 1..=10 {
        for i in 0..100 {
            broker
                .publish_json(&q, &to_all("bulk", json!({"i": i, "pad": data})))
                .await;
        }
        within("the healthy client to keep up", async {
            loop {
                let n = progress.notified();
                tokio::pin!(n);
                n.as_mut().enable();
                if received.load(Ordering::Relaxed) >= round * 100 {
                    return;
                }
                n.await;
            }
        })
        .await;
    }
    assert_eq!(received.load(Ordering::Relaxed), 1000);
    gw.wait_metric("wsnotify_closes_total{reason=\"slow_consumer\"}", 1)
        .await;
    let close = next_close(&mut slow).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1013);
    // Polling once more sends the client's close reply, completing the handshake.
    assert!(within("end of stream", slow.next()).await.is_none());
    gw.wait_metric("wsnotify_connections", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_client_frames_close_with_1009_and_client_text_is_ignored() {
    let _load = light().await;
    let q = unique("clientframes");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CLIENT_FRAME_BYTES", "1024")]).await;
    let mut chatty = gw.connect_user("chatty").await;
    send_text(&mut chatty, "hello gateway").await;
    gw.wait_metric("wsnotify_client_messages_ignored_total", 1)
        .await;
    broker
        .publish_json(&q, &to_user("chatty", "reply", json!(1)))
        .await;
    assert_eq!(
        next_frame(&mut chatty).await["type"],
        "reply",
        "still connected"
    );

    let mut big = gw.connect_user("big").await;
    send_text(&mut big, &"x".repeat(2000)).await;
    let close = next_close(&mut big).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1009);
    gw.wait_metric("wsnotify_closes_total{reason=\"frame_too_large\"}", 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_link_cut_reconnects_without_dropping_clients() {
    let _load = light().await;
    let q = unique("linkcut");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;
    let mut ws = gw.connect_user("u").await;
    broker
        .publish_json(&q, &to_user("u", "before", json!(1)))
        .await;
    assert_eq!(next_frame(&mut ws).await["type"], "before");

    let name = within("the gateway's broker connection", async {
        loop {
            if let Some(n) = broker_connection_of(gw.pid()).await {
                return n;
            }
        }
    })
    .await;
    let status = rabbitmqctl(&["close_connection", &name, "wsnotify test: link cut"]).await;
    assert!(status.status.success(), "{status:?}");

    gw.wait_log("broker link down").await;
    gw.wait_metric("wsnotify_broker_connects_total", 2).await;
    gw.wait_ready().await;
    assert_eq!(
        gw.metric("wsnotify_connections").await,
        1,
        "WebSocket clients were kept"
    );
    broker
        .publish_json(&q, &to_user("u", "after", json!(2)))
        .await;
    assert_eq!(next_frame(&mut ws).await["type"], "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_with_1001_loses_nothing_and_exits_0() {
    let _load = light().await;
    let q = unique("sigterm");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let mut gw = Gateway::start(&q, &[("AMQP_PREFETCH", "20")]).await;
    let mut ws = gw.connect_user("u").await;
    let mut other = gw.connect_user("v").await;
    let total = 3000;
    for i in 0..total {
        broker
            .publish_json(&q, &to_user("u", "seq", json!(i)))
            .await;
    }
    // Signal mid-stream.
    for _ in 0..20 {
        next_frame(&mut ws).await;
    }
    gw.signal(libc::SIGTERM);
    let mut received = 20;
    let close = within("close 1001", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(
                        v["data"],
                        json!(received),
                        "in order, no gaps, no duplicates"
                    );
                    received += 1;
                }
                Some(Ok(Message::Close(c))) => return c,
                Some(Ok(_)) => {}
                other => panic!("expected frames then a close, got {other:?}"),
            }
        }
    })
    .await
    .expect("close frame");
    assert_eq!(u16::from(close.code), 1001);
    assert_eq!(
        u16::from(next_close(&mut other).await.expect("close frame").code),
        1001
    );
    assert_eq!(
        gw.wait_exit(std::time::Duration::from_secs(15)).await,
        Some(0)
    );
    let left = broker.count(&q).await as usize;
    assert_eq!(
        received + left,
        total,
        "delivered {received} + requeued {left} must be every message"
    );
    assert!(
        left > 0,
        "the signal should have arrived mid-stream (delivered {received})"
    );
}
