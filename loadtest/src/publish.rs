//! Publishing notifications through RabbitMQ the way a backend does: task envelopes on the
//! notify queue via the default exchange, each carrying its send time (`"t"`, unix µs) and a
//! sequence number (`"s"`) in `data`, padded so the frame the gateway writes is about
//! `frame_bytes` long.

use amqprs::BasicProperties;
use amqprs::channel::{
    BasicPublishArguments, Channel, ExchangeDeleteArguments, QueueDeclareArguments,
    QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};

use crate::client::now_us;

/// Bytes of a wsnotify broadcast frame besides the padding: the fixed members (`id` UUID,
/// `type` "lt", `timestamp`), `data`'s keys, a 16-digit `t` and a short `s`.
const FRAME_OVERHEAD: usize = 104 + 34 + 4;

pub struct Publisher {
    conn: Connection,
    ch: Channel,
    queue: String,
    data: Data,
    persistent: bool,
}

/// The `data` member of each notification: send time, sequence number, padding.
pub struct Data {
    pad: String,
    seq: u64,
}

impl Data {
    /// Padding sized so that the frame a gateway writes is about `frame_bytes` long.
    pub fn new(frame_bytes: usize) -> Data {
        Data {
            pad: "x".repeat(frame_bytes.saturating_sub(FRAME_OVERHEAD)),
            seq: 0,
        }
    }

    /// The next `data`, stamped with the current time.
    pub fn stamp(&mut self) -> String {
        self.seq += 1;
        format!(
            r#"{{"t":{},"s":{},"p":"{}"}}"#,
            now_us(),
            self.seq,
            self.pad
        )
    }
}

/// `amqp://user:pass@host:port/vhost` (vhost percent-encoded, `%2f` for `/`).
pub fn parse_amqp_url(url: &str) -> Result<OpenConnectionArguments, String> {
    let rest = url
        .strip_prefix("amqp://")
        .ok_or_else(|| format!("{url}: expected amqp://user:pass@host:port/vhost"))?;
    let rest = rest.split('?').next().unwrap_or(rest);
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .unwrap_or(("guest:guest", authority));
    let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>().map_err(|e| format!("{url}: port: {e}"))?,
        ),
        None => (hostport, 5672),
    };
    let vhost = match vhost {
        "" => "/".to_owned(),
        v => v.replace("%2f", "/").replace("%2F", "/"),
    };
    let mut args = OpenConnectionArguments::new(host, port, user, pass);
    args.virtual_host(&vhost);
    Ok(args)
}

impl Publisher {
    pub async fn connect(url: &str, queue: &str, frame_bytes: usize) -> Result<Publisher, String> {
        let args = parse_amqp_url(url)?;
        let conn = Connection::open(&args)
            .await
            .map_err(|e| format!("RabbitMQ at {url}: {e}"))?;
        let ch = conn
            .open_channel(None)
            .await
            .map_err(|e| format!("open channel: {e}"))?;
        Ok(Publisher {
            conn,
            ch,
            queue: queue.to_owned(),
            data: Data::new(frame_bytes),
            persistent: false,
        })
    }

    /// Sequence number (`"s"` in `data`) of the last notification published (0: none yet).
    pub fn seq(&self) -> u64 {
        self.data.seq
    }

    /// Publish with delivery mode 2 (persistent) instead of 1.
    pub fn persistent(&mut self, on: bool) {
        self.persistent = on;
    }

    /// Declares the queue as a backend would: durable, no arguments.
    pub async fn declare(&self) -> Result<(), String> {
        self.declare_as(false).await
    }

    /// Declares the queue durable, and as a quorum queue if `quorum` (what backends declare on
    /// a RabbitMQ cluster, contract §1).
    pub async fn declare_as(&self, quorum: bool) -> Result<(), String> {
        let mut table = amqprs::FieldTable::new();
        if quorum && let Ok(k) = "x-queue-type".try_into() {
            table.insert(k, "quorum".into());
        }
        self.ch
            .queue_declare(
                QueueDeclareArguments::new(&self.queue)
                    .durable(true)
                    .arguments(table)
                    .finish(),
            )
            .await
            .map(|_| ())
            .map_err(|e| format!("declare {}: {e}", self.queue))
    }

    /// Drops whatever a previous run left in the queue.
    pub async fn purge(&self) -> Result<(), String> {
        self.ch
            .queue_purge(QueuePurgeArguments::new(&self.queue))
            .await
            .map(|_| ())
            .map_err(|e| format!("purge {}: {e}", self.queue))
    }

    /// Deletes what a run on queue `q` leaves on the broker, for any gateway topology: `q`,
    /// `q.dead`, the fan-out exchange `q.fanout` and the fan-out log stream `q.log`. Whatever
    /// does not exist is skipped. Each delete gets its own channel, because a failed delete
    /// closes the channel it ran on. (Each wsnotify replica's own queue expires by itself.)
    pub async fn delete(&self) {
        let q = &self.queue;
        for name in [q.clone(), format!("{q}.dead"), format!("{q}.log")] {
            if let Ok(ch) = self.conn.open_channel(None).await {
                let _ = ch.queue_delete(QueueDeleteArguments::new(&name)).await;
                let _ = ch.close().await;
            }
        }
        if let Ok(ch) = self.conn.open_channel(None).await {
            let _ = ch
                .exchange_delete(ExchangeDeleteArguments::new(&format!("{q}.fanout")))
                .await;
            let _ = ch.close().await;
        }
    }

    async fn send(&self, body: String) -> Result<(), String> {
        let mut props = BasicProperties::default();
        props
            .with_content_type("application/json")
            .with_delivery_mode(if self.persistent { 2 } else { 1 });
        self.ch
            .basic_publish(
                props,
                body.into_bytes(),
                BasicPublishArguments::new("", &self.queue),
            )
            .await
            .map_err(|e| format!("publish: {e}"))
    }

    /// One broadcast notification.
    pub async fn broadcast(&mut self) -> Result<(), String> {
        let data = self.data.stamp();
        let body = format!(
            r#"{{"type":"websocket_notification","payload":{{"broadcast":true,"message_type":"lt","data":{data}}}}}"#
        );
        self.send(body).await
    }

    /// One notification for `user`.
    pub async fn to_user(&mut self, user: &str) -> Result<(), String> {
        let data = self.data.stamp();
        let body = format!(
            r#"{{"type":"websocket_notification","payload":{{"user_id":"{user}","message_type":"lt","data":{data}}}}}"#
        );
        self.send(body).await
    }

    pub async fn close(self) {
        let _ = self.ch.close().await;
        let _ = self.conn.close().await;
    }
}

/// Paces publishing at `rate` messages per second: a tick every millisecond, and how many
/// should be out by then. Missed ticks are skipped, not replayed: after a stall the publisher
/// catches up with what is due, in one go, and the rate over the phase holds.
pub struct Pace {
    started: std::time::Instant,
    rate: f64,
    tick: tokio::time::Interval,
}

impl Pace {
    /// From now on; `rate` 0 (or less) means as fast as possible.
    pub fn new(rate: f64) -> Pace {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Pace {
            started: std::time::Instant::now(),
            rate,
            tick,
        }
    }

    /// Waits for the next tick and returns how many messages are due since the start
    /// (`u64::MAX` at once when there is no rate).
    pub async fn due(&mut self) -> u64 {
        if self.rate <= 0.0 {
            return u64::MAX;
        }
        self.tick.tick().await;
        (self.started.elapsed().as_secs_f64() * self.rate).floor() as u64
    }
}
