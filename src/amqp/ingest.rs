//! The ingest leg: one replica at a time takes messages from the shared notify queue,
//! validates them, fixes their id and timestamp, and republishes them to the fanout exchange.
//!
//! **One taker at a time.** Each replica asks for an *exclusive* consumer on the notify queue;
//! the broker grants it to one and refuses the others, which retry every second as standbys.
//! When the taker dies or leaves, its consumer goes with its channel and a standby takes over
//! within a second. A single taker keeps messages in publish order end to end (per-user
//! ordering) and needs no queue arguments, so the queue backends already declared — plain,
//! durable, no arguments — works unchanged.
//!
//! **Ack after confirm.** A delivery is acked only once the broker has confirmed its republish
//! (or its dead-letter copy). Confirms are pipelined: the taker keeps publishing while earlier
//! confirms are in flight, and acks in order as they arrive. If the taker dies between a
//! confirmed republish and the ack, the message is redelivered; the new taker marks the copy
//! as redelivered and the replicas' dedupe window drops it (see [`super::fanout`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use amqprs::FieldValue;
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments,
    BasicQosArguments, Channel, ConsumerMessage,
};
use amqprs::connection::Connection;
use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::info;

use super::confirm::{ConfirmChannel, PublishError};
use super::fanout::Wire;
use super::{ConsumerConfig, ERROR_HEADER, RateLimited};
use crate::envelope::Parser;
use crate::metrics::{Metrics, inc};

/// How often a standby replica asks to become the taker.
const STANDBY_RETRY: Duration = Duration::from_secs(1);

type PendingAck = Pin<Box<dyn Future<Output = (Result<(), PublishError>, u64, Outcome)> + Send>>;

#[derive(Clone, Copy)]
enum Outcome {
    Republished,
    DeadLettered,
}

