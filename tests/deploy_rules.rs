//! The monitoring in `deploy/` against the metrics conveyor declares: the Prometheus alert rules
//! (`deploy/prometheus/conveyor-rules.yml`) name one rule per `conveyor_alert` name and the
//! independent rules, each with a `for`, a severity and a runbook summary; their unit tests
//! (`conveyor-rules.test.yml`) see every alert fire and stay quiet; the Grafana dashboard parses;
//! and every metric a rule or panel queries is one `src/metrics.rs` declares (or `up`). When
//! `promtool` is on PATH it checks and runs the rules and parses every dashboard query; without it
//! that part is skipped with a note, and the static checks still run.
//!
//! The rule files are read with a small line-based reader for the subset of YAML they use
//! (block mappings, `|-` blocks, quoted scalars): serde_yaml is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The names the daemon evaluates itself and exports as `conveyor_alert{pipeline, name}`, with
/// the rule that alerts on each.
const DAEMON_ALERTS: &[(&str, &str)] = &[
    ("stalled", "ConveyorStalled"),
    ("errors", "ConveyorErrors"),
    ("low_rate", "ConveyorLowRate"),
    ("slow_handoff", "ConveyorSlowHandoff"),
    ("consolidation_failed", "ConveyorConsolidationFailed"),
];

/// Rules computed in Prometheus from the raw metrics, with a fragment each expression must hold.
const INDEPENDENT_ALERTS: &[(&str, &[&str])] = &[
    (
        "ConveyorNoRowsLoaded",
        &["conveyor_rows_loaded_total", "conveyor_queue_depth"],
    ),
    ("ConveyorRowsRejected", &["conveyor_rows_rejected_total"]),
    (
        "ConveyorHandoffGapHigh",
        &[
            "histogram_quantile(0.99",
            "conveyor_handoff_gap_seconds_bucket",
            "> 1",
        ],
    ),
    (
        "ConveyorConsolidationRunsFailed",
        &["increase(conveyor_consolidation_runs_total{result=\"1\"}[1h])"],
    ),
    ("ConveyorSpoolFailing", &["conveyor_spool_failing == 1"]),
    ("ConveyorTargetDown", &["up{job=\"conveyor\"} == 0"]),
    ("ConveyorNoActiveWorker", &["conveyor_active_worker"]),
    ("ConveyorWorkerWedged", &["conveyor_workers_wedged > 0"]),
    (
        "ConveyorWorkerRestarting",
        &["increase(conveyor_worker_restarts_total[15m])"],
    ),
];

/// Metrics the dashboard must show (histograms by their buckets).
const DASHBOARD_METRICS: &[&str] = &[
    "conveyor_rows_loaded_total",
    "conveyor_rows_rejected_total",
    "conveyor_row_latency_seconds_bucket",
    "conveyor_batch_commit_seconds_bucket",
    "conveyor_handoff_gap_seconds_bucket",
    "conveyor_queue_depth",
    "conveyor_active_worker",
    "conveyor_jobs_total",
    "conveyor_spool_bytes",
    "conveyor_spool_fsync_seconds_bucket",
    "conveyor_consolidation_runs_total",
    "conveyor_error_history_rows",
    "conveyor_alert",
];

/// `conveyor_alert` is exported by the daemon's alert evaluation (`metrics::ALERT`); accepted
/// even while src/metrics.rs does not declare it yet.
const ALERT_METRIC: &str = "conveyor_alert";

const SEVERITIES: &[&str] = &["critical", "warning", "info"];

