//! The task envelope backends publish (contract §1), parsed and validated.
//!
//! ```json
//! { "type": "websocket_notification",
//!   "payload": { "user_id": "3f0c…", "message_type": "welcome", "data": { "message": "Welcome!" } } }
//! ```
//!
//! Parsing uses simd-json's borrowed DOM over a caller-owned scratch buffer: strings in the
//! result point into that buffer, and `data` is never copied into owned values. simd-json
//! unescapes strings *in place*, so the buffer it parses is not the body any more; the caller
//! keeps the original body untouched for the dead-letter queue and hands [`Parser::parse`] a scratch
//! copy (one `memcpy`, no allocation once the buffer has grown).
//!
//! Every rejection is an [`Invalid`] whose text becomes the `x-wsnotify-error` header.
//!
//! This module must not know what happens to a valid envelope: it parses and says why an invalid
//! one is invalid (the reason a dead letter carries).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use simd_json::{BorrowedValue as Value, Buffers, StaticNode};

/// The only accepted envelope `type`.
pub const ENVELOPE_TYPE: &str = "websocket_notification";
/// Longest `message_type`, in bytes.
pub const MAX_MESSAGE_TYPE_BYTES: usize = 64;
/// Longest publisher-supplied `id`, in bytes.
pub const MAX_ID_BYTES: usize = 64;
/// Longest user id, in bytes (contract: opaque strings of 1–128 bytes).
pub const MAX_USER_ID_BYTES: usize = 128;
/// `message_type`s the gateway keeps for its own frames (contract §5: `wsnotify.recovery`).
pub const RESERVED_TYPE_PREFIX: &str = "wsnotify.";

/// Whom a notification is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    User(Cow<'a, str>),
    /// Deduplicated, in first-seen order.
    Users(Vec<Cow<'a, str>>),
    Broadcast,
}

/// A validated envelope, borrowing from the parsed buffer.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub message_type: Cow<'a, str>,
    pub target: Target<'a>,
    /// `None` when the payload has no `data` (the frame then carries `null`).
    pub data: Option<Value<'a>>,
    /// The publisher's message id, if it gave one.
    pub id: Option<Cow<'a, str>>,
}

/// Why a message was refused. `Display` is the `x-wsnotify-error` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

fn invalid(msg: impl Into<String>) -> Invalid {
    Invalid(msg.into())
}

/// Reusable parser state: simd-json's buffers and the scratch copy of the body.
#[derive(Default)]
pub struct Parser {
    buffers: Buffers,
    scratch: Vec<u8>,
}

impl Parser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Validates `body` (left unchanged) against the contract and the size limit.
    pub fn parse<'s>(&'s mut self, body: &[u8], max_bytes: usize) -> Result<Envelope<'s>, Invalid> {
        if body.len() > max_bytes {
            return Err(invalid(format!(
                "too_large: body is {} bytes, the limit is {max_bytes}",
                body.len()
            )));
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(body);
        let value =
            simd_json::value::borrowed::to_value_with_buffers(&mut self.scratch, &mut self.buffers)
                .map_err(|e| invalid(format!("not_json: {e}")))?;
        validate(value)
    }
}

fn validate(value: Value<'_>) -> Result<Envelope<'_>, Invalid> {
    let Value::Object(mut top) = value else {
        return Err(invalid("not_an_object: the body must be a JSON object"));
    };
    match top.get("type") {
        Some(Value::String(t)) if t == ENVELOPE_TYPE => {}
        Some(Value::String(_)) => {
            return Err(invalid(format!(
                "wrong_type: type must be \"{ENVELOPE_TYPE}\""
            )));
        }
        Some(_) => return Err(invalid("invalid_field: type must be a string")),
        None => return Err(invalid("missing_field: type")),
    }
    let payload = match top.remove("payload") {
        Some(Value::Object(p)) => p,
        Some(_) => return Err(invalid("invalid_field: payload must be an object")),
        None => return Err(invalid("missing_field: payload")),
    };
    let mut payload = *payload;

    let message_type = match payload.remove("message_type") {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_MESSAGE_TYPE_BYTES => s,
        Some(_) => {
            return Err(invalid(format!(
                "invalid_field: payload.message_type must be a non-empty string of at most {MAX_MESSAGE_TYPE_BYTES} bytes"
            )));
        }
        None => return Err(invalid("missing_field: payload.message_type")),
    };
    if message_type.starts_with(RESERVED_TYPE_PREFIX) {
        return Err(invalid(format!(
            "reserved_type: payload.message_type must not start with \"{RESERVED_TYPE_PREFIX}\" (reserved for the gateway's own frames)"
        )));
    }

    let user = match payload.remove("user_id") {
        None | Some(Value::Static(StaticNode::Null)) => None,
        Some(Value::String(s)) if valid_user_id(&s) => Some(s),
        Some(_) => {
            return Err(invalid(format!(
                "invalid_field: payload.user_id must be a string of 1 to {MAX_USER_ID_BYTES} bytes"
            )));
        }
    };
    let users = match payload.remove("user_ids") {
        None | Some(Value::Static(StaticNode::Null)) => None,
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut ids: Vec<Cow<'_, str>> = Vec::with_capacity(list.len());
            for v in *list {
                match v {
                    Value::String(s) if valid_user_id(&s) => ids.push(s),
                    _ => return Err(users_error()),
                }
            }
            dedupe(&mut ids);
            Some(ids)
        }
        Some(_) => return Err(users_error()),
    };
    let broadcast = match payload.remove("broadcast") {
        None | Some(Value::Static(StaticNode::Null)) => false,
        Some(Value::Static(StaticNode::Bool(b))) => b,
        Some(_) => {
            return Err(invalid(
                "invalid_field: payload.broadcast must be a boolean",
            ));
        }
    };
    let target = match (user, users, broadcast) {
        (Some(u), None, false) => Target::User(u),
        (None, Some(list), false) => Target::Users(list),
        (None, None, true) => Target::Broadcast,
        (None, None, false) => {
            return Err(invalid(
                "no_target: set exactly one of payload.user_id, payload.user_ids or payload.broadcast=true",
            ));
        }
        _ => {
            return Err(invalid(
                "two_targets: set exactly one of payload.user_id, payload.user_ids or payload.broadcast=true",
            ));
        }
    };

    let id = match payload.remove("id") {
        None | Some(Value::Static(StaticNode::Null)) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_ID_BYTES => Some(s),
        Some(_) => {
            return Err(invalid(format!(
                "invalid_field: payload.id must be a string of 1 to {MAX_ID_BYTES} bytes"
            )));
        }
    };
    let data = payload.remove("data");

    Ok(Envelope {
        message_type,
        target,
        data,
        id,
    })
}

