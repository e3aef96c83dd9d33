//! The read side of a connection: what the peer sends, through tungstenite's codec
//! (masking, fragmentation, control frames, size limits, UTF-8, the close handshake) — but an
//! idle socket holds none of it. Bytes are read into a per-thread scratch buffer; complete
//! frames are handed to a [`Reader`] (the codec and its protocol state) that exists only while
//! the peer is mid-frame, mid-message or closing, and is freed as soon as its state is back to
//! "nothing pending". Pongs, the only thing a healthy idle client sends, are recognised without
//! it.
//!
//! This module must not know how notification frames are written: the codec's own output
//! (pongs, close replies) goes to the write side's control buffer.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tungstenite::error::{CapacityError, ProtocolError};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error as WsError, Message};

use super::write::Outgoing;
use super::{Conn, Phase};
use crate::metrics::Metrics;

/// Control bytes (pongs, our pings) queued before the connection stops reading until the
/// socket takes them. Every ping read queues its pong, so without this a client flooding pings
/// and never reading would grow `ctrl` without bound (see RELIABILITY.md).
const MAX_CTRL_BYTES: usize = 16 * 1024;

/// tungstenite's side of a connection: the codec with its protocol state (close handshake,
/// fragments of a message), plus the bytes of a frame that has not fully arrived yet.
///
/// Allocated when the peer sends anything but pongs, freed once nothing is pending: the codec
/// has consumed every complete frame (it is only ever given complete frames, so its own read
/// buffer is then empty), no fragmented message is in progress, no partial frame is carried,
/// and no close handshake has begun.
pub(super) struct Reader {
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
    pub(super) fn new(config: WebSocketConfig) -> Box<Reader> {
        Box::new(Reader {
            ctx: WebSocketContext::new(Role::Server, Some(config)),
            carry: Vec::new(),
            mid_message: false,
            unscanned: false,
            close_by: None,
        })
    }

    /// A reader holding bytes the client sent right behind its request head, to be scanned
    /// on the first poll.
    pub(super) fn with_rest(config: WebSocketConfig, rest: Vec<u8>) -> Box<Reader> {
        let mut r = Reader::new(config);
        r.carry = rest;
        r.unscanned = true;
        r
    }

    /// Queues our close frame in the control buffer of `out` and starts the close deadline:
    /// the peer's reply (or, if it does not read, our close frame reaching it) is awaited for
    /// `timeout` (`CLOSE_TIMEOUT_MS`) at most, whatever the keepalive clock says.
    pub(super) fn close(
        &mut self,
        frame: CloseFrame,
        out: &mut Option<Box<Outgoing>>,
        timeout: Duration,
    ) {
        let mut io = CodecIo {
            input: &[],
            eof: false,
            pending: out,
        };
        // Writes into `ctrl`, which cannot fail; an error only means tungstenite already
        // considers the socket closed.
        let _ = self.ctx.close(&mut io, Some(frame));
        self.close_by = Some(Box::pin(tokio::time::sleep(timeout)));
    }

    /// Whether the close deadline has passed (if not, its timer is armed to wake the task).
    pub(super) fn close_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        self.close_by
            .as_mut()
            .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready())
    }

    /// True when dropping the reader loses nothing (see the type's docs).
    fn idle(&self) -> bool {
        self.carry.is_empty() && !self.mid_message && !self.unscanned && self.ctx.can_write()
    }
}

/// What the codec reads from (complete frames, then "would block", or end of stream) and
/// writes to (the connection's control buffer).
struct CodecIo<'a> {
    input: &'a [u8],
    eof: bool,
    pending: &'a mut Option<Box<Outgoing>>,
}

impl Read for CodecIo<'_> {
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

impl Write for CodecIo<'_> {
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

/// How a read pass ended.
pub(super) enum ReadEnd {
    /// Nothing more to read now; the waker is registered.
    Pending,
    /// Stopped reading because control replies are backed up: read again once they are out.
    Paused,
    /// The peer is gone or the close handshake completed.
    Closed,
    /// The peer broke a rule: close with this code and stop reading.
    Violation(CloseCode, &'static str),
}

impl Conn {
    /// Reads until the socket has nothing more (or the connection must end or pause).
    pub(super) fn poll_read(&mut self, cx: &mut Context<'_>) -> ReadEnd {
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
                self.mailbox.seen(self.ctx.registry.keepalive_tick());
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
        let mut feed = CodecIo {
            input: &bytes[..whole],
            eof,
            pending: &mut self.wire.pending,
        };
        let end = loop {
            match reader.ctx.read(&mut feed) {
                Ok(msg) => {
                    if !matches!(self.phase, Phase::Closing { .. }) {
                        self.mailbox.seen(self.ctx.registry.keepalive_tick());
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
