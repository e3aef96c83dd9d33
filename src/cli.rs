//! The `publish` and `healthcheck` subcommands (the gateway itself is `serve`).
//!
//! It must not know the gateway's internals: `publish` goes through the same
//! [`Publisher`] a Rust backend would use, and `healthcheck` asks
//! `/readyz` over HTTP like any probe.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use crate::amqp::confirm::Confirm;
use crate::envelope::ENVELOPE_TYPE;
use crate::publisher::{Publisher, Recipients, envelope};

/// `wsnotify publish`: send notifications through RabbitMQ and wait for the broker's confirms.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// RabbitMQ URL.
    #[arg(
        long,
        env = "AMQP_URL",
        value_name = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub amqp_url: String,

    /// The notify queue.
    #[arg(
        long,
        env = "NOTIFY_QUEUE",
        value_name = "NOTIFY_QUEUE",
        default_value = "websocket_notifications"
    )]
    pub queue: String,

    /// One target user.
    #[arg(long, conflicts_with_all = ["users", "broadcast", "stdin"])]
    pub user: Option<String>,

    /// Several target users, comma-separated.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["broadcast", "stdin"])]
    pub users: Option<Vec<String>>,

    /// Every connected user.
    #[arg(long, conflicts_with = "stdin")]
    pub broadcast: bool,

    /// The frame's `type` (the payload's `message_type`).
    #[arg(long = "type", value_name = "TYPE", required_unless_present = "stdin")]
    pub message_type: Option<String>,

    /// The frame's `data`, as JSON (default `null`).
    #[arg(long, value_name = "JSON")]
    pub data: Option<String>,

    /// A message id of your own (default: the gateway assigns a UUID v7).
    #[arg(long)]
    pub id: Option<String>,

    /// Read one message per line from standard input: a whole envelope, or just its payload.
    #[arg(long)]
    pub stdin: bool,

    /// Do not wait for the broker's confirms (faster, but a refusal goes unnoticed).
    #[arg(long)]
    pub no_wait: bool,
}

/// Confirms awaited at most at once in `--stdin` mode (bounds memory, keeps the pipe full);
/// also how many lines are read ahead of the publisher.
const WINDOW: usize = 1024;

/// Where the messages to publish come from.
enum Source {
    One(Option<Vec<u8>>),
    /// Read and parsed on their own thread, at most [`WINDOW`] ahead of the publisher.
    Lines(tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>>),
}

impl Source {
    async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        match self {
            Source::One(m) => m.take().map(Ok),
            Source::Lines(rx) => rx.recv().await,
        }
    }
}

