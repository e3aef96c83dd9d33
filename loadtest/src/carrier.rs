//! `loadtest carrier-probe`: what the broker charges for the gateway's two legs, without a
//! gateway — so the fan-out carrier can be chosen with numbers (BENCHMARKS.md).
//!
//! A publisher sends notifications at a fixed rate to a notify queue, as backends do. Then:
//!
//! * `direct`: one consumer takes them and acks each — the single-hop design (the seed's, and
//!   `loadtest baseline`'s);
//! * `stream` / `queues`: a taker consumes the notify queue and group-commits what it took into
//!   records, exactly as wsnotify's taker does (the next record leaves when the previous one is
//!   confirmed; deliveries acked with `multiple` after the confirm), onto the carrier: one
//!   stream read by `replicas` consumers at their own offset, or a fanout exchange with one
//!   durable queue per replica and persistent records. Each replica acks every 32 records.
//!
//! It reports the broker's CPU per notification, notifications per record, and publish →
//! replica latency (replica 0's view).

use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments, ExchangeDeleteArguments,
    ExchangeType, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldTable, FieldValue, Nack, Return};
use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::{new_histogram, sent_at};
use crate::procstat::cpu_secs;
use crate::publish::{Pace, Publisher, parse_amqp_url};
use crate::suite::Latency;

/// The fan-out leg under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Carrier {
    /// No fan-out leg: one consumer of the notify queue (the single-hop design).
    Direct,
    /// One stream, read by every replica.
    Stream,
    /// A fanout exchange and one durable queue per replica.
    Queues,
    /// The taker alone: group commit, acks after a (simulated, immediate) confirm, no fan-out
    /// leg — what the ingest leg costs by itself.
    Ingest,
}

#[derive(Debug, Clone, Serialize)]
pub struct CarrierResult {
    pub carrier: Carrier,
    pub replicas: usize,
    pub rate: f64,
    pub published: u64,
    /// Notifications replica 0 received.
    pub received: u64,
    pub notifications_per_record: f64,
    pub latency: Latency,
    pub broker_cores: Option<f64>,
    /// Broker CPU per notification, µs.
    pub broker_us_per_notification: Option<f64>,
}

const PREFETCH: u16 = 256;

