//! Keys: the node's Ed25519 signing key (ring) and X25519 encryption key (HPKE), and the
//! file format they are kept in.
//!
//! Key file format (version 1): UTF-8 text, one line `refex-<kind>-v1:<hex>` where kind is
//! `ed25519-pkcs8` (the PKCS#8 v2 document ring produces) or `x25519` (the 32-byte secret).
//! Public keys travel in the peer directory as 64 hex digits.
//!
//! Sealing (envelope format v1, see `envelope`): HPKE base mode (RFC 9180) to the recipient's
//! X25519 key with KEM X25519-HKDF-SHA256, KDF HKDF-SHA256, AEAD ChaCha20-Poly1305;
//! `info` = `refex/1 envelope`, AAD = the exact header bytes. The signature is Ed25519 over
//! `SIG_TAG ‖ u64be(len header) ‖ header ‖ u64be(len enc) ‖ enc ‖ u64be(len ct) ‖ ct`.
//! Opening checks run in DESIGN.md's order, each with its own [`OpenError`]: size, decode,
//! recipient, sender = TLS peer, known sender, signature, clock window; the caller then checks
//! duplicates (it owns the store) before [`VerifiedEnvelope::decrypt`], then decodes the payload.
//! Receipts: Ed25519 over `RECEIPT_TAG ‖ body bytes`.
//! The tags end in NUL and are fixed, and every variable part of the envelope signature is
//! length-prefixed (u64 big-endian), so no two different (header, enc, ct) triples and no
//! receipt can ever produce the same signed message.
//!
//! Type-state: only [`seal`] (or [`SealedEnvelope::from_stored`], for our own store) makes a
//! [`SealedEnvelope`]; only [`verify`] makes a [`VerifiedEnvelope`]; only
//! [`VerifiedEnvelope::decrypt`] makes an [`OpenedEnvelope`]. Their fields are private (or
//! guarded by a private field), so no other module can build one.
//! Invariants: a private key is only ever read from a file that is a regular file, not a
//! symlink, and not readable by group or others (mode & 0o077 == 0); the bytes are never logged.
//! Must not: do network I/O or know about envelopes' wire layout beyond what seal/open need.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{self, Ed25519KeyPair, KeyPair};

use crate::digest::sha256;
use crate::envelope::{FormatError, Header, ReceiptBody, SignedReceipt, WireEnvelope, VERSION};
use crate::types::{AreaId, EnvelopeId};

type Kem = X25519HkdfSha256;
const HPKE_INFO: &[u8] = b"refex/1 envelope";
const SIG_TAG: &[u8] = b"refex/1 envelope-signature\0";
const RECEIPT_TAG: &[u8] = b"refex/1 receipt\0";

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

/// Reads a secret file, refusing symlinks, non-regular files and group/world access.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, KeyError> {
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
    fs::read(path).map_err(io)
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

fn decode_key_text(path: &Path, text: &[u8], kind: &str) -> Result<Vec<u8>, KeyError> {
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
    hex::decode(hex_part).map_err(|_| fmt_err("key material is not hex".into()))
}

fn encode_key_text(kind: &str, bytes: &[u8]) -> String {
    format!("refex-{kind}-v1:{}\n", hex::encode(bytes))
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
    pub fn generate() -> Result<(Self, String), KeyError> {
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

impl VerifyingKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let v = hex::decode(s.trim())
            .map_err(|_| KeyError::BadPublicKey(s.chars().take(80).collect()))?;
        let k: [u8; 32] = v
            .try_into()
            .map_err(|_| KeyError::BadPublicKey(s.chars().take(80).collect()))?;
        Ok(Self(k))
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
    sk: <Kem as hpke::Kem>::PrivateKey,
    pk: KemPublicKey,
}

impl fmt::Debug for KemSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KemSecretKey")
            .field("public", &self.pk)
            .finish()
    }
}

impl KemSecretKey {
    fn from_secret(bytes: &[u8]) -> Option<Self> {
        let sk = <Kem as hpke::Kem>::PrivateKey::from_bytes(bytes).ok()?;
        let pk = <Kem as hpke::Kem>::sk_to_pk(&sk);
        let pk = KemPublicKey(pk.to_bytes().as_slice().try_into().ok()?);
        Some(Self { sk, pk })
    }

    /// Generates a new key and returns it with its key-file text.
    pub fn generate() -> Result<(Self, String), KeyError> {
        let mut ikm = [0u8; 32];
        random_bytes(&mut ikm);
        let (sk, _) = Kem::derive_keypair(&ikm);
        let bytes = sk.to_bytes();
        let key = Self::from_secret(&bytes).ok_or(KeyError::Random)?;
        Ok((key, encode_key_text("x25519", &bytes)))
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
}

/// An X25519 public key, as listed in the peer directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KemPublicKey([u8; 32]);

impl fmt::Debug for KemPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KemPublicKey({})", self.to_hex())
    }
}

