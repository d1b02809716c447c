//! Operations: `GET /metrics` and `refex status` against real `refex run` processes, and the
//! shipped alert rules (promtool) and Grafana dashboard (every metric it uses is scraped).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chrono::Utc;

use crate::harness::{referral, wait_until, Federation, Node};

const WAIT: Duration = Duration::from_secs(30);

/// Short retry windows and a one-second peer-down threshold.
const CONFIG: &str = "[intake]\nsettle_ms = 100\n[delivery]\nretry_initial_ms = 100\nretry_max_ms = 500\n[limits]\nhandshake_timeout_ms = 500\nrequest_timeout_ms = 1000\n[telemetry]\npeer_down_warn_secs = 1\n";

/// A free loopback TCP address for a metrics listener.
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Serves metrics on a fresh address, set through the environment override.
fn with_metrics(node: &mut Node) -> String {
    let addr = free_addr();
    node.extra_env
        .push(("REFEX__TELEMETRY__METRICS_ADDR".into(), addr.clone()));
    addr
}

/// `GET path` over plain HTTP/1.1: (status code, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (code, body.to_owned())
}

fn scrape(addr: &str) -> String {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample `series` (name with its labels, as encoded), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A referral for `area` with `referred_at` `days_ago` days before now (2 working days later
/// it is past due).
fn referral_at(source_ref: &str, area: &str, days_ago: i64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(&referral(source_ref, area)).unwrap();
    let at = Utc::now() - chrono::Duration::days(days_ago);
    v["referred_at"] = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true).into();
    v["consent"]["explicit"]["recorded_at"] = v["referred_at"].clone();
    v.to_string()
}

#[test]
fn a_delivery_shows_in_the_metrics_of_both_ends_and_status_is_healthy() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], CONFIG);
    let wm_addr = with_metrics(fed.node_mut("west-midlands"));
    let ldn_addr = with_metrics(fed.node_mut("london"));
    fed.start_all();
    let wm = fed.node("west-midlands");
    wm.drop_file("a.json", referral_at("MT-1", "london", 0).as_bytes());
    wm.drop_file("bad.json", b"{ not json");
    wait_until(WAIT, "the referral in london's inbox", || {
        fed.node("london").inbox_files().len() == 1
    });
    wait_until(WAIT, "the delivery to be counted", || {
        sample(
            &scrape(&wm_addr),
            r#"refex_envelopes_sent_total{peer="london"}"#,
        ) == Some(1.0)
    });
    let wm_text = scrape(&wm_addr);
    for (series, want) in [
        (
            r#"refex_outbox_queued{peer="london",priority="standard"}"#,
            0.0,
        ),
        (
            r#"refex_outbox_queued{peer="london",priority="enhanced"}"#,
            0.0,
        ),
        (r#"refex_referrals_past_due{peer="london"}"#, 0.0),
        (r#"refex_peer_up{peer="london"}"#, 1.0),
        ("refex_audit_writable", 1.0),
        ("refex_intake_paused", 0.0),
        (
            &format!(
                r#"refex_build_info{{version="{}"}}"#,
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
    ] {
        assert_eq!(
            sample(&wm_text, series),
            Some(want),
            "{series} in:\n{wm_text}"
        );
    }
    assert!(sample(&wm_text, "refex_audit_records_total").unwrap() >= 3.0);
    assert!(sample(&wm_text, "process_resident_memory_bytes").unwrap() > 0.0);
    assert!(sample(&wm_text, "process_open_fds").unwrap() > 0.0);
    assert!(
        wm_text
            .lines()
            .any(|l| l.starts_with("refex_refusals_total{rule=")),
        "the refused file is counted by rule:\n{wm_text}"
    );
    let ldn_text = scrape(&ldn_addr);
    assert_eq!(
        sample(
            &ldn_text,
            r#"refex_envelopes_received_total{peer="west-midlands"}"#
        ),
        Some(1.0),
        "{ldn_text}"
    );
    assert_eq!(get(&wm_addr, "/").0, 404);
    assert_eq!(get(&wm_addr, "/metrics/../status").0, 404);

    let (code, v) = wm.status_json();
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["peers"]["london"]["sent"], 1);
    let (code, table, _) = wm.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("HEALTHY") && table.contains("london"),
        "{table}"
    );

    // The dashboard and the alert rules use only metrics this node exposes.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().unwrap() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    exprs.push(std::fs::read_to_string(root.join("refex.alerts.yml")).unwrap());
    let names = metric_names(&exprs.join("\n"));
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        assert!(
            exposed(&wm_text, name),
            "{name} is used by the dashboard or alerts but not exposed:\n{wm_text}"
        );
    }
}

