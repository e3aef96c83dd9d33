//! Measures broker traffic per notification at 1, 3 and 10 replicas (not a pass/fail test):
//!
//! ```sh
//! cargo test --release --test it -- --ignored --nocapture fanout_traffic::
//! ```
//!
//! For each replica count it starts the replicas on a fresh queue, publishes 2,000 broadcasts as
//! fast as one publisher can, waits until every replica has routed every one, and reads from
//! `rabbitmqctl list_connections` the bytes and socket operations the broker exchanged with the
//! gateway processes, and from the gateways how many fan-out records carried them.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

/// (recv_oct, send_oct, recv_cnt, send_cnt) summed over the connections of `pids`, and how
/// many of `pids` the broker listed.
async fn broker_counters(pids: &[i32]) -> ([u64; 4], usize) {
    let out = rabbitmqctl(&[
        "list_connections",
        "client_properties",
        "recv_oct",
        "send_oct",
        "recv_cnt",
        "send_cnt",
        "-q",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sum = [0u64; 4];
    let mut listed = 0;
    for line in text.lines() {
        if !pids
            .iter()
            .any(|p| line.contains(&format!("\"wsnotify {p}\"")))
        {
            continue;
        }
        let nums: Vec<u64> = line
            .rsplit('\t')
            .take(4)
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        listed += 1;
        if nums.len() == 4 {
            // rsplit yields send_cnt, recv_cnt, send_oct, recv_oct.
            sum[0] += nums[3];
            sum[1] += nums[2];
            sum[2] += nums[1];
            sum[3] += nums[0];
        }
    }
    (sum, listed)
}

/// The broker's statistics interval (`collect_statistics_interval`, 5 s by default).
async fn stats_interval() -> Duration {
    let out = rabbitmqctl(&[
        "eval",
        "application:get_env(rabbit, collect_statistics_interval).",
    ])
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = text
        .split(|c: char| !c.is_ascii_digit())
        .find_map(|d| d.parse().ok())
        .unwrap_or(5000);
    Duration::from_millis(ms)
}

/// Counters from a statistics sample the broker emitted after this call: the first reading
/// that differs from the current one, or the current one if nothing changed for a whole
/// statistics interval (then it already counted everything).
async fn fresh_counters(pids: &[i32], interval: Duration) -> [u64; 4] {
    let (first, _) = broker_counters(pids).await;
    let until = tokio::time::Instant::now() + interval + Duration::from_secs(1);
    let mut last = first;
    while last == first && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        last = broker_counters(pids).await.0;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run by hand (see the module docs)"]
async fn broker_traffic_per_notification() {
    const K: u64 = 2000;
    println!(
        "| replicas | notifications per record | broker messages / notification | bytes broker←gateways | bytes broker→gateways | socket reads+writes |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let interval = stats_interval().await;
    for n in [1usize, 3, 10] {
        let q = unique("traffic");
        let mut broker = Broker::connect().await;
        broker.declare(&q).await;
        let mut gws = Vec::new();
        for _ in 0..n {
            gws.push(Gateway::start(&q, &[]).await);
        }
        let pids: Vec<i32> = gws.iter().map(Gateway::pid).collect();
        // Every replica consumes (ready); the first reading is a sample taken after that.
        within("the broker to list every replica's connection", async {
            while broker_counters(&pids).await.1 < n {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
        .await;
        let before = fresh_counters(&pids, interval).await;
        for i in 0..K {
            broker
                .publish_json(&q, &to_all("m", json!({"i": i, "pad": "x".repeat(100)})))
                .await;
        }
        for g in &gws {
            g.wait_metric("wsnotify_messages_total{outcome=\"no_recipient\"}", K)
                .await;
        }
        // The broker's counters are sampled every few seconds: read a sample taken after this.
        let after = fresh_counters(&pids, interval).await;
        let d: Vec<f64> = (0..4)
            .map(|i| (after[i] - before[i]) as f64 / K as f64)
            .collect();
        let mut records = 0;
        for g in &gws {
            records += g.metric("wsnotify_log_records_total").await;
        }
        // In: a publish and a delivery to the taker; out: one record appended, and read by
        // each replica, per `K / records` notifications.
        let per_record = K as f64 / records.max(1) as f64;
        println!(
            "| {n} | {per_record:.1} | {:.2} | {:.0} | {:.0} | {:.1} |",
            2.0 + (1 + n) as f64 / per_record,
            d[0],
            d[1],
            d[2] + d[3]
        );
    }
}
