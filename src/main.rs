//! `wsnotify`: parse the command line, then serve (the default), publish, or check health.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wsnotify::cli::{self, HealthcheckArgs, PublishArgs};
use wsnotify::config::Config;
use wsnotify::gateway::Gateway;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wsnotify",
    version,
    about = "RabbitMQ → WebSocket notification gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// With no subcommand, `wsnotify` serves (existing deployments keep working).
    #[command(flatten)]
    serve: Config,
}

// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(Config),
    /// Publish notifications through RabbitMQ, waiting for the broker's confirms.
    Publish(PublishArgs),
    /// Exit 0 if the local gateway answers its health endpoint (for container health checks).
    Healthcheck(HealthcheckArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help / --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the variable (clap prints the flag with its variable name).
            let text = e.render().to_string();
            let line = text
                .lines()
                .next()
                .unwrap_or("invalid configuration")
                .trim_start_matches("error: ");
            eprintln!("wsnotify: invalid configuration: {line}");
            return ExitCode::from(2);
        }
    };
    let config = match cli.command {
        None => cli.serve,
        Some(Command::Serve(config)) => config,
        Some(Command::Healthcheck(args)) => return cli::healthcheck(args),
        Some(Command::Publish(args)) => {
            return runtime().map_or(ExitCode::FAILURE, |rt| rt.block_on(cli::publish(args)));
        }
    };
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let gateway = match Gateway::bind(config).await {
            Ok(g) => g,
            Err(e) => {
                eprintln!("wsnotify: {e}");
                return ExitCode::from(2);
            }
        };
        gateway.run(shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(give_back_memory)
        .build()
        .inspect_err(|e| eprintln!("wsnotify: cannot start the runtime: {e}"))
        .ok()
}

/// Lets mimalloc return freed pages to the OS when a worker goes idle, at most once a second
/// per thread. mimalloc v3 otherwise keeps freed memory until that thread allocates again,
/// so RSS would stay at its peak after a burst or after clients leave (see BENCHMARKS.md).
fn give_back_memory() {
    use std::cell::Cell;
    use std::time::{Duration, Instant};
    thread_local!(static LAST: Cell<Option<Instant>> = const { Cell::new(None) });
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            last.set(Some(now));
            // SAFETY: mi_collect only walks this thread's heap; it has no preconditions.
            unsafe { libmimalloc_sys::mi_collect(false) };
        }
    });
}

/// SIGTERM (orchestrators) or SIGINT (a terminal).
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = ctrl_c => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
