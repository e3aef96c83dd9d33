//! SVG figures from `loadtest` JSON (plotters' SVG backend: no fonts or system libraries
//! needed; text is left to the viewer's sans-serif).
//!
//! | JSON | figure |
//! |---|---|
//! | `sweep` over `unicast` or `sustained` rates | p50 and p99 publish → receive latency against the offered rate |
//! | `sweep` over `idle` connection counts | server RSS with every connection open and idle, against the count |
//! | `compare` | frames/s delivered per phase |
//!
//! Every server found in the JSON is drawn (wsnotify, nchan, the baseline), each in its own
//! colour; repeated runs of a point are reduced to their median. The JSON is read as plain
//! [`serde_json::Value`], so files written by older `loadtest` builds still plot.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::coord::combinators::{LogCoord, WithKeyPoints};
use plotters::prelude::*;
use serde_json::Value;

/// Servers in drawing order, with their colours.
const SERVERS: [(&str, RGBColor); 3] = [
    ("wsnotify", RGBColor(31, 119, 180)),
    ("nchan", RGBColor(44, 160, 44)),
    ("baseline", RGBColor(214, 39, 40)),
];

const SIZE: (u32, u32) = (820, 500);

fn err(e: impl std::fmt::Display) -> String {
    format!("plot: {e}")
}

/// The median of `get` over the runs of `server` in `v` (an array of suite results).
fn med(v: &Value, server: &str, get: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    crate::report::median(v[server].as_array()?.iter().filter_map(get).collect())
}

/// Legend name: "wsnotify ×3" when the runs used several replicas.
fn server_name(v: &Value, server: &str) -> String {
    let replicas = v[server]
        .as_array()
        .and_then(|a| a.first())
        .and_then(|r| r["replicas"].as_u64())
        .unwrap_or(1);
    if replicas > 1 {
        format!("{server} ×{replicas}")
    } else {
        server.to_owned()
    }
}

fn commit(v: &Value) -> String {
    match v["commit"].as_str() {
        Some(c) if !c.is_empty() => format!(" · {c}"),
        _ => String::new(),
    }
}

/// Redraws every figure `json` holds into `out`; returns the files written.
pub fn from_file(json: &Path, out: &Path) -> Result<Vec<PathBuf>, String> {
    let text =
        std::fs::read_to_string(json).map_err(|e| format!("read {}: {e}", json.display()))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("parse {}: {e}", json.display()))?;
    from_value(&v, out)
}

/// Draws every figure `v` holds into `out`; returns the files written.
pub fn from_value(v: &Value, out: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut files = Vec::new();
    match v["sweep"].as_str() {
        Some(s @ ("unicast" | "sustained")) => {
            let f = out.join(format!("{s}-latency.svg"));
            latency_vs_rate(v, s, &f)?;
            files.push(f);
        }
        Some("idle") => {
            let f = out.join("idle-rss.svg");
            rss_vs_connections(v, &f)?;
            files.push(f);
        }
        Some(other) => return Err(format!("plot: unknown sweep {other:?}")),
        None => {
            let f = out.join("frames-per-phase.svg");
            frames_per_phase(v, &f)?;
            files.push(f);
        }
    }
    Ok(files)
}

/// A range that leaves some room around `lo..hi` on a log axis, at least `span` wide.
fn log_range(lo: f64, hi: f64, span: f64) -> std::ops::Range<f64> {
    let lo = lo.max(1e-9);
    let hi = hi.max(lo * span);
    lo / 1.3..hi * 1.3
}

/// 1-2-5 ticks across a log range.
fn log_ticks(r: &std::ops::Range<f64>) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(r.start.log10().floor());
    while decade <= r.end {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= r.start && t <= r.end {
                out.push(t);
            }
        }
        decade *= 10.0;
    }
    out
}

/// A log axis over `r` with 1-2-5 ticks.
fn log_axis(r: std::ops::Range<f64>) -> WithKeyPoints<LogCoord<f64>> {
    let ticks = log_ticks(&r);
    r.log_scale().with_key_points(ticks)
}

fn points(v: &Value) -> &[Value] {
    v["points"].as_array().map_or(&[], Vec::as_slice)
}

fn servers_in(v: &Value) -> Vec<(&'static str, RGBColor)> {
    SERVERS
        .iter()
        .copied()
        .filter(|(s, _)| match v["points"].as_array() {
            Some(ps) => ps
                .iter()
                .any(|p| p[*s].as_array().is_some_and(|a| !a.is_empty())),
            None => v[*s].as_array().is_some_and(|a| !a.is_empty()),
        })
        .collect()
}

fn first_server_field(v: &Value, field: &str) -> Option<u64> {
    points(v).iter().find_map(|p| {
        SERVERS
            .iter()
            .find_map(|(s, _)| p[*s].as_array()?.first()?[field].as_u64())
    })
}

