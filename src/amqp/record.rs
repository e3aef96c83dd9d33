//! The fan-out log's record format: many notifications in one broker message.
//!
//! What the broker charges for is the number of messages, not their size (see BENCHMARKS.md),
//! so the ingest taker packs every notification it validated while its previous record was
//! awaiting the broker's confirm into the next record. A record carries everything a replica
//! needs to route each notification and to keep it for recovery, without parsing JSON: the id,
//! the target (in the body, never in headers: a `user_ids` list can be as large as the message
//! size limit allows, far beyond what a header table may hold) and the frame's encoded parts.
//!
//! ```text
//! record  = version:u8 (1) kind:u8 body
//! kind 0  = taker:u64 seq:u64 count:u32 entry*count  notifications, from taker term `taker`,
//!                                                    its `seq`th record (from 1)
//! kind 1  = len:u8 marker-id                         a replica's marker (start-up, shutdown)
//! entry   = flags:u8 fingerprint:[u8;16] taken_ms:u64
//!           id_len:u8 id head_len:u32 head tail_len:u32 tail
//!           [users:u32 (len:u8 user-id)*users]       unless the target is a broadcast
//! flags   = bit 0 redelivered, bits 1-2 target: 0 broadcast, 1 user, 2 users
//! ```
//!
//! Integers are little-endian. Decoding checks every length and refuses anything malformed
//! (only something other than a wsnotify taker could have written it); it never panics. A
//! decoded notification's `head` and `tail` are slices of the record's body: no copy.
//!
//! This module must not know about the broker: it turns notifications into bytes and back, and
//! rejects a record it cannot vouch for instead of guessing.

use std::borrow::Cow;

use bytes::Bytes;

use crate::envelope::{Target, valid_user_id};
use crate::notification::Notification;

/// The record format this build writes, and the only one it reads.
pub const VERSION: u8 = 1;
const KIND_NOTIFICATIONS: u8 = 0;
const KIND_MARKER: u8 = 1;
const HEADER: usize = 22;

/// Which taker wrote a record: a random id per term of holding the notify queue, and the
/// record's number in that term (from 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Origin {
    pub taker: u64,
    pub seq: u64,
}

/// What one record holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Notifications(Origin, Vec<Notification>),
    /// A replica's own marker: when it reads it back, it has read everything before it.
    Marker(String),
}

/// Notifications being packed into one record.
pub struct RecordBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl Default for RecordBuilder {
    fn default() -> Self {
        let mut buf = Vec::with_capacity(1024);
        buf.extend_from_slice(&[VERSION, KIND_NOTIFICATIONS]);
        buf.resize(HEADER, 0);
        RecordBuilder { buf, count: 0 }
    }
}

