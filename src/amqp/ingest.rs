//! The ingest leg: one replica at a time takes messages from the shared notify queue,
//! validates them, fixes their id and timestamp, and appends them to the fan-out log.
//!
//! **One taker, on any queue type.** A replica becomes the taker by declaring the *exclusive*
//! queue `<queue>.taker`: the broker lets only one connection hold it, on every queue type and
//! every RabbitMQ version, and deletes it when that connection dies. The others retry every
//! second as standbys. (An exclusive *consumer* alone is not enough: RabbitMQ 3.10 accepts a
//! second one on a quorum queue, and two takers break per-user order.) Before consuming, a new
//! taker waits until the previous taker's consumer is gone, so the deliveries it left unacked
//! are back in the queue, in order, before anything newer is taken. A single taker keeps
//! messages in publish order end to end, and needs no queue arguments, so a queue backends
//! already declared — plain and durable, or quorum — works unchanged.
//!
//! **Group commit.** Notifications validated while the previous record awaits its confirm go
//! out together as the next record ([`super::record`]), bounded by count and size; and under
//! load, records leave at most every `RECORD_SPACING_MS`. A lone notification after a quiet
//! moment leaves at once; records grow only under load, which is when packing pays: the
//! broker charges per message, and more per message the fewer it gets (BENCHMARKS.md has the
//! measurements: at 2,000 notifications/s the confirm alone packs fewer than 2 per record, and
//! the fan-out leg cost the broker twice the single hop's CPU).
//!
//! **Ack after confirm.** Deliveries are acked — with `multiple`, one frame per record — only
//! once the broker confirmed the record that carries them (and the dead-letter copies of the
//! invalid ones among them). If the taker dies in between, the messages are redelivered; the
//! new taker marks them redelivered and replicas drop the copies they already have (see
//! [`super::log`]).
//!
//! This module must not know who is connected: it ends where a record is confirmed. Its own
//! replica's reader gets the validated notifications through [`Routed`]; routing them to sockets
//! is the registry's job.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicPublishArguments,
    BasicQosArguments, Channel, ConsumerMessage, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::Connection;
use amqprs::{BasicProperties, FieldValue};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::confirm::{Confirm, ConfirmChannel};
use super::record::{Origin, RecordBuilder};
use super::{CONFIRM_TIMEOUT, ConsumerConfig, ERROR_HEADER, RateLimited};
use crate::envelope::Parser;
use crate::metrics::Metrics;
use crate::notification::Notification;

/// How often a standby replica asks to become the taker.
const STANDBY_RETRY: Duration = Duration::from_secs(1);
/// Longest wait for the previous taker's consumer to disappear. When the previous taker's
/// connection closed, its consumer goes within milliseconds of its lock queue. When its
/// *node* died, a quorum queue returns the consumer's unacked messages at once but keeps
/// counting the consumer itself until the node is back (rabbitmq-server#2420): there the wait
/// only delays the handover, and it was the whole of a 10.4–10.8 s delivery gap measured after
/// `kill -9` of the taker's node with a 10 s bound (`tests/it/cluster.rs`).
const HANDOVER_WAIT: Duration = Duration::from_secs(2);
/// Most notifications in one record.
const RECORD_MAX_ENTRIES: usize = 1024;
/// A record stops growing once it is this large (one notification may exceed it alone).
const RECORD_MAX_BYTES: usize = 512 * 1024;
/// Longest a new taker waits for this replica to read its first record back before it routes
/// its notifications here directly (see [`Local`]); past it, they go the long way this term.
const SWITCH_WAIT: Duration = Duration::from_secs(2);

/// What the taker shares with its own replica's reader of the fan-out log.
///
/// The taker's own replica need not wait for a notification to come back from the broker: the
/// taker routes it there at once (the log copy is then skipped by the reader, by its origin).
/// That is safe only once the reader has read everything earlier takers appended, so a new
/// taker first appends one record the usual way and waits until the reader has read it back;
/// from the next record on, it routes locally ([`Routed::From`] tells the reader which of its
/// records to skip). With one replica, every user gets notifications without the second broker
/// hop; with several, the taker's users do.
pub struct Local {
    pub routed: mpsc::UnboundedSender<Routed>,
    /// The origin of the last record the reader has read.
    pub read: watch::Receiver<Origin>,
}

