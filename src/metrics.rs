//! Counters for `/metrics`, rendered in the Prometheus text format by hand: a handful of
//! atomics needs no metrics framework, and the hot path only ever does a relaxed `fetch_add`.
//! Also the standard `process_*` figures, read from `/proc/self` when `/metrics` is scraped.
//!
//! This module must not know how its figures are produced: the hot path increments atomics, and
//! values owned elsewhere arrive as a [`Snapshot`] at scrape time.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Process-wide counters. Gauges that other parts already know (connections, users, sockets)
/// are passed in at render time instead of being mirrored here.
#[derive(Debug, Default)]
pub struct Metrics {
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_ingested: AtomicU64,
    pub log_records: AtomicU64,
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
    /// The recovery history holds its window (read from the fan-out log at start-up).
    pub history_warm: AtomicBool,
    pub recoveries_recovered: AtomicU64,
    pub recoveries_unknown: AtomicU64,
    pub recoveries_too_large: AtomicU64,
    pub frames_replayed: AtomicU64,
}

/// Values owned elsewhere, sampled when `/metrics` is scraped.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub connections: usize,
    pub max_connections: usize,
    pub users: usize,
    pub sockets: usize,
    pub ready: bool,
    pub history: crate::history::Stats,
    /// What client queues cost the queue budget (`CLIENT_QUEUE_BUDGET_BYTES`).
    pub queued_bytes: usize,
    pub latency: LatencyCounts,
}

/// A counter family: name, help, and its series as (labels, counter).
type Family<'a> = (&'a str, &'a str, &'a [(&'a str, &'a AtomicU64)]);

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// The whole exposition but the `process_*` figures ([`render_process`]).
    pub fn render(&self, s: &Snapshot) -> String {
        let flag = |b: &AtomicBool| u64::from(b.load(Ordering::Relaxed));
        let gauges: [(&str, &str, u64); 12] = [
            (
                "wsnotify_connections",
                "Open WebSocket connections.",
                s.connections as u64,
            ),
            (
                "wsnotify_max_connections",
                "MAX_CONNECTIONS: open WebSocket connections past which handshakes are refused with 503.",
                s.max_connections as u64,
            ),
            (
                "wsnotify_users",
                "Distinct users with at least one connection.",
                s.users as u64,
            ),
            (
                "wsnotify_sockets",
                "Accepted sockets, including handshakes in progress.",
                s.sockets as u64,
            ),
            (
                "wsnotify_client_queue_bytes",
                "Memory held for frames queued to clients, as counted against CLIENT_QUEUE_BUDGET_BYTES: a 32-byte slot per queued frame, plus the bytes of frames addressed to one user (a broadcast frame is shared by its recipients).",
                s.queued_bytes as u64,
            ),
            (
                "wsnotify_broker_up",
                "1 while the RabbitMQ link is up and consuming.",
                flag(&self.broker_up),
            ),
            (
                "wsnotify_ready",
                "1 while /readyz answers 200.",
                u64::from(s.ready),
            ),
            (
                "wsnotify_ingest_active",
                "1 while this replica is the one taking the notify queue (the others stand by).",
                flag(&self.ingest_active),
            ),
            (
                "wsnotify_history_warm",
                "1 once the recovery history holds its window (read from the fan-out log at start-up).",
                flag(&self.history_warm),
            ),
            (
                "wsnotify_history_entries",
                "Notifications kept for recovery (?since=).",
                s.history.entries as u64,
            ),
            (
                "wsnotify_history_bytes",
                "Memory the recovery history takes (estimate).",
                s.history.bytes as u64,
            ),
            (
                "wsnotify_history_oldest_age_seconds",
                "Age of the oldest notification kept for recovery.",
                s.history.oldest_age_ms / 1000,
            ),
        ];
        let counters: [Family; 15] = [
            (
                "wsnotify_frames_sent_total",
                "WebSocket frames written to clients.",
                &[("", &self.frames_sent)],
            ),
            (
                "wsnotify_bytes_sent_total",
                "Bytes of notification frames written to clients.",
                &[("", &self.bytes_sent)],
            ),
            (
                "wsnotify_api_published_total",
                "Envelopes accepted through POST /api/publish.",
                &[("", &self.api_published)],
            ),
            (
                "wsnotify_ingested_total",
                "Messages this replica took from the notify queue and appended to the fan-out log.",
                &[("", &self.messages_ingested)],
            ),
            (
                "wsnotify_log_records_total",
                "Records this replica appended to the fan-out log as the taker (wsnotify_ingested_total ÷ this is the average number of notifications per record).",
                &[("", &self.log_records)],
            ),
            (
                "wsnotify_duplicates_dropped_total",
                "Fan-out copies dropped as already delivered (redelivery after a replica failure, or a publisher retrying an id).",
                &[("", &self.duplicates_dropped)],
            ),
            (
                "wsnotify_messages_total",
                "Messages by outcome: delivered / no_recipient (on this replica), dead_lettered (by this replica's ingest).",
                &[
                    ("outcome=\"delivered\"", &self.messages_delivered),
                    ("outcome=\"no_recipient\"", &self.messages_no_recipient),
                    ("outcome=\"dead_lettered\"", &self.messages_dead_lettered),
                ],
            ),
            (
                "wsnotify_closes_total",
                "Connections closed by the gateway, by reason.",
                &[
                    ("reason=\"slow_consumer\"", &self.slow_consumer_closes),
                    ("reason=\"queue_budget\"", &self.queue_budget_closes),
                    ("reason=\"dead_peer\"", &self.dead_peer_closes),
                    ("reason=\"token_expired\"", &self.token_expired_closes),
                    ("reason=\"frame_too_large\"", &self.oversized_frame_closes),
                ],
            ),
            (
                "wsnotify_close_timeouts_total",
                "Connections reset because the peer did not complete the close handshake within CLOSE_TIMEOUT_MS.",
                &[("", &self.close_timeouts)],
            ),
            (
                "wsnotify_recoveries_total",
                "Connections that asked for recovery (?since=), by result: recovered, unknown (since older than the window or never seen: recovered false), too_large (the missed frames exceed CLIENT_QUEUE_BYTES: recovered false).",
                &[
                    ("result=\"recovered\"", &self.recoveries_recovered),
                    ("result=\"unknown\"", &self.recoveries_unknown),
                    ("result=\"too_large\"", &self.recoveries_too_large),
                ],
            ),
            (
                "wsnotify_replayed_frames_total",
                "Missed frames sent to recovering connections.",
                &[("", &self.frames_replayed)],
            ),
            (
                "wsnotify_client_messages_ignored_total",
                "Data messages sent by clients (the gateway is push-only and ignores them).",
                &[("", &self.client_messages_ignored)],
            ),
            (
                "wsnotify_handshakes_total",
                "Requests for /ws, by result.",
                &[
                    ("result=\"accepted\"", &self.handshakes_accepted),
                    ("result=\"unauthorized\"", &self.handshakes_unauthorized),
                    ("result=\"bad_request\"", &self.handshakes_bad_request),
                    ("result=\"over_capacity\"", &self.handshakes_over_capacity),
                    ("result=\"user_limit\"", &self.handshakes_user_limit),
                    ("result=\"timeout\"", &self.handshakes_timed_out),
                ],
            ),
            (
                "wsnotify_accept_errors_total",
                "Errors from accept(2), e.g. EMFILE.",
                &[("", &self.accept_errors)],
            ),
            (
                "wsnotify_broker_connects_total",
                "Successful RabbitMQ (re)connections.",
                &[("", &self.broker_connects)],
            ),
        ];
        let mut out = String::with_capacity(8192);
        for (name, help, v) in gauges {
            write_gauge(&mut out, name, help, v);
        }
        for (name, help, rows) in counters {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
            for (labels, v) in rows {
                let v = v.load(Ordering::Relaxed);
                match *labels {
                    "" => writeln!(out, "{name} {v}"),
                    labels => writeln!(out, "{name}{{{labels}}} {v}"),
                }
                .ok();
            }
        }
        s.latency.render(&mut out);
        out
    }
}

