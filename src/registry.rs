//! Who is connected, and the route from a frame to their sockets.
//!
//! After centrifuge's `hub.go`: a fixed array of shards keyed by a hash of the user id, each a
//! lock over a slab of connection mailboxes plus a `user → connections` index. Connecting and
//! disconnecting touch one shard. The index is intrusive — each slab entry links to the next
//! connection of the same user — so a user costs one map entry and no extra allocation.
//!
//! A broadcast reaches the shards over bounded channels, one per shard, each drained by its own
//! task, so it is spread over every core: a shard task takes its lock once per batch of
//! deliveries and pushes clones of the same [`Bytes`] into each connection's [`Mailbox`]
//! mailbox; the connection's own task does the socket write. A frame for one user skips that
//! hop when it can: if nothing is queued for the user's shard, the router pushes it into the
//! mailboxes itself, under the lock it takes anyway to find the user; otherwise it joins the
//! shard's queue behind what is there. Either way a user's frames reach its mailboxes in the
//! order they were routed.
//!
//! Memory held for clients that read slowly is bounded twice: per connection by
//! `CLIENT_QUEUE_BYTES` (the connection is closed with 1013 when its queue would go over), and
//! for all connections together by `CLIENT_QUEUE_BUDGET_BYTES`: when the budget runs out, a
//! task woken for it closes the connections holding the most first (see
//! [`Registry::cut_largest`]). The budget counts memory, not bytes sent: a broadcast frame is
//! one allocation shared by every recipient, so each queued copy costs one queue slot
//! ([`SLOT_BYTES`](crate::mailbox::SLOT_BYTES)); a frame for one user costs its length as well ([`Sharing`]).
//!
//! This module must not know how a frame is written or how a socket reads: it pushes into
//! [`Mailbox`]es and raises their signals; each connection's own task does the rest.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use slab::Slab;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::warn;

use crate::envelope::Target;
use crate::frame::Frame;
use crate::mailbox::{Mailbox, Sharing, signal};
use crate::metrics::{LatencyCounts, LatencyHistogram, Metrics, inc};
use crate::notification::Notification;
use crate::shutdown::Shutdown;

/// Shard count: a power of two well above the core count, so connect/disconnect and fan-out
/// rarely meet on one lock.
pub const SHARDS: usize = 64;
/// Deliveries buffered per shard before the consumer waits (backpressure to the broker).
const SHARD_QUEUE: usize = 1024;
/// Deliveries a shard task handles per lock acquisition.
const SHARD_BATCH: usize = 64;
const NIL: u32 = u32::MAX;
/// Least time between two scans for the largest queues once the budget has run out: the
/// connections told to close need a moment to drop their queues, and a scan locks every shard.
const BUDGET_RECHECK: Duration = Duration::from_millis(50);
/// Most warnings about the exhausted budget per period.
const BUDGET_LOG_EVERY: Duration = Duration::from_secs(10);

/// What a shard task is asked to do.
#[derive(Debug)]
enum Delivery {
    User {
        user: Box<str>,
        frame: Bytes,
        born: u32,
        seq: u64,
    },
    Broadcast {
        frame: Bytes,
        born: u32,
        seq: u64,
    },
    /// Reply once everything sent before it has been pushed to mailboxes.
    Barrier(oneshot::Sender<()>),
}

/// Where a registered connection sits, for unregistering it.
#[derive(Debug, Clone, Copy)]
pub struct ConnKey {
    shard: u16,
    key: u32,
}

struct Entry {
    mailbox: Arc<Mailbox>,
    user: Arc<str>,
    prev: u32,
    next: u32,
    /// Notifications up to this sequence number are not queued for this connection: its
    /// recovery replay holds them (see [`crate::history`]). 0 without recovery.
    covered: u64,
}

#[derive(Default)]
struct ShardState {
    conns: Slab<Entry>,
    /// user → slab key of one of their connections (the others are linked from it).
    users: HashMap<Arc<str>, u32>,
}