/// From the taker to its replica's reader.
pub enum Routed {
    /// This term's records from this one on carry notifications already handed over here.
    From(Origin),
    /// Notifications to record and route now, in this order.
    Notifications(Vec<Notification>),
}
/// Takes the notify queue whenever this replica can, until `stop` turns true. Sends a
/// description of the failure to `errors` when the broker link is unusable (the session then
/// reconnects).
pub async fn run(
    conn: Connection,
    cfg: Arc<ConsumerConfig>,
    publisher: Arc<ConfirmChannel>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    errors: mpsc::Sender<String>,
    local: Local,
) {
    let mut taker = Taker {
        cfg,
        publisher,
        metrics,
        parser: Parser::new(),
        log: RateLimited::default(),
        local,
    };
    let mut announced_standby = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match taker.take_if_free(&conn, &mut stop).await {
            Ok(true) => announced_standby = false,
            Ok(false) => {
                if !announced_standby {
                    info!(queue = %taker.cfg.queue, "standby: another replica is taking the notify queue");
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

/// The taker's state across turns.
struct Taker {
    cfg: Arc<ConsumerConfig>,
    publisher: Arc<ConfirmChannel>,
    metrics: Arc<Metrics>,
    parser: Parser,
    log: RateLimited,
    local: Local,
}

/// How this term's notifications reach this replica's users.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// Through the log, like everyone's.
    Log,
    /// Waiting for the reader to read record `seq` back (held notifications are kept).
    Switching { seq: u64, since: Instant },
    /// Handed to the reader at once.
    Local,
}

impl Taker {
    /// One turn: takes the lock and the queue if they are free and consumes until told to stop
    /// (`Ok(true)`); `Ok(false)` if another replica holds them; `Err` if the link failed.
    async fn take_if_free(
        &mut self,
        conn: &Connection,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<bool, String> {
        let cfg = self.cfg.clone();
        let lock = conn
            .open_channel(None)
            .await
            .map_err(|e| format!("open lock channel: {e}"))?;
        let args = QueueDeclareArguments::new(&cfg.taker_lock)
            .exclusive(true)
            .finish();
        if let Err(e) = lock.queue_declare(args).await {
            // RESOURCE_LOCKED: another replica's connection holds it (the broker closed this
            // channel). Anything else with the connection down is a lost link.
            return if conn.is_open() {
                Ok(false)
            } else {
                Err(format!("declare {}: {e}", cfg.taker_lock))
            };
        }
        let taken = async {
            wait_for_previous_taker(conn, &cfg.queue).await;
            let ch = conn
                .open_channel(None)
                .await
                .map_err(|e| format!("open ingest channel: {e}"))?;
            ch.basic_qos(BasicQosArguments::new(0, cfg.prefetch, false))
                .await
                .map_err(|e| format!("qos: {e}"))?;
            let tag = format!("wsnotify-ingest-{}", uuid::Uuid::now_v7());
            // Exclusive as well, where the broker enforces it: a replica of an older version
            // (no lock) and this one never take a classic queue together.
            let args = BasicConsumeArguments::new(&cfg.queue, &tag)
                .manual_ack(true)
                .exclusive(true)
                .finish();
            let rx = match ch.basic_consume_rx(args).await {
                Ok((_, rx)) => rx,
                Err(_) if conn.is_open() => return Ok(false),
                Err(e) => return Err(format!("consume {}: {e}", cfg.queue)),
            };
            info!(queue = %cfg.queue, "this replica is now taking the notify queue");
            self.metrics.ingest_active.store(true, Ordering::Release);
            let r = self.take(&ch, &tag, rx, stop).await;
            self.metrics.ingest_active.store(false, Ordering::Release);
            let _ = ch.close().await;
            r.map(|()| true)
        }
        .await;
        // Let a standby take over now rather than when this connection ends.
        let _ = lock
            .queue_delete(QueueDeleteArguments::new(&cfg.taker_lock))
            .await;
        let _ = lock.close().await;
        taken
    }

    /// Consumes as the taker until told to stop (Ok) or the link fails (Err).
    async fn take(
        &mut self,
        ch: &Channel,
        tag: &str,
        mut rx: mpsc::UnboundedReceiver<ConsumerMessage>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let spacing = self.cfg.record_spacing;
        let term = fastrand::u64(1..);
        let mut seq = 0;
        let mut route = Route::Log;
        let mut tried_local = false;
        let mut batch = Batch::default();
        let mut inflight: Option<InFlight> = None;
        let mut consuming = true;
        let mut last_sent: Option<Instant> = None;
        loop {
            if let Route::Switching { seq: first, since } = route {
                let read = *self.local.read.borrow();
                if read.taker == term && read.seq >= first {
                    // Everything before this term has been read here: from now on, hand over.
                    let from = Origin {
                        taker: term,
                        seq: seq + 1,
                    };
                    let _ = self.local.routed.send(Routed::From(from));
                    let held = std::mem::take(&mut batch.held);
                    let _ = self.local.routed.send(Routed::Notifications(held));
                    route = Route::Local;
                } else if since.elapsed() >= SWITCH_WAIT || !consuming {
                    warn!(
                        "this replica did not read the taker's first record back in time; its notifications go through the log this term"
                    );
                    batch.held.clear();
                    route = Route::Log;
                }
            }
            // Nothing awaiting a confirm, the last record left long enough ago (or never, or
            // this replica is leaving), and no switch under way: what has been validated
            // leaves now.
            let wait = last_sent.map_or(Duration::ZERO, |t| spacing.saturating_sub(t.elapsed()));
            // A full record does not wait: spacing only gathers, it never caps throughput.
            let full = batch.is_full(self.cfg.prefetch);
            let due =
                (wait.is_zero() || full || !consuming) && !matches!(route, Route::Switching { .. });
            if inflight.is_none() && !batch.is_empty() && due {
                last_sent = Some(Instant::now());
                // Records of one term are numbered without a hole (a batch of dead letters
                // only appends nothing): replicas tell lost records by that (see `log`).
                let appends = batch.appends();
                if appends {
                    seq += 1;
                }
                let origin = Origin { taker: term, seq };
                inflight = Some(
                    std::mem::take(&mut batch)
                        .send(&self.publisher, &self.cfg, origin)
                        .await?,
                );
                if appends && route == Route::Log && !tried_local && consuming {
                    tried_local = true;
                    route = Route::Switching {
                        seq,
                        since: Instant::now(),
                    };
                }
            }
            if !consuming && inflight.is_none() && batch.is_empty() {
                return Ok(());
            }
            let full = batch.is_full(self.cfg.prefetch);
            let holding = inflight.is_none() && !batch.is_empty();
            let switching = matches!(route, Route::Switching { .. });
            tokio::select! {
                biased;
                _ = tokio::time::sleep(wait), if holding && !switching => {}
                _ = tokio::time::sleep(SWITCH_WAIT / 20), if switching => {}
                _ = self.local.read.changed(), if switching => {}
                settled = async {
                    match inflight.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if inflight.is_some() => {
                    inflight = None;
                    let s = settled?;
                    ch.basic_ack(BasicAckArguments::new(s.last_tag, true))
                        .await
                        .map_err(|e| format!("ack: {e}"))?;
                    self.metrics.messages_ingested.fetch_add(s.ingested, Ordering::Relaxed);
                    if s.ingested > 0 {
                        self.metrics.log_records.fetch_add(1, Ordering::Relaxed);
                    }
                    self.metrics.messages_dead_lettered.fetch_add(s.dead_lettered, Ordering::Relaxed);
                }
                _ = stop.changed(), if consuming => {
                    // Leaving: no more deliveries; what was taken is sent and acked first.
                    // Deliveries still in `rx` stay unacked and return to the queue, in order,
                    // when the channel closes.
                    consuming = false;
                    let _ = ch.basic_cancel(BasicCancelArguments::new(tag)).await;
                }
                msg = rx.recv(), if consuming && !full => match msg {
                    Some(msg) => self.add(&mut batch, msg, route).await?,
                    None => return Err("ingest consumer closed".into()),
                },
            }
        }
    }

    /// Validates one delivery into the batch, or sends its original body to the dead-letter
    /// queue (settled with the batch).
    async fn add(
        &mut self,
        batch: &mut Batch,
        msg: ConsumerMessage,
        route: Route,
    ) -> Result<(), String> {
        let Some(deliver) = msg.deliver else {
            return Err("delivery without method frame".into());
        };
        let body = msg.content.unwrap_or_default();
        batch.last_tag = deliver.delivery_tag();
        match self.parser.parse(&body, self.cfg.max_message_bytes) {
            Ok(env) => {
                let n = Notification::from_envelope(
                    env,
                    &body,
                    deliver.redelivered(),
                    OffsetDateTime::now_utc(),
                );
                batch.record.push(&n);
                match route {
                    Route::Local => {
                        let _ = self.local.routed.send(Routed::Notifications(vec![n]));
                    }
                    Route::Switching { .. } => batch.held.push(n),
                    Route::Log => {}
                }
            }
            Err(invalid) => {
                let reason = invalid.to_string();
                let mut props = msg.basic_properties.unwrap_or_default();
                let mut headers = props.headers().cloned().unwrap_or_default();
                if let Ok(key) = ERROR_HEADER.try_into() {
                    headers.insert(key, FieldValue::from(reason.as_str()));
                }
                props.with_headers(headers).with_persistence(true);
                // Mandatory: if the dead-letter queue is gone, the copy comes back as an error
                // and the message stays in the notify queue.
                let mut args = BasicPublishArguments::new("", &self.cfg.dead_queue);
                args.mandatory(true);
                let confirm = self
                    .publisher
                    .publish(props, body, args, CONFIRM_TIMEOUT)
                    .await
                    .map_err(|e| format!("dead-letter publish: {e}"))?;
                self.log.warn(&reason);
                batch.dead.push(confirm);
            }
        }
        Ok(())
    }
}

/// What a record's confirm settles: the deliveries up to `last_tag`.
struct Settled {
    last_tag: u64,
    ingested: u64,
    dead_lettered: u64,
}

type InFlight = Pin<Box<dyn Future<Output = Result<Settled, String>> + Send>>;

/// Deliveries taken since the last record left.
#[derive(Default)]
struct Batch {
    record: RecordBuilder,
    /// While switching to local routing: the notifications to hand over once it is safe.
    held: Vec<Notification>,
    /// Dead-letter copies of the invalid deliveries among them.
    dead: Vec<Confirm>,
    /// Highest delivery tag among them.
    last_tag: u64,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.record.is_empty() && self.dead.is_empty()
    }

    /// Whether sending it appends a record to the log (it holds valid notifications).
    fn appends(&self) -> bool {
        !self.record.is_empty()
    }

    /// As large as a record gets: at most half the deliveries the broker lets the taker hold
    /// (the other half fills the next record while this one awaits its confirm).
    fn is_full(&self, prefetch: u16) -> bool {
        let entries = RECORD_MAX_ENTRIES.min(usize::from(prefetch / 2)).max(1);
        self.record.len() >= entries || self.record.bytes() >= RECORD_MAX_BYTES
    }

    /// Publishes the record (mandatory: if the log is gone, that is an error, not a silent
    /// drop) and returns what resolves once it and the dead-letter copies are confirmed.
    async fn send(
        self,
        publisher: &ConfirmChannel,
        cfg: &ConsumerConfig,
        origin: Origin,
    ) -> Result<InFlight, String> {
        let ingested = self.record.len() as u64;
        let record = if self.record.is_empty() {
            None
        } else {
            let props = BasicProperties::default()
                .with_content_type(super::RECORD_CONTENT_TYPE)
                .with_persistence(true)
                .finish();
            let mut args = BasicPublishArguments::new("", &cfg.log);
            args.mandatory(true);
            let confirm = publisher
                .publish(props, self.record.finish(origin), args, CONFIRM_TIMEOUT)
                .await
                .map_err(|e| format!("append to the fan-out log: {e}"))?;
            Some(confirm)
        };
        let (dead, last_tag) = (self.dead, self.last_tag);
        let started = Instant::now();
        Ok(Box::pin(async move {
            if let Some(c) = record {
                c.wait_for(CONFIRM_TIMEOUT)
                    .await
                    .map_err(|e| format!("append to the fan-out log: {e}"))?;
            }
            let dead_lettered = dead.len() as u64;
            for c in dead {
                let left = CONFIRM_TIMEOUT.saturating_sub(started.elapsed());
                c.wait_for(left)
                    .await
                    .map_err(|e| format!("dead-letter publish: {e}"))?;
            }
            Ok(Settled {
                last_tag,
                ingested,
                dead_lettered,
            })
        }))
    }
}

/// Waits (bounded) until the notify queue has no consumer: a taker that just died leaves its
/// consumer behind until the broker notices, and its unacked deliveries return to the queue
/// only then. Consuming earlier could take newer messages before them.
async fn wait_for_previous_taker(conn: &Connection, queue: &str) {
    let deadline = Instant::now() + HANDOVER_WAIT;
    while Instant::now() < deadline {
        let Ok(ch) = conn.open_channel(None).await else {
            return;
        };
        let consumers = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .ok()
            .flatten()
            .map_or(0, |(_, _, consumers)| consumers);
        let _ = ch.close().await;
        if consumers == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    warn!(
        queue,
        "the previous taker's consumer is still there; taking the queue anyway"
    );
}
