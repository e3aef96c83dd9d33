//! The operators' files in `deploy/` against the real gateway: the Grafana dashboard
//! (`deploy/grafana/wsnotify-dashboard.json`) and the Prometheus alert rules
//! (`deploy/prometheus/alerts.yml`).
//!
//! Every PromQL expression in them must parse, and every `wsnotify_*` / `process_*` metric they
//! name — with the label values they match on — must exist in a real `/metrics` scrape of the
//! gateway running against the real broker. Names are read from the files themselves, so a new
//! panel or rule is checked without touching this test. A metric that the gateway renders only
//! in some configuration needs that configuration in [`SCRAPED_CONFIGS`]. (`promtool check rules`
//! and `promtool test rules` run from scripts/test.sh when promtool is installed.)

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::support::*;
use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, VectorSelector};
use promql_parser::util::{ExprVisitor, walk_expr};
use serde_json::Value;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/wsnotify-dashboard.json"
);
const ALERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");

/// Metrics the gateway itself exposes; other names (e.g. Prometheus's own `up`) are not checked.
const OWN_PREFIXES: [&str; 2] = ["wsnotify_", "process_"];
/// Labels Prometheus attaches at scrape time, so they are not in `/metrics`.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];
/// Gateway configurations (environment on top of the test defaults, with the real broker)
/// whose scrapes together must cover every metric used. Every metric the gateway has today is
/// rendered from start-up, zero-valued, in the default configuration.
const SCRAPED_CONFIGS: &[&[(&str, &str)]] = &[&[]];
/// The data source variable every panel must use, so the dashboard imports anywhere.
const DS_VARIABLE: &str = "DS_PROMETHEUS";

/// One PromQL expression and where it came from, for the failure message.
struct Query {
    origin: String,
    expr: String,
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(DASHBOARD).expect("read the dashboard");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// Every panel, including those nested in collapsed rows.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

fn dashboard_queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push(Query {
                    origin: format!(
                        "dashboard panel {} {:?}, query {}",
                        p["id"],
                        p["title"].as_str().unwrap_or(""),
                        t["refId"].as_str().unwrap_or("?")
                    ),
                    expr: expr.to_owned(),
                });
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let q = v["query"]["query"].as_str().or(v["query"].as_str());
        if let Some(expr) = q.and_then(variable_query_expr) {
            out.push(Query {
                origin: format!("dashboard variable {}", v["name"].as_str().unwrap_or("?")),
                expr: expr.to_owned(),
            });
        }
    }
    out
}

/// The PromQL inside a Grafana variable query: `label_values(<selector>, label)` or
/// `query_result(<expr>)`. `label_values(label)` and `label_names()` name no metric.
fn variable_query_expr(q: &str) -> Option<&str> {
    let q = q.trim();
    if let Some(inner) = q
        .strip_prefix("label_values(")
        .and_then(|r| r.strip_suffix(')'))
    {
        return inner.rsplit_once(',').map(|(sel, _label)| sel.trim());
    }
    q.strip_prefix("query_result(")
        .and_then(|r| r.strip_suffix(')'))
}

#[derive(serde::Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(serde::Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(serde::Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(default)]
    labels: HashMap<String, String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

fn alert_rules() -> RuleFile {
    let text = std::fs::read_to_string(ALERTS).expect("read the alert rules");
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{ALERTS}: {e}"))
}

fn alert_queries(rules: &RuleFile) -> Vec<Query> {
    let mut out = Vec::new();
    for g in &rules.groups {
        for r in &g.rules {
            let name = r.alert.as_deref().or(r.record.as_deref()).unwrap_or("?");
            out.push(Query {
                origin: format!("alert rule {}/{name}", g.name),
                expr: r.expr.clone(),
            });
        }
    }
    out
}

