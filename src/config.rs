//! Configuration: every setting is an environment variable and a command-line flag of the same
//! meaning (`SERVER_PORT` / `--server-port`). `wsnotify --help` lists them all.
//!
//! Bad configuration must stop start-up with **one** line that names the variable, so an
//! operator reading a crash-looping container's log sees the cause at once. [`Config::prepare`]
//! turns both clap's parse errors and our own cross-field checks into a [`ConfigError`] whose
//! `Display` is that line.
//!
//! This module must not know what the settings drive: it parses, validates (one line naming the
//! variable on error), and hands typed values to [`gateway`](crate::gateway).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// How browsers prove who they are (contract §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AuthMode {
    /// Signed JWT in `?token=` or `Authorization: Bearer`; `sub` is the user id.
    Jwt,
    /// `?user_id=` is trusted as is. Development only.
    Insecure,
}

/// The gateway's settings (`wsnotify serve`).
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// Address to listen on.
    #[arg(
        long,
        env = "SERVER_HOST",
        value_name = "SERVER_HOST",
        default_value = "0.0.0.0"
    )]
    pub server_host: IpAddr,

    /// Port for WebSocket, health and metrics endpoints.
    #[arg(
        long,
        env = "SERVER_PORT",
        value_name = "SERVER_PORT",
        default_value_t = 8081
    )]
    pub server_port: u16,

    /// RabbitMQ URL (`amqp://user:pass@host:port/vhost`, vhost percent-encoded: `%2f` is `/`),
    /// or the nodes of one cluster, comma-separated: the gateway fails over between them.
    /// Unset: standalone mode — no broker; notifications come in through `POST /api/publish`.
    #[arg(
        long,
        env = "AMQP_URL",
        value_name = "AMQP_URL",
        hide_env_values = true
    )]
    pub amqp_url: Option<String>,

    /// File holding AMQP_URL (e.g. a Docker/Swarm secret), instead of the variable itself.
    #[arg(long, env = "AMQP_URL_FILE", value_name = "AMQP_URL_FILE")]
    pub amqp_url_file: Option<PathBuf>,

    /// Queue the backends publish to; invalid messages go to `<NOTIFY_QUEUE>.dead`.
    #[arg(
        long,
        env = "NOTIFY_QUEUE",
        value_name = "NOTIFY_QUEUE",
        default_value = "websocket_notifications"
    )]
    pub notify_queue: String,

    /// How far back the recovery history reaches (`?since=`, contract §5): every replica keeps
    /// the notifications of this window, and a starting replica reads them from the fan-out
    /// log before it reports ready. 0 turns recovery off (`recovered: false` for every `since`).
    #[arg(
        long,
        env = "HISTORY_WINDOW_MS",
        value_name = "HISTORY_WINDOW_MS",
        default_value_t = 300_000
    )]
    pub history_window_ms: u64,

    /// Memory the recovery history may take; the oldest notifications go first when it is
    /// full. The default holds 5 minutes at 1,000 notifications/s of ~300-byte notifications.
    #[arg(
        long,
        env = "HISTORY_MAX_BYTES",
        value_name = "HISTORY_MAX_BYTES",
        default_value_t = 268_435_456
    )]
    pub history_max_bytes: usize,

    /// Message ids remembered to drop duplicate fan-out copies.
    #[arg(
        long,
        env = "DEDUPE_WINDOW",
        value_name = "DEDUPE_WINDOW",
        default_value_t = 65_536
    )]
    pub dedupe_window: usize,

    /// Least time between two records the ingest taker appends to the fan-out log. Under
    /// load, notifications arriving sooner wait (at most this long) and leave together in one
    /// record, which costs the broker far less than one each; after a quiet moment, or once a
    /// record is full, they leave at once. The taker's own replica is served without waiting
    /// either way; other replicas' users wait at most this long. 0: the next record leaves as
    /// soon as the previous one is confirmed.
    #[arg(
        long,
        env = "RECORD_SPACING_MS",
        value_name = "RECORD_SPACING_MS",
        default_value_t = 10
    )]
    pub record_spacing_ms: u64,

    /// Unacknowledged broker messages in flight (basic.qos prefetch count).
    #[arg(
        long,
        env = "AMQP_PREFETCH",
        value_name = "AMQP_PREFETCH",
        default_value_t = 256
    )]
    pub amqp_prefetch: u16,

    /// `jwt` (production) or `insecure` (trusts `?user_id=`, development only).
    #[arg(
        long,
        env = "AUTH_MODE",
        value_name = "AUTH_MODE",
        value_enum,
        default_value = "jwt"
    )]
    pub auth_mode: AuthMode,

    /// HS256 shared secret (JWT mode; exclusive with JWT_PUBLIC_KEY_FILE).
    #[arg(
        long,
        env = "JWT_SECRET",
        value_name = "JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// File holding JWT_SECRET (e.g. a Docker/Swarm secret), instead of the variable itself.
    #[arg(long, env = "JWT_SECRET_FILE", value_name = "JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// PEM public key file for RS256 (RSA key) or ES256 (P-256 key) tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE", value_name = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// Required `iss` claim, when set.
    #[arg(long, env = "JWT_ISSUER", value_name = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim, when set.
    #[arg(long, env = "JWT_AUDIENCE", value_name = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Enables `POST /api/publish` for callers presenting `Authorization: Bearer <key>`.
    /// Unset: the endpoint does not exist (404).
    #[arg(
        long,
        env = "PUBLISH_API_KEY",
        value_name = "PUBLISH_API_KEY",
        hide_env_values = true
    )]
    pub publish_api_key: Option<String>,

    /// File holding PUBLISH_API_KEY, instead of the variable itself.
    #[arg(
        long,
        env = "PUBLISH_API_KEY_FILE",
        value_name = "PUBLISH_API_KEY_FILE"
    )]
    pub publish_api_key_file: Option<PathBuf>,

    /// Longest `POST /api/publish` waits for the broker to take and confirm a batch; past it
    /// the answer is 503 (a broker under a resource alarm blocks publishers indefinitely).
    #[arg(
        long,
        env = "PUBLISH_TIMEOUT_MS",
        value_name = "PUBLISH_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub publish_timeout_ms: u64,

    /// Largest `POST /api/publish` body (one envelope or an array of them); larger gets 413.
    #[arg(
        long,
        env = "MAX_PUBLISH_BYTES",
        value_name = "MAX_PUBLISH_BYTES",
        default_value_t = 1_048_576
    )]
    pub max_publish_bytes: usize,

    /// Most WebSocket connections held at once; an upgrade beyond it gets 503. Plain HTTP
    /// requests (health checks, scrapes) have a little headroom above it, so a full gateway
    /// still answers its probes. Default: the open-file limit minus 128.
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Most connections one user may hold at once; the next upgrade gets 429. 0: no limit.
    #[arg(
        long,
        env = "MAX_CONNECTIONS_PER_USER",
        value_name = "MAX_CONNECTIONS_PER_USER",
        default_value_t = 64
    )]
    pub max_connections_per_user: usize,

    /// Largest broker message body accepted; larger ones are dead-lettered.
    #[arg(
        long,
        env = "MAX_MESSAGE_BYTES",
        value_name = "MAX_MESSAGE_BYTES",
        default_value_t = 65_536
    )]
    pub max_message_bytes: usize,

    /// Bytes queued for one client before it is closed with 1013 (slow consumer).
    #[arg(
        long,
        env = "CLIENT_QUEUE_BYTES",
        value_name = "CLIENT_QUEUE_BYTES",
        default_value_t = 1_048_576
    )]
    pub client_queue_bytes: usize,

    /// Memory all client queues may hold together; beyond it, the clients with the most
    /// bytes queued are closed with 1013 first. Broadcast frames are shared: each queued copy
    /// counts 32 bytes; a frame for one user counts its length.
    #[arg(
        long,
        env = "CLIENT_QUEUE_BUDGET_BYTES",
        value_name = "CLIENT_QUEUE_BUDGET_BYTES",
        default_value_t = 134_217_728
    )]
    pub client_queue_budget_bytes: usize,

    /// Largest message a client may send; larger ones close the socket with 1009.
    #[arg(
        long,
        env = "MAX_CLIENT_FRAME_BYTES",
        value_name = "MAX_CLIENT_FRAME_BYTES",
        default_value_t = 4_096
    )]
    pub max_client_frame_bytes: usize,

    /// Read buffer of a connection's WebSocket codec. The codec exists only while a client is
    /// in the middle of sending something other than a pong; idle sockets hold none.
    #[arg(
        long,
        env = "READ_BUFFER_BYTES",
        value_name = "READ_BUFFER_BYTES",
        default_value_t = 512
    )]
    pub read_buffer_bytes: usize,

    /// Largest HTTP request head; larger ones get 431.
    #[arg(
        long,
        env = "MAX_HEADER_BYTES",
        value_name = "MAX_HEADER_BYTES",
        default_value_t = 8_192
    )]
    pub max_header_bytes: usize,

    /// Time a new socket has to send its complete request head (slowloris guard).
    #[arg(
        long,
        env = "HANDSHAKE_TIMEOUT_MS",
        value_name = "HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,

    /// Server ping interval. A peer silent for two intervals is closed.
    #[arg(
        long,
        env = "PING_INTERVAL_MS",
        value_name = "PING_INTERVAL_MS",
        default_value_t = 30_000
    )]
    pub ping_interval_ms: u64,

    /// Time a client has to answer the gateway's close frame (1013, 1008, 1001, protocol
    /// errors) before its TCP connection is reset and its memory freed.
    #[arg(
        long,
        env = "CLOSE_TIMEOUT_MS",
        value_name = "CLOSE_TIMEOUT_MS",
        default_value_t = 5_000
    )]
    pub close_timeout_ms: u64,

    /// Longest a graceful shutdown (SIGTERM) waits for sockets to close before exiting.
    #[arg(
        long,
        env = "SHUTDOWN_TIMEOUT_MS",
        value_name = "SHUTDOWN_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub shutdown_timeout_ms: u64,
}

