//! A pool of lean WebSocket client connections, built to receive millions of frames per second
//! on the same cores as the server under test.
//!
//! Each connection is one task that speaks just enough RFC 6455 for a push gateway's client:
//! a fixed upgrade request, then a read loop that parses server frames straight out of a
//! per-thread scratch buffer (only a partial trailing frame is copied, into a per-connection
//! carry buffer). Text frames are counted and their send timestamp — the `"t":<unix µs>`
//! member that [`crate::publish`] puts into `data` — becomes a latency sample. Pings are
//! answered; a close frame from the server is counted and ends the connection.
//!
//! Everything a pool learns lands in a shared [`Stats`], which the worker process reports to
//! the coordinator (or a test reads directly).

use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};

/// Microseconds since the Unix epoch: the clock every process of a run shares.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A latency histogram in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// How clients prove who they are.
#[derive(Debug, Clone)]
pub enum Auth {
    /// `?user_id=<id>` (gateway in `AUTH_MODE=insecure`).
    Insecure,
    /// `?token=<HS256 JWT>` signed here with this secret, `sub` = user id, valid for an hour.
    Jwt { secret: String },
}

impl Auth {
    /// The query string for `user`.
    pub fn query(&self, user: &str) -> String {
        match self {
            Auth::Insecure => format!("user_id={user}"),
            Auth::Jwt { secret } => format!("token={}", sign_hs256(secret, user, 3600)),
        }
    }
}

/// An HS256 JWT for `sub`, expiring `ttl_secs` from now.
pub fn sign_hs256(secret: &str, sub: &str, ttl_secs: u64) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let claims = Claims {
        sub,
        exp: now_us() / 1_000_000 + ttl_secs,
    };
    sign_hs256_claims(secret, &claims)
}

/// An HS256 JWT carrying exactly `claims` (tests also sign expired or odd ones).
pub fn sign_hs256_claims(secret: &str, claims: &impl serde::Serialize) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of serializable claims cannot fail")
}

/// Where and how a pool connects.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address (`host:port` of the `ws://` URL).
    pub addr: SocketAddr,
    /// Request path, `/ws` for wsnotify.
    pub path: String,
    /// Local address to bind, so that several pools can hold more sockets to one server
    /// than one source address has ephemeral ports.
    pub src: Option<IpAddr>,
    pub auth: Auth,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// Longest a single connect + upgrade may take.
    pub connect_timeout: Duration,
}

impl Target {
    /// Parses `ws://host:port/path`.
    pub fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let addr = hostport
            .parse::<SocketAddr>()
            .map_err(|e| format!("{url}: expected ws://IP:PORT/path ({e})"))?;
        Ok((addr, path))
    }
}

/// Counters shared by every connection of a pool.
pub struct Stats {
    /// Upgrades completed (101 received).
    pub connected: AtomicU64,
    /// Connections that failed to connect or upgrade.
    pub failed: AtomicU64,
    /// Connections currently open.
    pub open: AtomicI64,
    /// Text or binary frames received.
    pub frames: AtomicU64,
    /// Payload bytes of those frames.
    pub bytes: AtomicU64,
    /// Frames without a `"t":` timestamp.
    pub untimed: AtomicU64,
    /// Close frames received from the server, by code (1001, 1008, 1009, 1013, other).
    pub closes: [AtomicU64; 5],
    /// Connections that ended without a close frame from the server.
    pub dropped: AtomicU64,
    /// Pings received (and answered).
    pub pings: AtomicU64,
    /// Wall-clock µs when the latest frame arrived.
    pub last_frame_us: AtomicU64,
    /// Wall-clock µs of the first connect attempt and of the last completed upgrade.
    pub first_connect_us: AtomicU64,
    pub last_upgrade_us: AtomicU64,
    /// Publish → receive latency of every timed frame, µs.
    pub latency: Mutex<Histogram<u64>>,
    /// Connect → 101 latency, µs.
    pub handshake: Mutex<Histogram<u64>>,
    /// Indices (within the pool) of connections that failed.
    pub failed_idx: Mutex<Vec<usize>>,
    /// Recovery frames received (tracked pools only).
    pub recoveries: AtomicU64,
    /// Connections dropped by storms.
    pub storm_dropped: AtomicU64,
    /// What each tracked connection saw (empty unless the pool tracks).
    pub tracks: Mutex<Vec<Arc<Mutex<Track>>>>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            open: AtomicI64::new(0),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            untimed: AtomicU64::new(0),
            closes: Default::default(),
            dropped: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            last_frame_us: AtomicU64::new(0),
            first_connect_us: AtomicU64::new(u64::MAX),
            last_upgrade_us: AtomicU64::new(0),
            latency: Mutex::new(new_histogram()),
            handshake: Mutex::new(new_histogram()),
            failed_idx: Mutex::new(Vec::new()),
            recoveries: AtomicU64::new(0),
            storm_dropped: AtomicU64::new(0),
            tracks: Mutex::new(Vec::new()),
        }
    }
}