#[test]
fn rules_cover_every_alert_with_a_runbook() {
    let rules = parse_rules(&read("deploy/prometheus/conveyor-rules.yml"));
    let by_name: BTreeMap<&str, &Rule> = rules.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(by_name.len(), rules.len(), "two rules share a name");

    for (name, alert) in DAEMON_ALERTS {
        let selector = format!("conveyor_alert{{name=\"{name}\"}}");
        let rule = by_name
            .get(alert)
            .unwrap_or_else(|| panic!("no rule {alert} for conveyor_alert name {name}"));
        assert!(
            rule.expr.contains(&selector),
            "{alert} does not select {selector}: {}",
            rule.expr
        );
    }
    for (alert, fragments) in INDEPENDENT_ALERTS {
        let rule = by_name
            .get(alert)
            .unwrap_or_else(|| panic!("no independent rule {alert}"));
        for f in *fragments {
            assert!(
                rule.expr.contains(f),
                "{alert} should contain {f:?}: {}",
                rule.expr
            );
        }
    }

    for r in &rules {
        let for_ = r
            .for_
            .as_deref()
            .unwrap_or_else(|| panic!("{} has no `for:`", r.name));
        assert!(
            is_duration(for_),
            "{}: `for: {for_}` is not a duration",
            r.name
        );
        let severity = r.labels.get("severity").map(String::as_str);
        assert!(
            severity.is_some_and(|s| SEVERITIES.contains(&s)),
            "{}: severity label {severity:?} is not one of {SEVERITIES:?}",
            r.name
        );
        for key in ["summary", "description"] {
            let text = r.annotations.get(key).map(String::as_str).unwrap_or("");
            assert!(!text.trim().is_empty(), "{}: no {key} annotation", r.name);
        }
        let description = &r.annotations["description"];
        for word in ["Check", "Act"] {
            assert!(
                description.contains(word),
                "{}: the description should say what to check and what to do ({word}:)",
                r.name
            );
        }
        assert!(
            description.contains("conveyor ") && description.contains('`'),
            "{}: the description should name a conveyor command to run",
            r.name
        );
    }
}

#[test]
fn rules_query_only_declared_metrics() {
    let declared = declared_metrics();
    for r in parse_rules(&read("deploy/prometheus/conveyor-rules.yml")) {
        let names = metric_names(&r.expr).unwrap_or_else(|e| panic!("{}: {e}", r.name));
        assert!(!names.is_empty(), "{}: no metric in {}", r.name, r.expr);
        for m in names {
            assert!(
                is_declared(&m, &declared),
                "rule {} queries {m}, which src/metrics.rs does not declare",
                r.name
            );
        }
    }
}

#[test]
fn rule_tests_see_every_alert_fire_and_stay_quiet() {
    let rules = parse_rules(&read("deploy/prometheus/conveyor-rules.yml"));
    let tests = read("deploy/prometheus/conveyor-rules.test.yml");
    assert!(
        tests.contains("conveyor-rules.yml"),
        "the rule tests do not load conveyor-rules.yml"
    );
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    let mut current: Option<String> = None;
    for line in tests.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("alertname:") {
            current = Some(name.trim().to_string());
        } else if let Some(alert) = &current {
            if t.starts_with("exp_alerts: []") {
                quiet.insert(alert.clone());
            } else if t.starts_with("- exp_labels:") {
                fires.insert(alert.clone());
            }
        }
    }
    for r in &rules {
        assert!(
            fires.contains(&r.name),
            "no rule test where {} fires",
            r.name
        );
        assert!(
            quiet.contains(&r.name),
            "no rule test where {} stays quiet",
            r.name
        );
    }
}

#[test]
fn dashboard_parses_and_queries_only_declared_metrics() {
    let text = read("deploy/grafana/conveyor-dashboard.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is not JSON");
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 36, "schemaVersion {schema} < 36");
    assert!(
        dash["__inputs"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["name"] == "DS_PROMETHEUS")),
        "the dashboard has no DS_PROMETHEUS input"
    );
    let pipeline = dash["templating"]["list"]
        .as_array()
        .and_then(|l| l.iter().find(|v| v["name"] == "pipeline"))
        .expect("no pipeline template variable");
    let query = pipeline["query"]["query"]
        .as_str()
        .or(pipeline["query"].as_str())
        .unwrap_or("");
    assert_eq!(query, "label_values(conveyor_rows_loaded_total, pipeline)");

    let declared = declared_metrics();
    let exprs = dashboard_exprs(&dash);
    assert!(!exprs.is_empty(), "the dashboard has no queries");
    let mut shown = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr).unwrap_or_else(|e| panic!("panel {title:?}: {e}"));
        for m in names {
            assert!(
                is_declared(&m, &declared),
                "panel {title:?} queries {m}, which src/metrics.rs does not declare"
            );
            shown.insert(m);
        }
    }
    for m in DASHBOARD_METRICS {
        assert!(shown.contains(*m), "no dashboard panel shows {m}");
    }
    let mut panels = Vec::new();
    collect_panels(&dash["panels"], &mut panels);
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {:?} does not use the DS_PROMETHEUS input",
            p["title"]
        );
    }
}

