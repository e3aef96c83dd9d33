//! Raw WebSocket sockets and hand-built frames (to say exactly what goes on the wire), and
//! readings of the gateway process from `/proc` (RSS, CPU time, open descriptors). The framing
//! and `/proc` readers are the load generator's (`loadtest::client`, `loadtest::procstat`).

use std::net::SocketAddr;
use std::time::Duration;

use loadtest::client::{encode_frame, parse_head, upgrade_head};
use loadtest::procstat;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

pub use loadtest::client::now_us;

/// Bounds a wait without failing: `None` when `limit` passed.
pub async fn bounded<T>(limit: Duration, fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, fut).await.ok()
}

/// The upgrade request for `query`, as a browser would send it.
pub fn upgrade_request(query: &str) -> String {
    upgrade_head("x", &format!("/ws?{query}"))
}

/// Reads a response head (up to the blank line) and returns it.
pub async fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        let b = s.read_u8().await?;
        head.push(b);
        if head.len() > 16 * 1024 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Completes a WebSocket handshake by hand; `recv_buf` shrinks the socket's receive buffer
/// (set before connecting, so the advertised window is small too).
pub async fn raw_ws_with(addr: SocketAddr, query: &str, recv_buf: Option<u32>) -> TcpStream {
    let sock = TcpSocket::new_v4().expect("socket");
    if let Some(n) = recv_buf {
        sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
    }
    let mut s = sock.connect(addr).await.expect("connect");
    s.set_nodelay(true).ok();
    s.write_all(upgrade_request(query).as_bytes())
        .await
        .expect("write upgrade");
    let head = bounded(Duration::from_secs(15), read_head(&mut s))
        .await
        .expect("101 in time")
        .expect("read 101");
    assert!(
        head.starts_with("HTTP/1.1 101 "),
        "expected 101, got {head}"
    );
    s
}

pub async fn raw_ws(addr: SocketAddr, query: &str) -> TcpStream {
    raw_ws_with(addr, query, None).await
}

/// One client frame. `mask: None` sends it unmasked (forbidden for clients).
pub fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    frame_with_len(fin, rsv, opcode, payload, mask, payload.len() as u64)
}

/// Like [`frame`], but the header declares `declared` bytes whatever the payload holds.
pub fn frame_with_len(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
    declared: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, fin, rsv, opcode, payload, mask, declared);
    out
}

/// A masked, final client frame (what a well-behaved client sends).
pub fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(true, 0, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
}

pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One server frame: (fin, opcode, payload). Server frames must not be masked.
pub async fn read_frame(s: &mut TcpStream) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut head = Vec::with_capacity(14);
    let head = loop {
        if let Some(h) = parse_head(&head) {
            break h;
        }
        head.push(s.read_u8().await?);
    };
    assert!(head.mask.is_none(), "server frames are never masked");
    let mut payload = vec![0; head.payload as usize];
    s.read_exact(&mut payload).await?;
    Ok((head.fin, head.opcode, payload))
}

/// How a server-side close looked from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Ending {
    /// A close frame with this code (`None`: empty close payload), then the TCP close.
    Close(Option<u16>),
    /// The TCP connection ended without a close frame.
    Eof,
}

/// Reads (skipping data, pings and pongs) until the server's close frame, then checks the
/// server also ends the TCP connection. Fails the test after `limit`.
pub async fn read_close(s: &mut TcpStream, limit: Duration) -> Ending {
    let ending = bounded(limit, async {
        loop {
            match read_frame(s).await {
                Ok((_, OP_CLOSE, p)) => {
                    return Ending::Close((p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]])));
                }
                Ok(_) => continue,
                Err(_) => return Ending::Eof,
            }
        }
    })
    .await
    .expect("the server to close in time");
    if let Ending::Close(code) = ending {
        // Answer like a well-behaved client (the server may already be gone: a failed
        // connection is not waited for), then the server must end the TCP connection too
        // (RFC 6455 §7.1.1).
        let _ = s
            .write_all(&masked(OP_CLOSE, &close_payload(code.unwrap_or(1000), b"")))
            .await;
        bounded(limit, async {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        })
        .await
        .expect("the server to end the TCP connection after its close frame");
    }
    ending
}

