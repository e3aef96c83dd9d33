//! `AMQP_URL`: one broker, or the nodes of one RabbitMQ cluster, comma-separated (contract §4),
//! parsed once at start-up, and the connect-with-failover that uses it.
//!
//! Each node is a full `amqp://user:pass@host:port/vhost?heartbeat=N` URL, percent-decoded part
//! by part (so the default vhost is written `%2f`). amqprs has a URI parser, but it neither
//! decodes the vhost nor survives a query key without `=`, and a configuration value must never
//! panic the process.
//!
//! This module must not know the rest of the configuration: a bad `AMQP_URL` is its own
//! [`UrlError`]; `config` names the variable when it reports it.

use std::fmt;
use std::time::Duration;

use amqprs::connection::{Connection, OpenConnectionArguments};

/// Heartbeat asked of the broker unless the URL says otherwise: a dead link is noticed after
/// two missed beats.
const HEARTBEAT_SECS: u16 = 10;
/// Longest wait for one node to accept a connection before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker's nodes, in the order given.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    nodes: Vec<Node>,
}

#[derive(Clone, PartialEq, Eq)]
struct Node {
    host: String,
    port: u16,
    user: String,
    pass: String,
    vhost: String,
    heartbeat: u16,
}

/// Why an `AMQP_URL` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlError(pub String);

impl fmt::Display for UrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (expected amqp://user:pass@host:port/vhost, or several such URLs separated by commas)",
            self.0
        )
    }
}

impl std::error::Error for UrlError {}

/// Passwords never reach logs.
impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries((0..self.nodes.len()).map(|i| self.node_name(i)))
            .finish()
    }
}

impl AmqpUrl {
    pub fn parse(text: &str) -> Result<AmqpUrl, UrlError> {
        let nodes = text
            .split(',')
            .map(str::trim)
            .enumerate()
            .map(|(i, url)| {
                parse_node(url).map_err(|why| match text.contains(',') {
                    true => UrlError(format!("node {}: {why}", i + 1)),
                    false => UrlError(why),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AmqpUrl { nodes })
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `host:port` of node `i`, for logs.
    pub fn node_name(&self, i: usize) -> String {
        let n = &self.nodes[i % self.nodes.len()];
        format!("{}:{}", n.host, n.port)
    }

    /// Connection arguments for node `i` (wrapping around).
    pub fn args(&self, i: usize, connection_name: &str) -> OpenConnectionArguments {
        let n = &self.nodes[i % self.nodes.len()];
        let mut args = OpenConnectionArguments::new(&n.host, n.port, &n.user, &n.pass);
        args.virtual_host(&n.vhost)
            .heartbeat(n.heartbeat)
            .connection_name(connection_name);
        args
    }

    /// Connects to the first node that answers, trying them in turn from node `first`.
    /// Returns the connection and the index of the node it went to.
    pub async fn connect(
        &self,
        first: usize,
        connection_name: &str,
    ) -> Result<(Connection, usize), String> {
        let mut errors = Vec::new();
        for k in 0..self.nodes.len() {
            let i = (first + k) % self.nodes.len();
            let args = self.args(i, connection_name);
            match tokio::time::timeout(CONNECT_TIMEOUT, Connection::open(&args)).await {
                Ok(Ok(conn)) => return Ok((conn, i)),
                Ok(Err(e)) => errors.push(format!("{}: {e}", self.node_name(i))),
                Err(_) => errors.push(format!(
                    "{}: no answer in {CONNECT_TIMEOUT:?}",
                    self.node_name(i)
                )),
            }
        }
        Err(format!("connect: {}", errors.join("; ")))
    }
}

fn parse_node(url: &str) -> Result<Node, String> {
    let rest = url
        .strip_prefix("amqp://")
        .ok_or("scheme must be amqp://")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, vhost) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, pass) = match userinfo {
        Some(u) => match u.split_once(':') {
            Some((a, b)) => (decode(a), decode(b)),
            None => (decode(u), String::new()),
        },
        None => ("guest".to_owned(), "guest".to_owned()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| "port must be a number")?),
        None => (hostport, 5672),
    };
    if host.is_empty() {
        return Err("host is missing".into());
    }
    let mut heartbeat = HEARTBEAT_SECS;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some(("heartbeat", v)) = pair.split_once('=') {
            heartbeat = v
                .parse()
                .map_err(|_| "heartbeat must be a number of seconds")?;
        }
    }
    Ok(Node {
        host: host.to_owned(),
        port,
        user,
        pass,
        vhost: if vhost.is_empty() {
            "/".to_owned()
        } else {
            decode(vhost)
        },
        heartbeat,
    })
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_node() {
        let u = AmqpUrl::parse("amqp://u%40x:p%3A@h.example:5673/%2f?heartbeat=5").unwrap();
        let a = u.args(0, "t");
        assert_eq!(a.get_host(), "h.example");
        assert_eq!(a.get_port(), 5673);
        assert_eq!(a.get_virtual_host(), "/");
        assert_eq!(a.get_heartbeat(), 5);
        let a = AmqpUrl::parse("amqp://localhost").unwrap().args(0, "t");
        assert_eq!(a.get_virtual_host(), "/");
        assert_eq!(a.get_heartbeat(), HEARTBEAT_SECS);
        assert!(AmqpUrl::parse("http://x").is_err());
        assert!(AmqpUrl::parse("amqp://h:notaport/").is_err());
        assert!(AmqpUrl::parse("amqp://h/?heartbeat").is_ok());
        assert!(!format!("{u:?}").contains("p:"), "no password in Debug");
    }

    #[test]
    fn several_nodes() {
        let u = AmqpUrl::parse("amqp://a:5701/%2f, amqp://b:5702/%2f,amqp://c:5703/%2f").unwrap();
        assert_eq!(u.len(), 3);
        assert_eq!(u.node_name(1), "b:5702");
        assert_eq!(u.node_name(4), "b:5702", "wraps around");
        let e = AmqpUrl::parse("amqp://a:5701/%2f,amqp://b:x/").unwrap_err();
        assert!(
            e.to_string().starts_with("node 2: port must be a number"),
            "{e}"
        );
        assert!(AmqpUrl::parse("amqp://a/,").is_err(), "an empty node");
    }
}
