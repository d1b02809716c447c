//! The local control socket: `status`, `requeue`, `withdraw`, and recording consultations made
//! by CLI commands, as one JSON object per line over a Unix socket.
//!
//! Protocol (version 1): the client writes one request line
//! `{"v":1,"cmd":"status"|"requeue"|"withdraw"|"consultation", "id"?, "user"?, "what"?, "subject"?}`
//! and reads one response line `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//! Security: the socket is created mode 0600 in the state directory, so only the service user
//! (and root) can connect; there is no network-exposed admin interface at all. Requests are
//! bounded to 4 KiB and handled one line per connection.
//! Must not: return referral content (status shows counts and ids only).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::adapters::audit::{Actor, Event, Operation, Outcome};
use crate::core::types::EnvelopeId;
use crate::node::run::Handles;

const MAX_REQUEST: u64 = 4096;

/// A control request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    pub cmd: String,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub what: Option<String>,
    #[serde(default)]
    pub subject: Option<String>,
}

/// Binds the socket (replacing a stale one) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves requests until `shutdown`.
pub async fn serve(listener: UnixListener, h: Handles, shutdown: CancellationToken) {
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
        tokio::spawn(async move {
            if let Err(e) = handle(stream, &h).await {
                warn!("control request failed: {e}");
            }
        });
    }
}

async fn handle(stream: UnixStream, h: &Handles) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(MAX_REQUEST))
        .read_line(&mut line)
        .await?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(req) => dispatch(req, h).await,
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    write.write_all(&out).await
}

async fn dispatch(req: Request, h: &Handles) -> Value {
    let user = req.user.clone().unwrap_or_else(|| "unknown".into());
    match req.cmd.as_str() {
        "status" => status(h),
        "requeue" | "withdraw" => {
            let Some(id) = req.id.as_deref().and_then(|s| s.parse::<EnvelopeId>().ok()) else {
                return json!({"ok": false, "error": "id must be an envelope id (32 hex digits)"});
            };
            operator_action(h, &req.cmd, id, &user).await
        }
        "consultation" => {
            let ev = Event::new(Operation::Consultation, Actor::User(user), Outcome::Ok)
                .reason(req.what.as_deref().unwrap_or("consultation"));
            let ev = match &req.subject {
                Some(s) => ev.subject_hex(s),
                None => ev,
            };
            match h.audit.record(ev).await {
                Ok(_) => json!({"ok": true}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        other => json!({"ok": false, "error": format!("unknown command '{other}'")}),
    }
}

fn status(h: &Handles) -> Value {
    let now = Utc::now();
    let mut peers = serde_json::Map::new();
    for entry in h.settings.directory.areas() {
        match h.store.queue_stats(&entry.id, now) {
            Ok(s) => {
                peers.insert(entry.id.to_string(), json!(s));
            }
            Err(e) => {
                peers.insert(entry.id.to_string(), json!({"error": e.to_string()}));
            }
        }
    }
    let non_delivered: Vec<Value> = h
        .store
        .non_delivered(100)
        .unwrap_or_default()
        .into_iter()
        .map(|(id, r)| json!({"id": id.to_string(), "to": r.to, "priority": r.priority, "attempts": r.attempts, "reason": r.last_error}))
        .collect();
    json!({
        "ok": true,
        "area": h.settings.area,
        "now": now,
        "peers": peers,
        "non_delivered": non_delivered,
        "audit_head": h.audit.head().to_string(),
        "counters": crate::node::counters::snapshot(),
    })
}

async fn operator_action(h: &Handles, cmd: &str, id: EnvelopeId, user: &str) -> Value {
    let now = Utc::now();
    let result = if cmd == "requeue" {
        h.store.requeue(&id)
    } else {
        h.store.withdraw(&id, now)
    };
    let rec = match result {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": e.to_string()}),
    };
    if let Err(e) = h.store.durable().await {
        return json!({"ok": false, "error": e.to_string()});
    }
    let (op, reason) = if cmd == "requeue" {
        (Operation::Disclosure, "operator_requeue")
    } else {
        (Operation::Erasure, "operator_withdraw")
    };
    let mut ev = Event::new(op, Actor::User(user.to_owned()), Outcome::Ok)
        .envelope(id)
        .route(&h.settings.area, &rec.to)
        .reason(reason);
    if let Some(k) = &rec.subject_key {
        ev = ev.subject_hex(k);
    }
    if let Err(e) = h.audit.record(ev).await {
        return json!({"ok": false, "error": format!("done, but the audit record failed: {e}")});
    }
    if let Some(w) = h.wake.get(&rec.to) {
        w.notify_one();
    }
    info!(envelope_id = %id, user = %user, action = cmd, "operator action");
    json!({"ok": true, "id": id.to_string(), "state": rec.state})
}

/// Client side: sends one request and returns the response.
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
