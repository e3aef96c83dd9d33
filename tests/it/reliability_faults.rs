//! Faults the gateway must ride out without losing what it holds: running out of file
//! descriptors, and the broker cutting its link in the middle of a stream of deliveries.
//! (A full broker restart stops the shared broker, so it lives in `broker_restart.rs`, which
//! runs on its own after the parallel pass.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
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
    let _alone = heavy().await;
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

/// Collects the `data.i` of every frame a reader gets until it has `n` or `limit` passes.
async fn collect(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<(u64, serde_json::Value)>,
    into: &mut Vec<u64>,
    n: usize,
    limit: Duration,
) {
    let _ = bounded(limit, async {
        while into.len() < n {
            match rx.recv().await {
                Some((_, f)) => into.push(f["data"]["i"].as_u64().expect("data.i")),
                None => return,
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cut_mid_stream_redelivers_without_loss_or_duplicates() {
    let _load = light().await;
    let q = unique("cutstream");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("AMQP_PREFETCH", "50")]).await;
    // Two tabs of one user and a broadcast listener.
    let mut tab1 = spawn_reader(gw.connect_user("u").await);
    let mut tab2 = spawn_reader(gw.connect_user("u").await);
    let mut other = spawn_reader(gw.connect_user("v").await);
    // A publisher with its own connection, 1,000 messages a second, running through the cut
    // until told to stop: what it publishes while the gateway is away waits in the durable
    // queue.
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicUsize::new(0));
    let (q2, stop2, published2) = (q.clone(), stop.clone(), published.clone());
    let publisher = tokio::spawn(async move {
        let broker = Broker::connect().await;
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut i = 0usize;
        // Bounded even if the test never says stop.
        while !stop2.load(Ordering::Relaxed) && i < 60_000 {
            tick.tick().await;
            for _ in 0..5 {
                let msg = if i.is_multiple_of(10) {
                    to_all("seq", json!({ "i": i }))
                } else {
                    to_user("u", "seq", json!({ "i": i }))
                };
                broker.publish_json(&q2, &msg).await;
                i += 1;
            }
            published2.store(i, Ordering::Relaxed);
        }
    });
    // Cut the link while the stream is flowing.
    let mut got1 = Vec::new();
    collect(&mut tab1, &mut got1, 500, WAIT).await;
    assert_eq!(got1.len(), 500, "the stream started");
    let pid = gw.pid();
    let name = broker_connection_of(pid)
        .await
        .expect("the gateway's broker connection");
    let out = rabbitmqctl(&[
        "close_connection",
        &name,
        "wsnotify test: link cut mid-stream",
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    // What had arrived by the time the broker had closed the link.
    while let Ok((_, f)) = tab1.try_recv() {
        got1.push(f["data"]["i"].as_u64().unwrap());
    }
    let cut_at = got1.len();
    gw.wait_log("broker link down").await;
    gw.wait_metric("wsnotify_broker_connects_total", 2).await;
    // The stream goes on for a while after the link is back, then stops.
    let back_at = published.load(Ordering::Relaxed);
    within("the stream to go on", async {
        while published.load(Ordering::Relaxed) < back_at + 500 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let total = published.load(Ordering::Relaxed);
    assert!(cut_at < total, "the cut landed mid-stream");
    let mut got2 = Vec::new();
    let mut got_other = Vec::new();
    collect(&mut tab1, &mut got1, total, Duration::from_secs(30)).await;
    collect(&mut tab2, &mut got2, total, Duration::from_secs(30)).await;
    collect(
        &mut other,
        &mut got_other,
        total / 10,
        Duration::from_secs(30),
    )
    .await;
    // A little longer for any duplicate still on its way.
    for (rx, got) in [(&mut tab1, &mut got1), (&mut tab2, &mut got2)] {
        collect(rx, got, total + 1, Duration::from_millis(500)).await;
    }
    collect(
        &mut other,
        &mut got_other,
        total / 10 + 1,
        Duration::from_millis(500),
    )
    .await;

    let want: Vec<u64> = (0..total as u64).collect();
    let want_other: Vec<u64> = (0..total as u64).step_by(10).collect();
    let dup = |v: &[u64]| v.len() - v.iter().collect::<std::collections::HashSet<_>>().len();
    eprintln!(
        "link cut when {cut_at} of {total} frames had arrived: tab1 {} frames ({} duplicates), tab2 {} ({}), broadcast listener {} of {} ({}); copies dropped by dedupe {}, dead-lettered {}",
        got1.len(),
        dup(&got1),
        got2.len(),
        dup(&got2),
        got_other.len(),
        want_other.len(),
        dup(&got_other),
        gw.metric("wsnotify_duplicates_dropped_total").await,
        gw.metric("wsnotify_messages_total{outcome=\"dead_lettered\"}")
            .await,
    );
    assert_eq!(got1, want, "tab 1: every message once, in order");
    assert_eq!(got2, want, "tab 2: every message once, in order");
    assert_eq!(
        got_other, want_other,
        "broadcasts: every one once, in order"
    );
    assert_eq!(gw.metric("wsnotify_connections").await, 3, "clients kept");
    assert_eq!(broker.count(&q).await, 0);
}

/// The soft and hard open-file limits in `/proc/<pid>/limits`.
fn nofile_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files");
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_file_limit_is_raised_when_max_connections_is_set() {
    let _alone = heavy().await;
    const SOFT: u64 = 1024;
    const CONNECTIONS: usize = 1_100;
    let q = unique("nofile");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let hard = nofile_limits(std::process::id() as i32).1;
    assert!(
        hard > 1_300,
        "the test needs a hard nofile limit above 1300, not {hard}"
    );
    // Started as a container with `nofile=1024:<hard>` would start it.
    let gw = Gateway::spawn_with(
        &q,
        &[("AMQP_URL", amqp_url()), ("MAX_CONNECTIONS", "5000")],
        |cmd| {
            // SAFETY: setrlimit is async-signal-safe and touches nothing of the parent.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: SOFT,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        },
    )
    .await;
    gw.wait_ready().await;
    assert_eq!(
        nofile_limits(gw.pid()),
        (hard, hard),
        "the soft limit is raised to the hard one"
    );
    // And it is used: more connections than the old soft limit would have allowed.
    let mut held = Vec::with_capacity(CONNECTIONS);
    for chunk in (0..CONNECTIONS).collect::<Vec<_>>().chunks(50) {
        let batch = futures_util::future::join_all(
            chunk
                .iter()
                .map(|i| async move { try_upgrade(gw.addr, &format!("n{i}")).await }),
        )
        .await;
        for r in batch {
            held.push(r.expect("101 beyond 1,024 descriptors"));
        }
    }
    gw.wait_metric("wsnotify_connections", CONNECTIONS as u64)
        .await;
    eprintln!(
        "nofile: started with {SOFT}:{hard}, running with {:?}; {CONNECTIONS} connections held, {} descriptors open",
        nofile_limits(gw.pid()),
        open_fds(gw.pid())
    );
}