impl RecordBuilder {
    pub fn push(&mut self, n: &Notification) {
        let (kind, users): (u8, &[Cow<'_, str>]) = match &n.target {
            Target::Broadcast => (0, &[]),
            Target::User(u) => (1, std::slice::from_ref(u)),
            Target::Users(list) => (2, list),
        };
        let b = &mut self.buf;
        b.push(u8::from(n.redelivered) | kind << 1);
        b.extend_from_slice(&n.fingerprint);
        b.extend_from_slice(&n.taken_ms.to_le_bytes());
        // Ids are at most 64 bytes and user ids at most 128 (envelope validation), so their
        // lengths fit a byte; `min` only keeps a broken invariant from writing garbage.
        let id = &n.id.as_bytes()[..n.id.len().min(255)];
        b.push(id.len() as u8);
        b.extend_from_slice(id);
        for part in [&n.head, &n.tail] {
            b.extend_from_slice(&(part.len() as u32).to_le_bytes());
            b.extend_from_slice(part);
        }
        if kind != 0 {
            b.extend_from_slice(&(users.len() as u32).to_le_bytes());
            for u in users {
                let u = &u.as_bytes()[..u.len().min(255)];
                b.push(u.len() as u8);
                b.extend_from_slice(u);
            }
        }
        self.count += 1;
    }

    /// Notifications packed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the record so far.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// The record's body, as the `origin.seq`th record of taker term `origin.taker`.
    pub fn finish(mut self, origin: Origin) -> Vec<u8> {
        self.buf[2..10].copy_from_slice(&origin.taker.to_le_bytes());
        self.buf[10..18].copy_from_slice(&origin.seq.to_le_bytes());
        self.buf[18..HEADER].copy_from_slice(&self.count.to_le_bytes());
        self.buf
    }
}

/// A marker record.
pub fn marker(id: &str) -> Vec<u8> {
    let id = &id.as_bytes()[..id.len().min(255)];
    let mut b = vec![VERSION, KIND_MARKER, id.len() as u8];
    b.extend_from_slice(id);
    b
}

/// Reads a record back.
pub fn decode(body: Bytes) -> Result<Record, String> {
    let mut r = Reader { body, at: 0 };
    let version = r.u8()?;
    if version != VERSION {
        return Err(format!(
            "record version {version}, this build reads {VERSION}"
        ));
    }
    match r.u8()? {
        KIND_NOTIFICATIONS => {
            let origin = Origin {
                taker: u64::from_le_bytes(r.array()?),
                seq: u64::from_le_bytes(r.array()?),
            };
            let count = r.u32()? as usize;
            // Each entry takes at least 35 bytes: a count beyond that is a lie.
            if count > r.body.len() / 35 {
                return Err(format!("record claims {count} entries"));
            }
            let mut out = Vec::with_capacity(count);
            for _ in 0..count {
                out.push(r.notification()?);
            }
            if r.at != r.body.len() {
                return Err("trailing bytes after the last entry".into());
            }
            Ok(Record::Notifications(origin, out))
        }
        KIND_MARKER => {
            let len = usize::from(r.u8()?);
            Ok(Record::Marker(r.str(len)?.to_owned()))
        }
        kind => Err(format!("unknown record kind {kind}")),
    }
}

struct Reader {
    body: Bytes,
    at: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.body.len());
        let end = end.ok_or("record ends mid-entry")?;
        let out = self.body.slice(self.at..end);
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let b = self.take(N)?;
        let mut out = [0; N];
        out.copy_from_slice(&b);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn str(&mut self, len: usize) -> Result<String, String> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a string is not UTF-8".to_owned())
    }

    fn notification(&mut self) -> Result<Notification, String> {
        let flags = self.u8()?;
        let fingerprint = self.array()?;
        let taken_ms = u64::from_le_bytes(self.array()?);
        let id_len = usize::from(self.u8()?);
        let id = self.str(id_len)?;
        if id.is_empty() {
            return Err("empty id".into());
        }
        let head_len = self.u32()? as usize;
        let head = self.take(head_len)?;
        let tail_len = self.u32()? as usize;
        let tail = self.take(tail_len)?;
        let kind = (flags >> 1) & 3;
        let target = if kind == 0 {
            Target::Broadcast
        } else {
            let n = self.u32()? as usize;
            if n == 0 || n > self.body.len() - self.at {
                return Err(format!("entry claims {n} users"));
            }
            let mut users = Vec::with_capacity(n);
            for _ in 0..n {
                let len = usize::from(self.u8()?);
                let u = self.str(len)?;
                if !valid_user_id(&u) {
                    return Err("invalid user id".into());
                }
                users.push(Cow::Owned(u));
            }
            match (kind, users.len()) {
                (1, 1) => Target::User(users.pop().ok_or("no user")?),
                (2, _) => Target::Users(users),
                _ => return Err(format!("target kind {kind} with {n} users")),
            }
        };
        Ok(Notification {
            id: id.into(),
            target,
            head,
            tail,
            fingerprint,
            redelivered: flags & 1 != 0,
            taken_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: &str, target: Target<'static>, redelivered: bool) -> Notification {
        Notification {
            id: id.into(),
            target,
            head: Bytes::from_static(br#"{"id":"x","type":"m""#),
            tail: Bytes::from_static(br#","timestamp":"t","data":null}"#),
            fingerprint: [7; 16],
            redelivered,
            taken_ms: 1_795_687_200_123,
        }
    }

    #[test]
    fn round_trip() {
        let entries = vec![
            n("a", Target::Broadcast, false),
            n("b", Target::User("u\"1".into()), true),
            n("c", Target::Users(vec!["x".into(), "y".into()]), false),
        ];
        let origin = Origin { taker: 7, seq: 3 };
        let mut b = RecordBuilder::default();
        for e in &entries {
            b.push(e);
        }
        assert_eq!(b.len(), 3);
        let body = Bytes::from(b.finish(origin));
        assert_eq!(
            decode(body).unwrap(),
            Record::Notifications(origin, entries)
        );
        assert_eq!(
            decode(Bytes::from(marker("m-1"))).unwrap(),
            Record::Marker("m-1".into())
        );
    }

    #[test]
    fn ten_thousand_users_travel_in_the_body() {
        let users: Vec<Cow<'static, str>> =
            (0..10_000).map(|i| format!("user-{i}").into()).collect();
        let mut b = RecordBuilder::default();
        b.push(&n("big", Target::Users(users.clone()), false));
        let Record::Notifications(_, back) =
            decode(Bytes::from(b.finish(Origin::default()))).unwrap()
        else {
            panic!("not notifications")
        };
        assert_eq!(back[0].users().len(), 10_000);
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let mut b = RecordBuilder::default();
        b.push(&n("a", Target::Users(vec!["x".into()]), false));
        let good = b.finish(Origin { taker: 1, seq: 1 });
        for cut in 0..good.len() {
            assert!(
                decode(Bytes::copy_from_slice(&good[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut rng = fastrand::Rng::with_seed(3);
        for _ in 0..10_000 {
            let mut bad = good.clone();
            let i = rng.usize(..bad.len());
            bad[i] = rng.u8(..);
            let _ = decode(Bytes::from(bad));
        }
        assert!(decode(Bytes::from_static(&[2, 0, 0, 0, 0, 0])).is_err());
        let mut lie = vec![1, 0];
        lie.extend_from_slice(&[0; 16]);
        lie.extend_from_slice(&[255; 4]);
        assert!(decode(Bytes::from(lie)).is_err());
    }
}
