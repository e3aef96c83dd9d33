//! On a RabbitMQ cluster: three nodes on loopback (`scripts/cluster.sh`, beside the shared
//! broker, which these tests never touch), quorum queues, and a node lost to `kill -9`.
//!
//! Forming a cluster takes 15-40 s of CPU on a 2-core machine, which would slow the timed
//! tests running in parallel, so these tests are `#[ignore]`d and `scripts/test.sh` runs them
//! alone at the end:
//!
//! ```text
//! cargo test --test cluster -- --ignored --test-threads=1
//! ```

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use cluster::Cluster;
use common::*;

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
