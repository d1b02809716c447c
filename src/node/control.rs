//! The local control socket: `status`, `requeue`, `withdraw`, `backup` (see `node::backup`), and
//! recording consultations made by CLI commands, as one JSON object per line over a Unix socket.
//!
//! Protocol (version 1): the client writes one request line
//! `{"v":1,"cmd":"status"|"requeue"|"withdraw"|"consultation"|"backup", "id"?, "user"?, "what"?,
//! "subject"?, "to"?, "with_keys"?}`
//! and reads one response line `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! Security: the socket is created mode 0660, so only the service user, members of the socket
//! directory's group (the package makes `/run/refex` setgid `refex-operators`, so operators
//! connect as themselves) and root can connect; there is no network-exposed admin interface. Requests are
//! bounded to 4 KiB and handled one line per connection, each on a task of the node's tracker.
//! Identity: the actor of every audited request is the account the kernel reports for the
//! connecting process (`SO_PEERCRED`, uid → name from `/etc/passwd`); a client's `user` field is
//! ignored. `what` must be one of [`REASON_CODES`] and `subject` 64 hex digits, so no free text
//! from a client can reach the audit log.
//! Must not: return referral content (status shows counts and ids only).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::adapters::audit::{Actor, Event, Operation, Outcome};
use crate::adapters::store::OutState;
use crate::core::types::EnvelopeId;
use crate::node::build::Node;

const MAX_REQUEST: u64 = 4096;

/// The reasons a client may give for a consultation; anything else is refused.
pub const REASON_CODES: &[&str] = &[
    "audit_search",
    "subject_access_request",
    "dpo_review",
    "operator_correction",
];

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub cmd: String,
    #[serde(default)]
    pub id: Option<String>,
    /// Ignored by the server (the kernel says who connected); kept so older clients parse.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub what: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
    /// `backup`: the directory to write (absolute; new or empty; the daemon writes it).
    #[serde(default)]
    pub to: Option<String>,
    /// `backup`: also copy the key files.
    #[serde(default)]
    pub with_keys: bool,
}

impl Request {
    /// A version-1 request for `cmd` with no arguments; callers set the fields `cmd` needs.
    pub fn new(cmd: &str) -> Self {
        Self {
            v: 1,
            cmd: cmd.into(),
            id: None,
            user: None,
            what: None,
            subject: None,
            to: None,
            with_keys: false,
        }
    }
}

