//! Client worker processes and the line protocol the coordinator drives them with.
//!
//! One process cannot hold more sockets than its open-file limit, and one source address has a
//! limited number of ephemeral ports towards one server, so the coordinator spreads the
//! connections over several `loadtest worker` processes, each bound to its own source address
//! (127.0.0.2, 127.0.0.3, …). A worker reads commands from stdin and writes JSON events to
//! stdout, one per line; it ends when stdin closes or its deadline passes, whichever is first,
//! so a crashed coordinator never leaves clients behind.

use std::net::IpAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::client::{Auth, Pool, Stats, StormOutcome, Target, Track, lock, new_histogram};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Cmd {
    /// Open every connection, then answer [`Event::Connected`].
    Connect,
    /// Zero frame counters and the latency histogram, answer [`Event::Reset`].
    Reset,
    /// Answer [`Event::Report`].
    Report,
    /// Close every connection (close frame 1000), answer [`Event::Closed`].
    Close,
    /// Drop every connection at once and reconnect it with `?since=<last id>` (tracked
    /// workers), answer [`Event::Stormed`] when every reconnect attempt has ended.
    Storm,
    /// Answer [`Event::Tracks`] (tracked workers; empty otherwise).
    Tracks,
}

/// A histogram as `(value, count)` pairs (values at 3 significant digits).
pub type Buckets = Vec<(u64, u64)>;