/// Reads (answering nothing) until a text frame arrives and returns it as JSON.
pub async fn read_text(s: &mut TcpStream, limit: Duration) -> serde_json::Value {
    bounded(limit, async {
        loop {
            let (fin, op, p) = read_frame(s).await.expect("a frame");
            match op {
                OP_TEXT => {
                    assert!(fin, "notifications are single frames");
                    return serde_json::from_slice(&p).expect("frame is JSON");
                }
                OP_PING | OP_PONG => continue,
                other => panic!("expected a text frame, got opcode {other} {p:?}"),
            }
        }
    })
    .await
    .expect("a text frame in time")
}

/// Resident set size of `pid`, in KiB (0 once it is gone).
pub fn rss_kib(pid: i32) -> u64 {
    procstat::rss_bytes(pid as u32).map_or(0, |b| b / 1024)
}

/// CPU time (user + system) `pid` has used so far.
pub fn cpu_time(pid: i32) -> Duration {
    Duration::from_secs_f64(procstat::cpu_secs(pid as u32).unwrap_or(0.0))
}

/// Descriptors `pid` holds open.
pub fn open_fds(pid: i32) -> usize {
    procstat::open_fds(pid as u32).unwrap_or(0)
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    procstat::alive(pid as u32)
}

/// Sets `pid`'s open-file limit (soft and hard) with prlimit(2).
pub fn set_nofile(pid: i32, limit: u64) {
    let lim = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `lim` and writes nothing (old limit pointer is null).
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// Percentile (0–100) of a sample, by nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summary of latencies in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub n: usize,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl Latency {
    pub fn of(mut v: Vec<u64>) -> Latency {
        v.sort_unstable();
        Latency {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or(0),
        }
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} p50={:.2}ms p99={:.2}ms max={:.2}ms",
            self.n,
            self.p50 as f64 / 1000.0,
            self.p99 as f64 / 1000.0,
            self.max as f64 / 1000.0
        )
    }
}

/// What [`spawn_reader`] hands back: each notification with its arrival time in µs.
pub type Rx = tokio::sync::mpsc::UnboundedReceiver<(u64, serde_json::Value)>;

/// Takes `n` frames of `phase` from a healthy reader, in order (frames carry the publisher's
/// clock in `data.t`, the phase and their index `i`); returns their latencies in µs.
pub async fn latencies(rx: &mut Rx, phase: &str, n: u64) -> Vec<u64> {
    let mut out = Vec::new();
    super::within(&format!("{n} frames of phase {phase}"), async {
        while (out.len() as u64) < n {
            let (at, f) = rx.recv().await.expect("healthy client kept");
            assert_eq!(f["data"]["phase"], phase, "frames in order, none lost");
            assert_eq!(f["data"]["i"], out.len() as u64, "no gap, no duplicate");
            out.push(at.saturating_sub(f["data"]["t"].as_u64().unwrap()));
        }
    })
    .await;
    out
}

/// Takes `n` frames of `phase` from every healthy reader (checking order and completeness);
/// returns their latencies and the readers.
pub async fn collect(phase: &str, n: u64, rxs: Vec<Rx>) -> (Latency, Vec<Rx>) {
    let mut all = Vec::new();
    let mut back = Vec::new();
    for mut rx in rxs {
        all.extend(latencies(&mut rx, phase, n).await);
        back.push(rx);
    }
    (Latency::of(all), back)
}

/// Keeps reading a client (so it answers pings) and forwards its notifications, stamped with
/// the arrival time in µs. The channel closes when the socket does.
pub fn spawn_reader<S>(mut ws: tokio_tungstenite::WebSocketStream<S>) -> Rx
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let at = now_us();
                let v = serde_json::from_str(&t).expect("frame is JSON");
                if tx.send((at, v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}
