//! What the recovery history costs the path of every notification, and what a reconnecting
//! client costs it.
//!
//! * `record`: [`History::record`] in steady state — the window full (5 minutes at 1,000
//!   notifications/s, the defaults' design point: 300,000 entries for 19,000 users), so every
//!   notification recorded also evicts the oldest one. Batches of 1 (a quiet log) and 64 (what
//!   a replica reads from one record under load). Throughput is per notification.
//! * `attach`: [`History::attach`] for a client that missed 10 notifications of its own among
//!   those 300,000 (the per-user index finds them without a scan), and for an unknown `since`.
//!
//! `cargo bench --bench history`; the figures are in BENCHMARKS.md (*Recovery*).

use std::cell::Cell;
use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsnotify::envelope::Target;
use wsnotify::history::History;
use wsnotify::notification::Notification;

const USERS: u64 = 19_000;
const WINDOW: Duration = Duration::from_secs(300);
/// 1,000 notifications/s for the whole window.
const FILL: u64 = 300_000;

/// Notification number `i`, taken in at `i` ms (1,000/s), for a user picked by a cheap hash,
/// with a frame of about 250 bytes like the loadtest's.
fn notification(i: u64) -> Notification {
    let id = format!(
        "0193a5c2-7f00-7a3e-{:04x}-{:012x}",
        (i >> 48) & 0xffff,
        i & 0xffff_ffff_ffff
    );
    let user = format!("user-{}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15) % USERS);
    Notification {
        head: Bytes::from(format!(r#"{{"id":"{id}","type":"order_update""#)),
        tail: Bytes::from(format!(
            r#","timestamp":"2026-11-30T10:00:00.000Z","data":{{"message":"Your order A-{i} has shipped","amount":1234.5,"currency":"EUR","items":[{{"sku":"SKU-000001","qty":1}}],"read":false,"pad":"{}"}}}}"#,
            "x".repeat(60)
        )),
        id: id.into(),
        target: Target::User(user.into()),
        fingerprint: [0; 16],
        redelivered: false,
        taken_ms: i,
    }
}

/// A history holding the full window, and the number of the next notification.
fn full() -> (History, Cell<u64>) {
    let h = History::new(WINDOW, 256 << 20);
    for chunk in (0..FILL).collect::<Vec<_>>().chunks(1024) {
        let batch = chunk.iter().map(|&i| notification(i)).collect();
        h.record(batch, chunk[chunk.len() - 1]);
    }
    (h, Cell::new(FILL))
}

fn record(c: &mut Criterion) {
    let (h, next) = full();
    let mut g = c.benchmark_group("history record (window full, evicting)");
    for batch in [1u64, 64] {
        g.throughput(Throughput::Elements(batch));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &batch| {
            b.iter_batched(
                || {
                    let from = next.get();
                    next.set(from + batch);
                    (
                        (from..from + batch).map(notification).collect(),
                        from + batch - 1,
                    )
                },
                |(batch, now)| black_box(h.record(batch, now)),
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
    let s = h.stats(next.get());
    eprintln!(
        "history after the bench: {} entries, {} bytes ({} bytes per entry)",
        s.entries,
        s.bytes,
        s.bytes / s.entries.max(1)
    );
}

fn attach(c: &mut Criterion) {
    let (h, next) = full();
    // A user who left: their notifications since then, and the id they last saw.
    let user = "user-gone";
    let mut last_seen = String::new();
    for k in 0..11u64 {
        let i = next.get();
        next.set(i + 1);
        let mut n = notification(i);
        n.target = Target::User(user.into());
        if k == 0 {
            last_seen = n.id.to_string();
        }
        h.record(vec![n], i);
        // Others' traffic in between.
        let others = (i + 1..i + 200).map(notification).collect();
        next.set(i + 200);
        h.record(others, i + 199);
    }
    let mut g = c.benchmark_group("history attach");
    g.bench_function("10 missed of 300,000", |b| {
        b.iter(|| {
            let (_, r) = h.attach(user, &last_seen, 1 << 20, |covered| covered);
            assert_eq!(r.missed.len(), 10);
            black_box(r)
        })
    });
    g.bench_function("unknown since", |b| {
        b.iter(|| black_box(h.attach(user, "not-an-id-we-know", 1 << 20, |c| c)))
    });
    g.finish();
}

criterion_group!(benches, record, attach);
criterion_main!(benches);