struct Shard {
    state: Mutex<ShardState>,
    tx: mpsc::Sender<Delivery>,
    /// Deliveries sent to the shard's task and not yet pushed to mailboxes. Read under the
    /// state lock; the task lowers it under that lock once a batch is pushed.
    queued: AtomicUsize,
    /// What the queues of this shard's connections cost the budget ([`Sharing`]): one
    /// counter per shard, like the histogram, so that connections writing on different
    /// threads do not all update one. Briefly below zero when a frame is written before its
    /// batch is charged.
    charge: AtomicIsize,
    /// Delivery latency of this shard's connections (one histogram per shard keeps the
    /// counters of connections on different threads apart).
    latency: LatencyHistogram,
}

/// All connections, sharded.
pub struct Registry {
    shards: Box<[Shard]>,
    /// Start of [`Registry::stamp`].
    epoch: Instant,
    hasher: std::hash::RandomState,
    connections: AtomicUsize,
    users: AtomicUsize,
    closing: AtomicBool,
    /// Keepalive clock: one tick per ping interval.
    tick: AtomicU32,
    queue_limit: usize,
    /// `CLIENT_QUEUE_BUDGET_BYTES`.
    budget: isize,
    /// Wakes [`enforce_budget`] when the shards' charges add up to more than `budget`.
    over_budget: Notify,
    /// `MAX_CONNECTIONS_PER_USER` (0: no limit).
    per_user: usize,
}

/// The bounds a [`Registry`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `CLIENT_QUEUE_BYTES`: bytes queued for one connection before it is closed with 1013.
    pub client_queue: usize,
    /// `CLIENT_QUEUE_BUDGET_BYTES`: what all client queues may cost together before the
    /// connections with the largest are closed with 1013.
    pub budget: usize,
    /// `MAX_CONNECTIONS_PER_USER`: connections one user may hold (0: no limit).
    pub per_user: usize,
}

/// What became of a routed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// At least one connection was there to receive it.
    Delivered,
    /// Nobody it was meant for is connected here.
    NoRecipient,
}

/// Why a connection could not be registered.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Shutdown has begun.
    Closing,
    /// The user already holds `MAX_CONNECTIONS_PER_USER` connections.
    UserLimit,
}

impl Registry {
    /// A registry with only a per-connection queue limit (no budget, no per-user limit), for
    /// tests and benches. Must run inside a tokio runtime.
    pub fn start(queue_limit: usize) -> Arc<Registry> {
        Registry::start_with(Limits {
            client_queue: queue_limit,
            budget: usize::MAX,
            per_user: 0,
        })
    }

    /// Builds the registry and starts one dispatch task per shard, and the task that enforces
    /// the queue budget. Must run inside a tokio runtime.
    pub fn start_with(limits: Limits) -> Arc<Registry> {
        let mut shards = Vec::with_capacity(SHARDS);
        let mut receivers = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            shards.push(Shard {
                state: Mutex::new(ShardState::default()),
                tx,
                queued: AtomicUsize::new(0),
                charge: AtomicIsize::new(0),
                latency: LatencyHistogram::default(),
            });
            receivers.push(rx);
        }
        let registry = Arc::new(Registry {
            shards: shards.into_boxed_slice(),
            epoch: Instant::now(),
            hasher: std::hash::RandomState::new(),
            connections: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            tick: AtomicU32::new(0),
            queue_limit: limits.client_queue,
            budget: isize::try_from(limits.budget).unwrap_or(isize::MAX),
            over_budget: Notify::new(),
            per_user: limits.per_user,
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(dispatch(registry.clone(), i, rx));
        }
        tokio::spawn(enforce_budget(registry.clone()));
        registry
    }

