//! Fuzzing what backends publish: property tests (proptest; `cargo fuzz` needs a nightly
//! toolchain with cargo-fuzz, which CI does not have) over the envelope parser and the frame
//! encoder, the two places untrusted broker bytes are turned into what browsers receive.
//!
//! For every input: no panic; a rejection carries a non-empty reason that names its class
//! (it becomes the dead-letter header); an acceptance yields frames whose payload is valid
//! JSON carrying the input's `data` unchanged, its `message_type`, the recipient's `user_id`
//! and the id. Structure-aware envelopes are also checked against an independent model of
//! contract §1 (accept exactly what the contract accepts). One more test sends a fuzzed sample
//! through the real broker and gateway: every body is either delivered or dead-lettered, body
//! unchanged, with a reason.
//!
//! Case counts: `WSNOTIFY_FUZZ_CASES` (default 1000 per property) — e.g.
//! `WSNOTIFY_FUZZ_CASES=200000 cargo test --release --test it -- --nocapture fuzz_envelope::`.
//! Each property prints how many inputs it ran and how they ended.

use std::sync::atomic::{AtomicU64, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use wsnotify::amqp::record::{self, Origin, Record, RecordBuilder};
use wsnotify::envelope::{Parser, Target};
use wsnotify::notification::Notification;

use crate::support::{light, light_blocking};

const MAX: usize = 65_536;
const TS: &str = "2026-11-26T10:00:00.123Z";

/// The moment `TS` names.
fn taken_at() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(1_795_687_200_123_000_000).unwrap()
}
/// Reason classes a rejection may name (the prefix of `x-wsnotify-error`).
const REASONS: &[&str] = &[
    "too_large:",
    "not_json:",
    "not_an_object:",
    "wrong_type:",
    "invalid_field:",
    "missing_field:",
    "no_target:",
    "two_targets:",
    "reserved_type:",
];

