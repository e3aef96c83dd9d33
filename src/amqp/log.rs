//! The fan-out log's reader: every replica follows the stream `<queue>.log` and delivers each
//! notification to the users connected to it, after recording it in its history.
//!
//! The log is a RabbitMQ stream: one copy on the broker (replicated on a cluster), read by
//! every replica at its own offset, with nothing to declare or expire per replica. A replica
//! remembers the offset after the last record it read; when its broker link comes back it
//! resumes exactly there, so a link loss costs no notification. A replica that starts reads
//! from `HISTORY_WINDOW_MS` ago, so it already knows the last minutes of notifications when it
//! reports ready (recovery on any replica, contract §5), and knows it has caught up when it
//! reads back the marker it appended just before subscribing.
//!
//! [`Dedupe`] drops a notification whose id was seen in the window (a publisher retrying with
//! the same `id`), and a redelivered one whose fingerprint was seen (the taker died after its
//! record was confirmed but before it acked, and the new taker assigned new ids).
//!
//! This module must not know how notifications are taken in or validated (the ingest leg's job)
//! nor how a frame reaches a socket (the registry's and the connection's): it reads records,
//! drops copies, records history and hands each notification to [`Registry::route`].

use std::collections::{HashSet, VecDeque};

use amqprs::channel::{BasicConsumeArguments, BasicQosArguments, Channel, ConsumerMessage};
use amqprs::{FieldTable, FieldValue};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use super::ingest::Routed;
use super::record::{self, Origin, Record};
use crate::history::History;
use crate::metrics::{Metrics, inc};
use crate::notification::Notification;
use crate::registry::Registry;

/// Records delivered ahead of this replica's acks (a stream consumer must set one).
const PREFETCH: u16 = 64;
/// Stream offset of each delivery (RabbitMQ sets it).
const OFFSET_HEADER: &str = "x-stream-offset";
/// How far before the requested offset a resumed subscription may start (it starts at the
/// beginning of the chunk holding it); further back means a new log.
const CHUNK_SLACK: i64 = 100_000;
/// Offsets a reader may see skipped between two records when nothing was lost: the stream
/// gives offsets to chunks AMQP consumers never get (RabbitMQ starts every segment of a
/// stream with an offset-tracking chunk). Only consulted when the records themselves cannot
/// say (see [`Follower::lost_records`]); retention drops whole segments, far more than this.
const OFFSET_SLACK: i64 = 16;

/// Where this replica is in the log, across broker sessions.
pub struct Follower {
    /// Offset of the next record to read; `None` before the first subscription.
    next: Option<i64>,
    dedupe: Dedupe,
    /// Records of this taker term from this one on were handed over by this replica's own
    /// taker ([`super::ingest::Local`]): their notifications are here already.
    local_from: Option<Origin>,
    /// The last record of notifications read.
    last: Option<Origin>,
}

/// What one delivery was.
pub enum Read {
    /// A record of notifications, recorded (and routed when `route` was set) or skipped.
    Notifications(Origin),
    /// A replica's marker (ours, if the id is one we wrote).
    Marker(String),
    /// Nothing to act on (a record read before, or malformed).
    Nothing,
}

impl Follower {
    pub fn new(dedupe_window: usize) -> Follower {
        Follower {
            next: None,
            dedupe: Dedupe::new(dedupe_window),
            local_from: None,
            last: None,
        }
    }

    /// Takes what this replica's own taker handed over (see [`super::ingest::Local`]).
    pub async fn local(
        &mut self,
        routed: Routed,
        history: &History,
        registry: &Registry,
        metrics: &Metrics,
    ) {
        match routed {
            Routed::From(origin) => self.local_from = Some(origin),
            Routed::Notifications(list) => {
                self.deliver(list, history, registry, metrics, true).await;
            }
        }
    }