fn latency_vs_rate(v: &Value, scenario: &str, file: &Path) -> Result<(), String> {
    let servers = servers_in(v);
    // (server, [(rate, p50 ms, p99 ms, complete %)])
    let mut series = Vec::new();
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, 0f64, f64::MAX, 0f64);
    for &(s, colour) in &servers {
        let mut pts = Vec::new();
        for p in points(v) {
            let Some(x) = p["x"].as_f64() else { continue };
            let lat = |q: &'static str| {
                move |r: &Value| r[scenario]["latency"][q].as_f64().map(|us| us / 1e3)
            };
            let (Some(p50), Some(p99)) = (med(p, s, lat("p50_us")), med(p, s, lat("p99_us")))
            else {
                continue;
            };
            let complete = med(p, s, |r| r[scenario]["complete_pct"].as_f64()).unwrap_or(100.0);
            xlo = xlo.min(x);
            xhi = xhi.max(x);
            ylo = ylo.min(p50.max(0.01));
            yhi = yhi.max(p99);
            pts.push((x, p50.max(0.01), p99.max(0.01), complete));
        }
        if !pts.is_empty() {
            series.push((s, colour, server_name(&points(v)[0], s), pts));
        }
    }
    if series.is_empty() {
        return Err(format!("plot: no {scenario} latencies in the sweep"));
    }
    let n = first_server_field(v, "connections").unwrap_or(0);
    let xs: Vec<f64> = points(v).iter().filter_map(|p| p["x"].as_f64()).collect();
    let (title, xdesc) = match scenario {
        "unicast" => (
            format!("Unicast to random users: publish → receive latency ({n} connections)"),
            "offered rate, notifications/s",
        ),
        _ => (
            format!("Sustained broadcasts: publish → receive latency ({n} connections)"),
            "offered rate, broadcasts/s",
        ),
    };
    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title}{}", commit(v)), ("sans-serif", 17))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(
            // Ticks at the rates measured.
            log_range(xlo, xhi, 2.0).log_scale().with_key_points(xs),
            log_axis(log_range(ylo, yhi, 10.0)),
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(xdesc)
        .y_desc("latency, ms (log)")
        .x_label_formatter(&|x| fmt_si(*x))
        .y_label_formatter(&|y| fmt_ms(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (_, colour, name, pts) in &series {
        let c = *colour;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.2)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(format!("{name} p99"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.2), 4, c.filled())))
            .map_err(err)?;
        chart
            .draw_series(DashedLineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                6,
                4,
                c.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{name} p50"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(1)));
        chart
            .draw_series(
                pts.iter()
                    .map(|p| Circle::new((p.0, p.1), 3, c.stroke_width(1))),
            )
            .map_err(err)?;
        // Incomplete delivery is marked where it happened.
        chart
            .draw_series(pts.iter().filter(|p| p.3 < 99.95).map(|p| {
                Text::new(
                    format!("{:.1} %", p.3),
                    (p.0, p.2),
                    ("sans-serif", 12).into_font().color(&c),
                )
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

fn rss_vs_connections(v: &Value, file: &Path) -> Result<(), String> {
    let servers = servers_in(v);
    let mut series = Vec::new();
    let (mut xlo, mut xhi, mut ylo, mut yhi) = (f64::MAX, 0f64, f64::MAX, 0f64);
    for &(s, colour) in &servers {
        let mut pts = Vec::new();
        for p in points(v) {
            let Some(x) = p["x"].as_f64() else { continue };
            let Some(rss) = med(p, s, |r| r["rss_idle"].as_f64()) else {
                continue;
            };
            let per = med(p, s, |r| r["idle_bytes_per_conn"].as_f64());
            let mb = rss / 1e6;
            xlo = xlo.min(x);
            xhi = xhi.max(x);
            ylo = ylo.min(mb);
            yhi = yhi.max(mb);
            pts.push((x, mb, per));
        }
        if !pts.is_empty() {
            series.push((colour, server_name(&points(v)[0], s), pts));
        }
    }
    if series.is_empty() {
        return Err("plot: no RSS readings in the sweep".into());
    }
    let root = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Server RSS with every connection open and idle{}",
                commit(v)
            ),
            ("sans-serif", 17),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..xhi * 1.08, log_axis(log_range(ylo, yhi, 10.0)))
        .map_err(err)?;
    let _ = xlo;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("RSS, MB (log)")
        .x_label_formatter(&|x| fmt_si(*x))
        .y_label_formatter(&|y| fmt_si(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    for (colour, name, pts) in &series {
        let c = *colour;
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                c.stroke_width(2),
            ))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 4, c.filled())))
            .map_err(err)?;
        // RSS growth per connection beside each point.
        chart
            .draw_series(pts.iter().filter_map(|p| {
                let per = p.2?;
                Some(Text::new(
                    format!("{} B/conn", fmt_si(per)),
                    (p.0, p.1 * 1.12),
                    ("sans-serif", 12).into_font().color(&c),
                ))
            }))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// Phases with a frames/s figure, in suite order.
const PHASES: [(&str, &str); 3] = [
    ("fanout", "fan-out burst"),
    ("sustained", "sustained broadcasts"),
    ("unicast", "unicast"),
];

fn frames_per_phase(v: &Value, file: &Path) -> Result<(), String> {
    let servers = servers_in(v);
    let phases: Vec<(&str, &str)> = PHASES
        .iter()
        .copied()
        .filter(|(p, _)| {
            servers
                .iter()
                .any(|(s, _)| med(v, s, |r| r[*p]["frames_per_sec"].as_f64()).is_some())
        })
        .collect();
    if phases.is_empty() {
        return Err("plot: no phase with frames/s in this result".into());
    }
    let mut yhi = 1f64;
    let mut bars = Vec::new(); // (phase index, server index, value)
    for (pi, (p, _)) in phases.iter().enumerate() {
        for (si, (s, _)) in servers.iter().enumerate() {
            if let Some(f) = med(v, s, |r| r[*p]["frames_per_sec"].as_f64()) {
                yhi = yhi.max(f);
                bars.push((pi, si, f));
            }
        }
    }
    let n = SERVERS
        .iter()
        .find_map(|(s, _)| v[*s].as_array()?.first()?["connections"].as_u64())
        .unwrap_or(0);
    let root: DrawingArea<SVGBackend, Shift> = SVGBackend::new(file, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ylo = 100f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "Frames delivered per second, by phase ({n} connections){}",
                commit(v)
            ),
            ("sans-serif", 17),
        )
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..phases.len() as f64, log_axis(ylo..yhi * 3.0))
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc("frames/s (log)")
        .y_label_formatter(&|y| fmt_si(*y))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(err)?;
    let k = servers.len() as f64;
    let width = 0.8 / k;
    for (si, (s, colour)) in servers.iter().enumerate() {
        let c = *colour;
        let mine: Vec<_> = bars.iter().filter(|b| b.1 == si).collect();
        chart
            .draw_series(mine.iter().map(|&&(pi, _, f)| {
                let x0 = pi as f64 + 0.1 + si as f64 * width;
                Rectangle::new([(x0, ylo), (x0 + width * 0.92, f)], c.filled())
            }))
            .map_err(err)?
            .label(server_name(v, s))
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        chart
            .draw_series(mine.iter().map(|&&(pi, _, f)| {
                let x0 = pi as f64 + 0.1 + si as f64 * width;
                Text::new(
                    fmt_si(f),
                    (x0, f * 1.25),
                    ("sans-serif", 12).into_font().color(&BLACK),
                )
            }))
            .map_err(err)?;
    }
    // Phase names under the axis, centred on their group.
    for (pi, (_, name)) in phases.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(pi as f64 + 0.5, ylo));
        let style = ("sans-serif", 14).into_font().color(&BLACK).pos(
            plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ),
        );
        root.draw(&Text::new(*name, (px, py + 10), style))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK.mix(0.3))
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// 1.5k, 2M, 950 — short numbers for axes and labels.
fn fmt_si(v: f64) -> String {
    let a = v.abs();
    let (x, suffix) = if a >= 1e6 {
        (v / 1e6, "M")
    } else if a >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    let s = if x.abs() >= 10.0 || x.fract().abs() < 0.05 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    };
    format!("{s}{suffix}")
}