fn cases() -> u32 {
    std::env::var("WSNOTIFY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Runs `f` on a thread with a large stack: proptest's nested strategy types are deep in a
/// debug build. (The stack a *gateway* thread needs is checked separately, with 2 MiB.)
fn big_stack(f: impl FnOnce() + Send + 'static) {
    std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(f)
        .unwrap()
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

fn runner() -> TestRunner {
    TestRunner::new(PtConfig {
        cases: cases(),
        failure_persistence: None,
        // The mutation property starts from valid envelopes (about 2 in 5 generated).
        max_local_rejects: cases().saturating_mul(20),
        // Shrinking a failure is worth a little time; the input is printed either way.
        max_shrink_iters: 2000,
        ..PtConfig::default()
    })
}

/// How one input ended.
#[derive(Debug)]
enum Ending {
    /// Accepted: (message_type, recipients as user ids / None for broadcast, id, data as sent
    /// to browsers).
    Accepted {
        message_type: String,
        recipients: Vec<Option<String>>,
        id: Option<String>,
        data: Value,
    },
    Rejected(String),
}

#[derive(Default)]
struct Tally {
    runs: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    frames: AtomicU64,
    /// Accepted by the gateway but not parseable by serde_json (data then checked for validity
    /// only, not equality).
    lenient: AtomicU64,
    /// Accepted with a number written differently (same value).
    renumbered: AtomicU64,
    /// Refused as not JSON although serde_json reads it (numbers beyond 64 bits).
    stricter: AtomicU64,
    /// Rejections by reason class.
    reasons: parking_lot::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn report(&self, name: &str) {
        eprintln!(
            "fuzz {name}: {} inputs, {} accepted ({} frames checked), {} rejected with a reason; {} accepted that serde_json refuses, {} refused that serde_json reads, {} with a number re-encoded",
            self.runs.load(Ordering::Relaxed),
            self.accepted.load(Ordering::Relaxed),
            self.frames.load(Ordering::Relaxed),
            self.rejected.load(Ordering::Relaxed),
            self.lenient.load(Ordering::Relaxed),
            self.stricter.load(Ordering::Relaxed),
            self.renumbered.load(Ordering::Relaxed),
        );
        eprintln!(
            "fuzz {name}: rejections by reason {:?}",
            self.reasons.lock()
        );
    }
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

/// Parses `body` as the gateway does and, if accepted, encodes every frame a recipient would
/// get and checks it. The core of every property.
fn check(body: &[u8], max: usize, tally: &Tally) -> Result<Ending, TestCaseError> {
    // One parser per thread, reused like the consumer's: stale state from an earlier input
    // must not leak into the next.
    thread_local! {
        static PARSER: std::cell::RefCell<Parser> = std::cell::RefCell::new(Parser::new());
    }
    PARSER.with(|p| check_with(&mut p.borrow_mut(), body, max, tally))
}

fn check_with(
    parser: &mut Parser,
    body: &[u8],
    max: usize,
    tally: &Tally,
) -> Result<Ending, TestCaseError> {
    tally.runs.fetch_add(1, Ordering::Relaxed);
    let before = body.to_vec();
    let parsed = parser.parse(body, max);
    if body != before.as_slice() {
        return Err(fail("parse changed the body".into()));
    }
    let env = match parsed {
        Err(invalid) => {
            let reason = invalid.to_string();
            if reason.trim().is_empty() {
                return Err(fail("empty rejection reason".into()));
            }
            if !REASONS.iter().any(|p| reason.starts_with(p)) {
                return Err(fail(format!("reason names no known class: {reason}")));
            }
            if reason.len() > 512 {
                return Err(fail(format!("reason too long for a header: {reason}")));
            }
            tally.rejected.fetch_add(1, Ordering::Relaxed);
            let class = reason.split(':').next().unwrap_or_default();
            let class = match class {
                "invalid_field" | "missing_field" => {
                    // "invalid_field: payload.user_id must …" → "invalid_field payload.user_id"
                    let field = reason.split_whitespace().nth(1).unwrap_or_default();
                    format!("{class} {field}")
                }
                _ => class.to_owned(),
            };
            *tally.reasons.lock().entry(class).or_default() += 1;
            return Ok(Ending::Rejected(reason));
        }
        Ok(env) => env,
    };
    tally.accepted.fetch_add(1, Ordering::Relaxed);
    let id = env.id.as_deref().map(str::to_owned);
    let message_type = env.message_type.to_string();
    let recipients: Vec<Option<String>> = match &env.target {
        Target::User(u) => vec![Some(u.to_string())],
        Target::Users(list) => list.iter().map(|u| Some(u.to_string())).collect(),
        Target::Broadcast => vec![None],
    };
    // The gateway's whole path: taken in, packed into a fan-out record, read back by a replica.
    let taken = Notification::from_envelope(env, body, false, taken_at());
    let mut record = RecordBuilder::default();
    record.push(&taken);
    let n = match record::decode(record.finish(Origin { taker: 1, seq: 1 }).into()) {
        Ok(Record::Notifications(_, mut list)) if list.len() == 1 => list.remove(0),
        other => return Err(fail(format!("the record did not round-trip: {other:?}"))),
    };
    if n != taken {
        return Err(fail("the record changed the notification".into()));
    }
    let frame_id = n.id.to_string();
    let mut frame_data = Value::Null;
    for user in &recipients {
        let f = n.frame(user.as_deref());
        tally.frames.fetch_add(1, Ordering::Relaxed);
        let wire = f.wire();
        if wire.first() != Some(&0x81) {
            return Err(fail(format!("not a final text frame: {:x?}", &wire[..2])));
        }
        let json = f.json();
        let declared = match wire[1] & 0x7f {
            126 => usize::from(u16::from_be_bytes([wire[2], wire[3]])),
            127 => u64::from_be_bytes(wire[2..10].try_into().unwrap()) as usize,
            n => usize::from(n),
        };
        if declared != json.len() || wire.len() != json.len() + (wire.len() - json.len()) {
            return Err(fail(
                "frame length header does not match its payload".into(),
            ));
        }
        if std::str::from_utf8(json).is_err() {
            return Err(fail("frame payload is not UTF-8".into()));
        }
        let v: Value = match serde_json::from_slice(json) {
            Ok(v) => v,
            // serde_json stops at depth 128; the gateway allows 1024 (browsers more). Check
            // such a frame with simd-json instead, and its fields no further.
            Err(e) if e.to_string().contains("recursion limit") => {
                simd_json::to_owned_value(&mut json.to_vec())
                    .map_err(|e| fail(format!("deep frame is not valid JSON: {e}")))?;
                tally.lenient.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(e) => {
                return Err(fail(format!(
                    "frame is not valid JSON ({e}): {}",
                    String::from_utf8_lossy(json)
                )));
            }
        };
        let obj = v
            .as_object()
            .ok_or_else(|| fail("frame is not an object".into()))?;
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let want_keys: &[&str] = if user.is_some() {
            &["data", "id", "timestamp", "type", "user_id"]
        } else {
            &["data", "id", "timestamp", "type"]
        };
        if keys != want_keys {
            return Err(fail(format!("frame keys {keys:?}")));
        }
        if v["id"] != frame_id.as_str()
            || v["type"] != *message_type
            || v["timestamp"] != TS
            || user.as_deref().is_some_and(|u| v["user_id"] != u)
        {
            return Err(fail(format!("frame fields changed: {v}")));
        }
        frame_data = v["data"].clone();
    }
    Ok(Ending::Accepted {
        message_type,
        recipients,
        id,
        data: frame_data,
    })
}

/// JSON equality where numbers compare by value: the gateway re-encodes `data`, so `1E+2`
/// may come out as `100.0` and `-0` as `0` (see RELIABILITY.md) — the same number to any
/// JSON reader, though not the same text.
fn json_eq(a: &Value, b: &Value, renumbered: &mut bool) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            if x == y {
                return true;
            }
            let same = match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(i), Some(j), _, _) => i == j,
                (_, _, Some(i), Some(j)) => i == j,
                _ => x.as_f64() == y.as_f64(),
            };
            *renumbered |= same;
            same
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b, renumbered))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w, renumbered)))
        }
        _ => a == b,
    }
}