/// Upper bounds of the delivery-latency buckets, in µs.
const LATENCY_BOUNDS_US: [u32; 23] = [
    5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 25_000,
    50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
];

/// `wsnotify_delivery_latency_seconds`, recorded on the hot path: counts per bucket of
/// `LATENCY_BOUNDS_US` (the last one is `+Inf`) and their sum. The registry keeps one per
/// shard, so connections writing on different threads do not share counters.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, us: u32) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::from(us), Ordering::Relaxed);
    }

    /// Adds this histogram's counts to `total`.
    pub fn add_to(&self, total: &mut LatencyCounts) {
        for (c, a) in total.counts.iter_mut().zip(&self.counts) {
            *c += a.load(Ordering::Relaxed);
        }
        total.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

/// A [`LatencyHistogram`]'s counts at one moment (summed over the shards).
#[derive(Debug, Clone, Default)]
pub struct LatencyCounts {
    counts: [u64; LATENCY_BOUNDS_US.len() + 1],
    sum_us: u64,
}

impl LatencyCounts {
    /// `wsnotify_delivery_latency_seconds`: from a notification entering routing (right after
    /// the broker delivered it) to its frame being written to a socket. One sample per
    /// connection write pass, timed by the oldest frame in it.
    fn render(&self, out: &mut String) {
        const NAME: &str = "wsnotify_delivery_latency_seconds";
        let _ = write!(
            out,
            "# HELP {NAME} Time from a notification entering routing to its frame being written to a socket (per connection write pass, oldest frame).\n# TYPE {NAME} histogram\n"
        );
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let _ = match LATENCY_BOUNDS_US.get(i) {
                Some(&b) => writeln!(
                    out,
                    "{NAME}_bucket{{le=\"{}\"}} {cumulative}",
                    f64::from(b) / 1e6
                ),
                None => writeln!(out, "{NAME}_bucket{{le=\"+Inf\"}} {cumulative}"),
            };
        }
        let _ = writeln!(out, "{NAME}_sum {}", self.sum_us as f64 / 1e6);
        let _ = writeln!(out, "{NAME}_count {cumulative}");
    }
}

