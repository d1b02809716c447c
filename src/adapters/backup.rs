//! The files of a state backup: `MANIFEST.json` (manifest version, area, time, formats, audit
//! head, whether keys are included, SHA-256 of every file) and the tree copies that make and
//! install one. What goes in it is decided by `node::backup`.
//! Layout of a backup directory: `state/` (a fresh sled store in `state/db`, `state/FORMAT`),
//! `audit/` (the log up to the head, `audit/FORMAT`), `keys/` only with `--with-keys`,
//! `MANIFEST.json`.
//! Must not: overwrite a non-empty directory it was asked to write into.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::core::digest::sha256;

/// The manifest's own format version.
pub const MANIFEST_VERSION: u32 = 1;
pub const MANIFEST: &str = "MANIFEST.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub manifest_version: u32,
    pub refex_version: String,
    pub area: String,
    pub created_at: String,
    pub state_format: String,
    pub audit_format: String,
    pub audit_head_seq: u64,
    pub audit_head_hash: String,
    pub keys_included: bool,
    /// Path relative to the backup directory → SHA-256 (hex).
    pub files: BTreeMap<String, String>,
}

/// A backup that cannot be made or used.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("{0}")]
    Invalid(String),
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(p.to_owned(), e)
}

/// Creates `dir` (and parents) and refuses it when it already holds anything.
pub fn prepare_empty(dir: &Path) -> Result<(), BackupError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    if fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(BackupError::Invalid(format!(
            "{} is not empty; a backup goes into a new or empty directory",
            dir.display()
        )));
    }
    Ok(())
}

/// Every regular file under `root`, relative, sorted.
fn files_under(root: &Path) -> Result<Vec<PathBuf>, BackupError> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let ty = e.file_type().map_err(io(&d))?;
            if ty.is_dir() {
                todo.push(e.path());
            } else if ty.is_file() {
                out.push(e.path().strip_prefix(root).unwrap_or(&e.path()).to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// SHA-256 of every file under `root` except the manifest.
pub fn hash_files(root: &Path) -> Result<BTreeMap<String, String>, BackupError> {
    let mut m = BTreeMap::new();
    for rel in files_under(root)? {
        if rel == Path::new(MANIFEST) {
            continue;
        }
        let p = root.join(&rel);
        let bytes = fs::read(&p).map_err(io(&p))?;
        m.insert(rel.display().to_string(), hex::encode(sha256(&bytes)));
    }
    Ok(m)
}

/// Copies regular files of `src` into `dst` (created), skipping names in `skip`, synced.
pub fn copy_tree(src: &Path, dst: &Path, skip: &[&str]) -> Result<(), BackupError> {
    for rel in files_under(src)? {
        if skip.iter().any(|s| rel == Path::new(s)) {
            continue;
        }
        let to = dst.join(&rel);
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let bytes = fs::read(src.join(&rel)).map_err(io(&rel))?;
        crate::adapters::durable::write_synced(&to, &bytes).map_err(io(&to))?;
    }
    crate::adapters::durable::sync_dir(dst).map_err(io(dst))
}

/// Writes the manifest (durably) after hashing every file already in `dir`.
pub fn write_manifest(dir: &Path, mut m: Manifest) -> Result<Manifest, BackupError> {
    m.files = hash_files(dir)?;
    let text = serde_json::to_vec_pretty(&m).map_err(|e| BackupError::Invalid(e.to_string()))?;
    crate::adapters::durable::replace(dir, "MANIFEST.json.tmp", MANIFEST, &text)
        .map_err(io(dir))?;
    Ok(m)
}

/// Reads the manifest of `dir` and checks it names exactly the files there, with their hashes.
pub fn check_manifest(dir: &Path) -> Result<Manifest, BackupError> {
    let path = dir.join(MANIFEST);
    let text = fs::read(&path).map_err(io(&path))?;
    let m: Manifest = serde_json::from_slice(&text)
        .map_err(|e| BackupError::Invalid(format!("{}: {e}", path.display())))?;
    if m.manifest_version != MANIFEST_VERSION {
        return Err(BackupError::Invalid(format!(
            "{}: manifest version {} (this refex reads {MANIFEST_VERSION})",
            path.display(),
            m.manifest_version
        )));
    }
    let actual = hash_files(dir)?;
    for (name, sum) in &m.files {
        match actual.get(name) {
            None => {
                return Err(BackupError::Invalid(format!(
                    "{name}: listed in the manifest, missing"
                )))
            }
            Some(s) if s != sum => {
                return Err(BackupError::Invalid(format!(
                    "{name}: SHA-256 does not match the manifest"
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = actual.keys().find(|k| !m.files.contains_key(*k)) {
        return Err(BackupError::Invalid(format!(
            "{extra}: not in the manifest"
        )));
    }
    Ok(m)
}