/// For accepted input that serde_json can read too: the frame's `data` equals the payload's.
fn same_data_as_serde(body: &[u8], ending: &Ending, tally: &Tally) -> Result<(), TestCaseError> {
    let data = match ending {
        Ending::Accepted { data, .. } => data,
        Ending::Rejected(reason) => {
            if reason.starts_with("not_json:") && serde_json::from_slice::<Value>(body).is_ok() {
                tally.stricter.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
    };
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => {
            let want = v["payload"].get("data").cloned().unwrap_or(Value::Null);
            let mut renumbered = false;
            if !json_eq(data, &want, &mut renumbered) {
                return Err(fail(format!("data changed: sent {want}, framed {data}")));
            }
            if renumbered {
                tally.renumbered.fetch_add(1, Ordering::Relaxed);
            }
        }
        Err(_) => {
            tally.lenient.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

// ---- generators ------------------------------------------------------------------------

/// Any string, control characters and astral planes included.
fn any_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter),
        "[a-z0-9-]{0,12}",
        Just(String::new()),
        Just("\"\\\u{0}\u{1f}\u{7f}\u{2028}\u{2029}\u{feff}</script>".to_owned()),
    ]
}

/// A string of exactly `n` bytes (multi-byte characters when `wide`).
fn sized(n: usize, wide: bool) -> String {
    if wide && n >= 2 {
        let mut s = "é".repeat(n / 2);
        if n % 2 == 1 {
            s.push('x');
        }
        s
    } else {
        "x".repeat(n)
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN/inf", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just(0.1),
            Just(-0.0),
            Just(5e-324),
            Just(f64::MAX),
            Just(f64::MIN_POSITIVE),
            Just(1e21),
            Just(123_456_789.123_456_79)
        ]
        .prop_map(Value::from),
        any_string(24).prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(any_string(12), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field that should be there: mostly valid, sometimes missing, null or of the wrong type.
fn wanted(valid: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        40 => valid.prop_map(Some),
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => json_leaf().prop_map(Some),
        1 => json_value().prop_map(Some),
    ]
    .boxed()
}

/// A field that should not be there: mostly absent or null, sometimes present (valid or not).
fn unwanted(valid: BoxedStrategy<Value>) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        30 => Just(None),
        3 => Just(Some(Value::Null)),
        1 => valid.prop_map(Some),
        1 => json_leaf().prop_map(Some),
    ]
    .boxed()
}