    fn shard_of(&self, user: &str) -> usize {
        (self.hasher.hash_one(user) as usize) & (SHARDS - 1)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn users(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Bytes a connection's queue may hold (`CLIENT_QUEUE_BYTES`).
    pub fn queue_limit(&self) -> usize {
        self.queue_limit
    }

    /// Queues a recovering connection's first frames (its recovery status, then the missed
    /// notifications, built for it alone) in front of whatever live frames reached it since it
    /// was registered. Called before its task runs; the caller keeps them within
    /// [`Registry::queue_limit`].
    pub fn prepend(&self, at: ConnKey, mailbox: &Mailbox, frames: Vec<Bytes>) {
        let charge = mailbox.prepend(frames, self.stamp());
        self.charge(usize::from(at.shard), charge);
    }

    /// What all client queues cost the budget now (see [`Sharing`]).
    pub fn queued_bytes(&self) -> usize {
        self.used().max(0) as usize
    }

    fn used(&self) -> isize {
        self.shards
            .iter()
            .map(|s| s.charge.load(Ordering::Relaxed))
            .sum()
    }

    /// Adds what frames just queued for connections of `shard` cost; wakes the budget's
    /// enforcer if it ran out. The shards are added up only when this one holds more than its
    /// share of the budget: while none does, the total cannot be over it.
    fn charge(&self, shard: usize, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let bytes = bytes as isize;
        let here = self.shards[shard].charge.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if here > self.budget / SHARDS as isize && self.used() > self.budget {
            self.over_budget.notify_one();
        }
    }

    /// Gives back the charge of frames written to a socket or dropped by the connection at
    /// `at` ([`Taken::charge`](crate::mailbox::Taken::charge), [`Mailbox::discard_queued`]).
    pub fn release(&self, at: ConnKey, mailbox: &Mailbox, bytes: usize) {
        if bytes > 0 {
            mailbox.release(bytes);
            self.shards[usize::from(at.shard)]
                .charge
                .fetch_sub(bytes as isize, Ordering::AcqRel);
        }
    }

    /// When the budget has run out, tells the connections whose queues cost the most to close
    /// with 1013, largest first, until what they hold would bring the total down to 7/8 of
    /// the budget (so that one cut is not followed at once by the next). Returns how many
    /// were told.
    pub fn cut_largest(&self) -> usize {
        let used = self.used();
        if used <= self.budget {
            return 0;
        }
        let target = (used - self.budget + self.budget / 8) as usize;
        let mut holders: Vec<(usize, Arc<Mailbox>)> = Vec::new();
        self.for_each(|e| {
            let c = e.mailbox.charge();
            if c > 0 {
                holders.push((c, e.mailbox.clone()));
            }
        });
        holders.sort_unstable_by_key(|h| std::cmp::Reverse(h.0));
        let mut freed = 0;
        let mut cut = 0;
        for (charge, h) in holders {
            if freed >= target {
                break;
            }
            h.signal(signal::BUDGET);
            freed += charge;
            cut += 1;
        }
        cut
    }

    /// Current keepalive tick.
    pub fn keepalive_tick(&self) -> u32 {
        self.tick.load(Ordering::Relaxed)
    }

    /// Microseconds since the registry started, wrapping (every ~71 minutes): stamps a
    /// notification when it enters routing, for the delivery-latency histogram.
    pub fn stamp(&self) -> u32 {
        self.epoch.elapsed().as_micros() as u32
    }

    /// Records that a connection (`at`) finished writing frames, the oldest of which entered
    /// routing at `born` ([`Registry::stamp`]).
    pub fn record_delivery(&self, at: ConnKey, born: u32) {
        let us = self.stamp().wrapping_sub(born);
        self.shards[usize::from(at.shard)].latency.record(us);
    }

    /// The delivery-latency histogram's counts, summed over the shards.
    pub fn latency(&self) -> LatencyCounts {
        let mut total = LatencyCounts::default();
        for shard in self.shards.iter() {
            shard.latency.add_to(&mut total);
        }
        total
    }

    /// Adds a connection for `user`. Refused once shutdown has begun, so a handshake that
    /// finishes during shutdown cannot slip past [`Registry::close_all`], and when the user
    /// already holds `MAX_CONNECTIONS_PER_USER` connections.
    pub fn register(&self, user: Arc<str>, mailbox: Arc<Mailbox>) -> Result<ConnKey, Refused> {
        self.register_recovering(user, mailbox, 0)
    }

    /// [`Registry::register`] for a connection whose recovery replay holds every notification
    /// up to sequence number `covered`: their live frames are not queued for it.
    pub fn register_recovering(
        &self,
        user: Arc<str>,
        mailbox: Arc<Mailbox>,
        covered: u64,
    ) -> Result<ConnKey, Refused> {
        let shard_idx = self.shard_of(&user);
        let mut st = self.shards[shard_idx].state.lock();
        if self.closing.load(Ordering::Acquire) {
            return Err(Refused::Closing);
        }
        let head = st.users.get(&*user).copied();
        if self.per_user > 0 {
            // Walks at most `per_user` entries of the user's list.
            let (mut held, mut key) = (0, head.unwrap_or(NIL));
            while key != NIL {
                held += 1;
                if held >= self.per_user {
                    return Err(Refused::UserLimit);
                }
                key = st.conns[key as usize].next;
            }
        }
        mailbox.seen(self.keepalive_tick());
        let key = st.conns.insert(Entry {
            mailbox,
            user: user.clone(),
            prev: NIL,
            next: head.unwrap_or(NIL),
            covered,
        });
        let key = key as u32;
        match head {
            Some(h) => {
                st.conns[h as usize].prev = key;
                if let Some(u) = st.users.get_mut(&*user) {
                    *u = key;
                }
            }
            None => {
                st.users.insert(user, key);
                self.users.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ConnKey {
            shard: shard_idx as u16,
            key,
        })
    }

    /// Removes a connection; called exactly once, when its task ends.
    pub fn unregister(&self, at: ConnKey) {
        let mut st = self.shards[usize::from(at.shard)].state.lock();
        let st = &mut *st;
        let Some(entry) = st.conns.try_remove(at.key as usize) else {
            return;
        };
        // Nothing is pushed to it any more: give back what its mailbox still holds.
        self.release(at, &entry.mailbox, entry.mailbox.discard_queued());
        if entry.prev != NIL {
            st.conns[entry.prev as usize].next = entry.next;
        }
        if entry.next != NIL {
            st.conns[entry.next as usize].prev = entry.prev;
        }
        if entry.prev == NIL {
            if entry.next == NIL {
                st.users.remove(&*entry.user);
                self.users.fetch_sub(1, Ordering::Relaxed);
            } else if let Some(head) = st.users.get_mut(&*entry.user) {
                *head = entry.next;
            }
        }
        // Give memory back after a spike of connections, not on every disconnect.
        if st.conns.capacity() > 64 && st.conns.len() < st.conns.capacity() / 4 {
            st.conns.shrink_to_fit();
        }
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Routes notifications the history has just recorded ([`History::record`]), in order,
    /// and counts what became of each. Recording comes first: a reconnecting client's replay
    /// covers exactly what was recorded before it registered (see [`crate::history`]).
    ///
    /// [`History::record`]: crate::history::History::record
    pub async fn route_recorded(&self, recorded: Vec<(u64, Arc<Notification>)>, metrics: &Metrics) {
        for (seq, n) in recorded {
            match self.route(&n, seq).await {
                Outcome::Delivered => inc(&metrics.messages_delivered),
                Outcome::NoRecipient => inc(&metrics.messages_no_recipient),
            }
        }
    }

    /// Encodes notification `seq` for its recipients and hands the frames to the shards: one
    /// frame per target user (shared by all of that user's connections), one for a broadcast.
    /// Users who are not connected cost nothing: no frame is built for them.
    pub async fn route(&self, n: &Notification, seq: u64) -> Outcome {
        let born = self.stamp();
        let mut delivered = false;
        let target = &n.target;
        match target {
            Target::User(user) => delivered = self.to_user(user, n, born, seq).await,
            Target::Users(users) => {
                for user in users {
                    delivered |= self.to_user(user, n, born, seq).await;
                }
            }
            Target::Broadcast => {
                if self.connections() > 0 {
                    self.broadcast(&n.frame(None), born, seq).await;
                    delivered = true;
                }
            }
        }
        if delivered && !matches!(target, Target::Broadcast) {
            // The recipients' tasks were just woken on this thread (tokio runs the last one
            // woken next, and no other thread may take it): let them write now rather than
            // after the caller has routed its next messages (see BENCHMARKS.md: the delivery
            // latency's tail at a steady unicast rate).
            tokio::task::yield_now().await;
        }
        if delivered {
            Outcome::Delivered
        } else {
            Outcome::NoRecipient
        }
    }

    /// Delivers a frame for `user` if it has connections here: straight into their mailboxes
    /// when nothing is queued for its shard, else through the shard's queue (waiting only if
    /// that is full). Returns whether the user is connected.
    async fn to_user(&self, user: &str, n: &Notification, born: u32, seq: u64) -> bool {
        let idx = self.shard_of(user);
        let shard = &self.shards[idx];
        let frame = {
            let st = shard.state.lock();
            let Some(&head) = st.users.get(user) else {
                return false;
            };
            let frame = n.frame(Some(user));
            if shard.queued.load(Ordering::Acquire) == 0 {
                let charge = self.push_to_user(&st, head, frame.wire(), born, seq);
                drop(st);
                self.charge(idx, charge);
                return true;
            }
            frame
        };
        let d = Delivery::User {
            user: user.into(),
            frame: frame.wire().clone(),
            born,
            seq,
        };
        self.enqueue(shard, d).await;
        true
    }

    /// Pushes `frame` to every connection in the user list starting at `head`; returns what
    /// that costs the budget.
    fn push_to_user(
        &self,
        st: &ShardState,
        head: u32,
        frame: &Bytes,
        born: u32,
        seq: u64,
    ) -> usize {
        let mut key = head;
        let mut charge = 0;
        while key != NIL {
            let e = &st.conns[key as usize];
            if seq > e.covered {
                charge += e.mailbox.push(frame, born, self.queue_limit, Sharing::Own);
            }
            key = e.next;
        }
        charge
    }

    /// Hands `frame` to every shard.
    async fn broadcast(&self, frame: &Frame, born: u32, seq: u64) {
        for shard in self.shards.iter() {
            let d = Delivery::Broadcast {
                frame: frame.wire().clone(),
                born,
                seq,
            };
            self.enqueue(shard, d).await;
        }
    }

    /// Sends `d` to the shard's task, waiting only if its queue is full.
    async fn enqueue(&self, shard: &Shard, d: Delivery) {
        shard.queued.fetch_add(1, Ordering::AcqRel);
        // The receiver lives as long as the registry's tasks; a send error means the runtime
        // is shutting down, when dropping the frame is all that is left to do.
        if shard.tx.send(d).await.is_err() {
            shard.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Resolves once everything handed to the shards so far sits in connection mailboxes.
    pub async fn flush(&self) {
        let mut waits = Vec::with_capacity(SHARDS);
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            self.enqueue(shard, Delivery::Barrier(tx)).await;
            waits.push(rx);
        }
        for rx in waits {
            let _ = rx.await;
        }
    }

    /// Tells every connection to flush and close with 1001, and refuses new ones.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::Release);
        self.for_each(|e| e.mailbox.signal(signal::SHUTDOWN));
    }

    fn for_each(&self, mut f: impl FnMut(&Entry)) {
        for shard in self.shards.iter() {
            let st = shard.state.lock();
            for (_, e) in st.conns.iter() {
                f(e);
            }
        }
    }

    /// Advances the keepalive clock and tells each connection to ping, or to close if its peer
    /// has been silent for two intervals or its token has expired.
    ///
    /// One sweep for all connections replaces a timer per connection: 20,000 idle sockets do
    /// not each carry a timer entry in their task.
    pub fn keepalive_sweep(&self, now_unix: u64) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        self.for_each(|e| {
            let seen = e.mailbox.last_seen();
            if tick.wrapping_sub(seen) > 2 {
                e.mailbox.signal(signal::DEAD);
            } else if e.mailbox.expires_at() <= now_unix {
                e.mailbox.signal(signal::EXPIRED);
            } else {
                e.mailbox.signal(signal::PING);
            }
        });
    }

    /// Runs [`Registry::keepalive_sweep`] every `interval` until shutdown.
    pub async fn run_keepalive(self: Arc<Self>, interval: Duration, mut shutdown: Shutdown) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => self.keepalive_sweep(unix_now()),
                _ = shutdown.recv() => return,
            }
        }
    }
}

