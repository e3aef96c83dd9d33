//! Plain HTTP/1.1 requests (`GET /metrics`) and reading a Prometheus text exposition: one
//! sample's value, or one histogram's buckets. The integration tests use these too.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Cumulative bucket counts of one histogram: `(le, count)`, `le` in the metric's unit,
/// ascending, `+Inf` last.
pub type Buckets = Vec<(f64, u64)>;

/// A `GET path` request head with `headers` added (the server answers and closes).
pub fn get_request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Sends `request` as is and returns everything the server answers until it closes (or
/// resets the connection: what arrived before is kept).
pub async fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(request).await?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    Ok(out)
}

/// Status and body of a raw HTTP response: status 0 if there is no status line, an empty
/// body if there is no blank line after the head.
pub fn parse_response(raw: &str) -> (u16, String) {
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `GET path` over plain HTTP/1.1; returns status and body (`None` on any failure, or after
/// 5 s).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let req = get_request(addr, path, &[]);
    let raw = tokio::time::timeout(Duration::from_secs(5), exchange(addr, req.as_bytes()))
        .await
        .ok()?
        .ok()?;
    let raw = String::from_utf8_lossy(&raw);
    raw.contains("\r\n\r\n").then(|| parse_response(&raw))
}

/// The buckets of histogram `name` (series `name_bucket{le="…"}`), if the text has it.
pub fn histogram(text: &str, name: &str) -> Option<Buckets> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Buckets = text
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.trim().parse().ok()?;
            Some((le, count))
        })
        .collect();
    if out.is_empty() {
        return None;
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    Some(out)
}

/// The value of one series: `name` exactly (`x_total{result="ok"}`), or, for a name without
/// labels, the sum of every series of it (`x_total` sums `x_total{…}` too). `None` if absent.
pub fn value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines() {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        let v = if let Some(v) = rest.strip_prefix(' ') {
            v
        } else if !name.contains('{') && rest.starts_with('{') {
            match rest.split_once("} ") {
                Some((_, v)) => v,
                None => continue,
            }
        } else {
            continue;
        };
        if let Ok(x) = v.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += x;
        }
    }
    found
}

/// `after - before`, bucket by bucket.
pub fn delta(before: &Buckets, after: &Buckets) -> Buckets {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|(l, _)| *l == le).map_or(0, |&(_, c)| c);
            (le, n.saturating_sub(was))
        })
        .collect()
}

/// `a + b`, bucket by bucket (the same histogram from two processes).
pub fn add(a: &Buckets, b: &Buckets) -> Buckets {
    a.iter()
        .map(|&(le, n)| {
            let more = b.iter().find(|(l, _)| *l == le).map_or(0, |&(_, c)| c);
            (le, n + more)
        })
        .collect()
}

/// Upper bound of the bucket holding quantile `q`, and the sample count.
pub fn quantile(b: &Buckets, q: f64) -> Option<(f64, u64)> {
    let total = b.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    b.iter()
        .find(|(_, c)| *c >= want)
        .map(|&(le, _)| (le, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_takes_quantiles() {
        let text = "# TYPE x histogram\nx_bucket{le=\"0.00001\"} 5\nx_bucket{le=\"0.0001\"} 99\nx_bucket{le=\"+Inf\"} 100\nx_sum 1\nx_count 100\n";
        let h = histogram(text, "x").unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(quantile(&h, 0.5), Some((0.0001, 100)));
        assert_eq!(quantile(&h, 0.999).unwrap().0, f64::INFINITY);
        let d = delta(&vec![(0.00001, 5), (0.0001, 9), (f64::INFINITY, 10)], &h);
        assert_eq!(d, vec![(0.00001, 0), (0.0001, 90), (f64::INFINITY, 90)]);
        assert_eq!(
            add(&d, &h),
            vec![(0.00001, 5), (0.0001, 189), (f64::INFINITY, 190)]
        );
        assert!(histogram(text, "y").is_none());
        assert_eq!(value(text, "x_count"), Some(100.0));
        assert_eq!(value(text, "x_bucket{le=\"+Inf\"}"), Some(100.0));
        assert_eq!(value(text, "x"), None);
        assert_eq!(
            parse_response("HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"),
            (200, "body".to_owned())
        );
        assert_eq!(parse_response("garbage"), (0, String::new()));
    }

    #[test]
    fn values() {
        let text =
            "# HELP r x\nr_total{result=\"a\"} 3\nr_total{result=\"b\"} 4\nr_total_x 9\ng 12\n";
        assert_eq!(value(text, "r_total"), Some(7.0));
        assert_eq!(value(text, "r_total{result=\"b\"}"), Some(4.0));
        assert_eq!(value(text, "g"), Some(12.0));
        assert_eq!(value(text, "h"), None);
    }
}
