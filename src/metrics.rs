//! Counters for `/metrics`, rendered in the Prometheus text format by hand: a handful of
//! atomics needs no metrics framework, and the hot path only ever does a relaxed `fetch_add`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Process-wide counters. Gauges that other parts already know (connections, users, sockets)
/// are passed in at render time instead of being mirrored here.
#[derive(Debug, Default)]
pub struct Metrics {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_ingested: AtomicU64,
    pub api_published: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub messages_delivered: AtomicU64,
    pub messages_no_recipient: AtomicU64,
    pub messages_dead_lettered: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub queue_budget_closes: AtomicU64,
    pub close_timeouts: AtomicU64,
    pub dead_peer_closes: AtomicU64,
    pub token_expired_closes: AtomicU64,
    pub oversized_frame_closes: AtomicU64,
    pub client_messages_ignored: AtomicU64,
    pub handshakes_accepted: AtomicU64,
    pub handshakes_unauthorized: AtomicU64,
    pub handshakes_bad_request: AtomicU64,
    pub handshakes_over_capacity: AtomicU64,
    pub handshakes_user_limit: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    pub accept_errors: AtomicU64,
    pub broker_connects: AtomicU64,
    pub broker_up: AtomicBool,
    pub ingest_active: AtomicBool,
}

/// Values owned elsewhere, sampled when `/metrics` is scraped.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub connections: usize,
    pub users: usize,
    pub sockets: usize,
    pub ready: bool,
    /// What client queues cost the queue budget (`CLIENT_QUEUE_BUDGET_BYTES`).
    pub queued_bytes: usize,
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    pub fn render(&self, g: Gauges) -> String {
        let mut out = String::with_capacity(4096);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        gauge(
            "wsnotify_connections",
            "Open WebSocket connections.",
            g.connections as u64,
        );
        gauge(
            "wsnotify_users",
            "Distinct users with at least one connection.",
            g.users as u64,
        );
        gauge(
            "wsnotify_sockets",
            "Accepted sockets, including handshakes in progress.",
            g.sockets as u64,
        );
        gauge(
            "wsnotify_client_queue_bytes",
            "Memory held for frames queued to clients, as counted against CLIENT_QUEUE_BUDGET_BYTES: a 32-byte slot per queued frame, plus the bytes of frames addressed to one user (a broadcast frame is shared by its recipients).",
            g.queued_bytes as u64,
        );
        gauge(
            "wsnotify_broker_up",
            "1 while the RabbitMQ link is up and consuming.",
            self.broker_up.load(Ordering::Relaxed) as u64,
        );
        gauge(
            "wsnotify_ready",
            "1 while /readyz answers 200.",
            g.ready as u64,
        );
        gauge(
            "wsnotify_ingest_active",
            "1 while this replica is the one taking the notify queue (the others stand by).",
            self.ingest_active.load(Ordering::Relaxed) as u64,
        );

        let mut counter = |name: &str, help: &str, rows: &[(&str, u64)]| {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
            for (labels, v) in rows {
                if labels.is_empty() {
                    let _ = writeln!(out, "{name} {v}");
                } else {
                    let _ = writeln!(out, "{name}{{{labels}}} {v}");
                }
            }
        };
        counter(
            "wsnotify_frames_sent_total",
            "WebSocket frames written to clients.",
            &[("", get(&self.frames_sent))],
        );
        counter(
            "wsnotify_bytes_sent_total",
            "Bytes of notification frames written to clients.",
            &[("", get(&self.bytes_sent))],
        );
        counter(
            "wsnotify_api_published_total",
            "Envelopes accepted through POST /api/publish.",
            &[("", get(&self.api_published))],
        );
        counter(
            "wsnotify_ingested_total",
            "Messages this replica took from the notify queue and fanned out to every replica.",
            &[("", get(&self.messages_ingested))],
        );
        counter(
            "wsnotify_duplicates_dropped_total",
            "Fan-out copies dropped as already delivered (redelivery after a replica failure, or a publisher retrying an id).",
            &[("", get(&self.duplicates_dropped))],
        );
        counter(
            "wsnotify_messages_total",
            "Messages by outcome: delivered / no_recipient (on this replica), dead_lettered (by this replica's ingest).",
            &[
                ("outcome=\"delivered\"", get(&self.messages_delivered)),
                ("outcome=\"no_recipient\"", get(&self.messages_no_recipient)),
                (
                    "outcome=\"dead_lettered\"",
                    get(&self.messages_dead_lettered),
                ),
            ],
        );
        counter(
            "wsnotify_closes_total",
            "Connections closed by the gateway, by reason.",
            &[
                ("reason=\"slow_consumer\"", get(&self.slow_consumer_closes)),
                ("reason=\"queue_budget\"", get(&self.queue_budget_closes)),
                ("reason=\"dead_peer\"", get(&self.dead_peer_closes)),
                ("reason=\"token_expired\"", get(&self.token_expired_closes)),
                (
                    "reason=\"frame_too_large\"",
                    get(&self.oversized_frame_closes),
                ),
            ],
        );
        counter(
            "wsnotify_slow_consumer_closes_total",
            "Connections closed with 1013 because their queue overflowed.",
            &[("", get(&self.slow_consumer_closes))],
        );
        counter(
            "wsnotify_close_timeouts_total",
            "Connections reset because the peer did not complete the close handshake within CLOSE_TIMEOUT_MS.",
            &[("", get(&self.close_timeouts))],
        );
        counter(
            "wsnotify_client_messages_ignored_total",
            "Data messages sent by clients (the gateway is push-only and ignores them).",
            &[("", get(&self.client_messages_ignored))],
        );
        counter(
            "wsnotify_handshakes_total",
            "Requests for /ws, by result.",
            &[
                ("result=\"accepted\"", get(&self.handshakes_accepted)),
                (
                    "result=\"unauthorized\"",
                    get(&self.handshakes_unauthorized),
                ),
                ("result=\"bad_request\"", get(&self.handshakes_bad_request)),
                (
                    "result=\"over_capacity\"",
                    get(&self.handshakes_over_capacity),
                ),
                ("result=\"user_limit\"", get(&self.handshakes_user_limit)),
                ("result=\"timeout\"", get(&self.handshakes_timed_out)),
            ],
        );
        counter(
            "wsnotify_accept_errors_total",
            "Errors from accept(2), e.g. EMFILE.",
            &[("", get(&self.accept_errors))],
        );
        counter(
            "wsnotify_broker_connects_total",
            "Successful RabbitMQ (re)connections.",
            &[("", get(&self.broker_connects))],
        );
        out
    }
}
