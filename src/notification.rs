//! The notification: what one validated message becomes once the gateway has taken it in —
//! its id and timestamp fixed, its target, and its frame encoded once.
//!
//! The frame a browser receives (contract §3) is
//!
//! ```json
//! {"id":"0193…","type":"welcome","user_id":"3f0c…","timestamp":"2026-11-26T10:00:00.123Z","data":{…}}
//! ```
//!
//! and only `user_id` differs between recipients. So a notification keeps the JSON before
//! that field (`head`) and after it (`tail`), encoded once by the ingest taker; every replica
//! builds each recipient's frame from them without parsing or re-encoding JSON, and a frame
//! replayed for recovery is byte for byte the frame first sent.
//!
//! This module must not know where a notification travels (the fan-out log encodes and decodes
//! it, [`crate::amqp::record`]) or who receives it ([`crate::registry`]).

use std::borrow::Cow;

use bytes::Bytes;
use time::OffsetDateTime;

use crate::envelope::{Envelope, Target};
use crate::frame::{self, Frame, FrameBuf};

/// Namespace of message fingerprints (UUID v5 over the original body).
const FINGERPRINT_NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f8a_51c2_3d0e_4b7a_9e21_5c4d_7a0b_1e93);

/// One notification, as every replica routes it and keeps it for recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The publisher's id, or a UUID v7 the taker assigned: the same on every replica.
    pub id: Box<str>,
    pub target: Target<'static>,
    /// The frame's JSON up to where `user_id` goes: `{"id":…,"type":…`.
    pub head: Bytes,
    /// The rest: `,"timestamp":…,"data":…}`.
    pub tail: Bytes,
    /// Identifies the broker message it came from (a UUID v5 of its body), so a copy the
    /// taker republished after a failover, under a new id, is still recognised.
    pub fingerprint: [u8; 16],
    /// The taker got it as a broker redelivery: it may have been fanned out before.
    pub redelivered: bool,
    /// When the taker took it in, Unix milliseconds (the frame's `timestamp`).
    pub taken_ms: u64,
}

impl Notification {
    /// Fixes a validated envelope's id and timestamp: the one place a notification gets them.
    /// `body` is the broker message as published (for the fingerprint).
    pub fn from_envelope(
        env: Envelope<'_>,
        body: &[u8],
        redelivered: bool,
        taken: OffsetDateTime,
    ) -> Notification {
        let id: Box<str> = env
            .id
            .as_deref()
            .map_or_else(|| uuid::Uuid::now_v7().to_string().into(), Into::into);
        let mut head = Vec::with_capacity(32 + id.len() + env.message_type.len());
        head.extend_from_slice(b"{\"id\":");
        frame::write_json_str(&mut head, &id);
        head.extend_from_slice(b",\"type\":");
        frame::write_json_str(&mut head, &env.message_type);
        let mut tail = Vec::with_capacity(48 + body.len());
        tail.extend_from_slice(b",\"timestamp\":");
        frame::write_json_str(&mut tail, &frame::timestamp(taken));
        tail.extend_from_slice(b",\"data\":");
        frame::encode_data(env.data.as_ref(), &mut tail);
        tail.push(b'}');
        let owned = |u: Cow<'_, str>| Cow::Owned(u.into_owned());
        Notification {
            id,
            target: match env.target {
                Target::User(u) => Target::User(owned(u)),
                Target::Users(list) => Target::Users(list.into_iter().map(owned).collect()),
                Target::Broadcast => Target::Broadcast,
            },
            head: head.into(),
            tail: tail.into(),
            fingerprint: *uuid::Uuid::new_v5(&FINGERPRINT_NS, body).as_bytes(),
            redelivered,
            taken_ms: u64::try_from(taken.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
        }
    }

    /// The frame for `user` (`None`: the broadcast frame, which has no `user_id`).
    pub fn frame(&self, user: Option<&str>) -> Frame {
        let user_len = user.map_or(0, |u| u.len() + 16);
        let mut buf = FrameBuf::with_capacity(self.head.len() + user_len + self.tail.len());
        buf.push(&self.head);
        if let Some(user) = user {
            buf.push(b",\"user_id\":");
            buf.push_str_literal(user);
        }
        buf.push(&self.tail);
        buf.finish()
    }

    /// Length of [`Notification::frame`]'s wire bytes (escapes in `user` aside).
    pub fn frame_len(&self, user: Option<&str>) -> usize {
        let json = self.head.len() + self.tail.len() + user.map_or(0, |u| u.len() + 13);
        json + match json {
            0..126 => 2,
            126..=65_535 => 4,
            _ => 10,
        }
    }

    pub fn is_broadcast(&self) -> bool {
        matches!(self.target, Target::Broadcast)
    }

    /// The users it is for (empty for a broadcast).
    pub fn users(&self) -> &[Cow<'static, str>] {
        match &self.target {
            Target::User(u) => std::slice::from_ref(u),
            Target::Users(list) => list,
            Target::Broadcast => &[],
        }
    }

    /// Roughly the memory it keeps alive: its fields, its encoded parts and its user ids.
    pub fn footprint(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.id.len()
            + self.head.len()
            + self.tail.len()
            + self
                .users()
                .iter()
                .map(|u| u.len() + std::mem::size_of::<Cow<'_, str>>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Parser;

    fn taken() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_795_687_200_123_456_789).unwrap()
    }

    #[test]
    fn frames_match_the_contract() {
        let body = br#"{"type":"websocket_notification","payload":{"user_ids":["u\"1","b"],"message_type":"welcome","id":"id-1","data":{"message":"Welcome!"}}}"#;
        let mut p = Parser::new();
        let env = p.parse(body, 1 << 16).unwrap();
        let n = Notification::from_envelope(env, body, false, taken());
        assert_eq!(&*n.id, "id-1");
        assert_eq!(n.taken_ms, 1_795_687_200_123);
        let f = n.frame(Some("u\"1"));
        assert_eq!(
            std::str::from_utf8(f.json()).unwrap(),
            r#"{"id":"id-1","type":"welcome","user_id":"u\"1","timestamp":"2026-11-26T10:00:00.123Z","data":{"message":"Welcome!"}}"#
        );
        assert_eq!(f.wire().len(), n.frame_len(Some("u\"1")) + 1, "one escape");
        let b: serde_json::Value = serde_json::from_slice(n.frame(None).json()).unwrap();
        assert!(b.get("user_id").is_none());
        assert_eq!(b["data"]["message"], "Welcome!");
    }

    #[test]
    fn ids_and_fingerprints() {
        let body =
            br#"{"type":"websocket_notification","payload":{"broadcast":true,"message_type":"m"}}"#;
        let mut p = Parser::new();
        let a = Notification::from_envelope(p.parse(body, 1 << 16).unwrap(), body, false, taken());
        let b = Notification::from_envelope(p.parse(body, 1 << 16).unwrap(), body, true, taken());
        assert_ne!(a.id, b.id, "a fresh UUID v7 each time it is taken in");
        assert_eq!(a.fingerprint, b.fingerprint, "the same broker message");
        let v: serde_json::Value = serde_json::from_slice(a.frame(None).json()).unwrap();
        assert!(v["data"].is_null());
        assert_eq!(v["id"].as_str(), Some(&*a.id));
    }
}
