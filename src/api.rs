//! `POST /api/publish`: publishing for backends that would rather speak HTTP than AMQP.
//!
//! The body is the contract's task envelope, or a JSON array of them. Every envelope is
//! validated exactly as the broker path validates it (same parser, same reasons) before any is
//! sent: a batch is accepted whole or refused whole.
//!
//! * With a broker, each envelope is published unchanged to the notify queue — persistent,
//!   mandatory, with publisher confirms — and `202` means the broker has them all. From there
//!   they travel the same path as any backend's message.
//! * In standalone mode (no `AMQP_URL`), envelopes go straight to the local router, and `202`
//!   means they were handed to the connections' mailboxes.
//!
//! | status | when |
//! |---|---|
//! | 202 | accepted: `{"accepted": n}` |
//! | 400 | not JSON, empty batch, or an invalid envelope: `{"error": "...", "index": i}` |
//! | 401 / 403 | no bearer key / a wrong one |
//! | 404 | `PUBLISH_API_KEY` is not configured: the endpoint does not exist |
//! | 405 | not a POST |
//! | 411 | no `Content-Length` (chunked bodies are not accepted) |
//! | 413 | body over `MAX_PUBLISH_BYTES`, or an envelope over `MAX_MESSAGE_BYTES` |
//! | 503 | the broker link is down, or it did not confirm within `PUBLISH_TIMEOUT_MS` (a broker under a resource alarm blocks publishers): retry later |
//!
//! This module must not know how the broker is reached or how frames are routed: it checks,
//! then hands envelopes to the confirm channel (with a broker) or to the history and registry
//! (standalone), the same path a broker message takes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::amqp::Link;
use crate::envelope::Parser;
use crate::history::History;
use crate::http::{Head, Response};
use crate::metrics::Metrics;
use crate::notification::Notification;
use crate::registry::Registry;

/// Where accepted envelopes go.
pub enum Sink {
    /// Published to the notify queue through the live broker link.
    Broker { link: Arc<Link>, queue: String },
    /// Routed to this process's connections (standalone mode).
    Local,
}

/// The endpoint's settings; absent when no key is configured.
pub struct PublishApi {
    pub key: String,
    pub max_body: usize,
    pub max_message: usize,
    /// Longest wait for the broker to take and confirm a request's envelopes.
    pub timeout: Duration,
    pub sink: Sink,
}

/// What a standalone gateway routes published envelopes through.
pub struct Local<'a> {
    pub registry: &'a Registry,
    pub history: &'a History,
}

/// A finished response: status and JSON body.
struct Reply {
    status: u16,
    body: String,
}

fn reply(status: u16, body: serde_json::Value) -> Reply {
    Reply {
        status,
        body: body.to_string(),
    }
}

fn error(status: u16, msg: impl Into<String>) -> Reply {
    reply(status, serde_json::json!({ "error": msg.into() }))
}

/// Answers one request to `/api/publish`.
pub async fn handle(
    sock: &mut TcpStream,
    head: Head,
    api: Option<&PublishApi>,
    local: Local<'_>,
    metrics: &Metrics,
    read_timeout: Duration,
) {
    let r = match api {
        None => error(
            404,
            "not found: set PUBLISH_API_KEY to enable publishing over HTTP",
        ),
        Some(api) => process(sock, head, api, local, metrics, read_timeout).await,
    };
    let headers: &[(&str, &str)] = match r.status {
        401 => &[("WWW-Authenticate", "Bearer")],
        405 => &[("Allow", "POST")],
        _ => &[],
    };
    let resp = Response {
        status: r.status,
        content_type: "application/json",
        body: r.body.as_bytes(),
        headers,
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), resp.send(sock)).await;
}

