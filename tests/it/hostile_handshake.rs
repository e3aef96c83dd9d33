//! A flood of handshakes — half-sent heads held open (slowloris), valid upgrades at full
//! speed, garbage that is not HTTP — against a gateway that serves connected clients a steady
//! stream. Every attempt is answered (101, an HTTP error, or 503 when full) within its
//! deadline, and the connected clients keep getting every frame on time.
//! (Single slowloris, 431, 400/426 and MAX_CONNECTIONS are in `http.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use parking_lot::Mutex;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RESIDENTS: usize = 20;
const MAX_CONNECTIONS: usize = 200;
/// Sockets allowed above MAX_CONNECTIONS for HTTP and handshakes (config::HTTP_HEADROOM).
const HEADROOM: usize = 64;
const HOLDERS: usize = 320;

type Tally = Arc<Mutex<BTreeMap<String, u64>>>;

fn count(t: &Tally, what: impl Into<String>) {
    *t.lock().entry(what.into()).or_default() += 1;
}

/// Sends `req` and returns the status line of the answer, or how the socket ended.
async fn attempt(addr: std::net::SocketAddr, req: &[u8], limit: Duration) -> String {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return "connect failed".into();
    };
    if s.write_all(req).await.is_err() {
        return "reset while sending".into();
    }
    let mut head = Vec::new();
    let ended = bounded(limit, async {
        let mut b = [0u8; 1];
        loop {
            match s.read(&mut b).await {
                Ok(0) => return "closed without an answer".to_owned(),
                Ok(_) => {
                    head.push(b[0]);
                    if head.ends_with(b"\r\n") {
                        return String::from_utf8_lossy(&head).trim_end().to_owned();
                    }
                }
                Err(_) => return "reset".to_owned(),
            }
        }
    })
    .await;
    ended.unwrap_or_else(|| "no answer in time".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_is_served_or_refused_without_starving_connected_clients() {
    let _alone = heavy().await;
    let q = unique("flood");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let max = MAX_CONNECTIONS.to_string();
    let gw = Gateway::start(
        &q,
        &[
            ("MAX_CONNECTIONS", &max),
            ("HANDSHAKE_TIMEOUT_MS", "1500"),
            ("MAX_HEADER_BYTES", "4096"),
        ],
    )
    .await;
    let mut residents = Vec::new();
    for i in 0..RESIDENTS {
        residents.push(spawn_reader(gw.connect_user(&format!("resident{i}")).await));
    }

    // A steady stream to the residents all along: 100 broadcasts a second.
    let streaming = Arc::new(AtomicBool::new(true));
    let phase = Arc::new(Mutex::new("before"));
    // How many ticks the stream has published.
    let (ticks_tx, mut ticks) = tokio::sync::watch::channel(0u64);
    let stream = {
        let (q, streaming, phase) = (q.clone(), streaming.clone(), phase.clone());
        tokio::spawn(async move {
            let broker = Broker::connect().await;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut n = 0u64;
            while streaming.load(Ordering::Relaxed) {
                tick.tick().await;
                let p = *phase.lock();
                broker
                    .publish_json(
                        &q,
                        &to_all("tick", json!({ "t": now_us(), "n": n, "phase": p })),
                    )
                    .await;
                n += 1;
                ticks_tx.send_replace(n);
            }
            n
        })
    };
    // A second of calm ticks first.
    within("100 calm ticks", ticks.wait_for(|&n| n >= 100))
        .await
        .expect("the stream runs");
    *phase.lock() = "flood";

    let outcomes: Tally = Arc::default();
    let flooding = Arc::new(AtomicBool::new(true));
    let t = Instant::now();
    let (gw_cpu0, my_cpu0) = (cpu_time(gw.pid()), cpu_time(std::process::id() as i32));
    // 1. Slowloris: heads that never finish, held open, more than the gateway has slots for.
    let holders = {
        let outcomes = outcomes.clone();
        let addr = gw.addr;
        tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..HOLDERS {
                match TcpStream::connect(addr).await {
                    Ok(mut s) => {
                        let _ = s
                            .write_all(b"GET /ws?user_id=loris HTTP/1.1\r\nHost: x\r\n")
                            .await;
                        held.push(s);
                    }
                    Err(_) => count(&outcomes, "slowloris: connect failed"),
                }
            }
            held
        })
    };
    // 2. Valid upgrades at full speed, closed at once; 3. garbage and malformed requests.
    let mut stormers = Vec::new();
    for w in 0..8 {
        let (outcomes, flooding, addr) = (outcomes.clone(), flooding.clone(), gw.addr);
        stormers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while flooding.load(Ordering::Relaxed) {
                let (kind, req): (&str, Vec<u8>) = match (w + i) % 4 {
                    0 | 1 => (
                        "upgrade",
                        upgrade_request(&format!("user_id=storm{w}")).into_bytes(),
                    ),
                    2 => {
                        let mut junk = vec![0u8; fastrand::usize(1..600)];
                        fastrand::fill(&mut junk);
                        // Never blank lines alone: HTTP skips those before a request line, so
                        // the gateway rightly waits for one (and answers 408), which is not
                        // what this kind tests (about one draw in 50,000: CI met it once).
                        if matches!(junk[0], b'\r' | b'\n') {
                            junk[0] = b'?';
                        }
                        junk.extend_from_slice(b"\r\n\r\n");
                        ("garbage", junk)
                    }
                    _ => (
                        "huge head",
                        format!("GET /ws HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(5000)).into_bytes(),
                    ),
                };
                let got = attempt(addr, &req, Duration::from_secs(5)).await;
                count(&outcomes, format!("{kind}: {got}"));
                i += 1;
            }
        }));
    }
    // Health probes during the flood.
    let probes = {
        let (outcomes, flooding, addr) = (outcomes.clone(), flooding.clone(), gw.addr);
        tokio::spawn(async move {
            while flooding.load(Ordering::Relaxed) {
                let got = attempt(
                    addr,
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
                    Duration::from_secs(5),
                )
                .await;
                count(&outcomes, format!("probe /healthz: {got}"));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut held = holders.await.unwrap();
    // The flood's length (a workload, not a wait for an event): twice the handshake timeout,
    // so the held heads time out while it goes on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    flooding.store(false, Ordering::Relaxed);
    for s in stormers {
        s.await.unwrap();
    }
    probes.await.unwrap();
    let flood_time = t.elapsed();
    let gw_cpu = cpu_time(gw.pid()) - gw_cpu0;
    let my_cpu = cpu_time(std::process::id() as i32) - my_cpu0;
    *phase.lock() = "after";
    // The held heads: each was refused at once (no slot) or timed out with 408.
    for s in held.iter_mut() {
        let mut out = Vec::new();
        let got = match bounded(Duration::from_secs(5), s.read_to_end(&mut out)).await {
            None => "no answer in time".to_owned(),
            Some(_) if out.is_empty() => "closed without an answer".to_owned(),
            Some(_) => String::from_utf8_lossy(&out)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        };
        count(&outcomes, format!("slowloris: {got}"));
    }
    // Half a second of calm ticks after the flood.
    let after = *ticks.borrow();
    within(
        "50 calm ticks after the flood",
        ticks.wait_for(|&n| n >= after + 50),
    )
    .await
    .expect("the stream runs");
    streaming.store(false, Ordering::Relaxed);
    let sent = stream.await.unwrap();

    // Every resident got every frame, in order, and on time.
    let mut lat: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for rx in residents.iter_mut() {
        for n in 0..sent {
            let (at, f) = within("a resident's frame", rx.recv())
                .await
                .expect("resident kept");
            assert_eq!(f["data"]["n"], n, "in order, none lost");
            let p = if f["data"]["phase"] == "flood" {
                "flood"
            } else {
                "calm"
            };
            lat.entry(p)
                .or_default()
                .push(at.saturating_sub(f["data"]["t"].as_u64().unwrap()));
        }
    }
    let calm = Latency::of(lat.remove("calm").unwrap_or_default());
    let flood = Latency::of(lat.remove("flood").unwrap_or_default());
    let outcomes = outcomes.lock().clone();
    let attempts: u64 = outcomes.values().sum();
    eprintln!(
        "handshake flood: {attempts} attempts in {flood_time:?} against MAX_CONNECTIONS={MAX_CONNECTIONS} (+{HEADROOM} headroom), {RESIDENTS} residents"
    );
    for (what, n) in &outcomes {
        eprintln!("  {n:>6}  {what}");
    }
    eprintln!(
        "  CPU during the flood: gateway {:.0} %, the flooding test process {:.0} % (of one core; 2 cores)",
        gw_cpu.as_secs_f64() / flood_time.as_secs_f64() * 100.0,
        my_cpu.as_secs_f64() / flood_time.as_secs_f64() * 100.0
    );
    eprintln!("  residents' latency, calm:  {calm}");
    eprintln!("  residents' latency, flood: {flood}");

    for (what, n) in &outcomes {
        let ok = what.ends_with("HTTP/1.1 101 Switching Protocols")
            || what.ends_with("HTTP/1.1 503 Service Unavailable")
            || what.ends_with("HTTP/1.1 200 OK")
            || what.starts_with("garbage: HTTP/1.1 400 ")
            || what.starts_with("huge head: HTTP/1.1 431 ")
            || what == "slowloris: HTTP/1.1 408 Request Timeout";
        assert!(ok, "{n} attempts ended: {what}");
    }
    assert!(
        outcomes
            .get("slowloris: HTTP/1.1 503 Service Unavailable")
            .copied()
            .unwrap_or(0)
            > 0,
        "the slowloris sockets outnumbered the slots"
    );
    assert!(
        outcomes
            .get("upgrade: HTTP/1.1 101 Switching Protocols")
            .copied()
            .unwrap_or(0)
            > 0,
        "valid upgrades got through while slots were free"
    );
    // Starvation would show as a stall of the stream. The flood, the gateway, the broker and
    // the readers share two cores, so some queueing is expected: the median may at most
    // double (plus 10 ms), and no frame may wait a second.
    assert!(
        flood.p50 <= 2 * calm.p50 + 10_000 && flood.max < 1_000_000,
        "residents starved during the flood: {flood} vs {calm}"
    );
    gw.wait_metric("wsnotify_connections", RESIDENTS as u64)
        .await;
}