fn user_id_value() -> BoxedStrategy<Value> {
    prop_oneof![
        12 => "[a-z0-9-]{1,12}".prop_map(Value::from),
        2 => any_string(40).prop_map(Value::from),
        1 => (prop_oneof![Just(0usize), Just(1), Just(127), Just(128), Just(129), Just(300)], any::<bool>())
            .prop_map(|(n, wide)| Value::from(sized(n, wide))),
    ]
    .boxed()
}

fn short_text(limit: usize) -> BoxedStrategy<Value> {
    prop_oneof![
        12 => "[a-z_]{1,16}".prop_map(Value::from),
        2 => any_string(40).prop_map(Value::from),
        1 => (prop_oneof![Just(0usize), Just(1), Just(limit - 1), Just(limit), Just(limit + 1)], any::<bool>())
            .prop_map(|(n, wide)| Value::from(sized(n, wide))),
    ]
    .boxed()
}

/// A structure-aware envelope: mostly well-formed, every field sometimes missing, null, of
/// the wrong type or at its size limits, plus unknown fields.
fn envelope() -> impl Strategy<Value = Value> {
    let users = prop_oneof![
        6 => proptest::collection::vec(user_id_value(), 1..6).prop_map(Value::Array),
        1 => Just(json!([])),
        1 => proptest::collection::vec(json_leaf(), 1..4).prop_map(Value::Array),
        1 => Just(json!(["dup", "dup", "other", "dup"])),
    ]
    .boxed();
    let broadcast = prop_oneof![
        6 => Just(json!(true)),
        2 => Just(json!(false)),
        1 => prop_oneof![Just(json!("true")), Just(json!(1)), Just(json!([true]))],
    ]
    .boxed();
    // Which target the message means to have; the other two are mostly absent.
    let targets = (
        0u8..3,
        (wanted(user_id_value()), unwanted(user_id_value())),
        (wanted(users.clone()), unwanted(users)),
        (wanted(broadcast.clone()), unwanted(broadcast)),
    )
        .prop_map(|(mode, (u1, u2), (l1, l2), (b1, b2))| match mode {
            0 => (u1, l2, b2),
            1 => (u2, l1, b2),
            _ => (u2, l2, b1),
        });
    let id = prop_oneof![
        3 => Just(None),
        3 => short_text(64).prop_map(Some),
        1 => json_leaf().prop_map(Some),
    ];
    let data = prop_oneof![
        1 => Just(None),
        8 => json_value().prop_map(Some),
    ];
    let message_type = prop_oneof![
        20 => wanted(short_text(64)),
        // The prefix the gateway keeps for its own frames.
        1 => Just(Some(json!("wsnotify.recovery"))),
    ];
    let payload = (
        message_type,
        targets,
        data,
        id,
        proptest::collection::btree_map("[a-z]{1,8}", json_leaf(), 0..3),
    )
        .prop_map(|(mt, (user, users, bc), data, id, extra)| {
            let mut p = serde_json::Map::new();
            for (k, v) in extra {
                p.insert(format!("x_{k}"), v);
            }
            for (k, v) in [
                ("message_type", mt),
                ("user_id", user),
                ("user_ids", users),
                ("broadcast", bc),
                ("data", data),
                ("id", id),
            ] {
                if let Some(v) = v {
                    p.insert(k.to_owned(), v);
                }
            }
            Value::Object(p)
        });
    let ty = prop_oneof![
        40 => Just(Some(json!("websocket_notification"))),
        1 => Just(None),
        1 => Just(Some(json!("Websocket_Notification"))),
        1 => json_leaf().prop_map(Some),
    ];
    let payload = prop_oneof![
        40 => payload.prop_map(Some),
        1 => Just(None),
        1 => json_leaf().prop_map(Some),
    ];
    let top = (
        ty,
        payload,
        proptest::collection::btree_map("[a-z]{1,6}", json_leaf(), 0..2),
    )
        .prop_map(|(ty, payload, extra)| {
            let mut m: serde_json::Map<String, Value> = extra
                .into_iter()
                .map(|(k, v)| (format!("x_{k}"), v))
                .collect();
            if let Some(t) = ty {
                m.insert("type".into(), t);
            }
            if let Some(p) = payload {
                m.insert("payload".into(), p);
            }
            Value::Object(m)
        });
    prop_oneof![40 => top, 1 => json_value()]
}

