//! On a RabbitMQ cluster: three nodes on loopback (`scripts/cluster.sh`, beside the shared
//! broker, which these tests never touch), quorum queues, and a node lost to `kill -9`.
//!
//! Forming a cluster takes 15-40 s of CPU on a 2-core machine, which would slow the timed
//! tests running in parallel, so these tests are `#[ignore]`d and `scripts/test.sh` runs them
//! alone at the end:
//!
//! ```text
//! cargo test --test it -- --ignored --test-threads=1 cluster::
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::cluster::Cluster;
use crate::support::*;
use tokio::sync::mpsc::UnboundedReceiver;

/// The harness itself: the cluster forms, a quorum queue spans it, a message published on one
/// node is consumed on another, and the queue keeps working when its leader's node is killed
/// and again when that node comes back.
#[tokio::test]
#[ignore = "starts a 3-node RabbitMQ cluster; scripts/test.sh runs it alone at the end"]
async fn quorum_queue_survives_its_leader_killed() {
    let c = Cluster::start(3).await;
    assert_eq!(c.running_nodes().await, vec![1, 2, 3]);
    assert_eq!(c.amqp_url().split(',').count(), 3);

    // Declared through node 2, so node 2 leads the queue and the kill below takes the leader.
    let q = unique("cluster_smoke");
    c.declare_quorum_on(2, &q).await;
    assert_eq!(c.leader(&q).await, 2);
    c.publish(1, &q, b"before").await;
    assert_eq!(c.take(3, &q, 1).await, vec![b"before".to_vec()]);

    c.kill(2).await;
    assert_eq!(c.running_nodes().await, vec![1, 3]);
    // Confirmed by the two survivors once they have elected a new leader, and delivered from
    // node 3 in publish order.
    let after: Vec<Vec<u8>> = (0..20).map(|n| format!("after-{n}").into_bytes()).collect();
    c.publish_all(1, &q, &after).await;
    assert_eq!(c.take(3, &q, after.len()).await, after);
    assert_ne!(c.leader(&q).await, 2);

    // The killed node rejoins with its data and serves the queue again.
    c.restart(2).await;
    assert_eq!(c.running_nodes().await, vec![1, 2, 3]);
    c.publish(2, &q, b"back").await;
    assert_eq!(c.take(2, &q, 1).await, vec![b"back".to_vec()]);

    c.stop().await;
    // The shared broker was never part of it.
    Broker::connect().await;
}

/// A frame as a client saw it: its `data.seq`, and when it arrived (unix µs).
type Got = Result<(u64, u64), String>;

/// Reads `data.seq` of every frame in the background; a close fails the client.
fn seqs_of(mut ws: Ws) -> UnboundedReceiver<Got> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let v: serde_json::Value = serde_json::from_str(&t).expect("JSON frame");
                    let at = now_us();
                    let _ = tx.send(Ok((v["data"]["seq"].as_u64().expect("seq"), at)));
                }
                Ok(Message::Close(c)) => {
                    let _ = tx.send(Err(format!("closed: {c:?}")));
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(format!("socket error: {e}")));
                    return;
                }
            }
        }
    });
    rx
}

/// Publishes `{"seq": n}` for `n` in `seqs` to user `n % users` through the node at `port`,
/// each message with its own id and waiting for its confirm; a failed publish is retried with
/// the same id (replicas drop the copy if the first attempt got through after all). `progress`
/// holds the next seq to publish.
async fn confirmed_stream(
    port: u16,
    q: String,
    users: u64,
    seqs: std::ops::Range<u64>,
    progress: Arc<AtomicU64>,
) {
    use amqprs::BasicProperties;
    use amqprs::channel::BasicPublishArguments;
    use amqprs::connection::{Connection, OpenConnectionArguments};
    use wsnotify::amqp::confirm::ConfirmChannel;
    let open = || async {
        let args = OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest");
        let conn = within("connect to the publishing node", Connection::open(&args))
            .await
            .expect("the publishing node");
        let ch = ConfirmChannel::open(&conn).await.expect("confirm channel");
        (conn, ch)
    };
    let (mut _conn, mut ch) = open().await;
    let mut seq = seqs.start;
    while seq < seqs.end {
        progress.store(seq, Ordering::Relaxed);
        let body = serde_json::json!({"type": "websocket_notification", "payload": {
            "user_id": format!("user{}", seq % users), "message_type": "m",
            "id": format!("m-{seq}"), "data": {"seq": seq}}})
        .to_string();
        let props = BasicProperties::default().with_persistence(true).finish();
        let mut args = BasicPublishArguments::new("", &q);
        args.mandatory(true);
        let sent = match ch.publish(props, body.into_bytes(), args, WAIT).await {
            Ok(confirm) => confirm.wait_for(WAIT).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => seq += 1,
            Err(e) => {
                eprintln!("publish m-{seq} failed ({e}); retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                (_conn, ch) = open().await;
            }
        }
    }
    progress.store(seq, Ordering::Relaxed);
}

/// Collects a user's frames until it has as many as `want` (or a bound passes).
async fn collect_all(mut rx: UnboundedReceiver<Got>, want: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while got.len() < want {
            match rx.recv().await {
                Some(Ok(s)) => got.push(s),
                Some(Err(e)) => panic!("a client was disconnected: {e}"),
                None => return,
            }
        }
    })
    .await;
    got
}

