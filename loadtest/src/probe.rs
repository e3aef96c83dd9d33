//! `loadtest broker-probe`: RabbitMQ alone, no gateway — publish at a fixed rate to a fresh
//! queue and consume it in the same process (manual acks, like a gateway), measuring publish →
//! consume latency. It is the floor under any gateway's unicast latency on the same machine,
//! and shows what the broker costs in CPU at that rate.

use std::time::{Duration, Instant};

use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments};
use amqprs::connection::Connection;
use serde::Serialize;

use crate::client::{new_histogram, now_us, sent_at};
use crate::procstat::cpu_secs;
use crate::publish::{Pace, Publisher, parse_amqp_url};
use crate::suite::Latency;

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub rate: f64,
    pub secs: f64,
    pub published: u64,
    pub consumed: u64,
    pub latency: Latency,
    /// Broker CPU (cores) while it ran, if its process was found.
    pub broker_cores: Option<f64>,
    /// This process's CPU (publisher + consumer), in cores.
    pub probe_cores: f64,
}

/// Publishes `rate`/s for `secs` to a fresh queue, consumes it, and deletes the queue.
pub async fn run(
    amqp_url: &str,
    rate: f64,
    secs: f64,
    prefetch: u16,
    broker_pid: Option<u32>,
) -> Result<ProbeResult, String> {
    let queue = format!(
        "loadtest_probe_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let mut publisher = Publisher::connect(amqp_url, &queue, 200).await?;
    publisher.declare().await?;
    let conn = Connection::open(&parse_amqp_url(amqp_url)?)
        .await
        .map_err(|e| format!("RabbitMQ: {e}"))?;
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("channel: {e}"))?;
    ch.basic_qos(BasicQosArguments::new(0, prefetch, false))
        .await
        .map_err(|e| format!("qos: {e}"))?;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "probe")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(|e| format!("consume: {e}"))?;
    let n = (rate * secs).round() as u64;
    let consumer = tokio::spawn(async move {
        let mut h = new_histogram();
        let mut got = 0u64;
        let idle = Duration::from_secs(5);
        while got < n {
            let Ok(Some(msg)) = tokio::time::timeout(idle, rx.recv()).await else {
                break;
            };
            let now = now_us();
            if let Some(t) = msg.content.as_deref().and_then(sent_at) {
                let _ = h.record(now.saturating_sub(t).max(1));
            }
            if let Some(d) = msg.deliver {
                let _ = ch
                    .basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
                    .await;
            }
            got += 1;
        }
        let _ = ch.close().await;
        (got, h)
    });
    let me = std::process::id();
    let (cpu0, broker0) = (cpu_secs(me), broker_pid.and_then(cpu_secs));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut pace = Pace::new(rate);
    while sent < n {
        let due = pace.due().await.min(n);
        while sent < due {
            publisher.to_user("probe").await?;
            sent += 1;
        }
    }
    let (consumed, h) = consumer.await.map_err(|e| format!("consumer: {e}"))?;
    let wall = started.elapsed().as_secs_f64();
    let (cpu1, broker1) = (cpu_secs(me), broker_pid.and_then(cpu_secs));
    publisher.delete().await;
    publisher.close().await;
    let _ = conn.close().await;
    Ok(ProbeResult {
        rate,
        secs,
        published: sent,
        consumed,
        latency: Latency::of(&h),
        broker_cores: broker0.zip(broker1).map(|(a, b)| (b - a) / wall),
        probe_cores: cpu0.zip(cpu1).map_or(0.0, |(a, b)| (b - a) / wall),
    })
}