#[test]
fn promtool_checks_and_tests_the_rules() {
    if !promtool_available() {
        println!("promtool is not on PATH: skipped `promtool check rules` / `promtool test rules` (static checks still ran)");
        return;
    }
    promtool(&["check", "rules", "deploy/prometheus/conveyor-rules.yml"]);
    promtool(&["test", "rules", "deploy/prometheus/conveyor-rules.test.yml"]);

    // Every dashboard query, with Grafana's variables filled in, as a recording rule: promtool
    // parses each one.
    let dash: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/conveyor-dashboard.json")).unwrap();
    let mut yaml = String::from("groups:\n  - name: conveyor_dashboard\n    rules:\n");
    for (i, (_, expr)) in dashboard_exprs(&dash).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "6h")
            .replace("$pipeline", ".*");
        let quoted = serde_json::to_string(&expr).unwrap();
        yaml.push_str(&format!(
            "      - record: conveyor_dashboard:query_{i}\n        expr: {quoted}\n"
        ));
    }
    let path = std::env::temp_dir().join(format!(
        "conveyor-dashboard-queries-{}.yml",
        std::process::id()
    ));
    std::fs::write(&path, yaml).unwrap();
    let ok = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("run promtool");
    let _ = std::fs::remove_file(&path);
    assert!(
        ok.status.success(),
        "promtool rejects a dashboard query:\n{}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[test]
fn the_metric_scanner_finds_metrics_and_only_metrics() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (pipeline, le) (rate(conveyor_a_bucket{pipeline=~"$pipeline", le!="conveyor_b"}[$__rate_interval]))) > 1
           or on (pipeline) max without (slot) (conveyor_c offset 1h) unless ignoring (x) up == bool 0"#,
    )
    .unwrap();
    assert_eq!(names, ["conveyor_a_bucket", "conveyor_c", "up"]);
    assert!(metric_names("rat(conveyor_a[5m])").is_err());

    let declared: BTreeSet<String> = ["conveyor_h".to_string()].into();
    assert!(is_declared("conveyor_h_bucket", &declared));
    assert!(is_declared("conveyor_alert", &declared));
    assert!(is_declared("up", &declared));
    assert!(!is_declared("conveyor_hh", &declared));
    assert!(!is_declared("node_load1", &declared));
}

// ---- what src/metrics.rs declares ---------------------------------------------------------

/// Every `"conveyor_…"` string literal in src/metrics.rs.
fn declared_metrics() -> BTreeSet<String> {
    let src = read("src/metrics.rs");
    let mut out = BTreeSet::new();
    let mut rest = src.as_str();
    while let Some(at) = rest.find("\"conveyor_") {
        let lit = &rest[at + 1..];
        let end = lit
            .find('"')
            .expect("unterminated string in src/metrics.rs");
        out.insert(lit[..end].to_string());
        rest = &lit[end + 1..];
    }
    assert!(
        out.contains("conveyor_rows_loaded_total"),
        "src/metrics.rs declares no conveyor_ metrics: {out:?}"
    );
    out
}

/// A declared name, a histogram's `_bucket`/`_sum`/`_count` series, `conveyor_alert` or `up`.
fn is_declared(name: &str, declared: &BTreeSet<String>) -> bool {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s).filter(|b| declared.contains(*b)));
    declared.contains(name) || base.is_some() || name == ALERT_METRIC || name == "up"
}

// ---- PromQL: which identifiers are metric names ------------------------------------------

