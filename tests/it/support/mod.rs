//! Test harness: the real `wsnotify` binary as a child process, the real local RabbitMQ, and
//! real WebSocket clients. Every test gets its own queue names and an OS-assigned port, and
//! removes its queues when it ends (even when it fails).
//!
//! [`raw`]: hand-built WebSocket frames on raw sockets and readings of `/proc`;
//! [`cluster`]: a throwaway 3-node RabbitMQ cluster.
#![allow(dead_code)]

pub mod cluster;
mod raw;

pub use raw::*;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The broker when `AMQP_URL` is not set (`scripts/test.sh` exports it).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker every test uses: `AMQP_URL`, or [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> &'static str {
    static URL: LazyLock<String> = LazyLock::new(|| {
        std::env::var("AMQP_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned())
    });
    &URL
}

/// Connection arguments for [`amqp_url`].
pub fn amqp_args() -> OpenConnectionArguments {
    loadtest::publish::parse_amqp_url(amqp_url())
        .unwrap_or_else(|e| panic!("AMQP_URL for the tests: {e}"))
}

/// Tests share one process (and its 20,000 open files) and two cores. A test that opens
/// thousands of sockets or asserts latency, CPU or memory holds [`heavy`] for its whole run and
/// so runs alone; every other test holds [`light`] (or [`light_blocking`]) and runs beside
/// other light tests. The lock is fair: once a heavy test waits, light tests that start later
/// wait behind it.
static LOAD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Runs the calling test alone (see [`LOAD`]).
pub async fn heavy() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    LOAD.write().await
}

/// Lets the calling test run beside other light tests, never beside a heavy one.
pub async fn light() -> tokio::sync::RwLockReadGuard<'static, ()> {
    LOAD.read().await
}

/// [`light`] for a synchronous `#[test]`.
pub fn light_blocking() -> tokio::sync::RwLockReadGuard<'static, ()> {
    LOAD.blocking_read()
}

/// `rabbitmqctl ARGS…` against the local node, without blocking the test's runtime; bounded
/// by [`WAIT`].
pub async fn rabbitmqctl(args: &[&str]) -> std::process::Output {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .kill_on_drop(true)
        .output();
    within(&format!("rabbitmqctl {args:?}"), out)
        .await
        .expect("rabbitmqctl")
}

