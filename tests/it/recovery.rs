//! Recovery (contract §5): a client that reconnects with `?since=<id>` — to any replica, even
//! one that started after it left — gets exactly the frames it missed, as first sent, then
//! live frames; nothing lost and nothing twice, even while its notifications keep coming, and
//! through a rolling restart of every replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// What a socket received: text frames as sent, and how it ended.
#[derive(Debug)]
enum Got {
    Text(String),
    Closed(Option<u16>),
}

/// Reads a socket in the background. Dropping the receiver drops the socket (no close frame:
/// like a network drop or a closed laptop).
fn read_all(mut ws: Ws) -> mpsc::UnboundedReceiver<Got> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                _ = tx.closed() => return,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let _ = tx.send(Got::Text(t.to_string()));
                }
                Some(Ok(Message::Close(c))) => {
                    let _ = tx.send(Got::Closed(c.map(|c| u16::from(c.code))));
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = tx.send(Got::Closed(None));
                    return;
                }
            }
        }
    });
    rx
}

/// The next text frame, raw.
async fn next_text(rx: &mut mpsc::UnboundedReceiver<Got>) -> String {
    within("a text frame", async {
        match rx.recv().await {
            Some(Got::Text(t)) => t,
            other => panic!("expected a text frame, got {other:?}"),
        }
    })
    .await
}

fn parse(t: &str) -> Value {
    serde_json::from_str(t).expect("frame is JSON")
}