fn write_gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = write!(
        out,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
    );
}

/// Appends the `process_*` metrics of Prometheus's client libraries (same names and units, so
/// stock dashboards work): resident memory, CPU time, start time, open and maximum file
/// descriptors. Read from `/proc/self` on each scrape, never on the hot path. Where `/proc`
/// cannot be read (not Linux), nothing is written.
pub fn render_process(out: &mut String) {
    let Some(p) = ProcessStats::read() else {
        return;
    };
    write_gauge(
        out,
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        p.resident_bytes,
    );
    let _ = write!(
        out,
        "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n",
        p.cpu_seconds
    );
    write_gauge(
        out,
        "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        p.start_time_seconds,
    );
    write_gauge(
        out,
        "process_open_fds",
        "Number of open file descriptors (each connection holds one).",
        p.open_fds,
    );
    write_gauge(
        out,
        "process_max_fds",
        "Maximum number of open file descriptors (soft RLIMIT_NOFILE).",
        p.max_fds,
    );
}

struct ProcessStats {
    resident_bytes: u64,
    cpu_seconds: f64,
    start_time_seconds: f64,
    open_fds: usize,
    max_fds: u64,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        // SAFETY: sysconf only reads a configuration value.
        let (ticks, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let (ticks, page) = (
            u64::try_from(ticks).ok().filter(|&t| t > 0)?,
            u64::try_from(page).ok()?,
        );
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let (utime, stime, start_ticks, rss_pages) = parse_stat(&stat)?;
        // The start time in /proc/self/stat counts clock ticks from boot; boot is `btime`.
        let boot: u64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        // Listing the directory holds one descriptor of its own, which is not counted.
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()?
            .count()
            .saturating_sub(1);
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` into the struct we own.
        let max_fds = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            limit.rlim_cur
        } else {
            0
        };
        Some(Self {
            resident_bytes: rss_pages * page,
            cpu_seconds: (utime + stime) as f64 / ticks as f64,
            start_time_seconds: boot as f64 + start_ticks as f64 / ticks as f64,
            open_fds,
            max_fds,
        })
    }
}

/// `utime`, `stime`, `starttime` and `rss` (fields 14, 15, 22 and 24 of proc(5)'s
/// `/proc/pid/stat`).
fn parse_stat(stat: &str) -> Option<(u64, u64, u64, u64)> {
    // Field 2 is the command name in parentheses, which may itself hold spaces and ')': the
    // fields that follow start after the last ')'. `rest` begins with field 3.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    Some((field(14)?, field(15)?, field(22)?, field(24)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets() {
        let h = LatencyHistogram::default();
        for us in [0, 5, 6, 100, 101, 3_000_000] {
            h.record(us);
        }
        let mut c = LatencyCounts::default();
        h.add_to(&mut c);
        assert_eq!(
            c.counts[0], 2,
            "0 and 5 µs are in the first bucket (le 5 µs)"
        );
        assert_eq!(c.counts[1], 1);
        assert_eq!(c.counts[6], 1, "100 µs is in le=100 µs");
        assert_eq!(c.counts[7], 1);
        assert_eq!(c.counts[LATENCY_BOUNDS_US.len()], 1, "3 s is in +Inf");
        let mut text = String::new();
        c.render(&mut text);
        assert!(text.contains("# TYPE wsnotify_delivery_latency_seconds histogram"));
        assert!(text.contains("wsnotify_delivery_latency_seconds_bucket{le=\"+Inf\"} 6\n"));
        assert!(text.contains("wsnotify_delivery_latency_seconds_count 6\n"));
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("_bucket"))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(counts.len(), LATENCY_BOUNDS_US.len() + 1);
        assert!(counts.windows(2).all(|w| w[0] <= w[1]), "cumulative");
    }

    #[test]
    fn stat_fields_after_an_awkward_command_name() {
        let stat = "4242 (we ird) (name) S 1 4242 4242 0 -1 4194560 1203 0 0 0 17 5 0 0 20 0 9 0 123456 987654321 2048 18446744073709551615 1 1 0 0 0 0 0 4096 17663 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(stat), Some((17, 5, 123456, 2048)));
        assert_eq!(parse_stat("4242 (truncated"), None);
    }

    #[test]
    fn process_metrics_are_read_from_proc() {
        let mut out = String::new();
        render_process(&mut out);
        let value = |name: &str| -> f64 {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing in:\n{out}"))
        };
        assert!(value("process_resident_memory_bytes") > 1e6);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let started = value("process_start_time_seconds");
        assert!(started <= now + 1.0 && started > now - 86_400.0 * 365.0);
        assert!(value("process_cpu_seconds_total") >= 0.0);
    }
}
