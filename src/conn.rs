//! One upgraded WebSocket connection, driven by a hand-written future.
//!
//! Density and fan-out both hinge on what an idle socket holds and how a busy one writes, so
//! this is the one place the gateway does not use a ready-made WebSocket stream:
//!
//! * **Reading** goes through tungstenite's codec (masking, fragmentation, control frames,
//!   size limits, UTF-8, the close handshake) — but an idle socket holds none of it. Bytes are
//!   read into a per-thread scratch buffer; complete frames are handed to a `Reader` (`conn/read.rs`) (the
//!   codec and its protocol state) that exists only while the peer is mid-frame, mid-message
//!   or closing, and is freed as soon as its state is back to "nothing pending". Pongs, the only
//!   thing a healthy idle client sends, are recognised without it.
//! * **Writing** notification frames bypasses the codec: a [`Frame`](crate::frame::Frame) is
//!   already complete wire bytes, shared by every recipient, so the task moves its mailbox
//!   into a local queue and hands the frames to one `writev(2)` — no copy, no per-connection
//!   write buffer, one syscall per burst. The queue, with everything else a write needs, lives
//!   in an `Outgoing` (`conn/write.rs`) box that exists only while something waits for the socket.
//! * Control frames (our pings, tungstenite's pongs and close frames) go to a small side
//!   buffer that is written only between whole data frames, so the two never interleave.
//! * No `split()`, no channel and no timer per connection: the [`Mailbox`] the registry pushes into carries
//!   the mailbox, the waker and signals (ping, shutdown, overflow, queue budget, dead peer,
//!   expired token). The one timer is the close deadline (`CLOSE_TIMEOUT_MS`), and it lives in
//!   the `Reader` (`conn/read.rs`), which exists while a close handshake is under way.
//!
//! This module must not know how a frame was routed or who else receives it: it drains its
//! [`Mailbox`], answers the registry's signals and reports what it wrote.

mod read;
mod write;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::net::TcpStream;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::frame::PING;
use crate::mailbox::{Mailbox, signal};
use crate::metrics::Metrics;
use crate::registry::{ConnKey, Registry};
use crate::shutdown::Slot;
use read::{ReadEnd, Reader};
use write::{Socket, Written};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Shutting down: write what is queued, then close with 1001.
    Draining,
    /// Our close frame is queued; wait for the peer's reply (or, if `read` is false, only
    /// for the close frame to be written).
    Closing {
        read: bool,
    },
}

/// A registered connection. Completes when the socket is done; dropping it unregisters.
pub struct Conn {
    wire: Socket,
    /// tungstenite, only while the peer has something in progress (see `Reader` (`conn/read.rs`)).
    reader: Option<Box<Reader>>,
    mailbox: Arc<Mailbox>,
    key: ConnKey,
    ctx: Arc<ConnContext>,
    phase: Phase,
    _slot: Slot,
}

/// tungstenite settings for server-side sockets.
///
/// The default config keeps a 128 KiB read buffer per socket (~130 KB RSS per idle
/// connection); clients of a push gateway send only pongs and close frames, so a few hundred
/// bytes suffice. Here the read buffer size is also how much one read takes from the socket,
/// and the codec (with its buffer) only exists while the peer is mid-frame (see `Reader` (`conn/read.rs`)).
/// tungstenite never buffers notification frames (see the module docs); its own write buffer
/// only ever holds a control frame.
pub fn ws_config(read_buffer: usize, max_client_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(max_client_frame))
        .max_frame_size(Some(max_client_frame))
        .accept_unmasked_frames(false)
}

/// What every connection needs from the rest of the gateway, and nothing more.
pub struct ConnContext {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub ws_config: WebSocketConfig,
    /// How long a peer has to answer our close frame (`CLOSE_TIMEOUT_MS`).
    pub close_timeout: std::time::Duration,
}

impl Conn {
    /// Wraps an upgraded socket. `rest` is whatever the client sent after its request head.
    pub fn new(
        sock: TcpStream,
        rest: Vec<u8>,
        mailbox: Arc<Mailbox>,
        key: ConnKey,
        ctx: Arc<ConnContext>,
        slot: Slot,
    ) -> Conn {
        let wire = Socket {
            sock,
            pending: None,
        };
        // Bytes the client sent right behind its request are scanned on the first poll.
        let reader = (!rest.is_empty()).then(|| Reader::with_rest(ctx.ws_config, rest));
        Conn {
            wire,
            reader,
            mailbox,
            key,
            ctx,
            phase: Phase::Open,
            _slot: slot,
        }
    }

