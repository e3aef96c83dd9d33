//! One upgraded WebSocket connection, driven by a hand-written future.
//!
//! Density and fan-out both hinge on what an idle socket holds and how a busy one writes, so
//! this is the one place the gateway does not use a ready-made WebSocket stream:
//!
//! * **Reading** goes through tungstenite's codec (masking, fragmentation, control frames,
//!   size limits, UTF-8, the close handshake) — but an idle socket holds none of it. Bytes are
//!   read into a per-thread scratch buffer; complete frames are handed to a [`Reader`] (the
//!   codec and its protocol state) that exists only while the peer is mid-frame, mid-message
//!   or closing, and is freed as soon as its state is back to "nothing pending". Pongs, the only
//!   thing a healthy idle client sends, are recognised without it.
//! * **Writing** notification frames bypasses the codec: a [`Frame`](crate::frame::Frame) is
//!   already complete wire bytes, shared by every recipient, so the task moves its mailbox
//!   into a local queue and hands the frames to one `writev(2)` — no copy, no per-connection
//!   write buffer, one syscall per burst. The queue, with everything else a write needs, lives
//!   in an [`Outgoing`] box that exists only while something waits for the socket.
//! * Control frames (our pings, tungstenite's pongs and close frames) go to a small side
//!   buffer that is written only between whole data frames, so the two never interleave.
//! * No `split()`, no channel and no timer per connection: the registry's [`Mailbox`] carries
//!   the mailbox, the waker and signals (ping, shutdown, overflow, queue budget, dead peer,
//!   expired token). The one timer is the close deadline (`CLOSE_TIMEOUT_MS`), and it lives in
//!   the [`Reader`], which exists while a close handshake is under way.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

pub mod mailbox;

use crate::frame::PING;
use crate::metrics::Metrics;
use crate::registry::{ConnKey, Registry};
use crate::shutdown::Slot;
use mailbox::{Mailbox, signal};

/// Frames handed to one `writev` call.
const MAX_IOVECS: usize = 64;
/// Control bytes (pongs, our pings) queued before the connection stops reading until the
/// socket takes them. Every ping read queues its pong, so without this a client flooding pings
/// and never reading would grow `ctrl` without bound (see RELIABILITY.md).
const MAX_CTRL_BYTES: usize = 16 * 1024;

/// The socket and what waits to be written to it.
pub struct Wire {
    sock: TcpStream,
    /// Allocated while anything waits for the socket, freed once it is all written: an idle
    /// connection carries one pointer for its whole write side.
    pending: Option<Box<Outgoing>>,
}

/// What waits for a connection's socket.
#[derive(Default)]
struct Outgoing {
    /// Notification frames; `front_off` bytes of the first are written.
    out: VecDeque<Bytes>,
    front_off: usize,
    /// Control frames; `ctrl_off` bytes are written.
    ctrl: Vec<u8>,
    ctrl_off: usize,
    /// When the oldest frame in `out` entered routing ([`Registry::clock`]).
    ///
    /// [`Registry::clock`]: crate::registry::Registry::clock
    since: Option<u32>,
    /// What the frames in `out` cost the queue budget: given back in proportion to the frames
    /// written, and in full once `out` is empty ([`Registry::release`]).
    ///
    /// [`Registry::release`]: crate::registry::Registry::release
    charge: usize,
}

/// tungstenite's side of a connection: the codec with its protocol state (close handshake,
/// fragments of a message), plus the bytes of a frame that has not fully arrived yet.
///
/// Allocated when the peer sends anything but pongs, freed once nothing is pending: the codec
/// has consumed every complete frame (it is only ever given complete frames, so its own read
/// buffer is then empty), no fragmented message is in progress, no partial frame is carried,
/// and no close handshake has begun.
struct Reader {
    ctx: WebSocketContext,
    /// Start of a frame still arriving; never handed to the codec before it is complete.
    carry: Vec<u8>,
    /// A fragmented data message is in progress (the codec holds its first fragments).
    mid_message: bool,
    /// `carry` holds bytes not yet scanned (sent right behind the upgrade request).
    unscanned: bool,
    /// Once our close frame is queued: when the peer's time to complete the handshake is up
    /// (`CLOSE_TIMEOUT_MS`). Kept here, not in the [`Conn`], because the reader exists for
    /// exactly as long as a close is under way (and an idle connection carries no timer).
    close_by: Option<Pin<Box<Sleep>>>,
}