/// Closes the connections with the largest queues while the queue budget is exceeded: woken
/// by [`Registry::charge`], at most one scan per [`BUDGET_RECHECK`], and scanning again after
/// that as long as the budget is still exceeded (a scan's estimate can fall short when the
/// connections it told are slow to drop their queues).
async fn enforce_budget(registry: Arc<Registry>) {
    let mut logged: Option<Instant> = None;
    loop {
        registry.over_budget.notified().await;
        loop {
            let used = registry.queued_bytes();
            let cut = registry.cut_largest();
            if cut > 0 && logged.is_none_or(|t| t.elapsed() >= BUDGET_LOG_EVERY) {
                logged = Some(Instant::now());
                warn!(
                    queued_bytes = used,
                    budget = registry.budget,
                    closed = cut,
                    "client queue budget (CLIENT_QUEUE_BUDGET_BYTES) exhausted: closing the connections with the most bytes queued (1013)"
                );
            }
            tokio::time::sleep(BUDGET_RECHECK).await;
            if cut == 0 || registry.queued_bytes() as isize <= registry.budget {
                break;
            }
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A shard's dispatch task: takes deliveries in batches and pushes them to mailboxes under one
/// lock acquisition per batch.
async fn dispatch(registry: Arc<Registry>, idx: usize, mut rx: mpsc::Receiver<Delivery>) {
    let mut batch = Vec::with_capacity(SHARD_BATCH);
    let limit = registry.queue_limit;
    let shard = &registry.shards[idx];
    while rx.recv_many(&mut batch, SHARD_BATCH).await > 0 {
        let mut barriers = Vec::new();
        let mut charge = 0;
        {
            let st = shard.state.lock();
            let n = batch.len();
            for d in batch.drain(..) {
                match d {
                    Delivery::User {
                        user,
                        frame,
                        born,
                        seq,
                    } => {
                        if let Some(&head) = st.users.get(&*user) {
                            charge += registry.push_to_user(&st, head, &frame, born, seq);
                        }
                    }
                    Delivery::Broadcast { frame, born, seq } => {
                        for (_, e) in st.conns.iter() {
                            if seq > e.covered {
                                charge += e.mailbox.push(&frame, born, limit, Sharing::Shared);
                            }
                        }
                    }
                    Delivery::Barrier(done) => barriers.push(done),
                }
            }
            shard.queued.fetch_sub(n, Ordering::AcqRel);
        }
        registry.charge(idx, charge);
        for done in barriers {
            let _ = done.send(());
        }
        if batch.capacity() > SHARD_BATCH * 4 {
            batch.shrink_to(SHARD_BATCH);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::SLOT_BYTES;

    fn notification(target: Target<'static>, data: &[u8]) -> Notification {
        let mut tail = br#","timestamp":"2026-11-26T10:00:00.000Z","data":"#.to_vec();
        tail.extend_from_slice(data);
        tail.push(b'}');
        Notification {
            id: "id".into(),
            target,
            head: bytes::Bytes::from_static(br#"{"id":"id","type":"m""#),
            tail: tail.into(),
            fingerprint: [0; 16],
            redelivered: false,
            taken_ms: 0,
        }
    }

    #[tokio::test]
    async fn routes_to_mailboxes_and_times_the_delivery() {
        let registry = Registry::start(1 << 20);
        let handles: Vec<_> = (0..100)
            .map(|i| {
                let h = Arc::new(Mailbox::new(None));
                let key = registry
                    .register(Arc::from(format!("u{}", i % 50)), h.clone())
                    .expect("open");
                (h, key)
            })
            .collect();
        let user = notification(Target::User("u7".into()), b"null");
        assert_eq!(registry.route(&user, 1).await, Outcome::Delivered);
        assert_eq!(
            registry
                .route(&notification(Target::Broadcast, b"null"), 2)
                .await,
            Outcome::Delivered
        );
        registry.flush().await;
        for (i, (h, key)) in handles.iter().enumerate() {
            let taken = h.take_frames().expect("frames queued");
            let want = if i % 50 == 7 { 2 } else { 1 };
            assert_eq!(taken.frames.len(), want, "connection {i}");
            registry.record_delivery(*key, taken.born);
        }
        let mut text = String::new();
        let metrics = crate::metrics::Metrics::default();
        let snapshot = crate::metrics::Snapshot {
            connections: 100,
            max_connections: 100,
            users: 50,
            sockets: 100,
            ready: true,
            history: Default::default(),
            queued_bytes: 0,
            latency: registry.latency(),
        };
        text.push_str(&metrics.render(&snapshot));
        assert!(text.contains("wsnotify_delivery_latency_seconds_count 100\n"));
    }

    #[tokio::test]
    async fn user_frames_skip_the_shard_queue_only_when_it_is_empty() {
        let registry = Registry::start(1 << 20);
        let h = Arc::new(Mailbox::new(None));
        registry.register(Arc::from("u"), h.clone()).expect("open");
        let one = notification(Target::User("u".into()), b"1");
        let two = notification(Target::User("u".into()), b"2");
        // Nothing queued: the frame is in the mailbox as soon as route returns.
        registry.route(&one, 1).await;
        assert_eq!(h.take_frames().expect("queued").frames.len(), 1);
        // A broadcast still queued for the shard: the user's frame queues behind it.
        registry
            .route(&notification(Target::Broadcast, b"1"), 2)
            .await;
        registry.route(&two, 3).await;
        registry.flush().await;
        let out = h.take_frames().expect("queued").frames;
        let data: Vec<bool> = out.iter().map(|f| f.ends_with(b"\"data\":1}")).collect();
        assert_eq!(
            data,
            [true, false],
            "broadcast first, then the user's frame"
        );
        assert_eq!(
            registry
                .route(&notification(Target::User("nobody".into()), b"1"), 4)
                .await,
            Outcome::NoRecipient
        );
    }

    #[tokio::test]
    async fn a_recovering_connection_skips_what_its_replay_holds() {
        let registry = Registry::start(1 << 20);
        let h = Arc::new(Mailbox::new(None));
        let key = registry
            .register_recovering(Arc::from("u"), h.clone(), 5)
            .expect("open");
        for seq in [4, 5, 6] {
            registry
                .route(&notification(Target::User("u".into()), b"1"), seq)
                .await;
        }
        registry
            .route(&notification(Target::Broadcast, b"2"), 7)
            .await;
        registry.flush().await;
        registry.prepend(key, &h, vec![bytes::Bytes::from_static(b"replay")]);
        let out = h.take_frames().expect("queued").frames;
        assert_eq!(out.len(), 3, "the replay, then 6 and 7");
        assert_eq!(&out[0][..], b"replay");
    }

    #[tokio::test]
    async fn per_user_limit() {
        let registry = Registry::start_with(Limits {
            client_queue: 1 << 20,
            budget: usize::MAX,
            per_user: 2,
        });
        let reg = |u: &str| registry.register(Arc::from(u), Arc::new(Mailbox::new(None)));
        let first = reg("u").expect("first");
        reg("u").expect("second");
        assert_eq!(reg("u").err(), Some(Refused::UserLimit));
        reg("v").expect("another user is not affected");
        registry.unregister(first);
        reg("u").expect("a freed slot is reused");
    }

    #[tokio::test]
    async fn the_budget_counts_memory_and_cuts_the_largest_queues_first() {
        let registry = Registry::start_with(Limits {
            client_queue: 1 << 20,
            budget: 900_000,
            per_user: 0,
        });
        let handles: Vec<_> = ["big", "small", "idle"]
            .iter()
            .map(|u| {
                let h = Arc::new(Mailbox::new(None));
                let key = registry.register(Arc::from(*u), h.clone()).expect("open");
                (h, key)
            })
            .collect();
        let data = vec![b'1'; 100_000];
        let to = |target| notification(target, &data);
        let len = |u| to(Target::Broadcast).frame(Some(u)).wire().len() + SLOT_BYTES;
        // A broadcast costs a slot per connection, not its length.
        registry.route(&to(Target::Broadcast), 1).await;
        registry.flush().await;
        assert_eq!(registry.queued_bytes(), 3 * SLOT_BYTES);
        // Frames for one user cost their length: 8 + 2 of them take the total over budget.
        for seq in 2..10 {
            registry.route(&to(Target::User("big".into())), seq).await;
        }
        for seq in 10..12 {
            registry.route(&to(Target::User("small".into())), seq).await;
        }
        registry.flush().await;
        assert_eq!(
            registry.queued_bytes(),
            3 * SLOT_BYTES + 8 * len("big") + 2 * len("small")
        );
        registry.cut_largest();
        let sig: Vec<u8> = handles.iter().map(|(h, _)| h.take_signals()).collect();
        assert_eq!(
            sig.iter()
                .map(|s| s & signal::BUDGET != 0)
                .collect::<Vec<_>>(),
            [true, false, false],
            "freeing `big` is enough to get back under 7/8 of the budget"
        );
        // Taking frames hands their charge to the taker; giving it back empties the count.
        for (h, key) in &handles {
            let taken = h.take_frames().expect("queued");
            registry.release(*key, h, taken.charge);
        }
        assert_eq!(registry.queued_bytes(), 0);
    }
}