impl KemPublicKey {
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::BadPublicKey(s.chars().take(80).collect());
        let v = hex::decode(s.trim()).map_err(|_| bad())?;
        let k: [u8; 32] = v.try_into().map_err(|_| bad())?;
        <Kem as hpke::Kem>::PublicKey::from_bytes(&k).map_err(|_| bad())?;
        Ok(Self(k))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Why sealing failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The header's payload length does not match the payload.
    #[error("header payload_len {header} does not match the payload ({actual} bytes)")]
    Length { header: u64, actual: usize },
    /// The header names a format version this build does not write.
    #[error("header version {0} is not the version this build writes ({VERSION})")]
    Version(u8),
    /// HPKE refused (an invalid recipient key).
    #[error("encryption failed: {0}")]
    Hpke(String),
}

/// A sealed envelope. Only [`seal`] (or reloading our own store) makes one.
#[derive(Clone, Debug)]
pub struct SealedEnvelope {
    header: Header,
    bytes: Vec<u8>,
}

impl SealedEnvelope {
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn id(&self) -> EnvelopeId {
        self.header.id
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// Reloads an envelope this node sealed and stored (no signature check: our own store).
    pub fn from_stored(bytes: Vec<u8>) -> Result<Self, OpenError> {
        let w = WireEnvelope::decode(&bytes).map_err(OpenError::Decode)?;
        let header = Header::decode(&w.header).map_err(OpenError::Decode)?;
        Ok(Self { header, bytes })
    }
}

/// HPKE base-mode single-shot seal with this module's suite. Split out (with [`hpke_open`]) so
/// the RFC 9180 vector test drives the exact calls that `seal` and `decrypt` make.
fn hpke_seal<R: rand_core::CryptoRng + rand_core::RngCore>(
    recipient: &KemPublicKey,
    info: &[u8],
    aad: &[u8],
    plaintext: &[u8],
    rng: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), SealError> {
    let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient.0)
        .map_err(|e| SealError::Hpke(e.to_string()))?;
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, Kem, _>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        aad,
        rng,
    )
    .map_err(|e| SealError::Hpke(e.to_string()))?;
    Ok((enc.to_bytes().to_vec(), ct))
}

/// HPKE base-mode single-shot open; `None` for any failure (a malformed encapsulated key, a
/// wrong key, a tampered ciphertext or AAD) — the caller has one error for all of them.
fn hpke_open(
    key: &KemSecretKey,
    enc: &[u8],
    info: &[u8],
    aad: &[u8],
    ct: &[u8],
) -> Option<Vec<u8>> {
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(enc).ok()?;
    hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, Kem>(
        &OpModeR::Base,
        &key.sk,
        &enc,
        info,
        ct,
        aad,
    )
    .ok()
}

fn signed_message(header: &[u8], enc: &[u8], ct: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIG_TAG.len() + 24 + header.len() + enc.len() + ct.len());
    m.extend_from_slice(SIG_TAG);
    for part in [header, enc, ct] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part);
    }
    m
}

/// Encrypts `payload` to `recipient` and signs the result.
pub fn seal(
    header: Header,
    payload: &[u8],
    signer: &SigningKey,
    recipient: &KemPublicKey,
) -> Result<SealedEnvelope, SealError> {
    if header.v != VERSION {
        return Err(SealError::Version(header.v));
    }
    if header.payload_len != payload.len() as u64 {
        return Err(SealError::Length {
            header: header.payload_len,
            actual: payload.len(),
        });
    }
    let header_bytes = header.encode();
    // The OS random source failing is not recoverable and not input-driven (see random_bytes).
    let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
    let (enc, ct) = hpke_seal(recipient, HPKE_INFO, &header_bytes, payload, &mut rng)?;
    let sig = signer.sign(&signed_message(&header_bytes, &enc, &ct));
    let wire = WireEnvelope {
        v: VERSION,
        header: serde_bytes::ByteBuf::from(header_bytes),
        enc: serde_bytes::ByteBuf::from(enc),
        ct: serde_bytes::ByteBuf::from(ct),
        sig: serde_bytes::ByteBuf::from(sig.to_vec()),
    };
    Ok(SealedEnvelope {
        header,
        bytes: wire.encode(),
    })
}

/// Bounds for opening envelopes.
#[derive(Clone, Debug)]
pub struct OpenPolicy {
    pub max_bytes: usize,
    pub max_age: chrono::Duration,
    pub max_skew: chrono::Duration,
}

