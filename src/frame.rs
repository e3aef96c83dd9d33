//! The frame browsers receive (contract §3), encoded once per message and shared.
//!
//! ```json
//! {"id":"0193…","type":"welcome","user_id":"3f0c…","timestamp":"2026-11-26T10:00:00.123Z","data":{…}}
//! ```
//!
//! A [`Frame`] holds the complete WebSocket wire bytes — header and JSON payload. Frames from a
//! server are never masked (RFC 6455 §5.1), so these bytes are identical for every recipient:
//! fan-out clones a refcounted [`Bytes`] and each connection hands the same memory to
//! `writev(2)`. Nothing is copied or re-encoded per connection.
//!
//! `user_id` is the *receiving* user's id, so a message to several users yields one frame per
//! user (all of that user's connections share it); a broadcast yields one frame in total. The
//! parts around it are encoded once per notification ([`crate::notification`]).
//!
//! This module must not know about connections or the broker: it turns a notification's parts
//! into the bytes a socket gets.

use bytes::{Buf, Bytes};
use simd_json::prelude::Writable;
use time::OffsetDateTime;
use time::macros::format_description;

/// Room reserved in front of the JSON for the longest WebSocket header (2 + 8 bytes).
const HEADER_ROOM: usize = 10;
/// FIN bit + text opcode.
const TEXT_FIN: u8 = 0x81;

/// A server ping with an empty payload, ready to write.
pub const PING: &[u8] = &[0x89, 0x00];

/// Complete wire bytes of one text frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Bytes);

impl Frame {
    /// The bytes to write to the socket.
    pub fn wire(&self) -> &Bytes {
        &self.0
    }

    /// The JSON payload (the frame without its WebSocket header): what a browser's
    /// `event.data` holds. The gateway itself only ever writes [`Frame::wire`]; this is for
    /// checks (the fuzz suite compares it with the contract's frame).
    pub fn json(&self) -> &[u8] {
        let header = match self.0.get(1).map(|b| b & 0x7f) {
            Some(126) => 4,
            Some(127) => 10,
            _ => 2,
        };
        &self.0[header.min(self.0.len())..]
    }
}

/// A text frame being written: room for the WebSocket header, then the JSON payload.
/// [`FrameBuf::finish`] writes the header in front without moving the payload.
pub struct FrameBuf(Vec<u8>);

impl FrameBuf {
    /// A buffer for a payload of about `json_len` bytes.
    pub fn with_capacity(json_len: usize) -> FrameBuf {
        let mut buf = Vec::with_capacity(HEADER_ROOM + json_len);
        buf.resize(HEADER_ROOM, 0);
        FrameBuf(buf)
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Appends `s` as a JSON string literal.
    pub fn push_str_literal(&mut self, s: &str) {
        write_json_str(&mut self.0, s);
    }

    pub fn finish(self) -> Frame {
        finish(self.0)
    }
}

/// Writes the header right-aligned into the reserved room and drops the unused front.
fn finish(mut buf: Vec<u8>) -> Frame {
    let len = buf.len() - HEADER_ROOM;
    let start = if len < 126 {
        buf[HEADER_ROOM - 2] = TEXT_FIN;
        buf[HEADER_ROOM - 1] = len as u8;
        HEADER_ROOM - 2
    } else if len <= usize::from(u16::MAX) {
        buf[HEADER_ROOM - 4] = TEXT_FIN;
        buf[HEADER_ROOM - 3] = 126;
        buf[HEADER_ROOM - 2..HEADER_ROOM].copy_from_slice(&(len as u16).to_be_bytes());
        HEADER_ROOM - 4
    } else {
        buf[0] = TEXT_FIN;
        buf[1] = 127;
        buf[2..HEADER_ROOM].copy_from_slice(&(len as u64).to_be_bytes());
        0
    };
    let mut bytes = Bytes::from(buf);
    bytes.advance(start);
    Frame(bytes)
}

/// Encodes a parsed `data` value (or `null`) as JSON.
pub fn encode_data(data: Option<&simd_json::BorrowedValue<'_>>, out: &mut Vec<u8>) {
    match data {
        // Writing into a Vec cannot fail.
        Some(v) => {
            let _ = v.write(out);
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// RFC 3339 UTC with milliseconds, as in the contract: `2026-11-26T10:00:00.123Z`.
pub fn timestamp(at: OffsetDateTime) -> String {
    let fmt =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    at.format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000Z"))
}

/// Appends `s` as a JSON string literal.
pub fn write_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &[u8]) -> Frame {
        let mut b = FrameBuf::with_capacity(json.len());
        b.push(json);
        b.finish()
    }

    #[test]
    fn header_lengths() {
        for len in [0usize, 125, 126, 65_535, 65_536, 200_000] {
            let json = format!("\"{}\"", "x".repeat(len));
            let f = text(json.as_bytes());
            assert_eq!(f.wire()[0], 0x81);
            assert_eq!(f.json(), json.as_bytes(), "len {len}");
            assert_eq!(
                f.wire().len() - json.len(),
                if json.len() < 126 {
                    2
                } else if json.len() <= 65_535 {
                    4
                } else {
                    10
                }
            );
        }
    }

    #[test]
    fn escapes_control_characters() {
        let mut out = Vec::new();
        write_json_str(&mut out, "a\u{1}\n\"\\é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\u{1}\n\"\\é");
    }

    #[test]
    fn timestamp_format() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_795_687_200_123_456_789).unwrap();
        assert_eq!(timestamp(t), "2026-11-26T10:00:00.123Z");
    }
}