/// One line naming the variable at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl ConfigError {
    pub fn new(variable: &'static str, problem: impl Into<String>) -> Self {
        Self {
            variable,
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}",
            self.variable, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

/// Open-file budget kept back from the default `MAX_CONNECTIONS`: [`HTTP_HEADROOM`] sockets
/// for probes and scrapes, plus the listener, the broker link, stdio and the odd file.
const FD_RESERVE: usize = 128;

/// Sockets allowed above `MAX_CONNECTIONS` for plain HTTP requests and handshakes in flight.
pub const HTTP_HEADROOM: usize = 64;

/// Reads a secret from `path` (trailing newline dropped); `var` names the variable at fault.
fn read_secret(var: &'static str, path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(var, format!("cannot read {}: {e}", path.display())))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Fills `value` from `file` when only the file is given.
fn from_file(
    value: &mut Option<String>,
    file: &Option<PathBuf>,
    var: &'static str,
    file_var: &'static str,
) -> Result<(), ConfigError> {
    match (value.is_some(), file) {
        (true, Some(_)) => Err(ConfigError::new(
            file_var,
            format!("set either {var} or {file_var}, not both"),
        )),
        (false, Some(path)) => {
            *value = Some(read_secret(file_var, path)?);
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Config {
    /// Resolves the `*_FILE` variables and checks the whole configuration. Called once at
    /// start-up, before anything is bound or connected.
    pub fn prepare(mut self) -> Result<Config, ConfigError> {
        from_file(
            &mut self.amqp_url,
            &self.amqp_url_file,
            "AMQP_URL",
            "AMQP_URL_FILE",
        )?;
        from_file(
            &mut self.jwt_secret,
            &self.jwt_secret_file,
            "JWT_SECRET",
            "JWT_SECRET_FILE",
        )?;
        from_file(
            &mut self.publish_api_key,
            &self.publish_api_key_file,
            "PUBLISH_API_KEY",
            "PUBLISH_API_KEY_FILE",
        )?;
        self.validate()?;
        Ok(self)
    }

    /// Cross-field checks clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Derived names (`<queue>.replica.<32 hex>`) must fit AMQP's 255-byte short strings.
        if self.notify_queue.is_empty() || self.notify_queue.len() > 200 {
            return Err(ConfigError::new("NOTIFY_QUEUE", "must be 1 to 200 bytes"));
        }
        if self.history_window_ms > 24 * 3600 * 1000 {
            return Err(ConfigError::new(
                "HISTORY_WINDOW_MS",
                "must be at most 86400000 (24 hours)",
            ));
        }
        if self.record_spacing_ms > 1000 {
            return Err(ConfigError::new(
                "RECORD_SPACING_MS",
                "must be at most 1000",
            ));
        }
        if self.publish_timeout_ms == 0 {
            return Err(ConfigError::new("PUBLISH_TIMEOUT_MS", "must be above 0"));
        }
        if self.dedupe_window == 0 {
            return Err(ConfigError::new("DEDUPE_WINDOW", "must be at least 1"));
        }
        if self.auth_mode == AuthMode::Jwt {
            match (&self.jwt_secret, &self.jwt_public_key_file) {
                (None, None) => {
                    return Err(ConfigError::new(
                        "JWT_SECRET",
                        "AUTH_MODE=jwt needs JWT_SECRET or JWT_PUBLIC_KEY_FILE (or set AUTH_MODE=insecure for development)",
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(ConfigError::new(
                        "JWT_PUBLIC_KEY_FILE",
                        "set either JWT_SECRET or JWT_PUBLIC_KEY_FILE, not both",
                    ));
                }
                (Some(s), None) if s.len() < 16 => {
                    return Err(ConfigError::new("JWT_SECRET", "must be at least 16 bytes"));
                }
                _ => {}
            }
        }
        if self.amqp_prefetch == 0 {
            return Err(ConfigError::new("AMQP_PREFETCH", "must be at least 1"));
        }
        if self.max_message_bytes < 64 {
            return Err(ConfigError::new("MAX_MESSAGE_BYTES", "must be at least 64"));
        }
        // A frame is the message's `data` plus ~250 bytes of fields: the queue must hold one.
        if self.client_queue_bytes < self.max_message_bytes + 1024 {
            return Err(ConfigError::new(
                "CLIENT_QUEUE_BYTES",
                "must be at least MAX_MESSAGE_BYTES + 1024, or the largest message could never be sent",
            ));
        }
        // A connection's charge is kept in 32 bits (registry::Mailbox).
        if self.client_queue_bytes > 1 << 30 {
            return Err(ConfigError::new(
                "CLIENT_QUEUE_BYTES",
                "must be at most 1073741824",
            ));
        }
        if self.client_queue_budget_bytes < self.client_queue_bytes {
            return Err(ConfigError::new(
                "CLIENT_QUEUE_BUDGET_BYTES",
                "must be at least CLIENT_QUEUE_BYTES",
            ));
        }
        if !(128..=1 << 20).contains(&self.read_buffer_bytes) {
            return Err(ConfigError::new(
                "READ_BUFFER_BYTES",
                "must be 128 to 1048576",
            ));
        }
        if !(125..=1 << 24).contains(&self.max_client_frame_bytes) {
            return Err(ConfigError::new(
                "MAX_CLIENT_FRAME_BYTES",
                "must be 125 to 16777216",
            ));
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            return Err(ConfigError::new(
                "MAX_HEADER_BYTES",
                "must be 1024 to 1048576",
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err(ConfigError::new("HANDSHAKE_TIMEOUT_MS", "must be above 0"));
        }
        if self.ping_interval_ms < 100 {
            return Err(ConfigError::new("PING_INTERVAL_MS", "must be at least 100"));
        }
        if self.close_timeout_ms < 100 {
            return Err(ConfigError::new("CLOSE_TIMEOUT_MS", "must be at least 100"));
        }
        if self.max_connections == Some(0) {
            return Err(ConfigError::new("MAX_CONNECTIONS", "must be at least 1"));
        }
        if let Some(url) = &self.amqp_url {
            crate::amqp::url::AmqpUrl::parse(url)
                .map_err(|e| ConfigError::new("AMQP_URL", e.to_string()))?;
        }
        if self.publish_api_key.as_ref().is_some_and(|k| k.len() < 16) {
            return Err(ConfigError::new(
                "PUBLISH_API_KEY",
                "must be at least 16 bytes",
            ));
        }
        if self.max_publish_bytes < self.max_message_bytes {
            return Err(ConfigError::new(
                "MAX_PUBLISH_BYTES",
                "must be at least MAX_MESSAGE_BYTES",
            ));
        }
        Ok(())
    }

    /// `MAX_CONNECTIONS`, or what the open-file limit allows. Raises the soft open-file limit
    /// to the hard one either way (every connection is a descriptor), and warns when
    /// `MAX_CONNECTIONS` is more than the limit can hold.
    pub fn effective_max_connections(&self) -> usize {
        let fit = raise_open_file_limit().saturating_sub(FD_RESERVE).max(1);
        match self.max_connections {
            None => fit,
            Some(n) => {
                if n > fit {
                    tracing::warn!(
                        max_connections = n,
                        open_file_limit = fit + FD_RESERVE,
                        "MAX_CONNECTIONS is above what the open-file limit allows: past about {fit} connections, new ones will be refused with 503 (raise the hard nofile limit)"
                    );
                }
                n
            }
        }
    }

    pub fn close_timeout(&self) -> Duration {
        Duration::from_millis(self.close_timeout_ms)
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_millis(self.ping_interval_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn history_window(&self) -> Duration {
        Duration::from_millis(self.history_window_ms)
    }

    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
}

/// Raises the soft open-file limit to the hard one (density needs every descriptor) and
/// returns it.
pub fn raise_open_file_limit() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
}
