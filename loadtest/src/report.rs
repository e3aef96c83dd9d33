//! The final tables: one suite's figures against the targets, and wsnotify against the
//! baseline (medians over repeated, interleaved runs) with their ratio.

use std::fmt::Write as _;

use crate::suite::SuiteResult;

/// Whether a bigger or a smaller value is better.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    Info,
}

struct Figure {
    name: &'static str,
    unit: &'static str,
    target: Option<f64>,
    better: Better,
    get: fn(&SuiteResult) -> Option<f64>,
}

fn figures() -> Vec<Figure> {
    use Better::*;
    vec![
        Figure {
            name: "server processes (RSS, CPU summed)",
            unit: "",
            target: None,
            better: Info,
            get: |r| Some(r.replicas as f64),
        },
        Figure {
            name: "connections open",
            unit: "",
            target: None,
            better: Info,
            get: |r| Some(r.connected as f64),
        },
        Figure {
            name: "idle RSS per connection",
            unit: "B",
            target: Some(2048.0),
            better: Lower,
            get: |r| r.idle_bytes_per_conn,
        },
        Figure {
            name: "RSS kept per conn after 100-frame burst",
            unit: "B",
            target: Some(1024.0),
            better: Lower,
            get: |r| r.burst_kept_bytes_per_conn,
        },
        Figure {
            name: "RSS 10 s after all disconnect − start",
            unit: "MB",
            target: Some(32.0),
            better: Lower,
            get: |r| r.rss_after_disconnect_over_start.map(|b| b as f64 / 1e6),
        },
        Figure {
            name: "fan-out delivered",
            unit: "frames/s",
            target: Some(1_500_000.0),
            better: Higher,
            get: |r| r.fanout.as_ref().map(|d| d.frames_per_sec),
        },
        Figure {
            name: "fan-out complete",
            unit: "%",
            target: Some(100.0),
            better: Higher,
            get: |r| r.fanout.as_ref().map(|d| d.complete_pct),
        },
        Figure {
            name: "fan-out p99 publish→receive",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| r.fanout.as_ref().map(|d| d.latency.p99_us as f64 / 1e3),
        },
        Figure {
            name: "fan-out server CPU per M frames",
            unit: "s",
            target: None,
            better: Lower,
            get: |r| r.fanout.as_ref().and_then(|d| d.server_cpu_per_mframes),
        },
        Figure {
            name: "sustained broadcasts p99",
            unit: "ms",
            target: Some(50.0),
            better: Lower,
            get: |r| r.sustained.as_ref().map(|d| d.latency.p99_us as f64 / 1e3),
        },
        Figure {
            name: "sustained broadcasts p50",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| r.sustained.as_ref().map(|d| d.latency.p50_us as f64 / 1e3),
        },
        Figure {
            name: "sustained cores: server",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.sustained.as_ref().and_then(|d| d.server_cores),
        },
        Figure {
            name: "sustained cores: clients",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.sustained.as_ref().map(|d| d.client_cores),
        },
        Figure {
            name: "sustained cores: everything else",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.sustained.as_ref().and_then(|d| d.other_cores),
        },
        Figure {
            name: "sustained complete",
            unit: "%",
            target: Some(100.0),
            better: Higher,
            get: |r| r.sustained.as_ref().map(|d| d.complete_pct),
        },
        Figure {
            name: "sustained server CPU per M frames",
            unit: "s",
            target: None,
            better: Lower,
            get: |r| r.sustained.as_ref().and_then(|d| d.server_cpu_per_mframes),
        },
        Figure {
            name: "sustained server CPU per broadcast",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| {
                r.sustained
                    .as_ref()
                    .and_then(|d| d.server_cpu_per_msg_us)
                    .map(|v| v / 1e3)
            },
        },
        Figure {
            name: "sustained broker CPU per broadcast",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| {
                r.sustained
                    .as_ref()
                    .and_then(|d| d.broker_cpu_per_msg_us)
                    .map(|v| v / 1e3)
            },
        },
        Figure {
            name: "unicast p99 publish→receive",
            unit: "ms",
            target: Some(5.0),
            better: Lower,
            get: |r| r.unicast.as_ref().map(|d| d.latency.p99_us as f64 / 1e3),
        },
        Figure {
            name: "unicast p50 publish→receive",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| r.unicast.as_ref().map(|d| d.latency.p50_us as f64 / 1e3),
        },
        Figure {
            name: "unicast complete",
            unit: "%",
            target: Some(100.0),
            better: Higher,
            get: |r| r.unicast.as_ref().map(|d| d.complete_pct),
        },
        Figure {
            name: "unicast server CPU per notification",
            unit: "µs",
            target: None,
            better: Lower,
            get: |r| r.unicast.as_ref().and_then(|d| d.server_cpu_per_msg_us),
        },
        Figure {
            name: "unicast broker CPU per notification",
            unit: "µs",
            target: None,
            better: Lower,
            get: |r| r.unicast.as_ref().and_then(|d| d.broker_cpu_per_msg_us),
        },
        Figure {
            name: "unicast cores: server",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.unicast.as_ref().and_then(|d| d.server_cores),
        },
        Figure {
            name: "unicast cores: broker",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.unicast.as_ref().and_then(|d| d.broker_cores),
        },
        Figure {
            name: "unicast cores: clients",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.unicast.as_ref().map(|d| d.client_cores),
        },
        Figure {
            name: "unicast cores: everything else",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.unicast.as_ref().and_then(|d| d.other_cores),
        },
        Figure {
            name: "unicast gateway share p99 (metrics)",
            unit: "µs",
            target: Some(100.0),
            better: Lower,
            get: |r| r.unicast.as_ref().and_then(|d| d.gateway_p99_us),
        },
        Figure {
            name: "handshakes",
            unit: "/s",
            target: Some(20_000.0),
            better: Higher,
            get: |r| Some(r.handshakes_per_sec),
        },
        Figure {
            name: "server CPU per handshake",
            unit: "µs",
            target: None,
            better: Lower,
            get: |r| r.server_cpu_per_handshake_us,
        },
        Figure {
            name: "handshake p99",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| Some(r.handshake_latency.p99_us as f64 / 1e3),
        },
        Figure {
            name: "storm: reconnected",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.recovery.as_ref().map(|d| d.reconnected as f64),
        },
        Figure {
            name: "storm: reconnects failed",
            unit: "",
            target: Some(0.0),
            better: Lower,
            get: |r| r.recovery.as_ref().map(|d| d.reconnect_failed as f64),
        },
        Figure {
            name: "storm: recovered true",
            unit: "%",
            target: Some(100.0),
            better: Higher,
            get: |r| r.recovery.as_ref().map(|d| d.recovered_pct),
        },
        Figure {
            name: "storm: missed frames replayed",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.recovery.as_ref().map(|d| d.missed_total as f64),
        },
        Figure {
            name: "storm: drop → recovery frame p50",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| {
                r.recovery
                    .as_ref()
                    .map(|d| d.time_to_recovery.p50_us as f64 / 1e3)
            },
        },
        Figure {
            name: "storm: drop → recovery frame p99",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| {
                r.recovery
                    .as_ref()
                    .map(|d| d.time_to_recovery.p99_us as f64 / 1e3)
            },
        },
        Figure {
            name: "storm: drop → recovery frame max",
            unit: "ms",
            target: None,
            better: Lower,
            get: |r| {
                r.recovery
                    .as_ref()
                    .map(|d| d.time_to_recovery.max_us as f64 / 1e3)
            },
        },
        Figure {
            name: "storm: gaps, recovered:true users",
            unit: "",
            target: Some(0.0),
            better: Lower,
            get: |r| {
                r.recovery
                    .as_ref()
                    .map(|d| (d.gaps - d.gaps_not_recovered) as f64)
            },
        },
        Figure {
            name: "storm: duplicates",
            unit: "",
            target: Some(0.0),
            better: Lower,
            get: |r| r.recovery.as_ref().map(|d| d.duplicates as f64),
        },
        Figure {
            name: "storm: out of order",
            unit: "",
            target: Some(0.0),
            better: Lower,
            get: |r| r.recovery.as_ref().map(|d| d.out_of_order as f64),
        },
        Figure {
            name: "storm: server cores",
            unit: "",
            target: None,
            better: Info,
            get: |r| r.recovery.as_ref().and_then(|d| d.server_cores),
        },
        Figure {
            name: "storm: server RSS peak",
            unit: "MB",
            target: None,
            better: Lower,
            get: |r| {
                r.recovery
                    .as_ref()
                    .and_then(|d| d.rss_peak.map(|b| b as f64 / 1e6))
            },
        },
        Figure {
            name: "storm: history bytes per entry",
            unit: "B",
            target: None,
            better: Lower,
            get: |r| r.recovery.as_ref().and_then(|d| d.history_bytes_per_entry),
        },
    ]
}

