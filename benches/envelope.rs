//! Per-message cost of the ingest path: parse + validate an envelope, encode its `data`, and
//! encode the frame, for 200 B, 2 KB and 64 KB bodies, and for a `user_ids` list of 10,000
//! ids (about as many as a 64 KiB body holds; repeats are dropped, which must stay linear).
//!
//! * `simd-json DOM` is the gateway's code as it runs ([`Parser::parse`] over a scratch copy,
//!   [`Notification::from_envelope`] re-encoding `data` into the frame's parts, and
//!   [`Notification::frame`]);
//! * `serde_json RawValue` is the alternative written here: borrowed serde structs with `data`
//!   as `&RawValue`, the exact sub-slice of the body, forwarded without re-encoding, and the same
//!   validation rules.
//!
//! `cargo bench --bench envelope`; the decision it informs is in BENCHMARKS.md.

use std::borrow::Cow;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::Deserialize;
use serde_json::value::RawValue;
use wsnotify::envelope::{
    MAX_ID_BYTES, MAX_MESSAGE_TYPE_BYTES, Parser, Target, dedupe, valid_user_id,
};
use wsnotify::frame::{Frame, FrameBuf};
use wsnotify::notification::Notification;

const ID: &str = "0193a5c2-7f00-7a3e-9b1c-2f9e8d7c6b5a";
const TS: &str = "2026-11-26T10:00:00.123Z";

/// An envelope for one user whose body is about `size` bytes: a realistic `data` object
/// (strings with escapes, numbers, nested arrays) grown with order lines.
fn body(size: usize) -> Vec<u8> {
    let head = r#"{"type":"websocket_notification","payload":{"user_id":"3f0c9a52-6b1e-4d7a-8c3f-1e2d3c4b5a69","message_type":"order_update","data":{"message":"Your order \"A-1\" has shipped\n","amount":1234.5,"currency":"EUR","read":false,"items":["#;
    let tail = r#"]}}}"#;
    let mut items = Vec::new();
    let mut i = 0;
    while head.len() + tail.len() + items.iter().map(|s: &String| s.len() + 1).sum::<usize>() < size
    {
        items.push(format!(
            r#"{{"sku":"SKU-{i:06}","name":"Item \u00e9 {i}","qty":{},"price":{}.99}}"#,
            i % 7 + 1,
            i * 3 % 100
        ));
        i += 1;
    }
    let b = format!("{head}{}{tail}", items.join(","));
    serde_json::from_str::<serde_json::Value>(&b).expect("valid JSON");
    b.into_bytes()
}

/// The moment `TS` names.
fn taken() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(1_795_687_200_123_000_000).expect("time")
}

/// An envelope for `n` users (short ids, each listed once, then the first tenth again).
fn users_body(n: usize) -> Vec<u8> {
    let mut ids: Vec<String> = (0..n).map(|i| format!("{i:x}")).collect();
    ids.extend((0..n / 10).map(|i| format!("{i:x}")));
    serde_json::to_vec(&serde_json::json!({"type": "websocket_notification",
        "payload": {"user_ids": ids, "message_type": "m", "data": {"message": "hi"}}}))
    .expect("JSON")
}

/// The gateway's path.
fn simd(parser: &mut Parser, body: &[u8]) -> Frame {
    let mut env = parser.parse(body, 1 << 20).expect("valid envelope");
    env.id.get_or_insert(ID.into());
    let n = Notification::from_envelope(env, body, false, taken());
    match &n.target {
        Target::User(u) => n.frame(Some(u)),
        _ => n.frame(None),
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    payload: RawPayload<'a>,
}

#[derive(Deserialize)]
struct RawPayload<'a> {
    #[serde(borrow)]
    message_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_ids: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    broadcast: Option<bool>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

/// The same rules as `wsnotify::envelope`, over serde_json's borrowed structs.
fn serde_raw(body: &[u8]) -> Result<Frame, String> {
    let env: RawEnvelope<'_> = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if env.kind != "websocket_notification" {
        return Err("wrong_type".into());
    }
    let p = env.payload;
    let message_type = p
        .message_type
        .filter(|m| !m.is_empty() && m.len() <= MAX_MESSAGE_TYPE_BYTES)
        .ok_or("message_type")?;
    let target = match (p.user_id, p.user_ids, p.broadcast.unwrap_or(false)) {
        (Some(u), None, false) if valid_user_id(&u) => Target::User(u),
        (None, Some(mut list), false)
            if !list.is_empty() && list.iter().all(|u| valid_user_id(u)) =>
        {
            dedupe(&mut list);
            Target::Users(list)
        }
        (None, None, true) => Target::Broadcast,
        _ => return Err("target".into()),
    };
    if p.id
        .as_ref()
        .is_some_and(|i| i.is_empty() || i.len() > MAX_ID_BYTES)
    {
        return Err("id".into());
    }
    let data = p.data.map_or(&b"null"[..], |d| d.get().as_bytes());
    let mut f = FrameBuf::with_capacity(128 + data.len());
    f.push(b"{\"id\":");
    f.push_str_literal(p.id.as_deref().unwrap_or(ID));
    f.push(b",\"type\":");
    f.push_str_literal(&message_type);
    if let Target::User(u) = &target {
        f.push(b",\"user_id\":");
        f.push_str_literal(u);
    }
    f.push(b",\"timestamp\":");
    f.push_str_literal(TS);
    f.push(b",\"data\":");
    f.push(data);
    f.push(b"}");
    Ok(f.finish())
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("envelope parse+validate+frame");
    let cases = [
        ("200 B", body(200)),
        ("2 KB", body(2 * 1024)),
        ("64 KB", body(64 * 1024)),
        ("user_ids ×10,000", users_body(10_000)),
    ];
    for (label, body) in cases {
        // Both paths must produce a frame with the same JSON value.
        let a: serde_json::Value =
            serde_json::from_slice(simd(&mut Parser::new(), &body).json()).expect("json");
        let b: serde_json::Value =
            serde_json::from_slice(serde_raw(&body).expect("valid").json()).expect("json");
        assert_eq!(a, b, "{label}");
        group.throughput(Throughput::Bytes(body.len() as u64));
        let mut parser = Parser::new();
        group.bench_with_input(
            BenchmarkId::new("simd-json DOM", label),
            &body,
            |bch, body| bch.iter(|| black_box(simd(&mut parser, black_box(body)))),
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json RawValue", label),
            &body,
            |bch, body| bch.iter(|| black_box(serde_raw(black_box(body)))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
