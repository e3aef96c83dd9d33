//! Faults the gateway must ride out without losing what it holds: running out of file
//! descriptors, and the broker cutting its link in the middle of a stream of deliveries.
//! (A full broker restart stops the shared broker, so it lives in `broker_restart.rs`, which
//! runs on its own after the parallel pass.)

mod common;
mod reliability_support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use reliability_support::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Descriptors the gateway may hold in the descriptor test (its start-up needs about 25).
const FD_LIMIT: u64 = 200;

/// Tries a WebSocket handshake; `Ok(socket)` on 101, `Err(what the gateway answered)`.
async fn try_upgrade(addr: std::net::SocketAddr, user: &str) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    s.write_all(upgrade_request(&format!("user_id={user}")).as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    match bounded(Duration::from_secs(3), read_head(&mut s)).await {
        None => Err("no answer within 3 s".into()),
        Some(Err(e)) => Err(format!("read: {e}")),
        Some(Ok(head)) if head.starts_with("HTTP/1.1 101 ") => Ok(s),
        Some(Ok(head)) => Err(head.lines().next().unwrap_or("").to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_exhaustion_refuses_the_excess_without_spinning_and_recovers() {
    let q = unique("fds");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    // MAX_CONNECTIONS far above what the descriptors allow: accept(2) hits EMFILE first.
    let gw = Gateway::start(
        &q,
        &[("MAX_CONNECTIONS", "5000"), ("PING_INTERVAL_MS", "60000")],
    )
    .await;
    let pid = gw.pid();
    let mut keeper = spawn_reader(gw.connect_user("keeper").await);
    let fds_at_start = open_fds(pid);
    set_nofile(pid, FD_LIMIT);

    // Fill every descriptor with WebSocket connections, until the gateway cannot take one more.
    let t = Instant::now();
    let mut held = Vec::new();
    let first_refusal = loop {
        match try_upgrade(gw.addr, &format!("h{}", held.len())).await {
            Ok(s) => held.push(s),
            Err(why) => break why,
        }
        assert!(held.len() < FD_LIMIT as usize, "the limit did not bite");
    };
    eprintln!(
        "fd exhaustion: gateway held {fds_at_start} fds at start; {} connections fit under RLIMIT_NOFILE={FD_LIMIT} ({:?}); the next got: {first_refusal}",
        held.len(),
        t.elapsed()
    );
    assert!(held.len() > 100, "only {} connections fit", held.len());
    gw.wait_log("accept failed").await;

    // More arrive while exhausted: each is refused with 503 at once, none hangs.
    let mut refusals: HashMap<String, usize> = HashMap::new();
    let t = Instant::now();
    for i in 0..50 {
        let why = try_upgrade(gw.addr, &format!("x{i}"))
            .await
            .expect_err("no descriptor left to accept with");
        *refusals.entry(why).or_default() += 1;
    }
    let took = t.elapsed();
    eprintln!("fd exhaustion: 50 more handshakes answered in {took:?}: {refusals:?}");
    assert!(
        first_refusal.starts_with("HTTP/1.1 503 "),
        "refused with 503: {first_refusal}"
    );
    assert_eq!(
        refusals.get("HTTP/1.1 503 Service Unavailable"),
        Some(&50),
        "every excess handshake is refused with 503 at once"
    );
    assert!(took < Duration::from_secs(10), "refusals took {took:?}");

    // Exhausted, the gateway idles: no busy accept loop.
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    // A client that retries as fast as it can: 10 handshakes a second for 3 s.
    let mut knocks = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        let why = try_upgrade(gw.addr, "knock").await.expect_err("refused");
        assert!(why.starts_with("HTTP/1.1 503 "), "{why}");
        knocks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cpu = cpu_time(pid) - cpu0;
    let share = cpu.as_secs_f64() / t0.elapsed().as_secs_f64();
    eprintln!(
        "fd exhaustion: gateway CPU over {:?} while exhausted, refusing {knocks} handshakes: {cpu:?} ({:.1} % of a core)",
        t0.elapsed(),
        share * 100.0
    );
    assert!(share < 0.10, "the gateway spins while out of descriptors");
    assert!(alive(pid), "the gateway crashed");

    // The connections it holds are still served, both ways.
    broker
        .publish_json(&q, &to_all("while_exhausted", json!(1)))
        .await;
    let (_, f) = within("keeper frame", keeper.recv()).await.unwrap();
    assert_eq!(f["type"], "while_exhausted");
    for s in held.iter_mut().step_by(37) {
        assert_eq!(
            read_text(s, WAIT).await["type"],
            "while_exhausted",
            "held connections still get frames"
        );
    }

    // Some close: new connections are accepted again.
    let freed = 30;
    for mut s in held.drain(..freed) {
        let _ = s
            .write_all(&masked(OP_CLOSE, &close_payload(1000, b"")))
            .await;
        let mut sink = Vec::new();
        let _ = bounded(WAIT, s.read_to_end(&mut sink)).await;
    }
    let again = within("a new connection after some closed", async {
        loop {
            match try_upgrade(gw.addr, "again").await {
                Ok(s) => return s,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert_eq!(gw.get("/healthz").await.0, 200);
    assert!(
        gw.metric("wsnotify_accept_errors_total").await > 0,
        "EMFILE was counted"
    );
    drop(again);
    assert!(alive(pid));
}
