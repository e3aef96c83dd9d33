//! A channel in publisher-confirm mode, with the bookkeeping amqprs leaves to its users.
//!
//! amqprs reports confirms only through `ChannelCallback::publish_ack`/`publish_nack` with a
//! delivery tag (and a `multiple` flag). The broker numbers a confirm channel's publishes
//! 1, 2, 3, … in the order it receives them, so [`ConfirmChannel::publish`] takes the next
//! number and sends under one lock, parks a oneshot under that number, and the callback
//! resolves it (or every number up to it, for `multiple`). Waiting is separate from sending,
//! so callers can pipeline many publishes and then await their confirms.
//!
//! **Cancellation.** Once a number is taken, the publish must reach the channel, or every
//! later confirm would resolve the wrong waiter. So taking the number and sending run in a
//! task of their own, which finishes even if the caller's future is dropped (an HTTP client
//! hanging up, a timeout): a caller can only be cancelled before its number is taken.
//!
//! **Bounded waits.** A broker under a memory or disk alarm blocks publishers: it stops
//! reading their sockets, and neither the send nor the confirm ever completes. Every wait
//! here therefore has a deadline ([`Confirm::wait`] and [`ConfirmChannel::publish`]'s), and
//! callers turn it into an error (`POST /api/publish` answers 503).
//!
//! This module must not know what is published or why: the ingest taker, `POST /api/publish` and
//! the [`Publisher`](crate::publisher::Publisher) decide that; it only keeps each publish's
//! confirm (or return) bounded in time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, FieldValue, Nack, Return};
use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::oneshot;

/// Header naming a mandatory publish's sequence number, to match a return to its confirm.
const SEQ_HEADER: &str = "x-wsn-publish-seq";

/// Publishes whose confirm has not arrived, by sequence number.
#[derive(Default)]
struct Unsettled {
    next: u64,
    waiting: BTreeMap<u64, oneshot::Sender<Settled>>,
    /// Mandatory publishes the broker returned as unroutable; their confirm still follows.
    returned: std::collections::HashSet<u64>,
}

/// How the broker settled one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settled {
    Acked,
    Nacked,
    Returned,
}

impl Unsettled {
    fn outcome(&mut self, seq: u64, ok: bool) -> Settled {
        match (self.returned.remove(&seq), ok) {
            (true, _) => Settled::Returned,
            (false, true) => Settled::Acked,
            (false, false) => Settled::Nacked,
        }
    }

    fn settle(&mut self, tag: u64, multiple: bool, ok: bool) {
        if multiple {
            let rest = self.waiting.split_off(&(tag + 1));
            for (seq, tx) in std::mem::replace(&mut self.waiting, rest) {
                let _ = tx.send(self.outcome(seq, ok));
            }
        } else if let Some(tx) = self.waiting.remove(&tag) {
            let _ = tx.send(self.outcome(tag, ok));
        }
    }
}

/// Why a confirmed publish failed.
#[derive(Debug)]
pub enum PublishError {
    /// The broker nacked the message.
    Nacked,
    /// The broker returned a mandatory message as unroutable (no such queue).
    Unroutable,
    /// The channel closed before the confirm arrived.
    Lost,
    /// The broker did not take or confirm the message in time (e.g. it blocks publishers
    /// during a resource alarm).
    Timeout,
    /// The broker could not be reached or the queue could not be declared.
    Connect(String),
    /// The message is not a valid envelope (the reason, as the gateway would give it).
    Invalid(String),
    Amqp(amqprs::error::Error),
}

impl std::fmt::Display for PublishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PublishError::Nacked => f.write_str("the broker refused the message (nack)"),
            PublishError::Unroutable => {
                f.write_str("the broker has no queue to route the message to")
            }
            PublishError::Lost => {
                f.write_str("the broker link closed before the publish was confirmed")
            }
            PublishError::Timeout => {
                f.write_str("the broker did not confirm in time (is it blocking publishers?)")
            }
            PublishError::Amqp(e) => write!(f, "{e}"),
            PublishError::Connect(e) => f.write_str(e),
            PublishError::Invalid(e) => write!(f, "invalid notification: {e}"),
        }
    }
}

impl std::error::Error for PublishError {}

/// A confirm awaited separately from the publish.
pub struct Confirm(oneshot::Receiver<Settled>);

/// How long [`Confirm::wait`] waits for the broker's verdict.
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

impl Confirm {
    /// Waits for the broker's verdict, at most [`DEFAULT_CONFIRM_TIMEOUT`].
    pub async fn wait(self) -> Result<(), PublishError> {
        self.wait_for(DEFAULT_CONFIRM_TIMEOUT).await
    }

    /// Waits for the broker's verdict, at most `limit`.
    pub async fn wait_for(self, limit: Duration) -> Result<(), PublishError> {
        match tokio::time::timeout(limit, self.0).await {
            Ok(Ok(Settled::Acked)) => Ok(()),
            Ok(Ok(Settled::Nacked)) => Err(PublishError::Nacked),
            Ok(Ok(Settled::Returned)) => Err(PublishError::Unroutable),
            Ok(Err(_)) => Err(PublishError::Lost),
            Err(_) => Err(PublishError::Timeout),
        }
    }
}

