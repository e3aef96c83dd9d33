//! Recent notifications, kept so that a client that reconnects with `?since=<id>` gets what it
//! missed (contract §5).
//!
//! Every replica reads the same fan-out log in the same order and keeps its own history of
//! it, bounded by age (`HISTORY_WINDOW_MS`) and by memory (`HISTORY_MAX_BYTES`); a replica that
//! just started fills it from the log before it reports ready. Each notification gets a local
//! sequence number as it is recorded; `since` is found through an id index, and one user's
//! missed frames through a per-user index (plus the list of broadcasts), so a reconnect storm
//! after a deploy never scans the whole history.
//!
//! **The seam.** A notification is recorded *before* it is routed. A reconnecting client is
//! registered under the history's lock, and told to ignore live frames up to the last sequence
//! number recorded at that moment: those are exactly the ones its replay holds. Everything
//! recorded later is routed later, so it reaches the new connection live. Nothing is lost and
//! nothing arrives twice, however fast that user's notifications keep coming.
//!
//! This module must not know about sockets or the broker: it keeps notifications and answers
//! "what did this user miss since that id".

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::notification::Notification;

/// Memory an entry takes beyond its [`Notification::footprint`] and index words. Measured
/// with the loadtest at 1,000 notifications/s of 278-byte frames: the gateway's RSS grew
/// 750–880 bytes per entry kept (against a run with the history off) where the footprint and
/// index words came to 517.
const ENTRY_OVERHEAD: usize = 256;

/// Recent notifications, indexed by id and by user.
pub struct History {
    inner: Mutex<Inner>,
    window_ms: u64,
    max_bytes: usize,
    /// Woken whenever notifications are recorded.
    recorded: Notify,
}

struct Entry {
    seq: u64,
    notification: Arc<Notification>,
    bytes: usize,
}

struct Inner {
    /// In sequence order; `entries[i].seq == first_seq + i`.
    entries: VecDeque<Entry>,
    /// Sequence number of the next notification recorded (the first is 1).
    next_seq: u64,
    /// Keyed hash of an id → its sequence number (checked against the entry's id).
    by_id: HashMap<u64, u64>,
    /// User → sequence numbers of the notifications for them, ascending.
    by_user: HashMap<Box<str>, VecDeque<u64>>,
    /// Sequence numbers of broadcasts, ascending.
    broadcasts: VecDeque<u64>,
    bytes: usize,
    hasher: std::hash::RandomState,
}

/// What a reconnecting client gets.
#[derive(Debug)]
pub struct Replay {
    pub result: Recovery,
    /// The missed notifications, in their original order (empty unless recovered).
    pub missed: Vec<Arc<Notification>>,
}

/// Whether the gateway can vouch for the gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    Recovered,
    /// `since` is older than the window, or was never seen here.
    Unknown,
    /// The missed frames would not fit the connection's queue.
    TooLarge,
}

/// History figures for `/metrics`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub entries: usize,
    pub bytes: usize,
    /// Age of the oldest entry, in ms (0 when empty).
    pub oldest_age_ms: u64,
}

