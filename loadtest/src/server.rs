//! Starting and stopping the server under test (for `loadtest compare`): wsnotify from its
//! binary (one process or several replicas on one queue), the [baseline](crate::baseline)
//! from this binary, or nginx with nchan ([`crate::nchan`]). wsnotify and the baseline listen
//! on an OS-chosen port and announce it on stdout with `listening … addr=IP:PORT`; nginx gets
//! a free port picked here and a configuration in a fresh temporary directory.

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
    /// nginx (this binary) with the nchan module.
    Nchan(PathBuf),
}

impl Kind {
    pub fn label(&self) -> &'static str {
        match self {
            Kind::Wsnotify(_) => "wsnotify",
            Kind::Baseline(_) => "baseline",
            Kind::Nchan(_) => "nchan",
        }
    }

    /// The WebSocket path clients open (`{user}` is the user id).
    pub fn ws_path(&self) -> &'static str {
        match self {
            Kind::Nchan(_) => crate::nchan::SUB_PATH,
            _ => "/ws",
        }
    }
}

pub struct Server {
    child: Child,
    pub pid: u32,
    /// Every process that serves (nginx: the master and its worker), for RSS and CPU.
    pub pids: Vec<u32>,
    pub addr: SocketAddr,
    /// nginx's temporary directory, removed on stop.
    dir: Option<PathBuf>,
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
        if let Kind::Nchan(nginx) = kind {
            return Server::start_nginx(nginx).await;
        }
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
            Kind::Nchan(_) => unreachable!("started above"),
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
        let server = Server {
            child,
            pid,
            pids: vec![pid],
            addr,
            dir: None,
        };
        if matches!(kind, Kind::Wsnotify(_))
            && let Err(e) = server.ready(Duration::from_secs(20)).await
        {
            server.stop().await;
            return Err(e);
        }
        Ok(server)
    }

    /// nginx + nchan in the foreground with its own configuration, port and directory; waits
    /// until it answers `/ready` and its worker process is there.
    async fn start_nginx(nginx: &std::path::Path) -> Result<Server, String> {
        let dir = std::env::temp_dir().join(format!("loadtest-nchan-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // Workers run as an unprivileged user when nginx starts as root.
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("pick a port: {e}"))?
            .port();
        let conf = dir.join("nginx.conf");
        let dir_s = dir.to_string_lossy().into_owned();
        std::fs::write(&conf, crate::nchan::render_config(&dir_s, port))
            .map_err(|e| format!("write {}: {e}", conf.display()))?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(|e| {
            format!(
                "start {}: {e} (apt-get install nginx-light libnginx-mod-nchan)",
                nginx.display()
            )
        })?;
        let pid = child.id().ok_or("nginx exited at once")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut server = Server {
            child,
            pid,
            pids: vec![pid],
            addr,
            dir: Some(dir.clone()),
        };
        let ready = async {
            loop {
                if let Some((200, _)) = http_get(addr, "/ready").await
                    && let Some(worker) = children(pid).first()
                {
                    return *worker;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(20), ready).await {
            Ok(worker) => {
                server.pids.push(worker);
                Ok(server)
            }
            Err(_) => {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                server.stop().await;
                Err(format!("nginx never answered on {addr}: {}", log.trim()))
            }
        }
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
        // An nginx worker outlives a killed master: end it too.
        for &p in &self.pids[1..] {
            if crate::procstat::cpu_secs(p).is_some() {
                // SAFETY: kill(2) on a process this server started.
                unsafe {
                    libc::kill(p as i32, libc::SIGKILL);
                }
            }
        }
        if let Some(dir) = self.dir.take() {
            // nginx reports refused connections and exhausted limits only in its log.
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            let bad: Vec<&str> = log
                .lines()
                .filter(|l| {
                    ["[error]", "[crit]", "[alert]", "[emerg]"]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect();
            if let Some(first) = bad.first() {
                eprintln!(
                    "loadtest: nginx logged {} errors; the first: {first}",
                    bad.len()
                );
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Child processes of `pid` (from `/proc`).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                // Field 4 (after the parenthesised name) is the parent's pid.
                st.rfind(')')
                    .and_then(|i| st[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}
