//! The measurement suite: connect N clients through worker processes, then run the selected
//! scenarios in a fixed order on the same connections, sampling the server's RSS and CPU from
//! `/proc` around each one.
//!
//! | phase | what is measured |
//! |---|---|
//! | connect | handshakes/s (N ÷ first connect → last 101), handshake latency |
//! | idle | (RSS after connecting and settling − RSS before) ÷ N |
//! | fanout | K back-to-back broadcasts: frames/s delivered, completeness, latency, CPU s per M frames; then RSS kept per connection after the burst |
//! | sustained | broadcasts at R/s for D s: publish → receive latency, completeness |
//! | unicast | messages at R/s to random connected users for D s: latency, completeness, and the gateway's own delivery latency from its `/metrics` |
//! | recovery | (only when asked for: `--scenarios recovery`) unicasts at R/s to random users; every client drops at once and reconnects with `?since=<last id>`: recovery frames, time to them, gaps and duplicates per user, the server's CPU, RSS and history |
//! | disconnect | every client closes; RSS after W s, against the RSS before connecting |
//!
//! Every phase is bounded: it ends when every expected frame has arrived, or when no frame has
//! arrived for 5 s, or at its time cap, whichever is first.

use std::io::{IsTerminal, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client::{Auth, Target, new_histogram, now_us};
use crate::procstat::{cpu_secs, rss_bytes};
use crate::publish::{Pace, Publisher};
use crate::worker::{Cmd, Event, Report, Worker, WorkerArgs, all, merged, user_ids};

mod recovery;
pub use recovery::Recovery;

/// Prometheus histogram of the gateway's own delivery latency (broker delivery → socket write).
pub const GATEWAY_LATENCY_METRIC: &str = "wsnotify_delivery_latency_seconds";

#[derive(Debug, Clone)]
pub struct Phases {
    pub fanout: bool,
    pub sustained: bool,
    pub unicast: bool,
    pub disconnect: bool,
    /// The reconnect storm with recovery (not part of `all`).
    pub recovery: bool,
}

impl Phases {
    pub fn parse(list: &str) -> Result<Phases, String> {
        let mut p = Phases {
            fanout: false,
            sustained: false,
            unicast: false,
            disconnect: false,
            recovery: false,
        };
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all" => {
                    p = Phases {
                        fanout: true,
                        sustained: true,
                        unicast: true,
                        disconnect: true,
                        recovery: p.recovery,
                    }
                }
                "idle" | "connect" | "handshake" => {}
                "fanout" | "burst" => p.fanout = true,
                "sustained" => p.sustained = true,
                "unicast" => p.unicast = true,
                "disconnect" => p.disconnect = true,
                "recovery" | "storm" => p.recovery = true,
                other => {
                    return Err(format!(
                        "unknown scenario {other:?} (idle, fanout, sustained, unicast, disconnect, recovery, all)"
                    ));
                }
            }
        }
        Ok(p)
    }
}

#[derive(Debug, Clone)]
pub struct SuiteConfig {
    /// `ws://IP:PORT/path` of each server process (replicas of one gateway on one queue);
    /// the connections are spread evenly over them.
    pub urls: Vec<String>,
    pub amqp_url: String,
    pub queue: String,
    /// Server processes for RSS and CPU: for each URL, the processes behind it (nginx: master
    /// and worker). Empty: those figures are left out. Figures are summed over all of them;
    /// per-server readings are in [`SuiteResult::servers`].
    pub pids: Vec<Vec<u32>>,
    /// How notifications reach the server.
    pub via: Via,
    /// Broker process (RabbitMQ's `beam.smp`), for its CPU share.
    pub broker_pids: Vec<u32>,
    pub connections: usize,
    pub procs: usize,
    /// Worker `i` binds source address `src_base + i`.
    pub src_base: Ipv4Addr,
    pub auth: Auth,
    /// Handshakes in flight per worker.
    pub concurrency: usize,
    pub phases: Phases,
    pub broadcasts: usize,
    pub frame_bytes: usize,
    pub sustained_rate: f64,
    pub sustained_secs: f64,
    pub unicast_rate: f64,
    pub unicast_secs: f64,
    /// Recovery storm: unicasts per second to random users (before, during and after the
    /// storm), seconds of them before the storm, and seconds after every client recovered.
    pub storm_rate: f64,
    pub storm_warm_secs: f64,
    pub storm_tail_secs: f64,
    /// Pause after connecting and after the burst before RSS is read.
    pub settle: Duration,
    pub disconnect_wait: Duration,
    pub persistent: bool,
    /// This executable (spawned as `worker`).
    pub exe: PathBuf,
    pub label: String,
    pub progress: bool,
}

