//! The naive baseline server (`loadtest baseline`): what a first tokio-tungstenite notification
//! gateway usually looks like, consuming the same queue and speaking the same contract, so that
//! every figure `loadtest` reports for wsnotify can be set against it in the same run.
//!
//! * `tokio_tungstenite::accept_hdr_async` with the **default** `WebSocketConfig` (128 KiB read
//!   buffer, 128 KiB write buffer);
//! * one task per connection, the stream `split()` into sink and stream, and one bounded tokio
//!   `mpsc` (256 messages, like the seed's Go hub) feeding the sink with `send` per message;
//! * a global `Mutex<HashMap<user, Vec<Sender>>>`; a broadcast walks it under the lock;
//! * the envelope parsed into a `serde_json::Value`, the frame built with `json!` and
//!   serialized per message (once per target user, shared by that user's connections);
//! * the system allocator, the default multi-threaded runtime.
//!
//! A client whose queue is full is disconnected (the seed's behaviour), never waited for.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicQosArguments, QueueDeclareArguments,
};
use amqprs::connection::Connection;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::{Message, http};

use crate::client::lock;
use crate::publish::parse_amqp_url;

/// How the baseline authenticates, like the gateway's `AUTH_MODE`.
#[derive(Debug, Clone)]
pub enum BaselineAuth {
    Insecure,
    Jwt(String),
}

#[derive(Debug, Clone)]
pub struct BaselineArgs {
    pub addr: SocketAddr,
    pub amqp_url: String,
    pub queue: String,
    pub auth: BaselineAuth,
    pub prefetch: u16,
}

type Clients = HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>;

#[derive(Default)]
struct Hub {
    next: AtomicU64,
    clients: Mutex<Clients>,
}

impl Hub {
    fn add(&self, user: &str, tx: mpsc::Sender<Message>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.clients)
            .entry(user.to_owned())
            .or_default()
            .push((id, tx));
        id
    }

    fn remove(&self, user: &str, id: u64) {
        let mut c = lock(&self.clients);
        if let Some(v) = c.get_mut(user) {
            v.retain(|(i, _)| *i != id);
            if v.is_empty() {
                c.remove(user);
            }
        }
    }

    fn send(list: &[(u64, mpsc::Sender<Message>)], msg: &Message) {
        for (_, tx) in list {
            // Full queue: the client is too slow; dropping its sender ends its task.
            let _ = tx.try_send(msg.clone());
        }
    }
}

/// Runs the baseline server until the process is killed. Prints `listening addr=…` once it
/// accepts connections and consumes.
pub async fn serve(args: BaselineArgs) -> Result<(), String> {
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|e| format!("bind {}: {e}", args.addr))?;
    let hub = Arc::new(Hub::default());
    let conn = consume(&args, hub.clone()).await?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("baseline listening addr={local} queue={}", args.queue);
    let auth = Arc::new(args.auth);
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("baseline: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if !conn.is_open() {
            return Err("broker connection lost".into());
        }
        tokio::spawn(client(sock, hub.clone(), auth.clone()));
    }
}

fn user_from(req: &Request, auth: &BaselineAuth) -> Option<String> {
    let query = req.uri().query()?;
    let pairs = || query.split('&').filter_map(|kv| kv.split_once('='));
    match auth {
        BaselineAuth::Insecure => pairs()
            .find(|(k, _)| *k == "user_id")
            .map(|(_, v)| v.to_owned()),
        BaselineAuth::Jwt(secret) => {
            #[derive(serde::Deserialize)]
            struct Claims {
                sub: String,
            }
            let token = pairs().find(|(k, _)| *k == "token")?.1;
            jsonwebtoken::decode::<Claims>(
                token,
                &jsonwebtoken::DecodingKey::from_secret(secret.as_bytes()),
                &jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256),
            )
            .ok()
            .map(|d| d.claims.sub)
        }
    }
}

// The callback's signature is tungstenite's.
#[allow(clippy::result_large_err)]
async fn client(sock: TcpStream, hub: Arc<Hub>, auth: Arc<BaselineAuth>) {
    let mut user = None;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match user_from(req, &auth) {
            Some(u) => {
                user = Some(u);
                Ok(resp)
            }
            None => {
                let mut r = ErrorResponse::new(Some("unauthorized".into()));
                *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                Err(r)
            }
        }
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(sock, callback).await else {
        return;
    };
    let Some(user) = user else { return };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let id = hub.add(&user, tx);
    loop {
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => {
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
            r = stream.next() => match r {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
        }
    }
    hub.remove(&user, id);
}

/// Now, RFC 3339 UTC with milliseconds (the frames' `timestamp`).
pub fn timestamp() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_default()
}

fn route(hub: &Hub, body: &[u8]) {
    let Ok(env) = serde_json::from_slice::<Value>(body) else {
        return;
    };
    let p = &env["payload"];
    let Some(mt) = p["message_type"].as_str() else {
        return;
    };
    let id = uuid::Uuid::now_v7().to_string();
    let ts = timestamp();
    let frame = |user: Option<&str>| {
        let mut v = serde_json::json!({"id": id, "type": mt, "timestamp": ts, "data": p["data"]});
        if let Some(u) = user {
            v["user_id"] = Value::from(u);
        }
        Message::text(v.to_string())
    };
    let clients = lock(&hub.clients);
    if p["broadcast"] == Value::Bool(true) {
        let msg = frame(None);
        for list in clients.values() {
            Hub::send(list, &msg);
        }
        return;
    }
    let users: Vec<&str> = match (&p["user_id"], &p["user_ids"]) {
        (Value::String(u), _) => vec![u.as_str()],
        (_, Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    for u in users {
        if let Some(list) = clients.get(u) {
            Hub::send(list, &frame(Some(u)));
        }
    }
}

/// Starts consuming; the returned connection must be kept alive.
async fn consume(args: &BaselineArgs, hub: Arc<Hub>) -> Result<Connection, String> {
    let conn = Connection::open(&parse_amqp_url(&args.amqp_url)?)
        .await
        .map_err(|e| format!("RabbitMQ: {e}"))?;
    let ch = conn
        .open_channel(None)
        .await
        .map_err(|e| format!("channel: {e}"))?;
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&args.queue))
        .await
        .map_err(|e| format!("declare: {e}"))?;
    ch.basic_qos(BasicQosArguments::new(0, args.prefetch, false))
        .await
        .map_err(|e| format!("qos: {e}"))?;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&args.queue, "baseline")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(|e| format!("consume: {e}"))?;
    tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let Some(deliver) = msg.deliver else { continue };
            route(&hub, msg.content.as_deref().unwrap_or_default());
            let _ = ch
                .basic_ack(BasicAckArguments::new(deliver.delivery_tag(), false))
                .await;
        }
        eprintln!("baseline: consumer ended");
    });
    Ok(conn)
}
