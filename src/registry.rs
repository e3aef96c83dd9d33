//! Who is connected, and the route from a frame to their sockets.
//!
//! After centrifuge's `hub.go`: a fixed array of shards keyed by a hash of the user id, each a
//! lock over a slab of connection handles plus a `user → connections` index. Connecting and
//! disconnecting touch one shard. The index is intrusive — each slab entry links to the next
//! connection of the same user — so a user costs one map entry and no extra allocation.
//!
//! Frames reach the shards over bounded channels, one per shard, each drained by its own task:
//! the consumer never takes a shard lock, a broadcast is spread over every core, and a user's
//! frames all travel one FIFO, which keeps them in publish order. A shard task takes its lock
//! once per batch of deliveries and pushes clones of the same [`Bytes`] into each connection's
//! [`Handle`] mailbox; the connection's own task does the socket write.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use slab::Slab;
use tokio::sync::{mpsc, oneshot};

use crate::envelope::Target;
use crate::frame::{Frame, FrameBuilder};
use crate::shutdown::Shutdown;

/// Shard count: a power of two well above the core count, so connect/disconnect and fan-out
/// rarely meet on one lock.
pub const SHARDS: usize = 64;
/// Deliveries buffered per shard before the consumer waits (backpressure to the broker).
const SHARD_QUEUE: usize = 1024;
/// Deliveries a shard task handles per lock acquisition.
const SHARD_BATCH: usize = 64;
const NIL: u32 = u32::MAX;

/// Signals from the registry to a connection's task (bits of [`Handle::signals`]).
pub mod signal {
    /// Time to send a ping.
    pub const PING: u8 = 1;
    /// The gateway is shutting down: flush, then close with 1001.
    pub const SHUTDOWN: u8 = 2;
    /// The outbound queue overflowed: close with 1013.
    pub const OVERFLOW: u8 = 4;
    /// No frame from the peer for two ping intervals: drop the socket.
    pub const DEAD: u8 = 8;
    /// The token's `exp` has passed: close with 1008.
    pub const EXPIRED: u8 = 16;
}

/// The part of a connection the rest of the gateway can reach: its mailbox and its waker.
///
/// Kept small because there is one per socket: the mailbox is an empty `VecDeque` (no heap)
/// until a frame arrives, and the connection swaps it out whole when it writes.
#[derive(Debug)]
pub struct Handle {
    mailbox: Mutex<VecDeque<Bytes>>,
    /// Bytes pushed and not yet written to the socket (mailbox + the connection's own queue).
    queued: AtomicUsize,
    waker: AtomicWaker,
    signals: AtomicU8,
    /// Keepalive clock tick at which the peer was last heard from.
    last_seen: AtomicU32,
    /// Unix seconds at which the credentials expire (`u64::MAX`: never).
    expires_at: u64,
}

impl Handle {
    pub fn new(expires_at: Option<u64>) -> Self {
        Self {
            mailbox: Mutex::new(VecDeque::new()),
            queued: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
            signals: AtomicU8::new(0),
            last_seen: AtomicU32::new(0),
            expires_at: expires_at.unwrap_or(u64::MAX),
        }
    }

    /// Queues a frame, unless that would take the queue over `limit` bytes: then the
    /// connection is told to close with 1013 and the frame is dropped for it alone.
    fn push(&self, frame: &Bytes, limit: usize) -> bool {
        let len = frame.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > limit {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.signal(signal::OVERFLOW);
            return false;
        }
        let was_empty = {
            let mut mb = self.mailbox.lock();
            let was_empty = mb.is_empty();
            mb.push_back(frame.clone());
            was_empty
        };
        // The task takes the whole mailbox each time it runs, so only the first frame after
        // that needs to wake it: a burst costs one wake-up, not one per frame.
        if was_empty {
            self.waker.wake();
        }
        true
    }