/// Close codes counted separately in [`Stats::closes`].
pub const CLOSE_CODES: [u16; 4] = [1001, 1008, 1009, 1013];

/// What one tracked connection (and its reconnection after a storm) saw: every data frame's
/// sequence number (`"s"` in `data`) in the order received, the last frame's `id` (sent back
/// as `?since=` when it reconnects), and the recovery frame.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Track {
    pub user: String,
    /// `"s"` of every text frame that carried one, in order of arrival, across reconnects.
    pub seqs: Vec<u64>,
    /// `id` of the last text frame received (not the recovery frame's).
    pub last_id: Option<String>,
    /// Wall-clock µs: when the storm dropped this connection, when its reconnect attempt got
    /// a handshake slot, and when that reconnect was upgraded (0: not reached).
    pub storm_us: u64,
    pub dial_us: u64,
    pub upgraded_us: u64,
    /// The reconnect failed (refused, timed out): why.
    pub reconnect_error: Option<String>,
    /// `seqs.len()` when the storm dropped the connection.
    pub frames_before: usize,
    /// The first recovery frame after the reconnect.
    pub recovery: Option<RecoveryFrame>,
    /// Recovery frames received in all (more than one per reconnect is a bug).
    pub recovery_frames: u32,
}

/// A `wsnotify.recovery` frame as one client received it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RecoveryFrame {
    pub recovered: bool,
    pub missed: u64,
    /// Wall-clock µs when it was read.
    pub at_us: u64,
    /// It came before any other frame on the new connection, as the contract says.
    pub first: bool,
}

/// A text frame as a tracked connection parsed it.
#[derive(Debug)]
enum Seen {
    Data {
        seq: Option<u64>,
        id: Option<String>,
    },
    Recovery {
        recovered: bool,
        missed: u64,
        at_us: u64,
    },
}