async fn connect_since(g: &Gateway, user: &str, since: &str) -> mpsc::UnboundedReceiver<Got> {
    let url = g.ws_url(&format!("user_id={user}&since={}", urlencode(since)));
    read_all(connect(&url).await)
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_is_checked_and_an_unknown_one_is_not_vouched_for() {
    let _load = light().await;
    let q = unique("rec_since");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let g = Gateway::start(&q, &[]).await;

    assert_eq!(
        connect_status(&g.ws_url("user_id=a&since="), &[]).await,
        400,
        "empty since"
    );
    let long = "x".repeat(65);
    assert_eq!(
        connect_status(&g.ws_url(&format!("user_id=a&since={long}")), &[]).await,
        400,
        "since over 64 bytes"
    );
    // 64 bytes is allowed; never seen: recovered false, then live frames.
    let mut rx = connect_since(&g, "a", &"y".repeat(64)).await;
    let status = parse(&next_text(&mut rx).await);
    assert_eq!(
        status,
        json!({"type": "wsnotify.recovery", "recovered": false, "missed": 0, "since": "y".repeat(64)})
    );
    broker
        .publish_json(&q, &to_user("a", "live", json!({"n": 1})))
        .await;
    let live = parse(&next_text(&mut rx).await);
    assert_eq!(live["type"], "live");

    // Without since: no recovery frame at all.
    let mut plain = read_all(g.connect_user("b").await);
    broker
        .publish_json(&q, &to_user("b", "first", json!(1)))
        .await;
    assert_eq!(parse(&next_text(&mut plain).await)["type"], "first");
    assert_eq!(
        g.metric("wsnotify_recoveries_total{result=\"unknown\"}")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_away_for_ten_seconds_gets_exactly_what_it_missed_as_first_sent() {
    let _load = light().await;
    let q = unique("rec_away");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let g = Gateway::start(&q, &[]).await;
    // A second tab of the same user stays connected: the frames the first one missed must be
    // exactly the ones this one received.
    let mut witness = read_all(g.connect_user("alice").await);
    let leaver = g.connect_user("alice").await;
    broker
        .publish_json(&q, &to_user("alice", "before", json!({"n": 0})))
        .await;
    let first = next_text(&mut witness).await;
    let mut leaver = read_all(leaver);
    assert_eq!(next_text(&mut leaver).await, first);
    let last_id = parse(&first)["id"].as_str().unwrap().to_owned();
    // The laptop closes: its socket goes away.
    drop(leaver);

    // Ten seconds away, while notifications keep coming: hers, everyone's, and other users'.
    let mut sent = 0;
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut n = 1;
    while tokio::time::Instant::now() < until {
        let env = match n % 3 {
            0 => to_all("news", json!({"n": n})),
            1 => to_user("alice", "mine", json!({"n": n, "text": "é\"\\"})),
            _ => to_user("bob", "not-hers", json!({"n": n})),
        };
        if n % 3 != 2 {
            sent += 1;
        }
        broker.publish_json(&q, &env).await;
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut want = Vec::new();
    for _ in 0..sent {
        want.push(next_text(&mut witness).await);
    }

    let mut back = connect_since(&g, "alice", &last_id).await;
    let status = parse(&next_text(&mut back).await);
    assert_eq!(
        status,
        json!({"type": "wsnotify.recovery", "recovered": true, "missed": sent, "since": last_id})
    );
    for (i, w) in want.iter().enumerate() {
        assert_eq!(
            &next_text(&mut back).await,
            w,
            "missed frame {i}, byte for byte"
        );
    }
    // Then live frames.
    broker
        .publish_json(&q, &to_user("alice", "after", json!(null)))
        .await;
    assert_eq!(parse(&next_text(&mut back).await)["type"], "after");
    assert_eq!(
        g.metric("wsnotify_recoveries_total{result=\"recovered\"}")
            .await,
        1
    );
    assert_eq!(
        g.metric("wsnotify_replayed_frames_total").await,
        sent as u64
    );
}

/// Publishes `{"seq": n}` to `user` (every fourth one as a broadcast) until stopped, paced.
fn stream_to(
    broker: Arc<Broker>,
    q: String,
    users: Vec<String>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) && seq < 50_000 {
            for u in &users {
                broker
                    .publish_json(&q, &to_user(u, "m", json!({"seq": seq})))
                    .await;
            }
            seq += 1;
            count.store(seq, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    })
}

async fn wait_count(count: &AtomicU64, n: u64) {
    within("the stream to go on", async {
        while count.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A user's view across reconnects: every `data.seq` in the order received, and the last id.
struct Tracker {
    seqs: Vec<u64>,
    last_id: Option<String>,
}

/// Why [`Tracker::read`] returned.
#[derive(Debug, PartialEq)]
enum Stop {
    /// The seq asked for arrived.
    Seq,
    /// The "end" marker arrived.
    End,
    /// The socket closed (with this code).
    Closed(Option<u16>),
}

impl Tracker {
    fn new() -> Tracker {
        Tracker {
            seqs: Vec::new(),
            last_id: None,
        }
    }

    /// Reads until `until` is seen, the end marker, or the socket closes.
    async fn read(&mut self, rx: &mut mpsc::UnboundedReceiver<Got>, until: Option<u64>) -> Stop {
        loop {
            match rx.recv().await {
                Some(Got::Text(t)) => {
                    let v = parse(&t);
                    if v["type"] == "wsnotify.recovery" {
                        assert_eq!(v["recovered"], true, "recovered: {v}");
                        continue;
                    }
                    self.last_id = v["id"].as_str().map(str::to_owned);
                    if v["type"] == "end" {
                        return Stop::End;
                    }
                    let seq = v["data"]["seq"].as_u64().expect("seq");
                    self.seqs.push(seq);
                    if Some(seq) == until {
                        return Stop::Seq;
                    }
                }
                Some(Got::Closed(code)) => return Stop::Closed(code),
                None => return Stop::Closed(None),
            }
        }
    }

    fn assert_whole(&self, who: &str, total: u64) {
        let want: Vec<u64> = (0..total).collect();
        if self.seqs != want {
            let dup = self.seqs.windows(2).find(|w| w[1] <= w[0]);
            let gap = self.seqs.windows(2).find(|w| w[1] > w[0] + 1);
            panic!(
                "{who}: {} frames for {total} sent; first duplicate {dup:?}, first gap {gap:?}",
                self.seqs.len()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_live_frames_meet_without_loss_or_repeat_while_notifications_keep_coming() {
    let _load = light().await;
    let q = unique("rec_seam");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let g = Gateway::start(&q, &[]).await;
    let broker = Arc::new(broker);
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut t = Tracker::new();
    let mut rx = read_all(g.connect_user("carol").await);
    let publisher = stream_to(
        broker.clone(),
        q.clone(),
        vec!["carol".into()],
        stop.clone(),
        count.clone(),
    );
    // Drop and come back ten times, mid-stream: half of the times at once, half after a pause.
    for round in 0..10u64 {
        wait_count(&count, 30 * (round + 1)).await;
        let next = t.seqs.last().map_or(5, |s| s + 5);
        assert_eq!(
            within("frames", t.read(&mut rx, Some(next))).await,
            Stop::Seq
        );
        drop(rx);
        if round % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        rx = connect_since(&g, "carol", t.last_id.as_deref().expect("an id")).await;
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    broker
        .publish_json(&q, &to_user("carol", "end", json!(null)))
        .await;
    let total = count.load(Ordering::Relaxed);
    assert_eq!(within("the end", t.read(&mut rx, None)).await, Stop::End);
    t.assert_whole("carol", total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_after_the_client_left_recovers_it() {
    let _load = light().await;
    let q = unique("rec_late");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    // A replica that stays up takes the notify queue while dan is away.
    let keeper = Gateway::start(&q, &[]).await;
    let mut first = Gateway::start(&q, &[]).await;
    let mut rx = read_all(first.connect_user("dan").await);
    broker
        .publish_json(&q, &to_user("dan", "m", json!({"seq": 0})))
        .await;
    let last_id = parse(&next_text(&mut rx).await)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The replica goes away (a deploy), taking dan's socket with it.
    first.signal(libc::SIGTERM);
    assert_eq!(first.wait_exit(Duration::from_secs(20)).await, Some(0));
    for seq in 1..=20 {
        let env = if seq % 5 == 0 {
            to_all("m", json!({"seq": seq}))
        } else {
            to_user("dan", "m", json!({"seq": seq}))
        };
        broker.publish_json(&q, &env).await;
    }
    keeper.wait_metric("wsnotify_history_entries", 21).await;
    // A replica that did not exist when dan left.
    let second = Gateway::start(&q, &[]).await;
    let mut back = connect_since(&second, "dan", &last_id).await;
    let status = parse(&next_text(&mut back).await);
    assert_eq!(status["recovered"], true, "{status}");
    assert_eq!(status["missed"], 20);
    for seq in 1..=20 {
        assert_eq!(parse(&next_text(&mut back).await)["data"]["seq"], seq);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_replica_loses_nothing_for_anyone() {
    let _load = light().await;
    let q = unique("rec_rolling");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&q, &[]).await);
    }
    let addrs: Arc<parking_lot::Mutex<Vec<SocketAddr>>> = Arc::new(parking_lot::Mutex::new(
        gws.iter().map(|g| g.addr).collect(),
    ));
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let broker = Arc::new(broker);
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );

    // Each user: a client that reconnects at once with `since` to a replica that is up, as the
    // browser client does on 1001.
    let mut clients = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let (u, addrs) = (u.clone(), addrs.clone());
        let first = gws[i % 3].connect_user(&u).await;
        clients.push(tokio::spawn(async move {
            let mut t = Tracker::new();
            let mut rx = read_all(first);
            let mut attempt = i;
            let mut reconnects = 0;
            while let Stop::Closed(_) = t.read(&mut rx, None).await {
                reconnects += 1;
                rx = within("a reconnect", async {
                    loop {
                        attempt += 1;
                        let list = addrs.lock().clone();
                        let addr = list[attempt % list.len()];
                        let mut url = format!("ws://{addr}/ws?user_id={u}");
                        if let Some(id) = &t.last_id {
                            url.push_str(&format!("&since={}", urlencode(id)));
                        }
                        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
                            return read_all(ws);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                })
                .await;
            }
            (u, t, reconnects)
        }));
    }
    let publisher = stream_to(
        broker.clone(),
        q.clone(),
        users.clone(),
        stop.clone(),
        count.clone(),
    );
    for (r, g) in gws.iter_mut().enumerate() {
        wait_count(&count, 100 * (r as u64 + 1)).await;
        // Out of the load balancer first, then SIGTERM (1001 to its clients).
        addrs.lock().retain(|a| *a != g.addr);
        g.signal(libc::SIGTERM);
        assert_eq!(g.wait_exit(Duration::from_secs(20)).await, Some(0));
        *g = Gateway::start(&q, &[]).await;
        addrs.lock().push(g.addr);
    }
    wait_count(&count, 400).await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let total = count.load(Ordering::Relaxed);
    for u in &users {
        broker
            .publish_json(&q, &to_user(u, "end", json!(null)))
            .await;
    }
    let mut reconnected = 0;
    for c in clients {
        let (u, t, reconnects) = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("every client reaches the end")
            .expect("client task");
        t.assert_whole(&u, total);
        reconnected += reconnects;
    }
    assert!(
        reconnected >= 12,
        "every user was moved at least once ({reconnected})"
    );
}

/// The fan-out log is a stream, stored in segments; RabbitMQ starts each segment with a
/// tracking chunk that takes an offset but is never delivered. Crossing one must not look like
/// lost records (it once emptied every replica's history at each roll: every 32 MiB of log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_survives_the_log_rolling_over_to_new_segments() {
    let _load = light().await;
    let q = unique("rec_segments");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    // The log, declared first with 16 KiB segments (the gateway keeps a log that exists):
    // the notifications below fill several.
    let mut args = amqprs::FieldTable::new();
    args.insert("x-queue-type".try_into().unwrap(), "stream".into());
    args.insert(
        "x-stream-max-segment-size-bytes".try_into().unwrap(),
        amqprs::FieldValue::l(16 * 1024),
    );
    broker
        .ch
        .queue_declare(
            amqprs::channel::QueueDeclareArguments::new(&format!("{q}.log"))
                .durable(true)
                .arguments(args)
                .finish(),
        )
        .await
        .expect("declare the log");
    let g = Gateway::start(&q, &[]).await;
    let mut witness = read_all(g.connect_user("carol").await);
    let mut leaver = read_all(g.connect_user("carol").await);
    broker
        .publish_json(&q, &to_user("carol", "before", json!(0)))
        .await;
    let first = next_text(&mut witness).await;
    assert_eq!(next_text(&mut leaver).await, first);
    let since = parse(&first)["id"].as_str().unwrap().to_owned();
    drop(leaver);

    // One record each (each awaited before the next), 1 KiB apiece: about 8 segments.
    const SENT: usize = 120;
    let pad = "x".repeat(1024);
    let mut want = Vec::with_capacity(SENT);
    for n in 0..SENT {
        broker
            .publish_json(&q, &to_user("carol", "mine", json!({"n": n, "pad": pad})))
            .await;
        want.push(next_text(&mut witness).await);
    }

    let mut back = connect_since(&g, "carol", &since).await;
    assert_eq!(
        parse(&next_text(&mut back).await),
        json!({"type": "wsnotify.recovery", "recovered": true, "missed": SENT, "since": since}),
        "recovery across segment rolls"
    );
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&next_text(&mut back).await, w, "missed frame {i}");
    }
    assert!(
        !g.log_text().contains("recovery history cleared"),
        "no gap may be reported:\n{}",
        g.log_text()
    );
}
