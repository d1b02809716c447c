//! `refex federation init`: a throw-away development federation on one machine.
//!
//! Owns: laying out `DIR/ca/`, and per area `DIR/AREA/{refex.toml,keys/,outbox/,inbox/,state/,audit/}`,
//! the shared `DIR/directory.toml`, `DIR/postcodes.toml` (the shipped example table, filtered to
//! the federation's areas) and `DIR/bank-holidays.toml`. Area N (0-based, in the order given)
//! listens on 127.0.0.1:(base_port + N).
//! Invariants: private keys are written mode 0600 with `create_new` (never overwriting); the CA key
//! stays in `DIR/ca/` and no node config refers to it. These keys are for tests and demos only.
//! Must not: be used for production keys (the CA would live offline there).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::core::types::AreaId;
use crate::crypto::directory::{Directory, PeerEntry};
use crate::crypto::pki::{area_server_name, DevCa};
use crate::crypto::{write_secret_file, KemSecretKey, SigningKey};

/// The example postcode table shipped with refex.
pub const EXAMPLE_POSTCODES: &str = include_str!("../../config/postcodes.toml");
/// England & Wales bank holidays shipped with refex.
pub const BANK_HOLIDAYS: &str = include_str!("../../config/bank-holidays.toml");

const CERT_DAYS: u32 = 90;

/// Why a federation could not be made.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    /// The target directory already holds a federation (nothing is overwritten).
    #[error("{0} already exists; choose an empty directory")]
    Exists(PathBuf),
    /// No areas, or the same area twice.
    #[error("{0}")]
    Areas(String),
    /// The port range would pass 65535.
    #[error("base port {0} leaves no room for {1} areas")]
    Ports(u16, usize),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    #[error(transparent)]
    Pki(#[from] crate::crypto::pki::PkiError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FederationError + '_ {
    move |source| FederationError::Io {
        path: path.to_owned(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), FederationError> {
    fs::write(path, text).map_err(io(path))
}

/// Builds the federation; returns each area's config file path.
pub fn init(dir: &Path, areas: &[AreaId], base_port: u16) -> Result<Vec<PathBuf>, FederationError> {
    if areas.is_empty() {
        return Err(FederationError::Areas("name at least one area".into()));
    }
    let mut sorted = areas.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != areas.len() {
        return Err(FederationError::Areas("an area is listed twice".into()));
    }
    if usize::from(base_port) + areas.len() > 65_536 || base_port == 0 {
        return Err(FederationError::Ports(base_port, areas.len()));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = dir.canonicalize().map_err(io(dir))?;
    let ca_dir = dir.join("ca");
    if ca_dir.exists() {
        return Err(FederationError::Exists(ca_dir));
    }
    fs::create_dir(&ca_dir).map_err(io(&ca_dir))?;
    let ca = DevCa::generate("refex development federation CA", CERT_DAYS)?;
    write(&ca_dir.join("ca.pem"), &ca.cert_pem())?;
    write_secret_file(&ca_dir.join("ca.key"), ca.key_pem().as_bytes())?;

    let mut entries = Vec::new();
    let mut configs = Vec::new();
    for (i, area) in areas.iter().enumerate() {
        let node = dir.join(area.as_str());
        let keys = node.join("keys");
        for d in [
            &node,
            &keys,
            &node.join("outbox"),
            &node.join("inbox"),
            &node.join("state"),
            &node.join("audit"),
        ] {
            fs::create_dir_all(d).map_err(io(d))?;
        }
        let cert = ca.issue_node(area, CERT_DAYS)?;
        write(&keys.join("tls.pem"), &cert.cert_pem)?;
        write_secret_file(&keys.join("tls.key"), cert.key_pem.as_bytes())?;
        let (signing, signing_text) = SigningKey::generate()?;
        write_secret_file(&keys.join("signing.key"), signing_text.as_bytes())?;
        let (kem, kem_text) = KemSecretKey::generate()?;
        write_secret_file(&keys.join("encryption.key"), kem_text.as_bytes())?;
        let (_, subject_text) = crate::adapters::audit::SubjectSecret::generate()?;
        write_secret_file(&keys.join("subject.key"), subject_text.as_bytes())?;

        let port = base_port + i as u16;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        entries.push(PeerEntry {
            id: area.clone(),
            name: display_name(area),
            address,
            server_name: area_server_name(area),
            signing_keys: vec![signing.public_key()],
            encryption_key: kem.public_key(),
            envelope_version: crate::core::envelope::SHARED_KEY_VERSION,
        });
        let config = node.join("refex.toml");
        write(&config, &node_config(area, address))?;
        configs.push(config);
    }
    write(&dir.join("directory.toml"), &Directory::render(&entries))?;
    write(
        &dir.join("postcodes.toml"),
        &filter_postcodes(EXAMPLE_POSTCODES, areas),
    )?;
    write(&dir.join("bank-holidays.toml"), BANK_HOLIDAYS)?;
    Ok(configs)
}

fn display_name(area: &AreaId) -> String {
    area.as_str()
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The example table's `[prefixes]` entries that route to one of `areas`.
fn filter_postcodes(table: &str, areas: &[AreaId]) -> String {
    let mut out = String::from(
        "# Postcode routing for this development federation: refex's example table\n\
         # (config/postcodes.toml) filtered to the federation's areas. Longest prefix wins.\n[prefixes]\n",
    );
    let parsed: toml::Table = table.parse().unwrap_or_default();
    if let Some(prefixes) = parsed.get("prefixes").and_then(|p| p.as_table()) {
        for (prefix, target) in prefixes {
            if let Some(t) = target
                .as_str()
                .filter(|t| areas.iter().any(|a| a.as_str() == *t))
            {
                out.push_str(&format!("\"{prefix}\" = \"{t}\"\n"));
            }
        }
    }
    out
}

fn node_config(area: &AreaId, listen: SocketAddr) -> String {
    format!(
        r#"# refex node configuration for {area} (development federation; keys are throw-away).
# Relative paths are relative to this file. Override any key with REFEX__SECTION__KEY.
area = "{area}"

[network]
listen = "{listen}"

[paths]
outbox = "outbox"
inbox = "inbox"
state = "state"
audit = "audit"

[keys]
signing_key = "keys/signing.key"
encryption_key = "keys/encryption.key"
subject_secret = "keys/subject.key"
tls_ca = "../ca/ca.pem"
tls_cert = "keys/tls.pem"
tls_key = "keys/tls.key"

[files]
directory = "../directory.toml"
postcodes = "../postcodes.toml"
bank_holidays = "../bank-holidays.toml"

[intake]
settle_ms = 500
rescan_ms = 5000

[delivery]
retry_initial_ms = 200
retry_max_ms = 5000

[audit]
checkpoint_interval_secs = 60
"#
    )
}
