//! `loadtest`: see the crate documentation and BENCHMARKS.md for what each figure means and
//! how to reproduce it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use loadtest::baseline::{self, BaselineArgs, BaselineAuth};
use loadtest::client::Auth;
use loadtest::publish::Publisher;
use loadtest::report;
use loadtest::server::{Kind, Server};
use loadtest::suite::{Phases, Suite, SuiteConfig, SuiteResult};
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
        /// The wsnotify binary.
        #[arg(long, default_value = "target/release/wsnotify")]
        wsnotify: PathBuf,
        /// Runs per server.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Only this server (`wsnotify` or `baseline`).
        #[arg(long)]
        only: Option<String>,
        /// wsnotify processes on the same notify queue (replicas of one gateway); the
        /// connections are spread evenly over them. The baseline always runs as one process.
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// Extra environment for wsnotify, `KEY=VALUE` (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        #[command(flatten)]
        opts: SuiteOpts,
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
    /// RabbitMQ's process id, for its CPU share (default: the `beam.smp` process, if any).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Print the results as JSON on stdout (tables go to stderr).
    #[arg(long)]
    json: bool,
    /// No live progress line.
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
        pids: Vec<u32>,
        label: &str,
    ) -> Result<SuiteConfig, String> {
        Ok(SuiteConfig {
            urls,
            amqp_url: self.amqp_url.clone(),
            queue,
            pids,
            broker_pid: self
                .broker_pid
                .or_else(|| loadtest::procstat::find_by_name("beam.smp")),
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
            wsnotify,
            repeat,
            only,
            replicas,
            env,
            opts,
        } => runtime_current().block_on(compare(wsnotify, repeat, only, replicas, env, opts)),
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
    let cfg = opts.config(urls, queue, pids, &label)?;
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
/// for the baseline) on a fresh queue, which is removed afterwards whatever happened.
async fn run_one(
    kind: &Kind,
    replicas: usize,
    env: &[(String, String)],
    opts: &SuiteOpts,
    label: &str,
) -> Result<SuiteResult, String> {
    let replicas = match kind {
        Kind::Wsnotify(_) => replicas.max(1),
        Kind::Baseline(_) => 1,
    };
    let queue = format!(
        "loadtest_{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    );
    let admin = Publisher::connect(&opts.amqp_url, &queue, 0).await?;
    admin.declare().await?;
    let result = async {
        let servers =
            Server::start_replicas(kind, replicas, &queue, &opts.amqp_url, &opts.auth(), env)
                .await?;
        let urls = servers
            .iter()
            .map(|s| format!("ws://{}/ws", s.addr))
            .collect();
        let pids = servers.iter().map(|s| s.pid).collect();
        let r = match opts.config(urls, queue.clone(), pids, label) {
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

async fn compare(
    wsnotify: PathBuf,
    repeat: usize,
    only: Option<String>,
    replicas: usize,
    env: Vec<String>,
    opts: SuiteOpts,
) -> Result<(), String> {
    let env = parse_env(&env)?;
    let exe = std::env::current_exe().map_err(|e| format!("own path: {e}"))?;
    let kinds = [Kind::Wsnotify(wsnotify), Kind::Baseline(exe)];
    let kinds: Vec<&Kind> = kinds
        .iter()
        .filter(|k| only.as_deref().is_none_or(|o| o == k.label()))
        .collect();
    if kinds.is_empty() {
        return Err(format!(
            "--only {}: expected wsnotify or baseline",
            only.unwrap_or_default()
        ));
    }
    if replicas > 1 && kinds.iter().any(|k| matches!(k, Kind::Baseline(_))) {
        eprintln!(
            "loadtest: wsnotify runs as {replicas} replicas on one queue; the baseline runs as one process (single hop: it consumes the notify queue itself)"
        );
    }
    let mut ours: Vec<SuiteResult> = Vec::new();
    let mut base: Vec<SuiteResult> = Vec::new();
    for round in 0..repeat.max(1) {
        // Alternate the order so neither server always runs first.
        let mut order = kinds.clone();
        if round % 2 == 1 {
            order.reverse();
        }
        for kind in order {
            let r = run_one(
                kind,
                replicas,
                &env,
                &opts,
                &label(kind, replicas, round + 1),
            )
            .await?;
            eprintln!("{}", report::table(&r));
            match kind {
                Kind::Wsnotify(_) => ours.push(r),
                Kind::Baseline(_) => base.push(r),
            }
        }
    }
    let cmp = report::comparison(&ours, &base);
    if opts.json {
        eprintln!("{cmp}");
        print_json(&serde_json::json!({
            "commit": commit(),
            "replicas": replicas.max(1),
            "wsnotify": ours,
            "baseline": base,
        }));
    } else {
        println!("{cmp}");
    }
    Ok(())
}
