//! The load test in CI form: 2,000 real WebSocket connections (the `loadtest` crate's client
//! pool, in-process) against the real binary and broker, 20 back-to-back broadcasts and one
//! message per user through RabbitMQ. Fails unless every connection gets every frame exactly
//! once, in a bounded time. The full-size runs are in BENCHMARKS.md.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::support::{Broker, Gateway, amqp_url, heavy, unique};
use loadtest::client::{Auth, Pool, Stats, Target};
use loadtest::publish::Publisher;
use loadtest::worker::user_ids;

const CONNECTIONS: usize = 2_000;
const BROADCASTS: u64 = 20;
const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_get_every_frame() {
    let _alone = heavy().await;
    let q = unique("loadtest_smoke");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[]).await;

    let target = Target {
        addr: gw.addr,
        path: "/ws".into(),
        src: None,
        auth: Auth::Insecure,
        concurrency: 128,
        connect_timeout: Duration::from_secs(10),
    };
    let users = user_ids(&format!("{q}-u"), 0, CONNECTIONS);
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let pool = tokio::time::timeout(LIMIT, Pool::connect(&target, &users, stats.clone()))
        .await
        .expect("2,000 connections within 30 s");
    let connected = stats.connected.load(Ordering::Relaxed);
    assert_eq!(
        connected,
        CONNECTIONS as u64,
        "connected {connected}, failed {}",
        stats.failed.load(Ordering::Relaxed)
    );
    let connect_secs = started.elapsed().as_secs_f64();

    let mut publisher = Publisher::connect(amqp_url(), &q, 200)
        .await
        .expect("publisher");
    let started = Instant::now();
    for _ in 0..BROADCASTS {
        publisher.broadcast().await.expect("publish broadcast");
    }
    for u in &users {
        publisher.to_user(u).await.expect("publish to user");
    }
    let expected = BROADCASTS * CONNECTIONS as u64 + CONNECTIONS as u64;
    let frames = || stats.frames.load(Ordering::Relaxed);
    let delivered = tokio::time::timeout(LIMIT, async {
        while frames() < expected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    // Nothing extra may follow (a duplicate would show up here): one more broadcast marks the
    // end, and each connection gets its frames in order, so once every connection has the
    // marker, any duplicate of an earlier frame has arrived too.
    publisher.broadcast().await.expect("publish the end marker");
    let expected = expected + CONNECTIONS as u64;
    let _ = tokio::time::timeout(LIMIT, async {
        while frames() < expected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let got = frames();
    let latency = loadtest::client::lock(&stats.latency).clone();
    eprintln!(
        "loadtest smoke: {CONNECTIONS} connections in {connect_secs:.2} s; {got}/{expected} frames in {secs:.2} s; latency p50 {} µs, p99 {} µs, max {} µs",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.max()
    );
    assert!(
        delivered.is_ok(),
        "delivery incomplete after {LIMIT:?}: {got} of {expected} frames"
    );
    assert_eq!(got, expected, "more frames than sent: duplicates");
    assert_eq!(
        stats.untimed.load(Ordering::Relaxed),
        0,
        "frames without the publisher's timestamp"
    );
    assert_eq!(latency.len(), expected);
    let closes: Vec<u64> = stats
        .closes
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .collect();
    assert!(
        closes.iter().all(|&c| c == 0),
        "server closed connections: {closes:?}"
    );
    assert_eq!(
        stats.dropped.load(Ordering::Relaxed),
        0,
        "connections dropped"
    );
    assert_eq!(stats.open.load(Ordering::Relaxed), CONNECTIONS as i64);

    publisher.close().await;
    pool.close_all(Duration::from_secs(10)).await;
    assert_eq!(stats.open.load(Ordering::Relaxed), 0, "every client closed");
}
