//! A connection's mailbox: the part of a connection the rest of the gateway can reach. The
//! registry pushes frames into it and raises signals (ping, shutdown, overflow, queue budget,
//! dead peer, expired token); the connection's own task takes the frames, writes them and
//! acts on the signals. There is one per socket, so it is kept small (96 bytes; a test says
//! so): the queue is an empty `VecDeque` (no heap) until a frame arrives.
//!
//! This module must not know how frames are routed or written: the registry decides who gets
//! a frame, the connection how it reaches the socket.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

/// `Mailbox::queued` of a connection that is closing: above any `CLIENT_QUEUE_BYTES`, so every
/// push is refused without a word (its close frame is queued; nothing may follow it).
const CLOSED: u32 = 1 << 31;
/// What one queued frame costs the queue budget besides its bytes: its slot in a queue.
pub const SLOT_BYTES: usize = std::mem::size_of::<Bytes>();

/// Signals from the registry to a connection's task (bits of a mailbox's signal word).
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
    /// The global queue budget ran out and this connection holds one of the largest queues:
    /// close with 1013.
    pub const BUDGET: u8 = 32;
}

/// The part of a connection the rest of the gateway can reach: its mailbox and its waker.
///
/// Kept small because there is one per socket: the mailbox is an empty `VecDeque` (no heap)
/// until a frame arrives, and the connection swaps it out whole when it writes.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    /// Bytes pushed and not yet written to the socket (mailbox + the connection's own queue),
    /// held to `CLIENT_QUEUE_BYTES` (at most 1 GiB, so 32 bits hold it and a frame on top).
    queued: AtomicU32,
    /// What the frames the connection has taken from its mailbox, and not yet written or
    /// dropped, cost the queue budget ([`Sharing`]); with the mailbox's own `charge`, it
    /// ranks connections when the budget runs out. Updated by the connection when it takes
    /// frames and gives their charge back, so a push costs no extra atomic. The two counters
    /// take the room of one `usize`: the mailbox stays 96 bytes.
    held: AtomicU32,
    waker: AtomicWaker,
    signals: AtomicU8,
    /// Keepalive clock tick at which the peer was last heard from.
    last_seen: AtomicU32,
    /// Unix seconds at which the credentials expire (`u64::MAX`: never).
    expires_at: u64,
}

/// Frames waiting for the connection's task, and when the oldest of them entered routing
/// ([`Registry::stamp`](crate::registry::Registry::stamp)), for the delivery-latency histogram.
///
/// [`Registry::stamp`](crate::registry::Registry::stamp): crate::registry::Registry::stamp
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    since: u32,
    /// What `frames` cost the queue budget (fits in what would be padding: the mailbox stays
    /// 96 bytes). At most `CLIENT_QUEUE_BYTES` plus a slot per frame, so a `u32` holds it
    /// (the configuration caps `CLIENT_QUEUE_BYTES` at 1 GiB).
    charge: u32,
}

/// Frames taken from a mailbox by [`Mailbox::take_frames`].
#[derive(Debug)]
pub struct Taken {
    pub frames: VecDeque<Bytes>,
    /// When the oldest of them entered routing ([`Registry::stamp`](crate::registry::Registry::stamp)).
    pub born: u32,
    /// What they cost the queue budget: the taker gives it back ([`Registry::release`](crate::registry::Registry::release)) as
    /// they are written or dropped.
    pub charge: usize,
}

/// Whether a frame's memory is shared by every connection it is queued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// A broadcast: one allocation for all recipients; a queued copy costs a slot.
    Shared,
    /// One user's frame: costs its length as well (counted for each of the user's
    /// connections, which overstates it when the user has several).
    Own,
}

impl Sharing {
    /// What queuing a frame of `len` bytes costs the budget.
    fn charge(self, len: usize) -> usize {
        match self {
            Sharing::Shared => SLOT_BYTES,
            Sharing::Own => SLOT_BYTES + len,
        }
    }
}

impl Mailbox {
    pub fn new(expires_at: Option<u64>) -> Self {
        Self {
            queue: Mutex::new(Queue::default()),
            queued: AtomicU32::new(0),
            held: AtomicU32::new(0),
            waker: AtomicWaker::new(),
            signals: AtomicU8::new(0),
            last_seen: AtomicU32::new(0),
            expires_at: expires_at.unwrap_or(u64::MAX),
        }
    }