/// Why an envelope was refused, in the order the checks run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Larger than the configured limit (checked before decoding).
    #[error("envelope of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// Not a well-formed envelope.
    #[error("envelope does not decode: {0}")]
    Decode(FormatError),
    /// Addressed to another area.
    #[error("envelope is addressed to {to}, not this area")]
    WrongRecipient { to: AreaId },
    /// `from` is not the area the TLS connection authenticated.
    #[error("envelope claims to be from {claimed} but the connection is from {peer}")]
    SenderMismatch { claimed: AreaId, peer: AreaId },
    /// The sender has no keys in the directory.
    #[error("sender {0} is not in the peer directory")]
    UnknownSender(AreaId),
    /// The signature does not verify against the sender's keys.
    #[error("signature does not verify")]
    BadSignature,
    /// Created too long ago.
    #[error("envelope created {0} is older than the accepted window")]
    Stale(DateTime<Utc>),
    /// Created too far in the future.
    #[error("envelope created {0} is further in the future than the clock skew allows")]
    FromFuture(DateTime<Utc>),
    /// HPKE decryption failed (sealed to another key, or corrupted).
    #[error("envelope does not decrypt with this node's key")]
    Decrypt,
    /// The plaintext length differs from the header's `payload_len`.
    #[error("payload length differs from the header")]
    Length,
}

impl OpenError {
    /// A stable code for replies and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Decode(_) => "decode",
            Self::WrongRecipient { .. } => "wrong_recipient",
            Self::SenderMismatch { .. } => "sender_mismatch",
            Self::UnknownSender(_) => "unknown_sender",
            Self::BadSignature => "bad_signature",
            Self::Stale(_) => "stale",
            Self::FromFuture(_) => "from_future",
            Self::Decrypt => "decrypt",
            Self::Length => "payload_length",
        }
    }

    /// True when re-sending the same bytes can never succeed. A future-dated envelope may be
    /// accepted once clocks agree, so it is not permanent.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, Self::FromFuture(_))
    }
}

/// An envelope whose signature, addressing and freshness have been checked.
#[derive(Debug)]
pub struct VerifiedEnvelope {
    header: Header,
    wire: WireEnvelope,
    digest: [u8; 32],
}

/// A decrypted envelope. The fields are public to read; the private `_opened` field keeps any
/// other module from building one, so holding an `OpenedEnvelope` proves every check ran.
// `#[non_exhaustive]` would only stop other crates; the private field stops other modules.
#[allow(clippy::manual_non_exhaustive)]
pub struct OpenedEnvelope {
    pub header: Header,
    /// The plaintext: personal data. Never logged (the Debug impl shows only its length).
    pub payload: Vec<u8>,
    /// SHA-256 of the exact wire envelope bytes.
    pub digest: [u8; 32],
    _opened: (),
}

impl fmt::Debug for OpenedEnvelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenedEnvelope")
            .field("header", &self.header)
            .field("payload_len", &self.payload.len())
            .field("digest", &hex::encode(self.digest))
            .finish()
    }
}

/// Runs the opening checks up to (not including) the duplicate check and decryption.
pub fn verify(
    bytes: &[u8],
    me: &AreaId,
    tls_peer: &AreaId,
    sender_keys: impl Fn(&AreaId) -> Option<Vec<VerifyingKey>>,
    now: DateTime<Utc>,
    policy: &OpenPolicy,
) -> Result<VerifiedEnvelope, OpenError> {
    if bytes.len() > policy.max_bytes {
        return Err(OpenError::TooLarge {
            size: bytes.len(),
            max: policy.max_bytes,
        });
    }
    let wire = WireEnvelope::decode(bytes).map_err(OpenError::Decode)?;
    let header = Header::decode(&wire.header).map_err(OpenError::Decode)?;
    if &header.to != me {
        return Err(OpenError::WrongRecipient { to: header.to });
    }
    if &header.from != tls_peer {
        return Err(OpenError::SenderMismatch {
            claimed: header.from,
            peer: tls_peer.clone(),
        });
    }
    // An entry with no signing keys is as unknown as no entry: nothing could verify.
    let keys = match sender_keys(&header.from) {
        Some(keys) if !keys.is_empty() => keys,
        _ => return Err(OpenError::UnknownSender(header.from)),
    };
    let msg = signed_message(&wire.header, &wire.enc, &wire.ct);
    if !keys.iter().any(|k| k.verify(&msg, &wire.sig)) {
        return Err(OpenError::BadSignature);
    }
    // Checked arithmetic: a window reaching past chrono's range simply has no bound on that side.
    if let Some(oldest) = now.checked_sub_signed(policy.max_age) {
        if header.created < oldest {
            return Err(OpenError::Stale(header.created));
        }
    }
    if let Some(latest) = now.checked_add_signed(policy.max_skew) {
        if header.created > latest {
            return Err(OpenError::FromFuture(header.created));
        }
    }
    Ok(VerifiedEnvelope {
        header,
        wire,
        digest: sha256(bytes),
    })
}

