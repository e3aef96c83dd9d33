//! The broker side: take messages from the notify queue, append them to the fan-out log, and
//! deliver the log to this replica's users — across broker restarts and node losses.
//!
//! ```text
//!  backends ──▶ websocket_notifications ──▶ (one replica: ingest) ──▶ <queue>.log (stream)
//!               (durable or quorum, shared)  validate, id, timestamp,    │ every replica reads
//!                    │ invalid               pack into records          ▼ it at its own offset
//!                    └──▶ <queue>.dead                     history ◀── log ──▶ registry
//! ```
//!
//! * [`ingest`]: one replica at a time (it holds the lock queue `<queue>.taker`) validates and
//!   appends records to the log, and acks only after the broker confirmed them;
//! * [`record`]: the record format;
//! * [`log`]: every replica follows the log, records each notification in its history and
//!   routes it to its local registry;
//! * [`confirm`]: publisher confirms; [`url`]: `AMQP_URL`, one or several nodes.
//!
//! amqprs does not reconnect by itself. [`run`] is a supervisor loop: one session per broker
//! connection; when the link is lost the gateway reports not-ready, waits with capped
//! exponential backoff (with jitter, so replicas do not reconnect in lockstep), and starts a
//! new session on the next node, which declares what it needs and resumes the log where it
//! left off. WebSocket clients are untouched throughout.
//!
//! This module must not know about configuration parsing, sockets or HTTP.

pub mod confirm;
pub mod ingest;
pub mod log;
pub mod record;
pub mod url;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::{BasicAckArguments, BasicPublishArguments, QueueDeclareArguments};
use amqprs::connection::Connection;
use amqprs::{BasicProperties, Close, FieldTable, FieldValue};
use async_trait::async_trait;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::history::History;
use crate::metrics::{Metrics, inc};
use crate::registry::Registry;
use crate::shutdown::Shutdown;
use confirm::ConfirmChannel;
use log::{Follower, Read};
use url::AmqpUrl;

/// Header carrying the reason on dead-lettered messages (contract §1).
pub const ERROR_HEADER: &str = "x-wsnotify-error";
/// Content type of the fan-out log's records.
pub const RECORD_CONTENT_TYPE: &str = "application/vnd.wsnotify.record";
/// Longest wait for the broker to take or confirm one of the gateway's own publishes; past
/// it the link is treated as broken and the session starts over.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The log keeps at least this long, and twice the history window (retention drops whole
/// segments, so they are kept small enough for the age bound to bite).
const LOG_MIN_AGE: Duration = Duration::from_secs(15 * 60);
const LOG_MAX_BYTES: i64 = 2 << 30;
const LOG_SEGMENT_BYTES: i64 = 32 << 20;
/// Longest a replica leaving waits to deliver what it already took in.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Log deliveries acked at once: half the prefetch, so credit never runs out. A stream ack only
/// returns credit (nothing is redelivered, and the replica tracks its own offset), so there is
/// no reason to ack sooner, and each ack costs the broker work.
const ACK_EVERY: u64 = 32;

/// What the broker side needs to know.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub url: AmqpUrl,
    /// The shared notify queue backends publish to.
    pub queue: String,
    pub dead_queue: String,
    /// The fan-out log (a stream).
    pub log: String,
    /// The exclusive queue whose holder is the taker.
    pub taker_lock: String,
    /// How far back a starting replica reads the log (its recovery history).
    pub history_window: Duration,
    pub dedupe_window: usize,
    pub prefetch: u16,
    pub max_message_bytes: usize,
    /// Least time between two records the taker appends (group commit under load).
    pub record_spacing: Duration,
}

impl ConsumerConfig {
    /// The names derived from the notify queue's.
    pub fn new(url: AmqpUrl, queue: &str) -> ConsumerConfig {
        ConsumerConfig {
            url,
            queue: queue.to_owned(),
            dead_queue: format!("{queue}.dead"),
            log: format!("{queue}.log"),
            taker_lock: format!("{queue}.taker"),
            history_window: Duration::from_secs(300),
            dedupe_window: 65_536,
            prefetch: 256,
            max_message_bytes: 65_536,
            record_spacing: Duration::from_millis(10),
        }
    }
}

/// The session's confirm channel, shared with `POST /api/publish` while the link is up.
#[derive(Default)]
pub struct Link {
    publisher: parking_lot::RwLock<Option<Arc<ConfirmChannel>>>,
    /// The broker is blocking publishers (a memory or disk alarm).
    blocked: AtomicBool,
}

impl Link {
    /// The live publisher, or `None` while the broker link is down.
    pub fn publisher(&self) -> Option<Arc<ConfirmChannel>> {
        self.publisher.read().clone()
    }

