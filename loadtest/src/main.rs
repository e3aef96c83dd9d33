//! `loadtest`: see the crate documentation and BENCHMARKS.md for what each figure means and
//! how to reproduce it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadtest::baseline::{self, BaselineArgs, BaselineAuth};
use loadtest::client::Auth;
use loadtest::publish::Publisher;
use loadtest::report;
use loadtest::server::{Kind, Server};
use loadtest::suite::{Phases, Suite, SuiteConfig, SuiteResult, Via};
use loadtest::worker::{self, WorkerArgs};

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Load generator for wsnotify and servers speaking its contract"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the suite against a server that is already running.
    Run {
        /// WebSocket URL of the server (its /metrics is read from the same address). Repeat
        /// it for several replicas: the connections are spread evenly over them.
        #[arg(long = "url", default_value = "ws://127.0.0.1:8081/ws")]
        urls: Vec<String>,
        /// The server's process id, for RSS and CPU from /proc (repeat it, in the order of
        /// the URLs, for several replicas: the figures are summed).
        #[arg(long = "pid")]
        pids: Vec<u32>,
        /// Queue the server consumes.
        #[arg(long, default_value = "websocket_notifications")]
        queue: String,
        #[command(flatten)]
        opts: SuiteOpts,
    },
    /// Start wsnotify and the naive baseline in turn (interleaved, `--repeat` times each) on
    /// fresh queues and ports, run the same suite against each, and print both with ratios.
    Compare {
        /// Runs per server.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[command(flatten)]
        servers: Servers,
        /// Also write the JSON (`compare.json`) and its figure (`frames-per-phase.svg`) here.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        opts: SuiteOpts,
    },
    /// Run `compare` at several points (offered rates, or connection counts), the servers
    /// interleaved at each point, and write one JSON with every point and an SVG figure to
    /// `--out`: `unicast-latency.svg`, `sustained-latency.svg` or `idle-rss.svg`.
    Sweep {
        /// `unicast` (--rates in notifications/s), `sustained` (--rates in broadcasts/s) or
        /// `idle` (--counts: connections, RSS after connecting).
        #[arg(long)]
        scenario: String,
        /// Offered rates, comma-separated (unicast, sustained).
        #[arg(long, value_delimiter = ',')]
        rates: Vec<f64>,
        /// Connection counts, comma-separated (idle).
        #[arg(long, value_delimiter = ',')]
        counts: Vec<usize>,
        /// Seconds per point (sets --unicast-secs or --sustained-secs).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Directory for `<scenario>-sweep.json` and the figure.
        #[arg(long)]
        out: PathBuf,
        /// Runs per server at each point (the figure uses the median).
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        #[command(flatten)]
        servers: Servers,
        #[command(flatten)]
        opts: SuiteOpts,
    },
    /// Redraw the SVG figures of a `compare --json` or `sweep` result without running anything.
    Plot {
        /// The JSON file.
        json: PathBuf,
        /// Directory for the SVG files (default: next to the JSON).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The naive baseline server: tokio-tungstenite defaults, split + one mpsc per connection.
    Baseline {
        #[arg(long, default_value = "127.0.0.1:8082")]
        addr: SocketAddr,
        #[arg(long, default_value = "websocket_notifications")]
        queue: String,
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        /// Verify HS256 `?token=` with this secret instead of trusting `?user_id=`.
        #[arg(long)]
        jwt_secret: Option<String>,
        #[arg(long, default_value_t = 256)]
        prefetch: u16,
    },
    /// RabbitMQ alone: publish at a rate to a fresh queue and consume it here (manual acks),
    /// measuring publish → consume latency and the broker's CPU. The floor under any
    /// gateway's unicast latency on this machine.
    BrokerProbe {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        #[arg(long, default_value_t = 10_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value_t = 256)]
        prefetch: u16,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The broker's cost of the gateway's two legs, without a gateway: a publisher at a rate,
    /// then either one consumer (`direct`, the single hop) or a taker that group-commits
    /// records onto a fan-out carrier (`stream` or per-replica `queues`) read by `replicas`
    /// consumers. Reports broker CPU per notification and notifications per record.
    CarrierProbe {
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp_url: String,
        #[arg(long, value_enum)]
        carrier: loadtest::carrier::Carrier,
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        #[arg(long, default_value_t = 2_000.0)]
        rate: f64,
        #[arg(long, default_value_t = 8.0)]
        secs: f64,
        /// Least time between two records (0: the next leaves as soon as the previous is
        /// confirmed).
        #[arg(long, default_value_t = 0.0)]
        spacing_ms: f64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A client worker process (started by `run` and `compare`).
    #[command(hide = true)]
    Worker {
        #[arg(long)]
        url: String,
        #[arg(long)]
        src: Option<IpAddr>,
        #[arg(long)]
        user_prefix: String,
        #[arg(long)]
        first: usize,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        jwt_secret: Option<String>,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        #[arg(long, default_value_t = 600)]
        deadline_secs: u64,
    },
}

#[derive(Args, Clone)]
struct SuiteOpts {
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Connections to open.
    #[arg(short = 'n', long, default_value_t = 19_000)]
    connections: usize,
    /// Client worker processes (each binds its own source address).
    #[arg(long, default_value_t = 4)]
    procs: usize,
    /// Source address of the first worker; worker i uses this + i.
    #[arg(long, default_value = "127.0.0.2")]
    src_base: Ipv4Addr,
    /// Sign HS256 tokens with this secret (`?token=`) instead of `?user_id=`.
    #[arg(long)]
    jwt_secret: Option<String>,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Comma-separated: idle (always), fanout, sustained, unicast, disconnect, all.
    #[arg(long, default_value = "all")]
    scenarios: String,
    /// Back-to-back broadcasts in the fan-out burst.
    #[arg(long, default_value_t = 100)]
    broadcasts: usize,
    /// Approximate size of each frame's JSON.
    #[arg(long, default_value_t = 200)]
    frame_bytes: usize,
    #[arg(long, default_value_t = 50.0)]
    sustained_rate: f64,
    #[arg(long, default_value_t = 20.0)]
    sustained_secs: f64,
    #[arg(long, default_value_t = 10_000.0)]
    unicast_rate: f64,
    #[arg(long, default_value_t = 10.0)]
    unicast_secs: f64,
    /// Pause before reading RSS after connecting and after the burst.
    #[arg(long, default_value_t = 3.0)]
    settle_secs: f64,
    /// Pause after every client disconnected before reading RSS.
    #[arg(long, default_value_t = 10.0)]
    disconnect_wait_secs: f64,
    /// Publish persistent messages (delivery mode 2).
    #[arg(long)]
    persistent: bool,
    /// Declare the notify queue as a quorum queue, as backends do on a RabbitMQ cluster (give
    /// the gateway the cluster's nodes with `--env AMQP_URL=…,…`).
    #[arg(long)]
    quorum: bool,
    /// RabbitMQ's process id, for its CPU share (default: the `beam.smp` process, if any);
    /// comma-separated for the nodes of a cluster, whose CPU is summed.
    #[arg(long, value_delimiter = ',')]
    broker_pid: Vec<u32>,
    /// Print the results as JSON on stdout (tables go to stderr).
    #[arg(long)]
    json: bool,
    /// No live progress line (there is none when stderr is not a terminal either).
    #[arg(long)]
    quiet: bool,
}

impl SuiteOpts {
    fn auth(&self) -> Auth {
        match &self.jwt_secret {
            Some(secret) => Auth::Jwt {
                secret: secret.clone(),
            },
            None => Auth::Insecure,
        }
    }

    fn config(
        &self,
        urls: Vec<String>,
        queue: String,
        pids: Vec<Vec<u32>>,
        via: Via,
        label: &str,
    ) -> Result<SuiteConfig, String> {
        Ok(SuiteConfig {
            urls,
            amqp_url: self.amqp_url.clone(),
            queue,
            pids,
            via,
            broker_pids: if self.broker_pid.is_empty() {
                loadtest::procstat::find_by_name("beam.smp")
                    .into_iter()
                    .collect()
            } else {
                self.broker_pid.clone()
            },
            connections: self.connections,
            procs: self.procs,
            src_base: self.src_base,
            auth: self.auth(),
            concurrency: self.concurrency,
            phases: Phases::parse(&self.scenarios)?,
            broadcasts: self.broadcasts,
            frame_bytes: self.frame_bytes,
            sustained_rate: self.sustained_rate,
            sustained_secs: self.sustained_secs,
            unicast_rate: self.unicast_rate,
            unicast_secs: self.unicast_secs,
            settle: Duration::from_secs_f64(self.settle_secs),
            disconnect_wait: Duration::from_secs_f64(self.disconnect_wait_secs),
            persistent: self.persistent,
            exe: std::env::current_exe().map_err(|e| format!("own path: {e}"))?,
            label: label.to_owned(),
            progress: !self.quiet,
        })
    }
}

fn runtime_current() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Worker {
            url,
            src,
            user_prefix,
            first,
            count,
            jwt_secret,
            concurrency,
            deadline_secs,
        } => runtime_current().block_on(worker::serve(WorkerArgs {
            url,
            src,
            users: worker::user_ids(&user_prefix, first, count),
            auth: match jwt_secret {
                Some(secret) => Auth::Jwt { secret },
                None => Auth::Insecure,
            },
            concurrency,
            deadline: Duration::from_secs(deadline_secs),
        })),
        Cmd::Baseline {
            addr,
            queue,
            amqp_url,
            jwt_secret,
            prefetch,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
            .block_on(baseline::serve(BaselineArgs {
                addr,
                amqp_url,
                queue,
                auth: match jwt_secret {
                    Some(s) => BaselineAuth::Jwt(s),
                    None => BaselineAuth::Insecure,
                },
                prefetch,
            })),
        Cmd::BrokerProbe {
            amqp_url,
            rate,
            secs,
            prefetch,
            json,
        } => runtime_current().block_on(async move {
            let broker = loadtest::procstat::find_by_name("beam.smp");
            let r = loadtest::probe::run(&amqp_url, rate, secs, prefetch, broker).await?;
            if json {
                print_json(&serde_json::to_value(&r).expect("results serialize"));
            } else {
                let l = &r.latency;
                println!(
                    "broker alone, {} msg/s for {} s: {}/{} consumed; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; broker {} cores, probe {:.2} cores",
                    r.rate,
                    r.secs,
                    r.consumed,
                    r.published,
                    l.p50_us as f64 / 1e3,
                    l.p90_us as f64 / 1e3,
                    l.p99_us as f64 / 1e3,
                    l.max_us as f64 / 1e3,
                    r.broker_cores.map_or("?".into(), |c| format!("{c:.2}")),
                    r.probe_cores
                );
            }
            Ok(())
        }),
        Cmd::CarrierProbe {
            amqp_url,
            carrier,
            replicas,
            rate,
            secs,
            spacing_ms,
            json,
        } => runtime_current().block_on(async move {
            let broker = loadtest::procstat::find_by_name("beam.smp");
            let spacing = Duration::from_secs_f64(spacing_ms / 1e3);
            let r = loadtest::carrier::run(&amqp_url, carrier, replicas, rate, secs, spacing, broker)
                .await?;
            if json {
                print_json(&serde_json::to_value(&r).expect("results serialize"));
            } else {
                println!(
                    "{:?} ×{} at {}/s: {}/{} received, {:.1} per record, p50 {:.2} ms, p99 {:.2} ms, broker {} µs per notification ({} cores)",
                    r.carrier,
                    r.replicas,
                    r.rate,
                    r.received,
                    r.published,
                    r.notifications_per_record,
                    r.latency.p50_us as f64 / 1e3,
                    r.latency.p99_us as f64 / 1e3,
                    r.broker_us_per_notification.map_or("?".into(), |c| format!("{c:.0}")),
                    r.broker_cores.map_or("?".into(), |c| format!("{c:.2}")),
                );
            }
            Ok(())
        }),
        Cmd::Run {
            urls,
            pids,
            queue,
            opts,
        } => runtime_current().block_on(run(urls, pids, queue, opts)),
        Cmd::Compare {
            repeat,
            servers,
            out,
            opts,
        } => runtime_current().block_on(compare(servers, repeat, out, opts)),
        Cmd::Sweep {
            scenario,
            rates,
            counts,
            secs,
            out,
            repeat,
            servers,
            opts,
        } => runtime_current().block_on(sweep(
            servers,
            SweepSpec {
                scenario,
                rates,
                counts,
                secs,
                repeat,
            },
            out,
            opts,
        )),
        Cmd::Plot { json, out } => {
            let out = out.unwrap_or_else(|| {
                json.parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
            });
            loadtest::plot::from_file(&json, &out).map(|files| {
                for f in files {
                    println!("{}", f.display());
                }
            })
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("results serialize")
    );
}

fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

async fn run(
    urls: Vec<String>,
    pids: Vec<u32>,
    queue: String,
    opts: SuiteOpts,
) -> Result<(), String> {
    let label = if urls.len() > 1 {
        format!("server ×{}", urls.len())
    } else {
        "server".to_owned()
    };
    // One process per URL, or every process behind a single URL.
    let pids = if urls.len() == 1 {
        vec![pids]
    } else {
        pids.into_iter().map(|p| vec![p]).collect()
    };
    let cfg = opts.config(urls, queue, pids, Via::Amqp, &label)?;
    let r = Suite::run(cfg).await?;
    let table = report::table(&r);
    if opts.json {
        eprintln!("{table}");
        print_json(&serde_json::json!({ "commit": commit(), "result": r }));
    } else {
        println!("{table}");
    }
    Ok(())
}

fn parse_env(env: &[String]) -> Result<Vec<(String, String)>, String> {
    env.iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| format!("--env {kv}: expected KEY=VALUE"))
        })
        .collect()
}

