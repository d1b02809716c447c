//! `refex state backup` / `state restore`: the daemon takes the backup when it answers on the
//! control socket; otherwise this process opens the node itself (the store and audit locks
//! make sure nothing else writes meanwhile). Restore is always done here, daemon stopped.
//! Output is line-oriented (one summary line), so scripts and logs can read it.
//! Must not: copy keys unless `--with-keys`.

use std::path::Path;

use crate::node::control::{self, Request};
use crate::node::settings::Settings;

/// Takes a backup into `to` (made absolute), via the daemon when it is running.
pub async fn backup(s: &Settings, to: &Path, with_keys: bool, user: &str) -> Result<(), String> {
    let to = std::path::absolute(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let req = Request {
        to: Some(to.display().to_string()),
        with_keys,
        ..Request::new("backup")
    };
    let keys_note = if with_keys {
        "keys included"
    } else {
        "keys NOT included (use --with-keys)"
    };
    let spinner = crate::edge::progress::spinner("writing the backup");
    let answer = control::call(&s.control_socket, &req).await;
    spinner.finish_and_clear();
    match answer {
        Ok(resp) => {
            if resp.get("ok").and_then(|v| v.as_bool()) != Some(true) {
                return Err(format!(
                    "daemon refused the backup: {}",
                    resp.get("error").and_then(|v| v.as_str()).unwrap_or("?")
                ));
            }
            println!(
                "backup written by the daemon to {} (audit head {}, {} files; {keys_note})",
                to.display(),
                resp.get("audit_head_seq")
                    .unwrap_or(&serde_json::Value::Null),
                resp.get("files").unwrap_or(&serde_json::Value::Null),
            );
            Ok(())
        }
        Err(_) => {
            let spinner = crate::edge::progress::spinner("writing the backup");
            let done = crate::node::backup::backup_stopped(s.clone(), &to, user, with_keys).await;
            spinner.finish_and_clear();
            let done = done?;
            println!(
                "backup written to {} (daemon not running; audit head {}, {} files; {keys_note})",
                to.display(),
                done.manifest.audit_head_seq,
                done.manifest.files.len()
            );
            Ok(())
        }
    }
}

/// Restores the backup in `from` (daemon stopped).
pub fn restore(s: &Settings, from: &Path) -> Result<(), String> {
    let moved = crate::node::backup::restore(s, from)?;
    let moved: Vec<String> = moved.iter().map(|p| p.display().to_string()).collect();
    println!(
        "restored {} into {} and {}; previous state moved to: {}",
        from.display(),
        s.paths.state.display(),
        s.paths.audit.display(),
        if moved.is_empty() {
            "(none)".into()
        } else {
            moved.join(", ")
        }
    );
    Ok(())
}
