//! The reconnect storm with recovery (contract §5), on the suite's connections:
//!
//! 1. one broadcast, so that every client holds an `id` to come back with;
//! 2. unicasts through RabbitMQ at `storm_rate` per second to random connected users, for
//!    `storm_warm_secs`; every client remembers the last `id` it read;
//! 3. every client drops its socket at once (no close frame, as a network drop would) and
//!    reconnects at once with `?since=<last id>` (each worker `--concurrency` handshakes in
//!    flight), while the unicasts go on;
//! 4. once every reconnected client has its `wsnotify.recovery` frame, `storm_tail_secs` more
//!    of unicasts, then a wait until frames stop arriving.
//!
//! Figures: how many reconnected, how many were told `recovered: true`, the missed frames
//! replayed, each client's time from its drop to its upgrade and to its recovery frame, and,
//! per user, the frames left out, received twice or out of order against what was published
//! to it (none of each, if recovery holds); the server's CPU, RSS and recovery history over
//! the storm, from `/proc` and its `/metrics`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{Latency, Sink, Suite, Target2, sum_each};
use crate::client::{Track, new_histogram, now_us};
use crate::procstat::{cpu_secs, rss_bytes};
use crate::publish::Pace;
use crate::worker::{Cmd, Event, all};

/// The recovery storm's figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recovery {
    /// Unicasts per second, seconds of them before the storm and after it.
    pub rate: f64,
    pub warm_secs: f64,
    pub tail_secs: f64,
    /// Unicasts published over the phase; of them, while the storm lasted (first drop →
    /// last recovery frame).
    pub published: u64,
    pub published_during_storm: u64,
    /// Connections dropped, reconnected (101), and whose reconnect failed.
    pub dropped: u64,
    pub reconnected: u64,
    pub reconnect_failed: u64,
    /// Reconnected clients that got a recovery frame; of them `recovered: true` / `false`.
    pub recovery_frames: u64,
    pub recovered_true: u64,
    pub recovered_false: u64,
    /// `recovered_true` ÷ reconnected, %.
    pub recovered_pct: f64,
    /// Recovery frames that were not the first frame on the new connection, and extra
    /// recovery frames (more than one per reconnect): both should be 0.
    pub recovery_not_first: u64,
    pub extra_recovery_frames: u64,
    /// Sum of `missed` over the recovery frames: frames replayed.
    pub missed_total: u64,
    /// The same from the server's `/metrics` (delta over the phase), summed over replicas.
    pub gateway_replayed_frames: Option<u64>,
    pub gateway_recoveries_recovered: Option<u64>,
    pub gateway_recoveries_unknown: Option<u64>,
    pub gateway_recoveries_too_large: Option<u64>,
    /// Per client: its drop → its reconnect's 101, and its drop → its recovery frame (µs).
    pub time_to_upgrade: Latency,
    pub time_to_recovery: Latency,
    /// First storm command (the earliest worker) → the last client's recovery frame.
    pub all_recovered_secs: f64,
    /// First client dropped → last client dropped (how "at once" the drop was; no client
    /// reconnects before every client of its worker has dropped), and the longest a worker
    /// took from the storm command to its last drop.
    pub drop_spread_secs: f64,
    pub worker_drop_secs: f64,
    /// Users checked (connected at the storm and reconnected), the frames published to them
    /// (the broadcast of step 1 included) and those received.
    pub users_checked: u64,
    pub expected_frames: u64,
    pub received_frames: u64,
    /// Published to a user but never received by it; received more than once; received
    /// after a later one; received but never published to that user.
    pub gaps: u64,
    pub users_with_gaps: u64,
    /// Of the gaps, those of users told `recovered: false` (expected: such a client is told
    /// to reload its state); the gaps of users told `recovered: true` are `gaps` minus these.
    pub gaps_not_recovered: u64,
    pub duplicates: u64,
    pub users_with_duplicates: u64,
    pub out_of_order: u64,
    pub unexpected: u64,
    /// Server CPU seconds and cores, first drop → last recovery frame.
    pub server_cpu_secs: Option<f64>,
    pub server_cores: Option<f64>,
    pub broker_cores: Option<f64>,
    /// The client workers' cores, and everything else on the machine (busy cores from
    /// `/proc/stat` minus server, broker and clients): a large value means a noisy run.
    pub client_cores: Option<f64>,
    pub other_cores: Option<f64>,
    /// SYNs the kernel dropped for a full accept queue during the storm (TcpExt
    /// ListenOverflows; each costs its client a 1 s retransmit).
    pub listen_overflows: Option<u64>,
    /// Server RSS before the storm, its peak during it (sampled every 100 ms), and after it.
    pub rss_before: Option<u64>,
    pub rss_peak: Option<u64>,
    pub rss_after: Option<u64>,
    /// `wsnotify_history_entries` / `wsnotify_history_bytes` before the storm and at the end
    /// of the phase (summed over replicas), and bytes per entry at the end.
    pub history_entries_before: Option<u64>,
    pub history_bytes_before: Option<u64>,
    pub history_entries_after: Option<u64>,
    pub history_bytes_after: Option<u64>,
    pub history_bytes_per_entry: Option<f64>,
}