/// One suite against a fresh server of `kind` (`replicas` processes for wsnotify, always one
/// for the others) on a fresh queue, which is removed afterwards whatever happened.
async fn run_one(
    kind: &Kind,
    replicas: usize,
    env: &[(String, String)],
    opts: &SuiteOpts,
    nchan_publishers: usize,
    label: &str,
) -> Result<SuiteResult, String> {
    let replicas = match kind {
        Kind::Wsnotify(_) => replicas.max(1),
        Kind::Baseline(_) | Kind::Nchan(_) => 1,
    };
    let queue = format!(
        "loadtest_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let admin = Publisher::connect(&opts.amqp_url, &queue, 0).await?;
    admin.declare_as(opts.quorum).await?;
    let result = async {
        let servers =
            Server::start_replicas(kind, replicas, &queue, &opts.amqp_url, &opts.auth(), env)
                .await?;
        let urls = servers
            .iter()
            .map(|s| format!("ws://{}{}", s.addr, kind.ws_path()))
            .collect();
        let pids = servers.iter().map(|s| s.pids.clone()).collect();
        let via = match kind {
            Kind::Nchan(_) => Via::Nchan {
                addr: servers[0].addr,
                conns: nchan_publishers,
            },
            _ => Via::Amqp,
        };
        let r = match opts.config(urls, queue.clone(), pids, via, label) {
            Ok(cfg) => Suite::run(cfg).await,
            Err(e) => Err(e),
        };
        for s in servers {
            s.stop().await;
        }
        r
    }
    .await;
    admin.delete().await;
    admin.close().await;
    result
}

fn label(kind: &Kind, replicas: usize, round: usize) -> String {
    match kind {
        Kind::Wsnotify(_) if replicas > 1 => format!("wsnotify ×{replicas} #{round}"),
        _ => format!("{} #{round}", kind.label()),
    }
}

/// Which servers a `compare` or `sweep` runs, and how.
#[derive(Args)]
struct Servers {
    /// The wsnotify binary.
    #[arg(long, default_value = "target/release/wsnotify")]
    wsnotify: PathBuf,
    /// Only these servers, comma-separated: `wsnotify`, `baseline`, `nchan`.
    #[arg(long)]
    only: Option<String>,
    /// Also run these servers (comma-separated; `nchan`), besides wsnotify and the baseline.
    #[arg(long)]
    with: Option<String>,
    /// wsnotify processes on the same notify queue (replicas of one gateway); the
    /// connections are spread evenly over them. The others always run as one process.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Extra environment for wsnotify, `KEY=VALUE` (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// nginx binary for the nchan baseline (needs libnginx-mod-nchan).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    nginx: PathBuf,
    /// Keep-alive HTTP connections publishing to nchan.
    #[arg(long, default_value_t = 4)]
    nchan_publishers: usize,
}

impl Servers {
    /// The servers to run, in their first-round order.
    fn kinds(&self) -> Result<Vec<Kind>, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
        let all = [
            Kind::Wsnotify(self.wsnotify.clone()),
            Kind::Nchan(self.nginx.clone()),
            Kind::Baseline(exe),
        ];
        let list = |o: &Option<String>| -> Result<Option<Vec<String>>, String> {
            let Some(o) = o else { return Ok(None) };
            let names: Vec<String> = o.split(',').map(|n| n.trim().to_owned()).collect();
            match names
                .iter()
                .find(|n| !all.iter().any(|k| k.label() == n.as_str()))
            {
                Some(n) => Err(format!(
                    "unknown server {n:?}: expected wsnotify, baseline or nchan"
                )),
                None => Ok(Some(names)),
            }
        };
        let only = list(&self.only)?;
        let with = list(&self.with)?.unwrap_or_default();
        let kinds: Vec<Kind> = all
            .into_iter()
            .filter(|k| match &only {
                Some(o) => o.iter().any(|n| n == k.label()),
                None => !matches!(k, Kind::Nchan(_)) || with.iter().any(|n| n == k.label()),
            })
            .collect();
        if kinds.is_empty() {
            return Err("--only: no server left to run".into());
        }
        if self.replicas > 1 && kinds.iter().any(|k| matches!(k, Kind::Baseline(_))) {
            eprintln!(
                "loadtest: wsnotify runs as {} replicas on one queue; the baseline runs as one process (single hop: it consumes the notify queue itself)",
                self.replicas
            );
        }
        Ok(kinds)
    }

    /// Every server once, in alternating order by `round`; results by server label.
    async fn round(
        &self,
        kinds: &[Kind],
        round: usize,
        opts: &SuiteOpts,
        results: &mut BTreeMap<&'static str, Vec<SuiteResult>>,
    ) -> Result<(), String> {
        let env = parse_env(&self.env)?;
        let mut order: Vec<&Kind> = kinds.iter().collect();
        // Alternate the order so no server always runs first.
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            let label = label(kind, self.replicas, round + 1);
            let r = run_one(
                kind,
                self.replicas,
                &env,
                opts,
                self.nchan_publishers,
                &label,
            )
            .await?;
            eprintln!("{}", report::table(&r));
            results.entry(kind.label()).or_default().push(r);
        }
        Ok(())
    }
}

