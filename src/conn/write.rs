//! The write side of a connection: the socket, and what waits to be written to it.
//!
//! Notification frames bypass the codec: a [`Frame`](crate::frame::Frame) is already complete
//! wire bytes, shared by every recipient, so the connection moves its mailbox into a local
//! queue and hands the frames to one `writev(2)` — no copy, no per-connection write buffer, one
//! syscall per burst. Control frames (our pings, the codec's pongs and close frames) go to a
//! small side buffer written only between whole data frames, so the two never interleave.
//! All of it lives in an [`Outgoing`] box that exists only while something waits for the
//! socket: an idle connection carries one pointer for its whole write side.
//!
//! This module must not know about the WebSocket protocol beyond "bytes in order", nor about
//! the registry: it reports what a pass wrote ([`Written`]) and the connection accounts for it.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;

/// Frames handed to one `writev` call.
const MAX_IOVECS: usize = 64;

/// The socket and what waits to be written to it.
pub struct Socket {
    pub(super) sock: TcpStream,
    /// Allocated while anything waits for the socket, freed once it is all written: an idle
    /// connection carries one pointer for its whole write side.
    pub(super) pending: Option<Box<Outgoing>>,
}

/// What waits for a connection's socket.
#[derive(Default)]
pub(super) struct Outgoing {
    /// Notification frames; `front_off` bytes of the first are written.
    pub(super) out: VecDeque<Bytes>,
    pub(super) front_off: usize,
    /// Control frames; `ctrl_off` bytes are written.
    pub(super) ctrl: Vec<u8>,
    pub(super) ctrl_off: usize,
    /// When the oldest frame in `out` entered routing ([`Registry::stamp`]).
    ///
    /// [`Registry::stamp`]: crate::registry::Registry::stamp
    pub(super) since: Option<u32>,
    /// What the frames in `out` cost the queue budget: given back in proportion to the frames
    /// written, and in full once `out` is empty ([`Registry::release`]).
    ///
    /// [`Registry::release`]: crate::registry::Registry::release
    pub(super) charge: usize,
}

/// Counts of one write pass, added to the metrics once per pass.
#[derive(Default)]
pub(super) struct Written {
    pub(super) frames: u64,
    pub(super) bytes: usize,
    /// The queue emptied: when its oldest frame entered routing.
    pub(super) since: Option<u32>,
    /// Queue budget charge given back by the frames written.
    pub(super) released: usize,
}

impl Socket {
    pub(super) fn pending(&mut self) -> &mut Outgoing {
        self.pending.get_or_insert_with(Box::default)
    }

    /// Control bytes not yet written.
    /// Drops the queued notification frames — all but one already partly written, which must
    /// be completed for the stream to stay valid — and returns their charge for
    /// [`Registry::release`](crate::registry::Registry::release).
    pub(super) fn drop_queued(&mut self) -> usize {
        let Some(p) = self.pending.as_deref_mut() else {
            return 0;
        };
        let partial = if p.front_off > 0 {
            p.out.pop_front()
        } else {
            None
        };
        p.out = VecDeque::new();
        p.since = None;
        if let Some(f) = partial {
            p.out.push_back(f);
        }
        std::mem::take(&mut p.charge)
    }

    pub(super) fn ctrl_backlog(&self) -> usize {
        self.pending
            .as_ref()
            .map_or(0, |p| p.ctrl.len() - p.ctrl_off)
    }

    /// Writes control bytes and queued frames until done or the socket is full.
    pub(super) fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        done: &mut Written,
    ) -> Poll<io::Result<()>> {
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