/// A channel whose publishes are confirmed by the broker.
pub struct ConfirmChannel {
    channel: Channel,
    pending: Arc<Mutex<Unsettled>>,
    /// Serialises "take a number, send" so numbers match the broker's order.
    send_lock: Arc<tokio::sync::Mutex<()>>,
}

impl ConfirmChannel {
    pub async fn open(conn: &Connection) -> Result<Self, amqprs::error::Error> {
        let channel = conn.open_channel(None).await?;
        let pending = Arc::new(Mutex::new(Unsettled {
            next: 1,
            ..Unsettled::default()
        }));
        channel
            .register_callback(ConfirmCallback {
                pending: pending.clone(),
            })
            .await?;
        channel
            .confirm_select(ConfirmSelectArguments::new(false))
            .await?;
        Ok(Self {
            channel,
            pending,
            send_lock: Arc::default(),
        })
    }

    /// Sends a task envelope to the notify queue the way contract §1 asks backends to:
    /// through the default exchange, persistent, JSON, and mandatory (so a missing queue is an
    /// error, not a silent drop). Used by both [`Publisher`](crate::publisher::Publisher) and
    /// `POST /api/publish`.
    pub async fn publish_envelope(
        &self,
        queue: &str,
        envelope: Vec<u8>,
        limit: Duration,
    ) -> Result<Confirm, PublishError> {
        let props = BasicProperties::default()
            .with_content_type("application/json")
            .with_persistence(true)
            .finish();
        let mut args = BasicPublishArguments::new("", queue);
        args.mandatory(true);
        self.publish(props, envelope, args, limit).await
    }

    /// Sends one message, waiting at most `limit` for the broker to take it; the returned
    /// [`Confirm`] resolves when the broker has it. A `mandatory` publish that the broker
    /// returns as unroutable resolves as an error. Cancel-safe (see the module docs).
    pub async fn publish(
        &self,
        mut props: BasicProperties,
        body: Vec<u8>,
        args: BasicPublishArguments,
        limit: Duration,
    ) -> Result<Confirm, PublishError> {
        let send = async {
            let order = self.send_lock.clone().lock_owned().await;
            let (channel, pending) = (self.channel.clone(), self.pending.clone());
            // From here on the publish completes whatever happens to the caller.
            let sent = tokio::spawn(async move {
                let (tx, rx) = oneshot::channel();
                let seq = {
                    let mut p = pending.lock();
                    let seq = p.next;
                    p.next += 1;
                    p.waiting.insert(seq, tx);
                    seq
                };
                if args.mandatory {
                    // A returned message carries its properties back: this header says which
                    // publish it was.
                    let mut headers = props.headers().cloned().unwrap_or_default();
                    if let Ok(key) = SEQ_HEADER.try_into() {
                        headers.insert(key, FieldValue::l(i64::try_from(seq).unwrap_or(i64::MAX)));
                    }
                    props.with_headers(headers);
                }
                let result = channel.basic_publish(props, body, args).await;
                drop(order);
                match result {
                    Ok(()) => Ok(Confirm(rx)),
                    Err(e) => {
                        pending.lock().waiting.remove(&seq);
                        Err(PublishError::Amqp(e))
                    }
                }
            });
            sent.await.unwrap_or(Err(PublishError::Lost))
        };
        tokio::time::timeout(limit, send)
            .await
            .unwrap_or(Err(PublishError::Timeout))
    }

    pub async fn close(self) {
        let _ = self.channel.close().await;
    }
}

struct ConfirmCallback {
    pending: Arc<Mutex<Unsettled>>,
}

#[async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        tracing::warn!(%close, "confirm channel closed by the broker");
        // Dropping the senders fails every waiter with `Lost`.
        self.pending.lock().waiting.clear();
        Ok(())
    }

    async fn cancel(
        &mut self,
        _channel: &Channel,
        _cancel: Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _channel: &Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.pending
            .lock()
            .settle(ack.delivery_tag(), ack.mutiple(), true);
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.pending
            .lock()
            .settle(nack.delivery_tag(), nack.multiple(), false);
    }

    async fn publish_return(
        &mut self,
        _channel: &Channel,
        ret: Return,
        props: BasicProperties,
        _body: Vec<u8>,
    ) {
        tracing::warn!(%ret, "a published message was returned as unroutable");
        let seq = SEQ_HEADER
            .try_into()
            .ok()
            .and_then(|k| props.headers().and_then(|h| h.get(&k).cloned()));
        if let Some(FieldValue::l(seq)) = seq {
            self.pending.lock().returned.insert(seq as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiple_settles_everything_up_to_the_tag() {
        let mut p = Unsettled {
            next: 1,
            ..Unsettled::default()
        };
        let mut rx = Vec::new();
        for seq in 1..=4 {
            let (tx, r) = oneshot::channel();
            p.waiting.insert(seq, tx);
            rx.push(r);
        }
        p.settle(3, true, true);
        assert_eq!(p.waiting.keys().copied().collect::<Vec<_>>(), vec![4]);
        for r in rx.iter_mut().take(3) {
            assert_eq!(r.try_recv(), Ok(Settled::Acked));
        }
        p.settle(4, false, false);
        assert_eq!(rx[3].try_recv(), Ok(Settled::Nacked));
    }
}