/// PromQL keywords: the first six take a label list in parentheses.
const LABEL_LIST_KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
];
const FUNCTIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "resets",
    "changes",
    "histogram_quantile",
    "abs",
    "absent",
    "absent_over_time",
    "clamp",
    "clamp_min",
    "clamp_max",
    "ceil",
    "floor",
    "round",
    "vector",
    "scalar",
    "time",
    "timestamp",
    "label_replace",
    "label_join",
    "sort",
    "sort_desc",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "present_over_time",
    "quantile_over_time",
];

/// The metric names an expression selects, in order; an error for an unknown function.
/// Skips strings, Grafana variables (`$x`, `${x}`), numbers and durations, label matchers
/// (`{…}`), label lists after `by`/`on`/…, keywords and function names.
fn metric_names(expr: &str) -> Result<Vec<String>, String> {
    let c: Vec<char> = expr.chars().collect();
    let ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';
    let (mut out, mut i, mut braces) = (Vec::new(), 0, 0usize);
    let (mut label_list, mut expect_list) = (false, false);
    while i < c.len() {
        let ch = c[i];
        match ch {
            '"' | '\'' | '`' => {
                i += 1;
                while i < c.len() && c[i] != ch {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '$' => {
                i += 1;
                if c.get(i) == Some(&'{') {
                    while i < c.len() && c[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < c.len() && ident(c[i]) {
                        i += 1;
                    }
                }
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '(' => {
                label_list = std::mem::take(&mut expect_list);
                i += 1;
            }
            ')' => {
                label_list = false;
                i += 1;
            }
            _ if ch.is_ascii_digit() || ch == '.' => {
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                    i += 1;
                }
            }
            _ if ch.is_ascii_alphabetic() || ch == '_' || ch == ':' => {
                let start = i;
                while i < c.len() && ident(c[i]) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                let lower = word.to_ascii_lowercase();
                let next = c[i..].iter().find(|ch| !ch.is_whitespace());
                if braces > 0 || label_list {
                    continue;
                }
                let known =
                    KEYWORDS.contains(&lower.as_str()) || FUNCTIONS.contains(&word.as_str());
                if LABEL_LIST_KEYWORDS.contains(&lower.as_str()) {
                    expect_list = next == Some(&'(');
                } else if known {
                    continue;
                } else if next == Some(&'(') {
                    return Err(format!("unknown function {word} in {expr}"));
                } else {
                    out.push(word);
                }
            }
            _ => i += 1,
        }
    }
    Ok(out)
}

// ---- the dashboard -----------------------------------------------------------------------

/// Panels, including those nested in collapsed rows.
fn collect_panels<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
    for p in panels.as_array().into_iter().flatten() {
        out.push(p);
        collect_panels(&p["panels"], out);
    }
}

/// (panel title, expr) of every query in the dashboard.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<(String, String)> {
    let mut panels = Vec::new();
    collect_panels(&dash["panels"], &mut panels);
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((title.clone(), expr.to_string()));
            }
        }
    }
    out
}

// ---- the rule file: a line-based reader for the YAML subset it uses ----------------------

#[derive(Debug)]
struct Rule {
    name: String,
    expr: String,
    for_: Option<String>,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
}

#[derive(Debug)]
enum Node {
    Scalar(String),
    Map(Vec<(String, Node)>),
}

