//! The start-up checks shared by `refex check-config` and `refex run`: everything `run` would
//! fail on (or that would leave a running node unable to exchange), found before it starts.
//!
//! Owns: [`check`], which takes loaded [`Settings`] and returns every [`Problem`] — errors and
//! warnings — each naming its config key: private key files (regular file, not a symlink, mode
//! without group/other bits, owned by the current user, parseable), this node's public keys as
//! listed for its area in the peer directory, the four data directories and the control
//! socket's directory (exist and are writable directories, or their parent exists and is
//! writable so they can be created), and the TLS identity (see `crypto::certs`: chains to the
//! CA, names this area, key matches, not expired; expiring within 30 days is a warning).
//! Invariants: `check` never stops at the first problem; it reads files but writes nothing;
//! `run` calls exactly this function, so the two cannot disagree.
//! Must not: print (the caller decides how to show problems), or log key material.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use chrono::{DateTime, Utc};
use rustix::fs::Access;

use crate::crypto::certs::{self, IdentityPem};
use crate::crypto::{read_secret_file, KemSecretKey, SigningKey, SubjectSecret};
use crate::node::settings::Settings;

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The node must not start.
    Error,
    /// The node can run, but someone should act soon.
    Warning,
}

/// One problem, naming the config key it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    pub key: &'static str,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{tag}: {}: {}", self.key, self.message)
    }
}

/// Everything [`check`] found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    /// The node certificate's `not_after`, when it could be read.
    pub cert_not_after: Option<DateTime<Utc>>,
}

impl Report {
    /// The problems that must stop the node.
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    /// The problems that only warrant a warning.
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    /// True when nothing stops the node.
    pub fn is_ok(&self) -> bool {
        self.errors().next().is_none()
    }

    fn error(&mut self, key: &'static str, message: String) {
        self.problems.push(Problem {
            severity: Severity::Error,
            key,
            message,
        });
    }
}

/// Runs every check on `settings` at time `now`.
pub fn check_at(settings: &Settings, now: DateTime<Utc>) -> Report {
    let mut r = Report::default();
    let s = settings;
    let uid = rustix::process::geteuid().as_raw();

    for (key, path) in [
        ("keys.signing_key", &s.keys.signing_key),
        ("keys.encryption_key", &s.keys.encryption_key),
        ("keys.subject_secret", &s.keys.subject_secret),
        ("keys.tls_key", &s.keys.tls_key),
    ] {
        secret_file(&mut r, key, path, uid);
    }
    let me = s.directory.get(&s.area);
    if me.is_none() {
        r.error(
            "area",
            format!("'{}' is not listed in the peer directory", s.area),
        );
    }
    match SigningKey::load(&s.keys.signing_key) {
        Ok(signer) => {
            if let Some(me) = me.filter(|m| !m.signing_keys.contains(&signer.public_key())) {
                r.error("keys.signing_key", format!(
                    "its public key {} is not listed for '{}' in the peer directory; peers would refuse this node's envelopes",
                    signer.public_key().to_hex(), me.id
                ));
            }
        }
        Err(e) => key_error(&mut r, "keys.signing_key", &e),
    }
    match KemSecretKey::load(&s.keys.encryption_key) {
        Ok(kem) => {
            if let Some(me) = me.filter(|m| m.encryption_key != kem.public_key()) {
                r.error("keys.encryption_key", format!(
                    "its public key {} is not the one listed for '{}' in the peer directory; this node could not open what peers send",
                    kem.public_key().to_hex(), me.id
                ));
            }
        }
        Err(e) => key_error(&mut r, "keys.encryption_key", &e),
    }
    if let Err(e) = SubjectSecret::load(&s.keys.subject_secret) {
        key_error(&mut r, "keys.subject_secret", &e);
    }

    for (key, dir) in [
        ("paths.outbox", &s.paths.outbox),
        ("paths.inbox", &s.paths.inbox),
        ("paths.state", &s.paths.state),
        ("paths.audit", &s.paths.audit),
    ] {
        directory(&mut r, key, dir);
    }
    if let Some(parent) = s.control_socket.parent() {
        directory(&mut r, "control.socket", parent);
    }

    tls(&mut r, s, now);
    r
}

/// Runs every check on `settings` now.
pub fn check(settings: &Settings) -> Report {
    check_at(settings, Utc::now())
}

/// Permission and ownership problems are reported by `secret_file`; this adds content problems.
fn key_error(r: &mut Report, key: &'static str, e: &crate::crypto::KeyError) {
    if let crate::crypto::KeyError::Format { .. } = e {
        r.error(key, e.to_string());
    }
}

fn secret_file(r: &mut Report, key: &'static str, path: &Path, uid: u32) {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) => {
            r.error(key, format!("cannot read {}: {e}", path.display()));
            return;
        }
    };
    if meta.file_type().is_symlink() {
        r.error(
            key,
            format!(
                "{} is a symlink; private keys must be regular files",
                path.display()
            ),
        );
        return;
    }
    if !meta.file_type().is_file() {
        r.error(key, format!("{} is not a regular file", path.display()));
        return;
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        r.error(
            key,
            format!(
                "{} has mode {mode:04o}; a private key must not be readable by group or others (chmod 0600)",
                path.display()
            ),
        );
    }
    if meta.uid() != uid {
        r.error(
            key,
            format!(
                "{} is owned by uid {}, not by the user running refex (uid {uid})",
                path.display(),
                meta.uid()
            ),
        );
    }
    if let Err(e) = std::fs::File::open(path) {
        r.error(key, format!("cannot open {}: {e}", path.display()));
    }
}

