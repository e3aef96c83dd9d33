//! The broker side: consume the notify queue, validate, route, acknowledge — and keep doing
//! it across broker restarts.
//!
//! amqprs does not reconnect by itself. [`run`] is a supervisor loop: one [`session`] per
//! broker connection; when a session ends because the link is lost, the gateway reports
//! not-ready, waits with capped exponential backoff (with jitter, so replicas do not reconnect
//! in lockstep), and starts a new session, which declares its topology and consumes again.
//! WebSocket clients are untouched throughout.
//!
//! Delivery guarantees:
//! * a message is acked only after its frames have been handed to the registry's shards;
//! * an invalid message is acked only after the broker has *confirmed* its copy in
//!   `<queue>.dead`, so it is never lost;
//! * on shutdown the message in hand is finished, the rest stay unacked and the broker
//!   requeues them when the channel closes.

pub mod confirm;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConsumerMessage, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Close, FieldValue};
use async_trait::async_trait;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::config::{Config, ConfigError};
use crate::envelope::Parser;
use crate::frame::{self, FrameBuilder};
use crate::metrics::{Metrics, inc};
use crate::registry::{Outcome, Registry};
use crate::shutdown::Shutdown;
use confirm::ConfirmChannel;

/// Header carrying the reason on dead-lettered messages (contract §1).
pub const ERROR_HEADER: &str = "x-wsnotify-error";
const HEARTBEAT_SECS: u16 = 10;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What the consumer needs from the configuration.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub url: String,
    pub queue: String,
    pub dead_queue: String,
    pub prefetch: u16,
    pub max_message_bytes: usize,
}

impl ConsumerConfig {
    pub fn from_config(c: &Config) -> Self {
        Self {
            url: c.amqp_url.clone(),
            queue: c.notify_queue.clone(),
            dead_queue: c.dead_letter_queue(),
            prefetch: c.amqp_prefetch,
            max_message_bytes: c.max_message_bytes,
        }
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
    mut shutdown: Shutdown,
) {
    let mut backoff = Backoff::default();
    let mut parser = Parser::new();
    loop {
        let end = session(
            &cfg,
            &registry,
            &metrics,
            &mut parser,
            &mut backoff,
            &mut shutdown,
        )
        .await;
        metrics.broker_up.store(false, Ordering::Release);
        match end {
            SessionEnd::Shutdown => return,
            SessionEnd::Lost(why) => {
                let delay = backoff.next_delay();
                warn!(error = %why, retry_in_ms = delay.as_millis() as u64, "broker link down; gateway not ready");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.recv() => return,
                }
            }
        }
    }
}

/// One broker connection: declare, consume, and return when it ends.
async fn session(
    cfg: &ConsumerConfig,
    registry: &Registry,
    metrics: &Metrics,
    parser: &mut Parser,
    backoff: &mut Backoff,
    shutdown: &mut Shutdown,
) -> SessionEnd {
    if shutdown.is_shutdown() {
        return SessionEnd::Shutdown;
    }
    let args = match parse_url(&cfg.url) {
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
    let io_failure = {
        let c = conn.clone();
        tokio::spawn(async move { c.listen_network_io_failure().await })
    };
    let end = match consume(cfg, &conn, registry, metrics, parser, backoff, shutdown).await {
        Ok(end) => end,
        Err(e) => SessionEnd::Lost(e),
    };
    io_failure.abort();
    metrics.broker_up.store(false, Ordering::Release);
    if conn.is_open() {
        // Closing the connection requeues every delivery we did not ack.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close()).await;
    }
    end
}

async fn consume(
    cfg: &ConsumerConfig,
    conn: &Connection,
    registry: &Registry,
    metrics: &Metrics,
    parser: &mut Parser,
    backoff: &mut Backoff,
    shutdown: &mut Shutdown,
) -> Result<SessionEnd, String> {
    let e = |what: &'static str| move |err: amqprs::error::Error| format!("{what}: {err}");
    conn.register_callback(LinkCallback)
        .await
        .map_err(e("register callback"))?;
    declare_queue(conn, &cfg.queue).await?;
    let ch = conn.open_channel(None).await.map_err(e("open channel"))?;
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&cfg.dead_queue))
        .await
        .map_err(e("declare dead-letter queue"))?;
    ch.basic_qos(BasicQosArguments::new(0, cfg.prefetch, false))
        .await
        .map_err(e("qos"))?;
    let dead = ConfirmChannel::open(conn)
        .await
        .map_err(e("open confirm channel"))?;
    let tag = format!("wsnotify-{}", uuid::Uuid::now_v7());
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&cfg.queue, &tag)
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(e("consume"))?;

    metrics.broker_up.store(true, Ordering::Release);
    inc(&metrics.broker_connects);
    backoff.reset();
    info!(queue = %cfg.queue, prefetch = cfg.prefetch, "consuming");

    let mut log = RateLimited::default();
    let mut health = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.recv() => break SessionEnd::Shutdown,
            msg = rx.recv() => match msg {
                Some(msg) => {
                    if let Err(why) = handle(msg, cfg, &ch, &dead, registry, metrics, parser, &mut log).await {
                        break SessionEnd::Lost(why);
                    }
                }
                None => break SessionEnd::Lost("consumer channel closed".into()),
            },
            _ = health.tick() => {
                if !conn.is_open() || !ch.is_open() {
                    break SessionEnd::Lost("connection closed".into());
                }
            }
        }
    };
    metrics.broker_up.store(false, Ordering::Release);
    dead.close().await;
    let _ = ch.close().await;
    Ok(end)
}