/// Every `- alert:` item of the file, read as a block mapping.
fn parse_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let dash = indent(line);
        if !line.trim_start().starts_with("- alert:") {
            assert!(
                !line.trim_start().starts_with("- record:"),
                "recording rules are not expected in the alert file"
            );
            i += 1;
            continue;
        }
        let mut item = vec![format!("{}  {}", " ".repeat(dash), &line[dash + 2..])];
        i += 1;
        while i < lines.len() && (is_blank(lines[i]) || indent(lines[i]) > dash) {
            item.push(lines[i].to_string());
            i += 1;
        }
        let item: Vec<&str> = item.iter().map(String::as_str).collect();
        let map = parse_map(&item, dash + 2);
        let get = |k: &str| map.iter().find(|(key, _)| key == k).map(|(_, v)| v);
        let scalar = |k: &str| match get(k) {
            Some(Node::Scalar(s)) => Some(s.clone()),
            Some(Node::Map(_)) => panic!("`{k}` should be a scalar"),
            None => None,
        };
        let submap = |k: &str| match get(k) {
            Some(Node::Map(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Node::Scalar(s) => (k.clone(), s.clone()),
                    Node::Map(_) => panic!("`{k}` should be a scalar"),
                })
                .collect(),
            Some(Node::Scalar(s)) if s.is_empty() => BTreeMap::new(),
            Some(Node::Scalar(s)) => panic!("expected a block mapping, got {s:?}"),
            None => BTreeMap::new(),
        };
        let name = scalar("alert").unwrap();
        rules.push(Rule {
            expr: scalar("expr").unwrap_or_else(|| panic!("{name} has no expr")),
            for_: scalar("for"),
            labels: submap("labels"),
            annotations: submap("annotations"),
            name,
        });
    }
    assert!(!rules.is_empty(), "no `- alert:` rules found");
    rules
}

/// A block mapping whose keys sit at column `at`: `key: scalar`, `key: |-` / `|` / `>` blocks,
/// and `key:` followed by a deeper mapping. Comment lines between keys are skipped.
fn parse_map(lines: &[&str], at: usize) -> Vec<(String, Node)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if is_blank(line) || line.trim_start().starts_with('#') {
            i += 1;
            continue;
        }
        assert_eq!(indent(line), at, "unexpected indentation: {line:?}");
        let (key, rest) = line
            .trim()
            .split_once(':')
            .unwrap_or_else(|| panic!("not a `key: value` line: {line:?}"));
        let rest = rest.trim();
        i += 1;
        let start = i;
        while i < lines.len() && (is_blank(lines[i]) || indent(lines[i]) > at) {
            i += 1;
        }
        let child = &lines[start..i];
        let node = match rest {
            "|" | "|-" | ">" | ">-" => Node::Scalar(block_scalar(child, rest)),
            "" if child.iter().any(|l| !is_blank(l)) => {
                let deeper = child.iter().find(|l| !is_blank(l)).map_or(0, |l| indent(l));
                Node::Map(parse_map(child, deeper))
            }
            _ => {
                assert!(
                    child
                        .iter()
                        .all(|l| is_blank(l) || l.trim_start().starts_with('#')),
                    "`{key}`: a multi-line plain scalar is not supported; use `|-`"
                );
                Node::Scalar(unquote(rest))
            }
        };
        out.push((key.trim().to_string(), node));
    }
    out
}

fn block_scalar(lines: &[&str], style: &str) -> String {
    let at = lines.iter().find(|l| !is_blank(l)).map_or(0, |l| indent(l));
    let body: Vec<&str> = lines
        .iter()
        .map(|l| if is_blank(l) { "" } else { &l[at..] })
        .collect();
    let text = if style.starts_with('>') {
        body.join(" ")
    } else {
        body.join("\n")
    };
    if style.ends_with('-') {
        text.trim_end().to_string()
    } else {
        format!("{}\n", text.trim_end())
    }
}

fn unquote(s: &str) -> String {
    if let Some(inner) = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        inner.replace("\\\"", "\"").replace("\\\\", "\\")
    } else if let Some(inner) = s.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        inner.replace("''", "'")
    } else {
        s.split(" #").next().unwrap_or(s).trim().to_string()
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

/// `0m`, `90s`, `1h30m`: Prometheus durations.
fn is_duration(s: &str) -> bool {
    let mut digits = false;
    let mut units = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let n = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if n == 0 {
            return false;
        }
        digits = true;
        rest = &rest[n..];
        let Some(unit) = ["ms", "s", "m", "h", "d", "w", "y"]
            .into_iter()
            .find(|u| rest.starts_with(u))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
        units += 1;
    }
    digits && units > 0
}

// ---- helpers -----------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path: &Path = &root().join(rel);
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn promtool_available() -> bool {
    Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .expect("run promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("promtool {}:\n{text}", args.join(" "));
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
}