pub fn to_buckets(h: &Histogram<u64>) -> Buckets {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

pub fn add_buckets(h: &mut Histogram<u64>, b: &Buckets) {
    for &(v, c) in b {
        let _ = h.record_n(v.max(1), c);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    Tick {
        frames: u64,
        open: i64,
        connected: u64,
        failed: u64,
        /// Recovery frames received (tracked workers).
        #[serde(default)]
        recovered: u64,
    },
    Connected {
        connected: u64,
        failed: u64,
        /// Indices (within this worker's users) that could not connect.
        failed_idx: Vec<usize>,
        first_us: u64,
        last_us: u64,
        handshake: Buckets,
    },
    Reset,
    Report(Report),
    Closed {
        open: i64,
    },
    Stormed(StormOutcome),
    Tracks {
        tracks: Vec<Track>,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub frames: u64,
    pub bytes: u64,
    pub untimed: u64,
    pub open: i64,
    pub dropped: u64,
    /// Close frames from the server: 1001, 1008, 1009, 1013, other.
    pub closes: [u64; 5],
    pub pings: u64,
    pub last_frame_us: u64,
    pub latency: Buckets,
    /// This worker's own CPU time so far.
    pub cpu_secs: f64,
}

fn report(stats: &Stats) -> Report {
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Report {
        frames: r(&stats.frames),
        bytes: r(&stats.bytes),
        untimed: r(&stats.untimed),
        open: stats.open.load(Ordering::Relaxed),
        dropped: r(&stats.dropped),
        closes: std::array::from_fn(|i| r(&stats.closes[i])),
        pings: r(&stats.pings),
        last_frame_us: r(&stats.last_frame_us),
        latency: to_buckets(&lock(&stats.latency)),
        cpu_secs: crate::procstat::cpu_secs(std::process::id()).unwrap_or(0.0),
    }
}

/// What a worker process is told on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub url: String,
    pub src: Option<IpAddr>,
    pub users: Vec<String>,
    pub auth: Auth,
    pub concurrency: usize,
    pub deadline: Duration,
    /// Record what every connection receives ([`Track`]), so it can be stormed.
    pub track: bool,
}

/// The user ids of connections `first..first + count` of a run.
pub fn user_ids(prefix: &str, first: usize, count: usize) -> Vec<String> {
    (first..first + count)
        .map(|i| format!("{prefix}{i}"))
        .collect()
}

/// Body of `loadtest worker`: runs on a current-thread runtime until stdin closes.
pub async fn serve(args: WorkerArgs) -> Result<(), String> {
    let (addr, path) = Target::parse_url(&args.url)?;
    let target = Target {
        addr,
        path,
        src: args.src,
        auth: args.auth.clone(),
        concurrency: args.concurrency,
        connect_timeout: Duration::from_secs(20),
    };
    let out = Arc::new(tokio::sync::Mutex::new(tokio::io::stdout()));
    let emit = |ev: Event| {
        let out = out.clone();
        async move {
            let mut line = serde_json::to_vec(&ev).expect("events serialize");
            line.push(b'\n');
            let mut o = out.lock().await;
            let _ = o.write_all(&line).await;
            let _ = o.flush().await;
        }
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut pool: Option<Pool> = None;
    let empty = Arc::new(Stats::default());
    let deadline = tokio::time::sleep(args.deadline);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let stats = pool.as_ref().map_or(empty.clone(), |p| p.stats.clone());
        let line = tokio::select! {
            _ = &mut deadline => return Err("deadline reached".into()),
            _ = tick.tick() => {
                emit(Event::Tick {
                    frames: stats.frames.load(Ordering::Relaxed),
                    open: stats.open.load(Ordering::Relaxed),
                    connected: stats.connected.load(Ordering::Relaxed),
                    failed: stats.failed.load(Ordering::Relaxed),
                    recovered: stats.recoveries.load(Ordering::Relaxed),
                }).await;
                continue;
            }
            l = lines.next_line() => l,
        };
        let Ok(Some(line)) = line else {
            return Ok(());
        };
        let cmd: Cmd =
            serde_json::from_str(&line).map_err(|e| format!("bad command {line}: {e}"))?;
        match cmd {
            Cmd::Connect => {
                // Ticks keep flowing while connecting.
                let live = Arc::new(Stats::default());
                let connecting =
                    Pool::connect_tracked(&target, &args.users, live.clone(), args.track);
                tokio::pin!(connecting);
                let p = loop {
                    tokio::select! {
                        p = &mut connecting => break p,
                        _ = tick.tick() => {
                            emit(Event::Tick {
                                frames: live.frames.load(Ordering::Relaxed),
                                open: live.open.load(Ordering::Relaxed),
                                connected: live.connected.load(Ordering::Relaxed),
                                failed: live.failed.load(Ordering::Relaxed),
                                recovered: 0,
                            }).await;
                        }
                        _ = &mut deadline => return Err("deadline reached".into()),
                    }
                };
                let s = &p.stats;
                let ev = Event::Connected {
                    connected: s.connected.load(Ordering::Relaxed),
                    failed: s.failed.load(Ordering::Relaxed),
                    failed_idx: lock(&s.failed_idx).clone(),
                    first_us: s.first_connect_us.load(Ordering::Relaxed),
                    last_us: s.last_upgrade_us.load(Ordering::Relaxed),
                    handshake: to_buckets(&lock(&s.handshake)),
                };
                pool = Some(p);
                emit(ev).await;
            }
            Cmd::Reset => {
                stats.reset_frames();
                emit(Event::Reset).await;
            }
            Cmd::Report => emit(Event::Report(report(&stats))).await,
            Cmd::Close => {
                if let Some(p) = pool.take() {
                    let s = p.stats.clone();
                    p.close_all(Duration::from_secs(10)).await;
                    emit(Event::Closed {
                        open: s.open.load(Ordering::Relaxed),
                    })
                    .await;
                    pool = Some(Pool::empty(s));
                } else {
                    emit(Event::Closed { open: 0 }).await;
                }
            }
            Cmd::Storm => {
                let Some(p) = pool.as_mut() else {
                    emit(Event::Stormed(StormOutcome::default())).await;
                    continue;
                };
                // Ticks keep flowing while reconnecting.
                let s = p.stats.clone();
                let storming = p.storm(Duration::from_secs(120));
                tokio::pin!(storming);
                let out = loop {
                    tokio::select! {
                        o = &mut storming => break o,
                        _ = tick.tick() => {
                            emit(Event::Tick {
                                frames: s.frames.load(Ordering::Relaxed),
                                open: s.open.load(Ordering::Relaxed),
                                connected: s.connected.load(Ordering::Relaxed),
                                failed: s.failed.load(Ordering::Relaxed),
                                recovered: s.recoveries.load(Ordering::Relaxed),
                            }).await;
                        }
                        _ = &mut deadline => return Err("deadline reached".into()),
                    }
                };
                emit(Event::Stormed(out)).await;
            }
            Cmd::Tracks => {
                let tracks = lock(&stats.tracks)
                    .iter()
                    .map(|t| lock(t).clone())
                    .collect();
                emit(Event::Tracks { tracks }).await;
            }
        }
    }
}

/// The coordinator's handle on one worker process.
pub struct Worker {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::UnboundedReceiver<Event>,
    /// Latest tick values.
    pub frames: Arc<AtomicU64>,
    pub open: Arc<AtomicI64>,
    pub connected: Arc<AtomicU64>,
    /// Recovery frames its connections received (tracked workers).
    pub recovered: Arc<AtomicU64>,
    /// Users this worker connects, in order.
    pub users: Vec<String>,
    /// The server it connects to.
    pub url: String,
}

impl Worker {
    /// Starts `exe worker …` for `args`.
    pub fn spawn(
        exe: &std::path::Path,
        args: &WorkerArgs,
        prefix: &str,
        first: usize,
    ) -> Result<Worker, String> {
        let mut cmd = Command::new(exe);
        cmd.arg("worker")
            .arg("--url")
            .arg(&args.url)
            .arg("--user-prefix")
            .arg(prefix)
            .arg("--first")
            .arg(first.to_string())
            .arg("--count")
            .arg(args.users.len().to_string())
            .arg("--concurrency")
            .arg(args.concurrency.to_string())
            .arg("--deadline-secs")
            .arg(args.deadline.as_secs().to_string());
        if let Some(src) = args.src {
            cmd.arg("--src").arg(src.to_string());
        }
        if let Auth::Jwt { secret } = &args.auth {
            cmd.arg("--jwt-secret").arg(secret);
        }
        if args.track {
            cmd.arg("--track");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
        let stdin = child.stdin.take().ok_or("worker stdin")?;
        let stdout = child.stdout.take().ok_or("worker stdout")?;
        let (tx, events) = mpsc::unbounded_channel();
        let frames = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicI64::new(0));
        let connected = Arc::new(AtomicU64::new(0));
        let recovered = Arc::new(AtomicU64::new(0));
        let (f, o, c, rc) = (
            frames.clone(),
            open.clone(),
            connected.clone(),
            recovered.clone(),
        );
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Event>(&line) {
                    Ok(Event::Tick {
                        frames,
                        open,
                        connected,
                        recovered,
                        ..
                    }) => {
                        f.store(frames, Ordering::Relaxed);
                        o.store(open, Ordering::Relaxed);
                        c.store(connected, Ordering::Relaxed);
                        rc.store(recovered, Ordering::Relaxed);
                    }
                    Ok(ev) => {
                        let _ = tx.send(ev);
                    }
                    Err(e) => eprintln!("loadtest: bad worker line {line:?}: {e}"),
                }
            }
        });
        Ok(Worker {
            child,
            stdin,
            events,
            frames,
            open,
            connected,
            recovered,
            users: args.users.clone(),
            url: args.url.clone(),
        })
    }

    pub async fn send(&mut self, cmd: Cmd) -> Result<(), String> {
        let mut line = serde_json::to_vec(&cmd).expect("commands serialize");
        line.push(b'\n');
        self.stdin
            .write_all(&line)
            .await
            .map_err(|e| format!("worker gone: {e}"))
    }

    /// The next non-tick event, within `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Result<Event, String> {
        match tokio::time::timeout(limit, self.events.recv()).await {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => Err("worker exited".into()),
            Err(_) => Err(format!("worker did not answer within {limit:?}")),
        }
    }

    /// The worker's process id (for its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Ends the worker (closing stdin ends it; kill if it lingers).
    pub async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Sends `cmd` to every worker and collects one answer from each.
pub async fn all(workers: &mut [Worker], cmd: Cmd, limit: Duration) -> Result<Vec<Event>, String> {
    for w in workers.iter_mut() {
        w.send(cmd).await?;
    }
    let mut out = Vec::with_capacity(workers.len());
    for w in workers.iter_mut() {
        out.push(w.recv(limit).await?);
    }
    Ok(out)
}

/// Merges workers' latency buckets into one histogram.
pub fn merged(parts: impl IntoIterator<Item = Buckets>) -> Histogram<u64> {
    let mut h = new_histogram();
    for b in parts {
        add_buckets(&mut h, &b);
    }
    h
}