fn fmt_num(v: f64) -> String {
    if v.is_infinite() {
        return "∞".into();
    }
    let a = v.abs();
    if a >= 100_000.0 {
        // Thousands separators for big counts.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(if v < 0.0 { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn meets(f: &Figure, v: f64) -> &'static str {
    match (f.target, f.better) {
        (Some(t), Better::Higher) if v >= t => "yes",
        (Some(t), Better::Lower) if v <= t => "yes",
        (Some(_), _) => "NO",
        _ => "",
    }
}

fn target_text(f: &Figure) -> String {
    match (f.target, f.better) {
        (Some(t), Better::Higher) => format!("≥ {}", fmt_num(t)),
        (Some(t), Better::Lower) => format!("≤ {}", fmt_num(t)),
        _ => String::new(),
    }
}

/// One suite against the targets.
pub fn table(r: &SuiteResult) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n{}: {} connections", r.label, r.connections);
    let _ = writeln!(
        out,
        "| {:<42} | {:>14} | {:>8} | {:>14} | {:>4} |",
        "figure", "measured", "unit", "target", "met"
    );
    let _ = writeln!(
        out,
        "|{:-<44}|{:->16}|{:->10}|{:->16}|{:->6}|",
        "", "", "", "", ""
    );
    for f in figures() {
        let Some(v) = (f.get)(r) else { continue };
        let _ = writeln!(
            out,
            "| {:<42} | {:>14} | {:>8} | {:>14} | {:>4} |",
            f.name,
            fmt_num(v),
            f.unit,
            target_text(&f),
            meets(&f, v)
        );
    }
    for (name, d) in [
        ("fanout", &r.fanout),
        ("sustained", &r.sustained),
        ("unicast", &r.unicast),
    ] {
        if let Some(d) = d.as_ref().filter(|d| d.late_before > 0) {
            let _ = writeln!(
                out,
                "before {name}: {} frames of the previous phase were still arriving, for {:.1} s",
                d.late_before, d.late_before_secs
            );
        }
        if let Some(d) = d.as_ref().filter(|d| d.failed_publishes > 0) {
            let _ = writeln!(out, "{name}: {} publishes failed", d.failed_publishes);
        }
    }
    if r.servers.len() > 1 {
        for (i, s) in r.servers.iter().enumerate() {
            let mb = |b: Option<u64>| b.map_or("–".into(), |b| format!("{:.1}", b as f64 / 1e6));
            let cores = |d: &Option<crate::suite::Delivery>| {
                d.as_ref()
                    .and_then(|d| d.server_cores_each.get(i).copied().flatten())
                    .map_or("–".into(), |c| format!("{c:.2}"))
            };
            let _ = writeln!(
                out,
                "replica {} (pid {:?}, {} connections): RSS MB start {} idle {} after burst {} after disconnect {}; cores fanout {} sustained {} unicast {}; CPU {:.1} s",
                i + 1,
                s.pids,
                s.connected,
                mb(s.rss_start),
                mb(s.rss_idle),
                mb(s.rss_after_burst),
                mb(s.rss_after_disconnect),
                cores(&r.fanout),
                cores(&r.sustained),
                cores(&r.unicast),
                s.cpu_secs.unwrap_or(0.0)
            );
        }
    }
    if r.failed > 0 || r.dropped > 0 || r.server_closes.iter().any(|&c| c > 0) {
        let _ = writeln!(
            out,
            "connect failures {}, dropped without close {}, server closes 1001/1008/1009/1013/other {:?}",
            r.failed, r.dropped, r.server_closes
        );
    }
    out
}