impl Reader {
    fn new(config: WebSocketConfig) -> Box<Reader> {
        Box::new(Reader {
            ctx: WebSocketContext::new(Role::Server, Some(config)),
            carry: Vec::new(),
            mid_message: false,
            unscanned: false,
            close_by: None,
        })
    }

    /// True when dropping the reader loses nothing (see the type's docs).
    fn idle(&self) -> bool {
        self.carry.is_empty() && !self.mid_message && !self.unscanned && self.ctx.can_write()
    }
}

/// What the codec reads from (complete frames, then "would block", or end of stream) and
/// writes to (the connection's control buffer).
struct Feed<'a> {
    input: &'a [u8],
    eof: bool,
    pending: &'a mut Option<Box<Outgoing>>,
}

impl Read for Feed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = self.input.len().min(buf.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Feed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !buf.is_empty() {
            let p = self.pending.get_or_insert_with(Box::default);
            p.ctrl.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// Where every connection on this thread reads its socket into; only an incomplete
    /// frame is copied out of it (into its [`Reader`]).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Header of a client frame at the start of `b`: (header length, payload length), or `None`
/// if the header is not complete yet.
fn frame_header(b: &[u8]) -> Option<(usize, u64)> {
    let b1 = *b.get(1)?;
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (len_bytes, len) = match b1 & 0x7f {
        126 => (2, u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]))),
        127 => {
            let ext: [u8; 8] = b.get(2..10)?.try_into().ok()?;
            (8, u64::from_be_bytes(ext))
        }
        n => (0, u64::from(n)),
    };
    let header = 2 + len_bytes + mask;
    (b.len() >= header).then_some((header, len))
}

/// How many leading bytes of `buf` are complete frames the codec may be given, tracking
/// whether they leave a fragmented message open. A header announcing more than `max_frame`
/// bytes ends the scan with everything handed over: the codec refuses it at the header, as it
/// always has, and nothing behind it matters any more.
fn complete_frames(buf: &[u8], max_frame: u64, mid_message: &mut bool) -> usize {
    let mut at = 0;
    while let Some((header, len)) = frame_header(&buf[at..]) {
        if len > max_frame {
            return buf.len();
        }
        let end = at + header + len as usize;
        if end > buf.len() {
            break;
        }
        let b0 = buf[at];
        let fin = b0 & 0x80 != 0;
        match b0 & 0x0f {
            0x1 | 0x2 => *mid_message = !fin,
            0x0 if fin => *mid_message = false,
            _ => {}
        }
        at = end;
    }
    at
}

/// How many leading bytes of `buf` are complete, well-formed pongs from a client (final,
/// no reserved bits, masked, at most 125 bytes): all the codec would do with them is return
/// them, so they are taken as a sign of life without it.
fn leading_pongs(buf: &[u8]) -> usize {
    let mut at = 0;
    while let [0x8A, b1, ..] = buf[at..] {
        let len = usize::from(b1 & 0x7f);
        if b1 & 0x80 == 0 || len > 125 || buf.len() < at + 6 + len {
            break;
        }
        at += 6 + len;
    }
    at
}

/// Counts of one write pass, added to the metrics once per pass.
#[derive(Default)]
struct Written {
    frames: u64,
    bytes: usize,
    /// The queue emptied: when its oldest frame entered routing.
    since: Option<u32>,
    /// Queue budget charge given back by the frames written.
    released: usize,
}

impl Wire {
    fn pending(&mut self) -> &mut Outgoing {
        self.pending.get_or_insert_with(Box::default)
    }

