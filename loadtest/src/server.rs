//! Starting and stopping the server under test (for `loadtest compare`): wsnotify from its
//! binary (one process or several replicas on one queue), or the [baseline](crate::baseline)
//! from this binary. Both listen on an OS-chosen
//! port and announce it on stdout with `listening … addr=IP:PORT`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::client::Auth;
use crate::prom::http_get;

#[derive(Debug, Clone)]
pub enum Kind {
    /// The wsnotify binary at this path.
    Wsnotify(PathBuf),
    /// `loadtest baseline`, run from this executable.
    Baseline(PathBuf),
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Wsnotify(_) => "wsnotify",
            Kind::Baseline(_) => "baseline",
        }
    }
}

pub struct Server {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts the server on `queue` and waits until it serves (wsnotify: `/readyz` is 200).
    /// `env` is passed to wsnotify on top of this process's environment.
    pub async fn start(
        kind: &Kind,
        queue: &str,
        amqp_url: &str,
        auth: &Auth,
        env: &[(String, String)],
    ) -> Result<Server, String> {
        let mut cmd = match kind {
            Kind::Wsnotify(bin) => {
                let mut c = Command::new(bin);
                c.env("SERVER_HOST", "127.0.0.1")
                    .env("SERVER_PORT", "0")
                    .env("AMQP_URL", amqp_url)
                    .env("NOTIFY_QUEUE", queue)
                    .env("RUST_LOG", "info");
                match auth {
                    Auth::Insecure => {
                        c.env("AUTH_MODE", "insecure");
                    }
                    Auth::Jwt { secret } => {
                        c.env("AUTH_MODE", "jwt").env("JWT_SECRET", secret);
                    }
                }
                for (k, v) in env {
                    c.env(k, v);
                }
                c
            }
            Kind::Baseline(exe) => {
                let mut c = Command::new(exe);
                c.args(["baseline", "--addr", "127.0.0.1:0", "--queue", queue])
                    .args(["--amqp-url", amqp_url]);
                if let Auth::Jwt { secret } = auth {
                    c.args(["--jwt-secret", secret]);
                }
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", kind.label()))?;
        let pid = child.id().ok_or("server exited at once")?;
        let stdout = child.stdout.take().ok_or("server stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            // Keep draining so the server never blocks on a full pipe.
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("listening")
                    && let Some(addr) = line
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("addr="))
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = tokio::time::timeout(Duration::from_secs(20), rx)
            .await
            .map_err(|_| format!("{} did not print its listening address", kind.label()))?
            .map_err(|_| format!("{} exited before listening", kind.label()))?;
        let server = Server { child, pid, addr };
        if matches!(kind, Kind::Wsnotify(_))
            && let Err(e) = server.ready(Duration::from_secs(20)).await
        {
            server.stop().await;
            return Err(e);
        }
        Ok(server)
    }

    /// Starts `n` processes of `kind` on the same queue (replicas of one gateway), one after
    /// the other, and returns once every one of them answers `/readyz` with 200 (the baseline:
    /// serves). If one fails to start, the others are stopped.
    pub async fn start_replicas(
        kind: &Kind,
        n: usize,
        queue: &str,
        amqp_url: &str,
        auth: &Auth,
        env: &[(String, String)],
    ) -> Result<Vec<Server>, String> {
        let mut servers = Vec::with_capacity(n);
        let mut res = Ok(());
        for _ in 0..n.max(1) {
            match Server::start(kind, queue, amqp_url, auth, env).await {
                Ok(s) => servers.push(s),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        // A replica started early could have lost its broker link while the others came up.
        if res.is_ok() && matches!(kind, Kind::Wsnotify(_)) {
            for s in &servers {
                if let Err(e) = s.ready(Duration::from_secs(20)).await {
                    res = Err(e);
                    break;
                }
            }
        }
        match res {
            Ok(()) => Ok(servers),
            Err(e) => {
                for s in servers {
                    s.stop().await;
                }
                Err(e)
            }
        }
    }

    /// Waits (bounded) until `/readyz` answers 200.
    async fn ready(&self, limit: Duration) -> Result<(), String> {
        let addr = self.addr;
        let ready = async {
            loop {
                if let Some((200, _)) = http_get(addr, "/readyz").await {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(limit, ready)
            .await
            .map_err(|_| format!("wsnotify at {addr} never became ready"))
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    pub async fn stop(mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