/// Contract §1 as a model: what the gateway must accept, independent of its code.
/// `Ok((message_type, recipients, id, data))` or `Err(())` for a message it must refuse.
type Model = (String, Vec<Option<String>>, Option<String>, Value);

fn model(v: &Value, body_len: usize, max: usize) -> Result<Model, ()> {
    if body_len > max {
        return Err(());
    }
    let top = v.as_object().ok_or(())?;
    if top.get("type") != Some(&json!("websocket_notification")) {
        return Err(());
    }
    let p = top.get("payload").and_then(Value::as_object).ok_or(())?;
    let present = |k: &str| p.get(k).filter(|v| !v.is_null());
    let text = |v: &Value, max: usize| -> Result<String, ()> {
        match v.as_str() {
            Some(s) if !s.is_empty() && s.len() <= max => Ok(s.to_owned()),
            _ => Err(()),
        }
    };
    let message_type = text(p.get("message_type").ok_or(())?, 64)?;
    if message_type.starts_with("wsnotify.") {
        return Err(());
    }
    let user = present("user_id").map(|v| text(v, 128)).transpose()?;
    let users = match present("user_ids") {
        None => None,
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut out: Vec<String> = Vec::new();
            let mut seen = std::collections::HashSet::new();
            for u in list {
                let u = text(u, 128)?;
                if seen.insert(u.clone()) {
                    out.push(u);
                }
            }
            Some(out)
        }
        Some(_) => return Err(()),
    };
    let broadcast = match present("broadcast") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(()),
    };
    let recipients = match (user, users, broadcast) {
        (Some(u), None, false) => vec![Some(u)],
        (None, Some(list), false) => list.into_iter().map(Some).collect(),
        (None, None, true) => vec![None],
        _ => return Err(()),
    };
    let id = present("id").map(|v| text(v, 64)).transpose()?;
    let data = p.get("data").cloned().unwrap_or(Value::Null);
    Ok((message_type, recipients, id, data))
}

// ---- properties ------------------------------------------------------------------------

#[test]
fn arbitrary_bytes_never_panic_and_every_rejection_has_a_reason() {
    let _load = light_blocking();
    big_stack(|| {
        let tally = Tally::default();
        // Raw bytes, and bytes drawn from JSON's alphabet (to get past the first character).
        let alphabet: Vec<u8> =
            b"{}[]\":,0123456789.eE+- truefalsnul\\/bfnrtu\x00\xff\xc3\xa9".to_vec();
        let strategy = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..1024),
            proptest::collection::vec(proptest::sample::select(alphabet), 0..512),
        ];
        runner()
            .run(&strategy, |body| {
                let max = if body.len().is_multiple_of(7) {
                    64
                } else {
                    MAX
                };
                let ending = check(&body, max, &tally)?;
                same_data_as_serde(&body, &ending, &tally)
            })
            .unwrap();
        tally.report("arbitrary bytes");
    });
}

#[test]
fn structured_envelopes_are_accepted_exactly_when_the_contract_says() {
    let _load = light_blocking();
    big_stack(|| {
        let tally = Tally::default();
        runner()
            .run(
                &(envelope(), proptest::bool::weighted(0.05)),
                |(v, tight)| {
                    let body = serde_json::to_vec(&v).unwrap();
                    // Sometimes a limit just under the body's size: too_large must win.
                    let max = if tight && body.len() > 64 {
                        body.len() - 1
                    } else {
                        MAX
                    };
                    let ending = check(&body, max, &tally)?;
                    match (model(&v, body.len(), max), &ending) {
                        (Err(()), Ending::Rejected(_)) => Ok(()),
                        (
                            Ok(want),
                            Ending::Accepted {
                                message_type,
                                recipients,
                                id,
                                data,
                            },
                        ) => {
                            let got = (
                                message_type.clone(),
                                recipients.clone(),
                                id.clone(),
                                data.clone(),
                            );
                            if got == want {
                                Ok(())
                            } else {
                                Err(fail(format!(
                                    "accepted as {got:?}, the contract says {want:?}"
                                )))
                            }
                        }
                        (want, got) => Err(fail(format!(
                            "contract says {}, gateway {got:?} for {v}",
                            if want.is_ok() { "accept" } else { "reject" }
                        ))),
                    }
                },
            )
            .unwrap();
        tally.report("structured envelopes");
        assert!(tally.accepted.load(Ordering::Relaxed) > u64::from(cases()) / 10);
        assert!(tally.rejected.load(Ordering::Relaxed) > u64::from(cases()) / 10);
    });
}