impl VerifiedEnvelope {
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// SHA-256 of the exact envelope bytes (what the receipt names).
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// Decrypts with this node's key (the caller has checked for duplicates first), then checks
    /// the plaintext length against the signed header.
    pub fn decrypt(self, key: &KemSecretKey) -> Result<OpenedEnvelope, OpenError> {
        let payload = hpke_open(
            key,
            &self.wire.enc,
            HPKE_INFO,
            &self.wire.header,
            &self.wire.ct,
        )
        .ok_or(OpenError::Decrypt)?;
        if payload.len() as u64 != self.header.payload_len {
            return Err(OpenError::Length);
        }
        Ok(OpenedEnvelope {
            header: self.header,
            payload,
            digest: self.digest,
            _opened: (),
        })
    }
}

/// Signs a receipt body.
pub fn sign_receipt(body: &ReceiptBody, signer: &SigningKey) -> SignedReceipt {
    let bytes = body.encode();
    let mut msg = RECEIPT_TAG.to_vec();
    msg.extend_from_slice(&bytes);
    SignedReceipt {
        v: VERSION,
        body: serde_bytes::ByteBuf::from(bytes),
        sig: serde_bytes::ByteBuf::from(signer.sign(&msg).to_vec()),
    }
}

/// Why a receipt does not prove delivery.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    /// Not a well-formed signed receipt or receipt body (or an unknown version).
    #[error("receipt does not decode: {0}")]
    Decode(FormatError),
    /// Not signed by any of the receiver's keys (checked before the body is trusted).
    #[error("receipt signature does not verify against the receiver's keys")]
    BadSignature,
    /// Signed, but for a different envelope id.
    #[error("receipt names another envelope")]
    WrongEnvelope,
    /// Signed for this id, but over different envelope bytes.
    #[error("receipt's digest does not match the envelope sent")]
    WrongDigest,
    /// Signed, but naming a receiver other than the area the envelope was sent to.
    #[error("receipt is from another area")]
    WrongReceiver,
}