async fn process(
    sock: &mut TcpStream,
    head: Head,
    api: &PublishApi,
    local: Local<'_>,
    metrics: &Metrics,
    read_timeout: Duration,
) -> Reply {
    if head.method != "POST" {
        return error(405, "use POST");
    }
    let Some(given) = head.bearer.as_deref() else {
        return error(401, "missing Authorization: Bearer <PUBLISH_API_KEY>");
    };
    if !constant_time_eq(given.as_bytes(), api.key.as_bytes()) {
        return error(403, "wrong publish key");
    }
    let len = match (head.content_length, head.transfer_encoding) {
        (Some(n), false) => n,
        _ => return error(411, "a Content-Length is required"),
    };
    if len > api.max_body {
        return error(
            413,
            format!("body is {len} bytes, the limit is {}", api.max_body),
        );
    }
    let mut body = head.rest;
    body.truncate(len);
    if body.len() < len {
        let missing = len - body.len();
        body.reserve_exact(missing);
        let mut rest = (&mut *sock).take(missing as u64);
        match tokio::time::timeout(read_timeout, rest.read_to_end(&mut body)).await {
            Ok(Ok(_)) if body.len() == len => {}
            _ => return error(400, "the body ended before Content-Length bytes"),
        }
    }

    // Split a batch without re-encoding: each element is forwarded byte for byte.
    let trimmed = body.trim_ascii_start();
    let items: Vec<&[u8]> = if trimmed.first() == Some(&b'[') {
        match serde_json::from_slice::<Vec<&RawValue>>(&body) {
            Ok(list) => list.iter().map(|r| r.get().as_bytes()).collect(),
            Err(e) => return error(400, format!("not_json: {e}")),
        }
    } else {
        vec![&body[..]]
    };
    if items.is_empty() {
        return error(400, "empty batch");
    }
    let mut parser = Parser::new();
    for (i, item) in items.iter().enumerate() {
        if let Err(invalid) = parser.parse(item, api.max_message) {
            let status = if invalid.0.starts_with("too_large") {
                413
            } else {
                400
            };
            return reply(
                status,
                serde_json::json!({ "error": invalid.0, "index": i }),
            );
        }
    }

    match &api.sink {
        Sink::Broker { link, queue } => {
            let Some(publisher) = link.publisher() else {
                return error(503, "the broker link is down; retry later");
            };
            if link.blocked() {
                return error(
                    503,
                    "the broker is blocking publishers (resource alarm); retry later",
                );
            }
            // One deadline for the whole request: sends and confirms.
            let deadline = Instant::now() + api.timeout;
            let left = || deadline.saturating_duration_since(Instant::now());
            let mut confirms = Vec::with_capacity(items.len());
            for item in &items {
                match publisher
                    .publish_envelope(queue, item.to_vec(), left())
                    .await
                {
                    Ok(c) => confirms.push(c),
                    Err(e) => return error(503, format!("publish failed: {e}")),
                }
            }
            for c in confirms {
                if let Err(e) = c.wait_for(left()).await {
                    return error(503, format!("publish not confirmed: {e}"));
                }
            }
        }
        Sink::Local => {
            let received = OffsetDateTime::now_utc();
            let mut batch = Vec::with_capacity(items.len());
            for item in &items {
                // Validated above; a second parse cannot fail, but never trust that with a panic.
                let Ok(env) = parser.parse(item, api.max_message) else {
                    continue;
                };
                batch.push(Notification::from_envelope(env, item, false, received));
            }
            let now_ms = u64::try_from(received.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
            let recorded = local.history.record(batch, now_ms);
            local.registry.route_recorded(recorded, metrics).await;
        }
    }
    metrics
        .api_published
        .fetch_add(items.len() as u64, std::sync::atomic::Ordering::Relaxed);
    reply(202, serde_json::json!({ "accepted": items.len() }))
}

/// Compares secrets without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn compares_whole_keys() {
        assert!(constant_time_eq(b"secret-key", b"secret-key"));
        assert!(!constant_time_eq(b"secret-key", b"secret-kez"));
        assert!(!constant_time_eq(b"secret", b"secret-key"));
    }
}