    /// Closes with `code` once the frame being written (if any) is complete; queued frames
    /// are dropped. `read`: wait for the peer's close reply.
    fn begin_close(&mut self, code: CloseCode, reason: &'static str, read: bool) {
        if matches!(self.phase, Phase::Closing { .. }) {
            return;
        }
        let released = self.mailbox.discard_queued() + self.wire.drop_queued();
        self.ctx.registry.release(self.key, &self.mailbox, released);
        let reader = self
            .reader
            .get_or_insert_with(|| Reader::new(self.ctx.ws_config));
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        reader.close(frame, &mut self.wire.pending, self.ctx.close_timeout);
        self.phase = Phase::Closing { read };
        // The keepalive sweep is the second bound: it drops a connection silent for two ticks,
        // and from now on nothing the peer sends counts as a sign of life.
        let tick = self.ctx.registry.keepalive_tick();
        self.mailbox.seen(tick.wrapping_sub(1));
    }

    /// While closing: whether the peer's time to complete the close handshake is up (if not,
    /// the deadline's timer is armed to wake the task).
    fn close_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.phase, Phase::Closing { .. }) {
            return false;
        }
        self.reader.as_mut().is_some_and(|r| r.close_overdue(cx))
    }

    /// Ends a poll that found nothing more to do, unless the close deadline has passed: then
    /// the socket is reset and dropped (with it the slot and whatever is still queued).
    fn pending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.close_overdue(cx) {
            return Poll::Pending;
        }
        self.ctx
            .metrics
            .close_timeouts
            .fetch_add(1, Ordering::Relaxed);
        // RST rather than FIN: a peer that does not read would otherwise keep the socket and
        // its unsent bytes in the kernel until TCP gives up on it.
        let _ = self.wire.sock.set_zero_linger();
        Poll::Ready(())
    }

    /// Moves the mailbox's frames to the write queue — only once that is empty. While the
    /// socket is backed up, frames wait in the mailbox, where more pushes do not wake the task
    /// (a push wakes it only into an empty mailbox): a client that has stopped reading costs
    /// a push per frame, not a task poll and a failed write per frame. Returns whether frames
    /// were taken.
    fn take_frames(&mut self) -> bool {
        if self
            .wire
            .pending
            .as_ref()
            .is_some_and(|p| !p.out.is_empty())
        {
            return false;
        }
        let Some(taken) = self.mailbox.take_frames() else {
            return false;
        };
        let p = self.wire.pending();
        p.out = taken.frames;
        p.since = Some(taken.born);
        p.charge += taken.charge;
        true
    }

    /// Acts on registry signals. Returns true if the socket should be dropped at once.
    fn on_signals(&mut self, sig: u8) -> bool {
        if sig & signal::DEAD != 0 {
            self.ctx
                .metrics
                .dead_peer_closes
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if sig & (signal::OVERFLOW | signal::BUDGET) != 0
            && !matches!(self.phase, Phase::Closing { .. })
        {
            let m = &self.ctx.metrics;
            if sig & signal::OVERFLOW != 0 {
                m.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
                self.begin_close(CloseCode::Again, "client too slow", true);
            } else {
                m.queue_budget_closes.fetch_add(1, Ordering::Relaxed);
                self.begin_close(
                    CloseCode::Again,
                    "client too slow (server queues full)",
                    true,
                );
            }
        }
        if sig & signal::EXPIRED != 0 {
            self.ctx
                .metrics
                .token_expired_closes
                .fetch_add(1, Ordering::Relaxed);
            self.begin_close(CloseCode::Policy, "token expired", true);
        }
        if sig & signal::SHUTDOWN != 0 && self.phase == Phase::Open {
            self.phase = Phase::Draining;
        }
        if sig & signal::PING != 0 && matches!(self.phase, Phase::Open | Phase::Draining) {
            self.wire.pending().ctrl.extend_from_slice(PING);
        }
        false
    }
}

impl Conn {
    /// Takes the mailbox's frames for writing, or drops them if the connection is closing.
    /// Returns whether frames were left waiting in the mailbox for the write queue to empty.
    fn collect(&mut self) -> bool {
        match self.phase {
            Phase::Open | Phase::Draining => {
                !self.take_frames()
                    && self
                        .wire
                        .pending
                        .as_ref()
                        .is_some_and(|p| !p.out.is_empty())
            }
            Phase::Closing { .. } => {
                let charge = self.mailbox.discard_queued();
                self.ctx.registry.release(self.key, &self.mailbox, charge);
                false
            }
        }
    }