/// The median (the mean of the middle two for an even count); `None` for no values.
pub(crate) fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    Some(if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    })
}

/// wsnotify against the other servers: medians of each figure over the runs, and the ratio
/// of wsnotify's to each other's. `runs` holds each server's name and runs, wsnotify first.
pub fn comparison(runs: &[(&str, &[SuiteResult])]) -> String {
    let mut out = String::new();
    let runs: Vec<&(&str, &[SuiteResult])> = runs.iter().filter(|(_, r)| !r.is_empty()).collect();
    let Some(&&(first, ours)) = runs.first() else {
        return out;
    };
    let others = &runs[1..];
    let names: Vec<String> = runs
        .iter()
        .map(|(n, r)| format!("{} {n}", r.len()))
        .collect();
    let _ = writeln!(
        out,
        "\n{} (median of runs: {}; interleaved)",
        runs.iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(" vs "),
        names.join(", ")
    );
    if let Some(n) = ours.iter().map(|r| r.replicas).max().filter(|&n| n > 1) {
        let _ = writeln!(
            out,
            "{first}: {n} replicas on one notify queue (RSS and CPU summed over them). The baseline \
             runs as one process and is single-hop: it consumes the notify queue itself."
        );
    }
    if others.iter().any(|(n, _)| *n == "nchan") {
        let _ = writeln!(
            out,
            "nchan: one nginx worker (RSS and CPU: master + worker); published by HTTP POST to \
             nchan itself over keep-alive connections, a different path with no broker."
        );
    }
    let mut head = format!("| {:<42} | {:>8} | {:>14} |", "figure", "unit", "target");
    let mut rule = format!("|{:-<44}|{:->10}|{:->16}|", "", "", "");
    for (n, _) in &runs {
        head += &format!(" {n:>14} |");
        rule += &format!("{:->16}|", "");
    }
    for (n, _) in others {
        head += &format!(" {:>14} |", format!("ws ÷ {n}"));
        rule += &format!("{:->16}|", "");
    }
    let _ = writeln!(out, "{head} {:>4} |", "met");
    let _ = writeln!(out, "{rule}{:->6}|", "");
    for f in figures() {
        let meds: Vec<Option<f64>> = runs
            .iter()
            .map(|(_, rs)| median(rs.iter().filter_map(|r| (f.get)(r)).collect()))
            .collect();
        if meds.iter().all(Option::is_none) {
            continue;
        }
        let mut line = format!(
            "| {:<42} | {:>8} | {:>14} |",
            f.name,
            f.unit,
            target_text(&f)
        );
        for m in &meds {
            line += &format!(" {:>14} |", m.map_or("–".into(), fmt_num));
        }
        for m in &meds[1..] {
            let ratio = match (meds[0], m) {
                (Some(a), Some(b)) if *b != 0.0 => format!("{:.3}", a / b),
                _ => "–".into(),
            };
            line += &format!(" {ratio:>14} |");
        }
        let _ = writeln!(out, "{line} {:>4} |", meds[0].map_or("", |v| meets(&f, v)));
    }
    out
}