/// Small edits of a valid body: a byte flipped, inserted, removed, or the body cut short.
#[test]
fn mutated_envelopes_never_panic_and_frames_stay_valid_json() {
    let _load = light_blocking();
    big_stack(|| {
        let tally = Tally::default();
        let edits =
            proptest::collection::vec((0u8..4, any::<prop::sample::Index>(), any::<u8>()), 1..4);
        let valid = envelope().prop_filter("a valid envelope", |v| {
            let len = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
            model(v, len, MAX).is_ok()
        });
        runner()
            .run(&(valid, edits), |(v, edits)| {
                let mut body = serde_json::to_vec(&v).unwrap();
                for (kind, at, byte) in edits {
                    if body.is_empty() {
                        break;
                    }
                    let i = at.index(body.len());
                    match kind {
                        0 => body[i] = byte,
                        1 => body.insert(i, byte),
                        2 => {
                            body.remove(i);
                        }
                        _ => body.truncate(i),
                    }
                }
                let ending = check(&body, MAX, &tally)?;
                same_data_as_serde(&body, &ending, &tally)
            })
            .unwrap();
        tally.report("mutated envelopes");
    });
}

/// Long `user_ids` lists (up to 10,000 entries, many repeated, some written with escapes):
/// each recipient gets one frame, in first-seen order. The gateway drops repeats in linear
/// time (a 64 KiB body holds ~10,000 ids; comparing each with all before it was quadratic
/// work on the ingest task); `benches/envelope.rs` times it.
#[test]
fn long_user_id_lists_are_deduplicated_in_first_seen_order() {
    let _load = light_blocking();
    big_stack(|| {
        let tally = Tally::default();
        // Each case builds and checks up to 10,000 frames.
        let mut config = TestRunner::new(PtConfig {
            cases: (cases() / 20).max(10),
            failure_persistence: None,
            max_shrink_iters: 200,
            ..PtConfig::default()
        });
        let lists = (1usize..=10_000, 1u32..=10_000).prop_flat_map(|(len, distinct)| {
            proptest::collection::vec((0..distinct, any::<bool>()), len)
        });
        config
            .run(&lists, |picks| {
                // Escaped ids ("\u0075…" is "u…") reach the gateway as owned strings, plain
                // ones as borrowed: the two must compare equal.
                let listed: Vec<String> = picks
                    .iter()
                    .map(|(i, escaped)| {
                        if *escaped {
                            format!("\"\\u0075{i}\"")
                        } else {
                            format!("\"u{i}\"")
                        }
                    })
                    .collect();
                let body = format!(
                    r#"{{"type":"websocket_notification","payload":{{"message_type":"m","user_ids":[{}]}}}}"#,
                    listed.join(",")
                );
                let v: Value = serde_json::from_str(&body).unwrap();
                let want = model(&v, body.len(), 1 << 20).map_err(|()| fail("model".into()))?;
                match check(body.as_bytes(), 1 << 20, &tally)? {
                    Ending::Accepted { recipients, .. } if recipients == want.1 => {}
                    other => {
                        return Err(fail(format!(
                            "{} ids ({} distinct): {other:?}",
                            picks.len(),
                            want.1.len()
                        )));
                    }
                }
                Ok(())
            })
            .unwrap();
        tally.report("long user_ids lists");
    });
}