/// Every `refex_…` and `process_…` identifier in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("refex_") || w.starts_with("process_"))
        .map(str::to_owned)
        .collect()
}

/// True when `name` is a family in the scrape (`# TYPE`, with its `_total`/`_info` sample suffix).
fn exposed(text: &str, name: &str) -> bool {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .any(|l| {
            let family = l.split_whitespace().next().unwrap_or("");
            name == family || name == format!("{family}_total") || name == format!("{family}_info")
        })
}

#[test]
fn status_is_degraded_naming_the_down_peer_and_the_past_due_referral() {
    let mut fed = Federation::with_config(&["west-midlands", "london"], CONFIG);
    let addr = with_metrics(fed.node_mut("west-midlands"));
    fed.node_mut("west-midlands").start();
    let wm = fed.node("west-midlands");
    wm.drop_file("late.json", referral_at("MT-2", "london", 7).as_bytes());
    wait_until(
        WAIT,
        "status to report london down and the referral past due",
        || {
            let (code, v) = wm.status_json();
            let kinds: Vec<&str> = v["problems"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["peer"] == "london")
                .filter_map(|p| p["problem"].as_str())
                .collect();
            code == 2 && kinds.contains(&"peer_down") && kinds.contains(&"past_due")
        },
    );
    let (code, v) = wm.status_json();
    assert_eq!(v["healthy"], false);
    assert_eq!(v["peers"]["london"]["up"], false, "{v:#}");
    assert!(
        v["peers"]["london"]["last_error_message"].is_string(),
        "{v:#}"
    );
    assert_eq!(code, 2);
    let (code, table, _) = wm.cli(&["status"]);
    assert_eq!(code, 2);
    assert!(table.contains("DEGRADED"), "{table}");
    assert!(
        table.contains("PROBLEM peer_down: london unreachable"),
        "{table}"
    );
    assert!(table.contains("PROBLEM past_due"), "{table}");
    let text = scrape(&addr);
    assert_eq!(
        sample(&text, r#"refex_peer_up{peer="london"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"refex_referrals_past_due{peer="london"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"refex_outbox_queued{peer="london",priority="standard"}"#
        ),
        Some(1.0)
    );
    assert!(sample(&text, r#"refex_retries_total{peer="london"}"#).unwrap() >= 1.0);
    assert!(sample(&text, r#"refex_outbox_oldest_seconds{peer="london"}"#).unwrap() > 0.0);
}

#[test]
fn status_exits_1_when_no_daemon_answers() {
    let fed = Federation::new(&["west-midlands"]);
    let (code, out, err) = fed.node("west-midlands").cli(&["status"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("does not answer"), "{err}");
}

#[test]
fn a_non_loopback_metrics_address_is_refused_unless_allowed() {
    let fed = Federation::new(&["west-midlands"]);
    let node = fed.node("west-midlands");
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_refex"));
        c.args(["check-config", "--config"]).arg(&node.config);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[("REFEX__TELEMETRY__METRICS_ADDR", "0.0.0.0:9464")]);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("telemetry.metrics_addr") && err.contains("metrics_allow_remote"),
        "{err}"
    );
    let (code, err) = run(&[
        ("REFEX__TELEMETRY__METRICS_ADDR", "0.0.0.0:9464"),
        ("REFEX__TELEMETRY__METRICS_ALLOW_REMOTE", "true"),
    ]);
    assert_eq!(code, Some(0), "{err}");
}

/// The shipped alert rules load and pass their unit tests (promtool, from Debian's
/// `prometheus` package; `.ci/run` installs it when missing).
#[test]
fn the_alert_rules_pass_promtool() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for args in [
        ["check", "rules", "refex.alerts.yml"],
        ["test", "rules", "refex.alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&config)
            .output()
            .unwrap_or_else(|e| panic!("promtool is required (apt-get install prometheus): {e}"));
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