/// Checks a receipt: signature by one of `receiver_keys`, and it names exactly what was sent.
pub fn verify_receipt(
    bytes: &[u8],
    receiver_keys: &[VerifyingKey],
    expected_id: &EnvelopeId,
    expected_sha256: &[u8; 32],
    expected_receiver: &AreaId,
) -> Result<ReceiptBody, ReceiptError> {
    let signed = SignedReceipt::decode(bytes).map_err(ReceiptError::Decode)?;
    let mut msg = RECEIPT_TAG.to_vec();
    msg.extend_from_slice(&signed.body);
    if !receiver_keys.iter().any(|k| k.verify(&msg, &signed.sig)) {
        return Err(ReceiptError::BadSignature);
    }
    let body = ReceiptBody::decode(&signed.body).map_err(ReceiptError::Decode)?;
    if &body.envelope_id != expected_id {
        return Err(ReceiptError::WrongEnvelope);
    }
    if &body.envelope_sha256 != expected_sha256 {
        return Err(ReceiptError::WrongDigest);
    }
    if &body.receiver != expected_receiver {
        return Err(ReceiptError::WrongReceiver);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_key_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sign.key");
        let (key, text) = SigningKey::generate().unwrap();
        write_secret_file(&path, text.as_bytes()).unwrap();
        let loaded = SigningKey::load(&path).unwrap();
        assert_eq!(loaded.public_key(), key.public_key());
        let sig = loaded.sign(b"hello");
        assert!(key.public_key().verify(b"hello", &sig));
        assert!(!key.public_key().verify(b"hellp", &sig));
    }

    #[test]
    fn group_readable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sign.key");
        let (_, text) = SigningKey::generate().unwrap();
        write_secret_file(&path, text.as_bytes()).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            SigningKey::load(&path),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn symlinked_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sign.key");
        let (_, text) = SigningKey::generate().unwrap();
        write_secret_file(&path, text.as_bytes()).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(
            SigningKey::load(&link),
            Err(KeyError::Permissions { .. })
        ));
    }

    mod envelopes {
        use super::super::*;
        use crate::envelope::{Header, ReceiptStatus, CONTENT_TYPE_REFERRAL_V1};
        use crate::types::PriorityClass;

        struct World {
            sender: SigningKey,
            kem: KemSecretKey,
            wm: AreaId,
            london: AreaId,
        }

        fn world() -> World {
            World {
                sender: SigningKey::generate().unwrap().0,
                kem: KemSecretKey::generate().unwrap().0,
                wm: "west-midlands".parse().unwrap(),
                london: "london".parse().unwrap(),
            }
        }

        fn policy() -> OpenPolicy {
            OpenPolicy {
                max_bytes: 64 * 1024,
                max_age: chrono::Duration::days(1),
                max_skew: chrono::Duration::minutes(5),
            }
        }

        fn header(w: &World, created: DateTime<Utc>, len: usize) -> Header {
            Header {
                v: 1,
                id: EnvelopeId::generate(),
                from: w.wm.clone(),
                to: w.london.clone(),
                created,
                priority: PriorityClass::Enhanced,
                due_by: created,
                content_type: CONTENT_TYPE_REFERRAL_V1.into(),
                payload_len: len as u64,
            }
        }

        fn sealed(w: &World) -> Vec<u8> {
            seal(
                header(w, Utc::now(), 5),
                b"hello",
                &w.sender,
                &w.kem.public_key(),
            )
            .unwrap()
            .to_bytes()
        }

        fn open(w: &World, bytes: &[u8]) -> Result<OpenedEnvelope, OpenError> {
            let keys = vec![w.sender.public_key()];
            verify(
                bytes,
                &w.london,
                &w.wm,
                |a| (a == &w.wm).then(|| keys.clone()),
                Utc::now(),
                &policy(),
            )?
            .decrypt(&w.kem)
        }

        /// Rewrites one part of the wire envelope.
        fn tamper(bytes: &[u8], f: impl FnOnce(&mut WireEnvelope)) -> Vec<u8> {
            let mut wire = WireEnvelope::decode(bytes).unwrap();
            f(&mut wire);
            wire.encode()
        }

        #[test]
        fn an_envelope_round_trips() {
            let w = world();
            let opened = open(&w, &sealed(&w)).unwrap();
            assert_eq!(opened.payload, b"hello");
            assert_eq!(opened.header.priority, PriorityClass::Enhanced);
        }

        #[test]
        fn a_changed_header_byte_breaks_the_signature() {
            let w = world();
            let bytes = tamper(&sealed(&w), |e| {
                let mut h = Header::decode(&e.header).unwrap();
                h.priority = PriorityClass::Standard;
                e.header = serde_bytes::ByteBuf::from(h.encode());
            });
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::BadSignature);
        }

        #[test]
        fn a_flipped_ciphertext_byte_breaks_the_signature() {
            let w = world();
            let bytes = tamper(&sealed(&w), |e| e.ct[0] ^= 1);
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::BadSignature);
        }

        #[test]
        fn a_flipped_signature_byte_is_refused() {
            let w = world();
            let bytes = tamper(&sealed(&w), |e| e.sig[10] ^= 1);
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::BadSignature);
        }

        #[test]
        fn an_envelope_sealed_to_another_key_does_not_decrypt() {
            let w = world();
            let other = KemSecretKey::generate().unwrap().0;
            let bytes = seal(
                header(&w, Utc::now(), 5),
                b"hello",
                &w.sender,
                &other.public_key(),
            )
            .unwrap()
            .to_bytes();
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::Decrypt);
        }

        #[test]
        fn addressing_and_identity_are_checked_before_the_signature() {
            let w = world();
            let bytes = sealed(&w);
            let keys = vec![w.sender.public_key()];
            let other: AreaId = "kent".parse().unwrap();
            let r = verify(
                &bytes,
                &other,
                &w.wm,
                |_| Some(keys.clone()),
                Utc::now(),
                &policy(),
            );
            assert!(matches!(r, Err(OpenError::WrongRecipient { .. })));
            let r = verify(
                &bytes,
                &w.london,
                &other,
                |_| Some(keys.clone()),
                Utc::now(),
                &policy(),
            );
            assert!(matches!(r, Err(OpenError::SenderMismatch { .. })));
            let r = verify(&bytes, &w.london, &w.wm, |_| None, Utc::now(), &policy());
            assert!(matches!(r, Err(OpenError::UnknownSender(_))));
        }

        #[test]
        fn stale_and_future_envelopes_are_refused() {
            let w = world();
            let keys = vec![w.sender.public_key()];
            for (created, stale) in [
                (Utc::now() - chrono::Duration::days(2), true),
                (Utc::now() + chrono::Duration::hours(1), false),
            ] {
                let bytes = seal(header(&w, created, 1), b"x", &w.sender, &w.kem.public_key())
                    .unwrap()
                    .to_bytes();
                let r = verify(
                    &bytes,
                    &w.london,
                    &w.wm,
                    |_| Some(keys.clone()),
                    Utc::now(),
                    &policy(),
                );
                if stale {
                    assert!(matches!(r, Err(OpenError::Stale(_))));
                } else {
                    assert!(matches!(r, Err(OpenError::FromFuture(_))));
                }
            }
        }

        #[test]
        fn the_size_limit_is_checked_before_decoding() {
            let w = world();
            let garbage = vec![0xffu8; 64 * 1024 + 1];
            let keys = vec![w.sender.public_key()];
            let r = verify(
                &garbage,
                &w.london,
                &w.wm,
                |_| Some(keys.clone()),
                Utc::now(),
                &policy(),
            );
            assert!(matches!(r, Err(OpenError::TooLarge { .. })));
            let truncated = &sealed(&w)[..40];
            assert!(matches!(open(&w, truncated), Err(OpenError::Decode(_))));
        }

        #[test]
        fn either_key_of_a_rotation_verifies() {
            let w = world();
            let old = SigningKey::generate().unwrap().0;
            let keys = vec![old.public_key(), w.sender.public_key()];
            let bytes = sealed(&w);
            assert!(verify(
                &bytes,
                &w.london,
                &w.wm,
                |_| Some(keys.clone()),
                Utc::now(),
                &policy()
            )
            .is_ok());
        }

        #[test]
        fn receipts_verify_only_for_what_was_sent() {
            let w = world();
            let receiver = SigningKey::generate().unwrap().0;
            let id = EnvelopeId::generate();
            let body = ReceiptBody {
                v: 1,
                envelope_id: id,
                envelope_sha256: [3; 32],
                receiver: w.london.clone(),
                received_at: Utc::now(),
                status: ReceiptStatus::Delivered,
                audit_head: "1:ab".into(),
            };
            let bytes = sign_receipt(&body, &receiver).to_bytes();
            let keys = [receiver.public_key()];
            assert_eq!(
                verify_receipt(&bytes, &keys, &id, &[3; 32], &w.london).unwrap(),
                body
            );
            assert_eq!(
                verify_receipt(&bytes, &[w.sender.public_key()], &id, &[3; 32], &w.london),
                Err(ReceiptError::BadSignature)
            );
            assert_eq!(
                verify_receipt(&bytes, &keys, &EnvelopeId::generate(), &[3; 32], &w.london),
                Err(ReceiptError::WrongEnvelope)
            );
            assert_eq!(
                verify_receipt(&bytes, &keys, &id, &[4; 32], &w.london),
                Err(ReceiptError::WrongDigest)
            );
            assert_eq!(
                verify_receipt(&bytes, &keys, &id, &[3; 32], &w.wm),
                Err(ReceiptError::WrongReceiver)
            );
            let mut signed = SignedReceipt::decode(&bytes).unwrap();
            let last = signed.body.len() - 1;
            signed.body[last] ^= 1;
            assert_eq!(
                verify_receipt(&signed.to_bytes(), &keys, &id, &[3; 32], &w.london),
                Err(ReceiptError::BadSignature)
            );
        }

        /// RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20Poly1305,
        /// base mode. Values from the CFRG test-vector file (test-vectors-5f503c5.json, which
        /// the hpke crate ships), cross-checked against several independent implementations'
        /// copies of the same vector.
        mod rfc_9180_a_2_1 {
            pub const IKM_E: &str =
                "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
            pub const IKM_R: &str =
                "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
            pub const SK_RM: &str =
                "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
            pub const PK_RM: &str =
                "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
            pub const ENC: &str =
                "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
            pub const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
            /// First encryption (sequence number 0).
            pub const AAD: &str = "436f756e742d30";
            pub const CT: &str = "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28";
            pub const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
        }
        use rfc_9180_a_2_1 as a21;

        fn unhex(s: &str) -> Vec<u8> {
            hex::decode(s).unwrap()
        }

        #[test]
        fn hpke_opens_the_rfc_9180_vector() {
            let key = KemSecretKey::from_secret(&unhex(a21::SK_RM)).unwrap();
            assert_eq!(
                key.public_key().to_hex(),
                a21::PK_RM,
                "our key type derives the vector's public key"
            );
            let opened = hpke_open(
                &key,
                &unhex(a21::ENC),
                &unhex(a21::INFO),
                &unhex(a21::AAD),
                &unhex(a21::CT),
            );
            assert_eq!(opened, Some(unhex(a21::PT)));
            let mut aad = unhex(a21::AAD);
            aad[0] ^= 1;
            assert_eq!(
                hpke_open(
                    &key,
                    &unhex(a21::ENC),
                    &unhex(a21::INFO),
                    &aad,
                    &unhex(a21::CT)
                ),
                None,
                "a changed AAD must not open"
            );
        }

        /// Hands out fixed bytes: HPKE draws the ephemeral key's `ikmE` from the RNG, so this
        /// replays the vector's sender.
        struct FixedRng(Vec<u8>);

        impl rand_core::RngCore for FixedRng {
            fn next_u32(&mut self) -> u32 {
                unreachable!("HPKE only fills byte buffers")
            }
            fn next_u64(&mut self) -> u64 {
                unreachable!("HPKE only fills byte buffers")
            }
            fn fill_bytes(&mut self, dst: &mut [u8]) {
                let rest = self.0.split_off(dst.len());
                dst.copy_from_slice(&self.0);
                self.0 = rest;
            }
        }

        impl rand_core::CryptoRng for FixedRng {}

        #[test]
        fn hpke_seals_the_rfc_9180_vector() {
            let recipient = KemPublicKey::from_hex(a21::PK_RM).unwrap();
            let (enc, ct) = hpke_seal(
                &recipient,
                &unhex(a21::INFO),
                &unhex(a21::AAD),
                &unhex(a21::PT),
                &mut FixedRng(unhex(a21::IKM_E)),
            )
            .unwrap();
            assert_eq!(hex::encode(enc), a21::ENC);
            assert_eq!(hex::encode(ct), a21::CT);
        }

        #[test]
        fn key_generation_derives_the_rfc_9180_recipient_key_from_its_seed() {
            // `generate` runs DeriveKeyPair on 32 random bytes; with the vector's ikmR it must
            // give the vector's key pair.
            let (sk, pk) = Kem::derive_keypair(&unhex(a21::IKM_R));
            assert_eq!(hex::encode(sk.to_bytes()), a21::SK_RM);
            assert_eq!(hex::encode(pk.to_bytes()), a21::PK_RM);
        }

        #[test]
        fn debug_output_never_shows_secret_keys() {
            let (kem, text) = KemSecretKey::generate().unwrap();
            let secret_hex = text
                .trim()
                .trim_start_matches("refex-x25519-v1:")
                .to_owned();
            assert!(!format!("{kem:?}").contains(&secret_hex));
            assert!(format!("{kem:?}").contains(&kem.public_key().to_hex()));

            let (signer, text) = SigningKey::generate().unwrap();
            let doc =
                hex::decode(text.trim().trim_start_matches("refex-ed25519-pkcs8-v1:")).unwrap();
            // ring's Ed25519 PKCS#8 v2 document holds the 32-byte seed at offset 16.
            let seed_hex = hex::encode(&doc[16..48]);
            let shown = format!("{signer:?}");
            assert!(!shown.contains(&seed_hex));
            assert!(!shown.contains(&hex::encode(&doc)));
        }

        #[test]
        fn a_header_byte_flipped_in_transit_breaks_the_signature_when_it_still_decodes() {
            let w = world();
            let mut bytes = sealed(&w);
            // Turn one letter of the content type inside the travelling header into another
            // ASCII character: the header and the envelope stay valid CBOR.
            let at = position(&bytes, CONTENT_TYPE_REFERRAL_V1.as_bytes());
            bytes[at] ^= 0x01;
            let wire = WireEnvelope::decode(&bytes).unwrap();
            let h = Header::decode(&wire.header).unwrap();
            assert_ne!(
                h.content_type, CONTENT_TYPE_REFERRAL_V1,
                "the flip changed the header"
            );
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::BadSignature);
        }

        #[test]
        fn a_header_byte_flipped_in_transit_is_a_decode_error_when_it_no_longer_decodes() {
            let w = world();
            let mut bytes = sealed(&w);
            let header = WireEnvelope::decode(&bytes).unwrap().header.into_vec();
            // The header's first byte is its map length (9 fields): claim 10.
            let at = position(&bytes, &header);
            assert_eq!(bytes[at], 0xa9);
            bytes[at] = 0xaa;
            assert!(matches!(
                open(&w, &bytes).unwrap_err(),
                OpenError::Decode(FormatError::Malformed("header"))
            ));
        }

        fn position(haystack: &[u8], needle: &[u8]) -> usize {
            haystack
                .windows(needle.len())
                .position(|win| win == needle)
                .unwrap()
        }

        #[test]
        fn every_truncation_of_an_envelope_is_a_decode_error() {
            let w = world();
            let bytes = sealed(&w);
            for len in 0..bytes.len() {
                assert!(
                    matches!(open(&w, &bytes[..len]), Err(OpenError::Decode(_))),
                    "truncated to {len} bytes"
                );
            }
        }

        #[test]
        fn a_sender_entry_without_keys_is_an_unknown_sender() {
            let w = world();
            let r = verify(
                &sealed(&w),
                &w.london,
                &w.wm,
                |_| Some(Vec::new()),
                Utc::now(),
                &policy(),
            );
            assert!(matches!(r, Err(OpenError::UnknownSender(_))));
        }

        #[test]
        fn an_envelope_whose_plaintext_length_differs_from_its_header_is_refused() {
            // Only a buggy or hostile sender makes one, so build it by hand, validly signed.
            let w = world();
            let header_bytes = header(&w, Utc::now(), 99).encode();
            let (enc, ct) = hpke_seal(
                &w.kem.public_key(),
                HPKE_INFO,
                &header_bytes,
                b"hello",
                &mut rand_core::UnwrapErr(rand_core::OsRng),
            )
            .unwrap();
            let sig = w.sender.sign(&signed_message(&header_bytes, &enc, &ct));
            let bytes = WireEnvelope {
                v: VERSION,
                header: header_bytes.into(),
                enc: enc.into(),
                ct: ct.into(),
                sig: sig.to_vec().into(),
            }
            .encode();
            assert_eq!(open(&w, &bytes).unwrap_err(), OpenError::Length);
        }

        #[test]
        fn seal_refuses_a_wrong_payload_length_or_version() {
            let w = world();
            let pk = w.kem.public_key();
            let r = seal(header(&w, Utc::now(), 4), b"hello", &w.sender, &pk);
            assert!(matches!(
                r,
                Err(SealError::Length {
                    header: 4,
                    actual: 5
                })
            ));
            let mut h = header(&w, Utc::now(), 5);
            h.v = 2;
            assert!(matches!(
                seal(h, b"hello", &w.sender, &pk),
                Err(SealError::Version(2))
            ));
        }

        #[test]
        fn a_stored_envelope_reloads_as_it_was_sealed() {
            let w = world();
            let h = header(&w, Utc::now(), 5);
            let sealed = seal(h.clone(), b"hello", &w.sender, &w.kem.public_key()).unwrap();
            let reloaded = SealedEnvelope::from_stored(sealed.to_bytes()).unwrap();
            assert_eq!(reloaded.header(), &h);
            assert_eq!(reloaded.id(), h.id);
            assert_eq!(reloaded.bytes(), sealed.bytes());
            assert!(matches!(
                SealedEnvelope::from_stored(b"not cbor".to_vec()),
                Err(OpenError::Decode(_))
            ));
        }

        #[test]
        fn the_verified_digest_is_the_sha256_of_the_wire_bytes() {
            let w = world();
            let bytes = sealed(&w);
            let opened = open(&w, &bytes).unwrap();
            assert_eq!(opened.digest, crate::digest::sha256(&bytes));
            assert!(
                !format!("{opened:?}").contains("hello"),
                "Debug must not show the payload"
            );
        }

        #[test]
        fn the_clock_window_edges_are_accepted() {
            let w = world();
            let keys = vec![w.sender.public_key()];
            let now = Utc::now();
            for created in [now - policy().max_age, now + policy().max_skew] {
                let bytes = seal(header(&w, created, 1), b"x", &w.sender, &w.kem.public_key())
                    .unwrap()
                    .to_bytes();
                let r = verify(
                    &bytes,
                    &w.london,
                    &w.wm,
                    |_| Some(keys.clone()),
                    now,
                    &policy(),
                );
                assert!(r.is_ok(), "created {created} refused at now {now}");
            }
        }

        #[test]
        fn refusal_codes_are_distinct_and_only_a_future_date_is_worth_retrying() {
            let area: AreaId = "kent".parse().unwrap();
            let t = Utc::now();
            let all = [
                OpenError::TooLarge { size: 2, max: 1 },
                OpenError::Decode(FormatError::Malformed("envelope")),
                OpenError::WrongRecipient { to: area.clone() },
                OpenError::SenderMismatch {
                    claimed: area.clone(),
                    peer: area.clone(),
                },
                OpenError::UnknownSender(area),
                OpenError::BadSignature,
                OpenError::Stale(t),
                OpenError::FromFuture(t),
                OpenError::Decrypt,
                OpenError::Length,
            ];
            let codes: std::collections::HashSet<_> = all.iter().map(|e| e.code()).collect();
            assert_eq!(codes.len(), all.len());
            let transient: Vec<_> = all.iter().filter(|e| !e.is_permanent()).collect();
            assert_eq!(transient, [&OpenError::FromFuture(t)]);
        }

        #[test]
        fn an_encryption_key_round_trips_through_its_file_and_its_hex() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("kem.key");
            let (key, text) = KemSecretKey::generate().unwrap();
            write_secret_file(&path, text.as_bytes()).unwrap();
            let loaded = KemSecretKey::load(&path).unwrap();
            assert_eq!(loaded.public_key(), key.public_key());
            let hex = key.public_key().to_hex();
            assert_eq!(hex.len(), 64);
            assert_eq!(KemPublicKey::from_hex(&hex).unwrap(), key.public_key());
            assert!(KemPublicKey::from_hex(&hex[..62]).is_err());
            assert!(KemPublicKey::from_hex("zz").is_err());
        }

        #[test]
        fn a_signing_key_file_is_not_an_encryption_key_file() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sign.key");
            let (_, text) = SigningKey::generate().unwrap();
            write_secret_file(&path, text.as_bytes()).unwrap();
            assert!(matches!(
                KemSecretKey::load(&path),
                Err(KeyError::Format { .. })
            ));
        }

        #[test]
        fn a_receipt_that_is_not_cbor_does_not_decode() {
            let keys = [SigningKey::generate().unwrap().0.public_key()];
            let id = EnvelopeId::generate();
            let london: AreaId = "london".parse().unwrap();
            assert!(matches!(
                verify_receipt(b"\x00garbage", &keys, &id, &[0; 32], &london),
                Err(ReceiptError::Decode(_))
            ));
        }
    }
}