/// The `/metrics` series the storm reads, summed over the server processes.
#[derive(Debug, Clone, Copy, Default)]
struct Scrape {
    replayed: Option<f64>,
    recovered: Option<f64>,
    unknown: Option<f64>,
    too_large: Option<f64>,
    entries: Option<f64>,
    bytes: Option<f64>,
}

const SERIES: [&str; 6] = [
    "wsnotify_replayed_frames_total",
    "wsnotify_recoveries_total{result=\"recovered\"}",
    "wsnotify_recoveries_total{result=\"unknown\"}",
    "wsnotify_recoveries_total{result=\"too_large\"}",
    "wsnotify_history_entries",
    "wsnotify_history_bytes",
];

async fn scrape(http: &[std::net::SocketAddr]) -> Scrape {
    let mut v = [None; 6];
    for &addr in http {
        let Some((200, body)) = crate::prom::http_get(addr, "/metrics").await else {
            continue;
        };
        for (slot, name) in v.iter_mut().zip(SERIES) {
            if let Some(x) = crate::prom::value(&body, name) {
                *slot = Some(slot.unwrap_or(0.0) + x);
            }
        }
    }
    Scrape {
        replayed: v[0],
        recovered: v[1],
        unknown: v[2],
        too_large: v[3],
        entries: v[4],
        bytes: v[5],
    }
}

/// `TcpExt: ListenOverflows` from `/proc/net/netstat`.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

fn delta(a: Option<f64>, b: Option<f64>) -> Option<u64> {
    a.zip(b).map(|(a, b)| (b - a).max(0.0) as u64)
}

/// What the storm's step 3 measured.
struct Storm {
    started_us: u64,
    worker_drop_us: u64,
    client_cpu: Option<f64>,
    machine_cpu: Option<f64>,
    listen_overflows: Option<u64>,
    dropped: u64,
    reconnected: u64,
    failed: u64,
    cpu: Option<f64>,
    broker_cpu: Option<f64>,
    wall: f64,
    rss_before: Option<u64>,
    rss_peak: Option<u64>,
    rss_after: Option<u64>,
    before: Scrape,
}