    /// True while the broker refuses to take publishes (`connection.blocked`).
    pub fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    fn set(&self, p: Option<Arc<ConfirmChannel>>) {
        if p.is_none() {
            // A new connection starts unblocked; its own callback says otherwise.
            self.blocked.store(false, Ordering::Release);
        }
        *self.publisher.write() = p;
    }
}

/// Capped exponential backoff with ±20 % jitter.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        base.mul_f64(0.8 + fastrand::f64() * 0.4)
    }

    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Why a session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Consumes until shutdown, reconnecting (to the next node, on a cluster) whenever the broker
/// link is lost.
pub async fn run(
    cfg: ConsumerConfig,
    registry: Arc<Registry>,
    history: Arc<History>,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    mut shutdown: Shutdown,
) {
    let mut consumer = Consumer {
        follower: Follower::new(cfg.dedupe_window),
        // Replicas start on different nodes, so they do not all crowd the first one.
        node: fastrand::usize(..cfg.url.len().max(1)),
        cfg: Arc::new(cfg),
        registry,
        history,
        metrics,
        link,
        backoff: Backoff::default(),
        warm: false,
    };
    loop {
        let end = consumer.session(&mut shutdown).await;
        consumer.metrics.broker_up.store(false, Ordering::Release);
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost(why) => {
                consumer.node += 1;
                let delay = consumer.backoff.next_delay();
                warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "broker link down; gateway not ready");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    }
}

/// What outlives one broker session.
struct Consumer {
    cfg: Arc<ConsumerConfig>,
    registry: Arc<Registry>,
    history: Arc<History>,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    follower: Follower,
    backoff: Backoff,
    /// Node to try first.
    node: usize,
    /// The history holds the window: read the log up to the marker appended at start-up.
    warm: bool,
}

impl Consumer {
    /// One broker connection: declare, consume, and return when it ends.
    async fn session(&mut self, shutdown: &mut Shutdown) -> SessionEnd {
        if shutdown.is_shutdown() {
            return SessionEnd::Shutdown;
        }
        let name = format!("wsnotify {}", std::process::id());
        let conn = match self.cfg.url.connect(self.node, &name).await {
            Ok((conn, node)) => {
                self.node = node;
                conn
            }
            Err(e) => return SessionEnd::Lost(e),
        };
        // Subscribe to I/O failures before anything else can fail (see notes on amqprs #125).
        let (lost_tx, mut lost_rx) = mpsc::channel::<String>(4);
        let io_failure = {
            let (c, tx) = (conn.clone(), lost_tx.clone());
            tokio::spawn(async move {
                if c.listen_network_io_failure().await {
                    let _ = tx.send("network I/O failure".into()).await;
                }
            })
        };
        let end = match self.consume(&conn, shutdown, lost_tx, &mut lost_rx).await {
            Ok(end) => end,
            Err(e) => SessionEnd::Lost(e),
        };
        self.link.set(None);
        io_failure.abort();
        self.metrics.broker_up.store(false, Ordering::Release);
        if conn.is_open() {
            // Closing the connection requeues every delivery we did not ack.
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
        }
        end
    }

