//! The broker side: take messages from the notify queue, fan them out to every replica, and
//! deliver each replica's copy to its own users — across broker restarts.
//!
//! ```text
//!  backends ──▶ websocket_notifications ──▶ (one replica: ingest) ──▶ <queue>.fanout exchange
//!               (durable, shared)            validate, id, timestamp      │  one copy per replica
//!                    │ invalid                                           ▼
//!                    └──▶ <queue>.dead                  <queue>.replica.<uuid>  (each replica)
//!                                                                        │
//!                                                           registry ◀───┘ (dedupe, route)
//! ```
//!
//! * [`ingest`]: one replica at a time (an exclusive consumer) validates and republishes, and
//!   acks only after the broker confirmed the republish;
//! * [`fanout`]: every replica consumes its own queue and routes to its local registry.
//!
//! amqprs does not reconnect by itself. [`run`] is a supervisor loop: one [`session`] per
//! broker connection; when the link is lost the gateway reports not-ready, waits with capped
//! exponential backoff (with jitter, so replicas do not reconnect in lockstep), and starts a
//! new session, which declares its topology and consumes again. WebSocket clients are untouched
//! throughout. A replica's queue outlives a short link loss (`x-expires`), so a replica that
//! reconnects in time also gets what was fanned out while it was away.

pub mod confirm;
pub mod fanout;
pub mod ingest;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConsumerMessage, ExchangeDeclareArguments, ExchangeType, QueueBindArguments,
    QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, Close, FieldTable, FieldValue};
use async_trait::async_trait;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, inc};
use crate::registry::{Outcome, Registry};
use crate::shutdown::Shutdown;
use confirm::ConfirmChannel;
use fanout::Dedupe;
use tokio::sync::{mpsc, watch};

/// Header carrying the reason on dead-lettered messages (contract §1).
pub const ERROR_HEADER: &str = "x-wsnotify-error";
const HEARTBEAT_SECS: u16 = 10;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Copies a replica's queue holds for it at most (oldest dropped first) while it is away.
const REPLICA_QUEUE_MAX_LENGTH: i64 = 100_000;

/// What the consumer needs from the configuration.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub url: String,
    /// The shared notify queue backends publish to.
    pub queue: String,
    pub dead_queue: String,
    /// Fanout exchange every replica's queue is bound to.
    pub exchange: String,
    /// This replica's own queue (unique per process).
    pub replica_queue: String,
    pub replica_queue_expires_ms: u64,
    pub dedupe_window: usize,
    pub prefetch: u16,
    pub max_message_bytes: usize,
}

impl ConsumerConfig {
    /// `None` in standalone mode (no `AMQP_URL`).
    pub fn from_config(c: &Config) -> Option<Self> {
        Some(Self {
            url: c.amqp_url.clone()?,
            queue: c.notify_queue.clone(),
            dead_queue: c.dead_letter_queue(),
            exchange: format!("{}.fanout", c.notify_queue),
            replica_queue: format!(
                "{}.replica.{}",
                c.notify_queue,
                uuid::Uuid::now_v7().simple()
            ),
            replica_queue_expires_ms: c.replica_queue_expires_ms,
            dedupe_window: c.dedupe_window,
            prefetch: c.amqp_prefetch,
            max_message_bytes: c.max_message_bytes,
        })
    }
}

/// The session's confirm channel, shared with `POST /api/publish` while the link is up.
#[derive(Default)]
pub struct Link {
    publisher: parking_lot::RwLock<Option<Arc<ConfirmChannel>>>,
}

impl Link {
    /// The live publisher, or `None` while the broker link is down.
    pub fn publisher(&self) -> Option<Arc<ConfirmChannel>> {
        self.publisher.read().clone()
    }

    fn set(&self, p: Option<Arc<ConfirmChannel>>) {
        *self.publisher.write() = p;
    }
}

/// Parses `amqp://user:pass@host:port/vhost?heartbeat=N`, percent-decoding each part (so the
/// default vhost is written `%2f`). amqprs has a URI parser, but it neither decodes the vhost
/// nor survives a query key without `=`, and a config value must never panic the process.
pub fn parse_url(url: &str) -> Result<OpenConnectionArguments, ConfigError> {
    let bad = |why: &str| {
        ConfigError::new(
            "AMQP_URL",
            format!("{why} (expected amqp://user:pass@host:port/vhost)"),
        )
    };
    let rest = url
        .strip_prefix("amqp://")
        .ok_or_else(|| bad("scheme must be amqp://"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, vhost) = match rest.split_once('/') {
        Some((a, v)) => (a, v),
        None => (rest, ""),
    };
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, pass) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((a, b)) => (decode(a), decode(b)),
            None => (decode(u), String::new()),
        },
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|_| bad("port must be a number"))?,
        ),
        None => (hostport, 5672),
    };
    if host.is_empty() {
        return Err(bad("host is missing"));
    }
    let vhost = if vhost.is_empty() {
        "/".to_owned()
    } else {
        decode(vhost)
    };
    let mut args = OpenConnectionArguments::new(host, port, &user, &pass);
    args.virtual_host(&vhost).heartbeat(HEARTBEAT_SECS);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some(("heartbeat", v)) = pair.split_once('=') {
            args.heartbeat(
                v.parse()
                    .map_err(|_| bad("heartbeat must be a number of seconds"))?,
            );
        }
    }
    Ok(args)
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
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

