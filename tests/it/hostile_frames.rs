//! Hostile and odd client frames, written byte by byte on raw sockets, so each test says exactly
//! what goes on the wire. The rule for client data: the gateway is push-only, so well-formed
//! text and binary messages are read, counted (`wsnotify_client_messages_ignored_total`) and
//! ignored; anything RFC 6455 forbids fails the connection with the close code the RFC names
//! (1002 protocol error, 1007 invalid UTF-8, 1009 over `MAX_CLIENT_FRAME_BYTES`), after which
//! the gateway ends the TCP connection and forgets the socket.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const LIMIT: Duration = Duration::from_secs(10);
const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

/// (what, bytes sent after the handshake, close code expected)
fn violations() -> Vec<(String, Vec<u8>, u16)> {
    let mut cases: Vec<(String, Vec<u8>, u16)> = vec![
        (
            "unmasked text frame".into(),
            frame(true, 0, OP_TEXT, b"hello", None),
            1002,
        ),
        (
            "unmasked ping".into(),
            frame(true, 0, OP_PING, b"", None),
            1002,
        ),
        (
            "ping with 126-byte payload".into(),
            frame(true, 0, OP_PING, &[b'p'; 126], MASK),
            1002,
        ),
        (
            "close with 200-byte payload".into(),
            frame(true, 0, OP_CLOSE, &close_payload(1000, &[b'r'; 198]), MASK),
            1002,
        ),
        (
            "fragmented ping".into(),
            frame(false, 0, OP_PING, b"a", MASK),
            1002,
        ),
        (
            "continuation without a first fragment".into(),
            frame(true, 0, OP_CONT, b"orphan", MASK),
            1002,
        ),
        (
            "new text frame inside a fragmented message".into(),
            [
                frame(false, 0, OP_TEXT, b"part 1", MASK),
                frame(true, 0, OP_TEXT, b"not a continuation", MASK),
            ]
            .concat(),
            1002,
        ),
        (
            "close frame with a 1-byte payload".into(),
            frame(true, 0, OP_CLOSE, &[3], MASK),
            1002,
        ),
        (
            "invalid UTF-8 text".into(),
            frame(true, 0, OP_TEXT, &[b'o', b'k', 0xff, 0xfe], MASK),
            1007,
        ),
        (
            "overlong UTF-8 encoding".into(),
            frame(true, 0, OP_TEXT, &[0xc0, 0xaf], MASK),
            1007,
        ),
        (
            "UTF-16 surrogate encoded in UTF-8".into(),
            frame(true, 0, OP_TEXT, &[0xed, 0xa0, 0x80], MASK),
            1007,
        ),
        (
            "invalid UTF-8 split across fragments".into(),
            [
                frame(false, 0, OP_TEXT, "caf".as_bytes(), MASK),
                frame(false, 0, OP_CONT, &[0xc3], MASK),
                frame(true, 0, OP_CONT, &[0x28], MASK),
            ]
            .concat(),
            1007,
        ),
        (
            "close reason that is not UTF-8".into(),
            frame(true, 0, OP_CLOSE, &close_payload(1000, &[0xff]), MASK),
            1007,
        ),
        (
            "frame header declaring 2^63-1 bytes".into(),
            frame_with_len(true, 0, OP_BINARY, b"", MASK, i64::MAX as u64),
            1009,
        ),
        (
            "frame header declaring 2^64-1 bytes".into(),
            frame_with_len(true, 0, OP_BINARY, b"", MASK, u64::MAX),
            1009,
        ),
        (
            "fragmented message over the limit (5 x 300 bytes, limit 1024)".into(),
            (0..5)
                .map(|i| {
                    let op = if i == 0 { OP_TEXT } else { OP_CONT };
                    frame(i == 4, 0, op, &[b'a'; 300], MASK)
                })
                .collect::<Vec<_>>()
                .concat(),
            1009,
        ),
    ];
    for rsv in [1u8, 2, 4] {
        cases.push((
            format!("RSV bits {rsv:03b} without an extension"),
            frame(true, rsv, OP_TEXT, b"x", MASK),
            1002,
        ));
    }
    for op in [3u8, 4, 5, 6, 7] {
        cases.push((
            format!("reserved data opcode {op:#x}"),
            frame(true, 0, op, b"x", MASK),
            1002,
        ));
    }
    for op in [0xbu8, 0xc, 0xd, 0xe, 0xf] {
        cases.push((
            format!("reserved control opcode {op:#x}"),
            frame(true, 0, op, b"", MASK),
            1002,
        ));
    }
    // Close codes a peer must not send (RFC 6455 §7.4): answered with 1002.
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        cases.push((
            format!("close with forbidden code {code}"),
            frame(true, 0, OP_CLOSE, &close_payload(code, b""), MASK),
            1002,
        ));
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc6455_violations_fail_the_connection_with_the_right_code() {
    let _load = light().await;
    let q = unique("hostile_rfc");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CLIENT_FRAME_BYTES", "1024")]).await;
    // A bystander that must not notice anything.
    let mut bystander = gw.connect_user("bystander").await;

    let cases = violations();
    let n = cases.len();
    for (what, bytes, want) in cases {
        let mut s = raw_ws(gw.addr, "user_id=hostile").await;
        s.write_all(&bytes).await.expect("send");
        let ending = read_close(&mut s, LIMIT).await;
        assert_eq!(ending, Ending::Close(Some(want)), "{what}");
    }
    // Every failed socket is gone; the bystander is still served.
    gw.wait_metric("wsnotify_connections", 1).await;
    gw.wait_metric("wsnotify_users", 1).await;
    broker
        .publish_json(&q, &to_user("bystander", "still", json!(n)))
        .await;
    assert_eq!(next_frame(&mut bystander).await["data"], json!(n));
    eprintln!("hostile_frames: {n} RFC 6455 violations, each closed with the expected code");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_client_traffic_is_ignored_and_the_socket_keeps_working() {
    let _load = light().await;
    let q = unique("hostile_valid");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CLIENT_FRAME_BYTES", "1024")]).await;

    // A text frame pipelined in the same write as the upgrade request.
    let mut s = {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let mut req = upgrade_request("user_id=odd").into_bytes();
        req.extend_from_slice(&masked(OP_TEXT, b"sent with the request head"));
        s.write_all(&req).await.unwrap();
        let head = read_head(&mut s).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        s
    };
    let junk: Vec<u8> = (0..=255u8).cycle().skip(7).step_by(13).take(700).collect();
    let mut traffic = vec![
        masked(OP_BINARY, &junk),
        masked(OP_TEXT, "{\"not\": \"a command\"} ünïcödé 🚀".as_bytes()),
        masked(OP_TEXT, b""),
        masked(OP_BINARY, b""),
        // Fragmented text with a ping and a pong between the fragments (allowed: control
        // frames may be interleaved, RFC 6455 §5.4).
        frame(false, 0, OP_TEXT, b"frag", MASK),
        masked(OP_PONG, b"unsolicited"),
        frame(false, 0, OP_CONT, "ment".as_bytes(), MASK),
        // A multi-byte character split between fragments is fine.
        frame(false, 0, OP_CONT, &[0xc3], MASK),
        frame(true, 0, OP_CONT, &[0xa9], MASK),
    ];
    // One message in 1,000 empty fragments, then exactly the size limit in 4 fragments.
    traffic.push(frame(false, 0, OP_BINARY, b"", MASK));
    for _ in 0..998 {
        traffic.push(frame(false, 0, OP_CONT, b"", MASK));
    }
    traffic.push(frame(true, 0, OP_CONT, b"", MASK));
    for i in 0..4 {
        let op = if i == 0 { OP_TEXT } else { OP_CONT };
        traffic.push(frame(i == 3, 0, op, &[b'z'; 256], MASK));
    }
    let ignored = 1 + 4 + 1 + 1 + 1; // pipelined, four singles, fragmented, 1000-part, at-limit
    s.write_all(&traffic.concat()).await.unwrap();
    gw.wait_metric("wsnotify_client_messages_ignored_total", ignored)
        .await;

    // A ping is answered with a pong carrying the same payload.
    s.write_all(&masked(OP_PING, b"are you there?"))
        .await
        .unwrap();
    let pong = bounded(LIMIT, async {
        loop {
            let (fin, op, p) = read_frame(&mut s).await.expect("frame");
            if op == OP_PONG {
                assert!(fin);
                return p;
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(pong, b"are you there?");

    // Still registered and delivered to.
    broker
        .publish_json(&q, &to_user("odd", "after", json!("ok")))
        .await;
    assert_eq!(read_text(&mut s, LIMIT).await["data"], "ok");

    // A clean close is echoed with the same code, and the server ends the connection.
    s.write_all(&masked(OP_CLOSE, &close_payload(1000, b"bye")))
        .await
        .unwrap();
    assert_eq!(read_close(&mut s, LIMIT).await, Ending::Close(Some(1000)));
    gw.wait_metric("wsnotify_connections", 0).await;
}

/// Writes `chunk` `times` times, or until a write stalls for `stall` (the gateway stopped
/// reading). Returns the bytes written.
async fn pump(s: &mut tokio::net::TcpStream, chunk: &[u8], times: usize, stall: Duration) -> usize {
    let mut sent = 0;
    for _ in 0..times {
        match tokio::time::timeout(stall, s.write_all(chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            Ok(Err(e)) => {
                eprintln!("pump: write failed after {sent} bytes: {e}");
                break;
            }
            Err(_) => {
                eprintln!("pump: write stalled after {sent} bytes");
                break;
            }
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_is_answered_pong_for_ping_but_cannot_grow_gateway_memory() {
    let _alone = heavy().await;
    let q = unique("hostile_pingflood");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("PING_INTERVAL_MS", "500")]).await;
    // Read all along, so it answers the gateway's pings.
    let mut healthy = spawn_reader(gw.connect_user("healthy").await);

    // Pings with the largest payload allowed; each one asks for a 127-byte pong.
    let ping = masked(OP_PING, &[b'p'; 125]);
    let chunk = ping.repeat(512); // 67 KB per write

    // A client that pings in bursts but reads: every ping gets its pong, nobody is cut off.
    let pinger = raw_ws(gw.addr, "user_id=pinger").await;
    let (mut rd, mut wr) = pinger.into_split();
    let bursts = 40;
    let writer = tokio::spawn(async move {
        for _ in 0..bursts {
            wr.write_all(&chunk).await.unwrap();
        }
        wr
    });
    let (pongs, rd) = bounded(LIMIT, async move {
        let mut n = 0;
        while n < bursts * 512 {
            let mut hdr = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut rd, &mut hdr)
                .await
                .unwrap();
            let mut p = vec![0; usize::from(hdr[1] & 0x7f)];
            tokio::io::AsyncReadExt::read_exact(&mut rd, &mut p)
                .await
                .unwrap();
            if hdr[0] & 0x0f == OP_PONG {
                assert_eq!(p, [b'p'; 125]);
                n += 1;
            }
        }
        (n, rd)
    })
    .await
    .expect("every pong in time");
    let wr = writer.await.unwrap();
    assert_eq!(pongs, bursts * 512);
    gw.wait_metric("wsnotify_connections", 2).await;
    drop((rd, wr));
    gw.wait_metric("wsnotify_connections", 1).await;

    // A client that floods pings and never reads: the gateway stops reading it once its pongs
    // back up, so its memory stays flat, and keepalive drops the stalled peer.
    let rss_before = rss_kib(gw.pid());
    let chunk = ping.repeat(512);
    let mut flooder = raw_ws_with(gw.addr, "user_id=flooder", Some(4096)).await;
    let t = Instant::now();
    let sent = pump(&mut flooder, &chunk, 1000, Duration::from_secs(2)).await;
    let rss_after = rss_kib(gw.pid());
    let growth = rss_after.saturating_sub(rss_before);
    eprintln!(
        "ping flood: {pongs} pongs for {pongs} pings to a reading client; a non-reading client got {} KiB of pings in before the gateway stopped reading ({:?}); gateway RSS {} → {} KiB (+{} KiB)",
        sent >> 10,
        t.elapsed(),
        rss_before,
        rss_after,
        growth
    );
    assert!(
        sent < 64 << 20,
        "the gateway kept reading pings whose pongs could not be sent"
    );
    assert!(
        growth < 8 * 1024,
        "gateway RSS grew by {growth} KiB while a client sent {sent} bytes of pings without reading its pongs"
    );
    gw.wait_metric("wsnotify_closes_total{reason=\"dead_peer\"}", 1)
        .await;
    gw.wait_metric("wsnotify_connections", 1).await;
    broker
        .publish_json(&q, &to_user("healthy", "after", json!(1)))
        .await;
    let (_, frame) = within("a frame", healthy.recv())
        .await
        .expect("still connected");
    assert_eq!(frame["type"], "after");
    drop(flooder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_client_messages_is_read_ignored_and_costs_no_memory() {
    let _alone = heavy().await;
    let q = unique("hostile_textflood");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("MAX_CLIENT_FRAME_BYTES", "4096")]).await;
    let mut healthy = gw.connect_user("healthy").await;
    let rss_before = rss_kib(gw.pid());
    let mut flooder = raw_ws(gw.addr, "user_id=flooder").await;
    let msg = [
        masked(OP_TEXT, &[b't'; 4000]),
        masked(OP_BINARY, &[0x5a; 4000]),
    ]
    .concat();
    let chunk = msg.repeat(16); // 32 messages, 128 KB per write
    let times = 256;
    let t = Instant::now();
    let sent = pump(&mut flooder, &chunk, times, Duration::from_secs(5)).await;
    assert_eq!(
        sent,
        times * chunk.len(),
        "the gateway keeps reading a chatty client"
    );
    let messages = (sent / chunk.len() * 32) as u64;
    gw.wait_metric("wsnotify_client_messages_ignored_total", messages)
        .await;
    let growth = rss_kib(gw.pid()).saturating_sub(rss_before);
    eprintln!(
        "text flood: {messages} messages ({} MiB) read and ignored in {:?}; RSS +{growth} KiB",
        sent >> 20,
        t.elapsed()
    );
    assert!(growth < 4 * 1024, "RSS grew by {growth} KiB");
    broker
        .publish_json(&q, &to_user("flooder", "to_flooder", json!(1)))
        .await;
    assert_eq!(read_text(&mut flooder, LIMIT).await["type"], "to_flooder");
    broker
        .publish_json(&q, &to_user("healthy", "after", json!(1)))
        .await;
    assert_eq!(next_frame(&mut healthy).await["type"], "after");
}
