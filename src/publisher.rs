//! Publishing from Rust backends: the seed's `PublishWebSocketNotification` /
//! `PublishWebSocketBroadcast`, with the contract's envelope built for you.
//!
//! ```no_run
//! # async fn demo() -> Result<(), wsnotify::amqp::confirm::PublishError> {
//! use wsnotify::publisher::Publisher;
//! let p = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "websocket_notifications").await?;
//! p.notify_user("3f0c", "welcome", &serde_json::json!({"message": "Welcome!"})).await?;
//! p.broadcast("announcement", &serde_json::json!({"message": "Maintenance tonight"})).await?;
//! p.close().await;
//! # Ok(()) }
//! ```
//!
//! Every message is validated with the gateway's own parser before it leaves (an invalid one
//! is an error here, not a dead letter later), published persistent and mandatory, and
//! confirmed by the broker: a nack or an unroutable return is an error to the caller. The
//! `notify_*` methods wait for their confirm; [`Publisher::send`] does not, so a batch can be
//! pipelined and its confirms awaited together.
//!
//! This module must not know about the gateway's side of the queue: it builds and confirms
//! envelopes exactly as any other backend must (contract §1).

use std::time::Duration;

use amqprs::connection::Connection;
use serde::Serialize;

use crate::amqp::confirm::{Confirm, ConfirmChannel, DEFAULT_CONFIRM_TIMEOUT, PublishError};
use crate::amqp::declare_queue;
use crate::amqp::url::AmqpUrl;
use crate::envelope::{ENVELOPE_TYPE, Parser};

/// Whom a notification is for.
#[derive(Debug, Clone, Copy)]
pub enum Recipients<'a> {
    User(&'a str),
    Users(&'a [&'a str]),
    Broadcast,
}

/// Builds the contract's task envelope.
pub fn envelope<T: Serialize + ?Sized>(
    to: Recipients<'_>,
    message_type: &str,
    data: &T,
    id: Option<&str>,
) -> Result<Vec<u8>, PublishError> {
    let mut payload = serde_json::Map::new();
    match to {
        Recipients::User(u) => payload.insert("user_id".into(), u.into()),
        Recipients::Users(list) => payload.insert("user_ids".into(), list.into()),
        Recipients::Broadcast => payload.insert("broadcast".into(), true.into()),
    };
    payload.insert("message_type".into(), message_type.into());
    let data =
        serde_json::to_value(data).map_err(|e| PublishError::Invalid(format!("data: {e}")))?;
    payload.insert("data".into(), data);
    if let Some(id) = id {
        payload.insert("id".into(), id.into());
    }
    let env = serde_json::json!({ "type": ENVELOPE_TYPE, "payload": payload });
    serde_json::to_vec(&env).map_err(|e| PublishError::Invalid(e.to_string()))
}

/// A confirmed publisher to the notify queue.
pub struct Publisher {
    conn: Connection,
    channel: ConfirmChannel,
    queue: String,
    parser: parking_lot::Mutex<Parser>,
    max_message_bytes: usize,
    timeout: Duration,
}

impl Publisher {
    /// Connects (to the first node that answers, when `amqp_url` lists several), makes sure
    /// the notify queue exists (plain and durable, as the gateway expects it, unless backends
    /// declared it otherwise), and opens a confirm channel.
    pub async fn connect(amqp_url: &str, queue: &str) -> Result<Publisher, PublishError> {
        let url = AmqpUrl::parse(amqp_url)
            .map_err(|e| PublishError::Connect(format!("invalid AMQP URL: {e}")))?;
        let (conn, _) = url
            .connect(0, "wsnotify publisher")
            .await
            .map_err(|e| PublishError::Connect(format!("cannot reach RabbitMQ: {e}")))?;
        declare_queue(&conn, queue)
            .await
            .map_err(PublishError::Connect)?;
        let channel = ConfirmChannel::open(&conn)
            .await
            .map_err(PublishError::Amqp)?;
        Ok(Publisher {
            conn,
            channel,
            queue: queue.to_owned(),
            parser: parking_lot::Mutex::new(Parser::new()),
            max_message_bytes: 65_536,
            timeout: DEFAULT_CONFIRM_TIMEOUT,
        })
    }

    /// Give up on a publish the broker has not taken and confirmed within `limit` (default 30
    /// s): a broker under a resource alarm blocks publishers indefinitely.
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// Refuse envelopes over `bytes` before sending (the gateway's `MAX_MESSAGE_BYTES`).
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    /// One user (every connection of theirs); waits for the broker's confirm.
    pub async fn notify_user<T: Serialize + ?Sized>(
        &self,
        user_id: &str,
        message_type: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        self.notify(Recipients::User(user_id), message_type, data)
            .await
    }

    /// Several users; waits for the broker's confirm.
    pub async fn notify_users<T: Serialize + ?Sized>(
        &self,
        user_ids: &[&str],
        message_type: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        self.notify(Recipients::Users(user_ids), message_type, data)
            .await
    }

    /// Every connected user; waits for the broker's confirm.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        message_type: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        self.notify(Recipients::Broadcast, message_type, data).await
    }

    /// Any recipients; waits for the broker's confirm.
    pub async fn notify<T: Serialize + ?Sized>(
        &self,
        to: Recipients<'_>,
        message_type: &str,
        data: &T,
    ) -> Result<(), PublishError> {
        let env = envelope(to, message_type, data, None)?;
        self.send(env).await?.wait_for(self.timeout).await
    }

    /// Validates and sends a complete envelope without waiting: await the returned
    /// [`Confirm`] (possibly after sending more) to know the broker has it.
    pub async fn send(&self, envelope: Vec<u8>) -> Result<Confirm, PublishError> {
        self.parser
            .lock()
            .parse(&envelope, self.max_message_bytes)
            .map_err(|e| PublishError::Invalid(e.0))?;
        self.channel
            .publish_envelope(&self.queue, envelope, self.timeout)
            .await
    }

    pub async fn close(self) {
        self.channel.close().await;
        let _ = self.conn.close().await;
    }
}