/// Replaces Grafana's variables with values PromQL accepts: `$__rate_interval`, `$__interval`
/// and the other built-ins (all durations where they may appear) with `5m`, and dashboard
/// variables (used in label matchers, `instance=~"$instance"`) with `.+`.
fn substitute_grafana_variables(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(braced) => {
                let end = braced.find('}').unwrap_or(braced.len());
                let name = braced[..end].split(':').next().unwrap_or("");
                (name, (end + 2).min(after.len()))
            }
            None => {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        out.push_str(if name.starts_with("__") { "5m" } else { ".+" });
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// A metric name with the label matchers applied to it.
struct Selector {
    name: String,
    matchers: Vec<Matcher>,
}

/// The vector selectors in `expr` that name one of the gateway's own metrics.
fn own_selectors(expr: &str) -> Result<Vec<Selector>, String> {
    struct Collect(Vec<Selector>);
    impl Collect {
        fn add(&mut self, vs: &VectorSelector) {
            let matchers: Vec<Matcher> = vs.matchers.matchers.clone();
            let name = vs.name.clone().or_else(|| {
                matchers
                    .iter()
                    .find(|m| m.name == "__name__" && m.op == MatchOp::Equal)
                    .map(|m| m.value.clone())
            });
            if let Some(name) = name
                && OWN_PREFIXES.iter().any(|p| name.starts_with(p))
            {
                self.0.push(Selector { name, matchers });
            }
        }
    }
    impl ExprVisitor for Collect {
        type Error = String;
        fn pre_visit(&mut self, e: &Expr) -> Result<bool, String> {
            match e {
                Expr::VectorSelector(vs) => self.add(vs),
                Expr::MatrixSelector(ms) => self.add(&ms.vs),
                _ => {}
            }
            Ok(true)
        }
    }
    let ast = parser::parse(&substitute_grafana_variables(expr))?;
    let mut c = Collect(Vec::new());
    walk_expr(&mut c, &ast)?;
    Ok(c.0)
}

/// A `/metrics` exposition: metric families with their `# TYPE`, and every sample's labels.
#[derive(Default)]
struct Scrape {
    families: HashMap<String, String>,
    samples: HashMap<String, Vec<HashMap<String, String>>>,
}

impl Scrape {
    /// Adds a scrape. Each sample line's series (`name{label="value",...}`) is itself a PromQL
    /// selector, so the PromQL parser reads its labels, quoting and escapes included.
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut w = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                    self.families.insert(name.to_owned(), kind.to_owned());
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (series, _value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("sample line without a value: {line:?}"));
            let Ok(Expr::VectorSelector(vs)) = parser::parse(series) else {
                panic!("sample line not in the text format: {line:?}");
            };
            let name = vs.name.unwrap_or_else(|| panic!("no name in {line:?}"));
            let labels = vs
                .matchers
                .matchers
                .into_iter()
                .map(|m| (m.name, m.value))
                .collect();
            self.samples.entry(name).or_default().push(labels);
        }
    }

    /// Whether the scrape has the series `sel` selects: a counter or gauge by its name, a
    /// histogram by `_bucket`/`_sum`/`_count` (a summary by `_sum`/`_count`), and, for each
    /// label matcher, a series with that label and value (each literal alternative of a
    /// regex, too; patterns are not checked).
    fn check(&self, sel: &Selector) -> Result<(), String> {
        let name = sel.name.as_str();
        match self.families.get(name).map(String::as_str) {
            Some(kind @ ("histogram" | "summary")) => {
                return Err(format!(
                    "{name} is a {kind}: query {name}_bucket, {name}_sum or {name}_count"
                ));
            }
            Some(_) => {}
            None => {
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    match (self.families.get(base)?.as_str(), *suffix) {
                        ("histogram", _) | ("summary", "_sum" | "_count") => Some(base),
                        _ => None,
                    }
                });
                if family.is_none() {
                    return Err(format!("{name} is not in /metrics"));
                }
            }
        }
        let series = self
            .samples
            .get(name)
            .ok_or_else(|| format!("{name} has a # TYPE but no sample in /metrics"))?;
        for m in &sel.matchers {
            if m.name == "__name__" || TARGET_LABELS.contains(&m.name.as_str()) {
                continue;
            }
            let values: BTreeSet<&str> = series
                .iter()
                .filter_map(|labels| labels.get(&m.name).map(String::as_str))
                .collect();
            let wanted: Vec<&str> = match &m.op {
                MatchOp::Equal | MatchOp::NotEqual if !m.value.is_empty() => vec![&m.value],
                MatchOp::Re(_) | MatchOp::NotRe(_) => m
                    .value
                    .split('|')
                    .filter(|alt| {
                        !alt.is_empty()
                            && alt.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    })
                    .collect(),
                _ => Vec::new(),
            };
            if values.is_empty() {
                return Err(format!("{name} has no label {:?}", m.name));
            }
            for v in wanted {
                if !values.contains(v) {
                    return Err(format!(
                        "{name}{{{}{}\"{v}\"}} matches no series (values of {}: {values:?})",
                        m.name, m.op, m.name
                    ));
                }
            }
        }
        Ok(())
    }
}

