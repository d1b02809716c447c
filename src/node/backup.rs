//! `state backup` and `state restore`: a consistent copy of a node's state (the sled store and
//! the audit log) taken by the node that owns them — the daemon through the control socket
//! while it runs, the CLI through [`Node::open`] while it is stopped — and its installation.
//! Order of a backup: the backup itself is audited first (a `consultation` with reason
//! `state_backup`, actor the kernel-reported user), its record is the head the audit copy
//! stops at; then the store is exported into a fresh sled; then the audit files are copied
//! up to that head; then `MANIFEST.json` hashes every file. Keys are copied only when asked
//! (`keys/`); without them a restore needs the node's existing keys.
//! Restore: refused while the audit writer lock is held (the daemon runs); the manifest, the
//! format versions and the audit chain of the backup (`audit verify`) are checked; then the
//! current state and audit directories are moved aside (`<dir>.before-restore-<unix time>`,
//! never deleted) and the backup's copies put in their place.
//! Must not: copy keys unless asked; delete anything on restore.

use std::path::{Path, PathBuf};

use chrono::Utc;

use crate::adapters::audit::{self, Actor, Event, Operation, Outcome};
use crate::adapters::backup::{self, Manifest, MANIFEST_VERSION};
use crate::adapters::format::{self, AUDIT_FORMAT, STATE_FORMAT};
use crate::node::build::Node;
use crate::node::settings::Settings;

/// What a backup wrote.
pub struct BackupDone {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

fn fmt((k, v): (&str, u32)) -> String {
    format!("{k} {v}")
}

/// Takes a backup of `node` into `dest` (new or empty), auditing it as done by `user`.
pub async fn backup(
    node: &Node,
    dest: &Path,
    user: &str,
    with_keys: bool,
) -> Result<BackupDone, String> {
    backup::prepare_empty(dest).map_err(|e| e.to_string())?;
    let ev = Event::new(
        Operation::Consultation,
        Actor::User(user.to_owned()),
        Outcome::Ok,
    )
    .reason("state_backup");
    let head = node.audit.record(ev).await.map_err(|e| e.to_string())?;
    let s = &node.settings;
    let state = dest.join("state");
    std::fs::create_dir_all(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    node.store
        .export_to(&state.join("db"))
        .map_err(|e| format!("store export: {e}"))?;
    format::check_or_write(&state, STATE_FORMAT).map_err(|e| e.to_string())?;
    let audit_dest = dest.join("audit");
    audit::copy_upto(&s.paths.audit, &audit_dest, &head).map_err(|e| e.to_string())?;
    format::check_or_write(&audit_dest, AUDIT_FORMAT).map_err(|e| e.to_string())?;
    if with_keys {
        let keys = dest.join("keys");
        for k in [
            &s.keys.signing_key,
            &s.keys.encryption_key,
            &s.keys.subject_secret,
        ] {
            let name = k.file_name().unwrap_or_default();
            let bytes = std::fs::read(k).map_err(|e| format!("{}: {e}", k.display()))?;
            std::fs::create_dir_all(&keys).map_err(|e| format!("{}: {e}", keys.display()))?;
            let to = keys.join(name);
            crate::adapters::durable::write_synced(&to, &bytes)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|e| format!("{}: {e}", to.display()))?;
        }
    }
    let manifest = backup::write_manifest(
        dest,
        Manifest {
            manifest_version: MANIFEST_VERSION,
            refex_version: env!("CARGO_PKG_VERSION").into(),
            area: s.area.to_string(),
            created_at: Utc::now().to_rfc3339(),
            state_format: fmt(STATE_FORMAT),
            audit_format: fmt(AUDIT_FORMAT),
            audit_head_seq: head.seq,
            audit_head_hash: head.hash,
            keys_included: with_keys,
            files: Default::default(),
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(BackupDone {
        dir: dest.to_owned(),
        manifest,
    })
}

/// Takes a backup while the daemon is stopped: opens the node itself (which fails if the
/// daemon holds the store or the audit log), backs up, closes.
pub async fn backup_stopped(
    settings: Settings,
    dest: &Path,
    user: &str,
    with_keys: bool,
) -> Result<BackupDone, String> {
    let node = Node::open(settings).map_err(|e| e.to_string())?;
    let r = backup(&node, dest, user, with_keys).await;
    let _ = node.audit.close().await;
    let _ = node.store.close().await;
    r
}

/// Installs the backup in `from` for the node of `s` (see the module doc). Returns the
/// directories the previous state was moved to.
pub fn restore(s: &Settings, from: &Path) -> Result<Vec<PathBuf>, String> {
    if audit::is_locked(&s.paths.audit) {
        return Err(format!(
            "{} is locked by a running refex; stop the daemon before restoring",
            s.paths.audit.display()
        ));
    }
    let m = backup::check_manifest(from).map_err(|e| format!("backup {}: {e}", from.display()))?;
    if m.area != s.area.as_str() {
        return Err(format!(
            "backup is of area {}, this node is {}",
            m.area, s.area
        ));
    }
    if m.state_format != fmt(STATE_FORMAT) || m.audit_format != fmt(AUDIT_FORMAT) {
        return Err(format!(
            "backup formats '{}' / '{}'; this refex supports '{}' / '{}'",
            m.state_format,
            m.audit_format,
            fmt(STATE_FORMAT),
            fmt(AUDIT_FORMAT)
        ));
    }
    let keys = s.directory.signing_keys(&s.area).unwrap_or_default();
    let report = audit::verify(&from.join("audit"), &keys)
        .map_err(|f| format!("backup audit log FAILED verification: {f}"))?;
    tracing::info!("backup audit log OK: {report}");
    let stamp = Utc::now().timestamp();
    let mut moved = Vec::new();
    for (live, part) in [(&s.paths.state, "state"), (&s.paths.audit, "audit")] {
        if live.exists() {
            let aside = PathBuf::from(format!("{}.before-restore-{stamp}", live.display()));
            std::fs::rename(live, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", live.display()))?;
            moved.push(aside);
        }
        backup::copy_tree(&from.join(part), live, &[]).map_err(|e| e.to_string())?;
    }
    Ok(moved)
}