impl History {
    pub fn new(window: Duration, max_bytes: usize) -> History {
        History {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                next_seq: 1,
                by_id: HashMap::new(),
                by_user: HashMap::new(),
                broadcasts: VecDeque::new(),
                bytes: 0,
                hasher: std::hash::RandomState::new(),
            }),
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max_bytes,
            recorded: Notify::new(),
        }
    }

    /// Records notifications in the order given and returns each with its sequence number.
    /// Drops what has left the window (by age at `now_ms`, or by memory).
    pub fn record(&self, batch: Vec<Notification>, now_ms: u64) -> Vec<(u64, Arc<Notification>)> {
        let mut out = Vec::with_capacity(batch.len());
        let mut h = self.inner.lock();
        for n in batch {
            let seq = h.next_seq;
            h.next_seq += 1;
            let n = Arc::new(n);
            h.insert(seq, n.clone());
            out.push((seq, n));
        }
        h.evict(now_ms.saturating_sub(self.window_ms), self.max_bytes);
        drop(h);
        self.recorded.notify_waiters();
        out
    }

    /// Waits, at most `limit`, until `since` is known here. Replicas read the log at their
    /// own pace: a client moving from a replica that is ahead may bring an id this one has not
    /// read yet, and must not be told "cannot vouch" for that. An id that is plainly older
    /// than the window (a UUID v7 the taker assigned, whose time says so) is not waited for.
    pub async fn wait_for(&self, since: &str, now_ms: u64, limit: Duration) {
        let too_old = uuid::Uuid::parse_str(since)
            .ok()
            .filter(|u| u.get_version_num() == 7)
            .and_then(|u| u.get_timestamp())
            .is_some_and(|t| {
                let (secs, nanos) = t.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000 < now_ms.saturating_sub(self.window_ms)
            });
        if too_old {
            return;
        }
        let _ = tokio::time::timeout(limit, async {
            loop {
                let recorded = self.recorded.notified();
                tokio::pin!(recorded);
                recorded.as_mut().enable();
                if self.knows(since) {
                    return;
                }
                recorded.await;
            }
        })
        .await;
    }

    fn knows(&self, id: &str) -> bool {
        let h = self.inner.lock();
        h.by_id
            .get(&h.id_key(id))
            .and_then(|&seq| h.get(seq))
            .is_some_and(|e| &*e.notification.id == id)
    }

    /// Finds what `user` missed since `since` (at most `max_bytes` of frames) and runs
    /// `register` under the history's lock with the sequence number up to which the replay
    /// covers everything (0 when there is no replay): the caller registers its connection in
    /// `register`, telling it to ignore live frames up to that number (see the module docs).
    pub fn attach<R>(
        &self,
        user: &str,
        since: &str,
        max_bytes: usize,
        register: impl FnOnce(u64) -> R,
    ) -> (R, Replay) {
        let h = self.inner.lock();
        let replay = h.replay(user, since, max_bytes);
        let covered = match replay.result {
            Recovery::Recovered => h.next_seq - 1,
            _ => 0,
        };
        (register(covered), replay)
    }

    /// Forgets everything: after a gap in the log, no earlier id can be vouched for.
    pub fn clear(&self) {
        let mut h = self.inner.lock();
        h.entries.clear();
        h.by_id.clear();
        h.by_user.clear();
        h.broadcasts.clear();
        h.bytes = 0;
    }

    pub fn stats(&self, now_ms: u64) -> Stats {
        let h = self.inner.lock();
        Stats {
            entries: h.entries.len(),
            bytes: h.bytes,
            oldest_age_ms: h
                .entries
                .front()
                .map_or(0, |e| now_ms.saturating_sub(e.notification.taken_ms)),
        }
    }
}