    /// One write pass, accounted for: frames and bytes sent, budget given back, delivery
    /// latency. `Ready(Ok)` once the socket took everything queued.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut done = Written::default();
        let res = self.wire.poll_write_out(cx, &mut done);
        self.ctx
            .registry
            .release(self.key, &self.mailbox, done.released);
        if done.frames > 0 {
            if matches!(self.phase, Phase::Open | Phase::Draining) {
                self.mailbox.written(done.bytes);
            }
            let m = &self.ctx.metrics;
            m.frames_sent.fetch_add(done.frames, Ordering::Relaxed);
            m.bytes_sent.fetch_add(done.bytes as u64, Ordering::Relaxed);
            if let Some(born) = done.since {
                self.ctx.registry.record_delivery(self.key, born);
            }
        }
        res
    }
}

impl Future for Conn {
    type Output = ();

    /// Signals first, then the mailbox, then whatever the peer sent, then the socket's write
    /// side, until there is nothing left to do now.
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.mailbox.register_waker(cx.waker());

        let sig = this.mailbox.take_signals();
        if sig != 0 && this.on_signals(sig) {
            return Poll::Ready(());
        }
        let mut waiting = this.collect();

        let mut read_paused = false;
        if this.phase != (Phase::Closing { read: false }) {
            match this.poll_read(cx) {
                ReadEnd::Pending => {}
                ReadEnd::Paused => read_paused = true,
                ReadEnd::Closed => {
                    // Best effort: a close reply tungstenite queued may still fit the socket.
                    let _ = this.wire.poll_write_out(cx, &mut Written::default());
                    return Poll::Ready(());
                }
                ReadEnd::Violation(code, reason) => this.begin_close(code, reason, false),
            }
        }

        loop {
            match this.flush(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return this.pending(cx),
                Poll::Ready(Ok(())) => {}
            }
            // The socket took everything. What waited in the mailbox goes next (frames pushed
            // after a take woke the task: only a mailbox left alone above can hold frames
            // nothing will wake it for).
            if std::mem::take(&mut waiting)
                && matches!(this.phase, Phase::Open | Phase::Draining)
                && this.take_frames()
            {
                continue;
            }
            match this.phase {
                Phase::Draining => {
                    // Everything queued before shutdown is out: now say goodbye.
                    this.begin_close(CloseCode::Away, "server shutting down", true);
                }
                Phase::Closing { read: false } => return Poll::Ready(()),
                _ => {
                    if read_paused {
                        // The backlog is out and no read readiness is registered: read on.
                        cx.waker().wake_by_ref();
                    }
                    return this.pending(cx);
                }
            }
        }
    }
}

/// A socket's whole task: its handshake (boxed, so its memory is freed once it is done), then
/// the connection it upgraded to.
///
/// Written out by hand because the obvious `async { if let Some(c) = hs.await { c.await } }`
/// keeps the `Conn` twice in its state (the binding and the value being awaited) and its
/// captured variables for the task's whole life: that is what sizes every idle connection's
/// task allocation. This one is a `Conn` and a tag (tokio then allocates 256 B per task).
pub enum Task<F> {
    Handshake(Pin<Box<F>>),
    Open(Conn),
    Done,
}

impl<F: Future<Output = Option<Conn>>> Future for Task<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Task::Handshake(h) => match h.as_mut().poll(cx) {
                    Poll::Ready(Some(conn)) => *this = Task::Open(conn),
                    Poll::Ready(None) => *this = Task::Done,
                    Poll::Pending => return Poll::Pending,
                },
                Task::Open(conn) => {
                    if Pin::new(conn).poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    *this = Task::Done;
                }
                Task::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.ctx.registry.unregister(self.key);
        if let Some(p) = &self.wire.pending {
            self.ctx.registry.release(self.key, &self.mailbox, p.charge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_state_stays_small() {
        // What every idle connection carries (BENCHMARKS.md, per-connection state): the task
        // is a `Conn` and a tag (tokio's 256 B allocation holds it only while that stays
        // around 120 B), and `Arc<Mailbox>` is in mimalloc's 112 B class while the mailbox is
        // 96 B. State needed only while closing or writing belongs in `Reader`/`Outgoing`.
        assert!(std::mem::size_of::<Conn>() <= 96);
        assert!(std::mem::size_of::<Mailbox>() <= 96);
    }
}