impl Seen {
    fn parse(payload: &[u8], now: u64) -> Seen {
        if payload.starts_with(br#"{"type":"wsnotify.recovery""#) {
            return Seen::Recovery {
                recovered: memchr::memmem::find(payload, br#""recovered":true"#).is_some(),
                missed: number_after(payload, br#""missed":"#).unwrap_or(0),
                at_us: now,
            };
        }
        let id = memchr::memmem::find(payload, br#""id":""#).and_then(|i| {
            let rest = &payload[i + 6..];
            let end = memchr::memchr(b'"', rest)?;
            std::str::from_utf8(&rest[..end]).ok().map(str::to_owned)
        });
        Seen::Data {
            seq: number_after(payload, br#""s":"#),
            id,
        }
    }
}

impl Track {
    fn apply(&mut self, seen: Seen) -> bool {
        match seen {
            Seen::Data { seq, id } => {
                if let Some(s) = seq {
                    self.seqs.push(s);
                }
                if id.is_some() {
                    self.last_id = id;
                }
                false
            }
            Seen::Recovery {
                recovered,
                missed,
                at_us,
            } => {
                self.recovery_frames += 1;
                if self.recovery.is_none() {
                    self.recovery = Some(RecoveryFrame {
                        recovered,
                        missed,
                        at_us,
                        first: self.seqs.len() == self.frames_before,
                    });
                }
                true
            }
        }
    }
}

impl Stats {
    /// Zeroes the frame counters and the latency histogram (between phases).
    pub fn reset_frames(&self) {
        self.frames.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.untimed.store(0, Ordering::Relaxed);
        self.last_frame_us.store(0, Ordering::Relaxed);
        lock(&self.latency).reset();
    }

    fn count_close(&self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.closes[i].fetch_add(1, Ordering::Relaxed);
    }
}

pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A set of client connections driven by the current tokio runtime.
pub struct Pool {
    pub stats: Arc<Stats>,
    close_tx: watch::Sender<bool>,
    /// Bumped to drop every connection at once and reconnect it with `?since=` ([`Pool::storm`]).
    storm_tx: watch::Sender<u64>,
    /// One message per reconnect attempt after a storm: whether it was upgraded.
    storm_done: Option<mpsc::UnboundedReceiver<bool>>,
    /// Handshakes in flight; a storm holds every permit until every connection has dropped.
    sem: Arc<Semaphore>,
    concurrency: u32,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Result of [`Pool::storm`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StormOutcome {
    /// Connections dropped.
    pub dropped: u64,
    /// µs from the storm command until every connection had dropped (before any reconnect).
    #[serde(default)]
    pub drop_us: u64,
    pub reconnected: u64,
    pub failed: u64,
    /// Wall-clock µs when they were told to drop.
    pub started_us: u64,
}

impl Pool {
    /// Opens one connection per user (at most `target.concurrency` handshakes in flight) and
    /// returns once every attempt has succeeded or failed.
    /// `stats` may be read while this runs (live progress).
    pub async fn connect(target: &Target, users: &[String], stats: Arc<Stats>) -> Pool {
        Pool::connect_tracked(target, users, stats, false).await
    }

    /// [`Pool::connect`]; with `track`, every connection also records what it receives in a
    /// [`Track`] (in [`Stats::tracks`]) and can be stormed ([`Pool::storm`]).
    pub async fn connect_tracked(
        target: &Target,
        users: &[String],
        stats: Arc<Stats>,
        track: bool,
    ) -> Pool {
        let (close_tx, close_rx) = watch::channel(false);
        let (storm_tx, storm_rx) = watch::channel(0u64);
        let (storm_done_tx, storm_done) = mpsc::unbounded_channel::<bool>();
        let sem = Arc::new(Semaphore::new(target.concurrency.max(1)));
        let target = Arc::new(target.clone());
        let mut tasks = Vec::with_capacity(users.len());
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        for (idx, user) in users.iter().enumerate() {
            // Sign (or format) before the clock starts: the handshake rate is the server's.
            let request = upgrade_request(&target, user);
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            let stats = stats.clone();
            let target = target.clone();
            let mut close_rx = close_rx.clone();
            let mut storm_rx = storm_rx.clone();
            let done = done_tx.clone();
            let storm_done = storm_done_tx.clone();
            let sem = sem.clone();
            let track = track.then(|| {
                let t = Arc::new(Mutex::new(Track {
                    user: user.clone(),
                    ..Default::default()
                }));
                lock(&stats.tracks).push(t.clone());
                t
            });
            let user = user.clone();
            tasks.push(tokio::spawn(async move {
                let conn = open(&target, &request, &stats).await;
                drop(permit);
                let _ = done.send(());
                let Ok(mut conn) = conn else {
                    stats.failed.fetch_add(1, Ordering::Relaxed);
                    lock(&stats.failed_idx).push(idx);
                    return;
                };
                loop {
                    let (sock, rest) = conn;
                    let end = run(
                        sock,
                        rest,
                        &stats,
                        &mut close_rx,
                        &mut storm_rx,
                        track.as_ref(),
                    )
                    .await;
                    if matches!(end, End::Over) {
                        return;
                    }
                    // Stormed: the socket is gone; reconnect at once with `since`.
                    let dropped_at = now_us();
                    let permit = sem.clone().acquire_owned().await;
                    let since = track.as_ref().and_then(|t| {
                        let mut t = lock(t);
                        t.storm_us = dropped_at;
                        t.dial_us = now_us();
                        t.upgraded_us = 0;
                        t.reconnect_error = None;
                        t.frames_before = t.seqs.len();
                        t.recovery = None;
                        t.last_id.clone()
                    });
                    let request = upgrade_request_since(&target, &user, since.as_deref());
                    let res = open(&target, &request, &stats).await;
                    drop(permit);
                    if let Some(t) = &track {
                        let mut t = lock(t);
                        match &res {
                            Ok(_) => t.upgraded_us = now_us(),
                            Err(e) => t.reconnect_error = Some(e.to_string()),
                        }
                    }
                    let _ = storm_done.send(res.is_ok());
                    match res {
                        Ok(c) => conn = c,
                        Err(_) => return,
                    }
                }
            }));
        }
        drop(done_tx);
        // One message per attempt (the tasks live on, so the channel never closes by itself).
        for _ in 0..users.len() {
            if done_rx.recv().await.is_none() {
                break;
            }
        }
        Pool {
            stats,
            close_tx,
            storm_tx,
            storm_done: Some(storm_done),
            sem,
            concurrency: target.concurrency.max(1) as u32,
            tasks,
        }
    }

    /// Drops every open connection at once (no close frame, as a network drop or a crashed
    /// replica would) and then reconnects each at once with `?since=<last id>`, at most
    /// `target.concurrency` handshakes in flight. No reconnect starts before every connection
    /// has dropped. Returns when every reconnect attempt has succeeded or failed, or at
    /// `limit`.
    pub async fn storm(&mut self, limit: Duration) -> StormOutcome {
        let mut out = StormOutcome {
            dropped: self.stats.open.load(Ordering::Relaxed).max(0) as u64,
            started_us: now_us(),
            ..Default::default()
        };
        let Some(done) = self.storm_done.as_mut() else {
            return out;
        };
        // Hold every handshake slot until all have dropped: a drop, then a storm.
        let slots = self.sem.clone().acquire_many_owned(self.concurrency).await;
        let dropped0 = self.stats.storm_dropped.load(Ordering::Relaxed);
        self.storm_tx.send_modify(|g| *g += 1);
        let drop_limit = tokio::time::Instant::now() + limit;
        while self.stats.storm_dropped.load(Ordering::Relaxed) - dropped0 < out.dropped
            && tokio::time::Instant::now() < drop_limit
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        out.drop_us = now_us().saturating_sub(out.started_us);
        drop(slots);
        let _ = tokio::time::timeout(limit, async {
            while out.reconnected + out.failed < out.dropped {
                match done.recv().await {
                    Some(true) => out.reconnected += 1,
                    Some(false) => out.failed += 1,
                    None => break,
                }
            }
        })
        .await;
        out
    }

    /// A pool without connections that keeps `stats` (after [`Pool::close_all`]).
    pub fn empty(stats: Arc<Stats>) -> Pool {
        Pool {
            stats,
            close_tx: watch::channel(false).0,
            storm_tx: watch::channel(0).0,
            storm_done: None,
            sem: Arc::new(Semaphore::new(1)),
            concurrency: 1,
            tasks: Vec::new(),
        }
    }

    /// Sends a close frame on every connection and waits (bounded) until all have ended.
    pub async fn close_all(self, limit: Duration) {
        let _ = self.close_tx.send(true);
        let _ = tokio::time::timeout(limit, async {
            for t in self.tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}

/// `GET <path>?<auth query>`; a `{user}` in the path is the user id (nchan's `/sub/{user}`).
fn upgrade_request(target: &Target, user: &str) -> Vec<u8> {
    upgrade_request_since(target, user, None)
}

/// [`upgrade_request`] with `&since=<id>` (contract §5) when `since` is given.
fn upgrade_request_since(target: &Target, user: &str, since: Option<&str>) -> Vec<u8> {
    let sep = if target.path.contains('?') { '&' } else { '?' };
    let since = since.map_or(String::new(), |id| format!("&since={id}"));
    let path = target.path.replace("{user}", user);
    upgrade_head(
        &target.addr.to_string(),
        &format!("{path}{sep}{}{since}", target.auth.query(user)),
    )
    .into_bytes()
}

/// The RFC 6455 §1.3 example key: every client here sends it.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A browser-like upgrade request for `target` (path and query) on `host`.
pub fn upgrade_head(host: &str, target: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Connects and upgrades; returns the socket and any bytes read past the response head.
async fn open(target: &Target, request: &[u8], stats: &Stats) -> io::Result<(TcpStream, Vec<u8>)> {
    let started = now_us();
    stats.first_connect_us.fetch_min(started, Ordering::Relaxed);
    let work = async {
        let sock = match target.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(src) = target.src {
            bind_no_port(&sock);
            sock.bind(SocketAddr::new(src, 0))?;
        }
        let mut s = sock.connect(target.addr).await?;
        s.set_nodelay(true)?;
        s.write_all(request).await?;
        let mut head = Vec::with_capacity(256);
        let mut buf = [0u8; 1024];
        let end = loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed in handshake",
                ));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(i) = memchr::memmem::find(&head, b"\r\n\r\n") {
                break i + 4;
            }
            if head.len() > 16 * 1024 {
                return Err(io::Error::other("response head too large"));
            }
        };
        if !head.starts_with(b"HTTP/1.1 101") {
            let line = String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned();
            return Err(io::Error::other(format!("refused: {line}")));
        }
        Ok((s, head.split_off(end)))
    };
    let res = tokio::time::timeout(target.connect_timeout, work)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?;
    if res.is_ok() {
        let done = now_us();
        stats.connected.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.last_upgrade_us.fetch_max(done, Ordering::Relaxed);
        let _ = lock(&stats.handshake).record(done.saturating_sub(started).max(1));
    }
    res
}

/// Lets the kernel choose the source port at `connect(2)` time, per destination, instead of
/// at `bind(2)` time from one shared range.
fn bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid fd and a pointer to a c_int of the given size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

thread_local! {
    /// Shared read buffer of all connections on this thread: only a partial trailing frame is
    /// copied out of it, so 19,000 idle clients do not each hold a large buffer.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 256 * 1024]);
}

/// What a read pass found.
#[derive(Default)]
struct Pass {
    frames: u64,
    bytes: u64,
    untimed: u64,
    pings: u64,
    /// Pong frames to send (masked), one per ping.
    reply: Vec<u8>,
    /// A close frame arrived with this code.
    close: Option<u16>,
    latencies: Vec<u64>,
    /// Collect [`Seen`] for every text frame (tracked connections only).
    track: bool,
    seen: Vec<Seen>,
}

/// How a connection's read loop ended.
enum End {
    /// Closed, dropped or failed: the connection is over.
    Over,
    /// Told to drop and reconnect ([`Pool::storm`]); the socket is gone.
    Storm,
}

enum ReadEnd {
    Again,
    Eof,
}

/// A client frame: FIN + opcode, masked, with a zero mask (RFC 6455 allows any key).
fn client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    encode_frame(
        out,
        true,
        0,
        opcode,
        payload,
        Some([0; 4]),
        payload.len() as u64,
    );
}

/// Appends one frame to `out`: FIN bit, RSV bits (`rsv & 7`), opcode, the length `declared`
/// (whatever `payload` holds, so tests can lie), then `payload`, masked with `mask` if given
/// (clients must mask; `None` writes a server-style unmasked frame).
pub fn encode_frame(
    out: &mut Vec<u8>,
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    declared: u64,
) {
    out.reserve(payload.len() + 14);
    out.push((u8::from(fin) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f));
    let m = if mask.is_some() { 0x80 } else { 0 };
    if declared < 126 {
        out.push(m | declared as u8);
    } else if declared <= u64::from(u16::MAX) {
        out.push(m | 126);
        out.extend_from_slice(&(declared as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&declared.to_be_bytes());
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
}

/// A frame's header, as [`parse_head`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Bytes of header before the payload (2 to 14).
    pub len: usize,
    /// Payload bytes the header declares.
    pub payload: u64,
}

/// The header at the start of `b`, or `None` while `b` holds only part of it.
#[inline]
pub fn parse_head(b: &[u8]) -> Option<FrameHead> {
    if b.len() < 2 {
        return None;
    }
    let (len, payload) = match b[1] & 0x7f {
        126 => (4, u64::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]))),
        127 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(b.get(2..10)?);
            (10, u64::from_be_bytes(n))
        }
        n => (2, u64::from(n)),
    };
    let (len, mask) = if b[1] & 0x80 != 0 {
        let k = b.get(len..len + 4)?;
        (len + 4, Some([k[0], k[1], k[2], k[3]]))
    } else {
        (len, None)
    };
    Some(FrameHead {
        fin: b[0] & 0x80 != 0,
        opcode: b[0] & 0x0f,
        mask,
        len,
        payload,
    })
}

async fn run(
    mut s: TcpStream,
    rest: Vec<u8>,
    stats: &Stats,
    close_rx: &mut watch::Receiver<bool>,
    storm_rx: &mut watch::Receiver<u64>,
    track: Option<&Arc<Mutex<Track>>>,
) -> End {
    let mut carry = Vec::new();
    let mut pass = Pass {
        track: track.is_some(),
        ..Default::default()
    };
    if !rest.is_empty() {
        feed(&mut carry, &rest, now_us(), &mut pass);
    }
    let mut closing = false;
    let mut storms = true;
    let ended_by_close = loop {
        if flush_pass(&mut pass, stats, &mut s, closing, track)
            .await
            .is_err()
        {
            break false;
        }
        if pass.close.take().is_some() {
            break true;
        }
        tokio::select! {
            r = s.readable() => {
                if r.is_err() {
                    break false;
                }
            }
            r = storm_rx.changed(), if storms && !closing => {
                if r.is_err() {
                    // The pool is gone: no storm will come.
                    storms = false;
                    continue;
                }
                stats.open.fetch_sub(1, Ordering::Relaxed);
                stats.storm_dropped.fetch_add(1, Ordering::Relaxed);
                return End::Storm;
            }
            _ = close_rx.changed(), if !closing => {
                closing = true;
                let mut f = Vec::with_capacity(8);
                client_frame(&mut f, 0x8, &1000u16.to_be_bytes());
                if s.write_all(&f).await.is_err() {
                    break false;
                }
                continue;
            }
        }
        let end = SCRATCH.with_borrow_mut(|buf| {
            // A few reads per wake-up, then let other connections run.
            for _ in 0..8 {
                match s.try_read(buf) {
                    Ok(0) => return Some(ReadEnd::Eof),
                    Ok(n) => {
                        feed(&mut carry, &buf[..n], now_us(), &mut pass);
                        if pass.close.is_some() {
                            return None;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(ReadEnd::Again),
                    Err(_) => return Some(ReadEnd::Eof),
                }
            }
            None
        });
        match end {
            Some(ReadEnd::Eof) => {
                let _ = flush_pass(&mut pass, stats, &mut s, closing, track).await;
                break pass.close.is_some();
            }
            Some(ReadEnd::Again) => {}
            None => tokio::task::yield_now().await,
        }
    };
    stats.open.fetch_sub(1, Ordering::Relaxed);
    if !ended_by_close && !closing {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
    End::Over
}

/// Publishes a read pass's counts and answers its pings (and a close frame with the same code).
async fn flush_pass(
    pass: &mut Pass,
    stats: &Stats,
    s: &mut TcpStream,
    closing: bool,
    track: Option<&Arc<Mutex<Track>>>,
) -> io::Result<()> {
    if let Some(t) = track
        && !pass.seen.is_empty()
    {
        let mut t = lock(t);
        for seen in pass.seen.drain(..) {
            if t.apply(seen) {
                stats.recoveries.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    if pass.frames > 0 {
        stats.frames.fetch_add(pass.frames, Ordering::Relaxed);
        stats.bytes.fetch_add(pass.bytes, Ordering::Relaxed);
        stats.last_frame_us.fetch_max(now_us(), Ordering::Relaxed);
        pass.frames = 0;
        pass.bytes = 0;
    }
    if pass.untimed > 0 {
        stats.untimed.fetch_add(pass.untimed, Ordering::Relaxed);
        pass.untimed = 0;
    }
    if !pass.latencies.is_empty() {
        let mut h = lock(&stats.latency);
        for &l in &pass.latencies {
            let _ = h.record(l.max(1));
        }
        drop(h);
        pass.latencies.clear();
    }
    if pass.pings > 0 {
        stats.pings.fetch_add(pass.pings, Ordering::Relaxed);
        pass.pings = 0;
    }
    if let Some(code) = pass.close {
        stats.count_close(code);
        if !closing {
            let echo = if code == 1005 { 0 } else { 2 };
            client_frame(&mut pass.reply, 0x8, &code.to_be_bytes()[..echo]);
        }
    }
    if !pass.reply.is_empty() {
        let r = s.write_all(&pass.reply).await;
        pass.reply.clear();
        r?;
    }
    Ok(())
}

/// Parses as many whole frames as `data` (after any carried partial frame) holds.
fn feed(carry: &mut Vec<u8>, data: &[u8], now: u64, pass: &mut Pass) {
    if carry.is_empty() {
        let used = parse_frames(data, now, pass);
        if used < data.len() {
            carry.extend_from_slice(&data[used..]);
        }
    } else {
        carry.extend_from_slice(data);
        let used = parse_frames(carry, now, pass);
        carry.drain(..used);
        if carry.is_empty() && carry.capacity() > 64 * 1024 {
            *carry = Vec::new();
        }
    }
}

/// Returns the number of bytes consumed (whole frames only).
fn parse_frames(buf: &[u8], now: u64, pass: &mut Pass) -> usize {
    let mut at = 0;
    while pass.close.is_none() {
        let b = &buf[at..];
        // Servers never mask; a masked frame is skipped over all the same.
        let Some(head) = parse_head(b) else {
            break;
        };
        // `parse_head` saw the whole header, so `hdr <= b.len()`.
        let hdr = head.len;
        if ((b.len() - hdr) as u64) < head.payload {
            break;
        }
        let len = head.payload as usize;
        let payload = &b[hdr..hdr + len];
        match head.opcode {
            0x0..=0x2 => {
                pass.frames += 1;
                pass.bytes += len as u64;
                match sent_at(payload) {
                    Some(t) => pass.latencies.push(now.saturating_sub(t)),
                    None => pass.untimed += 1,
                }
                if pass.track {
                    pass.seen.push(Seen::parse(payload, now));
                }
            }
            0x8 => {
                let code = if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
                pass.close = Some(code);
            }
            0x9 => {
                pass.pings += 1;
                client_frame(&mut pass.reply, 0xA, &payload[..payload.len().min(125)]);
            }
            _ => {}
        }
        at += hdr + len;
    }
    at
}

/// The `"t":<digits>` member of a frame (the publisher's send time in unix µs).
pub fn sent_at(payload: &[u8]) -> Option<u64> {
    number_after(payload, b"\"t\":")
}

/// The first run of digits right after an occurrence of `key` (e.g. `"t":`).
fn number_after(payload: &[u8], key: &[u8]) -> Option<u64> {
    for i in memchr::memmem::find_iter(payload, key) {
        let mut v: u64 = 0;
        let mut n = 0;
        for &d in payload[i + key.len()..].iter().take(20) {
            if !d.is_ascii_digit() {
                break;
            }
            v = v * 10 + u64::from(d - b'0');
            n += 1;
        }
        if n > 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        if payload.len() < 126 {
            f.push(payload.len() as u8);
        } else if payload.len() <= 65535 {
            f.push(126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            f.push(127);
            f.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_split_anywhere_are_parsed_once() {
        let mut wire = Vec::new();
        wire.extend(server_frame(1, br#"{"id":"x","data":{"t":1000,"s":1}}"#));
        wire.extend(server_frame(9, b"hi"));
        wire.extend(server_frame(1, &[b'a'; 300]));
        wire.extend(server_frame(
            1,
            format!(r#"{{"data":{{"t":1500,"p":"{}"}}}}"#, "x".repeat(70_000)).as_bytes(),
        ));
        wire.extend(server_frame(8, &1001u16.to_be_bytes()));
        for cut in [1, 2, 3, 7, 50, 333, 4096, wire.len()] {
            let mut carry = Vec::new();
            let mut pass = Pass::default();
            for chunk in wire.chunks(cut) {
                feed(&mut carry, chunk, 2000, &mut pass);
            }
            assert_eq!(pass.frames, 3, "cut {cut}");
            assert_eq!(pass.untimed, 1);
            assert_eq!(pass.pings, 1);
            assert_eq!(pass.close, Some(1001));
            assert_eq!(pass.latencies, vec![1000, 500]);
            assert_eq!(pass.reply, vec![0x8A, 0x82, 0, 0, 0, 0, b'h', b'i']);
        }
    }

    #[test]
    fn tracked_frames() {
        let frame = br#"{"id":"0193-a","type":"lt","user_id":"u1","timestamp":"2026","data":{"t":42,"s":7,"p":"xx"}}"#;
        let rec = br#"{"type":"wsnotify.recovery","recovered":true,"missed":3,"since":"0193-a"}"#;
        let mut t = Track::default();
        assert!(!t.apply(Seen::parse(frame, 1)));
        assert_eq!(t.seqs, vec![7]);
        assert_eq!(t.last_id.as_deref(), Some("0193-a"));
        t.frames_before = 1;
        assert!(t.apply(Seen::parse(rec, 5)));
        let r = t.recovery.clone().unwrap();
        assert!(r.recovered && r.first);
        assert_eq!((r.missed, r.at_us), (3, 5));
        let unrec = br#"{"type":"wsnotify.recovery","recovered":false,"missed":0,"since":"x"}"#;
        match Seen::parse(unrec, 9) {
            Seen::Recovery {
                recovered, missed, ..
            } => assert!(!recovered && missed == 0),
            other => panic!("{other:?}"),
        }
        // The recovery frame does not replace the last id.
        assert_eq!(t.last_id.as_deref(), Some("0193-a"));
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            sent_at(br#"{"type":"x","t":"no","data":{"t":42}}"#),
            Some(42)
        );
        assert_eq!(sent_at(br#"{"data":{"s":1}}"#), None);
    }
}