    /// Queues a frame that entered routing at `born` ([`Registry::stamp`](crate::registry::Registry::stamp)), unless that would
    /// take the queue over `limit` bytes: then the connection is told to close with 1013 and
    /// the frame is dropped for it alone. Returns what the frame costs the queue budget (0 if
    /// dropped), for the caller to add to [`Registry::charge`](crate::registry::Registry::charge) once per batch.
    pub(crate) fn push(&self, frame: &Bytes, born: u32, limit: usize, sharing: Sharing) -> usize {
        let len = frame.len();
        let len32 = len as u32;
        let before = self.queued.fetch_add(len32, Ordering::AcqRel);
        if before as usize + len > limit {
            self.queued.fetch_sub(len32, Ordering::AcqRel);
            if before < CLOSED {
                self.signal(signal::OVERFLOW);
            }
            return 0;
        }
        let charge = sharing.charge(len);
        let was_empty = {
            let mut mb = self.queue.lock();
            let was_empty = mb.frames.is_empty();
            if was_empty {
                mb.since = born;
            }
            mb.frames.push_back(frame.clone());
            mb.charge = mb.charge.saturating_add(charge as u32);
            was_empty
        };
        // The task takes the whole mailbox whenever its socket has taken everything before,
        // so only the first frame after that needs to wake it: a burst costs one wake-up, not
        // one per frame, and a client that stopped reading costs none.
        if was_empty {
            self.waker.wake();
        }
        charge
    }

    /// Puts `frames` in front of whatever live frames are already queued; returns what they
    /// cost the queue budget. See [`Registry::prepend`](crate::registry::Registry::prepend).
    pub(crate) fn prepend(&self, frames: Vec<Bytes>, born: u32) -> usize {
        let len: usize = frames.iter().map(Bytes::len).sum();
        let charge: usize = frames.iter().map(|f| Sharing::Own.charge(f.len())).sum();
        self.queued
            .fetch_add(u32::try_from(len).unwrap_or(u32::MAX), Ordering::AcqRel);
        {
            let mut mb = self.queue.lock();
            for f in frames.into_iter().rev() {
                mb.frames.push_front(f);
            }
            mb.since = born;
            mb.charge = mb
                .charge
                .saturating_add(u32::try_from(charge).unwrap_or(u32::MAX));
        }
        self.waker.wake();
        charge
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

    /// Takes every queued frame (the queue itself, no copying); `None` if there are none.
    pub fn take_frames(&self) -> Option<Taken> {
        let mut mb = self.queue.lock();
        if mb.frames.is_empty() {
            return None;
        }
        let charge = std::mem::take(&mut mb.charge);
        self.held.fetch_add(charge, Ordering::Relaxed);
        Some(Taken {
            frames: std::mem::take(&mut mb.frames),
            born: mb.since,
            charge: charge as usize,
        })
    }

    /// The connection is closing: drops everything in the mailbox, and refuses every frame
    /// from now on (they could not follow its close frame, and they would count against the
    /// budget while the peer takes its time to answer). Returns the dropped frames' charge
    /// for [`Registry::release`](crate::registry::Registry::release).
    pub fn discard_queued(&self) -> usize {
        self.queued.store(CLOSED, Ordering::Release);
        let mut mb = self.queue.lock();
        mb.frames = VecDeque::new();
        let charge = std::mem::take(&mut mb.charge);
        // Counted as taken, so that one `Registry::release` gives back all of it.
        self.held.fetch_add(charge, Ordering::Relaxed);
        charge as usize
    }

    /// What this connection's queue costs the budget now.
    pub(crate) fn charge(&self) -> usize {
        let in_mailbox = self.queue.lock().charge;
        (self.held.load(Ordering::Relaxed) as usize) + in_mailbox as usize
    }

    /// Records `bytes` as written to the socket.
    pub fn written(&self, bytes: usize) {
        self.queued.fetch_sub(bytes as u32, Ordering::AcqRel);
    }

    /// The peer was heard from in keepalive round `round`.
    pub fn seen(&self, round: u32) {
        self.last_seen.store(round, Ordering::Relaxed);
    }

    /// The keepalive round the peer was last heard from in.
    pub(crate) fn last_seen(&self) -> u32 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Unix seconds at which the credentials expire (`u64::MAX`: never).
    pub(crate) fn expires_at(&self) -> u64 {
        self.expires_at
    }

    /// Gives back `bytes` of charge taken with frames ([`Taken::charge`]).
    pub(crate) fn release(&self, bytes: usize) {
        self.held.fetch_sub(bytes as u32, Ordering::Relaxed);
    }
}
