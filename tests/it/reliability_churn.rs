//! Connection churn soak: clients connect and leave as fast as they can — cleanly, abruptly
//! (TCP reset), half-way through the handshake, right after a frame — while broadcasts flow
//! and the keepalive sweep runs. Afterwards nothing may be left: the connections and users
//! gauges return to zero and RSS returns to within 10 % of its post-warm-up baseline.
//!
//! `WSNOTIFY_SOAK=1` runs it for 5 minutes after a 90 s warm-up (10 rounds; `WSNOTIFY_SOAK_SECS`
//! to choose); by default it runs 2 rounds of 4 s after a 5 s warm-up, for CI.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WORKERS: usize = 12;
const USERS: usize = 40;

#[derive(Default)]
struct Counts {
    cycles: AtomicU64,
    clean: AtomicU64,
    reset: AtomicU64,
    half_head: AtomicU64,
    after_frame: AtomicU64,
    library: AtomicU64,
    frames: AtomicU64,
    failures: AtomicU64,
}

/// One connect/disconnect of the given kind. Errors are counted, not fatal.
async fn cycle(
    addr: std::net::SocketAddr,
    kind: u64,
    user: usize,
    c: &Counts,
) -> Result<(), String> {
    let query = format!("user_id=churn{user}");
    let limit = Duration::from_secs(5);
    match kind {
        // Clean close handshake on a raw socket.
        0 => {
            let mut s = raw_ws(addr, &query).await;
            s.write_all(&masked(OP_CLOSE, &close_payload(1000, b"bye")))
                .await
                .map_err(|e| e.to_string())?;
            let mut sink = Vec::new();
            bounded(limit, s.read_to_end(&mut sink))
                .await
                .ok_or("no close from the server")?
                .map_err(|e| e.to_string())?;
            c.clean.fetch_add(1, Ordering::Relaxed);
        }
        // Vanish: TCP reset, no close frame.
        1 => {
            let s = raw_ws(addr, &query).await;
            // Linger 0 makes the close a reset; it does not block (the deprecation's concern).
            #[allow(deprecated)]
            s.set_linger(Some(Duration::ZERO))
                .map_err(|e| e.to_string())?;
            drop(s);
            c.reset.fetch_add(1, Ordering::Relaxed);
        }
        // Half a request head, then gone.
        2 => {
            let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let req = upgrade_request(&query);
            s.write_all(&req.as_bytes()[..req.len() / 2])
                .await
                .map_err(|e| e.to_string())?;
            drop(s);
            c.half_head.fetch_add(1, Ordering::Relaxed);
        }
        // Wait for a broadcast (or 100 ms), then close the TCP connection without a frame.
        3 => {
            let mut s = raw_ws(addr, &query).await;
            if bounded(Duration::from_millis(100), read_frame(&mut s))
                .await
                .is_some_and(|r| r.is_ok())
            {
                c.frames.fetch_add(1, Ordering::Relaxed);
            }
            drop(s);
            c.after_frame.fetch_add(1, Ordering::Relaxed);
        }
        // A real client library, closing properly.
        _ => {
            let (mut ws, _) = bounded(
                limit,
                tokio_tungstenite::connect_async(format!("ws://{addr}/ws?{query}")),
            )
            .await
            .ok_or("connect timed out")?
            .map_err(|e| e.to_string())?;
            ws.close(None).await.map_err(|e| e.to_string())?;
            bounded(limit, async { while ws.next().await.is_some() {} })
                .await
                .ok_or("no close from the server")?;
            c.library.fetch_add(1, Ordering::Relaxed);
        }
    }
    c.cycles.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Churns with [`WORKERS`] clients for `run`.
async fn churn(addr: std::net::SocketAddr, run: Duration, c: Arc<Counts>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (stop, c) = (stop.clone(), c.clone());
        workers.push(tokio::spawn(async move {
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                let user = (i as usize * 7 + w) % USERS;
                if let Err(e) = cycle(addr, i % 5, user, &c).await
                    && c.failures.fetch_add(1, Ordering::Relaxed) < 5
                {
                    eprintln!("churn: cycle kind {} failed: {e}", i % 5);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
}

/// Waits until the gateway holds no connection and no socket but the scrape itself, then
/// reads RSS and open descriptors. mimalloc returns freed pages after a delay, and only from a
/// thread that allocates again, and a socket just answered may still be closing: give every
/// worker a little work a few times, and take the lowest readings.
async fn settled(gw: &Gateway) -> (u64, usize) {
    gw.wait_metric("wsnotify_connections", 0).await;
    gw.wait_metric("wsnotify_users", 0).await;
    gw.wait_metric("wsnotify_sockets", 1).await;
    let (mut rss, mut fds) = (u64::MAX, usize::MAX);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let probes: Vec<_> = (0..16).map(|_| gw.get("/healthz")).collect();
        futures_util::future::join_all(probes).await;
        rss = rss.min(rss_kib(gw.pid()));
        fds = fds.min(open_fds(gw.pid()));
    }
    (rss, fds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_leaves_no_connection_and_no_memory_behind() {
    let _alone = heavy().await;
    let soak = std::env::var("WSNOTIFY_SOAK").is_ok_and(|v| v == "1");
    let total = std::env::var("WSNOTIFY_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if soak { 300 } else { 8 });
    let rounds: u64 = if soak { 10 } else { 2 };
    // Long enough for the allocator to reach its steady state (≈ 60 s of churn with mimalloc).
    let warm_up = Duration::from_secs(if soak { 90 } else { 5 });
    let q = unique("churn");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(
        &q,
        &[
            ("PING_INTERVAL_MS", "1000"),
            ("HANDSHAKE_TIMEOUT_MS", "2000"),
            // The dedupe window grows with every message until it holds this many (bounded by
            // design, ≈ 285 B each): keep it small so it is full after the warm-up and does
            // not blur what this test looks for, memory held per connection.
            ("DEDUPE_WINDOW", "1024"),
        ],
    )
    .await;

    // Broadcasts all along, 20 a second.
    let streaming = Arc::new(AtomicBool::new(true));
    let stream = {
        let (q, streaming) = (q.clone(), streaming.clone());
        tokio::spawn(async move {
            let broker = Broker::connect().await;
            let mut n = 0u64;
            while streaming.load(Ordering::Relaxed) {
                broker
                    .publish_json(&q, &to_all("churn", json!({ "n": n })))
                    .await;
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            n
        })
    };

    let counts = Arc::new(Counts::default());
    let t = Instant::now();
    churn(gw.addr, warm_up, counts.clone()).await;
    let (baseline, fds) = settled(&gw).await;
    let warm = counts.cycles.load(Ordering::Relaxed);
    eprintln!(
        "churn: warm-up {warm} cycles in {:?}; baseline RSS {baseline} KiB, {fds} descriptors",
        t.elapsed()
    );

    let mut samples = Vec::new();
    let t = Instant::now();
    for round in 0..rounds {
        churn(gw.addr, Duration::from_secs(total / rounds), counts.clone()).await;
        let (rss, fds_now) = settled(&gw).await;
        eprintln!(
            "churn: round {} done at {:?}, {} cycles so far; RSS {rss} KiB ({:+.1} % of baseline)",
            round + 1,
            t.elapsed(),
            counts.cycles.load(Ordering::Relaxed) - warm,
            (rss as f64 / baseline as f64 - 1.0) * 100.0
        );
        samples.push(rss);
        assert!(
            fds_now <= fds,
            "descriptors leaked: {fds_now} open, {fds} after warm-up"
        );
    }
    streaming.store(false, Ordering::Relaxed);
    let broadcasts = stream.await.unwrap();
    let cycles = counts.cycles.load(Ordering::Relaxed) - warm;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "churn: {cycles} connect/disconnect cycles after warm-up ({:.0}/s over {secs:.0} s incl. settling): clean {} / reset {} / half head {} / after a frame {} ({} frames) / client library {}; {} failures; {broadcasts} broadcasts",
        cycles as f64 / secs,
        counts.clean.load(Ordering::Relaxed),
        counts.reset.load(Ordering::Relaxed),
        counts.half_head.load(Ordering::Relaxed),
        counts.after_frame.load(Ordering::Relaxed),
        counts.frames.load(Ordering::Relaxed),
        counts.library.load(Ordering::Relaxed),
        counts.failures.load(Ordering::Relaxed),
    );
    assert_eq!(
        counts.failures.load(Ordering::Relaxed),
        0,
        "every cycle went through"
    );
    assert!(cycles > 1000, "only {cycles} cycles");
    let worst = samples.iter().copied().max().unwrap();
    assert!(
        worst as f64 <= baseline as f64 * 1.10,
        "RSS {samples:?} KiB after churn vs {baseline} KiB after warm-up"
    );
    // The gateway still works for a newcomer.
    let mut ws = gw.connect_user("after").await;
    broker
        .publish_json(&q, &to_user("after", "done", json!(cycles)))
        .await;
    assert_eq!(next_frame(&mut ws).await["type"], "done");
    ws.close(None).await.unwrap();
}