/// JSON texts that parsers disagree on, as `data`: each is forwarded as equal JSON or the
/// message is rejected — never turned into something that is not JSON.
#[test]
fn tricky_json_in_data_is_forwarded_unchanged_or_rejected() {
    let _load = light_blocking();
    big_stack(|| {
        let tally = Tally::default();
        let tricky: Vec<String> = [
            "1e400",
            "-1e400",
            "1e-400",
            "-0",
            "-0.0",
            "0e0",
            "1E+2",
            "123456789012345678901234567890",
            "-9223372036854775809",
            "18446744073709551615",
            "18446744073709551616",
            "4.9406564584124654e-324",
            "2.2250738585072011e-308",
            "1.7976931348623157e308",
            "0.1000000000000000055511151231257827",
            "\"\\ud83d\\ude00\"",
            "\"\\ud800\"",
            "\"\\udc00\\ud800\"",
            "\"\\u0000\"",
            "\"\\/\\b\\f\\n\\r\\t\"",
            "\"\u{2028}\u{2029}\"",
            "\"\\u00e9\"",
            "\"é\"",
            "{\"a\":1,\"a\":2}",
            "{\"\":\"\"}",
            "[]",
            "{}",
            "[[]]",
            "true",
            "null",
            "\"\"",
            "01",
            "1.",
            ".5",
            "+1",
            "0x10",
            "NaN",
            "Infinity",
            "[1,]",
            "{\"a\":1,}",
            "'x'",
            "\"\t\"",
            "\"\\x41\"",
            "\"\\u12\"",
            "tru",
            "[1 2]",
            "{\"a\" 1}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let strategy = (
            proptest::sample::select(tricky.clone()),
            proptest::collection::vec(proptest::sample::select(tricky), 0..3),
        );
        let run = |data: String| -> Result<(), TestCaseError> {
            let body = format!(
                r#"{{"type":"websocket_notification","payload":{{"broadcast":true,"message_type":"m","data":{data}}}}}"#
            );
            let ending = check(body.as_bytes(), MAX, &tally)?;
            same_data_as_serde(body.as_bytes(), &ending, &tally)
        };
        runner()
            .run(&strategy, |(first, rest)| {
                // Alone, and nested with others in an array and an object.
                run(first.clone())?;
                let all: Vec<String> = std::iter::once(first).chain(rest).collect();
                run(format!("[{}]", all.join(",")))?;
                let obj: Vec<String> = all
                    .iter()
                    .enumerate()
                    .map(|(i, d)| format!("\"k{i}\":{d}"))
                    .collect();
                run(format!("{{{}}}", obj.join(",")))
            })
            .unwrap();
        tally.report("tricky JSON");
    });
}

/// Nesting is bounded by the parser (depth 1024), so a hostile message cannot overflow the
/// stack of the thread that parses and encodes it: the gateway's side runs here on a thread
/// with 2 MiB of stack, like a tokio worker, and must either reject the message or produce
/// exactly the frame the nesting calls for.
#[test]
fn deep_nesting_is_forwarded_up_to_the_limit_and_rejected_beyond_it() {
    let _load = light_blocking();
    for depth in [100usize, 500, 1000, 1022, 1023, 1024, 1025, 2000, 20_000] {
        for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
            let data = format!("{}1{}", open.repeat(depth), close.repeat(depth));
            let body = format!(
                r#"{{"type":"websocket_notification","payload":{{"broadcast":true,"message_type":"m","data":{data}}}}}"#
            );
            let gateway_side = std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || {
                    let mut parser = Parser::new();
                    let mut env = parser.parse(body.as_bytes(), 1 << 20)?;
                    env.id = Some("i".into());
                    let n = Notification::from_envelope(env, body.as_bytes(), false, taken_at());
                    Ok(n.frame(None).json().to_vec())
                })
                .unwrap()
                .join()
                .expect("no stack overflow on a 2 MiB thread");
            match gateway_side {
                Ok(json) => {
                    assert!(depth <= 1024, "depth {depth} ({open}) must be rejected");
                    let want =
                        format!(r#"{{"id":"i","type":"m","timestamp":"{TS}","data":{data}}}"#);
                    assert!(
                        json == want.as_bytes(),
                        "depth {depth} ({open}): frame differs"
                    );
                }
                Err(wsnotify::envelope::Invalid(reason)) => {
                    assert!(
                        depth > 1000,
                        "depth {depth} ({open}) must be accepted: {reason}"
                    );
                    assert!(reason.starts_with("not_json:"), "{reason}");
                }
            }
        }
    }
}