/// Binds the socket (replacing a stale one) with mode 0660 (group: the directory's, see above).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves requests until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    h: Arc<Node>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            s = listener.accept() => match s {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control socket accept failed: {e}");
                    continue;
                }
            },
        };
        let h = h.clone();
        tracker.spawn(async move {
            if let Err(e) = handle(stream, &h).await {
                warn!("control request failed: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, h: &Node) -> std::io::Result<()> {
    let user = user_name(stream.peer_cred()?.uid());
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => dispatch(req, &user, h).await,
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

async fn dispatch(req: Request, user: &str, h: &Node) -> Value {
    match req.cmd.as_str() {
        "status" => status(h),
        "requeue" | "withdraw" => {
            let Some(id) = req.id.as_deref().and_then(|s| s.parse::<EnvelopeId>().ok()) else {
                return json!({"ok": false, "error": "id must be an envelope id (32 hex digits)"});
            };
            operator_action(h, &req.cmd, id, user).await
        }
        "consultation" => {
            let what = req.what.as_deref().unwrap_or("audit_search");
            if !REASON_CODES.contains(&what) {
                return json!({"ok": false, "error": format!("reason must be one of: {}", REASON_CODES.join(", "))});
            }
            let ev = Event::new(
                Operation::Consultation,
                Actor::User(user.to_owned()),
                Outcome::Ok,
            )
            .reason(what);
            let ev = match &req.subject {
                Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    ev.subject_hex(&s.to_ascii_lowercase())
                }
                Some(_) => return json!({"ok": false, "error": "subject must be 64 hex digits"}),
                None => ev,
            };
            match h.audit.record(ev).await {
                Ok(_) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        "backup" => {
            let Some(to) = req.to.as_deref().map(Path::new).filter(|p| p.is_absolute()) else {
                return json!({"ok": false, "error": "backup needs 'to', an absolute directory"});
            };
            match crate::node::backup::backup(h, to, user, req.with_keys).await {
                Ok(done) => {
                    info!(dir = %done.dir.display(), head = done.manifest.audit_head_seq, "state backup written");
                    json!({"ok": true, "dir": done.dir, "audit_head_seq": done.manifest.audit_head_seq, "files": done.manifest.files.len(), "keys_included": done.manifest.keys_included})
                }
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        other => json!({"ok": false, "error": format!("unknown command '{other}'")}),
    }
}

/// `ok` is true when the daemon answered; `healthy` is false when `problems` lists anything
/// (see `metrics::health`), and the CLI then exits 2.
fn status(h: &Node) -> Value {
    let now = Utc::now();
    let (problems, peers) = crate::node::metrics::health(h, now);
    let non_delivered: Vec<Value> = h
        .store
        .non_delivered(100)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, r)| json!({"id": id.to_string(), "to": r.to, "priority": r.priority, "attempts": r.attempts, "reason": r.last_error}))
        .collect();
    let started = crate::adapters::metrics_http::ProcessStats::read().start_time_seconds;
    let uptime = (now.timestamp() as f64 - started).max(0.0) as u64;
    let certificates: serde_json::Map<String, Value> = crate::node::metrics::certificates(h)
        .into_iter()
        .map(|(name, t)| (name.to_owned(), json!(t)))
        .collect();
    let (shared_sends, lone_sends) = h.send_slots.in_use();
    json!({
        "ok": true,
        "healthy": problems.is_empty(),
        "problems": problems,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": uptime,
        "area": h.settings.area,
        "now": now,
        "peers": peers,
        "non_delivered": non_delivered,
        "audit_head": h.audit.head().to_string(),
        "audit_writable": h.audit.writable(),
        "sends_in_flight": {"shared": shared_sends, "lone_peer": lone_sends},
        "hpke_contexts": {"sealed": h.seal_contexts.setups(), "opened": h.kem.shared_setups()},
        "syncs": {"store": h.store.sync_count(), "audit": h.audit.sync_count(), "inbox_dir": h.inbox.dir_syncs(), "outbox_dir": h.outbox_sync.syncs()},
        "certificates": certificates,
        "runtime": h.runtime.get().map(|f| f()).unwrap_or(Value::Null),
    })
}

/// Requeue or withdraw, write-ahead: the operator's action is recorded durably before the state
/// changes. If the change then fails (the envelope was delivered meanwhile), a second record says
/// so. If the record cannot be written, nothing changes.
async fn operator_action(h: &Node, cmd: &str, id: EnvelopeId, user: &str) -> Value {
    let now = Utc::now();
    let rec = match h.store.get(&id) {
        Ok(Some(r)) => r,
        Ok(None) => return json!({"ok": false, "error": format!("no envelope {id} in the store")}),
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    if !matches!(rec.state, OutState::NonDelivered | OutState::Queued) {
        return json!({"ok": false, "error": format!("envelope {id} is {:?}; {cmd} is not possible", rec.state)});
    }
    let (op, reason) = if cmd == "requeue" {
        (Operation::Disclosure, "operator_requeue")
    } else {
        (Operation::Erasure, "operator_withdraw")
    };
    let event = |outcome| {
        let mut ev = Event::new(op, Actor::User(user.to_owned()), outcome)
            .envelope(id)
            .route(&h.settings.area, &rec.to)
            .reason(reason);
        if let Some(k) = &rec.subject_key {
            ev = ev.subject_hex(k);
        }
        ev
    };
    if cmd == "withdraw" {
        // Out of the queue first (never sent again), then the erasure on record, then the
        // payload erased: a crash between leaves `WithdrawPending`, completed at start-up
        // ([`complete_withdrawals`]), so nothing is ever delivered after its erasure record.
        if let Err(e) = async {
            h.store.begin_withdraw(&id, user)?;
            h.store.durable().await
        }
        .await
        {
            return json!({"ok": false, "error": e.to_string()});
        }
        crate::core::failpoint::hit("operator_withdraw_pending");
    }
    if let Err(e) = h.audit.record(event(Outcome::Ok)).await {
        if cmd == "withdraw" {
            if let Err(c) = async {
                h.store.cancel_withdraw(&id)?;
                h.store.durable().await
            }
            .await
            {
                warn!(envelope_id = %id, "withdraw not recorded and not undone ({c}); completed at the next start");
            }
        }
        return json!({"ok": false, "error": format!("not done: the audit record failed: {e}")});
    }
    crate::core::failpoint::hit("operator_before_change");
    let result = if cmd == "requeue" {
        h.store.requeue(&id)
    } else {
        h.store.withdraw(&id, now)
    };
    let result = match result {
        Ok(r) => h.store.durable().await.map(|_| r),
        Err(e) => Err(e),
    };
    let rec = match result {
        Ok(r) => r,
        Err(e) => {
            if let Err(a) = h.audit.record(event(Outcome::Failed)).await {
                warn!("audit record of a failed operator action failed: {a}");
            }
            return json!({"ok": false, "error": e.to_string()});
        }
    };
    h.wake(&rec.to);
    info!(envelope_id = %id, user = %user, action = cmd, "operator action");
    json!({"ok": true, "id": id.to_string(), "state": rec.state})
}

/// The account name of `uid` (from `/etc/passwd`), or `uid:N` when it has none.
pub fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id: u32 = f.nth(1)?.parse().ok()?;
            (id == uid && !name.is_empty()).then(|| name.to_owned())
        })
        .next()
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// How long `refex status`, `requeue` and `withdraw` wait for the daemon's answer. A daemon
/// that accepts the connection but never answers (wedged on a stuck volume, say) must not hang
/// a monitoring check or an operator's shell: the command fails, saying so, instead.
pub const ANSWER_LIMIT: std::time::Duration = std::time::Duration::from_secs(15);

/// Client side: [`call`] bounded by `limit`; past it, an error of kind `TimedOut` naming it.
pub async fn call_within(
    path: &Path,
    req: &Request,
    limit: std::time::Duration,
) -> std::io::Result<Value> {
    tokio::time::timeout(limit, call(path, req))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {limit:?}"),
            ))
        })
}

