//! Key files and the node's Ed25519 signing and X25519 encryption keys (see the crate doc of
//! `crypto` for the file format). Private keys are read only from 0600 regular files.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, Serializable};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};
use zeroize::{Zeroize, Zeroizing};

pub(super) type Kem = X25519HkdfSha256;

/// Errors loading, parsing or generating keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read or written.
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file is readable by group or others, or is not a plain file.
    #[error("key file {path} must be a regular file readable only by its owner (mode 0600), found mode {mode:o}")]
    Permissions { path: PathBuf, mode: u32 },
    /// The content is not a key of the expected kind.
    #[error("key file {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    /// A public key string is not 64 hex digits of a valid key.
    #[error("public key '{0}' is not 64 hex digits")]
    BadPublicKey(String),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
}

/// Reads a secret file, refusing symlinks, non-regular files and group/world access. The bytes
/// are wiped when the returned buffer is dropped.
pub fn read_secret_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(io)?;
    let mode = meta.mode() & 0o7777;
    if !meta.file_type().is_file() || mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    fs::read(path).map(Zeroizing::new).map_err(io)
}

/// Writes a secret file with mode 0600 (created new; an existing file is an error) and syncs it.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

fn decode_key_text(path: &Path, text: &[u8], kind: &str) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    let fmt_err = |reason: String| KeyError::Format {
        path: path.to_owned(),
        reason,
    };
    let text = std::str::from_utf8(text).map_err(|_| fmt_err("not UTF-8 text".into()))?;
    let prefix = format!("refex-{kind}-v1:");
    let hex_part = text
        .trim()
        .strip_prefix(&prefix)
        .ok_or_else(|| fmt_err(format!("expected a line starting '{prefix}'")))?;
    hex::decode(hex_part)
        .map(Zeroizing::new)
        .map_err(|_| fmt_err("key material is not hex".into()))
}

/// A key file's text (secret: wiped on drop).
pub type KeyText = Zeroizing<String>;

fn encode_key_text(kind: &str, bytes: &[u8]) -> KeyText {
    Zeroizing::new(format!("refex-{kind}-v1:{}\n", hex::encode(bytes)))
}

/// The node's Ed25519 signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("public", &self.public_key())
            .finish()
    }
}

impl SigningKey {
    /// Generates a new key and returns it with its key-file text.
    pub fn generate() -> Result<(Self, KeyText), KeyError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
        let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Random)?;
        Ok((
            Self { pair },
            encode_key_text("ed25519-pkcs8", doc.as_ref()),
        ))
    }

    /// Loads a key file (see the module doc for format and permission rules).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret_file(path)?;
        let der = decode_key_text(path, &text, "ed25519-pkcs8")?;
        let pair =
            Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| KeyError::Format {
                path: path.to_owned(),
                reason: format!("not an Ed25519 PKCS#8 key: {e}"),
            })?;
        Ok(Self { pair })
    }

    pub fn public_key(&self) -> VerifyingKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(k)
    }

    /// Signs `msg`; callers prepend their own domain-separation tag.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// An Ed25519 public key, as listed in the peer directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct VerifyingKey([u8; 32]);

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({})", self.to_hex())
    }
}

/// A 32-byte public key written as 64 hex digits (the peer directory's form of both kinds).
fn public_key_hex(s: &str) -> Result<[u8; 32], KeyError> {
    let bad = || KeyError::BadPublicKey(s.chars().take(80).collect());
    hex::decode(s.trim())
        .map_err(|_| bad())?
        .try_into()
        .map_err(|_| bad())
}

impl VerifyingKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        public_key_hex(s).map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// True when `sig` is this key's signature over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) {
    // The system RNG failing is not recoverable and not input-driven.
    if SystemRandom::new().fill(buf).is_err() {
        panic!("the system random generator failed");
    }
}

/// The node's X25519 secret key (HPKE recipient).
pub struct KemSecretKey {
    pub(super) sk: <Kem as hpke::Kem>::PrivateKey,
    pk: KemPublicKey,
    /// Version-2 contexts set up with this key (`shared`), by `enc`.
    pub(super) opened: super::shared::OpenContexts,
}

impl fmt::Debug for KemSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KemSecretKey")
            .field("public", &self.pk)
            .finish()
    }
}