/// A fuzzed sample through the real broker and gateway: every body is delivered or
/// dead-lettered, body unchanged, with a reason; the consumer never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_through_the_broker_are_delivered_or_dead_lettered_with_a_reason() {
    use crate::support::{Broker, Gateway, spawn_reader, unique, within};
    use proptest::strategy::ValueTree;
    let _load = light().await;

    let q = unique("fuzz_e2e");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_MESSAGE_BYTES", "4096")]).await;
    let mut listener = spawn_reader(gw.connect_user("fuzz-user").await);

    // A deterministic sample: structured envelopes (targets rewritten to users who are or are
    // not connected), mutated bodies and raw bytes.
    let mut rng = TestRunner::deterministic();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let env = envelope();
    let raw = proptest::collection::vec(any::<u8>(), 0..300);
    while bodies.len() < 300 {
        let mut v = env.new_tree(&mut rng).unwrap().current();
        if let Some(p) = v.get_mut("payload").and_then(Value::as_object_mut) {
            let (key, to) = match bodies.len() % 3 {
                0 => ("user_id", json!("fuzz-user")),
                1 => ("user_ids", json!(["nobody", "fuzz-user"])),
                _ => ("broadcast", json!(true)),
            };
            if p.contains_key(key) || bodies.len().is_multiple_of(2) {
                p.remove("user_id");
                p.remove("user_ids");
                p.remove("broadcast");
                p.insert(key.into(), to);
            }
        }
        let mut body = serde_json::to_vec(&v).unwrap();
        if bodies.len() % 5 == 4 && !body.is_empty() {
            let i = body.len() / 2;
            body[i] ^= 0x20;
        }
        if bodies.len() % 10 == 9 {
            body = raw.new_tree(&mut rng).unwrap().current();
        }
        bodies.push(body);
    }
    let tally = Tally::default();
    let mut expect_frames = Vec::new();
    let mut expect_dead = Vec::new();
    // The replicas drop a message whose publisher id was seen before (a publisher's retry).
    let mut ids = std::collections::HashSet::new();
    for body in &bodies {
        match check(body, 4096, &tally).unwrap() {
            Ending::Rejected(reason) => expect_dead.push((body.clone(), reason)),
            Ending::Accepted {
                recipients,
                data,
                message_type,
                id,
            } => {
                if id.is_some_and(|id| !ids.insert(id)) {
                    continue;
                }
                if recipients
                    .iter()
                    .any(|r| r.as_deref().is_none_or(|u| u == "fuzz-user"))
                {
                    expect_frames.push((message_type, data));
                }
            }
        }
    }
    for body in &bodies {
        broker.publish(&q, body).await;
    }
    // Frames arrive in publish order, each with the data as published.
    for (i, (message_type, data)) in expect_frames.iter().enumerate() {
        let (_, f) = within("a fuzzed frame", listener.recv())
            .await
            .expect("listener still connected");
        assert_eq!(&f["type"], message_type.as_str(), "frame {i}");
        assert_eq!(&f["data"], data, "frame {i}");
    }
    let dead = broker.take(&format!("{q}.dead"), expect_dead.len()).await;
    for ((headers, body), (want_body, want_reason)) in dead.iter().zip(&expect_dead) {
        assert_eq!(body, want_body, "dead-lettered body unchanged, in order");
        let reason = headers
            .as_ref()
            .and_then(|h| {
                h.get(&"x-wsnotify-error".try_into().unwrap())
                    .map(|v| v.to_string())
            })
            .unwrap_or_default();
        assert!(
            reason.contains(want_reason.split(':').next().unwrap()),
            "header {reason:?} should name {want_reason:?}"
        );
    }
    assert_eq!(broker.count(&q).await, 0, "nothing left behind");
    eprintln!(
        "fuzz through the broker: {} bodies, {} frames delivered to the listener, {} dead-lettered with a reason",
        bodies.len(),
        expect_frames.len(),
        expect_dead.len()
    );
}
