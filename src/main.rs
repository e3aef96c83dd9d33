//! `wsnotify`: parse the configuration, build the gateway, run it until SIGTERM or Ctrl-C.

use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use wsnotify::config::Config;
use wsnotify::gateway::Gateway;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "wsnotify",
    version,
    about = "RabbitMQ → WebSocket notification gateway"
)]
struct Cli {
    #[command(flatten)]
    config: Config,
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
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wsnotify: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let gateway = match Gateway::bind(cli.config).await {
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
