//! The running node's operational state, and the one place it is read: `refex status` (through
//! [`health`]) and `GET /metrics` (through [`render`]) see the same values.
//!
//! Event counters and flags are process-wide (one node per process), set by one-line calls from
//! the components: [`delivered`] / [`failed`] (sender), [`received`] (receiver), [`refused`]
//! (intake and receiver), [`intake_paused`] (intake), [`count_non_delivered`] (housekeeping).
//! Queue gauges are computed at scrape time from the store (prefix scans); the audit log knows
//! whether its last write failed; the transport keeps its refusal totals; certificate expiry is
//! read from the configured PEM files.
//! A peer is "down" from the first failed attempt after a delivery until the next delivery;
//! a peer nothing has been sent to yet counts as up.
//! Must not: hold labels derived from referral content (labels are area ids, priority classes,
//! rule codes, transport refusal reasons and certificate roles only).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::{json, Value};

use crate::adapters::metrics_http::ProcessStats;
use crate::core::types::AreaId;
use crate::node::build::Node;

/// Certificates expiring sooner than this make `status` degraded.
pub const CERT_WARN_DAYS: i64 = 30;

/// What is known about sending to and receiving from one peer.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PeerState {
    pub sent: u64,
    pub received: u64,
    pub retries: u64,
    pub last_success: Option<DateTime<Utc>>,
    pub last_error: Option<DateTime<Utc>>,
    pub last_error_message: Option<String>,
    /// The first failure since the last delivery.
    pub down_since: Option<DateTime<Utc>>,
}

#[derive(Default)]
struct State {
    peers: Mutex<BTreeMap<String, PeerState>>,
    refusals: Mutex<BTreeMap<String, u64>>,
    intake_paused: AtomicBool,
    non_delivered: AtomicU64,
}

static STATE: LazyLock<State> = LazyLock::new(State::default);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn with_peer(peer: &AreaId, f: impl FnOnce(&mut PeerState)) {
    f(lock(&STATE.peers).entry(peer.to_string()).or_default())
}

/// An envelope to `peer` was delivered (receipt stored).
pub fn delivered(peer: &AreaId) {
    with_peer(peer, |p| {
        p.sent += 1;
        p.last_success = Some(Utc::now());
        p.down_since = None;
    })
}

/// A send to `peer` failed and will be retried; `why` is the transport's or peer's reason.
pub fn failed(peer: &AreaId, why: &str) {
    let now = Utc::now();
    with_peer(peer, |p| {
        p.retries += 1;
        p.last_error = Some(now);
        p.last_error_message = Some(why.chars().take(300).collect());
        p.down_since.get_or_insert(now);
    })
}

/// An envelope arrived from `peer` (whatever the answer).
pub fn received(peer: &AreaId) {
    with_peer(peer, |p| p.received += 1)
}

/// Counts one refusal under each of `rules` (rule codes, never content).
pub fn refused(rules: &[&str]) {
    let mut m = lock(&STATE.refusals);
    for r in rules {
        *m.entry((*r).to_owned()).or_insert(0) += 1;
    }
}

/// Intake paused (a volume is full) or resumed.
pub fn intake_paused(paused: bool) {
    STATE.intake_paused.store(paused, Ordering::Relaxed);
}

/// Counts an envelope marked non-delivered.
pub fn count_non_delivered() {
    STATE.non_delivered.fetch_add(1, Ordering::Relaxed);
}

/// The state of `peer`.
pub fn peer(peer: &AreaId) -> PeerState {
    lock(&STATE.peers)
        .get(peer.as_str())
        .cloned()
        .unwrap_or_default()
}

/// The expiry of each configured certificate (`node`, `ca`), when it can be read.
pub fn certificates(node: &Node) -> Vec<(&'static str, Option<DateTime<Utc>>)> {
    let k = &node.settings.keys;
    [("node", &k.tls_cert), ("ca", &k.tls_ca)]
        .into_iter()
        .map(|(name, path)| {
            let not_after = std::fs::read(path)
                .ok()
                .and_then(|pem| crate::crypto::certs::first_not_after(&pem));
            (name, not_after)
        })
        .collect()
}

