//! A throwaway 3-node RabbitMQ cluster on loopback (`scripts/cluster.sh`) for tests of the
//! gateway against several nodes, quorum queues and a node lost (`support::cluster::Cluster`).
//!
//! Nodes are numbered from 1, as in the script. The cluster is stopped and its files deleted
//! when the [`Cluster`] is dropped, also when the test panics or times out while starting it.
//! Forming takes 15-40 s on a 2-core machine: start one cluster per test file where you can.

use std::collections::{BTreeSet, HashMap};
use std::process::Stdio;
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{BasicProperties, FieldTable, FieldValue};
use parking_lot::Mutex;
use tokio::process::Command;
use wsnotify::amqp::confirm::ConfirmChannel;

use super::{WAIT, within};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
/// Above the script's own bound for a start or restart (WSNOTIFY_CLUSTER_TIMEOUT, 180 s).
const START_LIMIT: Duration = Duration::from_secs(200);
/// For the script's quick commands (kill, pid, stop) and rabbitmqctl calls.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);

/// A running cluster; stopped on drop.
pub struct Cluster {
    name: String,
    env: HashMap<String, String>,
    nodes: usize,
    /// Nodes killed by the test and not restarted.
    down: Mutex<BTreeSet<usize>>,
    stopped: bool,
}

