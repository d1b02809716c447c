//! Sealing, verifying and opening envelopes, and signing and verifying receipts (format and
//! order of checks in the `crypto` module doc).

use std::fmt;

use chrono::{DateTime, Utc};
use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};

use crate::core::digest::sha256;
use crate::core::envelope::{
    FormatError, Header, ReceiptBody, SignedReceipt, WireEnvelope, SHARED_KEY_VERSION, VERSION,
};
use crate::core::types::{AreaId, EnvelopeId};

use super::keys::*;

use super::keys::Kem;
use super::shared::{self, SealContexts};
pub(super) const HPKE_INFO: &[u8] = b"refex/1 envelope";
pub(super) const SIG_TAG: &[u8] = b"refex/1 envelope-signature\0";
pub(super) const SIG_TAG_V2: &[u8] = b"refex/2 envelope-signature\0";
pub(super) const RECEIPT_TAG: &[u8] = b"refex/1 receipt\0";

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
pub(super) fn hpke_seal<R: rand_core::CryptoRng + rand_core::RngCore>(
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
pub(super) fn hpke_open(
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

/// What an envelope of wire version `v` signs (each version under its own tag).
pub(super) fn signed_message(v: u8, header: &[u8], enc: &[u8], ct: &[u8]) -> Vec<u8> {
    let tag = if v == SHARED_KEY_VERSION {
        SIG_TAG_V2
    } else {
        SIG_TAG
    };
    let mut m = Vec::with_capacity(tag.len() + 24 + header.len() + enc.len() + ct.len());
    m.extend_from_slice(tag);
    for part in [header, enc, ct] {
        m.extend_from_slice(&(part.len() as u64).to_be_bytes());
        m.extend_from_slice(part);
    }
    m
}

/// Encrypts `payload` to `recipient` and signs the result: as a version-2 envelope under a
/// context of `shared` when given (the recipient's directory entry says it opens them), else as
/// version 1 with an HPKE key of its own.
pub fn seal(
    header: Header,
    payload: &[u8],
    signer: &SigningKey,
    recipient: &KemPublicKey,
    shared: Option<&SealContexts>,
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
    let (v, (enc, ct)) = match shared {
        Some(contexts) => (
            SHARED_KEY_VERSION,
            contexts.seal(recipient, &header.id, &header_bytes, payload)?,
        ),
        None => {
            let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
            let sealed = hpke_seal(recipient, HPKE_INFO, &header_bytes, payload, &mut rng)?;
            (VERSION, sealed)
        }
    };
    let sig = signer.sign(&signed_message(v, &header_bytes, &enc, &ct));
    let wire = WireEnvelope {
        v,
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
    let msg = signed_message(wire.v, &wire.header, &wire.enc, &wire.ct);
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

/// After [`OpenError::BadSignature`]: true when the envelope is intact — its header, HPKE
/// encapsulation and ciphertext open with `key` (the AEAD covers the header) — so only the
/// signing key is not one the directory lists (a rotation not yet loaded: transient). False
/// for a tampered or corrupted envelope (refused for good). The plaintext is discarded.
pub fn intact_but_unknown_signer(bytes: &[u8], key: &KemSecretKey) -> bool {
    let Ok(wire) = WireEnvelope::decode(bytes) else {
        return false;
    };
    let Ok(header) = Header::decode(&wire.header) else {
        return false;
    };
    open_payload(key, &wire, &header.id).is_some()
}

/// Decrypts `wire` (of either version) with `key`; `None` for any failure.
fn open_payload(key: &KemSecretKey, wire: &WireEnvelope, id: &EnvelopeId) -> Option<Vec<u8>> {
    if wire.v == SHARED_KEY_VERSION {
        shared::open(key, &wire.enc, id, &wire.header, &wire.ct)
    } else {
        hpke_open(key, &wire.enc, HPKE_INFO, &wire.header, &wire.ct)
    }
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
        let payload = open_payload(key, &self.wire, &self.header.id).ok_or(OpenError::Decrypt)?;
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
