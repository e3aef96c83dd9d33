//! Identity is checked before the upgrade: JWT (HS256 secret, RS256/ES256 public key) from
//! `?token=` or `Authorization: Bearer`, or `?user_id=` in the explicit insecure mode.
//! Refusals are HTTP 401 and never become WebSockets.

use crate::support::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;

const SECRET: &str = "test-secret-0123456789abcdef";

/// Seconds since the Unix epoch (JWT `exp`).
fn now() -> u64 {
    now_us() / 1_000_000
}

fn hs256(claims: serde_json::Value) -> String {
    loadtest::client::sign_hs256_claims(SECRET, &claims)
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

async fn jwt_gateway(q: &str, extra: &[(&str, &str)]) -> Gateway {
    let mut env = vec![("AUTH_MODE", "jwt"), ("JWT_SECRET", SECRET)];
    env.extend_from_slice(extra);
    Gateway::start(q, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs256_token_in_query_or_bearer_header_identifies_the_user() {
    let _load = light().await;
    let q = unique("jwt");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = jwt_gateway(&q, &[]).await;
    let token = hs256(json!({"sub": "3f0c-user", "exp": now() + 600}));

    let mut via_query = connect(&gw.ws_url(&format!("token={token}"))).await;
    assert_eq!(
        connect_status(
            &gw.ws_url(""),
            &[("Authorization", &format!("Bearer {token}"))]
        )
        .await,
        101
    );
    gw.wait_metric("wsnotify_users", 1).await;
    broker
        .publish_json(&q, &to_user("3f0c-user", "welcome", json!({"m": 1})))
        .await;
    let f = next_frame(&mut via_query).await;
    assert_eq!(f["user_id"], "3f0c-user");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_401_before_any_upgrade() {
    let _load = light().await;
    let q = unique("jwt401");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = jwt_gateway(
        &q,
        &[
            ("JWT_ISSUER", "https://auth.example"),
            ("JWT_AUDIENCE", "wsnotify"),
        ],
    )
    .await;
    let good =
        json!({"sub": "u", "exp": now() + 600, "iss": "https://auth.example", "aud": "wsnotify"});
    assert_eq!(
        connect_status(&gw.ws_url(&format!("token={}", hs256(good.clone()))), &[]).await,
        101
    );

    let with = |patch: serde_json::Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        hs256(c)
    };
    let forged = {
        let t = hs256(good.clone());
        let (rest, _sig) = t.rsplit_once('.').unwrap();
        format!("{rest}.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
    };
    let alg_none = {
        format!(
            "{}.{}.",
            base64_url(r#"{"alg":"none","typ":"JWT"}"#),
            base64_url(&good.to_string())
        )
    };
    let rs256 = encode(
        &Header::new(Algorithm::RS256),
        &good,
        &EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap(),
    )
    .unwrap();
    let cases = [
        ("no token", String::new()),
        ("garbage", "token=not.a.jwt".to_owned()),
        (
            "expired",
            format!("token={}", with(json!({"exp": now() - 5}))),
        ),
        ("no exp", format!("token={}", with(json!({"exp": null})))),
        ("no sub", format!("token={}", with(json!({"sub": null})))),
        (
            "not yet valid",
            format!("token={}", with(json!({"nbf": now() + 600}))),
        ),
        (
            "wrong issuer",
            format!("token={}", with(json!({"iss": "https://evil.example"}))),
        ),
        (
            "wrong audience",
            format!("token={}", with(json!({"aud": "other"}))),
        ),
        ("forged signature", format!("token={forged}")),
        ("alg none", format!("token={alg_none}")),
        ("wrong algorithm", format!("token={rs256}")),
        (
            "other secret",
            format!(
                "token={}",
                loadtest::client::sign_hs256_claims("another-secret-0123456789", &good)
            ),
        ),
        ("oversized", format!("token={}", "a".repeat(5000))),
        (
            "insecure user_id ignored in jwt mode",
            "user_id=alice".to_owned(),
        ),
    ];
    let n = cases.len() as u64;
    for (what, query) in cases {
        assert_eq!(connect_status(&gw.ws_url(&query), &[]).await, 401, "{what}");
    }
    assert_eq!(
        gw.metric("wsnotify_handshakes_total{result=\"unauthorized\"}")
            .await,
        n
    );
    assert_eq!(
        gw.metric("wsnotify_handshakes_total{result=\"accepted\"}")
            .await,
        1
    );
}

/// base64url without padding, for hand-made tokens.
fn base64_url(s: &str) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &x)| acc | (u32::from(x) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_and_es256_public_keys() {
    let _load = light().await;
    for (alg, private, public) in [
        (Algorithm::RS256, "rsa_private.pem", "rsa_public.pem"),
        (Algorithm::ES256, "ec_private.pem", "ec_public.pem"),
    ] {
        let q = unique("jwtpk");
        let mut broker = Broker::connect().await;
        broker.declare(&q).await;
        let public = fixture(public);
        let gw = Gateway::start(
            &q,
            &[("AUTH_MODE", "jwt"), ("JWT_PUBLIC_KEY_FILE", &public)],
        )
        .await;
        let pem = std::fs::read(fixture(private)).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem).unwrap(),
            _ => EncodingKey::from_ec_pem(&pem).unwrap(),
        };
        let token = encode(
            &Header::new(alg),
            &json!({"sub": "pk-user", "exp": now() + 600}),
            &key,
        )
        .unwrap();
        let mut ws = connect(&gw.ws_url(&format!("token={token}"))).await;
        gw.wait_metric("wsnotify_users", 1).await;
        broker
            .publish_json(&q, &to_user("pk-user", "welcome", json!(null)))
            .await;
        assert_eq!(next_frame(&mut ws).await["user_id"], "pk-user", "{alg:?}");
        // An HS256 token signed with the public key's bytes (key confusion) is refused.
        let confused = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "x", "exp": now() + 600}),
            &EncodingKey::from_secret(&std::fs::read(&public).unwrap()),
        )
        .unwrap();
        assert_eq!(
            connect_status(&gw.ws_url(&format!("token={confused}")), &[]).await,
            401,
            "{alg:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_is_closed_with_1008_when_its_token_expires() {
    let _load = light().await;
    let q = unique("expiry");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = jwt_gateway(&q, &[("PING_INTERVAL_MS", "300")]).await;
    let token = hs256(json!({"sub": "short-lived", "exp": now() + 2}));
    let mut ws = connect(&gw.ws_url(&format!("token={token}"))).await;
    let close = next_close(&mut ws).await.expect("close frame");
    assert_eq!(u16::from(close.code), 1008);
    gw.wait_metric("wsnotify_connections", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_is_explicit_and_warns_at_start() {
    let _load = light().await;
    let q = unique("insecure");
    let mut broker = Broker::connect().await;
    broker.declare(&q).await;
    let gw = Gateway::start(&q, &[("AUTH_MODE", "insecure")]).await;
    let line = gw.wait_log("AUTH_MODE=insecure").await;
    assert!(line.contains("WARN"), "{line}");
    assert_eq!(
        connect_status(&gw.ws_url(""), &[]).await,
        401,
        "user_id is still required"
    );
    assert_eq!(
        connect_status(&gw.ws_url(&format!("user_id={}", "x".repeat(129))), &[]).await,
        401
    );
    assert_eq!(
        connect_status(&gw.ws_url("user_id=%E2%9C%93%20ok"), &[]).await,
        101
    );
}
