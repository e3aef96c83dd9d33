//! One upgraded WebSocket connection, driven by a hand-written future.
//!
//! Density and fan-out both hinge on what an idle socket holds and how a busy one writes, so
//! this is the one place the gateway does not use a ready-made WebSocket stream:
//!
//! * **Reading** goes through tungstenite's codec (masking, fragmentation, control frames,
//!   size limits, UTF-8, the close handshake), fed from a non-blocking [`Wire`]. Its read buffer
//!   is the only per-connection buffer that lives while the socket is idle.
//! * **Writing** notification frames bypasses the codec: a [`Frame`](crate::frame::Frame) is
//!   already complete wire bytes, shared by every recipient, so the task moves its mailbox
//!   into a local queue and hands the frames to one `writev(2)` — no copy, no per-connection
//!   write buffer, one syscall per burst. The queue is freed once it is empty.
//! * Control frames (our pings, tungstenite's pongs and close frames) go to a small side
//!   buffer that is written only between whole data frames, so the two never interleave.
//! * No `split()`, no channel and no timer per connection: the registry's [`Handle`] carries
//!   the mailbox, the waker and signals (ping, shutdown, overflow, dead peer, expired token).

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocket, WebSocketConfig};
use tungstenite::{Error as WsError, Message};

use crate::frame::PING;
use crate::registry::{ConnKey, Handle, signal};
use crate::server::Shared;
use crate::shutdown::Slot;

/// Frames handed to one `writev` call.
const MAX_IOVECS: usize = 64;
/// Control bytes (pongs, our pings) queued before the connection stops reading until the
/// socket takes them. Every ping read queues its pong, so without this a client flooding pings
/// and never reading would grow `ctrl` without bound (see RELIABILITY.md).
const MAX_CTRL_BYTES: usize = 16 * 1024;

