//! Graceful shutdown, after mini-redis: one broadcast of "stop", and a way to learn when the
//! last connection is gone.
//!
//! Established WebSocket connections do not each hold a broadcast receiver: at 20,000 idle
//! sockets that would be 20,000 parked waiters. The registry already reaches every connection,
//! so "stop" is delivered to them through it ([`crate::registry::Registry::close_all`]), and
//! the [`Tracker`] counts sockets so shutdown can wait for zero.
//!
//! This module must not know what is being shut down: the gateway fires the trigger, tasks
//! listen, and the tracker counts sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// Listens for the shutdown signal. Cheap to clone; used by the accept loop, handshakes and
/// background tasks.
#[derive(Clone, Debug)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// Sends the shutdown signal.
#[derive(Debug)]
pub struct Trigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }
}

impl Shutdown {
    pub fn is_shutdown(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has been signalled (at once if it already was).
    pub async fn recv(&mut self) {
        // An error means the trigger is gone, which only happens when the process is ending.
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

/// Counts open sockets: the `MAX_CONNECTIONS` budget and the "last handler gone" signal in one.
#[derive(Debug, Default)]
pub struct Tracker {
    open: AtomicUsize,
    idle: Notify,
}

/// Held by each accepted socket for its whole life; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    tracker: Arc<Tracker>,
}

impl Tracker {
    /// Takes a slot unless `max` are already taken.
    pub fn try_acquire(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let mut cur = self.open.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Slot {
                        tracker: self.clone(),
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Waits until no slot is held.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}