impl Cluster {
    /// Starts `nodes` nodes (1..=7) under a fresh name and waits until all are in one cluster.
    pub async fn start(nodes: usize) -> Cluster {
        let name = format!("wsn-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        // The guard exists before the script runs: if this future is dropped (a timeout) or
        // the start fails half-way, its drop removes whatever the script had started.
        let mut cluster = Cluster {
            name,
            env: HashMap::new(),
            nodes,
            down: Mutex::default(),
            stopped: false,
        };
        let t0 = Instant::now();
        let out = cluster
            .script(
                &["start", &cluster.name.clone(), &nodes.to_string()],
                START_LIMIT,
            )
            .await;
        cluster.env = out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        assert!(
            cluster.env.contains_key("AMQP_URL"),
            "cluster.sh start printed no AMQP_URL:\n{out}"
        );
        eprintln!(
            "cluster {} formed: {nodes} nodes in {:.1} s ({})",
            cluster.name,
            t0.elapsed().as_secs_f64(),
            cluster.amqp_url()
        );
        cluster
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    fn get(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("cluster.sh printed no {key}"))
    }

    fn check(&self, i: usize) {
        assert!(
            (1..=self.nodes).contains(&i),
            "node {i} out of 1..={}",
            self.nodes
        );
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f` of node `i`.
    pub fn url(&self, i: usize) -> &str {
        self.check(i);
        self.get(&format!("AMQP_URL_{i}"))
    }

    /// Every node's URL, comma-separated: the gateway's `AMQP_URL` for this cluster.
    pub fn amqp_url(&self) -> &str {
        self.get("AMQP_URL")
    }

    pub fn port(&self, i: usize) -> u16 {
        self.check(i);
        self.get(&format!("AMQP_PORT_{i}"))
            .parse()
            .expect("AMQP port")
    }

    /// Erlang node name of node `i`, e.g. `wsn-1a2b-1@localhost`.
    pub fn node_name(&self, i: usize) -> &str {
        self.check(i);
        self.get(&format!("NODE_{i}"))
    }

    /// Nodes the test has not killed, lowest first.
    pub fn up(&self) -> Vec<usize> {
        let down = self.down.lock();
        (1..=self.nodes).filter(|i| !down.contains(i)).collect()
    }

    fn first_up(&self) -> usize {
        *self.up().first().expect("every node is down")
    }

    /// Nodes running and clustered, as the cluster itself reports them (from a running node).
    pub async fn running_nodes(&self) -> Vec<usize> {
        // `status` exits 1 while a node is down: read its output either way.
        let out = self
            .script_output(&["status", &self.name], COMMAND_LIMIT)
            .await;
        let listed = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("RUNNING_NODES=").map(str::to_owned))
            .unwrap_or_default();
        let names: BTreeSet<&str> = listed.split(',').collect();
        (1..=self.nodes)
            .filter(|&i| names.contains(self.node_name(i)))
            .collect()
    }

    /// OS pid of node `i`'s Erlang VM.
    pub async fn pid(&self, i: usize) -> i32 {
        self.check(i);
        let out = self
            .script(&["pid", &self.name, &i.to_string()], COMMAND_LIMIT)
            .await;
        out.trim().parse().expect("pid")
    }

    /// `kill -9` of node `i` (its whole process group, like a machine that died); returns
    /// once the process is gone. Its peers notice at once (its connections close).
    pub async fn kill(&self, i: usize) {
        self.check(i);
        self.script(&["kill", &self.name, &i.to_string()], COMMAND_LIMIT)
            .await;
        self.down.lock().insert(i);
    }

    /// Starts a killed node again; returns once it has rejoined and accepts connections.
    pub async fn restart(&self, i: usize) {
        self.check(i);
        self.script(&["restart", &self.name, &i.to_string()], START_LIMIT)
            .await;
        self.down.lock().remove(&i);
    }

    /// `rabbitmqctl -n <node i> ARGS…`; returns its stdout.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> String {
        self.check(i);
        let mut all = vec!["ctl", &self.name];
        let node = i.to_string();
        all.push(&node);
        all.extend_from_slice(args);
        self.script(&all, COMMAND_LIMIT).await
    }

    /// The node (1-based) that leads quorum queue `queue`, as the cluster reports it.
    pub async fn leader(&self, queue: &str) -> usize {
        let out = self
            .ctl(
                self.first_up(),
                &[
                    "list_queues",
                    "--quiet",
                    "--no-table-headers",
                    "name",
                    "leader",
                ],
            )
            .await;
        let leader = out
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(name, _)| *name == queue)
            .map(|(_, node)| node.trim().to_owned())
            .unwrap_or_else(|| panic!("queue {queue} not listed:\n{out}"));
        (1..=self.nodes)
            .find(|&i| self.node_name(i) == leader)
            .unwrap_or_else(|| panic!("leader {leader} is no node of this cluster"))
    }

    /// An AMQP connection to node `i` (guest, over loopback).
    pub async fn connect(&self, i: usize) -> Connection {
        let args = OpenConnectionArguments::new("127.0.0.1", self.port(i), "guest", "guest");
        within(&format!("connect to node {i}"), Connection::open(&args))
            .await
            .unwrap_or_else(|e| panic!("connect to node {i}: {e}"))
    }

    async fn channel(&self, i: usize) -> (Connection, Channel) {
        let conn = self.connect(i).await;
        let ch = conn.open_channel(None).await.expect("channel");
        (conn, ch)
    }

    /// Declares `queue` as a backend on a cluster would: durable, `x-queue-type: quorum`,
    /// through the first node that is up (RabbitMQ places the leader there).
    pub async fn declare_quorum(&self, queue: &str) {
        self.declare_quorum_on(self.first_up(), queue).await;
    }

    /// [`Cluster::declare_quorum`] through node `i`, which becomes the queue's leader.
    pub async fn declare_quorum_on(&self, i: usize, queue: &str) {
        let (conn, ch) = self.channel(i).await;
        let mut args = FieldTable::new();
        args.insert(
            "x-queue-type".try_into().expect("field name"),
            FieldValue::from("quorum"),
        );
        within(
            &format!("declare quorum queue {queue}"),
            ch.queue_declare(
                QueueDeclareArguments::new(queue)
                    .durable(true)
                    .arguments(args)
                    .finish(),
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("declare quorum queue {queue} on node {i}: {e}"));
        let _ = conn.close().await;
    }

    /// Publishes `body` (persistent, to the default exchange with routing key `queue`) through
    /// node `i` and waits for the broker's confirm: once this returns, a quorum queue has
    /// the message on a majority of its nodes.
    pub async fn publish(&self, i: usize, queue: &str, body: &[u8]) {
        self.publish_all(i, queue, &[body.to_vec()]).await;
    }

    /// Publishes every body in order through node `i`, then waits for all the confirms.
    pub async fn publish_all(&self, i: usize, queue: &str, bodies: &[Vec<u8>]) {
        let conn = self.connect(i).await;
        let ch = ConfirmChannel::open(&conn).await.expect("confirm channel");
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let props = BasicProperties::default().with_persistence(true).finish();
            let mut args = BasicPublishArguments::new("", queue);
            args.mandatory(true);
            confirms.push(
                ch.publish(props, body.clone(), args, WAIT)
                    .await
                    .unwrap_or_else(|e| panic!("publish to {queue} on node {i}: {e}")),
            );
        }
        within(&format!("{} confirms from node {i}", bodies.len()), async {
            for c in confirms {
                c.wait()
                    .await
                    .unwrap_or_else(|e| panic!("publish to {queue} on node {i}: {e}"));
            }
        })
        .await;
        ch.close().await;
        let _ = conn.close().await;
    }

    /// Consumes `n` messages from `queue` through node `i` (acking them) and returns their
    /// bodies in delivery order.
    pub async fn take(&self, i: usize, queue: &str, n: usize) -> Vec<Vec<u8>> {
        let (conn, ch) = self.channel(i).await;
        let (_, mut rx) = ch
            .basic_consume_rx(
                BasicConsumeArguments::new(queue, "cluster-take")
                    .auto_ack(true)
                    .finish(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue} on node {i}: {e}"));
        let mut out = Vec::with_capacity(n);
        within(&format!("{n} messages from {queue} on node {i}"), async {
            while out.len() < n {
                let m = rx.recv().await.expect("consumer closed");
                out.push(m.content.unwrap_or_default());
            }
        })
        .await;
        let _ = conn.close().await;
        out
    }

    /// Messages ready in `queue`, as node `i` reports them.
    pub async fn count(&self, i: usize, queue: &str) -> u32 {
        let (conn, ch) = self.channel(i).await;
        let n = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .unwrap_or_else(|e| panic!("passive declare {queue} on node {i}: {e}"))
            .map(|(_, n, _)| n)
            .unwrap_or(0);
        let _ = conn.close().await;
        n
    }

    /// Stops the cluster and removes its files (what drop does, awaited).
    pub async fn stop(mut self) {
        self.script(&["stop", &self.name.clone()], COMMAND_LIMIT)
            .await;
        self.stopped = true;
    }

    /// Runs `scripts/cluster.sh ARGS…` (on a child process, never blocking the runtime) and
    /// returns its stdout; a failure or timeout fails the test with its stderr.
    async fn script(&self, args: &[&str], limit: Duration) -> String {
        let out = self.script_output(args, limit).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "cluster.sh {} failed ({}):\n{stderr}",
            args.join(" "),
            out.status
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn script_output(&self, args: &[&str], limit: Duration) -> std::process::Output {
        let mut cmd = Command::new(SCRIPT);
        cmd.args(args)
            .env("WSNOTIFY_CLUSTER_OWNER", std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let what = format!("cluster.sh {}", args.join(" "));
        match tokio::time::timeout(limit, cmd.output()).await {
            Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
            Err(_) => panic!("{what}: no answer within {limit:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // Drop cannot await. `stop` only kills processes and deletes files (no rabbitmqctl):
        // about a second, bounded by the script's own waits.
        match std::process::Command::new(SCRIPT)
            .args(["stop", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
        {
            Ok(s) if s.success() => {}
            other => eprintln!(
                "cluster {}: stop failed ({other:?}); remove it with scripts/cluster.sh stop {}",
                self.name, self.name
            ),
        }
    }
}