/// The socket as tungstenite sees it: reads come from the kernel, writes (control frames only)
/// land in `ctrl` for the connection's own writer.
pub struct Wire {
    sock: TcpStream,
    /// Notification frames waiting for the socket; `front_off` bytes of the first are written.
    out: VecDeque<Bytes>,
    front_off: usize,
    /// Control frames waiting for the socket; `ctrl_off` bytes are written.
    ctrl: Vec<u8>,
    ctrl_off: usize,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.try_read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.ctrl.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Counts of one write pass, added to the metrics once per pass.
#[derive(Default)]
struct Written {
    frames: u64,
    bytes: usize,
}

impl Wire {
    /// Writes control bytes and queued frames until done or the socket is full.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, done: &mut Written) -> Poll<io::Result<()>> {
        loop {
            let result = if self.front_off == 0 && self.ctrl_off < self.ctrl.len() {
                self.sock
                    .try_write(&self.ctrl[self.ctrl_off..])
                    .inspect(|&n| {
                        self.ctrl_off += n;
                        if self.ctrl_off == self.ctrl.len() {
                            self.ctrl = Vec::new();
                            self.ctrl_off = 0;
                        }
                    })
            } else if let Some(front) = self.out.front() {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                slices[0] = IoSlice::new(&front[self.front_off..]);
                let mut n = 1;
                for f in self.out.iter().skip(1).take(MAX_IOVECS - 1) {
                    slices[n] = IoSlice::new(f);
                    n += 1;
                }
                self.sock
                    .try_write_vectored(&slices[..n])
                    .inspect(|&written| self.consume(written, done))
            } else {
                // Everything is out; give the queue's memory back.
                if self.out.capacity() > 0 {
                    self.out = VecDeque::new();
                }
                return Poll::Ready(Ok(()));
            };
            match result {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.sock.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn consume(&mut self, mut n: usize, done: &mut Written) {
        while n > 0 {
            let Some(front) = self.out.front() else {
                return;
            };
            let rest = front.len() - self.front_off;
            if n >= rest {
                n -= rest;
                done.frames += 1;
                done.bytes += front.len();
                self.out.pop_front();
                self.front_off = 0;
            } else {
                self.front_off += n;
                n = 0;
            }
        }
    }
}

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

/// How a read pass ended.
enum ReadEnd {
    /// Nothing more to read now; the waker is registered.
    Pending,
    /// Stopped reading because control replies are backed up: read again once they are out.
    Paused,
    /// The peer is gone or the close handshake completed.
    Closed,
    /// The peer broke a rule: close with this code and stop reading.
    Violation(CloseCode, &'static str),
}

/// A registered connection. Completes when the socket is done; dropping it unregisters.
pub struct Conn {
    ws: WebSocket<Wire>,
    handle: Arc<Handle>,
    key: ConnKey,
    shared: Arc<Shared>,
    phase: Phase,
    _slot: Slot,
}

/// tungstenite settings for server-side sockets.
///
/// The default config keeps a 128 KiB read buffer per socket (~130 KB RSS per idle
/// connection); clients of a push gateway send only pongs and close frames, so a few hundred
/// bytes suffice. tungstenite never buffers notification frames here (see the module docs);
/// its own write buffer only ever holds a control frame.
pub fn ws_config(read_buffer: usize, max_client_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(Some(max_client_frame))
        .max_frame_size(Some(max_client_frame))
        .accept_unmasked_frames(false)
}

impl Conn {
    /// Wraps an upgraded socket. `rest` is whatever the client sent after its request head.
    pub fn new(
        sock: TcpStream,
        rest: Vec<u8>,
        handle: Arc<Handle>,
        key: ConnKey,
        shared: Arc<Shared>,
        slot: Slot,
    ) -> Conn {
        let wire = Wire {
            sock,
            out: VecDeque::new(),
            front_off: 0,
            ctrl: Vec::new(),
            ctrl_off: 0,
        };
        let config = Some(shared.ws_config);
        let ws = WebSocket::from_partially_read(wire, rest, Role::Server, config);
        Conn {
            ws,
            handle,
            key,
            shared,
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
        let wire = self.ws.get_mut();
        let partial = if wire.front_off > 0 {
            wire.out.pop_front()
        } else {
            None
        };
        self.handle.discard_queued(&mut wire.out);
        if let Some(f) = partial {
            wire.out.push_back(f);
        }
        // Writes into `ctrl`, which cannot fail; an error only means tungstenite already
        // considers the socket closed.
        let _ = self.ws.close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        self.phase = Phase::Closing { read };
        // Bound the wait for the peer's reply: the keepalive sweep drops a connection silent
        // for two ticks, and from now on nothing the peer sends counts as a sign of life.
        let tick = self.shared.registry.tick();
        self.handle.seen(tick.wrapping_sub(1));
    }

    /// Acts on registry signals. Returns true if the socket should be dropped at once.
    fn on_signals(&mut self, sig: u8) -> bool {
        if sig & signal::DEAD != 0 {
            self.shared
                .metrics
                .dead_peer_closes
                .fetch_add(1, Ordering::Relaxed);
            return true;
        }
        if sig & signal::OVERFLOW != 0 && self.phase != (Phase::Closing { read: true }) {
            self.shared
                .metrics
                .slow_consumer_closes
                .fetch_add(1, Ordering::Relaxed);
            self.begin_close(CloseCode::Again, "client too slow", true);
        }
        if sig & signal::EXPIRED != 0 {
            self.shared
                .metrics
                .token_expired_closes
                .fetch_add(1, Ordering::Relaxed);
            self.begin_close(CloseCode::Policy, "token expired", true);
        }
        if sig & signal::SHUTDOWN != 0 && self.phase == Phase::Open {
            self.phase = Phase::Draining;
        }
        if sig & signal::PING != 0 && matches!(self.phase, Phase::Open | Phase::Draining) {
            self.ws.get_mut().ctrl.extend_from_slice(PING);
        }
        false
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> ReadEnd {
        loop {
            // Every ping read queues a pong: while they are backed up, leave the peer's frames
            // in the kernel (TCP backpressure) and do not count it as alive.
            let wire = self.ws.get_ref();
            if wire.ctrl.len() - wire.ctrl_off > MAX_CTRL_BYTES {
                return ReadEnd::Paused;
            }
            match self.ws.read() {
                Ok(msg) => {
                    if !matches!(self.phase, Phase::Closing { .. }) {
                        self.handle.seen(self.shared.registry.tick());
                    }
                    match msg {
                        Message::Text(_) | Message::Binary(_) => {
                            // Push-only gateway: client data is ignored (documented rule).
                            self.shared
                                .metrics
                                .client_messages_ignored
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        // Pongs only prove liveness; pings are answered by tungstenite; a
                        // close is answered by tungstenite and ends the next read.
                        _ => {}
                    }
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.ws.get_mut().sock.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(_)) => return ReadEnd::Closed,
                        Poll::Pending => return ReadEnd::Pending,
                    }
                }
                Err(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
                    self.shared
                        .metrics
                        .oversized_frame_closes
                        .fetch_add(1, Ordering::Relaxed);
                    return ReadEnd::Violation(CloseCode::Size, "message too big");
                }
                Err(WsError::Capacity(_)) => {
                    return ReadEnd::Violation(CloseCode::Size, "message too big");
                }
                Err(WsError::Utf8(_)) => {
                    return ReadEnd::Violation(CloseCode::Invalid, "invalid UTF-8");
                }
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => {
                    return ReadEnd::Closed;
                }
                Err(WsError::Protocol(_)) => {
                    return ReadEnd::Violation(CloseCode::Protocol, "protocol error");
                }
                Err(_) => return ReadEnd::Closed,
            }
        }
    }
}

impl Future for Conn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        this.handle.register_waker(cx.waker());

        let sig = this.handle.take_signals();
        if sig != 0 && this.on_signals(sig) {
            return Poll::Ready(());
        }

        match this.phase {
            Phase::Open | Phase::Draining => this.handle.drain_into(&mut this.ws.get_mut().out),
            Phase::Closing { .. } => this.handle.discard_queued(&mut VecDeque::new()),
        }

        let mut read_paused = false;
        if this.phase != (Phase::Closing { read: false }) {
            match this.poll_read(cx) {
                ReadEnd::Pending => {}
                ReadEnd::Paused => read_paused = true,
                ReadEnd::Closed => {
                    // Best effort: a close reply tungstenite queued may still fit the socket.
                    let _ = this
                        .ws
                        .get_mut()
                        .poll_write_out(cx, &mut Written::default());
                    return Poll::Ready(());
                }
                ReadEnd::Violation(code, reason) => this.begin_close(code, reason, false),
            }
        }

        loop {
            let mut done = Written::default();
            let res = this.ws.get_mut().poll_write_out(cx, &mut done);
            if done.frames > 0 {
                if matches!(this.phase, Phase::Open | Phase::Draining) {
                    this.handle.written(done.bytes);
                }
                this.shared
                    .metrics
                    .frames_sent
                    .fetch_add(done.frames, Ordering::Relaxed);
                this.shared
                    .metrics
                    .bytes_sent
                    .fetch_add(done.bytes as u64, Ordering::Relaxed);
            }
            return match res {
                Poll::Ready(Err(_)) => Poll::Ready(()),
                Poll::Ready(Ok(())) if this.phase == Phase::Draining => {
                    // Everything queued before shutdown is out: now say goodbye.
                    this.begin_close(CloseCode::Away, "server shutting down", true);
                    continue;
                }
                Poll::Ready(Ok(())) if this.phase == (Phase::Closing { read: false }) => {
                    Poll::Ready(())
                }
                Poll::Ready(Ok(())) if read_paused => {
                    // The backlog is out and no read readiness is registered: read on.
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                _ => Poll::Pending,
            };
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.registry.unregister(self.key);
    }
}
