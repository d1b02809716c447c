//! On-disk format markers: a `FORMAT` file in the state directory and in the audit directory,
//! one line `<kind> <version>`, written at first start and checked at every start, so a binary
//! never opens a layout newer than it understands (after a downgrade, say) and silently
//! misreads it. Versions this binary supports: [`STATE_FORMAT`] and [`AUDIT_FORMAT`].
//! Must not: rewrite a marker that is already there (an upgrade that changes a format
//! migrates explicitly and then writes the new version).

use std::path::{Path, PathBuf};

/// The marker's file name in each directory.
pub const FILE: &str = "FORMAT";
/// The state directory (the sled store, `db/`): format version 1 (see `store`).
pub const STATE_FORMAT: (&str, u32) = ("refex-state", 1);
/// The audit directory (JSON Lines chain, checkpoints): format version 1.
pub const AUDIT_FORMAT: (&str, u32) = ("refex-audit", 1);

/// A marker that this binary must not go past.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{path}: found format '{found}', but this refex ({binary}) supports only '{kind} {supported}'; install a refex that supports it, or restore a backup made with this version")]
    Unsupported {
        path: PathBuf,
        found: String,
        kind: &'static str,
        supported: u32,
        binary: &'static str,
    },
    #[error("{0}: cannot read or write the format marker: {1}")]
    Io(PathBuf, std::io::Error),
}

/// Checks `dir`'s marker against `expected`, writing it (durably) when absent.
pub fn check_or_write(dir: &Path, expected: (&'static str, u32)) -> Result<(), FormatError> {
    let path = dir.join(FILE);
    let (kind, supported) = expected;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim();
            if found == format!("{kind} {supported}") {
                Ok(())
            } else {
                Err(FormatError::Unsupported {
                    path,
                    found: found.to_owned(),
                    kind,
                    supported,
                    binary: env!("CARGO_PKG_VERSION"),
                })
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let line = format!("{kind} {supported}\n");
            crate::adapters::durable::replace(dir, "FORMAT.tmp", FILE, line.as_bytes())
                .map_err(|e| FormatError::Io(path.clone(), e))
        }
        Err(e) => Err(FormatError::Io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_once_then_checked_and_a_newer_one_is_refused() {
        let d = tempfile::tempdir().unwrap();
        check_or_write(d.path(), STATE_FORMAT).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join(FILE)).unwrap(),
            "refex-state 1\n"
        );
        check_or_write(d.path(), STATE_FORMAT).unwrap();
        std::fs::write(d.path().join(FILE), "refex-state 2\n").unwrap();
        let e = check_or_write(d.path(), STATE_FORMAT)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FORMAT") && e.contains("'refex-state 2'") && e.contains("'refex-state 1'"),
            "{e}"
        );
    }
}