/// Size of each notification (`LOADTEST_FRAME_BYTES`, default 200).
fn frame_bytes() -> usize {
    std::env::var("LOADTEST_FRAME_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}
const REPLICA_PREFETCH: u16 = 64;
const ACK_EVERY: u64 = 32;

/// Runs one probe and removes everything it declared.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    amqp_url: &str,
    carrier: Carrier,
    replicas: usize,
    rate: f64,
    secs: f64,
    spacing: Duration,
    broker_pid: Option<u32>,
) -> Result<CarrierResult, String> {
    let base = format!(
        "loadtest_carrier_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let replicas = match carrier {
        Carrier::Direct => 1,
        Carrier::Ingest => 0,
        _ => replicas.max(1),
    };
    let conn = Connection::open(&parse_amqp_url(amqp_url)?)
        .await
        .map_err(|e| format!("RabbitMQ: {e}"))?;
    conn.register_callback(DefaultConnectionCallback)
        .await
        .map_err(|e| e.to_string())?;
    let setup = channel(&conn).await?;
    let mut publisher = Publisher::connect(amqp_url, &base, frame_bytes()).await?;
    publisher.declare().await?;
    let log = format!("{base}.log");
    let exchange = format!("{base}.fanout");
    let replica_queues: Vec<String> = (0..replicas).map(|i| format!("{base}.r{i}")).collect();
    match carrier {
        Carrier::Direct | Carrier::Ingest => {}
        Carrier::Stream => {
            let mut args = FieldTable::new();
            args.insert(
                "x-queue-type".try_into().map_err(|_| "field")?,
                FieldValue::from("stream"),
            );
            setup
                .queue_declare(
                    QueueDeclareArguments::new(&log)
                        .durable(true)
                        .arguments(args)
                        .finish(),
                )
                .await
                .map_err(|e| format!("declare stream: {e}"))?;
        }
        Carrier::Queues => {
            setup
                .exchange_declare(
                    ExchangeDeclareArguments::of_type(&exchange, ExchangeType::Fanout)
                        .durable(true)
                        .finish(),
                )
                .await
                .map_err(|e| format!("declare exchange: {e}"))?;
            for q in &replica_queues {
                setup
                    .queue_declare(QueueDeclareArguments::durable_client_named(q))
                    .await
                    .map_err(|e| format!("declare {q}: {e}"))?;
                setup
                    .queue_bind(QueueBindArguments::new(q, &exchange, ""))
                    .await
                    .map_err(|e| format!("bind {q}: {e}"))?;
            }
        }
    }

    let n = (rate * secs).round() as u64;
    // The replicas (or the direct consumer).
    let mut readers = Vec::new();
    for (i, q) in replica_queues.iter().enumerate() {
        let ch = channel(&conn).await?;
        let qname = match carrier {
            Carrier::Direct | Carrier::Ingest => base.clone(),
            Carrier::Stream => log.clone(),
            Carrier::Queues => q.clone(),
        };
        let prefetch = if carrier == Carrier::Direct {
            PREFETCH
        } else {
            REPLICA_PREFETCH
        };
        ch.basic_qos(BasicQosArguments::new(0, prefetch, false))
            .await
            .map_err(|e| format!("qos: {e}"))?;
        let mut args = BasicConsumeArguments::new(&qname, &format!("replica-{i}"))
            .manual_ack(true)
            .finish();
        if carrier == Carrier::Stream {
            let mut t = FieldTable::new();
            t.insert(
                "x-stream-offset".try_into().map_err(|_| "field")?,
                FieldValue::from("next"),
            );
            args.arguments(t);
        }
        let (_, rx) = ch
            .basic_consume_rx(args)
            .await
            .map_err(|e| format!("consume {qname}: {e}"))?;
        readers.push(tokio::spawn(read(ch, rx, carrier, n)));
    }
    // The taker.
    let taker = match carrier {
        Carrier::Direct => None,
        _ => {
            let ch = channel(&conn).await?;
            let (tx, acks) = mpsc::unbounded_channel();
            ch.register_callback(Confirms(tx))
                .await
                .map_err(|e| e.to_string())?;
            ch.confirm_select(ConfirmSelectArguments::new(false))
                .await
                .map_err(|e| format!("confirm: {e}"))?;
            ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false))
                .await
                .map_err(|e| format!("qos: {e}"))?;
            let (_, rx) = ch
                .basic_consume_rx(
                    BasicConsumeArguments::new(&base, "taker")
                        .manual_ack(true)
                        .finish(),
                )
                .await
                .map_err(|e| format!("consume: {e}"))?;
            let target = match carrier {
                Carrier::Stream => ("".to_owned(), log.clone()),
                Carrier::Ingest => (String::new(), String::new()),
                _ => (exchange.clone(), String::new()),
            };
            Some(tokio::spawn(take(ch, rx, acks, target, n, spacing)))
        }
    };

    let broker0 = broker_pid.and_then(cpu_secs);
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
    let records = match taker {
        Some(t) => t.await.map_err(|e| format!("taker: {e}"))??,
        None => n,
    };
    let mut first = (carrier == Carrier::Ingest).then(|| (n, new_histogram()));
    for r in readers {
        let got = r.await.map_err(|e| format!("replica: {e}"))?;
        first.get_or_insert(got);
    }
    let wall = started.elapsed().as_secs_f64();
    let broker1 = broker_pid.and_then(cpu_secs);
    let (received, h) = first.unwrap_or((0, new_histogram()));
    publisher.delete().await;
    publisher.close().await;
    // One channel per delete: a failed delete closes its channel.
    let _ = setup.close().await;
    for q in [&log].into_iter().chain(&replica_queues) {
        if let Ok(ch) = conn.open_channel(None).await {
            let _ = ch.queue_delete(QueueDeleteArguments::new(q)).await;
            let _ = ch.close().await;
        }
    }
    if let Ok(ch) = conn.open_channel(None).await {
        let _ = ch
            .exchange_delete(ExchangeDeleteArguments::new(&exchange))
            .await;
        let _ = ch.close().await;
    }
    let _ = conn.close().await;
    let broker_cores = broker0.zip(broker1).map(|(a, b)| (b - a) / wall);
    Ok(CarrierResult {
        carrier,
        replicas,
        rate,
        published: sent,
        received,
        notifications_per_record: n as f64 / records.max(1) as f64,
        latency: Latency::of(&h),
        broker_cores,
        broker_us_per_notification: broker0
            .zip(broker1)
            .map(|(a, b)| (b - a) * 1e6 / sent.max(1) as f64),
    })
}

async fn channel(conn: &Connection) -> Result<Channel, String> {
    conn.open_channel(None)
        .await
        .map_err(|e| format!("channel: {e}"))
}

