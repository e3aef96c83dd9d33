//! Slow consumers under a stream of broadcasts: clients that never read must not cost the
//! healthy ones their latency, nor the gateway its memory. Each slow client's queue is bounded
//! by `CLIENT_QUEUE_BYTES`; when it overflows the client is closed with 1013.
//!
//! Latency is measured end to end (publisher clock in `data.t` → arrival at a healthy client),
//! in the same test, without slow clients (before and after) and with them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

const HEALTHY: usize = 4;
const WAVES: usize = 8;
const PER_WAVE: usize = 25;
const RATE_PER_SEC: u64 = 250;
const CLIENT_QUEUE_BYTES: usize = 65_536;

/// Publishes broadcasts at a steady rate, stamped with the publisher's clock, for `run`.
async fn stream(q: &str, phase: &str, run: Duration) -> u64 {
    let broker = Broker::connect().await;
    let pad = "p".repeat(1500);
    let period = Duration::from_micros(1_000_000 / RATE_PER_SEC);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < run {
        tick.tick().await;
        broker
            .publish_json(
                q,
                &to_all(
                    "tick",
                    json!({ "t": now_us(), "phase": phase, "i": n, "pad": pad }),
                ),
            )
            .await;
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_are_cut_off_without_hurting_healthy_latency_or_memory() {
    let _alone = heavy().await;
    let q = unique("slowlat");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let queue_bytes = CLIENT_QUEUE_BYTES.to_string();
    let gw = Gateway::start(
        &q,
        &[
            ("MAX_MESSAGE_BYTES", "4096"),
            ("CLIENT_QUEUE_BYTES", &queue_bytes),
            // The slow clients read their close only after the stream: keep their sockets
            // until then (tests/backpressure.rs covers the reset of clients that never do).
            ("CLOSE_TIMEOUT_MS", "60000"),
        ],
    )
    .await;
    let pid = gw.pid();
    let mut healthy = Vec::new();
    for i in 0..HEALTHY {
        healthy.push(spawn_reader(gw.connect_user(&format!("healthy{i}")).await));
    }
    // Phase A: no slow clients.
    let n_a = stream(&q, "a", Duration::from_millis(1500)).await;
    let (base_a, rxs) = collect("a", n_a, healthy).await;
    let rss_base = rss_kib(pid);

    // Phase B: waves of clients that never read (small receive buffers) join while the
    // stream flows; each fills its queue and is cut off.
    let peak = Arc::new(AtomicU64::new(rss_base));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let addr = gw.addr;
    let slow_joiners = tokio::spawn(async move {
        let mut slow = Vec::new();
        for w in 0..WAVES {
            for i in 0..PER_WAVE {
                slow.push(raw_ws_with(addr, &format!("user_id=slow{w}_{i}"), Some(4096)).await);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        slow
    });
    let q2 = q.clone();
    let publisher = tokio::spawn(async move { stream(&q2, "b", Duration::from_secs(3)).await });
    let n_b = publisher.await.unwrap();
    let (with_slow, rxs) = collect("b", n_b, rxs).await;
    let mut slow = slow_joiners.await.unwrap();
    let total_slow = (WAVES * PER_WAVE) as u64;
    // Every slow client is cut off; the stream goes on until the last wave overflowed.
    let q3 = q.clone();
    let tail = tokio::spawn(async move { stream(&q3, "c", Duration::from_secs(2)).await });
    gw.wait_metric(
        "wsnotify_closes_total{reason=\"slow_consumer\"}",
        total_slow,
    )
    .await;
    sampling.store(false, Ordering::Relaxed);
    sampler.await.unwrap();
    let n_c = tail.await.unwrap();
    let (_, rxs) = collect("c", n_c, rxs).await;
    // Each slow client, reading at last, finds a 1013 close after the frames that fit its
    // queue, and answers it (one that never does is reset after CLOSE_TIMEOUT_MS).
    let mut codes = std::collections::BTreeMap::new();
    for s in slow.iter_mut() {
        let ending = read_close(s, WAIT).await;
        *codes.entry(format!("{ending:?}")).or_insert(0) += 1;
    }
    gw.wait_metric("wsnotify_connections", HEALTHY as u64).await;

    // Phase D: no slow clients again.
    let n_d = stream(&q, "d", Duration::from_millis(1500)).await;
    let (base_d, _rxs) = collect("d", n_d, rxs).await;
    let peak = peak.load(Ordering::Relaxed);
    eprintln!(
        "slow consumers: {total_slow} clients that never read joined in {WAVES} waves during a {RATE_PER_SEC}/s broadcast stream of 1.6 KB frames ({} messages)",
        n_a + n_b + n_c + n_d
    );
    eprintln!("  closes seen by the slow clients: {codes:?}");
    eprintln!("  healthy latency without slow clients (before): {base_a}");
    eprintln!("  healthy latency with slow clients joining:     {with_slow}");
    eprintln!("  healthy latency without slow clients (after):  {base_d}");
    eprintln!(
        "  gateway RSS {rss_base} KiB before, peak {peak} KiB (+{} KiB) with slow clients; queue bound {total_slow} x {} KiB",
        peak.saturating_sub(rss_base),
        CLIENT_QUEUE_BYTES / 1024
    );
    assert_eq!(
        codes.get("Close(Some(1013))").copied(),
        Some(total_slow as usize),
        "every slow client is closed with 1013"
    );
    // Memory: well under what the queues could hold at most, and nothing is left behind.
    let bound_kib = (total_slow as usize * CLIENT_QUEUE_BYTES / 1024) as u64;
    assert!(
        peak.saturating_sub(rss_base) < bound_kib,
        "RSS grew by {} KiB with slow clients (bound {bound_kib} KiB)",
        peak.saturating_sub(rss_base)
    );
    // Latency: at most twice the worse of the two runs without slow clients. Loopback
    // latencies are fractions of a millisecond, so 1 ms (p50) / 5 ms (p99) of scheduler noise
    // on a shared 2-core machine is allowed on top.
    let p50 = base_a.p50.max(base_d.p50);
    let p99 = base_a.p99.max(base_d.p99);
    assert!(
        with_slow.p50 <= 2 * p50 + 1000,
        "median latency {with_slow} vs {p50} µs without slow clients"
    );
    assert!(
        with_slow.p99 <= 2 * p99 + 5000,
        "p99 latency {with_slow} vs {p99} µs without slow clients"
    );
}