/// Drops repeated ids, keeping the first of each in place, in linear time: a 64 KiB body can
/// list ~10,000 ids, and comparing each with all before it would be quadratic work on the
/// ingest task every replica waits on.
pub fn dedupe(ids: &mut Vec<Cow<'_, str>>) {
    if ids.len() < 2 {
        return;
    }
    let keep: Vec<bool> = {
        let mut seen = HashSet::with_capacity(ids.len());
        ids.iter().map(|id| seen.insert(id.as_ref())).collect()
    };
    let mut keep = keep.into_iter();
    ids.retain(|_| keep.next().unwrap_or(true));
}

fn users_error() -> Invalid {
    invalid(format!(
        "invalid_field: payload.user_ids must be a non-empty array of strings of 1 to {MAX_USER_ID_BYTES} bytes"
    ))
}

/// Contract: user ids are opaque strings of 1–128 bytes.
pub fn valid_user_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_USER_ID_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Target<'static>, Invalid> {
        let mut p = Parser::new();
        p.parse(s.as_bytes(), 1 << 16).map(|e| match e.target {
            Target::User(u) => Target::User(Cow::Owned(u.into_owned())),
            Target::Users(l) => {
                Target::Users(l.into_iter().map(|u| Cow::Owned(u.into_owned())).collect())
            }
            Target::Broadcast => Target::Broadcast,
        })
    }

    #[test]
    fn targets() {
        let t = parse(
            r#"{"type":"websocket_notification","payload":{"user_id":"u1","message_type":"m"}}"#,
        );
        assert_eq!(t, Ok(Target::User("u1".into())));
        let t = parse(
            r#"{"type":"websocket_notification","payload":{"user_ids":["a","b","a"],"message_type":"m"}}"#,
        );
        assert_eq!(t, Ok(Target::Users(vec!["a".into(), "b".into()])));
        let t = parse(
            r#"{"type":"websocket_notification","payload":{"broadcast":true,"message_type":"m"}}"#,
        );
        assert_eq!(t, Ok(Target::Broadcast));
    }

    #[test]
    fn ten_thousand_user_ids_are_deduplicated_in_first_seen_order() {
        // 10,000 distinct ids, each listed twice (the second time in reverse order).
        let ids: Vec<String> = (0..10_000).map(|i| format!("{i:x}")).collect();
        let mut listed: Vec<&str> = ids.iter().map(String::as_str).collect();
        listed.extend(ids.iter().rev().map(String::as_str));
        let body = serde_json::json!({"type": "websocket_notification",
            "payload": {"user_ids": listed, "message_type": "m"}})
        .to_string();
        let mut p = Parser::new();
        let env = p.parse(body.as_bytes(), 1 << 20).expect("valid");
        let Target::Users(got) = env.target else {
            panic!("a user list");
        };
        assert_eq!(got.len(), 10_000);
        assert!(
            got.iter().zip(&ids).all(|(a, b)| a == b),
            "first-seen order"
        );
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases = [
            ("nope", "not_json"),
            ("[]", "not_an_object"),
            (r#"{"type":"other","payload":{}}"#, "wrong_type"),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m"}}"#,
                "no_target",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","broadcast":false}}"#,
                "no_target",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","user_id":"u","broadcast":true}}"#,
                "two_targets",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","user_id":5}}"#,
                "payload.user_id",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"","user_id":"u"}}"#,
                "payload.message_type",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","user_ids":[]}}"#,
                "payload.user_ids",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","broadcast":"yes"}}"#,
                "payload.broadcast",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"m","broadcast":true,"id":7}}"#,
                "payload.id",
            ),
            (
                r#"{"type":"websocket_notification","payload":{"message_type":"wsnotify.recovery","broadcast":true}}"#,
                "reserved_type",
            ),
        ];
        for (body, want) in cases {
            let err = parse(body).expect_err(body);
            assert!(err.0.contains(want), "{body}: {err}");
        }
        let mut p = Parser::new();
        assert!(
            p.parse(&[b' '; 100], 10)
                .unwrap_err()
                .0
                .starts_with("too_large")
        );
    }

    #[test]
    fn body_is_left_intact() {
        let body = br#"{"type":"websocket_notification","payload":{"broadcast":true,"message_type":"m","data":"a\"b\u00e9"}}"#.to_vec();
        let copy = body.clone();
        let mut p = Parser::new();
        p.parse(&body, 1 << 16).expect("valid");
        assert_eq!(body, copy);
    }
}
