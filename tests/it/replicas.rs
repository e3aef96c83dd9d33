//! Several `wsnotify` processes on one queue behave as one gateway: every message reaches
//! every connection it is meant for, on whichever replica, once and in order — through
//! replica crashes and rolling restarts.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::support::*;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

async fn replicas(q: &str, n: usize) -> Vec<Gateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(Gateway::start(q, &[]).await);
    }
    out
}

/// The replica currently taking the notify queue.
async fn taker(gws: &[Gateway]) -> usize {
    within("a taker", async {
        loop {
            for (i, g) in gws.iter().enumerate() {
                if g.metric("wsnotify_ingest_active").await == 1 {
                    return i;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// What a client saw: `data.seq` of every frame, and how the socket ended.
struct Seen {
    seqs: mpsc::UnboundedReceiver<i64>,
}

/// Reads frames in the background; sends each frame's `data.seq` (or -1 for the "end" marker).
/// The channel closes when the socket does; a close code is sent as -(1000 + code).
fn watch(mut ws: Ws) -> Seen {
    let (tx, seqs) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                    let _ = tx.send(v["data"]["seq"].as_i64().unwrap_or(-1));
                }
                Message::Close(Some(c)) => {
                    let _ = tx.send(-(1000 + i64::from(u16::from(c.code))));
                }
                _ => {}
            }
        }
    });
    Seen { seqs }
}

impl Seen {
    /// Collects seqs until the "end" marker (-1); fails on a close.
    async fn until_end(&mut self) -> Vec<i64> {
        let mut out = Vec::new();
        within("the end marker", async {
            loop {
                match self.seqs.recv().await {
                    Some(-1) => return,
                    Some(s) if s >= 0 => out.push(s),
                    other => panic!(
                        "socket ended before the end marker: {other:?} after {} frames",
                        out.len()
                    ),
                }
            }
        })
        .await;
        out
    }

    /// Collects seqs until the socket is closed; returns them and the close code.
    async fn until_close(&mut self) -> (Vec<i64>, i64) {
        let mut out = Vec::new();
        let code = within("a close", async {
            loop {
                match self.seqs.recv().await {
                    Some(s) if s >= 0 => out.push(s),
                    Some(-1) => {}
                    Some(code) => return -code - 1000,
                    None => return 0,
                }
            }
        })
        .await;
        (out, code)
    }
}

fn assert_contiguous(who: &str, seqs: &[i64]) {
    for w in seqs.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "{who}: gap or duplicate at {} → {} in {seqs:?}",
            w[0],
            w[1]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_deliver_every_message_once_in_order_wherever_users_are() {
    let _load = light().await;
    let q = unique("replicas");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gws = replicas(&q, 3).await;
    // alice has a tab on replica 0 and one on replica 1.
    let mut conns: Vec<(&str, usize, Seen)> = Vec::new();
    for (user, r) in [
        ("alice", 0),
        ("bob", 0),
        ("alice", 1),
        ("carol", 1),
        ("dave", 2),
    ] {
        conns.push((user, r, watch(gws[r].connect_user(user).await)));
    }
    let mut expected: HashMap<&str, Vec<i64>> = HashMap::new();
    for seq in 0..200i64 {
        let data = json!({"seq": seq});
        let env = match seq % 4 {
            0 => to_user("alice", "m", data),
            1 => to_user("carol", "m", data),
            2 => to_all("m", data),
            _ => json!({"type": "websocket_notification",
                "payload": {"user_ids": ["bob", "dave"], "message_type": "m", "data": data}}),
        };
        for user in ["alice", "bob", "carol", "dave"] {
            let to_them = match seq % 4 {
                0 => user == "alice",
                1 => user == "carol",
                2 => true,
                _ => user == "bob" || user == "dave",
            };
            if to_them {
                expected.entry(user).or_default().push(seq);
            }
        }
        broker.publish_json(&q, &env).await;
    }
    broker.publish_json(&q, &to_all("end", json!(null))).await;
    for (user, r, seen) in &mut conns {
        let got = seen.until_end().await;
        assert_eq!(
            &got, &expected[*user],
            "{user} on replica {r}: every message for them, once, in order"
        );
    }
    let ingested: u64 = {
        let mut sum = 0;
        for g in &gws {
            sum += g.metric("wsnotify_ingested_total").await;
        }
        sum
    };
    assert_eq!(
        ingested, 201,
        "each message taken in exactly once across replicas"
    );
}

/// Publishes `{"seq": n}` broadcasts (every third one to `to_user` instead) until stopped;
/// returns how many were published.
fn stream(
    broker: Arc<Broker>,
    q: String,
    to_user_id: Option<&'static str>,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seq = 0i64;
        while !stop.load(Ordering::Relaxed) && seq < 20_000 {
            let data = json!({"seq": seq});
            let env = match to_user_id {
                Some(u) if seq % 3 == 0 => to_user(u, "m", data),
                _ => to_all("m", data),
            };
            broker.publish_json(&q, &env).await;
            seq += 1;
            count.store(seq as u64, Ordering::Relaxed);
            // Pace the stream so faults land in the middle of it.
            if seq % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    })
}

/// Waits until the stream has published `n` messages in all. Bounded at a minute rather
/// than `WAIT`: with nine gateways, their clients and the broker on two busy cores, the
/// broker's flow control can hold a fast publisher back for many seconds.
async fn published_at_least(count: &AtomicU64, n: u64, what: &str) {
    let progress = async {
        while count.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), progress)
        .await
        .is_err()
    {
        panic!("timed out after 60 s waiting for {what}");
    }
}

