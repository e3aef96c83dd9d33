//! The fan-out leg: every replica receives every validated message and delivers it to the
//! users connected to it.
//!
//! The ingest taker ([`super::ingest`]) republishes each message to a durable fanout exchange,
//! `<queue>.fanout`. Each replica binds its own queue, `<queue>.replica.<uuid>`, to it and
//! consumes from it here. The wire format needs no parsing on this side: the body *is* the
//! encoded `data`, and everything else the frame needs travels in headers:
//!
//! | header | meaning |
//! |---|---|
//! | `x-wsn-id` | message id, fixed at ingest (same on every replica) |
//! | `x-wsn-ts` | RFC 3339 timestamp, fixed at ingest |
//! | `x-wsn-type` | `message_type` |
//! | `x-wsn-target` | `user`, `users` or `broadcast` |
//! | `x-wsn-users` | array of user ids (for `user` / `users`) |
//! | `x-wsn-fp` | fingerprint of the original broker message (UUID v5 of its body) |
//! | `x-wsn-redelivered` | the ingest copy was a redelivery: it may have been republished before |
//!
//! [`Dedupe`] drops a message whose id was seen in the window (a publisher retrying with the
//! same `id`, or a redelivered copy), and a redelivered copy whose fingerprint was seen (the
//! taker died after republishing but before acking, and the new taker assigned a new id).

use std::collections::{HashSet, VecDeque};

use amqprs::{BasicProperties, FieldArray, FieldTable, FieldValue};

use time::OffsetDateTime;

use crate::envelope::{Envelope, Target};
use crate::frame::{self, FrameBuilder};

const H_ID: &str = "x-wsn-id";
const H_TS: &str = "x-wsn-ts";
const H_TYPE: &str = "x-wsn-type";
const H_TARGET: &str = "x-wsn-target";
const H_USERS: &str = "x-wsn-users";
const H_FP: &str = "x-wsn-fp";
const H_REDELIVERED: &str = "x-wsn-redelivered";

/// A message as it travels between replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    pub id: String,
    pub timestamp: String,
    pub message_type: String,
    pub target: Target<'static>,
    pub fingerprint: String,
    pub redelivered: bool,
    /// The encoded `data` (the AMQP body).
    pub data: Vec<u8>,
}

/// Namespace of message fingerprints (UUID v5 over the original body).
const FINGERPRINT_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f8a_51c2_3d0e_4b7a_9e21_5c4d_7a0b_1e93);

impl Wire {
    /// Fixes a validated envelope's id and timestamp: the one place a message gets them.
    /// `body` is the message as published (for the fingerprint).
    pub fn from_envelope(
        env: Envelope<'_>,
        body: &[u8],
        redelivered: bool,
        received: OffsetDateTime,
    ) -> Wire {
        let mut data = Vec::with_capacity(body.len());
        frame::encode_data(env.data.as_ref(), &mut data);
        Wire {
            id: env
                .id
                .as_deref()
                .map_or_else(|| uuid::Uuid::now_v7().to_string(), str::to_owned),
            timestamp: frame::timestamp(received),
            message_type: env.message_type.into_owned(),
            target: match env.target {
                Target::User(u) => Target::User(u.into_owned().into()),
                Target::Users(l) => {
                    Target::Users(l.into_iter().map(|u| u.into_owned().into()).collect())
                }
                Target::Broadcast => Target::Broadcast,
            },
            fingerprint: uuid::Uuid::new_v5(&FINGERPRINT_NS, body)
                .simple()
                .to_string(),
            redelivered,
            data,
        }
    }