    /// Subscribes to the log: right after the last record read, or `window_secs` back on the
    /// first subscription.
    pub async fn subscribe(
        &self,
        ch: &Channel,
        log: &str,
        window_secs: u64,
    ) -> Result<mpsc::UnboundedReceiver<ConsumerMessage>, String> {
        ch.basic_qos(BasicQosArguments::new(0, PREFETCH, false))
            .await
            .map_err(|e| format!("qos: {e}"))?;
        let from = match self.next {
            Some(offset) => FieldValue::l(offset),
            None => FieldValue::T(crate::registry::unix_now().saturating_sub(window_secs)),
        };
        let mut args = FieldTable::new();
        if let Ok(key) = OFFSET_HEADER.try_into() {
            args.insert(key, from);
        }
        let tag = format!("wsnotify-log-{}", uuid::Uuid::now_v7());
        let consume = BasicConsumeArguments::new(log, &tag)
            .manual_ack(true)
            .arguments(args)
            .finish();
        let (_, rx) = ch
            .basic_consume_rx(consume)
            .await
            .map_err(|e| format!("consume {log}: {e}"))?;
        Ok(rx)
    }

    /// Reads one delivery: records its notifications in the history and, if `route`, hands
    /// them to the registry. A record that cannot be decoded is skipped with a warning (only
    /// something other than a wsnotify taker could have written it).
    pub async fn read(
        &mut self,
        msg: ConsumerMessage,
        history: &History,
        registry: &Registry,
        metrics: &Metrics,
        route: bool,
    ) -> Read {
        let offset = match msg
            .basic_properties
            .as_ref()
            .and_then(|p| p.headers())
            .and_then(|h| h.get(&OFFSET_HEADER.try_into().ok()?).cloned())
        {
            Some(FieldValue::l(offset)) => Some(offset),
            _ => None,
        };
        // Resuming may start at the beginning of a chunk: skip what was read, undecoded.
        if let (Some(offset), Some(next)) = (offset, self.next)
            && offset < next
            && next - offset <= CHUNK_SLACK
        {
            return Read::Nothing;
        }
        let body = Bytes::from(msg.content.unwrap_or_default());
        let record = record::decode(body);
        let origin = match &record {
            Ok(Record::Notifications(origin, _)) => Some(*origin),
            _ => None,
        };
        if let Some(offset) = offset {
            match self.next {
                Some(next) if offset < next => {
                    // Far behind where this replica was: the log was deleted and declared
                    // anew. Start over with it.
                    warn!(
                        expected = next,
                        got = offset,
                        "the fan-out log starts over; recovery history cleared"
                    );
                    history.clear();
                    self.last = None;
                }
                Some(next) if self.lost_records(offset - next, origin) => {
                    // Retention dropped records while this replica was away: it cannot vouch
                    // for anything before the gap.
                    warn!(
                        expected = next,
                        got = offset,
                        last_record = ?self.last,
                        record = ?origin,
                        "gap in the fan-out log; recovery history cleared"
                    );
                    history.clear();
                }
                _ => {}
            }
            self.next = Some(offset + 1);
        }
        let (origin, list) = match record {
            Ok(Record::Notifications(origin, list)) => (origin, list),
            Ok(Record::Marker(id)) => return Read::Marker(id),
            Err(why) => {
                warn!(reason = %why, "skipping a malformed record in the fan-out log");
                return Read::Nothing;
            }
        };
        self.last = Some(origin);
        let handed_over = self
            .local_from
            .is_some_and(|l| origin.taker == l.taker && origin.seq >= l.seq);
        if !handed_over {
            self.deliver(list, history, registry, metrics, route).await;
        }
        Read::Notifications(origin)
    }

    /// Whether records were lost between the last record read and this one, `skipped`
    /// offsets further on than the next expected. Offsets alone cannot say: the stream gives
    /// some to chunks consumers never see (one at the head of every segment, every 32 MiB of
    /// log), and clearing the history for those would empty it every minute or two. Records of
    /// one taker term are numbered without a hole, which says it exactly; across terms (or for
    /// a marker), only a skip beyond [`OFFSET_SLACK`] counts.
    fn lost_records(&self, skipped: i64, record: Option<Origin>) -> bool {
        if skipped <= 0 {
            return false;
        }
        match (self.last, record) {
            (Some(last), Some(this)) if last.taker == this.taker => this.seq > last.seq + 1,
            _ => skipped > OFFSET_SLACK,
        }
    }

