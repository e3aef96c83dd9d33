//! Broker restart: RabbitMQ stops in the middle of a stream of notifications, stays down for
//! 10 s, and starts again. Two gateway replicas must keep every WebSocket client, report
//! not-ready while the link is down, reconnect with capped backoff, and deliver every message
//! the broker had confirmed — those still queued when it stopped and those published right
//! after it came back, while the gateways were still away — once each, in order.
//!
//! Stopping the broker breaks every other test that uses it, so this test is `#[ignore]`d and
//! runs on its own after the parallel pass:
//!
//! ```text
//! cargo test --test it -- --ignored --test-threads=1 broker_restart::
//! ```
//!
//! It stops the broker with `rabbitmqctl stop_app` and starts it with `start_app` (the node
//! stays up: 0.5 s + 1 s instead of a 7 s cold start; to clients it is the same outage — the
//! listener is gone and non-durable state is dropped). A guard restarts the broker if the
//! test fails half-way. The node is the one at `AMQP_URL`; `WSNOTIFY_TEST_RABBITMQ_NODE`
//! (passed as `rabbitmqctl -n`) and `WSNOTIFY_TEST_AMQP_PORT` point it at another node;
//! `WSNOTIFY_RESTART_DOWN_SECS` sets the outage (default 10).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;
use wsnotify::publisher::Publisher;

/// The broker node under test, driven with `rabbitmqctl`.
struct Rabbit {
    node: Option<String>,
    /// `AMQP_URL` of the node.
    url: String,
    /// `host:port` of its AMQP listener.
    addr: String,
}

impl Rabbit {
    fn from_env() -> Rabbit {
        let url = match std::env::var("WSNOTIFY_TEST_AMQP_PORT") {
            Ok(port) => format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
            Err(_) => amqp_url().to_owned(),
        };
        // amqp://user:pass@host:port/vhost → host:port (5672 when the URL gives no port).
        let authority = url
            .strip_prefix("amqp://")
            .unwrap_or(&url)
            .split('/')
            .next()
            .unwrap_or_default();
        let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let addr = match hostport.rsplit_once(':') {
            Some(_) => hostport.to_owned(),
            None => format!("{hostport}:5672"),
        };
        Rabbit {
            node: std::env::var("WSNOTIFY_TEST_RABBITMQ_NODE").ok(),
            url,
            addr,
        }
    }

    fn url(&self) -> String {
        self.url.clone()
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = std::process::Command::new("rabbitmqctl");
        if let Some(n) = &self.node {
            cmd.args(["-n", n]);
        }
        cmd.args(args).output().expect("rabbitmqctl")
    }

    fn up(&self) -> bool {
        std::net::TcpStream::connect(self.addr.as_str()).is_ok()
    }

    fn stop(&self) {
        let out = self.ctl(&["stop_app"]);
        assert!(out.status.success(), "stop_app: {out:?}");
    }

    /// Starts the broker app and waits until it accepts logins. Reports failure instead of
    /// panicking: it also runs from a drop guard during a panic.
    fn start(&self) -> Result<(), String> {
        let out = self.ctl(&["start_app"]);
        if !out.status.success() {
            return Err(format!("start_app: {out:?}"));
        }
        let out = self.ctl(&["await_startup", "--timeout", "60"]);
        if !out.status.success() {
            return Err(format!("await_startup: {out:?}"));
        }
        Ok(())
    }
}

/// Restarts the broker on drop if the test left it stopped, so a failure here does not take
/// the broker away from what runs next.
struct KeepBrokerUp {
    rabbit: Arc<Rabbit>,
    stopped: Arc<Mutex<bool>>,
}

impl Drop for KeepBrokerUp {
    fn drop(&mut self) {
        if *self.stopped.lock() || !self.rabbit.up() {
            eprintln!("broker_restart: restarting the broker the test left stopped");
            if let Err(e) = self.rabbit.start() {
                eprintln!("broker_restart: COULD NOT RESTART THE BROKER: {e}");
            }
        }
    }
}

/// Deletes the test's queues and exchange from the node under test.
async fn cleanup(url: &str, q: &str) {
    use amqprs::channel::QueueDeleteArguments;
    let Ok(url) = wsnotify::amqp::url::AmqpUrl::parse(url) else {
        return;
    };
    if let Ok((conn, _)) = url.connect(0, "broker_restart cleanup").await
        && let Ok(ch) = conn.open_channel(None).await
    {
        for name in [q.to_owned(), format!("{q}.dead"), format!("{q}.log")] {
            let _ = ch.queue_delete(QueueDeleteArguments::new(&name)).await;
        }
        let _ = conn.close().await;
    }
}

type Rx = UnboundedReceiver<(u64, serde_json::Value)>;

