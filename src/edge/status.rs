//! The human table `refex status` prints (the daemon's answer as `--json` gives it, laid out
//! for a person at a terminal).
//! Must not: decide health (the daemon does, in `node::metrics::health`); print referral content
//! (the answer holds counts, ids, areas and error messages only).

use std::fmt::Write;

use serde_json::Value;

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Lays out a `status` answer: health and problems, then one row per peer, then the
/// non-delivered envelopes.
pub fn table(r: &Value) -> String {
    let mut out = String::new();
    let healthy = r["healthy"].as_bool() == Some(true);
    let _ = writeln!(
        out,
        "refex {} · area {} · up {}s · {}",
        text(&r["version"]),
        text(&r["area"]),
        text(&r["uptime_secs"]),
        if healthy { "HEALTHY" } else { "DEGRADED" }
    );
    for p in r["problems"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  PROBLEM {}: {}",
            text(&p["problem"]),
            text(&p["detail"])
        );
    }
    let _ = writeln!(
        out,
        "audit: head {} · writable {}",
        text(&r["audit_head"]),
        text(&r["audit_writable"])
    );
    if let Some(sends) = r["sends_in_flight"].as_object() {
        let _ = writeln!(
            out,
            "sends in flight: {} on shared slots, {} on a lone peer's",
            text(&sends["shared"]),
            text(&sends["lone_peer"])
        );
    }
    if let Some(certs) = r["certificates"].as_object() {
        for (name, t) in certs {
            let _ = writeln!(out, "certificate {name}: expires {}", text(t));
        }
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:>4} {:>7} {:>9} {:>8} {:>6} {:>8}  {:<25} LAST ERROR",
        "PEER", "UP", "QUEUED", "ENHANCED", "PAST-DUE", "SENT", "RETRIES", "OLDEST QUEUED"
    );
    for (peer, s) in r["peers"].as_object().into_iter().flatten() {
        let up = match s["up"].as_bool() {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "?",
        };
        let last_error = match (&s["last_error"], &s["last_error_message"]) {
            (Value::Null, _) => s["error"].as_str().unwrap_or("-").to_owned(),
            (t, m) => format!("{} {}", text(t), text(m)),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>4} {:>7} {:>9} {:>8} {:>6} {:>8}  {:<25} {}",
            peer,
            up,
            text(&s["queued"]),
            text(&s["enhanced"]),
            text(&s["past_due"]),
            text(&s["sent"]),
            text(&s["retries"]),
            text(&s["oldest_created"]),
            last_error
        );
    }
    let nd = r["non_delivered"].as_array().map_or(0, Vec::len);
    if nd > 0 {
        let _ = writeln!(
            out,
            "\nnon-delivered (an operator must requeue or withdraw):"
        );
        for e in r["non_delivered"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  {} to {} ({}), {} attempts: {}",
                text(&e["id"]),
                text(&e["to"]),
                text(&e["priority"]),
                text(&e["attempts"]),
                text(&e["reason"])
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_degraded_answer_names_each_problem_and_peer() {
        let r = serde_json::json!({
            "ok": true, "healthy": false, "version": "0.1.0", "area": "west-midlands", "uptime_secs": 5,
            "problems": [{"problem": "peer_down", "detail": "london unreachable for 20s: timed out"}],
            "peers": {"london": {"up": false, "queued": 1, "enhanced": 0, "past_due": 1, "sent": 0,
                "retries": 3, "last_error": "2026-01-01T00:00:00Z", "last_error_message": "timed out"}},
            "non_delivered": [], "sends_in_flight": {"shared": 64, "lone_peer": 12},
        });
        let t = table(&r);
        assert!(t.contains("DEGRADED"), "{t}");
        assert!(
            t.contains("sends in flight: 64 on shared slots, 12 on a lone peer's"),
            "{t}"
        );
        assert!(t.contains("PROBLEM peer_down: london unreachable"), "{t}");
        assert!(
            t.lines()
                .any(|l| l.starts_with("london") && l.contains("NO") && l.contains("timed out")),
            "{t}"
        );
    }
}
