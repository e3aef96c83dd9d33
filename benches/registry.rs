//! Routing through the sharded registry, with in-process connection handles (no sockets): the
//! gateway's cost between "a message is parsed" and "its frame sits in each recipient's
//! mailbox", on a 2-worker tokio runtime like production on this machine.
//!
//! * `route unicast ×1000`: the consumer's side only — 1,000 `route()` calls to random users
//!   of 10,000 (shard lookup, frame encode, hand-off to the shard's queue);
//! * `route+deliver unicast ×1000`: the same, until every frame is in its mailbox;
//! * `broadcast to 10,000 mailboxes`: one broadcast until all 10,000 mailboxes hold it.
//!
//! Mailboxes are emptied between iterations, outside the timed part. `cargo bench --bench
//! registry`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use wsnotify::envelope::Target;
use wsnotify::mailbox::Mailbox;
use wsnotify::notification::Notification;
use wsnotify::registry::{ConnKey, Registry};

const CONNECTIONS: usize = 10_000;
const BATCH: usize = 1_000;

struct Setup {
    rt: tokio::runtime::Runtime,
    registry: Arc<Registry>,
    handles: Vec<(Arc<Mailbox>, ConnKey)>,
    users: Vec<String>,
}

fn setup() -> Setup {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let registry = rt.block_on(async { Registry::start(usize::MAX / 2) });
    let users: Vec<String> = (0..CONNECTIONS)
        .map(|i| format!("3f0c9a52-6b1e-4d7a-8c3f-{i:012}"))
        .collect();
    let handles = users
        .iter()
        .map(|u| {
            let h = Arc::new(Mailbox::new(None));
            let key = registry
                .register(Arc::from(u.as_str()), h.clone())
                .expect("registry open");
            (h, key)
        })
        .collect();
    Setup {
        rt,
        registry,
        handles,
        users,
    }
}

impl Setup {
    fn drain(&self) -> usize {
        self.handles
            .iter()
            .filter_map(|(h, key)| h.take_frames().map(|t| (h, key, t)))
            .map(|(h, key, t)| {
                self.registry.release(*key, h, t.charge);
                t.frames.len()
            })
            .sum()
    }
}

/// A notification as a replica reads it from the fan-out log: its frame's parts encoded.
fn notification(target: Target<'static>, data: &str) -> Notification {
    Notification {
        id: "0193a5c2-7f00-7a3e-9b1c-2f9e8d7c6b5a".into(),
        target,
        head: r#"{"id":"0193a5c2-7f00-7a3e-9b1c-2f9e8d7c6b5a","type":"order_update""#.into(),
        tail: format!(r#","timestamp":"2026-11-26T10:00:00.123Z","data":{data}}}"#).into(),
        fingerprint: [0; 16],
        redelivered: false,
        taken_ms: 0,
    }
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let data = format!(r#"{{"message":"{}"}}"#, "x".repeat(80));
    let mut rng = fastrand::Rng::with_seed(7);
    let targets: Vec<Notification> = (0..BATCH)
        .map(|_| {
            let user = s.users[rng.usize(..CONNECTIONS)].clone();
            notification(Target::User(user.into()), &data)
        })
        .collect();
    let broadcast = notification(Target::Broadcast, &data);

    let mut group = c.benchmark_group("registry");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("route unicast ×1000", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                s.rt.block_on(async {
                    for n in &targets {
                        black_box(s.registry.route(n, 1).await);
                    }
                });
                total += t.elapsed();
                s.rt.block_on(s.registry.flush());
                s.drain();
            }
            total
        })
    });
    group.bench_function("route+deliver unicast ×1000", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                s.rt.block_on(async {
                    for n in &targets {
                        black_box(s.registry.route(n, 1).await);
                    }
                    s.registry.flush().await;
                });
                total += t.elapsed();
                assert_eq!(s.drain(), BATCH);
            }
            total
        })
    });
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("broadcast to 10,000 mailboxes", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                s.rt.block_on(async {
                    black_box(s.registry.route(&broadcast, 1).await);
                    s.registry.flush().await;
                });
                total += t.elapsed();
                assert_eq!(s.drain(), CONNECTIONS);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