    /// Records notifications that are not copies in the history, and routes them if `route`.
    async fn deliver(
        &mut self,
        list: Vec<Notification>,
        history: &History,
        registry: &Registry,
        metrics: &Metrics,
        route: bool,
    ) {
        let fresh: Vec<Notification> = list
            .into_iter()
            .filter(|n| {
                let dup = self.dedupe.is_duplicate(n);
                if dup {
                    inc(&metrics.duplicates_dropped);
                }
                !dup
            })
            .collect();
        let recorded = history.record(fresh, unix_ms());
        if route {
            registry.route_recorded(recorded, metrics).await;
        }
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Remembers the ids and fingerprints of the last `capacity` notifications, as 128-bit keyed
/// hashes (two random-keyed SipHashes): 16 bytes a key instead of a string per key.
#[derive(Debug)]
pub struct Dedupe {
    capacity: usize,
    seen: HashSet<u128>,
    order: VecDeque<u128>,
    keys: (std::hash::RandomState, std::hash::RandomState),
}

impl Dedupe {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
            keys: (std::hash::RandomState::new(), std::hash::RandomState::new()),
        }
    }

    fn key(&self, kind: u8, s: &[u8]) -> u128 {
        use std::hash::BuildHasher;
        let hi = self.keys.0.hash_one((kind, s));
        let lo = self.keys.1.hash_one((kind, s));
        (u128::from(hi) << 64) | u128::from(lo)
    }

    /// True if `n` is a copy of one already delivered; otherwise remembers it.
    pub fn is_duplicate(&mut self, n: &Notification) -> bool {
        let id_key = self.key(b'i', n.id.as_bytes());
        let fp_key = self.key(b'f', &n.fingerprint);
        if self.seen.contains(&id_key) || (n.redelivered && self.seen.contains(&fp_key)) {
            return true;
        }
        self.remember(id_key);
        self.remember(fp_key);
        false
    }

    fn remember(&mut self, key: u128) {
        if self.seen.insert(key) {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity * 2 {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Target;

    fn n(id: &str, fp: u8, redelivered: bool) -> Notification {
        Notification {
            id: id.into(),
            target: Target::Broadcast,
            head: Bytes::new(),
            tail: Bytes::new(),
            fingerprint: [fp; 16],
            redelivered,
            taken_ms: 0,
        }
    }

    #[test]
    fn only_lost_records_count_as_a_gap() {
        let mut f = Follower::new(16);
        let o = |taker, seq| Some(Origin { taker, seq });
        // The first record, wherever it is.
        assert!(!f.lost_records(0, o(7, 1)));
        f.last = o(7, 1);
        // A segment roll: an offset skipped, the next record of the same term.
        assert!(!f.lost_records(1, o(7, 2)));
        // Records of this term missing, however few offsets were skipped.
        assert!(f.lost_records(1, o(7, 4)));
        // A new term (a new taker): only the offsets can say.
        assert!(!f.lost_records(2, o(9, 1)));
        assert!(f.lost_records(OFFSET_SLACK + 1, o(9, 1)));
        // A marker after a skip: the offsets too.
        assert!(!f.lost_records(1, None));
        assert!(f.lost_records(500, None));
        // Nothing skipped is never a gap.
        assert!(!f.lost_records(0, o(7, 9)));
    }

    #[test]
    fn dedupe_rules() {
        let mut d = Dedupe::new(2);
        assert!(!d.is_duplicate(&n("1", 1, false)));
        // Same content published again (not a redelivery): a new notification.
        assert!(!d.is_duplicate(&n("2", 1, false)));
        // A redelivered copy of content already seen: dropped even with a new id.
        assert!(d.is_duplicate(&n("3", 1, true)));
        // A publisher retrying with the same id: dropped.
        assert!(d.is_duplicate(&n("2", 2, false)));
        // The window is bounded.
        for i in 10..20 {
            assert!(!d.is_duplicate(&n(&i.to_string(), i, false)));
        }
        assert!(!d.is_duplicate(&n("1", 1, true)));
        assert!(d.order.len() <= 4);
    }
}