/// Takes frames until every id in `want` arrived (or `limit` passed), then a little longer
/// for duplicates; returns the `data.i` sequence as received, and how many of those arrived
/// after `since_us` (the stop).
async fn gather(
    rx: &mut Rx,
    want: &BTreeSet<u64>,
    limit: Duration,
    since_us: u64,
) -> (Vec<u64>, Vec<u64>) {
    let mut late = Vec::new();
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    let _ = bounded(limit, async {
        while !want.iter().all(|i| seen.contains(i)) {
            let Some((at, f)) = rx.recv().await else {
                return;
            };
            let i = f["data"]["i"].as_u64().unwrap();
            seen.insert(i);
            got.push(i);
            if at > since_us {
                late.push(i);
            }
        }
    })
    .await;
    let _ = bounded(Duration::from_millis(500), async {
        while let Some((_, f)) = rx.recv().await {
            got.push(f["data"]["i"].as_u64().unwrap());
        }
    })
    .await;
    (got, late)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared broker: run alone with --ignored --test-threads=1"]
async fn broker_restart_keeps_clients_and_delivers_every_confirmed_message_once() {
    // Bounded as a whole; a timeout panics here, and unwinding runs the guard that restarts
    // the broker.
    tokio::time::timeout(Duration::from_secs(180), restart_scenario())
        .await
        .expect("the broker restart scenario finishes within 3 minutes");
}

async fn restart_scenario() {
    let rabbit = Arc::new(Rabbit::from_env());
    let down_for = Duration::from_secs(
        std::env::var("WSNOTIFY_RESTART_DOWN_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let stopped = Arc::new(Mutex::new(false));
    let _guard = KeepBrokerUp {
        rabbit: rabbit.clone(),
        stopped: stopped.clone(),
    };
    if !rabbit.up() {
        let r = rabbit.clone();
        tokio::task::spawn_blocking(move || r.start())
            .await
            .unwrap()
            .expect("the broker is down and cannot be started");
    }
    let url = rabbit.url();
    let q = unique("restart");
    let publisher = Publisher::connect(&url, &q).await.expect("publisher");
    let env = [("AMQP_URL", url.as_str()), ("AMQP_PREFETCH", "20")];
    let gw_a = Gateway::start(&q, &env).await;
    let gw_b = Gateway::start(&q, &env).await;
    // User u has a tab on each replica; v (on A) and w (on B) only get broadcasts.
    let mut readers: Vec<(&str, Rx)> = vec![
        ("u@A", spawn_reader(gw_a.connect_user("u").await)),
        ("u@B", spawn_reader(gw_b.connect_user("u").await)),
        ("v@A", spawn_reader(gw_a.connect_user("v").await)),
        ("w@B", spawn_reader(gw_b.connect_user("w").await)),
    ];
    let body = |i: u64, phase: &str| {
        let data = json!({ "i": i, "phase": phase });
        let v = if i.is_multiple_of(5) {
            to_all("seq", data)
        } else {
            to_user("u", "seq", data)
        };
        v.to_string().into_bytes()
    };

    // Before: 500 messages a second, confirmed one by one in the background, and the broker
    // stopped under them.
    let confirmed: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut next = 0u64;
    let stopper = {
        let (rabbit, stopped) = (rabbit.clone(), stopped.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            *stopped.lock() = true;
            tokio::task::spawn_blocking(move || rabbit.stop())
                .await
                .unwrap();
            (Instant::now(), now_us())
        })
    };
    let mut tick = tokio::time::interval(Duration::from_millis(2));
    let mut waits = Vec::new();
    while !stopper.is_finished() {
        tick.tick().await;
        // A publish into a dying link may never be confirmed nor fail: bound both waits.
        match bounded(Duration::from_secs(2), publisher.send(body(next, "before"))).await {
            Some(Ok(confirm)) => {
                let (confirmed, i) = (confirmed.clone(), next);
                waits.push(tokio::spawn(async move {
                    if let Some(Ok(())) = bounded(Duration::from_secs(5), confirm.wait()).await {
                        confirmed.lock().insert(i);
                    }
                }));
                next += 1;
            }
            _ => break,
        }
    }
    let (stopped_at, stopped_us) = stopper.await.unwrap();
    for w in waits {
        w.await.unwrap();
    }
    let published_before = next;
    let confirmed_before = confirmed.lock().len();
    drop(publisher);

    // Down: not ready, clients kept.
    for gw in [&gw_a, &gw_b] {
        gw.wait_status("/readyz", 503).await;
    }
    let mut probes = 0;
    while stopped_at.elapsed() < down_for {
        for gw in [&gw_a, &gw_b] {
            assert_eq!(gw.get("/readyz").await.0, 503, "ready without a broker");
            assert_eq!(gw.get("/healthz").await.0, 200, "alive without a broker");
            probes += 2;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(gw_a.metric("wsnotify_connections").await, 2);
    assert_eq!(gw_b.metric("wsnotify_connections").await, 2);

    // Up again: publish at once, while the gateways are still backing off.
    let r = rabbit.clone();
    tokio::task::spawn_blocking(move || r.start())
        .await
        .unwrap()
        .expect("restart the broker");
    *stopped.lock() = false;
    let started_at = Instant::now();
    let publisher = Publisher::connect(&url, &q)
        .await
        .expect("publisher after restart");
    let first_after = next;
    let mut after = Vec::new();
    for _ in 0..300 {
        after.push((next, publisher.send(body(next, "after")).await.unwrap()));
        next += 1;
    }
    for (i, c) in after {
        c.wait().await.expect("confirmed after restart");
        confirmed.lock().insert(i);
    }
    let readiness_when_published = (gw_a.get("/readyz").await.0, gw_b.get("/readyz").await.0);
    for gw in [&gw_a, &gw_b] {
        within("the gateway to reconnect", async {
            loop {
                if gw.get("/readyz").await.0 == 200 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
    }
    let reconnected_after = started_at.elapsed();

    // Every confirmed message, once each, in order, on every connection it was meant for.
    let confirmed = confirmed.lock().clone();
    let broadcasts: BTreeSet<u64> = confirmed
        .iter()
        .copied()
        .filter(|i| i.is_multiple_of(5))
        .collect();
    let mut report = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut lost_total = 0;
    for (who, rx) in readers.iter_mut() {
        assert!(!rx.is_closed(), "{who} was disconnected");
        let want = if who.starts_with("u@") {
            &confirmed
        } else {
            &broadcasts
        };
        let (got, late) = gather(rx, want, Duration::from_secs(30), stopped_us).await;
        let set: BTreeSet<u64> = got.iter().copied().collect();
        let lost: Vec<u64> = want.difference(&set).copied().collect();
        let dups = got.len() - set.len();
        let in_order = got.windows(2).all(|w| w[0] < w[1]);
        // "Before" messages that only arrived after the stop: the backlog the broker held.
        let before_after_stop = late.iter().filter(|&&i| i < first_after).count();
        report.push(format!(
            "{who}: {} frames ({} published before the stop but delivered after it), {} lost, {dups} duplicates, in order: {in_order}",
            got.len(),
            before_after_stop,
            lost.len()
        ));
        lost_total += lost.len();
        let range = |v: &[u64]| match (v.first(), v.last()) {
            (Some(a), Some(b)) => format!("{a}..={b}"),
            _ => "-".into(),
        };
        if !lost.is_empty() {
            failures.push(format!(
                "{who} lost {} confirmed messages in {}",
                lost.len(),
                range(&lost)
            ));
        }
        if dups > 0 {
            failures.push(format!("{who} got {dups} duplicates"));
        }
        if !in_order {
            failures.push(format!("{who} got frames out of order"));
        }
    }
    let retries: Vec<u64> = [&gw_a, &gw_b]
        .iter()
        .flat_map(|gw| {
            gw.log_text()
                .lines()
                .filter(|l| l.contains("broker link down"))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.strip_prefix("retry_in_ms="))
                        .and_then(|v| v.parse().ok())
                })
                .collect::<Vec<u64>>()
        })
        .collect();
    eprintln!(
        "broker restart: stopped {:?} into a 500/s stream ({published_before} published, {confirmed_before} confirmed before the stop), down {down_for:?} ({probes} probes: /readyz 503, /healthz 200)",
        Duration::from_secs(2)
    );
    eprintln!(
        "  300 published and confirmed right after start_app, /readyz then {readiness_when_published:?}; both replicas ready {reconnected_after:?} after start_app"
    );
    eprintln!("  reconnect delays logged (ms): {retries:?}");
    for line in &report {
        eprintln!("  {line}");
    }
    eprintln!(
        "  confirmed messages lost: {lost_total}; first message published after the restart: {first_after}; copies dropped by dedupe: A {} B {}; ingest taker now: A {} B {}",
        gw_a.metric("wsnotify_duplicates_dropped_total").await,
        gw_b.metric("wsnotify_duplicates_dropped_total").await,
        gw_a.metric("wsnotify_ingest_active").await,
        gw_b.metric("wsnotify_ingest_active").await,
    );
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(!retries.is_empty(), "reconnect attempts are logged");
    assert!(
        retries.iter().all(|&ms| ms <= 6000),
        "backoff is capped at 5 s (+20 % jitter): {retries:?}"
    );
    assert!(
        reconnected_after < Duration::from_secs(10),
        "reconnected {reconnected_after:?} after the broker came back"
    );
    assert!(gw_a.metric("wsnotify_broker_connects_total").await >= 2);
    publisher.close().await;
    cleanup(&url, &q).await;
}