/// Consumes until shutdown, reconnecting whenever the broker link is lost.
pub async fn run(
    cfg: ConsumerConfig,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    mut shutdown: Shutdown,
) {
    let mut consumer = Consumer {
        dedupe: Dedupe::new(cfg.dedupe_window),
        cfg: Arc::new(cfg),
        registry,
        metrics,
        link,
        backoff: Backoff::default(),
    };
    loop {
        let end = consumer.session(&mut shutdown).await;
        consumer.metrics.broker_up.store(false, Ordering::Release);
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost(why) => {
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
    metrics: Arc<Metrics>,
    link: Arc<Link>,
    dedupe: Dedupe,
    backoff: Backoff,
}

impl Consumer {
    /// One broker connection: declare, consume, and return when it ends.
    async fn session(&mut self, shutdown: &mut Shutdown) -> SessionEnd {
        if shutdown.is_shutdown() {
            return SessionEnd::Shutdown;
        }
        let args = match parse_url(&self.cfg.url) {
            Ok(mut a) => a
                .connection_name(&format!("wsnotify {}", std::process::id()))
                .finish(),
            Err(e) => return SessionEnd::Lost(e.to_string()),
        };
        let conn = match Connection::open(&args).await {
            Ok(c) => c,
            Err(e) => return SessionEnd::Lost(format!("connect: {e}")),
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

    /// Declares the topology, starts the ingest leg, and consumes this replica's queue.
    async fn consume(
        &mut self,
        conn: &Connection,
        shutdown: &mut Shutdown,
        lost_tx: mpsc::Sender<String>,
        lost_rx: &mut mpsc::Receiver<String>,
    ) -> Result<SessionEnd, String> {
        let cfg = self.cfg.clone();
        let (registry, metrics) = (self.registry.clone(), self.metrics.clone());
        let dedupe = &mut self.dedupe;
        let e = |what: &'static str| move |err: amqprs::error::Error| format!("{what}: {err}");
        conn.register_callback(LinkCallback)
            .await
            .map_err(e("register callback"))?;
        declare_queue(conn, &cfg.queue).await?;
        let ch = conn.open_channel(None).await.map_err(e("open channel"))?;
        ch.queue_declare(QueueDeclareArguments::durable_client_named(&cfg.dead_queue))
            .await
            .map_err(e("declare dead-letter queue"))?;
        ch.exchange_declare(
            ExchangeDeclareArguments::of_type(&cfg.exchange, ExchangeType::Fanout)
                .durable(true)
                .finish(),
        )
        .await
        .map_err(e("declare fanout exchange"))?;
        let mut replica_args = FieldTable::new();
        if let (Ok(k1), Ok(k2), Ok(k3)) = (
            "x-expires".try_into(),
            "x-max-length".try_into(),
            "x-overflow".try_into(),
        ) {
            replica_args.insert(
                k1,
                FieldValue::l(cfg.replica_queue_expires_ms.try_into().unwrap_or(i64::MAX)),
            );
            replica_args.insert(k2, FieldValue::l(REPLICA_QUEUE_MAX_LENGTH));
            replica_args.insert(k3, FieldValue::from("drop-head"));
        }
        ch.queue_declare(
            // Durable, with persistent copies: the queue and its binding survive a broker
            // restart, so whichever replica takes the backlog first fans it out into every
            // replica's queue, not only its own (tests/broker_restart.rs). `x-expires` still
            // removes the queue of a replica that is gone for good.
            QueueDeclareArguments::new(&cfg.replica_queue)
                .durable(true)
                .arguments(replica_args)
                .finish(),
        )
        .await
        .map_err(e("declare replica queue"))?;
        ch.queue_bind(QueueBindArguments::new(
            &cfg.replica_queue,
            &cfg.exchange,
            "",
        ))
        .await
        .map_err(e("bind replica queue"))?;
        ch.basic_qos(BasicQosArguments::new(0, cfg.prefetch, false))
            .await
            .map_err(e("qos"))?;
        let tag = format!("wsnotify-fanout-{}", uuid::Uuid::now_v7());
        let (_, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(&cfg.replica_queue, &tag)
                    .manual_ack(true)
                    .finish(),
            )
            .await
            .map_err(e("consume replica queue"))?;
        let publisher = Arc::new(
            ConfirmChannel::open(conn)
                .await
                .map_err(e("open confirm channel"))?,
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let taker = tokio::spawn(ingest::run(
            conn.clone(),
            cfg.clone(),
            publisher.clone(),
            metrics.clone(),
            stop_rx,
            lost_tx,
        ));

        self.link.set(Some(publisher.clone()));
        metrics.broker_up.store(true, Ordering::Release);
        inc(&metrics.broker_connects);
        self.backoff.reset();
        info!(queue = %cfg.queue, replica_queue = %cfg.replica_queue, prefetch = cfg.prefetch, "consuming");

        let mut health = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            tokio::select! {
                biased;
                _ = shutdown.recv() => break SessionEnd::Shutdown,
                why = lost_rx.recv() => break SessionEnd::Lost(why.unwrap_or_else(|| "ingest stopped".into())),
                msg = rx.recv() => match msg {
                    Some(msg) => deliver(msg, &ch, &registry, &metrics, dedupe).await?,
                    None => break SessionEnd::Lost("replica consumer closed".into()),
                },
                _ = health.tick() => {
                    if !conn.is_open() || !ch.is_open() {
                        break SessionEnd::Lost("connection closed".into());
                    }
                }
            }
        };
        metrics.broker_up.store(false, Ordering::Release);
        self.link.set(None);
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), taker).await;
        if let SessionEnd::Shutdown = end {
            // Deliver everything this replica took in before its users are told to go: a marker
            // sent to our own queue after the taker stopped arrives after every copy before it.
            let marker = format!("drain-{}", uuid::Uuid::now_v7());
            let props = BasicProperties::default().with_message_id(&marker).finish();
            if let Ok(confirm) = publisher
                .publish(
                    props,
                    Vec::new(),
                    BasicPublishArguments::new("", &cfg.replica_queue),
                )
                .await
            {
                let drained = async {
                    let _ = confirm.wait().await;
                    while let Some(msg) = rx.recv().await {
                        let is_marker = msg.basic_properties.as_ref().and_then(|p| p.message_id())
                            == Some(&marker);
                        if is_marker {
                            break;
                        }
                        deliver(msg, &ch, &registry, &metrics, dedupe).await?;
                    }
                    Ok::<(), String>(())
                };
                if tokio::time::timeout(Duration::from_secs(5), drained)
                    .await
                    .is_err()
                {
                    warn!("replica queue not drained within 5 s");
                }
            }
            let _ = ch
                .queue_delete(QueueDeleteArguments::new(&cfg.replica_queue))
                .await;
        }
        if let Ok(p) = Arc::try_unwrap(publisher) {
            p.close().await;
        }
        let _ = ch.close().await;
        Ok(end)
    }
}

/// Routes one fanout copy to this replica's users and acks it.
async fn deliver(
    msg: ConsumerMessage,
    ch: &Channel,
    registry: &Registry,
    metrics: &Metrics,
    dedupe: &mut Dedupe,
) -> Result<(), String> {
    let Some(d) = msg.deliver else { return Ok(()) };
    match fanout::Wire::decode(
        msg.basic_properties.as_ref(),
        msg.content.unwrap_or_default(),
    ) {
        Ok(wire) if dedupe.is_duplicate(&wire) => inc(&metrics.duplicates_dropped),
        Ok(wire) => match registry.route(&wire.target, &wire.frame_builder()).await {
            Outcome::Delivered => inc(&metrics.messages_delivered),
            Outcome::NoRecipient => inc(&metrics.messages_no_recipient),
        },
        Err(why) => warn!(reason = %why, "ignoring a malformed message on the fanout exchange"),
    }
    ch.basic_ack(BasicAckArguments::new(d.delivery_tag(), false))
        .await
        .map_err(|e| format!("ack: {e}"))
}

/// Declares the notify queue as a plain durable queue — unless it already exists, in which case
/// it is left exactly as the backends declared it (re-declaring with other arguments would make
/// the broker refuse with PRECONDITION_FAILED). A failed passive declare closes its channel,
/// hence the throwaway channel.
pub(crate) async fn declare_queue(conn: &Connection, queue: &str) -> Result<(), String> {
    let probe = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    let exists = probe
        .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .is_ok();
    if exists {
        let _ = probe.close().await;
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

struct LinkCallback;

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
        warn!(reason, "broker blocked the connection");
    }

    async fn unblocked(&mut self, _conn: &Connection) {
        info!("broker unblocked the connection");
    }

    async fn secret_updated(&mut self, _conn: &Connection) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = parse_url("amqp://u%40x:p%3A@h.example:5673/%2f?heartbeat=5").unwrap();
        assert_eq!(a.get_host(), "h.example");
        assert_eq!(a.get_port(), 5673);
        assert_eq!(a.get_virtual_host(), "/");
        assert_eq!(a.get_heartbeat(), 5);
        assert_eq!(
            parse_url("amqp://localhost").unwrap().get_virtual_host(),
            "/"
        );
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("amqp://h:notaport/").is_err());
        assert!(parse_url("amqp://h/?heartbeat").is_ok());
    }

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