/// How notifications are published.
#[derive(Debug, Clone)]
pub enum Via {
    /// Task envelopes on the notify queue, through RabbitMQ (wsnotify, the baseline).
    Amqp,
    /// Frames POSTed to nchan's HTTP publisher at this address, over this many keep-alive
    /// connections (no broker).
    Nchan { addr: SocketAddr, conns: usize },
}

/// Either publisher.
enum Sink {
    Amqp(Publisher),
    Nchan(crate::nchan::HttpPublisher),
}

impl Sink {
    async fn broadcast(&mut self) -> Result<(), String> {
        match self {
            Sink::Amqp(p) => p.broadcast().await,
            Sink::Nchan(p) => p.broadcast().await,
        }
    }

    async fn unicast(&mut self, user: &str) -> Result<(), String> {
        match self {
            Sink::Amqp(p) => p.to_user(user).await,
            Sink::Nchan(p) => p.to_user(user).await,
        }
    }

    /// Publishes that failed (HTTP errors; AMQP publishes fail loudly instead).
    fn failed(&self) -> u64 {
        match self {
            Sink::Amqp(_) => 0,
            Sink::Nchan(p) => p.failed.load(Ordering::Relaxed),
        }
    }

    async fn close(self) {
        match self {
            Sink::Amqp(p) => p.close().await,
            Sink::Nchan(p) => p.close().await,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delivery {
    pub messages: u64,
    pub expected_frames: u64,
    pub delivered_frames: u64,
    pub complete_pct: f64,
    /// First publish → last frame received.
    pub secs: f64,
    pub frames_per_sec: f64,
    pub avg_frame_bytes: f64,
    pub latency: Latency,
    /// Server CPU seconds per million frames delivered.
    pub server_cpu_per_mframes: Option<f64>,
    /// Server CPU (all replicas) and broker CPU over the phase ÷ notifications published, µs.
    pub server_cpu_per_msg_us: Option<f64>,
    pub broker_cpu_per_msg_us: Option<f64>,
    /// Cores each server process was busy during the phase (one entry per replica).
    pub server_cores_each: Vec<Option<f64>>,
    /// Worker processes' CPU seconds per million frames received.
    pub client_cpu_per_mframes: f64,
    /// Cores busy during the phase (CPU seconds ÷ wall seconds, first publish to last frame):
    /// the server, the broker, the client workers.
    pub server_cores: Option<f64>,
    pub broker_cores: Option<f64>,
    pub client_cores: f64,
    /// Everything else on the machine (other processes, the kernel's own work): busy cores
    /// from `/proc/stat` minus the three above. Large values mean a noisy run.
    pub other_cores: Option<f64>,
    /// Frames of the previous phase that were still arriving when this one was about to
    /// start, and for how long (this phase waited for them to stop).
    pub late_before: u64,
    pub late_before_secs: f64,
    /// Publishes the server refused or did not answer (nchan's HTTP publisher).
    pub failed_publishes: u64,
    /// The server's own delivery latency from its `/metrics` (bucket upper bound), if exposed.
    pub gateway_p99_us: Option<f64>,
    pub gateway_p50_us: Option<f64>,
    pub gateway_samples: Option<u64>,
}

/// One server process's own readings (a replica, or the only process).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServerFigures {
    /// Its processes (nginx: master, worker); RSS and CPU are summed over them.
    pub pids: Vec<u32>,
    pub url: String,
    /// Connections opened to it.
    pub connected: u64,
    pub rss_start: Option<u64>,
    pub rss_idle: Option<u64>,
    pub rss_after_burst: Option<u64>,
    pub rss_after_disconnect: Option<u64>,
    /// CPU seconds from before the first connect to the end of the suite.
    pub cpu_secs: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SuiteResult {
    pub label: String,
    /// Server processes measured; RSS and CPU figures are their sums.
    pub replicas: usize,
    /// Per process, in the order of [`SuiteConfig::urls`].
    pub servers: Vec<ServerFigures>,
    pub connections: usize,
    pub connected: u64,
    pub failed: u64,
    pub handshakes_per_sec: f64,
    pub handshake_latency: Latency,
    /// Server CPU per accepted connection, µs (JWT check included when enabled).
    pub server_cpu_per_handshake_us: Option<f64>,
    pub rss_start: Option<u64>,
    pub rss_idle: Option<u64>,
    pub idle_bytes_per_conn: Option<f64>,
    pub fanout: Option<Delivery>,
    pub rss_after_burst: Option<u64>,
    pub burst_kept_bytes_per_conn: Option<f64>,
    pub sustained: Option<Delivery>,
    pub unicast: Option<Delivery>,
    pub recovery: Option<Recovery>,
    pub rss_after_disconnect: Option<u64>,
    pub rss_after_disconnect_over_start: Option<i64>,
    /// Close frames the clients received: 1001, 1008, 1009, 1013, other.
    pub server_closes: [u64; 5],
    /// Connections that ended without a close frame.
    pub dropped: u64,
}

/// Live state for the progress line.
struct Progress {
    phase: std::sync::Mutex<&'static str>,
    stop: AtomicBool,
}

pub struct Suite {
    cfg: SuiteConfig,
    workers: Vec<Worker>,
    /// Users that are connected, for unicast targets.
    live_users: Vec<String>,
    /// HTTP address of each server process (for `/metrics`).
    http: Vec<SocketAddr>,
    progress: Arc<Progress>,
    progress_task: Option<tokio::task::JoinHandle<()>>,
    open_at_start: u64,
}

fn sum<T: Copy + Into<f64>>(xs: impl Iterator<Item = T>) -> f64 {
    xs.map(Into::into).sum()
}

/// `f` of every process, summed; `None` if there are no processes or any reading failed.
fn sum_each<T: std::iter::Sum<T>>(pids: &[u32], f: impl Fn(u32) -> Option<T>) -> Option<T> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

impl Suite {
    /// Runs the whole suite and returns its figures. Workers are stopped in every case.
    pub async fn run(cfg: SuiteConfig) -> Result<SuiteResult, String> {
        if cfg.urls.is_empty() {
            return Err("no server URL".into());
        }
        if !cfg.pids.is_empty() && cfg.pids.len() != cfg.urls.len() {
            return Err(format!(
                "{} server URLs but {} process ids",
                cfg.urls.len(),
                cfg.pids.len()
            ));
        }
        let http = cfg
            .urls
            .iter()
            .map(|u| Target::parse_url(u).map(|(a, _)| a))
            .collect::<Result<Vec<_>, _>>()?;
        let mut suite = Suite {
            cfg,
            workers: Vec::new(),
            live_users: Vec::new(),
            http,
            progress: Arc::new(Progress {
                phase: std::sync::Mutex::new("start"),
                stop: AtomicBool::new(false),
            }),
            progress_task: None,
            open_at_start: 0,
        };
        let res = suite.run_inner().await;
        suite.progress.stop.store(true, Ordering::Relaxed);
        if let Some(t) = suite.progress_task.take() {
            t.abort();
            let _ = t.await;
            // Clear the line, so the tables that follow start on a clean one.
            eprint!("\r\x1b[K");
        }
        for w in suite.workers.drain(..) {
            w.stop().await;
        }
        res
    }

    fn phase(&self, name: &'static str) {
        *crate::client::lock(&self.progress.phase) = name;
    }

    fn all_pids(&self) -> Vec<u32> {
        self.cfg.pids.iter().flatten().copied().collect()
    }

    /// RSS summed over the server processes (`None` if there are none or one is gone).
    fn rss(&self) -> Option<u64> {
        sum_each(&self.all_pids(), rss_bytes)
    }

    /// RSS of each server (summed over its processes).
    fn rss_each(&self) -> Vec<Option<u64>> {
        self.cfg
            .pids
            .iter()
            .map(|g| sum_each(g, rss_bytes))
            .collect()
    }

    /// CPU seconds summed over the server processes.
    fn cpu(&self) -> Option<f64> {
        sum_each(&self.all_pids(), cpu_secs)
    }

    fn cpu_each(&self) -> Vec<Option<f64>> {
        self.cfg
            .pids
            .iter()
            .map(|g| sum_each(g, cpu_secs))
            .collect()
    }

    fn frames(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.frames.load(Ordering::Relaxed))
            .sum()
    }

    /// The live progress line: on a terminal only (nothing when stderr is piped), rewritten in
    /// place twice a second.
    fn spawn_progress(&mut self) {
        if !self.cfg.progress || !std::io::stderr().is_terminal() {
            return;
        }
        let progress = self.progress.clone();
        let counters: Vec<_> = self
            .workers
            .iter()
            .map(|w| (w.frames.clone(), w.open.clone(), w.connected.clone()))
            .collect();
        let pids = self.all_pids();
        let label = self.cfg.label.clone();
        let total = self.cfg.connections;
        self.progress_task = Some(tokio::spawn(async move {
            let started = Instant::now();
            let mut last = (Instant::now(), 0u64);
            while !progress.stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let frames: u64 = counters.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
                let open: i64 = counters.iter().map(|c| c.1.load(Ordering::Relaxed)).sum();
                let conn: u64 = counters.iter().map(|c| c.2.load(Ordering::Relaxed)).sum();
                let now = Instant::now();
                // Counters restart at each phase.
                let rate = frames.saturating_sub(last.1) as f64
                    / now.duration_since(last.0).as_secs_f64().max(1e-3);
                last = (now, frames);
                let rss = sum_each(&pids, rss_bytes)
                    .map_or("-".into(), |r| format!("{:.1} MB", r as f64 / 1e6));
                let phase = *crate::client::lock(&progress.phase);
                eprint!(
                    "\r[{label} {:>6.1} s] {phase:<10} connected {conn:>6} of {total}  open {open:>6}  frames {frames:>10} ({rate:>9.0}/s)  server RSS {rss}\x1b[K",
                    started.elapsed().as_secs_f64(),
                );
                let _ = std::io::stderr().flush();
            }
        }));
    }

    async fn run_inner(&mut self) -> Result<SuiteResult, String> {
        let cfg = self.cfg.clone();
        let mut res = SuiteResult {
            label: cfg.label.clone(),
            connections: cfg.connections,
            ..Default::default()
        };
        let mut publisher = match cfg.via {
            Via::Amqp => {
                let mut p = Publisher::connect(&cfg.amqp_url, &cfg.queue, cfg.frame_bytes).await?;
                p.persistent(cfg.persistent);
                Sink::Amqp(p)
            }
            Via::Nchan { addr, conns } => Sink::Nchan(
                crate::nchan::HttpPublisher::connect(addr, conns, cfg.frame_bytes).await?,
            ),
        };

        // ---- connect
        // Every server process gets the same number of workers, so the connections spread
        // evenly over the replicas.
        let replicas = cfg.urls.len();
        let procs = cfg.procs.max(1).div_ceil(replicas) * replicas;
        let procs = procs.clamp(1, cfg.connections.max(1));
        let per = cfg.connections.div_ceil(procs);
        let prefix = format!("lt{}-", &uuid::Uuid::now_v7().simple().to_string()[24..]);
        let phase_secs = |frames: f64| 30.0 + frames / 100_000.0;
        let planned = 60.0
            + cfg.connections as f64 / 1000.0
            + phase_secs((cfg.broadcasts * cfg.connections) as f64)
            + cfg.sustained_secs
            + phase_secs(cfg.sustained_rate * cfg.sustained_secs * cfg.connections as f64)
            + cfg.unicast_secs
            + phase_secs(cfg.unicast_rate * cfg.unicast_secs)
            + if cfg.phases.recovery {
                300.0 + cfg.storm_warm_secs + cfg.storm_tail_secs + cfg.connections as f64 / 200.0
            } else {
                0.0
            }
            + 3.0 * cfg.settle.as_secs_f64()
            + cfg.disconnect_wait.as_secs_f64();
        for i in 0..procs {
            let first = i * per;
            let count = per.min(cfg.connections.saturating_sub(first));
            if count == 0 {
                break;
            }
            let src = cfg.src_base.octets();
            let src = Ipv4Addr::new(src[0], src[1], src[2], src[3].wrapping_add(i as u8));
            let args = WorkerArgs {
                // Worker i connects to server i mod R; `procs` is a multiple of R.
                url: cfg.urls[i % cfg.urls.len()].clone(),
                src: Some(IpAddr::V4(src)),
                users: user_ids(&prefix, first, count),
                auth: cfg.auth.clone(),
                concurrency: cfg.concurrency,
                deadline: Duration::from_secs_f64(planned),
                track: cfg.phases.recovery,
            };
            self.workers
                .push(Worker::spawn(&cfg.exe, &args, &prefix, first)?);
        }
        self.spawn_progress();
        res.replicas = replicas;
        res.servers = cfg
            .urls
            .iter()
            .enumerate()
            .map(|(i, url)| ServerFigures {
                pids: cfg.pids.get(i).cloned().unwrap_or_default(),
                url: url.clone(),
                ..Default::default()
            })
            .collect();
        let cpu_start = self.cpu_each();
        res.rss_start = self.rss();
        for (s, r) in res.servers.iter_mut().zip(self.rss_each()) {
            s.rss_start = r;
        }
        let cpu0 = self.cpu();
        self.phase("connect");
        let limit = Duration::from_secs_f64(30.0 + cfg.connections as f64 / 500.0);
        let answers = all(&mut self.workers, Cmd::Connect, limit).await?;
        let mut first_us = u64::MAX;
        let mut last_us = 0;
        let mut hs = new_histogram();
        for (w, ev) in self.workers.iter().zip(answers) {
            let Event::Connected {
                connected,
                failed,
                failed_idx,
                first_us: f,
                last_us: l,
                handshake,
            } = ev
            else {
                return Err(format!("unexpected answer to connect: {ev:?}"));
            };
            res.connected += connected;
            res.failed += failed;
            if let Some(s) = res.servers.iter_mut().find(|s| s.url == w.url) {
                s.connected += connected;
            }
            first_us = first_us.min(f);
            last_us = last_us.max(l);
            crate::worker::add_buckets(&mut hs, &handshake);
            let failed: std::collections::HashSet<usize> = failed_idx.into_iter().collect();
            self.live_users.extend(
                w.users
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !failed.contains(i))
                    .map(|(_, u)| u.clone()),
            );
        }
        if res.connected == 0 {
            return Err("no connection could be opened".into());
        }
        res.handshakes_per_sec =
            res.connected as f64 / ((last_us.saturating_sub(first_us)) as f64 / 1e6).max(1e-6);
        res.handshake_latency = Latency::of(&hs);
        if let (Some(a), Some(b)) = (cpu0, self.cpu()) {
            res.server_cpu_per_handshake_us = Some((b - a) * 1e6 / res.connected as f64);
        }
        self.open_at_start = res.connected;

        // ---- idle
        self.phase("idle");
        tokio::time::sleep(cfg.settle).await;
        res.rss_idle = self.rss();
        for (s, r) in res.servers.iter_mut().zip(self.rss_each()) {
            s.rss_idle = r;
        }
        if let (Some(a), Some(b)) = (res.rss_start, res.rss_idle) {
            res.idle_bytes_per_conn = Some((b as f64 - a as f64) / res.connected as f64);
        }

        // ---- fan-out burst
        if cfg.phases.fanout {
            self.phase("fanout");
            let n = cfg.broadcasts as u64;
            let d = self
                .deliver(&mut publisher, n, 0.0, Target2::Broadcast)
                .await?;
            res.fanout = Some(d);
            self.phase("settle");
            tokio::time::sleep(cfg.settle).await;
            res.rss_after_burst = self.rss();
            for (s, r) in res.servers.iter_mut().zip(self.rss_each()) {
                s.rss_after_burst = r;
            }
            if let (Some(a), Some(b)) = (res.rss_idle, res.rss_after_burst) {
                res.burst_kept_bytes_per_conn =
                    Some((b as f64 - a as f64) / self.open_now().max(1) as f64);
            }
        }

        // ---- sustained broadcasts
        if cfg.phases.sustained {
            self.phase("sustained");
            let n = (cfg.sustained_rate * cfg.sustained_secs).round() as u64;
            res.sustained = Some(
                self.deliver(&mut publisher, n, cfg.sustained_rate, Target2::Broadcast)
                    .await?,
            );
        }

        // ---- unicast to random users
        if cfg.phases.unicast {
            self.phase("unicast");
            let n = (cfg.unicast_rate * cfg.unicast_secs).round() as u64;
            res.unicast = Some(
                self.deliver(&mut publisher, n, cfg.unicast_rate, Target2::RandomUser)
                    .await?,
            );
        }

        // ---- reconnect storm with recovery
        if cfg.phases.recovery {
            self.phase("recovery");
            res.recovery = Some(self.recovery(&mut publisher).await?);
        }

        // Close frames and drops seen so far (before we close ourselves).
        let reports = self.reports().await?;
        for r in &reports {
            for (i, c) in r.closes.iter().enumerate() {
                res.server_closes[i] += c;
            }
            res.dropped += r.dropped;
        }

        // ---- disconnect
        if cfg.phases.disconnect {
            self.phase("disconnect");
            all(&mut self.workers, Cmd::Close, Duration::from_secs(30)).await?;
            self.phase("drained");
            tokio::time::sleep(cfg.disconnect_wait).await;
            res.rss_after_disconnect = self.rss();
            for (s, r) in res.servers.iter_mut().zip(self.rss_each()) {
                s.rss_after_disconnect = r;
            }
            if let (Some(a), Some(b)) = (res.rss_start, res.rss_after_disconnect) {
                res.rss_after_disconnect_over_start = Some(b as i64 - a as i64);
            }
        }
        for ((s, a), b) in res.servers.iter_mut().zip(cpu_start).zip(self.cpu_each()) {
            s.cpu_secs = a.zip(b).map(|(a, b)| b - a);
        }
        publisher.close().await;
        Ok(res)
    }