    /// Properties for the fanout publish: persistent, so copies waiting in replica queues
    /// survive a broker restart (the queues are durable for the same reason).
    pub fn properties(&self) -> BasicProperties {
        let mut h = FieldTable::new();
        let mut put = |k: &str, v: FieldValue| {
            if let Ok(k) = k.try_into() {
                h.insert(k, v);
            }
        };
        put(H_ID, self.id.as_str().into());
        put(H_TS, self.timestamp.as_str().into());
        put(H_TYPE, self.message_type.as_str().into());
        put(H_FP, self.fingerprint.as_str().into());
        put(H_REDELIVERED, FieldValue::t(self.redelivered));
        let (kind, users): (&str, &[std::borrow::Cow<'_, str>]) = match &self.target {
            Target::User(u) => ("user", std::slice::from_ref(u)),
            Target::Users(list) => ("users", list),
            Target::Broadcast => ("broadcast", &[]),
        };
        put(H_TARGET, kind.into());
        if !users.is_empty() {
            let list: Vec<FieldValue> =
                users.iter().map(|u| FieldValue::from(u.as_ref())).collect();
            if let Ok(arr) = FieldArray::try_from(list) {
                put(H_USERS, FieldValue::A(arr));
            }
        }
        BasicProperties::default()
            .with_content_type("application/json")
            .with_persistence(true)
            .with_message_id(&self.id)
            .with_headers(h)
            .finish()
    }

    /// Reads a fanout message back. Errors name what is missing; they can only come from
    /// something other than a wsnotify replica publishing to the exchange.
    pub fn decode(props: Option<&BasicProperties>, data: Vec<u8>) -> Result<Wire, String> {
        let h = props.and_then(|p| p.headers()).ok_or("no headers")?;
        let text = |k: &str| -> Result<String, String> {
            let key = k.try_into().map_err(|_| k.to_owned())?;
            match h.get(&key) {
                Some(FieldValue::S(s)) => Ok(AsRef::<String>::as_ref(s).clone()),
                _ => Err(format!("missing header {k}")),
            }
        };
        let users = || -> Result<Vec<String>, String> {
            let key = H_USERS.try_into().map_err(|_| H_USERS.to_owned())?;
            match h.get(&key) {
                Some(FieldValue::A(arr)) => Vec::<FieldValue>::from(arr.clone())
                    .into_iter()
                    .map(|v| String::try_from(v).map_err(|_| "user id is not a string".to_owned()))
                    .collect(),
                _ => Err(format!("missing header {H_USERS}")),
            }
        };
        let target = match text(H_TARGET)?.as_str() {
            "broadcast" => Target::Broadcast,
            "user" => Target::User(users()?.into_iter().next().ok_or("no user")?.into()),
            "users" => Target::Users(users()?.into_iter().map(Into::into).collect()),
            other => return Err(format!("unknown target {other}")),
        };
        let redelivered = H_REDELIVERED
            .try_into()
            .ok()
            .and_then(|k| h.get(&k).cloned())
            .is_some_and(|v| matches!(v, FieldValue::t(true)));
        Ok(Wire {
            id: text(H_ID)?,
            timestamp: text(H_TS)?,
            message_type: text(H_TYPE)?,
            target,
            fingerprint: text(H_FP)?,
            redelivered,
            data,
        })
    }

    pub fn frame_builder(&self) -> FrameBuilder<'_> {
        FrameBuilder {
            id: &self.id,
            message_type: &self.message_type,
            timestamp: &self.timestamp,
            data: &self.data,
        }
    }
}

/// Remembers the ids and fingerprints of the last `capacity` messages, as 128-bit keyed
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

    fn key(&self, kind: u8, s: &str) -> u128 {
        use std::hash::BuildHasher;
        let hi = self.keys.0.hash_one((kind, s));
        let lo = self.keys.1.hash_one((kind, s));
        (u128::from(hi) << 64) | u128::from(lo)
    }

    /// True if `msg` is a copy of one already delivered; otherwise remembers it.
    pub fn is_duplicate(&mut self, msg: &Wire) -> bool {
        let id_key = self.key(b'i', &msg.id);
        let fp_key = self.key(b'f', &msg.fingerprint);
        if self.seen.contains(&id_key) || (msg.redelivered && self.seen.contains(&fp_key)) {
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

    fn wire(id: &str, fp: &str, redelivered: bool) -> Wire {
        Wire {
            id: id.into(),
            timestamp: "2026-11-26T10:00:00.000Z".into(),
            message_type: "m".into(),
            target: Target::Users(vec!["a".into(), "b\"".into()]),
            fingerprint: fp.into(),
            redelivered,
            data: b"{\"k\":1}".to_vec(),
        }
    }

    #[test]
    fn round_trip() {
        for target in [
            Target::Broadcast,
            Target::User("u".into()),
            Target::Users(vec!["a".into(), "b".into()]),
        ] {
            let mut w = wire("id", "fp", true);
            w.target = target;
            let back = Wire::decode(Some(&w.properties()), w.data.clone()).unwrap();
            assert_eq!(back, w);
        }
    }

    #[test]
    fn dedupe_rules() {
        let mut d = Dedupe::new(2);
        assert!(!d.is_duplicate(&wire("1", "A", false)));
        // Same content published again (not a redelivery): a new notification.
        assert!(!d.is_duplicate(&wire("2", "A", false)));
        // A redelivered copy of content already seen: dropped even with a new id.
        assert!(d.is_duplicate(&wire("3", "A", true)));
        // A publisher retrying with the same id: dropped.
        assert!(d.is_duplicate(&wire("2", "B", false)));
        // The window is bounded.
        for i in 10..20 {
            assert!(!d.is_duplicate(&wire(&i.to_string(), &format!("F{i}"), false)));
        }
        assert!(!d.is_duplicate(&wire("1", "A", true)));
        assert!(d.order.len() <= 4);
    }
}