/// Group commit, as wsnotify's taker does it. Returns the number of records sent.
async fn take(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    mut confirms: mpsc::UnboundedReceiver<u64>,
    (exchange, routing_key): (String, String),
    n: u64,
    spacing: Duration,
) -> Result<u64, String> {
    let mut last_sent = Instant::now() - spacing;
    let mut batch: Vec<u8> = Vec::new();
    let mut in_batch = 0u64;
    let mut last_tag = 0;
    let mut inflight: Option<(u64, u64)> = None; // (publish seq, last delivery tag)
    let mut published = 0u64;
    let mut taken = 0u64;
    let mut settled = 0u64;
    let idle = Duration::from_secs(5);
    while settled < n {
        let spaced = last_sent.elapsed() >= spacing;
        if inflight.is_none()
            && in_batch > 0
            && spaced
            && routing_key.is_empty()
            && exchange.is_empty()
        {
            // The ingest leg alone: ack as if the record had been confirmed at once.
            last_sent = Instant::now();
            ch.basic_ack(BasicAckArguments::new(last_tag, true))
                .await
                .map_err(|e| format!("ack: {e}"))?;
            published += 1;
            settled += in_batch;
            in_batch = 0;
            batch.clear();
            continue;
        }
        if inflight.is_none() && in_batch > 0 && spaced {
            last_sent = Instant::now();
            let mut body = Vec::with_capacity(8 + batch.len());
            body.extend_from_slice(&in_batch.to_le_bytes());
            body.append(&mut batch);
            let props = BasicProperties::default().with_persistence(true).finish();
            ch.basic_publish(
                props,
                body,
                BasicPublishArguments::new(&exchange, &routing_key),
            )
            .await
            .map_err(|e| format!("publish record: {e}"))?;
            published += 1;
            inflight = Some((published, last_tag));
            settled += in_batch;
            in_batch = 0;
        }
        let wait = spacing.saturating_sub(last_sent.elapsed());
        tokio::select! {
            _ = tokio::time::sleep(wait), if inflight.is_none() && in_batch > 0 && !spaced => {}
            ack = confirms.recv(), if inflight.is_some() => {
                let Some(ack) = ack else { return Err("confirms closed".into()) };
                if let Some((seq, tag)) = inflight
                    && ack >= seq
                {
                    ch.basic_ack(BasicAckArguments::new(tag, true))
                        .await
                        .map_err(|e| format!("ack: {e}"))?;
                    inflight = None;
                }
            }
            msg = tokio::time::timeout(idle, rx.recv()), if taken < n => {
                let Ok(Some(msg)) = msg else { return Err("the notify queue went quiet".into()) };
                let body = msg.content.unwrap_or_default();
                batch.extend_from_slice(&sent_at(&body).unwrap_or(0).to_le_bytes());
                batch.extend_from_slice(&(body.len() as u32).to_le_bytes());
                batch.extend_from_slice(&body);
                in_batch += 1;
                taken += 1;
                last_tag = msg.deliver.map_or(last_tag, |d| d.delivery_tag());
            }
        }
    }
    // The last record's confirm.
    if let Some((seq, tag)) = inflight {
        while let Ok(Some(ack)) = tokio::time::timeout(idle, confirms.recv()).await {
            if ack >= seq {
                let _ = ch.basic_ack(BasicAckArguments::new(tag, true)).await;
                break;
            }
        }
    }
    let _ = ch.close().await;
    Ok(published)
}

/// A replica (or the direct consumer): counts notifications and their latency until `n`.
async fn read(
    ch: Channel,
    mut rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    carrier: Carrier,
    n: u64,
) -> (u64, hdrhistogram::Histogram<u64>) {
    let mut h = new_histogram();
    let mut got = 0u64;
    let mut unacked = 0u64;
    let idle = Duration::from_secs(5);
    while got < n {
        let Ok(Some(msg)) = tokio::time::timeout(idle, rx.recv()).await else {
            break;
        };
        let now = crate::client::now_us();
        let body = msg.content.unwrap_or_default();
        match carrier {
            Carrier::Direct => {
                if let Some(t) = sent_at(&body) {
                    let _ = h.record(now.saturating_sub(t).max(1));
                }
                got += 1;
            }
            _ => {
                let count = body
                    .get(..8)
                    .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                let mut at = 8;
                for _ in 0..count {
                    let Some(t) = body.get(at..at + 8) else { break };
                    let t = u64::from_le_bytes(t.try_into().unwrap_or([0; 8]));
                    let _ = h.record(now.saturating_sub(t).max(1));
                    let len = body
                        .get(at + 8..at + 12)
                        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap_or([0; 4])));
                    at += 12 + len as usize;
                    got += 1;
                }
            }
        }
        if let Some(d) = msg.deliver {
            unacked += 1;
            // The single-hop design acks each message; replicas ack in batches.
            if carrier == Carrier::Direct || unacked >= ACK_EVERY || got >= n {
                let multiple = carrier != Carrier::Direct;
                let _ = ch
                    .basic_ack(BasicAckArguments::new(d.delivery_tag(), multiple))
                    .await;
                unacked = 0;
            }
        }
    }
    let _ = ch.close().await;
    (got, h)
}

/// Publisher confirms: the highest acked sequence number.
struct Confirms(mpsc::UnboundedSender<u64>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(ack.delivery_tag());
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}