/// Takes the notify queue whenever this replica can, until `stop` turns true. Returns an error
/// when the broker link is unusable (the session then reconnects).
pub async fn run(
    conn: Connection,
    cfg: Arc<ConsumerConfig>,
    publisher: Arc<ConfirmChannel>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    errors: mpsc::Sender<String>,
) {
    let mut parser = Parser::new();
    let mut log = RateLimited::default();
    let mut announced_standby = false;
    loop {
        if *stop.borrow() {
            return;
        }
        let result = async {
            let ch = conn
                .open_channel(None)
                .await
                .map_err(|e| format!("open ingest channel: {e}"))?;
            ch.basic_qos(BasicQosArguments::new(0, cfg.prefetch, false))
                .await
                .map_err(|e| format!("qos: {e}"))?;
            let tag = format!("wsnotify-ingest-{}", uuid::Uuid::now_v7());
            let args = BasicConsumeArguments::new(&cfg.queue, &tag)
                .manual_ack(true)
                .exclusive(true)
                .finish();
            match ch.basic_consume_rx(args).await {
                Ok((_, rx)) => {
                    info!(queue = %cfg.queue, "this replica is now taking the notify queue");
                    metrics.ingest_active.store(true, Ordering::Release);
                    let r = take(
                        &ch,
                        &tag,
                        rx,
                        &cfg,
                        &publisher,
                        &metrics,
                        &mut parser,
                        &mut log,
                        &mut stop,
                    )
                    .await;
                    metrics.ingest_active.store(false, Ordering::Release);
                    let _ = ch.close().await;
                    r.map(|()| true)
                }
                // Another replica holds the exclusive consumer (the broker closed this channel).
                Err(_) if conn.is_open() => Ok(false),
                Err(e) => Err(format!("consume {}: {e}", cfg.queue)),
            }
        }
        .await;
        match result {
            Ok(true) => announced_standby = false,
            Ok(false) => {
                if !announced_standby {
                    info!(queue = %cfg.queue, "standby: another replica is taking the notify queue");
                    announced_standby = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(e) => {
                let _ = errors.send(e).await;
                return;
            }
        }
    }
}

/// Consumes as the taker until told to stop (Ok) or the link fails (Err).
#[allow(clippy::too_many_arguments)]
async fn take(
    ch: &Channel,
    tag: &str,
    mut rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    cfg: &ConsumerConfig,
    publisher: &ConfirmChannel,
    metrics: &Metrics,
    parser: &mut Parser,
    log: &mut RateLimited,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), String> {
    let mut pending: FuturesOrdered<PendingAck> = FuturesOrdered::new();
    loop {
        tokio::select! {
            biased;
            Some((res, delivery_tag, outcome)) = pending.next(), if !pending.is_empty() => {
                settle(ch, res, delivery_tag, outcome, metrics).await?;
            }
            _ = stop.changed() => break,
            msg = rx.recv() => match msg {
                Some(msg) => pending.push_back(republish(msg, cfg, publisher, parser, log).await?),
                None => return Err("ingest consumer closed".into()),
            },
        }
    }
    // Leaving: stop deliveries, then ack what was already republished. Deliveries still in
    // `rx` stay unacked and return to the queue when the channel closes.
    let _ = ch.basic_cancel(BasicCancelArguments::new(tag)).await;
    let drain = async {
        while let Some((res, delivery_tag, outcome)) = pending.next().await {
            settle(ch, res, delivery_tag, outcome, metrics).await?;
        }
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .map_err(|_| "confirms did not arrive in 5 s".to_owned())?
}

async fn settle(
    ch: &Channel,
    res: Result<(), PublishError>,
    delivery_tag: u64,
    outcome: Outcome,
    metrics: &Metrics,
) -> Result<(), String> {
    res.map_err(|e| format!("republish: {e}"))?;
    ch.basic_ack(BasicAckArguments::new(delivery_tag, false))
        .await
        .map_err(|e| format!("ack: {e}"))?;
    match outcome {
        Outcome::Republished => inc(&metrics.messages_ingested),
        Outcome::DeadLettered => inc(&metrics.messages_dead_lettered),
    }
    Ok(())
}

/// Validates one delivery and publishes it to the fanout exchange, or its original body to the
/// dead-letter queue. Returns the confirm to wait for before acking.
async fn republish(
    msg: ConsumerMessage,
    cfg: &ConsumerConfig,
    publisher: &ConfirmChannel,
    parser: &mut Parser,
    log: &mut RateLimited,
) -> Result<PendingAck, String> {
    let Some(deliver) = msg.deliver else {
        return Err("delivery without method frame".into());
    };
    let body = msg.content.unwrap_or_default();
    let received = OffsetDateTime::now_utc();
    let delivery_tag = deliver.delivery_tag();
    let (confirm, outcome) = match parser.parse(&body, cfg.max_message_bytes) {
        Ok(env) => {
            let wire = Wire::from_envelope(env, &body, deliver.redelivered(), received);
            let props = wire.properties();
            let confirm = publisher
                .publish(
                    props,
                    wire.data,
                    BasicPublishArguments::new(&cfg.exchange, ""),
                )
                .await
                .map_err(|e| format!("republish: {e}"))?;
            (confirm, Outcome::Republished)
        }
        Err(invalid) => {
            let reason = invalid.to_string();
            let mut props = msg.basic_properties.unwrap_or_default();
            let mut headers = props.headers().cloned().unwrap_or_default();
            if let Ok(key) = ERROR_HEADER.try_into() {
                headers.insert(key, FieldValue::from(reason.as_str()));
            }
            props.with_headers(headers).with_persistence(true);
            let confirm = publisher
                .publish(props, body, BasicPublishArguments::new("", &cfg.dead_queue))
                .await
                .map_err(|e| format!("dead-letter publish: {e}"))?;
            log.warn(&reason);
            (confirm, Outcome::DeadLettered)
        }
    };
    Ok(Box::pin(async move {
        (confirm.wait().await, delivery_tag, outcome)
    }))
}