impl Inner {
    fn id_key(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    fn insert(&mut self, seq: u64, n: Arc<Notification>) {
        let key = self.id_key(&n.id);
        self.by_id.insert(key, seq);
        if n.is_broadcast() {
            self.broadcasts.push_back(seq);
        }
        for u in n.users() {
            match self.by_user.get_mut(&**u) {
                Some(list) => list.push_back(seq),
                None => {
                    self.by_user.insert((&**u).into(), VecDeque::from([seq]));
                }
            }
        }
        // The indexes cost about two words per user and per id on top of the notification,
        // and allocation has its own cost: size classes, reference counts, the slack of the
        // growing indexes. `ENTRY_OVERHEAD` is that, measured (see its docs), so that
        // `HISTORY_MAX_BYTES` bounds what the process really holds.
        let bytes = n.footprint() + 16 * (n.users().len() + 2) + ENTRY_OVERHEAD;
        self.bytes += bytes;
        self.entries.push_back(Entry {
            seq,
            notification: n,
            bytes,
        });
    }

    /// Drops entries taken in before `oldest_ms`, then more while over `max_bytes`.
    fn evict(&mut self, oldest_ms: u64, max_bytes: usize) {
        while let Some(front) = self.entries.front() {
            if front.notification.taken_ms >= oldest_ms && self.bytes <= max_bytes {
                break;
            }
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= e.bytes;
            let key = self.id_key(&e.notification.id);
            if self.by_id.get(&key) == Some(&e.seq) {
                self.by_id.remove(&key);
            }
            if e.notification.is_broadcast() && self.broadcasts.front() == Some(&e.seq) {
                self.broadcasts.pop_front();
            }
            for u in e.notification.users() {
                if let Some(list) = self.by_user.get_mut(&**u) {
                    if list.front() == Some(&e.seq) {
                        list.pop_front();
                    }
                    if list.is_empty() {
                        self.by_user.remove(&**u);
                    }
                }
            }
        }
        // Give memory back after a burst, not on every eviction.
        if self.entries.capacity() > 1024 && self.entries.len() < self.entries.capacity() / 4 {
            self.entries.shrink_to_fit();
            self.by_id.shrink_to_fit();
        }
    }

    fn get(&self, seq: u64) -> Option<&Entry> {
        let first = self.entries.front()?.seq;
        self.entries
            .get(usize::try_from(seq.checked_sub(first)?).ok()?)
    }

    fn replay(&self, user: &str, since: &str, max_bytes: usize) -> Replay {
        let refuse = |result| Replay {
            result,
            missed: Vec::new(),
        };
        let Some(&from) = self.by_id.get(&self.id_key(since)) else {
            return refuse(Recovery::Unknown);
        };
        if self.get(from).is_none_or(|e| &*e.notification.id != since) {
            return refuse(Recovery::Unknown);
        }
        let after = |list: Option<&VecDeque<u64>>| -> Vec<u64> {
            list.map_or_else(Vec::new, |l| {
                let start = l.partition_point(|&s| s <= from);
                l.range(start..).copied().collect()
            })
        };
        let mine = after(self.by_user.get(user));
        let all = after(Some(&self.broadcasts));
        // Merge the two ascending lists: the original order.
        let mut missed = Vec::with_capacity(mine.len() + all.len());
        let mut bytes = 0;
        let (mut i, mut j) = (0, 0);
        while i < mine.len() || j < all.len() {
            let seq = if j == all.len() || (i < mine.len() && mine[i] < all[j]) {
                i += 1;
                mine[i - 1]
            } else {
                j += 1;
                all[j - 1]
            };
            if let Some(e) = self.get(seq) {
                let n = &e.notification;
                bytes += n.frame_len((!n.is_broadcast()).then_some(user));
                if bytes > max_bytes {
                    return refuse(Recovery::TooLarge);
                }
                missed.push(n.clone());
            }
        }
        Replay {
            result: Recovery::Recovered,
            missed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Target;
    use bytes::Bytes;

    fn n(id: &str, target: Target<'static>, taken_ms: u64) -> Notification {
        Notification {
            id: id.into(),
            target,
            head: Bytes::from(format!(r#"{{"id":"{id}","type":"m""#)),
            tail: Bytes::from_static(br#","timestamp":"t","data":null}"#),
            fingerprint: [0; 16],
            redelivered: false,
            taken_ms,
        }
    }

    fn ids(r: &Replay) -> Vec<&str> {
        r.missed.iter().map(|n| &*n.id).collect()
    }

    #[test]
    fn replays_a_users_frames_and_broadcasts_in_order() {
        let h = History::new(Duration::from_secs(300), 1 << 30);
        h.record(
            vec![
                n("1", Target::User("a".into()), 10),
                n("2", Target::Broadcast, 11),
                n("3", Target::User("b".into()), 12),
                n("4", Target::Users(vec!["b".into(), "a".into()]), 13),
                n("5", Target::Broadcast, 14),
            ],
            20,
        );
        let ((), r) = h.attach("a", "1", 1 << 20, |last| assert_eq!(last, 5));
        assert_eq!(r.result, Recovery::Recovered);
        assert_eq!(ids(&r), ["2", "4", "5"]);
        let ((), r) = h.attach("b", "2", 1 << 20, |_| ());
        assert_eq!(ids(&r), ["3", "4", "5"]);
        let ((), r) = h.attach("a", "5", 1 << 20, |_| ());
        assert!(r.result == Recovery::Recovered && r.missed.is_empty());
        let ((), r) = h.attach("a", "nope", 1 << 20, |_| ());
        assert!(r.result == Recovery::Unknown && r.missed.is_empty());
    }

    #[test]
    fn bounded_by_age_and_memory() {
        let h = History::new(Duration::from_millis(100), 1 << 30);
        h.record(vec![n("old", Target::Broadcast, 1_000)], 1_000);
        h.record(vec![n("new", Target::Broadcast, 1_150)], 1_150);
        assert_eq!(
            h.attach("a", "old", 1 << 20, |_| ()).1.result,
            Recovery::Unknown,
            "older than the window"
        );
        assert!(h.attach("a", "new", 1 << 20, |_| ()).1.result == Recovery::Recovered);
        assert_eq!(h.stats(1_200).entries, 1);

        let one = n("x", Target::User("u".into()), 0).footprint() + 48;
        let h = History::new(Duration::from_secs(300), one * 10);
        for i in 0..100 {
            h.record(vec![n(&i.to_string(), Target::User("u".into()), 5)], 5);
        }
        let s = h.stats(5);
        assert!(s.entries <= 10 && s.bytes <= one * 10, "{s:?}");
        assert!(h.attach("u", "95", 1 << 20, |_| ()).1.result == Recovery::Recovered);
        assert_eq!(
            h.attach("u", "5", 1 << 20, |_| ()).1.result,
            Recovery::Unknown
        );
        let (covered, r) = h.attach("u", "95", 10, |covered| covered);
        assert_eq!(
            (covered, r.result),
            (0, Recovery::TooLarge),
            "over max_bytes"
        );
        h.clear();
        assert_eq!(h.stats(5).entries, 0);
    }
}