#[test]
fn dashboard_imports_with_one_prometheus_data_source() {
    let _load = light_blocking();
    let d = dashboard();
    let ds_ref = serde_json::json!({"type": "prometheus", "uid": format!("${{{DS_VARIABLE}}}")});

    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let ds_vars: Vec<&Value> = vars.iter().filter(|v| v["type"] == "datasource").collect();
    assert_eq!(ds_vars.len(), 1, "exactly one data source variable");
    assert_eq!(ds_vars[0]["name"], DS_VARIABLE);
    assert_eq!(ds_vars[0]["query"], "prometheus");
    for v in vars.iter().filter(|v| v["type"] == "query") {
        assert_eq!(v["datasource"], ds_ref, "variable {}", v["name"]);
    }
    assert!(
        d["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty() && u.len() <= 40)
    );
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));

    let panels = panels(&d);
    assert!(panels.len() > 10, "only {} panels", panels.len());
    let mut ids = HashSet::new();
    let mut boxes: Vec<(u64, u64, u64, u64, &Value)> = Vec::new();
    for p in &panels {
        let what = format!("panel {} {:?}", p["id"], p["title"]);
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: no numeric id"));
        assert!(ids.insert(id), "{what}: duplicate id");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{what}");
        let g = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("{what}: gridPos.{k}"))
        });
        assert!(
            w > 0 && h > 0 && x + w <= 24,
            "{what}: gridPos {g} off the 24 columns"
        );
        for (bx, by, bw, bh, other) in &boxes {
            let apart = x + w <= *bx || *bx + bw <= x || y + h <= *by || *by + bh <= y;
            assert!(apart, "{what} overlaps panel {}", other["id"]);
        }
        boxes.push((x, y, w, h, p));
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"], ds_ref, "{what}: data source");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("{what}"));
        assert!(!targets.is_empty(), "{what}: no query");
        let mut ref_ids = HashSet::new();
        for t in targets {
            assert!(
                ref_ids.insert(t["refId"].to_string()),
                "{what}: refId twice"
            );
            assert_eq!(t["datasource"], ds_ref, "{what}: target data source");
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{what}: no expr"));
            if let Err(e) = parser::parse(&substitute_grafana_variables(expr)) {
                panic!("{what}: {expr:?} is not PromQL: {e}");
            }
        }
    }
}