impl KemSecretKey {
    pub(super) fn from_secret(bytes: &[u8]) -> Option<Self> {
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).ok()?;
        let pk = <Kem as hpke::Kem>::sk_to_pk(&sk);
        let pk = KemPublicKey(pk.to_bytes().as_slice().try_into().ok()?);
        Some(Self {
            sk,
            pk,
            opened: Default::default(),
        })
    }

    /// Generates a new key and returns it with its key-file text.
    pub fn generate() -> Result<(Self, KeyText), KeyError> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        random_bytes(&mut ikm[..]);
        let (sk, _) = Kem::derive_keypair(&ikm[..]);
        let mut bytes = sk.to_bytes();
        let key = Self::from_secret(&bytes).ok_or(KeyError::Random);
        let text = encode_key_text("x25519", &bytes);
        bytes.zeroize();
        Ok((key?, text))
    }

    /// Loads a key file (see the module doc for format and permission rules).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret_file(path)?;
        let raw = decode_key_text(path, &text, "x25519")?;
        Self::from_secret(&raw).ok_or_else(|| KeyError::Format {
            path: path.to_owned(),
            reason: "not a 32-byte X25519 secret key".into(),
        })
    }

    pub fn public_key(&self) -> KemPublicKey {
        self.pk
    }

    /// Version-2 contexts this key has set up (each one Diffie-Hellman), shown by `status`.
    pub fn shared_setups(&self) -> u64 {
        self.opened.setups()
    }
}

/// An X25519 public key, as listed in the peer directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KemPublicKey(pub(super) [u8; 32]);

impl fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KemPublicKey({})", self.to_hex())
    }
}

impl KemPublicKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let k = public_key_hex(s)?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&k)
            .map_err(|_| KeyError::BadPublicKey(s.chars().take(80).collect()))?;
        Ok(Self(k))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// The per-area secret that makes subject keys and the intake idempotency index. Wiped on drop.
pub struct SubjectSecret([u8; 32]);

impl Drop for SubjectSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for SubjectSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubjectSecret(..)")
    }
}

impl SubjectSecret {
    /// Loads `refex-subject-v1:<64 hex>` from a private file (mode 0600).
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_secret_file(path)?;
        let bad = |reason: &str| KeyError::Format {
            path: path.to_owned(),
            reason: reason.into(),
        };
        let text = std::str::from_utf8(&text).map_err(|_| bad("not UTF-8"))?;
        let hex_part = text
            .trim()
            .strip_prefix("refex-subject-v1:")
            .ok_or_else(|| bad("expected 'refex-subject-v1:<hex>'"))?;
        let bytes = Zeroizing::new(hex::decode(hex_part).map_err(|_| bad("not hex"))?);
        let mut key = [0u8; 32];
        if bytes.len() != key.len() {
            return Err(bad("expected 32 bytes"));
        }
        key.copy_from_slice(&bytes);
        Ok(Self(key))
    }

    /// A new secret and its file text.
    pub fn generate() -> Result<(Self, KeyText), KeyError> {
        let mut b = [0u8; 32];
        random_bytes(&mut b);
        let text = Zeroizing::new(format!("refex-subject-v1:{}\n", hex::encode(b)));
        Ok((Self(b), text))
    }

    /// The intake idempotency index key of a referral: HMAC-SHA-256(secret, tag ␟ system ␟
    /// reference), so the store holds nothing a dictionary of references could be matched
    /// against without the secret. Domain-separated from the subject key.
    pub fn index_key(&self, source_system: &str, source_ref: &str) -> [u8; 32] {
        let msg = format!("refex-idempotency-v1\u{1f}{source_system}\u{1f}{source_ref}");
        crate::core::digest::hmac_sha256(&self.0, msg.as_bytes())
    }

    /// The pseudonymous key of one person's referral: HMAC-SHA-256(secret, system ␟ reference).
    pub fn key(&self, source_system: &str, source_ref: &str) -> crate::core::audit::SubjectKey {
        let msg = format!("{source_system}\u{1f}{source_ref}");
        crate::core::audit::SubjectKey(hex::encode(crate::core::digest::hmac_sha256(
            &self.0,
            msg.as_bytes(),
        )))
    }
}
