//! The TCP side: a [`Listener`] that owns accepting, and a per-socket handshake that answers
//! plain HTTP (`/healthz`, `/readyz`, `/metrics`, 404) or upgrades `/ws` to a [`Conn`].
//!
//! Everything before the upgrade — reading the head, checking identity, answering — runs in a
//! boxed future that is freed once the socket is upgraded: the long-lived task then holds only
//! the [`Conn`], not the memory the handshake needed (an unboxed handshake would size every
//! connection's task for its whole life).
//!
//! This module must not know how notifications arrive: it admits sockets (capacity, identity,
//! recovery) and hands each upgraded one to its [`Conn`].

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, error, warn};

use crate::api::{self, PublishApi};
use crate::auth::Authenticator;
use crate::config::HTTP_HEADROOM;
use crate::conn::{Conn, ConnContext};
use crate::frame::FrameBuf;
use crate::history::{self, History};
use crate::http::{self, Head, HeadError, Response};
use crate::mailbox::Mailbox;
use crate::metrics::{Metrics, Snapshot, inc};
use crate::registry::{ConnKey, Refused, Registry};
use crate::shutdown::{Shutdown, Slot, Tracker};

/// Longest `since` a client may send (contract §5); longer, or empty, gets 400.
const MAX_SINCE_BYTES: usize = 64;
/// Longest a reconnecting client waits for this replica to read as far as the replica it
/// comes from (see `History::wait_for`).
const RECOVERY_WAIT: Duration = Duration::from_secs(2);

/// Longest pause between accept retries after an error such as EMFILE.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Most warnings about exhausted descriptors per period.
const EXHAUSTED_LOG_EVERY: Duration = Duration::from_secs(1);
/// Kernel send buffer of each client socket (Linux allots twice this). Setting it turns off
/// Linux's send-buffer autotuning, which otherwise lets the buffer of a client that stops
/// reading grow to `net.ipv4.tcp_wmem`'s maximum (4 MiB by default): that much kernel memory
/// per stalled socket, and megabytes of frames before its `CLIENT_QUEUE_BYTES` mailbox even
/// starts to fill and the 1013 cut-off can act. Notifications are small; 64 KiB in flight is
/// ample for a reader that keeps up.
const SEND_BUFFER_BYTES: libc::c_int = 64 * 1024;

/// What every socket handler shares.
pub struct ServerContext {
    pub auth: Authenticator,
    pub registry: Arc<Registry>,
    /// Recent notifications, for clients reconnecting with `?since=`.
    pub history: Arc<History>,
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<Tracker>,
    /// What each upgraded connection is given.
    pub conn: Arc<ConnContext>,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub handshake_timeout: Duration,
    /// False once shutdown has begun.
    pub accepting: AtomicBool,
    /// `POST /api/publish`, when a key is configured.
    pub publish_api: Option<PublishApi>,
    /// No broker: readiness does not wait for one.
    pub standalone: bool,
}

impl ServerContext {
    /// `/readyz`: accepting connections and consuming from the broker with the recovery
    /// history filled (or standalone).
    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire)
            && (self.standalone || (self.metrics.broker_up.load(Ordering::Acquire) && self.warm()))
    }

    /// The recovery history holds its window (always, standalone): until then a replica takes
    /// no client that asks for recovery, since it could not vouch for its `since`.
    fn warm(&self) -> bool {
        self.standalone || self.metrics.history_warm.load(Ordering::Acquire)
    }

    /// What `/metrics` reports besides the counters.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            connections: self.registry.connections(),
            max_connections: self.max_connections,
            users: self.registry.users(),
            sockets: self.tracker.open(),
            ready: self.ready(),
            history: self.history.stats(crate::amqp::log::unix_ms()),
            queued_bytes: self.registry.queued_bytes(),
            latency: self.registry.latency(),
        }
    }
}

/// Owns the listening socket and spawns a task per accepted socket.
pub struct Listener {
    pub listener: TcpListener,
    pub shared: Arc<ServerContext>,
    pub shutdown: Shutdown,
}