#[test]
fn every_alert_rule_parses_and_says_what_to_do() {
    let _load = light_blocking();
    let rules = alert_rules();
    let alerts: Vec<&Rule> = rules.groups.iter().flat_map(|g| &g.rules).collect();
    assert!(alerts.len() >= 5, "only {} rules", alerts.len());
    for r in alerts {
        let name = r.alert.as_deref().expect("every rule is an alert");
        if let Err(e) = parser::parse(&r.expr) {
            panic!("{name}: {:?} is not PromQL: {e}", r.expr);
        }
        let severity = r.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity {severity:?}"
        );
        let summary = r.annotations.get("summary").map(String::as_str);
        assert!(
            summary.is_some_and(|s| s.len() > 40),
            "{name}: a summary saying what to do"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_in_the_dashboard_and_alerts_is_in_a_real_scrape() {
    let _load = light().await;
    let mut scrape = Scrape::default();
    for env in SCRAPED_CONFIGS {
        let q = unique("monitoring");
        let mut broker = Broker::connect().await;
        broker.declare(&q).await;
        let gw = Gateway::start(&q, env).await;
        let (status, body) = gw.get("/metrics").await;
        assert_eq!(status, 200);
        scrape.add(&body);
    }

    let mut queries = dashboard_queries(&dashboard());
    queries.extend(alert_queries(&alert_rules()));
    let mut used = BTreeSet::new();
    let mut missing = Vec::new();
    for q in &queries {
        let selectors = own_selectors(&q.expr)
            .unwrap_or_else(|e| panic!("{}: {:?} is not PromQL: {e}", q.origin, q.expr));
        for sel in selectors {
            if let Err(why) = scrape.check(&sel) {
                missing.push(format!("{}: {why}\n    in {}", q.origin, q.expr));
            }
            used.insert(sel.name);
        }
    }
    assert!(
        missing.is_empty(),
        "{} use(s) of metrics that a real /metrics scrape does not have:\n{}",
        missing.len(),
        missing.join("\n")
    );
    // What the on-call figures are made of, so the check cannot pass by finding nothing.
    for name in [
        "wsnotify_connections",
        "wsnotify_max_connections",
        "wsnotify_users",
        "wsnotify_messages_total",
        "wsnotify_delivery_latency_seconds_bucket",
        "wsnotify_closes_total",
        "wsnotify_broker_up",
        "wsnotify_ingest_active",
        "wsnotify_handshakes_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            used.contains(name),
            "{name} is used nowhere; used: {used:?}"
        );
    }

    // The checker itself refuses what it should, against the same scrape.
    for (expr, why) in [
        ("rate(wsnotify_nope_total[5m])", "not in /metrics"),
        ("wsnotify_delivery_latency_seconds", "is a histogram"),
        ("wsnotify_connections_count", "not in /metrics"),
        (
            r#"wsnotify_messages_total{outcome="dead_letter"}"#,
            "matches no series",
        ),
        (
            r#"wsnotify_closes_total{reason=~"slow_consumer|idle"}"#,
            "matches no series",
        ),
        (r#"wsnotify_users{outcome="x"}"#, "no label"),
    ] {
        let sel = own_selectors(expr).expect("parses").remove(0);
        let err = scrape.check(&sel).expect_err(expr);
        assert!(err.contains(why), "{expr}: {err}");
    }
    for expr in [
        r#"histogram_quantile(0.99, sum by (le) (rate(wsnotify_delivery_latency_seconds_bucket{job=~"$job"}[$__rate_interval])))"#,
        r#"wsnotify_delivery_latency_seconds_count / wsnotify_delivery_latency_seconds_sum"#,
        r#"wsnotify_messages_total{outcome!="dead_lettered",instance=~"$instance"}"#,
        r#"wsnotify_closes_total{reason=~"slow_consumer|dead_peer|.+"}"#,
    ] {
        for sel in own_selectors(expr).expect("parses") {
            scrape.check(&sel).unwrap_or_else(|e| panic!("{expr}: {e}"));
        }
    }
}

#[test]
fn grafana_variables_become_promql() {
    let _load = light_blocking();
    assert_eq!(
        substitute_grafana_variables(
            r#"rate(x{job=~"$job",instance=~"${instance:regex}"}[$__rate_interval])"#
        ),
        r#"rate(x{job=~".+",instance=~".+"}[5m])"#
    );
    assert_eq!(substitute_grafana_variables("x[${__range}]"), "x[5m]");
    assert_eq!(
        variable_query_expr(r#"label_values(wsnotify_connections{job=~"$job"}, instance)"#),
        Some(r#"wsnotify_connections{job=~"$job"}"#)
    );
    assert_eq!(variable_query_expr("label_values(job)"), None);
}
