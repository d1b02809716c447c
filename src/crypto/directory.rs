//! The peer directory: every area in the federation, where it listens, and its public keys.
//!
//! Format (TOML, version 1), one `[[area]]` table per area:
//! ```toml
//! version = 1
//! [[area]]
//! id = "west-midlands"                    # AreaId
//! name = "West Midlands"                  # display name
//! address = "127.0.0.1:7401"              # QUIC address
//! server_name = "west-midlands.refex.internal"  # TLS name in its certificate
//! signing_keys = ["<64 hex>"]             # Ed25519; two during a rotation
//! encryption_key = "<64 hex>"             # X25519 (HPKE)
//! envelope_version = 2                    # optional, 1 or 2 (default 1): see below
//! ```
//! `envelope_version` is the envelope format the area's node opens besides version 1: with 2,
//! senders seal to it under a shared HPKE context (`crypto` module doc), which halves their
//! public-key work; without it (or with 1) they seal version 1, which every build opens. A build
//! that predates the field refuses a directory holding it, so a federation adds it only once
//! every area runs a build that knows it (such a build opens both versions).
//! Invariants: ids are unique, each entry has one or two signing keys, every key parsed.
//! Must not: do I/O (the caller reads the file) or resolve names.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::core::types::AreaId;
use crate::crypto::{KemPublicKey, VerifyingKey};

/// One area of the federation.
#[derive(Clone, Debug)]
pub struct PeerEntry {
    pub id: AreaId,
    pub name: String,
    pub address: SocketAddr,
    pub server_name: String,
    pub signing_keys: Vec<VerifyingKey>,
    pub encryption_key: KemPublicKey,
    /// The envelope format to seal to this area: 1, or 2 once it opens shared-key envelopes.
    pub envelope_version: u8,
}

impl PeerEntry {
    /// True when envelopes to this area are sealed under a shared context (version 2).
    pub fn opens_shared_key_envelopes(&self) -> bool {
        self.envelope_version == crate::core::envelope::SHARED_KEY_VERSION
    }
}

/// The parsed peer directory.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    areas: BTreeMap<AreaId, PeerEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    version: u32,
    #[serde(default)]
    area: Vec<RawEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    id: String,
    name: String,
    address: String,
    server_name: String,
    signing_keys: Vec<String>,
    encryption_key: String,
    #[serde(default)]
    envelope_version: Option<u8>,
}

impl Directory {
    /// Parses a directory file, returning every problem found (one string each).
    pub fn from_toml(text: &str) -> Result<Self, Vec<String>> {
        let raw: RawDirectory = toml::from_str(text).map_err(|e| vec![format!("{e}")])?;
        let mut errors = Vec::new();
        if raw.version != 1 {
            errors.push(format!(
                "version {} is not supported (expected 1)",
                raw.version
            ));
        }
        let mut areas = BTreeMap::new();
        for (i, e) in raw.area.into_iter().enumerate() {
            let at = format!("area[{i}]");
            let id = match AreaId::parse(&e.id) {
                Ok(id) => id,
                Err(err) => {
                    errors.push(format!("{at}.id: {err}"));
                    continue;
                }
            };
            let at = format!("area '{id}'");
            let address = e
                .address
                .parse::<SocketAddr>()
                .map_err(|_| errors.push(format!("{at}.address: '{}' is not host:port", e.address)))
                .ok();
            if e.signing_keys.is_empty() || e.signing_keys.len() > 2 {
                errors.push(format!(
                    "{at}.signing_keys: expected one key, or two during a rotation"
                ));
            }
            let signing_keys: Vec<_> = e
                .signing_keys
                .iter()
                .filter_map(|k| {
                    VerifyingKey::from_hex(k)
                        .map_err(|err| errors.push(format!("{at}.signing_keys: {err}")))
                        .ok()
                })
                .collect();
            let encryption_key = KemPublicKey::from_hex(&e.encryption_key)
                .map_err(|err| errors.push(format!("{at}.encryption_key: {err}")))
                .ok();
            let envelope_version = e.envelope_version.unwrap_or(crate::core::envelope::VERSION);
            let versions = crate::core::envelope::ENVELOPE_VERSIONS;
            if !versions.contains(&envelope_version) {
                errors.push(format!(
                    "{at}.envelope_version: {envelope_version} is not {}",
                    crate::core::envelope::versions_text(&versions, " or ")
                ));
            }
            if e.server_name.is_empty() {
                errors.push(format!("{at}.server_name: must not be empty"));
            }
            if areas.contains_key(&id) {
                errors.push(format!("{at}: listed twice"));
                continue;
            }
            if let (Some(address), Some(encryption_key)) = (address, encryption_key) {
                let entry = PeerEntry {
                    id: id.clone(),
                    name: e.name,
                    address,
                    server_name: e.server_name,
                    signing_keys,
                    encryption_key,
                    envelope_version,
                };
                areas.insert(id, entry);
            }
        }
        if errors.is_empty() {
            Ok(Self { areas })
        } else {
            Err(errors)
        }
    }

    pub fn get(&self, id: &AreaId) -> Option<&PeerEntry> {
        self.areas.get(id)
    }

    pub fn contains(&self, id: &AreaId) -> bool {
        self.areas.contains_key(id)
    }

    pub fn areas(&self) -> impl Iterator<Item = &PeerEntry> {
        self.areas.values()
    }

    /// The signing keys for `id` (one, or two during a rotation).
    pub fn signing_keys(&self, id: &AreaId) -> Option<Vec<VerifyingKey>> {
        self.areas.get(id).map(|e| e.signing_keys.clone())
    }

    /// Renders a directory in the format above (used by `federation init`).
    pub fn render(entries: &[PeerEntry]) -> String {
        let mut out = String::from("# refex peer directory (format version 1)\nversion = 1\n");
        for e in entries {
            let keys: Vec<String> = e
                .signing_keys
                .iter()
                .map(|k| format!("\"{}\"", k.to_hex()))
                .collect();
            out.push_str(&format!(
                "\n[[area]]\nid = \"{}\"\nname = \"{}\"\naddress = \"{}\"\nserver_name = \"{}\"\nsigning_keys = [{}]\nencryption_key = \"{}\"\n{}",
                e.id,
                e.name.replace('"', "'"),
                e.address,
                e.server_name,
                keys.join(", "),
                e.encryption_key.to_hex(),
                if e.envelope_version == crate::core::envelope::VERSION {
                    String::new()
                } else {
                    format!("envelope_version = {}\n", e.envelope_version)
                }
            ));
        }
        out
    }
}