/// Every problem that makes the node degraded, each `{"problem", "detail", ...}`, plus the
/// per-peer view `status` shows.
pub fn health(node: &Node, now: DateTime<Utc>) -> (Vec<Value>, serde_json::Map<String, Value>) {
    let mut problems = Vec::new();
    if !node.audit.writable() {
        problems.push(json!({"problem": "audit_not_writable", "detail": "the last audit write failed; nothing is sent until it succeeds"}));
    }
    if STATE.intake_paused.load(Ordering::Relaxed) {
        problems.push(json!({"problem": "intake_paused", "detail": "a volume is full; files stay in the outbox"}));
    }
    let warn_after = node.settings.telemetry.peer_down_warn;
    let mut peers = serde_json::Map::new();
    for entry in node.directory().areas() {
        let st = peer(&entry.id);
        let mut view = match node.store.queue_stats(&entry.id, now) {
            Ok(q) => {
                if q.past_due > 0 {
                    problems.push(json!({"problem": "past_due", "peer": entry.id, "count": q.past_due,
                        "detail": format!("{} referral(s) to {} past their due time", q.past_due, entry.id)}));
                }
                json!(q)
            }
            Err(e) => json!({"error": e.to_string()}),
        };
        if let Some(since) = st.down_since {
            let down = (now - since).to_std().unwrap_or_default();
            if down > warn_after {
                problems.push(json!({"problem": "peer_down", "peer": entry.id, "since": since,
                    "detail": format!("{} unreachable for {}s: {}", entry.id, down.as_secs(), st.last_error_message.as_deref().unwrap_or("?"))}));
            }
        }
        if let (Some(obj), Ok(Value::Object(extra))) =
            (view.as_object_mut(), serde_json::to_value(&st))
        {
            obj.extend(extra);
            obj.insert("up".into(), json!(st.down_since.is_none()));
        }
        peers.insert(entry.id.to_string(), view);
    }
    for (name, not_after) in certificates(node) {
        match not_after {
            Some(t) if (t - now).num_days() < CERT_WARN_DAYS => problems.push(json!({
                "problem": "certificate_expiring", "certificate": name, "not_after": t,
                "detail": format!("{name} certificate expires {t} ({} days)", (t - now).num_days())})),
            Some(_) => {}
            None => problems.push(json!({"problem": "certificate_unreadable", "certificate": name,
                "detail": format!("{name} certificate cannot be read")})),
        }
    }
    (problems, peers)
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn gauge(reg: &mut Registry, name: &str, help: &str, v: i64) {
    let g = Gauge::<i64>::default();
    g.set(v);
    reg.register(name, help, g);
}

fn counter(reg: &mut Registry, name: &str, help: &str, v: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(v);
    reg.register(name, help, c);
}

/// The metrics text (OpenMetrics) for one scrape. `handshake_failures` are the transport's
/// refusal totals.
pub fn render(node: &Node, handshake_failures: &BTreeMap<&'static str, u64>) -> String {
    let now = Utc::now();
    let mut reg = Registry::default();
    let queued = Family::<Labels, Gauge>::default();
    let oldest = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let past_due = Family::<Labels, Gauge>::default();
    let up = Family::<Labels, Gauge>::default();
    let sent = Family::<Labels, Counter>::default();
    let received = Family::<Labels, Counter>::default();
    let retries = Family::<Labels, Counter>::default();
    for entry in node.directory().areas() {
        let p = entry.id.as_str();
        if let Ok(q) = node.store.queue_stats(&entry.id, now) {
            let standard = q.queued.saturating_sub(q.enhanced);
            for (prio, n) in [("enhanced", q.enhanced), ("standard", standard)] {
                queued
                    .get_or_create(&labels(&[("peer", p), ("priority", prio)]))
                    .set(n as i64);
            }
            let age = q
                .oldest_created
                .map_or(0.0, |t| (now - t).num_milliseconds() as f64 / 1000.0);
            oldest
                .get_or_create(&labels(&[("peer", p)]))
                .set(age.max(0.0));
            past_due
                .get_or_create(&labels(&[("peer", p)]))
                .set(q.past_due as i64);
        }
        let st = peer(&entry.id);
        up.get_or_create(&labels(&[("peer", p)]))
            .set(i64::from(st.down_since.is_none()));
        sent.get_or_create(&labels(&[("peer", p)])).inc_by(st.sent);
        received
            .get_or_create(&labels(&[("peer", p)]))
            .inc_by(st.received);
        retries
            .get_or_create(&labels(&[("peer", p)]))
            .inc_by(st.retries);
    }
    reg.register(
        "refex_outbox_queued",
        "Envelopes queued for a peer, by priority class",
        queued,
    );
    reg.register(
        "refex_outbox_oldest_seconds",
        "Age of the oldest envelope queued for a peer (0 when none)",
        oldest,
    );
    reg.register(
        "refex_referrals_past_due",
        "Queued referrals past their due time, per peer",
        past_due,
    );
    reg.register(
        "refex_peer_up",
        "0 from a failed send to the peer until the next delivery, else 1",
        up,
    );
    reg.register(
        "refex_envelopes_sent",
        "Envelopes delivered to a peer (receipt stored)",
        sent,
    );
    reg.register(
        "refex_envelopes_received",
        "Envelopes that arrived from a peer, whatever the answer",
        received,
    );
    reg.register(
        "refex_retries",
        "Failed sends to a peer that will be retried",
        retries,
    );

    let refusals = Family::<Labels, Counter>::default();
    for (rule, n) in lock(&STATE.refusals).iter() {
        refusals
            .get_or_create(&labels(&[("rule", rule)]))
            .inc_by(*n);
    }
    reg.register(
        "refex_refusals",
        "Referrals, files or envelopes refused, by rule code",
        refusals,
    );
    let handshakes = Family::<Labels, Counter>::default();
    for (reason, n) in handshake_failures {
        let reason = reason.to_ascii_lowercase().replace(' ', "_");
        handshakes
            .get_or_create(&labels(&[("reason", &reason)]))
            .inc_by(*n);
    }
    reg.register(
        "refex_handshake_failures",
        "Inbound connections refused, or abandoned by the peer mid-handshake, by reason",
        handshakes,
    );
    let certs = Family::<Labels, Gauge>::default();
    for (name, not_after) in certificates(node) {
        if let Some(t) = not_after {
            certs
                .get_or_create(&labels(&[("certificate", name)]))
                .set(t.timestamp());
        }
    }
    reg.register(
        "refex_certificate_expiry_timestamp_seconds",
        "When a configured certificate expires (Unix time)",
        certs,
    );

    counter(
        &mut reg,
        "refex_audit_records",
        "Records in the audit chain",
        node.audit.head().seq,
    );
    gauge(
        &mut reg,
        "refex_audit_writable",
        "0 after an audit write failed, until one succeeds",
        i64::from(node.audit.writable()),
    );
    gauge(
        &mut reg,
        "refex_intake_paused",
        "1 while intake is paused because a volume is full",
        i64::from(STATE.intake_paused.load(Ordering::Relaxed)),
    );
    counter(
        &mut reg,
        "refex_envelopes_non_delivered",
        "Envelopes marked non-delivered for an operator",
        STATE.non_delivered.load(Ordering::Relaxed),
    );
    reg.register(
        "refex_build",
        "The running version",
        Info::new(vec![(
            "version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        )]),
    );

    let ps = ProcessStats::read();
    gauge(
        &mut reg,
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        ps.resident_bytes as i64,
    );
    gauge(
        &mut reg,
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes",
        ps.virtual_bytes as i64,
    );
    gauge(
        &mut reg,
        "process_open_fds",
        "Open file descriptors",
        ps.open_fds as i64,
    );
    if let Some(max) = ps.max_fds {
        gauge(
            &mut reg,
            "process_max_fds",
            "Maximum open file descriptors",
            max as i64,
        );
    }
    let start = Gauge::<f64, AtomicU64>::default();
    start.set(ps.start_time_seconds);
    reg.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds",
        start,
    );
    let cpu = Counter::<f64, AtomicU64>::default();
    cpu.inc_by(ps.cpu_seconds);
    reg.register(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        cpu,
    );

    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out = "# EOF\n".into();
    }
    out
}