    fn open_now(&self) -> i64 {
        self.workers
            .iter()
            .map(|w| w.open.load(Ordering::Relaxed))
            .sum()
    }

    async fn reports(&mut self) -> Result<Vec<Report>, String> {
        all(&mut self.workers, Cmd::Report, Duration::from_secs(30))
            .await?
            .into_iter()
            .map(|ev| match ev {
                Event::Report(r) => Ok(r),
                other => Err(format!("unexpected answer to report: {other:?}")),
            })
            .collect()
    }

    /// The gateway's delivery-latency histogram, summed over the server processes (`None` if
    /// any of them does not expose it).
    async fn gateway_hist(&self) -> Option<crate::prom::Buckets> {
        let mut total: Option<crate::prom::Buckets> = None;
        for &addr in &self.http {
            let (_, body) = crate::prom::http_get(addr, "/metrics").await?;
            let h = crate::prom::histogram(&body, GATEWAY_LATENCY_METRIC)?;
            total = Some(match total {
                None => h,
                Some(t) => crate::prom::add(&t, &h),
            });
        }
        total
    }

    /// Publishes `n` messages (back to back if `rate` is 0, else paced at `rate`/s), waits for
    /// their frames, and summarises.
    async fn deliver(
        &mut self,
        publisher: &mut Sink,
        n: u64,
        rate: f64,
        target: Target2,
    ) -> Result<Delivery, String> {
        // Frames of an earlier phase still arriving (a server that fell behind and was cut
        // off by that phase's cap) would count in this one: wait until they stop (bounded).
        let waited = Instant::now();
        let first = self.frames();
        let mut last = (first, Instant::now());
        while waited.elapsed() < Duration::from_secs(120) {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let f = self.frames();
            if f != last.0 {
                last = (f, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
        let (late_before, late_before_secs) = (
            last.0.saturating_sub(first),
            last.1.duration_since(waited).as_secs_f64(),
        );
        all(&mut self.workers, Cmd::Reset, Duration::from_secs(30)).await?;
        let before = self.reports().await?;
        let client_cpu0 = sum(before.iter().map(|r| r.cpu_secs));
        let gw0 = self.gateway_hist().await;
        let each0 = self.cpu_each();
        let cpu0 = self.cpu();
        let broker0 = sum_each(&self.cfg.broker_pids, cpu_secs);
        let machine0 = crate::procstat::machine_busy_secs();
        let open = self.open_now().max(0) as u64;
        let failed0 = publisher.failed();
        let t0 = now_us();
        let started = Instant::now();
        let mut rng = fastrand::Rng::new();
        let mut sent = 0u64;
        let mut pace = Pace::new(rate);
        while sent < n {
            let due = pace.due().await.min(n);
            while sent < due {
                match target {
                    Target2::Broadcast => publisher.broadcast().await?,
                    Target2::RandomUser => {
                        let u = &self.live_users[rng.usize(..self.live_users.len())];
                        publisher.unicast(u).await?;
                    }
                }
                sent += 1;
            }
        }
        let expected = match target {
            Target2::Broadcast => n * open,
            Target2::RandomUser => n,
        };
        // Wait for the frames: done, stalled for 5 s, or capped.
        let cap = Instant::now() + Duration::from_secs_f64(30.0 + expected as f64 / 100_000.0);
        let mut last = (self.frames(), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let f = self.frames();
            if f >= expected || Instant::now() >= cap {
                break;
            }
            if f != last.0 {
                last = (f, Instant::now());
            } else if last.1.elapsed() >= Duration::from_secs(5) {
                break;
            }
        }
        // Ticks lag by up to 250 ms: ask for exact figures.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu1 = self.cpu();
        let each1 = self.cpu_each();
        let broker1 = sum_each(&self.cfg.broker_pids, cpu_secs);
        let machine1 = crate::procstat::machine_busy_secs();
        let wall = started.elapsed().as_secs_f64();
        let gw1 = self.gateway_hist().await;
        let reports = self.reports().await?;
        let delivered: u64 = reports.iter().map(|r| r.frames).sum();
        let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
        let last_us = reports.iter().map(|r| r.last_frame_us).max().unwrap_or(t0);
        let client_cpu1 = sum(reports.iter().map(|r| r.cpu_secs));
        let h = merged(reports.into_iter().map(|r| r.latency));
        let secs = (last_us.saturating_sub(t0) as f64 / 1e6).max(1e-6);
        let mframes = delivered as f64 / 1e6;
        let mut d = Delivery {
            messages: n,
            expected_frames: expected,
            delivered_frames: delivered,
            complete_pct: if expected == 0 {
                100.0
            } else {
                delivered as f64 * 100.0 / expected as f64
            },
            secs,
            frames_per_sec: delivered as f64 / secs,
            avg_frame_bytes: if delivered == 0 {
                0.0
            } else {
                bytes as f64 / delivered as f64
            },
            latency: Latency::of(&h),
            server_cpu_per_mframes: match (cpu0, cpu1) {
                (Some(a), Some(b)) if mframes > 0.0 => Some((b - a) / mframes),
                _ => None,
            },
            client_cpu_per_mframes: if mframes > 0.0 {
                (client_cpu1 - client_cpu0) / mframes
            } else {
                0.0
            },
            server_cpu_per_msg_us: cpu0
                .zip(cpu1)
                .filter(|_| n > 0)
                .map(|(a, b)| (b - a) * 1e6 / n as f64),
            broker_cpu_per_msg_us: broker0
                .zip(broker1)
                .filter(|_| n > 0)
                .map(|(a, b)| (b - a) * 1e6 / n as f64),
            server_cores_each: each0
                .iter()
                .zip(&each1)
                .map(|(a, b)| a.zip(*b).map(|(a, b)| (b - a) / wall))
                .collect(),
            server_cores: cpu0.zip(cpu1).map(|(a, b)| (b - a) / wall),
            broker_cores: broker0.zip(broker1).map(|(a, b)| (b - a) / wall),
            client_cores: (client_cpu1 - client_cpu0) / wall,
            failed_publishes: publisher.failed() - failed0,
            late_before,
            late_before_secs,
            ..Default::default()
        };
        if let (Some(a), Some(b)) = (machine0, machine1) {
            d.other_cores = Some(
                (b - a) / wall
                    - d.server_cores.unwrap_or(0.0)
                    - d.broker_cores.unwrap_or(0.0)
                    - d.client_cores,
            );
        }
        if let (Some(a), Some(b)) = (gw0, gw1) {
            let delta = crate::prom::delta(&a, &b);
            if let Some((p99, samples)) = crate::prom::quantile(&delta, 0.99) {
                d.gateway_p99_us = Some(p99 * 1e6);
                d.gateway_samples = Some(samples);
            }
            d.gateway_p50_us = crate::prom::quantile(&delta, 0.5).map(|(v, _)| v * 1e6);
        }
        Ok(d)
    }
}

#[derive(Debug, Clone, Copy)]
enum Target2 {
    Broadcast,
    RandomUser,
}
