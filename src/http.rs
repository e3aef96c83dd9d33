//! Just enough HTTP/1.1 for the one request every socket starts with: read a bounded request
//! head, parse it with `httparse` (the parser tungstenite itself uses), and write small,
//! complete responses. Every non-WebSocket response closes the connection; health checks and
//! scrapes do not need keep-alive, and it keeps this module free of connection state.
//!
//! This module must not know about WebSockets, routing or identity: [`server`](crate::server)
//! decides what to answer.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Headers beyond this count get 431, like a head over the byte limit.
const MAX_HEADERS: usize = 48;

/// The parts of a request head the gateway looks at.
#[derive(Debug, Default)]
pub struct Head {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// HTTP/1.1 (WebSocket needs it; 1.0 is answered but cannot upgrade).
    pub http11: bool,
    /// `Upgrade` lists the `websocket` token.
    pub upgrade_websocket: bool,
    /// `Connection` lists the `upgrade` token.
    pub connection_upgrade: bool,
    pub ws_key: Option<String>,
    pub ws_version: Option<String>,
    /// The credentials of `Authorization: Bearer …`.
    pub bearer: Option<String>,
    pub content_length: Option<usize>,
    /// `Transfer-Encoding` was given (chunked bodies are not supported: 411).
    pub transfer_encoding: bool,
    /// Bytes the client sent after the head (handed to the WebSocket codec).
    pub rest: Vec<u8>,
}

#[derive(Debug)]
pub enum HeadError {
    /// Over `MAX_HEADER_BYTES` or too many headers: 431.
    TooLarge,
    /// Not HTTP: 400.
    Malformed,
    /// The peer closed before a complete head.
    Closed,
    Io(io::Error),
}

/// Reads one request head of at most `max` bytes. The caller bounds the time.
pub async fn read_head(sock: &mut TcpStream, max: usize) -> Result<Head, HeadError> {
    let mut buf: Vec<u8> = Vec::with_capacity(max.min(1024));
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= max {
                return Err(HeadError::TooLarge);
            }
            buf.reserve((buf.len() * 2).min(max) - buf.len());
        }
        let n = sock.read_buf(&mut buf).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => return Ok(head_of(&req, buf[len..].to_vec())),
            Ok(httparse::Status::Partial) if buf.len() >= max => return Err(HeadError::TooLarge),
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
            Err(_) => return Err(HeadError::Malformed),
        }
    }
}

fn head_of(req: &httparse::Request<'_, '_>, rest: Vec<u8>) -> Head {
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let mut head = Head {
        method: req.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query,
        http11: req.version == Some(1),
        rest,
        ..Head::default()
    };
    for h in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(h.value) else {
            continue;
        };
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("upgrade") {
            head.upgrade_websocket |= has_token(value, "websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            head.connection_upgrade |= has_token(value, "upgrade");
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            head.ws_key = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            head.ws_version = Some(value.to_owned());
        } else if h.name.eq_ignore_ascii_case("content-length") {
            // An unparsable length is treated as absent (411), never as zero.
            head.content_length = value.parse().ok();
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            head.transfer_encoding = true;
        } else if h.name.eq_ignore_ascii_case("authorization")
            && let Some((scheme, cred)) = value.split_once(' ')
            && scheme.eq_ignore_ascii_case("bearer")
        {
            head.bearer = Some(cred.trim().to_owned());
        }
    }
    head
}

/// Comma-separated header token lists (`Connection: keep-alive, Upgrade`).
fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A complete response; the connection is closed after it.
pub struct Response<'a> {
    pub status: u16,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub headers: &'a [(&'a str, &'a str)],
}

impl<'a> Response<'a> {
    pub fn text(status: u16, body: &'a str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes(),
            headers: &[],
        }
    }

    pub fn with_headers(mut self, headers: &'a [(&'a str, &'a str)]) -> Self {
        self.headers = headers;
        self
    }

    pub fn encode(&self) -> Vec<u8> {
        use std::io::Write as _;
        let mut out = Vec::with_capacity(160 + self.body.len());
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (k, v) in self.headers {
            let _ = write!(out, "{k}: {v}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(self.body);
        out
    }

    /// Writes the response and half-closes, so the client reads all of it before the FIN.
    pub async fn send(&self, sock: &mut TcpStream) -> io::Result<()> {
        sock.write_all(&self.encode()).await?;
        sock.shutdown().await
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        202 => "Accepted",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_case_insensitive_lists() {
        assert!(has_token("keep-alive, Upgrade", "upgrade"));
        assert!(!has_token("keep-alive", "upgrade"));
    }

    #[test]
    fn response_is_complete() {
        let r = Response::text(404, "not found\n").encode();
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.contains("Content-Length: 10\r\n"));
        assert!(s.ends_with("\r\n\r\nnot found\n"));
    }
}