    /// Declares what this replica needs, starts the ingest leg, and follows the log.
    async fn consume(
        &mut self,
        conn: &Connection,
        shutdown: &mut Shutdown,
        lost_tx: mpsc::Sender<String>,
        lost_rx: &mut mpsc::Receiver<String>,
    ) -> Result<SessionEnd, String> {
        let cfg = self.cfg.clone();
        let e = |what: &'static str| move |err: amqprs::error::Error| format!("{what}: {err}");
        conn.register_callback(LinkCallback {
            link: self.link.clone(),
        })
        .await
        .map_err(e("register callback"))?;
        declare_queue(conn, &cfg.queue).await?;
        declare_log(conn, &cfg.log, cfg.history_window).await?;
        declare_dead_letter_queue(conn, &cfg.dead_queue, cfg.url.len() > 1).await;
        let ch = conn.open_channel(None).await.map_err(e("open channel"))?;
        let publisher = Arc::new(
            ConfirmChannel::open(conn)
                .await
                .map_err(e("open confirm channel"))?,
        );
        // On first start, read the log from a window ago up to a marker appended now: then the
        // history holds the window and the replica may report ready.
        let warm_marker = match self.warm {
            true => None,
            false => {
                let id = format!("warm-{}", uuid::Uuid::now_v7());
                append_marker(&publisher, &cfg.log, &id).await?;
                Some(id)
            }
        };
        let window_secs = cfg.history_window.as_secs();
        let mut rx = self.follower.subscribe(&ch, &cfg.log, window_secs).await?;
        let (stop_tx, stop_rx) = watch::channel(false);
        // The taker hands its notifications to this replica directly once it safely can.
        let (routed_tx, mut routed_rx) = mpsc::unbounded_channel();
        let (read_tx, read_rx) = watch::channel(record::Origin::default());
        let local = ingest::Local {
            routed: routed_tx,
            read: read_rx,
        };
        let taker = tokio::spawn(ingest::run(
            conn.clone(),
            cfg.clone(),
            publisher.clone(),
            self.metrics.clone(),
            stop_rx,
            lost_tx,
            local,
        ));

        self.link.set(Some(publisher.clone()));
        self.metrics.broker_up.store(true, Ordering::Release);
        inc(&self.metrics.broker_connects);
        self.backoff.reset();
        info!(queue = %cfg.queue, log = %cfg.log, node = %cfg.url.node_name(self.node), "consuming");
        let started = Instant::now();

        let mut acks = Acks::default();
        let mut health = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            tokio::select! {
                biased;
                _ = shutdown.recv() => break SessionEnd::Shutdown,
                why = lost_rx.recv() => break SessionEnd::Lost(why.unwrap_or_else(|| "ingest stopped".into())),
                Some(routed) = routed_rx.recv() => {
                    self.follower.local(routed, &self.history, &self.registry, &self.metrics).await;
                }
                msg = rx.recv() => {
                    let Some(msg) = msg else {
                        break SessionEnd::Lost("log consumer closed".into());
                    };
                    let tag = msg.deliver.as_ref().map(|d| d.delivery_tag());
                    let read = self.follower.read(msg, &self.history, &self.registry, &self.metrics, self.warm).await;
                    match read {
                        Read::Notifications(origin) => {
                            let _ = read_tx.send(origin);
                        }
                        Read::Marker(id) if Some(&id) == warm_marker.as_ref() => {
                            self.warm = true;
                            self.metrics.history_warm.store(true, Ordering::Release);
                            let stats = self.history.stats(log::unix_ms());
                            info!(entries = stats.entries, ms = started.elapsed().as_millis() as u64, "recovery history filled from the fan-out log");
                        }
                        _ => {}
                    }
                    acks.after(&ch, tag, false).await?;
                }
                _ = health.tick() => {
                    if !conn.is_open() || !ch.is_open() {
                        break SessionEnd::Lost("connection closed".into());
                    }
                }
            }
        };
        self.metrics.broker_up.store(false, Ordering::Release);
        self.link.set(None);
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), taker).await;
        // What the taker handed over last (its copies in the log are skipped).
        while let Ok(routed) = routed_rx.try_recv() {
            self.follower
                .local(routed, &self.history, &self.registry, &self.metrics)
                .await;
        }
        if let SessionEnd::Shutdown = end {
            // Deliver everything this replica took in before its users are told to go: a marker
            // appended after the taker stopped arrives after every record before it.
            let id = format!("drain-{}", uuid::Uuid::now_v7());
            let drained = async {
                append_marker(&publisher, &cfg.log, &id).await?;
                while let Some(msg) = rx.recv().await {
                    let tag = msg.deliver.as_ref().map(|d| d.delivery_tag());
                    let read = self
                        .follower
                        .read(msg, &self.history, &self.registry, &self.metrics, true)
                        .await;
                    acks.after(&ch, tag, true).await?;
                    if matches!(read, Read::Marker(m) if m == id) {
                        break;
                    }
                }
                Ok::<(), String>(())
            };
            match tokio::time::timeout(DRAIN_TIMEOUT, drained).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "fan-out log not drained"),
                Err(_) => warn!("fan-out log not drained within {DRAIN_TIMEOUT:?}"),
            }
        }
        if let Ok(p) = Arc::try_unwrap(publisher) {
            p.close().await;
        }
        let _ = ch.close().await;
        Ok(end)
    }
}

/// Acks log deliveries in batches of [`ACK_EVERY`] (or at once when `now`).
#[derive(Default)]
struct Acks {
    last: Option<u64>,
    unacked: u64,
}

impl Acks {
    async fn after(
        &mut self,
        ch: &amqprs::channel::Channel,
        tag: Option<u64>,
        now: bool,
    ) -> Result<(), String> {
        if tag.is_some() {
            self.last = tag;
            self.unacked += 1;
        }
        if let Some(last) = self.last
            && self.unacked > 0
            && (now || self.unacked >= ACK_EVERY)
        {
            ch.basic_ack(BasicAckArguments::new(last, true))
                .await
                .map_err(|e| format!("ack: {e}"))?;
            self.unacked = 0;
        }
        Ok(())
    }
}

/// Appends a marker record to the log and waits for the broker to confirm it.
async fn append_marker(publisher: &ConfirmChannel, log: &str, id: &str) -> Result<(), String> {
    let props = BasicProperties::default()
        .with_content_type(RECORD_CONTENT_TYPE)
        .finish();
    let mut args = BasicPublishArguments::new("", log);
    args.mandatory(true);
    publisher
        .publish(props, record::marker(id), args, CONFIRM_TIMEOUT)
        .await
        .map_err(|e| format!("append a marker to {log}: {e}"))?
        .wait_for(CONFIRM_TIMEOUT)
        .await
        .map_err(|e| format!("append a marker to {log}: {e}"))
}