/// The broker-side name of the AMQP connection of gateway `pid` (its `connection_name` is
/// `wsnotify <pid>`), once the broker lists it.
pub async fn broker_connection_of(pid: i32) -> Option<String> {
    let out = rabbitmqctl(&["list_connections", "pid", "client_properties", "-q"]).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"wsnotify {pid}\"")))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
}
/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(15);

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A name no other test (or earlier run) uses.
pub fn unique(name: &str) -> String {
    format!(
        "wsn_test_{name}_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

/// Fails the test with `what` if `fut` takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// A running gateway process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub queue: String,
    log: Arc<(Mutex<Vec<String>>, Notify)>,
}

impl Gateway {
    /// Starts the gateway on `queue` with insecure auth (unless `env` says otherwise) and waits
    /// until `/readyz` says it consumes.
    pub async fn start(queue: &str, env: &[(&str, &str)]) -> Gateway {
        let g = Self::spawn(queue, env).await;
        g.wait_ready().await;
        g
    }

    /// Starts the gateway and waits only until it listens.
    pub async fn spawn(queue: &str, env: &[(&str, &str)]) -> Gateway {
        let mut with_broker = vec![("AMQP_URL", amqp_url())];
        with_broker.extend_from_slice(env);
        Self::spawn_without_broker(queue, &with_broker).await
    }

    /// Starts the gateway with no `AMQP_URL` unless `env` gives one (standalone mode).
    pub async fn spawn_without_broker(queue: &str, env: &[(&str, &str)]) -> Gateway {
        Self::spawn_with(queue, env, |_| {}).await
    }

    /// Like [`Gateway::spawn_without_broker`], with `adjust` applied to the command last
    /// (e.g. to set the child's resource limits).
    pub async fn spawn_with(
        queue: &str,
        env: &[(&str, &str)],
        adjust: impl FnOnce(&mut Command),
    ) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsnotify"));
        cmd.env_clear()
            .env("SERVER_HOST", "127.0.0.1")
            .env("SERVER_PORT", "0")
            .env("NOTIFY_QUEUE", queue)
            .env("AUTH_MODE", "insecure")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        adjust(&mut cmd);
        let mut child = cmd.spawn().expect("spawn wsnotify");
        let log: Arc<(Mutex<Vec<String>>, Notify)> = Arc::default();
        for pipe in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.0.lock().push(line);
                    log.1.notify_waiters();
                }
            });
        }
        let mut g = Gateway {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            queue: queue.to_owned(),
            log,
        };
        let line = g.wait_log("listening").await;
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .unwrap_or_else(|| panic!("no addr in {line}"));
        g.addr = addr.parse().unwrap();
        g
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn wait_log(&self, needle: &str) -> String {
        let log = self.log.clone();
        within(&format!("log line {needle:?}"), async move {
            loop {
                let notified = log.1.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(l) = log.0.lock().iter().find(|l| l.contains(needle)) {
                    return l.clone();
                }
                notified.await;
            }
        })
        .await
    }

    pub fn log_text(&self) -> String {
        self.log.0.lock().join("\n")
    }

    pub async fn wait_ready(&self) {
        self.wait_status("/readyz", 200).await;
    }

    /// Polls `path` until it answers `status` (a readiness probe is polled by design).
    pub async fn wait_status(&self, path: &str, status: u16) {
        within(&format!("{path} → {status}"), async {
            loop {
                if self.get(path).await.0 == status {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// A plain HTTP GET; returns status and body.
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path, &[]).await
    }

    /// The value of a metric line (`name{labels}` exactly as rendered).
    pub async fn metric(&self, series: &str) -> u64 {
        let (_, body) = self.get("/metrics").await;
        loadtest::prom::value(&body, series)
            .unwrap_or_else(|| panic!("metric {series} missing in:\n{body}")) as u64
    }

    /// Waits until a metric reaches `want`.
    pub async fn wait_metric(&self, series: &str, want: u64) {
        within(&format!("{series} == {want}"), async {
            loop {
                if self.metric(series).await == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// Connects as `user` (insecure mode) and waits until the gateway has registered the
    /// connection, so a message published next will find it.
    pub async fn connect_user(&self, user: &str) -> Ws {
        let before = self
            .metric("wsnotify_handshakes_total{result=\"accepted\"}")
            .await;
        let ws = connect(&self.ws_url(&format!("user_id={user}"))).await;
        within("registration", async {
            while self
                .metric("wsnotify_handshakes_total{result=\"accepted\"}")
                .await
                <= before
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        ws
    }

    /// The process id; 0 once the child has been reaped (never pass that to `kill`).
    pub fn pid(&self) -> i32 {
        self.child.id().map(|p| p as i32).unwrap_or(0)
    }

    /// Sends `sig` to the gateway, if it has not been reaped yet: `kill(0, …)` would signal
    /// the test runner's whole process group.
    pub fn signal(&self, sig: i32) {
        let Some(pid) = self.child.id() else {
            return;
        };
        // SAFETY: kill(2) on our own child's pid, which is still ours: tokio reaps it only in
        // `wait`, after which `id()` is `None`.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }

    /// Waits for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("gateway did not exit in time")
            .expect("wait")
            .code()
    }
}

/// A raw HTTP/1.1 GET with extra headers; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let raw = http_raw(addr, &loadtest::prom::get_request(addr, path, headers)).await;
    parse_response(&raw)
}

pub use loadtest::prom::parse_response;

/// Sends raw bytes and returns everything the server answers before closing.
pub async fn http_raw(addr: SocketAddr, request: &str) -> String {
    let raw = within(
        "HTTP response",
        loadtest::prom::exchange(addr, request.as_bytes()),
    )
    .await
    .expect("connect and write");
    String::from_utf8_lossy(&raw).into_owned()
}

pub async fn connect(url: &str) -> Ws {
    within("WebSocket connect", tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
}

/// Result of trying to connect: the HTTP status of a refused handshake.
pub async fn connect_status(url: &str, headers: &[(&str, &str)]) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            tokio_tungstenite::tungstenite::http::HeaderValue::from_str(v).unwrap(),
        );
    }
    match within("WebSocket connect", tokio_tungstenite::connect_async(req)).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// The next notification frame, as JSON. Pings are skipped; a close fails the test.
pub async fn next_frame(ws: &mut Ws) -> serde_json::Value {
    within("a frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).expect("frame is JSON");
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    })
    .await
}

/// Reads until the server closes; returns the close frame (frames before it are skipped).
pub async fn next_close<S>(ws: &mut WebSocketStream<S>) -> Option<CloseFrame>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    within("a close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return c,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before close: {e}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    })
    .await
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
}

/// A connection to the broker for publishing and inspecting queues.
pub struct Broker {
    conn: Connection,
    pub ch: Channel,
    cleanup: Vec<String>,
}

impl Broker {
    pub async fn connect() -> Broker {
        let conn = within("broker connect", Connection::open(&amqp_args()))
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {}: {e}", amqp_url()));
        let ch = conn.open_channel(None).await.expect("channel");
        Broker {
            conn,
            ch,
            cleanup: Vec::new(),
        }
    }

    /// Remembers queues to delete when the broker handle is dropped.
    pub fn cleanup(&mut self, queue: &str) {
        self.cleanup.push(queue.to_owned());
        self.cleanup.push(format!("{queue}.dead"));
    }

    /// Declares `queue` as a backend would: plain, durable, no arguments.
    pub async fn declare(&mut self, queue: &str) {
        self.cleanup(queue);
        self.ch
            .queue_declare(QueueDeclareArguments::durable_client_named(queue))
            .await
            .expect("declare");
    }

    pub async fn publish(&self, queue: &str, body: &[u8]) {
        let props = BasicProperties::default().with_persistence(true).finish();
        self.ch
            .basic_publish(props, body.to_vec(), BasicPublishArguments::new("", queue))
            .await
            .expect("publish");
    }

    pub async fn publish_json(&self, queue: &str, v: &serde_json::Value) {
        self.publish(queue, v.to_string().as_bytes()).await;
    }

    /// Messages ready in `queue`.
    pub async fn count(&self, queue: &str) -> u32 {
        let ch = self.conn.open_channel(None).await.expect("channel");
        let r = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .expect("passive declare")
            .map(|(_, n, _)| n)
            .unwrap_or(0);
        let _ = ch.close().await;
        r
    }

    /// Consumes `n` messages from `queue` (acking them) and returns headers and bodies.
    pub async fn take(&self, queue: &str, n: usize) -> Vec<(Option<FieldTable>, Vec<u8>)> {
        let ch = self.conn.open_channel(None).await.expect("channel");
        let tag = unique("take");
        let (_, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, &tag)
                    .auto_ack(true)
                    .finish(),
            )
            .await
            .expect("consume");
        let mut out = Vec::new();
        within(&format!("{n} messages in {queue}"), async {
            while out.len() < n {
                let m = rx.recv().await.expect("consumer closed");
                out.push((
                    m.basic_properties.and_then(|p| p.headers().cloned()),
                    m.content.unwrap_or_default(),
                ));
            }
        })
        .await;
        let _ = ch.close().await;
        out
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.cleanup);
        if queues.is_empty() {
            return;
        }
        // Drop cannot await: delete on a helper thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(conn) = Connection::open(&amqp_args()).await
                    && let Ok(ch) = conn.open_channel(None).await
                {
                    for q in queues {
                        let _ = ch.queue_delete(QueueDeleteArguments::new(&q)).await;
                        // The gateway's fan-out log for this notify queue.
                        if !q.ends_with(".dead") {
                            let _ = ch
                                .queue_delete(QueueDeleteArguments::new(&format!("{q}.log")))
                                .await;
                        }
                    }
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// A user-targeted envelope.
pub fn to_user(user: &str, message_type: &str, data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"type": "websocket_notification",
        "payload": {"user_id": user, "message_type": message_type, "data": data}})
}

/// A broadcast envelope.
pub fn to_all(message_type: &str, data: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"type": "websocket_notification",
        "payload": {"broadcast": true, "message_type": message_type, "data": data}})
}