impl Listener {
    /// Accepts until shutdown.
    ///
    /// Out of descriptors (EMFILE/ENFILE), a connection waiting in the backlog is refused with
    /// 503 at once: the listener keeps one descriptor in reserve (`/dev/null`), gives it up to
    /// accept that connection, answers and closes it, and takes the reserve back. Without it,
    /// the excess would hang in the backlog until the client gives up. Other errors from
    /// `accept(2)` (and EMFILE when the reserve cannot be had) are retried after a pause that
    /// doubles up to a second: the pending connection stays in the backlog, so retrying at once
    /// would spin a core at 100 %.
    pub async fn run(mut self) {
        let mut backoff = Duration::ZERO;
        let mut reserve = std::fs::File::open("/dev/null").ok();
        let mut exhausted_logged: Option<std::time::Instant> = None;
        loop {
            let accepted = tokio::select! {
                res = self.listener.accept() => res,
                _ = self.shutdown.recv() => break,
            };
            match accepted {
                Ok((sock, _peer)) => {
                    backoff = Duration::ZERO;
                    self.dispatch(sock);
                }
                Err(e) if out_of_descriptors(&e) && reserve.is_some() => {
                    inc(&self.shared.metrics.accept_errors);
                    drop(reserve.take());
                    if let Some(Ok((sock, _))) =
                        futures_util::FutureExt::now_or_never(self.listener.accept())
                    {
                        inc(&self.shared.metrics.handshakes_over_capacity);
                        refuse_now(sock, &Response::text(503, "out of file descriptors\n"));
                    }
                    reserve = std::fs::File::open("/dev/null").ok();
                    if exhausted_logged.is_none_or(|t| t.elapsed() >= EXHAUSTED_LOG_EVERY) {
                        exhausted_logged = Some(std::time::Instant::now());
                        warn!(error = %e, "accept failed: out of file descriptors, refusing new connections with 503");
                    }
                }
                Err(e) => {
                    inc(&self.shared.metrics.accept_errors);
                    backoff = (backoff * 2).clamp(Duration::from_millis(5), ACCEPT_BACKOFF_MAX);
                    if backoff == ACCEPT_BACKOFF_MAX || backoff == Duration::from_millis(5) {
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "accept failed");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.recv() => break,
                    }
                }
            }
        }
    }

    fn dispatch(&self, sock: TcpStream) {
        let shared = &self.shared;
        let limit = shared.max_connections + HTTP_HEADROOM;
        let Some(slot) = shared.tracker.try_acquire(limit) else {
            // Out of sockets: answer without spawning anything and hang up.
            inc(&shared.metrics.handshakes_over_capacity);
            refuse_now(sock, &Response::text(503, "too many connections\n"));
            return;
        };
        let _ = sock.set_nodelay(true);
        set_send_buffer(&sock, SEND_BUFFER_BYTES);
        let shared = shared.clone();
        let shutdown = self.shutdown.clone();
        // A hand-written task future: the handshake is boxed and freed once the socket is
        // upgraded, so an idle connection's task holds only its `Conn` (see `conn::Task`).
        tokio::spawn(crate::conn::Task::Handshake(Box::pin(handshake(
            sock, shared, slot, shutdown,
        ))));
    }
}