/// Declares the notify queue as a plain durable queue — unless it already exists, in which case
/// it is left exactly as the backends declared it, classic or quorum (re-declaring with other
/// arguments would make the broker refuse with PRECONDITION_FAILED). A failed passive declare
/// closes its channel, hence the throwaway channel.
pub(crate) async fn declare_queue(conn: &Connection, queue: &str) -> Result<(), String> {
    if exists(conn, queue).await? {
        return Ok(());
    }
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    ch.queue_declare(QueueDeclareArguments::durable_client_named(queue))
        .await
        .map_err(|e| format!("declare {queue}: {e}"))?;
    let _ = ch.close().await;
    Ok(())
}

/// Declares the dead-letter queue unless it exists: on a cluster (several nodes in
/// `AMQP_URL`) as a quorum queue, so it outlives the loss of a node. A failure is only
/// logged: until the queue is back, invalid messages wait in the notify queue (the taker
/// cannot get their dead-letter copies confirmed, so it does not ack them).
async fn declare_dead_letter_queue(conn: &Connection, queue: &str, cluster: bool) {
    if exists(conn, queue).await.unwrap_or(false) {
        return;
    }
    let mut args = FieldTable::new();
    if cluster && let Ok(k) = "x-queue-type".try_into() {
        args.insert(k, "quorum".into());
    }
    let declared = async {
        let ch = conn.open_channel(None).await?;
        let r = ch
            .queue_declare(
                QueueDeclareArguments::new(queue)
                    .durable(true)
                    .arguments(args)
                    .finish(),
            )
            .await;
        let _ = ch.close().await;
        r
    };
    if let Err(e) = declared.await {
        warn!(queue, error = %e, "cannot declare the dead-letter queue; invalid messages wait until it is available");
    }
}

/// Declares the fan-out log, a stream, unless it exists (whoever declared it first set its
/// retention). Retention keeps at least twice the history window.
async fn declare_log(conn: &Connection, log: &str, window: Duration) -> Result<(), String> {
    if exists(conn, log).await? {
        return Ok(());
    }
    let max_age = LOG_MIN_AGE.max(window * 2).as_secs();
    let mut args = FieldTable::new();
    let mut put = |k: &str, v: FieldValue| {
        if let Ok(k) = k.try_into() {
            args.insert(k, v);
        }
    };
    put("x-queue-type", "stream".into());
    put("x-max-age", format!("{max_age}s").as_str().into());
    put("x-max-length-bytes", FieldValue::l(LOG_MAX_BYTES));
    put(
        "x-stream-max-segment-size-bytes",
        FieldValue::l(LOG_SEGMENT_BYTES),
    );
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    let declared = ch
        .queue_declare(
            QueueDeclareArguments::new(log)
                .durable(true)
                .arguments(args)
                .finish(),
        )
        .await;
    let _ = ch.close().await;
    match declared {
        Ok(_) => Ok(()),
        // Another replica declared it in the meantime, perhaps with another window.
        Err(_) if exists(conn, log).await? => Ok(()),
        Err(e) => Err(format!("declare {log}: {e}")),
    }
}

/// Whether `queue` exists (a passive declare on a throwaway channel).
async fn exists(conn: &Connection, queue: &str) -> Result<bool, String> {
    let probe = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    let found = probe
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .is_ok();
    if found {
        let _ = probe.close().await;
    }
    Ok(found)
}

/// At most one warning per second about invalid messages, with a count of the rest.
#[derive(Default)]
pub(crate) struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    pub(crate) fn warn(&mut self, reason: &str) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return;
        }
        warn!(
            reason,
            suppressed = self.suppressed,
            "invalid message moved to the dead-letter queue"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

struct LinkCallback {
    link: Arc<Link>,
}

#[async_trait]
impl ConnectionCallback for LinkCallback {
    async fn close(
        &mut self,
        _conn: &Connection,
        close: Close,
    ) -> Result<(), amqprs::error::Error> {
        warn!(%close, "broker closed the connection");
        Ok(())
    }

    async fn blocked(&mut self, _conn: &Connection, reason: String) {
        warn!(reason, "broker blocks publishers (resource alarm)");
        self.link.blocked.store(true, Ordering::Release);
    }

    async fn unblocked(&mut self, _conn: &Connection) {
        info!("broker unblocked publishers");
        self.link.blocked.store(false, Ordering::Release);
    }

    async fn secret_updated(&mut self, _conn: &Connection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(120));
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX.mul_f64(1.2)));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