/// The side-by-side table: wsnotify first, then nchan, then the baseline.
fn comparison(results: &BTreeMap<&'static str, Vec<SuiteResult>>) -> String {
    let runs: Vec<(&str, &[SuiteResult])> = ["wsnotify", "nchan", "baseline"]
        .iter()
        .filter_map(|n| results.get(n).map(|r| (*n, r.as_slice())))
        .collect();
    report::comparison(&runs)
}

fn results_json(
    results: &BTreeMap<&'static str, Vec<SuiteResult>>,
    replicas: usize,
) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    m.insert("commit".into(), commit().into());
    m.insert("replicas".into(), replicas.max(1).into());
    for (k, v) in results {
        m.insert(
            (*k).to_owned(),
            serde_json::to_value(v).expect("results serialize"),
        );
    }
    m
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).expect("results serialize");
    std::fs::write(path, text + "\n").map_err(|e| format!("write {}: {e}", path.display()))
}

async fn compare(
    servers: Servers,
    repeat: usize,
    out: Option<PathBuf>,
    opts: SuiteOpts,
) -> Result<(), String> {
    let kinds = servers.kinds()?;
    let mut results = BTreeMap::new();
    for round in 0..repeat.max(1) {
        servers.round(&kinds, round, &opts, &mut results).await?;
    }
    let cmp = comparison(&results);
    let json = serde_json::Value::Object(results_json(&results, servers.replicas));
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        write_json(&dir.join("compare.json"), &json)?;
        for f in loadtest::plot::from_value(&json, dir)? {
            eprintln!("loadtest: wrote {}", f.display());
        }
    }
    if opts.json {
        eprintln!("{cmp}");
        print_json(&json);
    } else {
        println!("{cmp}");
    }
    Ok(())
}