    /// Control bytes not yet written.
    fn ctrl_backlog(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |p| p.ctrl.len() - p.ctrl_off)
    }

    /// Writes control bytes and queued frames until done or the socket is full.
    fn poll_write_out(&mut self, cx: &mut Context<'_>, done: &mut Written) -> Poll<io::Result<()>> {
        loop {
            let Some(p) = self.pending.as_deref_mut() else {
                return Poll::Ready(Ok(()));
            };
            let result = if p.front_off == 0 && p.ctrl_off < p.ctrl.len() {
                self.sock.try_write(&p.ctrl[p.ctrl_off..]).inspect(|&n| {
                    p.ctrl_off += n;
                    if p.ctrl_off == p.ctrl.len() {
                        p.ctrl = Vec::new();
                        p.ctrl_off = 0;
                    }
                })
            } else if let Some(front) = p.out.front() {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                slices[0] = IoSlice::new(&front[p.front_off..]);
                let mut n = 1;
                for f in p.out.iter().skip(1).take(MAX_IOVECS - 1) {
                    slices[n] = IoSlice::new(f);
                    n += 1;
                }
                self.sock
                    .try_write_vectored(&slices[..n])
                    .inspect(|&written| p.consume(written, done))
            } else {
                // Everything is out; give the memory back.
                self.pending = None;
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
}

impl Outgoing {
    fn consume(&mut self, mut n: usize, done: &mut Written) {
        let (queued, frames_before) = (self.out.len(), done.frames);
        while n > 0 {
            let Some(front) = self.out.front() else {
                break;
            };
            let rest = front.len() - self.front_off;
            if n >= rest {
                n -= rest;
                done.frames += 1;
                done.bytes += front.len();
                self.out.pop_front();
                self.front_off = 0;
                if self.out.is_empty() {
                    done.since = self.since.take();
                }
            } else {
                self.front_off += n;
                n = 0;
            }
        }
        let share = if self.out.is_empty() {
            self.charge
        } else {
            let written = (done.frames - frames_before) as usize;
            (self.charge * written / queued.max(1)).min(self.charge)
        };
        self.charge -= share;
        done.released += share;
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
    wire: Wire,
    /// tungstenite, only while the peer has something in progress (see [`Reader`]).
    reader: Option<Box<Reader>>,
    handle: Arc<Mailbox>,
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
/// and the codec (with its buffer) only exists while the peer is mid-frame (see [`Reader`]).
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
        handle: Arc<Mailbox>,
        key: ConnKey,
        ctx: Arc<ConnContext>,
        slot: Slot,
    ) -> Conn {
        let wire = Wire {
            sock,
            pending: None,
        };
        // Bytes the client sent right behind its request are scanned on the first poll.
        let reader = (!rest.is_empty()).then(|| {
            let mut r = Reader::new(ctx.ws_config);
            r.carry = rest;
            r.unscanned = true;
            r
        });
        Conn {
            wire,
            reader,
            handle,
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
        let mut released = self.handle.discard_queued();
        if let Some(p) = self.wire.pending.as_deref_mut() {
            let partial = if p.front_off > 0 {
                p.out.pop_front()
            } else {
                None
            };
            p.out = VecDeque::new();
            p.since = None;
            released += std::mem::take(&mut p.charge);
            if let Some(f) = partial {
                p.out.push_back(f);
            }
        }
        self.ctx.registry.release(self.key, &self.handle, released);
        // Writes into `ctrl`, which cannot fail; an error only means tungstenite already
        // considers the socket closed.
        let reader = self
            .reader
            .get_or_insert_with(|| Reader::new(self.ctx.ws_config));
        let mut feed = Feed {
            input: &[],
            eof: false,
            pending: &mut self.wire.pending,
        };
        let _ = reader.ctx.close(
            &mut feed,
            Some(CloseFrame {
                code,
                reason: reason.into(),
            }),
        );
        self.phase = Phase::Closing { read };
        // Bound the wait for the peer's reply (or, if it does not read, for our close frame
        // to reach it): dropped at `CLOSE_TIMEOUT_MS`, whatever the keepalive clock says.
        reader.close_by = Some(Box::pin(tokio::time::sleep(self.ctx.close_timeout)));
        // The keepalive sweep is the second bound: it drops a connection silent for two ticks,
        // and from now on nothing the peer sends counts as a sign of life.
        let tick = self.ctx.registry.tick();
        self.handle.seen(tick.wrapping_sub(1));
    }

    /// While closing: whether the peer's time to complete the close handshake is up (if not,
    /// the deadline's timer is armed to wake the task).
    fn close_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        if !matches!(self.phase, Phase::Closing { .. }) {
            return false;
        }
        self.reader
            .as_mut()
            .and_then(|r| r.close_by.as_mut())
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
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
        let Some(taken) = self.handle.take_frames() else {
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

    /// Reads until the socket has nothing more (or the connection must end or pause).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> ReadEnd {
        if self.reader.as_ref().is_some_and(|r| r.unscanned)
            && let Some(end) = self.on_bytes(&[], false)
        {
            return end;
        }
        let chunk = self.ctx.ws_config.read_buffer_size.max(16);
        loop {
            // Every ping read queues a pong: while they are backed up, leave the peer's frames
            // in the kernel (TCP backpressure) and do not count it as alive.
            if self.wire.ctrl_backlog() > MAX_CTRL_BYTES {
                return ReadEnd::Paused;
            }
            let read = SCRATCH.with_borrow_mut(|buf| {
                if buf.len() < chunk {
                    buf.resize(chunk, 0);
                }
                match self.wire.sock.try_read(&mut buf[..chunk]) {
                    Ok(n) => Ok(self.on_bytes(&buf[..n], n == 0)),
                    Err(e) => Err(e),
                }
            });
            match read {
                Ok(None) => {}
                Ok(Some(end)) => return end,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.reader.as_ref().is_some_and(|r| r.idle())
                        && matches!(self.phase, Phase::Open | Phase::Draining)
                    {
                        self.reader = None;
                    }
                    match self.wire.sock.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(_)) => return ReadEnd::Closed,
                        Poll::Pending => return ReadEnd::Pending,
                    }
                }
                Err(_) => return ReadEnd::Closed,
            }
        }
    }

    /// Handles bytes read from the socket (`eof`: the peer closed its side). Returns how the
    /// read pass ends, or `None` to read on.
    fn on_bytes(&mut self, data: &[u8], eof: bool) -> Option<ReadEnd> {
        let mut data = data;
        if self.reader.is_none() {
            if eof {
                // What the codec would say about a stream ending between frames.
                return Some(ReadEnd::Closed);
            }
            let pongs = leading_pongs(data);
            if pongs > 0 {
                self.handle.seen(self.ctx.registry.tick());
                data = &data[pongs..];
            }
            if data.is_empty() {
                return None;
            }
        }
        let reader = self
            .reader
            .get_or_insert_with(|| Reader::new(self.ctx.ws_config));
        reader.unscanned = false;
        let mut carry = std::mem::take(&mut reader.carry);
        let bytes: &[u8] = if carry.is_empty() {
            data
        } else {
            carry.extend_from_slice(data);
            &carry
        };
        let max_frame = self
            .ctx
            .ws_config
            .max_frame_size
            .map_or(u64::MAX, |m| m as u64);
        let whole = if eof {
            bytes.len()
        } else {
            complete_frames(bytes, max_frame, &mut reader.mid_message)
        };
        let mut feed = Feed {
            input: &bytes[..whole],
            eof,
            pending: &mut self.wire.pending,
        };
        let end = loop {
            match reader.ctx.read(&mut feed) {
                Ok(msg) => {
                    if !matches!(self.phase, Phase::Closing { .. }) {
                        self.handle.seen(self.ctx.registry.tick());
                    }
                    match msg {
                        Message::Text(_) | Message::Binary(_) => {
                            // Push-only gateway: client data is ignored (documented rule).
                            self.ctx
                                .metrics
                                .client_messages_ignored
                                .fetch_add(1, Ordering::Relaxed);
                        }
                        // Pongs only prove liveness; pings are answered by tungstenite; a
                        // close is answered by tungstenite and ends the next read.
                        _ => {}
                    }
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) => break Some(read_error(e, &self.ctx.metrics)),
            }
        };
        // Keep the start of a frame still arriving.
        let tail = bytes.len() - whole;
        if tail > 0 {
            if carry.is_empty() {
                reader.carry = data[data.len() - tail..].to_vec();
            } else {
                carry.drain(..whole);
                reader.carry = carry;
            }
        }
        end
    }
}