impl Suite {
    /// Runs the storm on the suite's connections (see the module documentation).
    pub(super) async fn recovery(&mut self, sink: &mut Sink) -> Result<Recovery, String> {
        let rate = self.cfg.storm_rate.max(1.0);
        let warm = Duration::from_secs_f64(self.cfg.storm_warm_secs.max(0.0));
        let tail = Duration::from_secs_f64(self.cfg.storm_tail_secs.max(0.0));
        // 1. A broadcast, so that every client has an id to come back with.
        self.deliver(sink, 1, 0.0, Target2::Broadcast).await?;
        let Sink::Amqp(publisher) = sink else {
            return Err("the recovery scenario publishes through RabbitMQ (not nchan)".into());
        };
        let first_seq = publisher.seq();
        let users = self.live_users.clone();
        let pids = self.all_pids();
        let broker_pids = self.cfg.broker_pids.clone();
        let http = self.http.clone();
        let limit = Duration::from_secs_f64(120.0 + self.cfg.connections as f64 / 200.0);
        let stop = AtomicBool::new(false);
        let workers = &mut self.workers;

        // 2-4. Unicasts at `rate` throughout; the storm in the middle.
        let publish = async {
            let mut rng = fastrand::Rng::new();
            let mut log: Vec<(usize, u64, u64)> = Vec::new();
            let mut pace = Pace::new(rate);
            while !stop.load(Ordering::Relaxed) {
                let due = pace.due().await;
                while (log.len() as u64) < due {
                    let u = rng.usize(..users.len());
                    publisher.to_user(&users[u]).await?;
                    log.push((u, publisher.seq(), now_us()));
                }
            }
            Ok::<_, String>(log)
        };
        let storm = async {
            let r = async {
                tokio::time::sleep(warm).await;
                let before = scrape(&http).await;
                let rss_before = sum_each(&pids, rss_bytes);
                let cpu0 = sum_each(&pids, cpu_secs);
                let broker0 = sum_each(&broker_pids, cpu_secs);
                let worker_pids: Vec<u32> = workers.iter().filter_map(|w| w.pid()).collect();
                let clients0 = sum_each(&worker_pids, cpu_secs);
                let machine0 = crate::procstat::machine_busy_secs();
                let overflows0 = listen_overflows();
                let t0 = Instant::now();
                let sampling = AtomicBool::new(true);
                let peak = AtomicU64::new(0);
                let sampler = async {
                    while sampling.load(Ordering::Relaxed) {
                        if let Some(r) = sum_each(&pids, rss_bytes) {
                            peak.fetch_max(r, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                let main = async {
                    let answers = all(workers, Cmd::Storm, limit).await;
                    let mut s = Storm {
                        started_us: u64::MAX,
                        worker_drop_us: 0,
                        client_cpu: None,
                        machine_cpu: None,
                        listen_overflows: None,
                        dropped: 0,
                        reconnected: 0,
                        failed: 0,
                        cpu: None,
                        broker_cpu: None,
                        wall: 0.0,
                        rss_before,
                        rss_peak: None,
                        rss_after: None,
                        before,
                    };
                    for ev in answers? {
                        let Event::Stormed(o) = ev else {
                            return Err(format!("unexpected answer to storm: {ev:?}"));
                        };
                        s.started_us = s.started_us.min(o.started_us);
                        s.worker_drop_us = s.worker_drop_us.max(o.drop_us);
                        s.dropped += o.dropped;
                        s.reconnected += o.reconnected;
                        s.failed += o.failed;
                    }
                    // Every reconnected client's recovery frame (ticks lag 250 ms), bounded:
                    // at `limit`, or 10 s without a new one.
                    let cap = Instant::now() + limit;
                    let mut last = (0, Instant::now());
                    loop {
                        let got: u64 = workers
                            .iter()
                            .map(|w| w.recovered.load(Ordering::Relaxed))
                            .sum();
                        if got >= s.reconnected || Instant::now() >= cap {
                            break;
                        }
                        if got != last.0 {
                            last = (got, Instant::now());
                        } else if last.1.elapsed() >= Duration::from_secs(10) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    sampling.store(false, Ordering::Relaxed);
                    Ok(s)
                };
                let (s, ()) = tokio::join!(main, sampler);
                let mut s = s?;
                s.wall = t0.elapsed().as_secs_f64();
                s.cpu = cpu0.zip(sum_each(&pids, cpu_secs)).map(|(a, b)| b - a);
                s.broker_cpu = broker0
                    .zip(sum_each(&broker_pids, cpu_secs))
                    .map(|(a, b)| b - a);
                s.client_cpu = clients0
                    .zip(sum_each(&worker_pids, cpu_secs))
                    .map(|(a, b)| b - a);
                s.machine_cpu = machine0
                    .zip(crate::procstat::machine_busy_secs())
                    .map(|(a, b)| b - a);
                s.listen_overflows = overflows0
                    .zip(listen_overflows())
                    .map(|(a, b)| b.saturating_sub(a));
                s.rss_after = sum_each(&pids, rss_bytes);
                s.rss_peak = Some(peak.load(Ordering::Relaxed)).filter(|&p| p > 0);
                tokio::time::sleep(tail).await;
                Ok::<_, String>(s)
            }
            .await;
            stop.store(true, Ordering::Relaxed);
            r
        };
        let (log, storm) = tokio::try_join!(publish, storm)?;

        // Frames still arriving: wait until they stop (bounded).
        let waited = Instant::now();
        let mut last = (self.frames(), Instant::now());
        while waited.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let f = self.frames();
            if f != last.0 {
                last = (f, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(2) {
                break;
            }
        }
        let after = scrape(&self.http).await;
        let mut tracks: Vec<Track> = Vec::new();
        for ev in all(&mut self.workers, Cmd::Tracks, Duration::from_secs(60)).await? {
            let Event::Tracks { tracks: t } = ev else {
                return Err(format!("unexpected answer to tracks: {ev:?}"));
            };
            tracks.extend(t);
        }
        Ok(figures(
            &FigureInput {
                rate,
                warm,
                tail,
                first_seq,
                users: &users,
                log: &log,
                storm: &storm,
                after,
            },
            &tracks,
        ))
    }
}

struct FigureInput<'a> {
    rate: f64,
    warm: Duration,
    tail: Duration,
    first_seq: u64,
    users: &'a [String],
    /// `(index in users, seq, published at µs)`.
    log: &'a [(usize, u64, u64)],
    storm: &'a Storm,
    after: Scrape,
}

fn figures(i: &FigureInput<'_>, tracks: &[Track]) -> Recovery {
    let s = i.storm;
    let mut r = Recovery {
        rate: i.rate,
        warm_secs: i.warm.as_secs_f64(),
        tail_secs: i.tail.as_secs_f64(),
        published: i.log.len() as u64,
        dropped: s.dropped,
        reconnected: s.reconnected,
        reconnect_failed: s.failed,
        server_cpu_secs: s.cpu,
        server_cores: s.cpu.map(|c| c / s.wall.max(1e-3)),
        broker_cores: s.broker_cpu.map(|c| c / s.wall.max(1e-3)),
        client_cores: s.client_cpu.map(|c| c / s.wall.max(1e-3)),
        other_cores: s.machine_cpu.map(|m| {
            (m - s.cpu.unwrap_or(0.0) - s.broker_cpu.unwrap_or(0.0) - s.client_cpu.unwrap_or(0.0))
                / s.wall.max(1e-3)
        }),
        listen_overflows: s.listen_overflows,
        worker_drop_secs: s.worker_drop_us as f64 / 1e6,
        rss_before: s.rss_before,
        rss_peak: s.rss_peak,
        rss_after: s.rss_after,
        gateway_replayed_frames: delta(s.before.replayed, i.after.replayed),
        gateway_recoveries_recovered: delta(s.before.recovered, i.after.recovered),
        gateway_recoveries_unknown: delta(s.before.unknown, i.after.unknown),
        gateway_recoveries_too_large: delta(s.before.too_large, i.after.too_large),
        history_entries_before: s.before.entries.map(|v| v as u64),
        history_bytes_before: s.before.bytes.map(|v| v as u64),
        history_entries_after: i.after.entries.map(|v| v as u64),
        history_bytes_after: i.after.bytes.map(|v| v as u64),
        history_bytes_per_entry: i
            .after
            .bytes
            .zip(i.after.entries)
            .filter(|(_, e)| *e > 0.0)
            .map(|(b, e)| b / e),
        ..Default::default()
    };
    // What each user was sent: the broadcast, then its unicasts in publish order.
    let mut expected: HashMap<&str, Vec<u64>> = HashMap::new();
    for &(u, seq, _) in i.log {
        expected.entry(i.users[u].as_str()).or_default().push(seq);
    }
    let mut to_upgrade = new_histogram();
    let mut to_recovery = new_histogram();
    let mut last_recovery_us = 0;
    let (mut first_drop, mut last_drop) = (u64::MAX, 0);
    for t in tracks {
        // Not connected when the storm came (its first connect failed).
        if t.storm_us == 0 {
            continue;
        }
        first_drop = first_drop.min(t.storm_us);
        last_drop = last_drop.max(t.storm_us);
        if t.upgraded_us > 0 {
            let _ = to_upgrade.record(t.upgraded_us.saturating_sub(t.storm_us).max(1));
        }
        if t.reconnect_error.is_some() || t.upgraded_us == 0 {
            continue;
        }
        r.extra_recovery_frames += u64::from(t.recovery_frames.saturating_sub(1));
        if let Some(rec) = &t.recovery {
            r.recovery_frames += 1;
            if rec.recovered {
                r.recovered_true += 1;
            } else {
                r.recovered_false += 1;
            }
            if !rec.first {
                r.recovery_not_first += 1;
            }
            r.missed_total += rec.missed;
            let _ = to_recovery.record(rec.at_us.saturating_sub(t.storm_us).max(1));
            last_recovery_us = last_recovery_us.max(rec.at_us);
        }
        // Gaps, duplicates and order, from the broadcast of step 1 on.
        r.users_checked += 1;
        let mut want = vec![i.first_seq];
        want.extend(expected.get(t.user.as_str()).into_iter().flatten());
        let got: Vec<u64> = t
            .seqs
            .iter()
            .copied()
            .filter(|&q| q >= i.first_seq)
            .collect();
        r.expected_frames += want.len() as u64;
        r.received_frames += got.len() as u64;
        let got_set: HashSet<u64> = got.iter().copied().collect();
        let want_set: HashSet<u64> = want.iter().copied().collect();
        let gaps = want.iter().filter(|q| !got_set.contains(q)).count() as u64;
        let dups = (got.len() - got_set.len()) as u64;
        r.gaps += gaps;
        if t.recovery.as_ref().is_some_and(|rec| !rec.recovered) {
            r.gaps_not_recovered += gaps;
        }
        r.users_with_gaps += u64::from(gaps > 0);
        r.duplicates += dups;
        r.users_with_duplicates += u64::from(dups > 0);
        r.unexpected += got_set.iter().filter(|q| !want_set.contains(q)).count() as u64;
        r.out_of_order += got.windows(2).filter(|w| w[1] < w[0]).count() as u64;
    }
    r.recovered_pct = if r.reconnected == 0 {
        0.0
    } else {
        r.recovered_true as f64 * 100.0 / r.reconnected as f64
    };
    if last_drop > 0 {
        r.drop_spread_secs = last_drop.saturating_sub(first_drop) as f64 / 1e6;
    }
    r.time_to_upgrade = Latency::of(&to_upgrade);
    r.time_to_recovery = Latency::of(&to_recovery);
    if last_recovery_us > 0 && s.started_us != u64::MAX {
        r.all_recovered_secs = last_recovery_us.saturating_sub(s.started_us) as f64 / 1e6;
        r.published_during_storm = i
            .log
            .iter()
            .filter(|&&(_, _, at)| at >= s.started_us && at <= last_recovery_us)
            .count() as u64;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RecoveryFrame;

    fn track(user: &str, seqs: &[u64], missed: u64) -> Track {
        Track {
            user: user.into(),
            seqs: seqs.to_vec(),
            storm_us: 1_000,
            dial_us: 1_000,
            upgraded_us: 2_000,
            frames_before: 1,
            recovery: Some(RecoveryFrame {
                recovered: true,
                missed,
                at_us: 3_000,
                first: true,
            }),
            recovery_frames: 1,
            ..Default::default()
        }
    }

    #[test]
    fn gaps_duplicates_and_order_per_user() {
        let users = vec!["a".to_owned(), "b".to_owned()];
        // Broadcast 10; then a gets 11 and 13, b gets 12.
        let log = [(0, 11, 1_500), (1, 12, 1_600), (0, 13, 5_000)];
        let storm = Storm {
            started_us: 1_000,
            worker_drop_us: 0,
            client_cpu: None,
            machine_cpu: None,
            listen_overflows: None,
            dropped: 2,
            reconnected: 2,
            failed: 0,
            cpu: Some(1.0),
            broker_cpu: None,
            wall: 2.0,
            rss_before: None,
            rss_peak: None,
            rss_after: None,
            before: Scrape::default(),
        };
        let input = FigureInput {
            rate: 1.0,
            warm: Duration::ZERO,
            tail: Duration::ZERO,
            first_seq: 10,
            users: &users,
            log: &log,
            storm: &storm,
            after: Scrape::default(),
        };
        // a: all, in order (9 is an older phase's, ignored). b: 12 twice, after a gap of 10.
        let r = figures(
            &input,
            &[track("a", &[9, 10, 11, 13], 1), track("b", &[12, 12], 1)],
        );
        assert_eq!(
            (r.users_checked, r.expected_frames, r.received_frames),
            (2, 5, 5)
        );
        assert_eq!((r.gaps, r.users_with_gaps), (1, 1));
        assert_eq!((r.duplicates, r.users_with_duplicates), (1, 1));
        assert_eq!((r.out_of_order, r.unexpected), (0, 0));
        assert_eq!((r.recovered_true, r.missed_total), (2, 2));
        assert_eq!(r.time_to_recovery.max_us, 2_000);
        assert_eq!(r.published_during_storm, 2);
        assert_eq!(r.server_cores, Some(0.5));
        assert!(listen_overflows().is_some());
        let r = figures(&input, &[track("a", &[10, 13, 11], 1)]);
        assert_eq!((r.out_of_order, r.gaps, r.unexpected), (1, 0, 0));
    }
}