pub async fn publish(args: PublishArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("wsnotify publish: {msg}");
        ExitCode::FAILURE
    };
    let mut source = if args.stdin {
        Source::Lines(stdin_lines())
    } else {
        let to = match (&args.user, &args.users, args.broadcast) {
            (Some(u), None, false) => Recipients::User(u),
            (None, Some(_), false) => Recipients::Broadcast, // replaced below
            (None, None, true) => Recipients::Broadcast,
            _ => return fail("give exactly one of --user, --users, --broadcast or --stdin".into()),
        };
        let users: Vec<&str> = args.users.iter().flatten().map(String::as_str).collect();
        let to = if args.users.is_some() {
            Recipients::Users(&users)
        } else {
            to
        };
        let data: serde_json::Value =
            match args.data.as_deref().map(serde_json::from_str).transpose() {
                Ok(d) => d.unwrap_or(serde_json::Value::Null),
                Err(e) => return fail(format!("--data is not JSON: {e}")),
            };
        let message_type = args.message_type.as_deref().unwrap_or_default();
        match envelope(to, message_type, &data, args.id.as_deref()) {
            Ok(m) => Source::One(Some(m)),
            Err(e) => return fail(e.to_string()),
        }
    };

    let started = Instant::now();
    let publisher = match Publisher::connect(&args.amqp_url, &args.queue).await {
        Ok(p) => p,
        Err(e) => return fail(e.to_string()),
    };
    let mut confirmed = 0usize;
    let mut sent = 0usize;
    let mut window: std::collections::VecDeque<Confirm> = std::collections::VecDeque::new();
    // A bad line or a refused message stops the stream; what was sent before it is still
    // confirmed, so the error can say how far it got.
    let mut stopped = None;
    while let Some(m) = source.next().await {
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                stopped = Some(e);
                break;
            }
        };
        match publisher.send(m).await {
            Ok(c) if args.no_wait => drop(c),
            Ok(c) => window.push_back(c),
            Err(e) => {
                stopped = Some(format!("message {}: {e}", sent + 1));
                break;
            }
        }
        sent += 1;
        if window.len() >= WINDOW
            && let Some(c) = window.pop_front()
        {
            if let Err(e) = c.wait().await {
                return fail(format!("after {confirmed} confirmed: {e}"));
            }
            confirmed += 1;
        }
    }
    for c in window {
        if let Err(e) = c.wait().await {
            return fail(format!("after {confirmed} confirmed: {e}"));
        }
        confirmed += 1;
    }
    publisher.close().await;
    if let Some(e) = stopped {
        return fail(format!(
            "{e} (stopped there: {sent} published before it, {confirmed} confirmed)"
        ));
    }
    let secs = started.elapsed().as_secs_f64();
    if args.no_wait {
        println!("published {sent} (not waiting for confirms) in {secs:.3} s");
    } else {
        println!("published {sent}, confirmed {confirmed} in {secs:.3} s");
    }
    ExitCode::SUCCESS
}

/// Standard input as a stream of messages, one per non-empty line (a full envelope, or a
/// payload to wrap in one), ending at the first error. Read on a thread of its own, so
/// publishing starts with the first line and memory stays flat however long the input is.
/// (A plain thread, not the runtime's blocking pool: a read that never returns, e.g. on a
/// terminal, must not hold up the exit after an error.)
fn stdin_lines() -> tokio::sync::mpsc::Receiver<Result<Vec<u8>, String>> {
    let (tx, rx) = tokio::sync::mpsc::channel(WINDOW);
    std::thread::spawn(move || {
        for (i, line) in std::io::stdin().lock().lines().enumerate() {
            let msg = match line {
                Err(e) => Err(format!("reading stdin: {e}")),
                Ok(l) if l.trim().is_empty() => continue,
                Ok(l) => line_envelope(&l).map_err(|e| format!("line {}: {e}", i + 1)),
            };
            let stop = msg.is_err();
            if tx.blocking_send(msg).is_err() || stop {
                return;
            }
        }
    });
    rx
}

/// A line of `--stdin` input as an envelope.
fn line_envelope(line: &str) -> Result<Vec<u8>, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let env = if v.get("type").is_some() && v.get("payload").is_some() {
        v
    } else {
        serde_json::json!({ "type": ENVELOPE_TYPE, "payload": v })
    };
    serde_json::to_vec(&env).map_err(|e| e.to_string())
}

/// `wsnotify healthcheck`: for container health checks in an image without shell tools.
#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The gateway's port.
    #[arg(
        long,
        env = "SERVER_PORT",
        value_name = "SERVER_PORT",
        default_value_t = 8081
    )]
    pub server_port: u16,

    /// Path to check: `/healthz` (alive; the default: a broker outage must not get every replica
    /// restarted) or `/readyz` (alive and linked to the broker).
    #[arg(long, default_value = "/healthz")]
    pub path: String,
}

/// Exits 0 if `GET <path>` on 127.0.0.1 answers 200 within 3 s, 1 otherwise.
pub fn healthcheck(args: HealthcheckArgs) -> ExitCode {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, args.server_port));
    let check = || -> std::io::Result<bool> {
        let timeout = Duration::from_secs(3);
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET {} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            args.path
        )?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    match check() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("wsnotify healthcheck: {} did not answer 200", args.path);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("wsnotify healthcheck: {addr}{}: {e}", args.path);
            ExitCode::FAILURE
        }
    }
}