fn directory(r: &mut Report, key: &'static str, dir: &Path) {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {
            if let Err(e) = rustix::fs::access(dir, Access::WRITE_OK | Access::EXEC_OK) {
                r.error(
                    key,
                    format!(
                        "directory {} is not writable by this user: {e}",
                        dir.display()
                    ),
                );
            }
        }
        Ok(_) => r.error(
            key,
            format!("{} exists but is not a directory", dir.display()),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
            match parent.map(|p| (p, std::fs::metadata(p))) {
                Some((p, Ok(m))) if m.is_dir() => {
                    if let Err(e) = rustix::fs::access(p, Access::WRITE_OK | Access::EXEC_OK) {
                        r.error(key, format!(
                            "{} does not exist and its parent {} is not writable, so it cannot be created: {e}",
                            dir.display(), p.display()
                        ));
                    }
                }
                Some((p, _)) => r.error(
                    key,
                    format!(
                        "{} does not exist, nor does its parent {}",
                        dir.display(),
                        p.display()
                    ),
                ),
                None => r.error(key, format!("{} does not exist", dir.display())),
            }
        }
        Err(e) => r.error(key, format!("cannot read {}: {e}", dir.display())),
    }
}

fn tls(r: &mut Report, s: &Settings, now: DateTime<Utc>) {
    let read = |r: &mut Report, key: &'static str, p: &Path| match std::fs::read(p) {
        Ok(b) => Some(b),
        Err(e) => {
            r.error(key, format!("cannot read {}: {e}", p.display()));
            None
        }
    };
    let ca = read(r, "keys.tls_ca", &s.keys.tls_ca);
    let cert = read(r, "keys.tls_cert", &s.keys.tls_cert);
    // The key only through the secret-file rules; its permission problems are already listed.
    let key = read_secret_file(&s.keys.tls_key).ok();
    let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
        return;
    };
    let server_name = s.directory.get(&s.area).map(|m| m.server_name.as_str());
    let found = certs::inspect(
        &IdentityPem {
            ca: &ca,
            cert: &cert,
            key: &key,
        },
        &s.area,
        server_name,
        now,
    );
    r.cert_not_after = found.not_after;
    for p in found.problems {
        let key = match &p {
            certs::CertProblem::Unreadable { what, .. } => what,
            certs::CertProblem::KeyMismatch => "keys.tls_key",
            _ => "keys.tls_cert",
        };
        r.problems.push(Problem {
            severity: if p.is_warning() {
                Severity::Warning
            } else {
                Severity::Error
            },
            key,
            message: p.to_string(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    use crate::core::types::AreaId;

    fn federation(dir: &Path) -> Vec<std::path::PathBuf> {
        let areas = [
            AreaId::parse("west-midlands").unwrap(),
            AreaId::parse("london").unwrap(),
        ];
        crate::edge::federation::init(dir, &areas, 17_901).unwrap()
    }

    fn errors(r: &Report) -> Vec<String> {
        r.errors().map(ToString::to_string).collect()
    }

    #[test]
    fn a_fresh_development_node_passes() {
        let dir = tempfile::tempdir().unwrap();
        let configs = federation(dir.path());
        let s = Settings::load(&configs[0]).unwrap();
        let r = check(&s);
        assert!(r.problems.is_empty(), "{:?}", r.problems);
        assert!(r.cert_not_after.is_some());
    }

    #[test]
    fn every_problem_is_listed_not_just_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let configs = federation(dir.path());
        let s = Settings::load(&configs[0]).unwrap();
        let node = dir.path().join("west-midlands");
        std::fs::set_permissions(
            node.join("keys/signing.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        std::fs::remove_dir(node.join("inbox")).unwrap();
        std::fs::write(node.join("inbox"), "not a directory").unwrap();
        let mut s2 = s.clone();
        s2.paths.outbox = dir.path().join("missing/outbox");
        s2.paths.audit = dir.path().join("missing-but-creatable");
        let r = check(&s2);
        let e = errors(&r);
        assert_eq!(e.len(), 3, "{e:?}");
        assert!(
            e[0].contains("keys.signing_key") && e[0].contains("0644"),
            "{e:?}"
        );
        assert!(
            e[1].contains("paths.outbox") && e[1].contains("nor does its parent"),
            "{e:?}"
        );
        assert!(
            e[2].contains("paths.inbox") && e[2].contains("not a directory"),
            "{e:?}"
        );
    }

    #[test]
    fn keys_not_in_the_directory_are_errors_and_expiry_warns() {
        let dir = tempfile::tempdir().unwrap();
        let configs = federation(dir.path());
        let mut s = Settings::load(&configs[0]).unwrap();
        let london = dir.path().join("london/keys");
        s.keys.signing_key = london.join("signing.key");
        s.keys.encryption_key = london.join("encryption.key");
        let r = check_at(&s, Utc::now() + chrono::Duration::days(70));
        let e = errors(&r);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].starts_with("error: keys.signing_key:"), "{e:?}");
        assert!(e[1].starts_with("error: keys.encryption_key:"), "{e:?}");
        // The dev CA and node certificates are valid 90 days.
        let w: Vec<String> = r.warnings().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w.iter().all(|w| w.contains("expires in")), "{w:?}");
    }
}
