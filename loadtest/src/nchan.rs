//! nginx with the nchan module as a second baseline: what many teams run for this job.
//!
//! * [`render_config`] fills in `loadtest/nchan.conf` (one worker, subscribers on
//!   `/sub/<user>` multiplexed onto the user's channel and a shared `broadcast` channel,
//!   publishers on `/pub/<channel>`);
//! * [`HttpPublisher`] publishes the way nchan's users do: HTTP `POST /pub/<channel>` over a
//!   few keep-alive connections, no broker. The body is the frame itself, in the shape wsnotify
//!   writes (with the `"t"` send time in `data`), because nchan sends the body unchanged as one
//!   WebSocket text frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::publish::Data;

/// The nginx configuration template (placeholders `@DIR@` and `@PORT@`).
pub const CONFIG: &str = include_str!("../nchan.conf");

/// Subscriber path for the client pool (`{user}` is replaced per connection).
pub const SUB_PATH: &str = "/sub/{user}";

/// Channel every subscriber also listens on.
pub const BROADCAST_CHANNEL: &str = "broadcast";

/// The configuration for a server rooted at `dir` listening on 127.0.0.1:`port`.
pub fn render_config(dir: &str, port: u16) -> String {
    CONFIG
        .replace("@DIR@", dir)
        .replace("@PORT@", &port.to_string())
}

/// Longest one publish (request and response) may take.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// Publishes frames to nchan over `conns` keep-alive HTTP/1.1 connections, one request in
/// flight on each.
pub struct HttpPublisher {
    senders: Vec<mpsc::Sender<(String, String)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    next: usize,
    data: Data,
    /// Requests that failed or were answered with something other than 2xx.
    pub failed: Arc<AtomicU64>,
}

impl HttpPublisher {
    pub async fn connect(
        addr: SocketAddr,
        conns: usize,
        frame_bytes: usize,
    ) -> Result<HttpPublisher, String> {
        let failed = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..conns.max(1) {
            let sock = connect(addr).await?;
            let (tx, rx) = mpsc::channel(1024);
            senders.push(tx);
            tasks.push(tokio::spawn(post_loop(addr, sock, rx, failed.clone())));
        }
        Ok(HttpPublisher {
            senders,
            tasks,
            next: 0,
            data: Data::new(frame_bytes),
            failed,
        })
    }

    fn frame(&mut self, user: Option<&str>) -> String {
        let id = uuid::Uuid::now_v7();
        let ts = crate::baseline::timestamp();
        let data = self.data.stamp();
        match user {
            Some(u) => format!(
                r#"{{"id":"{id}","type":"lt","user_id":"{u}","timestamp":"{ts}","data":{data}}}"#
            ),
            None => format!(r#"{{"id":"{id}","type":"lt","timestamp":"{ts}","data":{data}}}"#),
        }
    }

    async fn post(&mut self, channel: &str, body: String) -> Result<(), String> {
        self.next = (self.next + 1) % self.senders.len();
        self.senders[self.next]
            .send((format!("/pub/{channel}"), body))
            .await
            .map_err(|_| "nchan publisher connection ended".to_owned())
    }

    /// One broadcast: a frame on the shared channel.
    pub async fn broadcast(&mut self) -> Result<(), String> {
        let body = self.frame(None);
        self.post(BROADCAST_CHANNEL, body).await
    }

    /// One frame for `user`, on the user's channel.
    pub async fn to_user(&mut self, user: &str) -> Result<(), String> {
        let body = self.frame(Some(user));
        self.post(user, body).await
    }

    /// Waits (bounded) until every queued request has been answered, and closes.
    pub async fn close(self) {
        drop(self.senders);
        let _ = tokio::time::timeout(Duration::from_secs(30), async {
            for t in self.tasks {
                let _ = t.await;
            }
        })
        .await;
    }
}

async fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(REQUEST_LIMIT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("nchan at {addr}: connect timed out"))?
        .map_err(|e| format!("nchan at {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

async fn post_loop(
    addr: SocketAddr,
    mut sock: TcpStream,
    mut rx: mpsc::Receiver<(String, String)>,
    failed: Arc<AtomicU64>,
) {
    let mut buf = Vec::with_capacity(4096);
    while let Some((path, body)) = rx.recv().await {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let ok = tokio::time::timeout(REQUEST_LIMIT, exchange(&mut sock, req.as_bytes(), &mut buf))
            .await
            .unwrap_or(Err(()));
        if ok.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
            // The connection is in an unknown state: start a new one.
            match connect(addr).await {
                Ok(s) => sock = s,
                Err(_) => return,
            }
        }
    }
}

/// Writes one request and reads its response; `Err` unless the status is 2xx.
async fn exchange(sock: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<(), ()> {
    sock.write_all(req).await.map_err(|_| ())?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = sock.read(&mut chunk).await.map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(buf) {
            Ok(httparse::Status::Complete(head)) => {
                let len: usize = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0);
                let status = resp.code.unwrap_or(0);
                // The response must be read whole before the next request on this connection.
                while buf.len() < head + len {
                    let n = sock.read(&mut chunk).await.map_err(|_| ())?;
                    if n == 0 {
                        return Err(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                return if (200..300).contains(&status) {
                    Ok(())
                } else {
                    Err(())
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {}
            _ => return Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_filled_in() {
        let c = render_config("/tmp/x", 4321);
        assert!(c.contains("listen 127.0.0.1:4321 backlog=4096;"));
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(!c.contains('@'));
        assert!(c.contains("nchan_channel_id $1 broadcast;"));
    }
}