/// Waits until the stream has published `n` more messages.
async fn published_more(count: &AtomicU64, n: u64) {
    let at = count.load(Ordering::Relaxed);
    published_at_least(count, at + n, "the stream to go on").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_taker_mid_stream_loses_and_duplicates_nothing_for_the_others() {
    let _load = light().await;
    let q = unique("kill9");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gws = replicas(&q, 3).await;
    let victim = taker(&gws).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
    let mut seen: Vec<Seen> = Vec::new();
    for &r in &survivors {
        seen.push(watch(gws[r].connect_user("shared").await));
        seen.push(watch(gws[r].connect_user(&format!("solo{r}")).await));
    }
    let _doomed = gws[victim].connect_user("shared").await;

    let broker = Arc::new(broker);
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let publisher = stream(
        broker.clone(),
        q.clone(),
        Some("shared"),
        stop.clone(),
        count.clone(),
    );
    published_at_least(&count, 600, "the stream to be under way").await;
    gws[victim].signal(libc::SIGKILL);
    published_at_least(&count, 1500, "more messages after the kill").await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let total = count.load(Ordering::Relaxed) as i64;
    broker.publish_json(&q, &to_all("end", json!(null))).await;

    for (i, s) in seen.iter_mut().enumerate() {
        let got = s.until_end().await;
        let user_is_shared = i % 2 == 0;
        let want: Vec<i64> = (0..total)
            .filter(|n| user_is_shared || n % 3 != 0)
            .collect();
        assert_eq!(
            got.len(),
            want.len(),
            "connection {i}: {} of {} frames",
            got.len(),
            want.len()
        );
        assert_eq!(got, want, "connection {i}: every message once, in order");
    }
    let mut takers = 0;
    for &r in &survivors {
        takers += gws[r].metric("wsnotify_ingest_active").await;
    }
    assert_eq!(takers, 1, "a standby took over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_keeps_users_of_the_other_replicas_whole() {
    let _load = light().await;
    let q = unique("rolling");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let mut gws = replicas(&q, 3).await;
    let mut users: Vec<Seen> = Vec::new();
    for (r, g) in gws.iter().enumerate() {
        users.push(watch(g.connect_user(&format!("u{r}")).await));
    }
    let broker = Arc::new(broker);
    let (stop, count) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let publisher = stream(broker.clone(), q.clone(), None, stop.clone(), count.clone());
    // Everything each user's connections saw, in order, connection by connection.
    let mut history: Vec<Vec<Vec<i64>>> = vec![Vec::new(); 3];
    let mut placement = [0, 1, 2];

    for r in 0..3 {
        published_more(&count, 200).await;
        gws[r].signal(libc::SIGTERM);
        // Every user on that replica is told it is going away, and reconnects (through the
        // load balancer) to a replica that is up.
        let other = (r + 1) % 3;
        for u in 0..3 {
            if placement[u] != r {
                continue;
            }
            let (seqs, code) = users[u].until_close().await;
            assert_eq!(code, 1001, "u{u} is told replica {r} is going away");
            history[u].push(seqs);
            users[u] = watch(gws[other].connect_user(&format!("u{u}")).await);
            placement[u] = other;
        }
        assert_eq!(gws[r].wait_exit(Duration::from_secs(20)).await, Some(0));
        gws[r] = Gateway::start(&q, &[]).await;
    }
    published_more(&count, 200).await;
    stop.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let total = count.load(Ordering::Relaxed) as i64;
    broker.publish_json(&q, &to_all("end", json!(null))).await;
    for (r, u) in users.iter_mut().enumerate() {
        history[r].push(u.until_end().await);
    }
    for (r, conns) in history.iter().enumerate() {
        for (i, seqs) in conns.iter().enumerate() {
            assert!(!seqs.is_empty(), "u{r} connection {i} received messages");
            assert_contiguous(&format!("u{r} connection {i}"), seqs);
        }
        let last = conns.last().unwrap();
        assert_eq!(
            *last.last().unwrap(),
            total - 1,
            "u{r} receives again after reconnecting"
        );
    }
    // Every connection's stream was gap-free for as long as it lived, across the restarts of
    // the other replicas: users of the replicas that stay up miss nothing.
}