    pub fn signal(&self, bits: u8) {
        self.signals.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Takes the pending signals.
    pub fn take_signals(&self) -> u8 {
        self.signals.swap(0, Ordering::AcqRel)
    }

    pub fn register_waker(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    /// Moves every queued frame into `out` (a swap when `out` is empty: no copying).
    pub fn drain_into(&self, out: &mut VecDeque<Bytes>) {
        let mut mb = self.mailbox.lock();
        if mb.is_empty() {
            return;
        }
        if out.is_empty() {
            std::mem::swap(&mut *mb, out);
        } else {
            out.extend(mb.drain(..));
            *mb = VecDeque::new();
        }
    }

    /// Drops everything queued (slow consumer being closed).
    pub fn discard_queued(&self, out: &mut VecDeque<Bytes>) {
        *self.mailbox.lock() = VecDeque::new();
        *out = VecDeque::new();
        self.queued.store(0, Ordering::Release);
    }

    /// Records `bytes` as written to the socket.
    pub fn written(&self, bytes: usize) {
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn seen(&self, tick: u32) {
        self.last_seen.store(tick, Ordering::Relaxed);
    }
}

/// What a shard task is asked to do.
#[derive(Debug)]
enum Delivery {
    User {
        user: Box<str>,
        frame: Bytes,
    },
    Broadcast(Bytes),
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
    handle: Arc<Handle>,
    user: Arc<str>,
    prev: u32,
    next: u32,
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
}

/// All connections, sharded.
pub struct Registry {
    shards: Box<[Shard]>,
    hasher: std::hash::RandomState,
    connections: AtomicUsize,
    users: AtomicUsize,
    closing: AtomicBool,
    /// Keepalive clock: one tick per ping interval.
    tick: AtomicU32,
    queue_limit: usize,
    /// Connections whose mailbox overflowed since start (for tests and metrics).
    pub overflows: AtomicU64,
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
pub struct Closing;

impl Registry {
    /// Builds the registry and starts one dispatch task per shard. Must run inside a tokio
    /// runtime.
    pub fn start(queue_limit: usize) -> Arc<Registry> {
        let mut shards = Vec::with_capacity(SHARDS);
        let mut receivers = Vec::with_capacity(SHARDS);
        for _ in 0..SHARDS {
            let (tx, rx) = mpsc::channel(SHARD_QUEUE);
            shards.push(Shard {
                state: Mutex::new(ShardState::default()),
                tx,
            });
            receivers.push(rx);
        }
        let registry = Arc::new(Registry {
            shards: shards.into_boxed_slice(),
            hasher: std::hash::RandomState::new(),
            connections: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            tick: AtomicU32::new(0),
            queue_limit,
            overflows: AtomicU64::new(0),
        });
        for (i, rx) in receivers.into_iter().enumerate() {
            tokio::spawn(dispatch(registry.clone(), i, rx));
        }
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

    /// Current keepalive tick.
    pub fn tick(&self) -> u32 {
        self.tick.load(Ordering::Relaxed)
    }

    /// Adds a connection for `user`. Refused once shutdown has begun, so a handshake that
    /// finishes during shutdown cannot slip past [`Registry::close_all`].
    pub fn register(&self, user: Arc<str>, handle: Arc<Handle>) -> Result<ConnKey, Closing> {
        let shard_idx = self.shard_of(&user);
        let mut st = self.shards[shard_idx].state.lock();
        if self.closing.load(Ordering::Acquire) {
            return Err(Closing);
        }
        handle.seen(self.tick());
        let head = st.users.get(&*user).copied();
        let key = st.conns.insert(Entry {
            handle,
            user: user.clone(),
            prev: NIL,
            next: head.unwrap_or(NIL),
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

    /// True if `user` has a connection here now.
    pub fn is_connected(&self, user: &str) -> bool {
        self.shards[self.shard_of(user)]
            .state
            .lock()
            .users
            .contains_key(user)
    }

    /// Encodes a message for its recipients and hands the frames to the shards: one frame per
    /// target user (shared by all of that user's connections), one for a broadcast. Users who
    /// are not connected cost nothing: no frame is built for them.
    pub async fn route(&self, target: &Target<'_>, msg: &FrameBuilder<'_>) -> Outcome {
        let mut delivered = false;
        match target {
            Target::User(user) => {
                if self.is_connected(user) {
                    self.send_to_user(user, &msg.build(Some(user))).await;
                    delivered = true;
                }
            }
            Target::Users(users) => {
                for user in users {
                    if self.is_connected(user) {
                        self.send_to_user(user, &msg.build(Some(user))).await;
                        delivered = true;
                    }
                }
            }
            Target::Broadcast => {
                if self.connections() > 0 {
                    self.broadcast(&msg.build(None)).await;
                    delivered = true;
                }
            }
        }
        if delivered {
            Outcome::Delivered
        } else {
            Outcome::NoRecipient
        }
    }

    /// Hands `frame` to the shard that holds `user`. Waits only if that shard is backed up.
    pub async fn send_to_user(&self, user: &str, frame: &Frame) {
        let shard = &self.shards[self.shard_of(user)];
        let d = Delivery::User {
            user: user.into(),
            frame: frame.wire().clone(),
        };
        // The receiver lives as long as the registry's tasks; a send error means the runtime
        // is shutting down, when dropping the frame is all that is left to do.
        let _ = shard.tx.send(d).await;
    }

    /// Hands `frame` to every shard.
    pub async fn broadcast(&self, frame: &Frame) {
        for shard in self.shards.iter() {
            let _ = shard
                .tx
                .send(Delivery::Broadcast(frame.wire().clone()))
                .await;
        }
    }

    /// Resolves once everything handed to the shards so far sits in connection mailboxes.
    pub async fn flush(&self) {
        let mut waits = Vec::with_capacity(SHARDS);
        for shard in self.shards.iter() {
            let (tx, rx) = oneshot::channel();
            if shard.tx.send(Delivery::Barrier(tx)).await.is_ok() {
                waits.push(rx);
            }
        }
        for rx in waits {
            let _ = rx.await;
        }
    }

    /// Tells every connection to flush and close with 1001, and refuses new ones.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::Release);
        self.for_each(|e| e.handle.signal(signal::SHUTDOWN));
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
            let seen = e.handle.last_seen.load(Ordering::Relaxed);
            if tick.wrapping_sub(seen) > 2 {
                e.handle.signal(signal::DEAD);
            } else if e.handle.expires_at <= now_unix {
                e.handle.signal(signal::EXPIRED);
            } else {
                e.handle.signal(signal::PING);
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
    while rx.recv_many(&mut batch, SHARD_BATCH).await > 0 {
        let mut barriers = Vec::new();
        {
            let st = registry.shards[idx].state.lock();
            for d in batch.drain(..) {
                match d {
                    Delivery::User { user, frame } => {
                        let mut key = st.users.get(&*user).copied().unwrap_or(NIL);
                        while key != NIL {
                            let e = &st.conns[key as usize];
                            if !e.handle.push(&frame, limit) {
                                registry.overflows.fetch_add(1, Ordering::Relaxed);
                            }
                            key = e.next;
                        }
                    }
                    Delivery::Broadcast(frame) => {
                        for (_, e) in st.conns.iter() {
                            if !e.handle.push(&frame, limit) {
                                registry.overflows.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Delivery::Barrier(done) => barriers.push(done),
                }
            }
        }
        for done in barriers {
            let _ = done.send(());
        }
        if batch.capacity() > SHARD_BATCH * 4 {
            batch.shrink_to(SHARD_BATCH);
        }
    }
}