/// The cluster node (1-based) a replica's broker session is on, from its last "consuming" log
/// line.
fn node_of(g: &Gateway, c: &Cluster) -> usize {
    let log = g.log_text();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("consuming"))
        .expect("a consuming line");
    let port: u16 = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("node="))
        .and_then(|n| n.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("node=host:port");
    (1..=c.nodes())
        .find(|&i| c.port(i) == port)
        .expect("a cluster node")
}

/// `rabbitmqctl` arguments that show where each queue lives and who consumes it: printed when
/// the node-loss test fails.
const LIST_QUEUES: [&str; 7] = [
    "list_queues",
    "name",
    "type",
    "messages",
    "consumers",
    "leader",
    "members",
];

/// A quorum notify queue, three replicas over the three nodes, 12 users spread over them; a
/// steady stream, then `kill -9` of the node the taker is on, mid-stream: every user gets
/// every confirmed notification once and in order, no client is disconnected, every replica
/// is ready again within 30 s, and the taker's replica carries on from another node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a 3-node RabbitMQ cluster; scripts/test.sh runs it alone at the end"]
async fn quorum_notify_queue_and_a_lost_node_keep_every_user_whole_and_in_order() {
    const USERS: u64 = 12;
    const PHASE: u64 = 1_200;
    let c = Cluster::start(3).await;
    let q = unique("cluster_gw");
    c.declare_quorum(&q).await;
    let url = c.amqp_url().to_owned();
    let env = [("AMQP_URL", url.as_str())];
    let mut gws = Vec::new();
    for _ in 0..3 {
        gws.push(Gateway::start(&q, &env).await);
    }
    let mut readers = Vec::new();
    for u in 0..USERS as usize {
        let g = &gws[u % 3];
        readers.push(seqs_of(g.connect_user(&format!("user{u}")).await));
    }
    let nodes: Vec<usize> = gws.iter().map(|g| node_of(g, &c)).collect();
    eprintln!("replicas on nodes {nodes:?}");

    // A steady stream on the quorum queue with three replicas.
    let progress = Arc::new(AtomicU64::new(0));
    confirmed_stream(c.port(1), q.clone(), USERS, 0..PHASE, progress.clone()).await;

    // The node under the taker dies mid-stream.
    let mut taker = None;
    for (i, g) in gws.iter().enumerate() {
        if g.metric("wsnotify_ingest_active").await == 1 {
            taker = Some(i);
        }
    }
    let taker = taker.expect("one replica takes the notify queue");
    let victim = node_of(&gws[taker], &c);
    let via = (1..=3).find(|&n| n != victim).expect("another node");
    eprintln!("taker: replica {taker} on node {victim}; publishing through node {via}");
    let total = 2 * PHASE;
    let publisher = tokio::spawn(confirmed_stream(
        c.port(via),
        q.clone(),
        USERS,
        PHASE..total,
        progress.clone(),
    ));
    within("the stream to go on", async {
        while progress.load(Ordering::Relaxed) < PHASE + 300 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let killed_at = Instant::now();
    c.kill(victim).await;
    let mut ready_again = Vec::new();
    for (i, g) in gws.iter().enumerate() {
        let limit = Duration::from_secs(30).saturating_sub(killed_at.elapsed());
        let ready = tokio::time::timeout(limit, async {
            while g.get("/readyz").await.0 != 200 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if ready.is_err() {
            eprintln!("{}", c.ctl(via, &LIST_QUEUES).await);
            panic!(
                "replica {i} is not ready 30 s after the node loss; its log:\n{}",
                g.log_text()
            );
        }
        ready_again.push(killed_at.elapsed());
    }
    eprintln!("ready again after {ready_again:?}");
    tokio::time::timeout(Duration::from_secs(120), publisher)
        .await
        .expect("the publisher finishes")
        .expect("publisher task");

    let mut arrivals = Vec::new();
    for (u, rx) in readers.into_iter().enumerate() {
        let want: Vec<u64> = (0..total).filter(|s| s % USERS == u as u64).collect();
        let frames = collect_all(rx, want.len()).await;
        arrivals.extend(frames.iter().map(|&(_, at)| at));
        let got: Vec<u64> = frames.iter().map(|&(s, _)| s).collect();
        if got != want {
            for (i, g) in gws.iter().enumerate() {
                eprintln!("---- replica {i}:\n{}", g.log_text());
            }
            eprintln!("{}", c.ctl(via, &LIST_QUEUES).await);
        }
        assert_eq!(
            got, want,
            "user{u}: every confirmed notification, once, in order"
        );
    }
    // The gap the node loss left: the longest time no client received anything, after the
    // kill (the publisher kept publishing through a surviving node throughout).
    let kill_us = now_us().saturating_sub(killed_at.elapsed().as_micros() as u64);
    arrivals.sort_unstable();
    let gap = arrivals
        .windows(2)
        .filter(|w| w[1] >= kill_us)
        .map(|w| w[1] - w[0].max(kill_us))
        .max()
        .unwrap_or(0);
    eprintln!(
        "node loss: longest time without a delivery after the kill {:.2} s (ready again after {ready_again:?})",
        gap as f64 / 1e6
    );
    let moved = node_of(&gws[taker], &c);
    assert_ne!(
        moved, victim,
        "the taker's replica reconnected to another node"
    );
    c.stop().await;
}