fn fmt_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{} s", fmt_si(v / 1e3))
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, rate: f64, p50: u64, p99: u64) -> Value {
        serde_json::json!({
            "label": label, "replicas": 1, "connections": 1000, "rss_idle": 30e6 + rate,
            "idle_bytes_per_conn": 900.0,
            "unicast": {"latency": {"p50_us": p50, "p99_us": p99}, "complete_pct": 100.0,
                        "frames_per_sec": rate},
            "fanout": {"frames_per_sec": 2e6},
        })
    }

    #[test]
    fn draws_every_kind_of_figure() {
        let dir = std::env::temp_dir().join(format!("loadtest-plot-{}", std::process::id()));
        let points: Vec<Value> = [1000.0, 5000.0]
            .iter()
            .map(|&x| {
                serde_json::json!({"x": x, "wsnotify": [run("w", x, 500, 9000)],
                                   "baseline": [run("b", x, 900, 150_000)]})
            })
            .collect();
        let sweep = serde_json::json!({"commit": "abc", "sweep": "unicast", "points": points});
        let idle = serde_json::json!({"commit": "abc", "sweep": "idle", "points": points});
        let cmp = serde_json::json!({"commit": "abc", "wsnotify": [run("w", 10.0, 1, 2)],
                                     "baseline": [run("b", 20.0, 1, 2)]});
        for v in [sweep, idle, cmp] {
            let files = from_value(&v, &dir).unwrap();
            let svg = std::fs::read_to_string(&files[0]).unwrap();
            assert!(svg.starts_with("<svg"), "{}", &svg[..40]);
            assert!(svg.contains("wsnotify") && svg.contains("baseline"));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn short_numbers() {
        assert_eq!(fmt_si(2_120_000.0), "2.1M");
        assert_eq!(fmt_si(19_000.0), "19k");
        assert_eq!(fmt_si(847.0), "847");
        assert_eq!(fmt_ms(0.5), "0.50");
        assert_eq!(fmt_ms(2500.0), "2.5 s");
    }
}
