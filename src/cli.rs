//! The `publish` and `healthcheck` subcommands (the gateway itself is `serve`).

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

/// Confirms awaited at most at once in `--stdin` mode (bounds memory, keeps the pipe full).
const WINDOW: usize = 1024;

pub async fn publish(args: PublishArgs) -> ExitCode {
    let fail = |msg: String| {
        eprintln!("wsnotify publish: {msg}");
        ExitCode::FAILURE
    };
    let messages: Vec<Vec<u8>> = if args.stdin {
        match read_stdin() {
            Ok(m) => m,
            Err(e) => return fail(e),
        }
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
            Ok(m) => vec![m],
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
    for (line, m) in messages.into_iter().enumerate() {
        sent += 1;
        match publisher.send(m).await {
            Ok(c) if args.no_wait => drop(c),
            Ok(c) => window.push_back(c),
            Err(e) => return fail(format!("message {}: {e}", line + 1)),
        }
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
    let secs = started.elapsed().as_secs_f64();
    if args.no_wait {
        println!("published {sent} (not waiting for confirms) in {secs:.3} s");
    } else {
        println!("published {sent}, confirmed {confirmed} in {secs:.3} s");
    }
    ExitCode::SUCCESS
}

/// One message per non-empty line: a full envelope, or a payload to wrap in one.
fn read_stdin() -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for (i, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line.map_err(|e| format!("reading stdin: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| format!("line {}: not JSON: {e}", i + 1))?;
        let env = if v.get("type").is_some() && v.get("payload").is_some() {
            v
        } else {
            serde_json::json!({ "type": ENVELOPE_TYPE, "payload": v })
        };
        out.push(serde_json::to_vec(&env).map_err(|e| e.to_string())?);
    }
    Ok(out)
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