struct SweepSpec {
    scenario: String,
    rates: Vec<f64>,
    counts: Vec<usize>,
    secs: f64,
    repeat: usize,
}

/// `compare` at each point of a sweep; one JSON (`points: [{x, <server>: [results]}]`) and
/// its figure in `out`. The JSON is rewritten after every point, so an interrupted sweep
/// keeps what it measured.
async fn sweep(
    servers: Servers,
    spec: SweepSpec,
    out: PathBuf,
    opts: SuiteOpts,
) -> Result<(), String> {
    let kinds = servers.kinds()?;
    let xs: Vec<f64> = match spec.scenario.as_str() {
        "unicast" | "sustained" => spec.rates.clone(),
        "idle" => spec.counts.iter().map(|&n| n as f64).collect(),
        other => {
            return Err(format!(
                "--scenario {other}: expected unicast, sustained or idle"
            ));
        }
    };
    if xs.is_empty() {
        return Err(match spec.scenario.as_str() {
            "idle" => "--counts: give the connection counts, e.g. 2000,5000,10000".into(),
            _ => "--rates: give the offered rates, e.g. 1000,2000,5000,10000".into(),
        });
    }
    std::fs::create_dir_all(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let file = out.join(format!("{}-sweep.json", spec.scenario));
    let mut points = Vec::new();
    let mut round = 0;
    for (i, &x) in xs.iter().enumerate() {
        let mut o = opts.clone();
        o.scenarios = spec.scenario.clone();
        match spec.scenario.as_str() {
            "unicast" => {
                o.unicast_rate = x;
                o.unicast_secs = spec.secs;
            }
            "sustained" => {
                o.sustained_rate = x;
                o.sustained_secs = spec.secs;
            }
            _ => o.connections = x as usize,
        }
        eprintln!(
            "loadtest sweep: point {} of {}: {} = {x}",
            i + 1,
            xs.len(),
            spec.scenario
        );
        let mut results = BTreeMap::new();
        for _ in 0..spec.repeat.max(1) {
            servers.round(&kinds, round, &o, &mut results).await?;
            round += 1;
        }
        let mut point = results_json(&results, servers.replicas);
        point.remove("commit");
        point.insert("x".into(), x.into());
        points.push(serde_json::Value::Object(point));
        let json = serde_json::json!({
            "commit": commit(),
            "sweep": spec.scenario,
            "secs": spec.secs,
            "connections": opts.connections,
            "points": points,
        });
        write_json(&file, &json)?;
    }
    eprintln!("loadtest: wrote {}", file.display());
    for f in loadtest::plot::from_file(&file, &out)? {
        eprintln!("loadtest: wrote {}", f.display());
    }
    Ok(())
}