/// Fixes the socket's `SO_SNDBUF` (see [`SEND_BUFFER_BYTES`]). Best effort: on failure the
/// kernel default stays.
fn set_send_buffer(sock: &TcpStream, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt only reads the `c_int` we pass, for the length we give, on a
    // descriptor the stream keeps open for the duration of the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw const bytes).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// EMFILE (this process) or ENFILE (the whole system).
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Answers a socket that gets no task, and closes it, without waiting: reads what the client
/// already sent (closing with unread data would reset the connection and could destroy the
/// answer before the client reads it), writes `r` and half-closes. Works on the plain
/// descriptor: a socket just accepted has no readiness in the reactor yet, so tokio's
/// `try_read`/`try_write` would not even try.
fn refuse_now(sock: TcpStream, r: &Response<'_>) {
    use std::io::{Read, Write};
    let Ok(mut s) = sock.into_std() else {
        return;
    };
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        match s.read(&mut buf) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let _ = s.write(&r.encode());
    let _ = s.shutdown(std::net::Shutdown::Write);
}

/// Reads the request head and answers it; returns the connection if it was upgraded.
async fn handshake(
    mut sock: TcpStream,
    shared: Arc<ServerContext>,
    slot: Slot,
    mut shutdown: Shutdown,
) -> Option<Conn> {
    let deadline = shared.handshake_timeout;
    let head = tokio::select! {
        res = tokio::time::timeout(deadline, http::read_head(&mut sock, shared.max_header_bytes)) => res,
        _ = shutdown.recv() => return None,
    };
    let head = match head {
        Err(_) => {
            inc(&shared.metrics.handshakes_timed_out);
            let _ = sock
                .try_write(&Response::text(408, "request head not received in time\n").encode());
            return None;
        }
        Ok(Err(HeadError::TooLarge)) => {
            return answer(&mut sock, Response::text(431, "request head too large\n")).await;
        }
        Ok(Err(HeadError::Malformed)) => {
            return answer(&mut sock, Response::text(400, "malformed request\n")).await;
        }
        Ok(Err(HeadError::Closed | HeadError::Io(_))) => return None,
        Ok(Ok(head)) => head,
    };
    match (head.method.as_str(), head.path.as_str()) {
        (_, "/ws") => {
            let upgraded = tokio::time::timeout(deadline, upgrade(sock, head, &shared, slot)).await;
            upgraded.ok().flatten()
        }
        (_, "/api/publish") => {
            let api = shared.publish_api.as_ref();
            let local = api::Local {
                registry: &shared.registry,
                history: &shared.history,
            };
            api::handle(&mut sock, head, api, local, &shared.metrics, deadline).await;
            None
        }
        ("GET", "/healthz") => answer(&mut sock, Response::text(200, "ok\n")).await,
        ("GET", "/readyz") => {
            let r = if shared.ready() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, "not ready\n")
            };
            answer(&mut sock, r).await
        }
        ("GET", "/metrics") => {
            let mut body = shared.metrics.render(&shared.snapshot());
            // Off the runtime's workers: counting open descriptors lists one /proc entry per
            // socket (~25 ms at 19,000 connections), which would stall that worker's sockets.
            let process = tokio::task::spawn_blocking(|| {
                let mut out = String::new();
                crate::metrics::render_process(&mut out);
                out
            });
            body.push_str(&process.await.unwrap_or_default());
            let r = Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: body.as_bytes(),
                headers: &[],
            };
            answer(&mut sock, r).await
        }
        (_, "/healthz" | "/readyz" | "/metrics") => {
            answer(
                &mut sock,
                Response::text(405, "method not allowed\n").with_headers(&[("Allow", "GET")]),
            )
            .await
        }
        _ => answer(&mut sock, Response::text(404, "not found\n")).await,
    }
}

async fn answer(sock: &mut TcpStream, r: Response<'_>) -> Option<Conn> {
    let _ = tokio::time::timeout(Duration::from_secs(5), r.send(sock)).await;
    None
}

