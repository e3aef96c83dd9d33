//! Builds the gateway from its configuration and runs it until a shutdown signal, then shuts
//! it down in the order that loses nothing:
//!
//! 1. stop accepting (`/readyz` turns 503 at once);
//! 2. stop consuming — the message in hand is finished and acked, the rest stay unacked and
//!    the broker requeues them when the channel closes;
//! 3. wait until every acked frame sits in a connection's mailbox;
//! 4. tell every connection to flush and close with 1001;
//! 5. wait for the last socket, at most `SHUTDOWN_TIMEOUT_MS`.
//!
//! It is the one module that knows every other one; none of them knows it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::amqp::url::AmqpUrl;
use crate::amqp::{self, ConsumerConfig, Link};
use crate::api::{PublishApi, Sink};
use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::conn::{ConnContext, ws_config};
use crate::history::History;
use crate::metrics::Metrics;
use crate::registry::{Limits, Registry};
use crate::server::{self, Listener, ServerContext};
use crate::shutdown::{self, Tracker};

/// A bound, not yet running gateway.
pub struct Gateway {
    config: Config,
    listener: TcpListener,
    shared: Arc<ServerContext>,
    link: Arc<Link>,
    /// The broker side's settings; `None` in standalone mode.
    broker: Option<ConsumerConfig>,
}

/// Start-up failures: configuration (one line naming the variable) or the listening socket.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    Bind(SocketAddr, std::io::Error),
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Bind(addr, e) => {
                write!(f, "cannot listen on {addr} (SERVER_HOST/SERVER_PORT): {e}")
            }
        }
    }
}

impl std::error::Error for StartError {}

/// The broker side's settings, from the gateway's.
fn consumer_config(c: &Config, url: &str) -> Result<ConsumerConfig, ConfigError> {
    let url = AmqpUrl::parse(url).map_err(|e| ConfigError::new("AMQP_URL", e.to_string()))?;
    Ok(ConsumerConfig {
        history_window: c.history_window(),
        dedupe_window: c.dedupe_window,
        prefetch: c.amqp_prefetch,
        max_message_bytes: c.max_message_bytes,
        record_spacing: Duration::from_millis(c.record_spacing_ms),
        ..ConsumerConfig::new(url, &c.notify_queue)
    })
}

impl Gateway {
    /// Validates the configuration and binds the port. Must run inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Gateway, StartError> {
        let config = config.prepare().map_err(StartError::Config)?;
        let auth = Authenticator::from_config(&config).map_err(StartError::Config)?;
        let addr = SocketAddr::new(config.server_host, config.server_port);
        let listener = server::bind(addr)
            .await
            .map_err(|e| StartError::Bind(addr, e))?;
        let broker = match &config.amqp_url {
            Some(url) => Some(consumer_config(&config, url).map_err(StartError::Config)?),
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let registry = Registry::start_with(Limits {
            client_queue: config.client_queue_bytes,
            budget: config.client_queue_budget_bytes,
            per_user: config.max_connections_per_user,
        });
        let history = Arc::new(History::new(
            config.history_window(),
            config.history_max_bytes,
        ));
        let link = Arc::new(Link::default());
        let publish_api = config.publish_api_key.clone().map(|key| PublishApi {
            key,
            max_body: config.max_publish_bytes,
            max_message: config.max_message_bytes,
            timeout: config.publish_timeout(),
            sink: match config.amqp_url {
                Some(_) => Sink::Broker {
                    link: link.clone(),
                    queue: config.notify_queue.clone(),
                },
                None => Sink::Local,
            },
        });
        let conn = Arc::new(ConnContext {
            registry: registry.clone(),
            metrics: metrics.clone(),
            ws_config: ws_config(config.read_buffer_bytes, config.max_client_frame_bytes),
            close_timeout: config.close_timeout(),
        });
        let shared = Arc::new(ServerContext {
            auth,
            registry,
            history,
            metrics,
            tracker: Arc::new(Tracker::default()),
            conn,
            max_connections: config.effective_max_connections(),
            max_header_bytes: config.max_header_bytes,
            handshake_timeout: config.handshake_timeout(),
            accepting: AtomicBool::new(true),
            publish_api,
            standalone: config.amqp_url.is_none(),
        });
        Ok(Gateway {
            config,
            listener,
            shared,
            link,
            broker,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until `signal` resolves, then shuts down gracefully.
    pub async fn run(self, signal: impl Future<Output = ()>) {
        let Gateway {
            config,
            listener,
            shared,
            link,
            broker,
        } = self;
        if shared.auth.is_insecure() {
            warn!(
                "AUTH_MODE=insecure: any client can claim any user id with ?user_id=; never use this in production"
            );
        }
        info!(
            addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            queue = %config.notify_queue,
            max_connections = shared.max_connections,
            "listening"
        );
        let (trigger, shutdown) = shutdown::channel();
        tokio::spawn(
            shared
                .registry
                .clone()
                .run_keepalive(config.ping_interval(), trigger.subscribe()),
        );
        let consumer = match broker {
            Some(cfg) => Some(tokio::spawn(amqp::run(
                cfg,
                shared.registry.clone(),
                shared.history.clone(),
                shared.metrics.clone(),
                link,
                trigger.subscribe(),
            ))),
            None => {
                if shared.publish_api.is_some() {
                    info!(
                        "standalone mode: no AMQP_URL, so no broker; notifications come in through POST /api/publish"
                    );
                } else {
                    warn!(
                        "standalone mode without PUBLISH_API_KEY: no AMQP_URL and no way to publish; set one of them"
                    );
                }
                None
            }
        };
        let accept = tokio::spawn(
            Listener {
                listener,
                shared: shared.clone(),
                shutdown,
            }
            .run(),
        );

        signal.await;
        info!("shutting down");
        shared
            .accepting
            .store(false, std::sync::atomic::Ordering::Release);
        trigger.fire();
        let _ = accept.await;
        if let Some(consumer) = consumer {
            let _ = consumer.await;
        }
        shared.registry.flush().await;
        shared.registry.close_all();
        let open = shared.registry.connections();
        if tokio::time::timeout(config.shutdown_timeout(), shared.tracker.wait_idle())
            .await
            .is_err()
        {
            warn!(
                left = shared.tracker.open(),
                "shutdown timeout: exiting with sockets still open"
            );
        } else {
            info!(closed = open, "all connections closed");
        }
    }
}