/// Client side: sends one request and returns the response (unbounded: `backup` copies the
/// whole state and takes as long as that takes; see [`call_within`]).
pub async fn call(path: &Path, req: &Request) -> std::io::Result<Value> {
    let mut stream = UnixStream::connect(path).await?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await?;
    let mut buf = String::new();
    BufReader::new(stream.take(16 << 20))
        .read_line(&mut buf)
        .await?;
    serde_json::from_str(&buf).map_err(std::io::Error::other)
}

/// Completes withdraws a crash (or an unwritable audit log) left `WithdrawPending`: writes the
/// operator's `erasure(operator_withdraw)` record unless the log already holds it, then erases
/// the payload. Run at start-up, before any sending; the envelopes are never sent meanwhile.
pub async fn complete_withdrawals(h: &Node) -> Result<usize, String> {
    let pending = h.store.withdrawals_pending().map_err(|e| e.to_string())?;
    if pending.is_empty() {
        return Ok(0);
    }
    let mut recorded = std::collections::HashSet::new();
    crate::adapters::audit::for_each_record(&h.settings.paths.audit, |r, _| {
        if r.reason.as_deref() == Some("operator_withdraw") && r.outcome == Some(Outcome::Ok) {
            if let Some(e) = &r.envelope_id {
                recorded.insert(e.clone());
            }
        }
    })
    .map_err(|e| e.to_string())?;
    for (id, rec) in &pending {
        if !recorded.contains(&id.to_string()) {
            let user = rec.withdraw.as_ref().map_or("unknown", |(u, _)| u.as_str());
            let mut ev = Event::new(
                Operation::Erasure,
                Actor::User(user.to_owned()),
                Outcome::Ok,
            )
            .envelope(*id)
            .route(&h.settings.area, &rec.to)
            .reason("operator_withdraw");
            if let Some(k) = &rec.subject_key {
                ev = ev.subject_hex(k);
            }
            h.audit.record(ev).await.map_err(|e| e.to_string())?;
        }
        h.store
            .withdraw(id, Utc::now())
            .map_err(|e| e.to_string())?;
        info!(envelope_id = %id, "withdraw completed at start-up");
    }
    h.store.durable().await.map_err(|e| e.to_string())?;
    Ok(pending.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon that takes the connection and never answers: the bounded call gives up, naming
    /// its limit, instead of waiting for ever (what `refex status` relies on).
    #[tokio::test]
    async fn a_daemon_that_never_answers_times_out_the_bounded_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let held = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(60)).await;
            drop(s);
        });
        let e = call_within(
            &path,
            &Request::new("status"),
            std::time::Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("no answer within"), "{e}");
        held.abort();
    }
}