/// How a codec error ends the connection.
fn read_error(e: WsError, metrics: &Metrics) -> ReadEnd {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            metrics
                .oversized_frame_closes
                .fetch_add(1, Ordering::Relaxed);
            ReadEnd::Violation(CloseCode::Size, "message too big")
        }
        WsError::Capacity(_) => ReadEnd::Violation(CloseCode::Size, "message too big"),
        WsError::Utf8(_) => ReadEnd::Violation(CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => ReadEnd::Closed,
        WsError::Protocol(_) => ReadEnd::Violation(CloseCode::Protocol, "protocol error"),
        _ => ReadEnd::Closed,
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

        // Whether frames may wait in the mailbox for the write queue to empty.
        let mut waiting = false;
        match this.phase {
            Phase::Open | Phase::Draining => {
                waiting = !this.take_frames()
                    && this
                        .wire
                        .pending
                        .as_ref()
                        .is_some_and(|p| !p.out.is_empty());
            }
            Phase::Closing { .. } => {
                let charge = this.handle.discard_queued();
                this.ctx.registry.release(this.key, &this.handle, charge);
            }
        }

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
            let mut done = Written::default();
            let res = this.wire.poll_write_out(cx, &mut done);
            this.ctx
                .registry
                .release(this.key, &this.handle, done.released);
            if done.frames > 0 {
                if matches!(this.phase, Phase::Open | Phase::Draining) {
                    this.handle.written(done.bytes);
                }
                this.ctx
                    .metrics
                    .frames_sent
                    .fetch_add(done.frames, Ordering::Relaxed);
                this.ctx
                    .metrics
                    .bytes_sent
                    .fetch_add(done.bytes as u64, Ordering::Relaxed);
                if let Some(born) = done.since {
                    this.ctx.registry.record_delivery(this.key, born);
                }
            }
            return match res {
                Poll::Ready(Err(_)) => Poll::Ready(()),
                // The socket took everything: what waited in the mailbox goes next. (Frames
                // pushed after a take woke the task: only a mailbox left alone above can hold
                // frames nothing will wake it for.)
                Poll::Ready(Ok(()))
                    if std::mem::take(&mut waiting)
                        && matches!(this.phase, Phase::Open | Phase::Draining)
                        && this.take_frames() =>
                {
                    continue;
                }
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
                    this.pending(cx)
                }
                _ => this.pending(cx),
            };
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
            self.ctx.registry.release(self.key, &self.handle, p.charge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame with a zero mask.
    fn client(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![b0];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn idle_state_stays_small() {
        // What every idle connection carries (BENCHMARKS.md, per-connection state): the task
        // is a `Conn` and a tag (tokio's 256 B allocation holds it only while that stays
        // around 120 B), and `Arc<Mailbox>` is in mimalloc's 112 B class while the handle is
        // 96 B. State needed only while closing or writing belongs in `Reader`/`Outgoing`.
        assert!(std::mem::size_of::<Conn>() <= 96);
        assert!(std::mem::size_of::<Mailbox>() <= 96);
    }

    #[test]
    fn only_complete_frames_are_handed_over() {
        let mut wire = client(0x81, b"hello");
        wire.extend(client(0x89, b"ping"));
        wire.extend(client(0x82, &[7; 300]));
        wire.extend(client(0x81, &[b'x'; 70_000]));
        let ends = [11, 21, 21 + 308, wire.len()];
        for cut in 0..=wire.len() {
            let mut mid = false;
            let n = complete_frames(&wire[..cut], 1 << 20, &mut mid);
            let want = ends.iter().rev().find(|&&e| e <= cut).copied().unwrap_or(0);
            assert_eq!(n, want, "cut at {cut}");
            assert!(!mid);
        }
    }

    #[test]
    fn fragments_and_oversized_headers() {
        let mut mid = false;
        let first = client(0x01, b"frag"); // text, not final
        assert_eq!(complete_frames(&first, 4096, &mut mid), first.len());
        assert!(mid);
        let ping = client(0x89, b"");
        complete_frames(&ping, 4096, &mut mid);
        assert!(
            mid,
            "a control frame between fragments leaves the message open"
        );
        let last = client(0x80, b"ment"); // continuation, final
        complete_frames(&last, 4096, &mut mid);
        assert!(!mid);
        // A header announcing more than the limit: everything goes to the codec (which refuses
        // it), even though the payload has not arrived.
        let mut big = client(0x81, &[0; 5000]);
        big.truncate(20);
        assert_eq!(complete_frames(&big, 4096, &mut mid), 20);
    }

    #[test]
    fn pongs_are_recognised_without_the_codec() {
        let mut wire = client(0x8A, b"");
        wire.extend(client(0x8A, &[1; 125]));
        let pongs = wire.len();
        wire.extend(client(0x89, b"x"));
        assert_eq!(leading_pongs(&wire), pongs);
        // Partial, unmasked, reserved bits or non-final: left to the codec.
        assert_eq!(leading_pongs(&wire[..pongs - 1]), 6);
        assert_eq!(leading_pongs(&[0x8A, 0x00]), 0);
        assert_eq!(leading_pongs(&client(0xCA, b"")), 0);
        assert_eq!(leading_pongs(&client(0x0A, b"")), 0);
    }
}