/// Declares the notify queue as a plain durable queue — unless it already exists, in which case
/// it is left exactly as the backends declared it (re-declaring with other arguments would make
/// the broker refuse with PRECONDITION_FAILED). A failed passive declare closes its channel,
/// hence the throwaway channel.
async fn declare_queue(conn: &Connection, queue: &str) -> Result<(), String> {
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

/// Validates, routes and acks one delivery. An error means the link is unusable.
#[allow(clippy::too_many_arguments)]
async fn handle(
    msg: ConsumerMessage,
    cfg: &ConsumerConfig,
    ch: &Channel,
    dead: &ConfirmChannel,
    registry: &Registry,
    metrics: &Metrics,
    parser: &mut Parser,
    log: &mut RateLimited,
) -> Result<(), String> {
    let Some(deliver) = msg.deliver else {
        return Ok(());
    };
    let body = msg.content.unwrap_or_default();
    let received = OffsetDateTime::now_utc();
    match parser.parse(&body, cfg.max_message_bytes) {
        Ok(env) => {
            let id = match &env.id {
                Some(id) => id.to_string(),
                None => uuid::Uuid::now_v7().to_string(),
            };
            let timestamp = frame::timestamp(received);
            let mut data = Vec::with_capacity(body.len());
            frame::encode_data(env.data.as_ref(), &mut data);
            let builder = FrameBuilder {
                id: &id,
                message_type: &env.message_type,
                timestamp: &timestamp,
                data: &data,
            };
            match registry.route(&env.target, &builder).await {
                Outcome::Delivered => inc(&metrics.messages_delivered),
                Outcome::NoRecipient => inc(&metrics.messages_no_recipient),
            }
        }
        Err(invalid) => {
            let reason = invalid.to_string();
            let mut props = msg.basic_properties.unwrap_or_default();
            let mut headers = props.headers().cloned().unwrap_or_default();
            let key = ERROR_HEADER
                .try_into()
                .map_err(|_| "header name".to_owned())?;
            headers.insert(key, FieldValue::from(reason.clone()));
            props.with_headers(headers).with_persistence(true);
            let confirm = dead
                .publish(props, body, BasicPublishArguments::new("", &cfg.dead_queue))
                .await
                .map_err(|e| format!("dead-letter publish: {e}"))?;
            confirm
                .wait()
                .await
                .map_err(|e| format!("dead-letter publish: {e}"))?;
            inc(&metrics.messages_dead_lettered);
            log.warn(&reason);
        }
    }
    ch.basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
        .await
        .map_err(|e| format!("ack: {e}"))
}

/// At most one warning per second about invalid messages, with a count of the rest.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    fn warn(&mut self, reason: &str) {
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