/// Checks a `/ws` request, authenticates it, and completes the RFC 6455 handshake.
async fn upgrade(
    mut sock: TcpStream,
    head: Head,
    shared: &Arc<ServerContext>,
    slot: Slot,
) -> Option<Conn> {
    let m = &shared.metrics;
    let since = query_param(head.query.as_deref(), "since");
    let checked = if head.method != "GET" {
        Err((405, "WebSocket upgrade needs GET\n"))
    } else if !head.upgrade_websocket {
        Err((426, "this endpoint speaks WebSocket only\n"))
    } else if !head.http11 || !head.connection_upgrade || !valid_key(head.ws_key.as_deref()) {
        Err((400, "invalid WebSocket handshake\n"))
    } else if head.ws_version.as_deref() != Some("13") {
        Err((426, "unsupported WebSocket version\n"))
    } else if since
        .as_ref()
        .is_some_and(|s| s.is_empty() || s.len() > MAX_SINCE_BYTES)
    {
        Err((400, "since must be 1 to 64 bytes\n"))
    } else if !shared.accepting.load(Ordering::Acquire) {
        Err((503, "shutting down\n"))
    } else if since.is_some() && !shared.warm() {
        // It could not vouch for the gap yet: the client should try another replica.
        Err((503, "starting: still reading the recent notifications\n"))
    } else if shared.registry.connections() >= shared.max_connections {
        inc(&m.handshakes_over_capacity);
        return answer(&mut sock, Response::text(503, "too many connections\n")).await;
    } else {
        Ok(())
    };
    if let Err((status, msg)) = checked {
        inc(&m.handshakes_bad_request);
        let headers: &[(&str, &str)] = if status == 426 {
            &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
        } else {
            &[]
        };
        return answer(&mut sock, Response::text(status, msg).with_headers(headers)).await;
    }
    let identity = match shared
        .auth
        .authenticate(head.query.as_deref(), head.bearer.as_deref())
    {
        Ok(id) => id,
        Err(why) => {
            inc(&m.handshakes_unauthorized);
            debug!(reason = %why.0, "handshake refused");
            let r = Response::text(401, "unauthorized\n")
                .with_headers(&[("WWW-Authenticate", "Bearer")]);
            return answer(&mut sock, r).await;
        }
    };

    // Register before answering 101: a message routed from the moment the client sees the
    // socket open waits in the mailbox and is written right after the 101. With `since`, the
    // registration happens under the history's lock (see `history`), and the replay goes in
    // front of whatever live frames arrive meanwhile.
    let register = |covered| {
        let mailbox = Arc::new(Mailbox::new(identity.expires_at));
        let key =
            shared
                .registry
                .register_recovering(identity.user.clone(), mailbox.clone(), covered);
        key.map(|key| (mailbox, key))
    };
    let (registered, replay) = match &since {
        None => (register(0), None),
        Some(since) => {
            let now = crate::amqp::log::unix_ms();
            shared.history.wait_for(since, now, RECOVERY_WAIT).await;
            let limit = shared.registry.queue_limit();
            let (r, replay) = shared
                .history
                .attach(&identity.user, since, limit, register);
            (r, Some(replay))
        }
    };
    let (mailbox, key) = match registered {
        Ok(registered) => registered,
        Err(Refused::Closing) => {
            return answer(&mut sock, Response::text(503, "shutting down\n")).await;
        }
        Err(Refused::UserLimit) => {
            inc(&m.handshakes_user_limit);
            let r = Response::text(429, "too many connections for this user\n");
            return answer(&mut sock, r).await;
        }
    };
    if let (Some(since), Some(replay)) = (&since, replay) {
        recover(shared, &mailbox, key, &identity.user, since, replay);
    }
    let accept =
        tungstenite::handshake::derive_accept_key(head.ws_key.as_deref().unwrap_or("").as_bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if sock.write_all(response.as_bytes()).await.is_err() {
        shared.registry.unregister(key);
        return None;
    }
    inc(&m.handshakes_accepted);
    Some(Conn::new(
        sock,
        head.rest,
        mailbox,
        key,
        shared.conn.clone(),
        slot,
    ))
}

/// Queues a recovering connection's first frames: the `wsnotify.recovery` status, then the
/// missed notifications exactly as first sent (contract §5).
fn recover(
    shared: &ServerContext,
    mailbox: &Mailbox,
    at: ConnKey,
    user: &str,
    since: &str,
    replay: history::Replay,
) {
    let m = &shared.metrics;
    inc(match replay.result {
        history::Recovery::Recovered => &m.recoveries_recovered,
        history::Recovery::Unknown => &m.recoveries_unknown,
        history::Recovery::TooLarge => &m.recoveries_too_large,
    });
    let recovered = replay.result == history::Recovery::Recovered;
    let missed = replay.missed.len();
    let mut status = FrameBuf::with_capacity(96 + since.len());
    status.push(b"{\"type\":\"wsnotify.recovery\",\"recovered\":");
    status.push(if recovered { b"true" } else { b"false" });
    status.push(format!(",\"missed\":{missed},\"since\":").as_bytes());
    status.push_str_literal(since);
    status.push(b"}");
    let mut frames = Vec::with_capacity(1 + missed);
    frames.push(status.finish().wire().clone());
    for n in &replay.missed {
        let to = (!n.is_broadcast()).then_some(user);
        frames.push(n.frame(to).wire().clone());
    }
    m.frames_replayed
        .fetch_add(missed as u64, Ordering::Relaxed);
    shared.registry.prepend(at, mailbox, frames);
}

/// The percent-decoded value of `name` in a query string, if present.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// `Sec-WebSocket-Key` must be 16 bytes, base64-encoded (RFC 6455 §4.1).
fn valid_key(key: Option<&str>) -> bool {
    key.is_some_and(|k| {
        k.len() == 24
            && k.ends_with("==")
            && k[..22]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    })
}

/// Listen backlog: tokio's `TcpListener::bind` uses 128, which drops SYNs (1 s client
/// retransmits) when thousands of clients reconnect at once after a replica restarts.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket, naming the address in the error.
pub async fn bind(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let listen = || -> io::Result<TcpListener> {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.bind(addr)?;
        sock.listen(LISTEN_BACKLOG)
    };
    listen().inspect_err(|e| error!(%addr, error = %e, "cannot listen"))
}
