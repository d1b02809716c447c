//! Wire formats: the envelope header, the sealed envelope, the receipt and the reply a receiver
//! sends back. Pure: CBOR (serde_cbor) encode/decode only; the cryptography is in `crypto`.
//!
//! Formats (version 1). Every structure is a CBOR map whose first field is `v: 1`; a decoder
//! refuses any other version, so a future format change is a new version, never a silent
//! reinterpretation.
//! - `Header` {v, id (16-byte bstr), from, to, created (RFC 3339 text), priority
//!   ("enhanced"|"standard"), due_by (RFC 3339), content_type, payload_len}. No personal data.
//! - `WireEnvelope` {v, header (bstr: the exact CBOR bytes of the header), enc (bstr: the HPKE
//!   encapsulated key, 32 bytes), ct (bstr: ciphertext), sig (bstr: 64-byte Ed25519)}. The
//!   header travels as bytes so that what was signed and used as AAD is exactly what is checked.
//!   The wire envelope alone also comes in version 2 ([`SHARED_KEY_VERSION`]): the same fields,
//!   but `enc` names an HPKE context that the sender shares among many envelopes to the same
//!   area and `ct` is sealed under a key exported from it for this envelope alone (the
//!   `crypto` module doc). A build reads both; which one it writes to an area is the peer
//!   directory's `envelope_version` for that area.
//! - `ReceiptBody` {v, envelope_id, envelope_sha256 (SHA-256 of the exact wire envelope bytes),
//!   receiver, received_at, status, audit_head}; `SignedReceipt` {v, body (bstr), sig (bstr)}.
//! - `Reply` (receiver → sender, one per stream): {v, reply} where reply is `{"receipt": bstr}`
//!   (the signed receipt's exact bytes) or `{"refused": {code, message, permanent}}`. At most
//!   [`MAX_REPLY_BYTES`]; `code` is at most [`MAX_REFUSAL_CODE`] bytes and `message` at most
//!   [`MAX_REFUSAL_MESSAGE`] bytes ([`Reply::refused`] truncates, so a reply we build always fits).
//!
//! Encoding: serde_cbor's default (maps keyed by field name, definite lengths). Nobody re-encodes
//! a decoded structure to check it: signatures and digests cover the exact bytes that travelled,
//! which is why the header and the receipt body are carried as byte strings.
//!
//! Version rules: each decoder first reads only `v` (ignoring every other field) and refuses an
//! unknown version with [`FormatError::Version`]; only then does it decode the whole structure,
//! refusing unknown fields. A reader therefore always says "version 2 is not supported" rather
//! than "malformed" when a newer peer talks to it. Adding or changing a field means a new
//! version.
//!
//! Invariants: decoding never trusts a length from the input beyond the input's own size
//! (`serde_cbor::from_slice` reads byte and text strings out of the slice, so a forged length
//! fails at the end of the input instead of allocating); the transport has already bounded the
//! frame. Must not: do cryptography, I/O or logging.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::types::{AreaId, EnvelopeId, PriorityClass};

/// The format version this build writes and accepts.
pub const VERSION: u8 = 1;

/// The wire envelope's second version: the same fields, sealed under a key exported from an HPKE
/// context shared by many envelopes (headers, receipts and replies stay at [`VERSION`]).
pub const SHARED_KEY_VERSION: u8 = 2;

/// The wire envelope versions this build reads (and a peer directory may name).
pub const ENVELOPE_VERSIONS: [u8; 2] = [VERSION, SHARED_KEY_VERSION];

/// Content type of a `refex.referral.v1` payload encoded as CBOR.
pub const CONTENT_TYPE_REFERRAL_V1: &str = "application/vnd.refex.referral.v1+cbor";

/// Largest encoded [`Reply`] accepted. A receipt is a few hundred bytes and a refusal's text is
/// bounded below, so 16 KiB leaves room without letting a peer make us parse megabytes.
pub const MAX_REPLY_BYTES: usize = 16 * 1024;

/// Longest refusal code a [`Reply`] carries (codes are short snake_case words).
pub const MAX_REFUSAL_CODE: usize = 64;

/// Longest refusal message a [`Reply`] carries.
pub const MAX_REFUSAL_MESSAGE: usize = 1024;

/// Why bytes are not a valid structure of this module. Names only the structure, never content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not CBOR of the expected shape.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A version this build does not know.
    #[error(
        "{what} version {found} is not supported (this build reads {})",
        supported(what)
    )]
    Version { what: &'static str, found: u8 },
    /// Larger than this structure may ever be (checked before decoding).
    #[error("{what} of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        what: &'static str,
        size: usize,
        max: usize,
    },
}

/// Only the version field of any versioned structure; every other field is skipped.
#[derive(Deserialize)]
struct VersionOnly {
    v: u8,
}

/// Decodes a versioned structure: the version first (so an unknown version is reported as such),
/// then the whole thing.
fn decode_versioned<T: serde::de::DeserializeOwned>(
    what: &'static str,
    b: &[u8],
) -> Result<T, FormatError> {
    let VersionOnly { v } = serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed(what))?;
    if !readable(what).contains(&v) {
        return Err(FormatError::Version { what, found: v });
    }
    serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed(what))
}

/// Encodes `value` as CBOR.
///
/// Serializing these structures into a `Vec` cannot fail: serde_cbor only errors on I/O (a `Vec`
/// never fails to grow short of aborting) or on map keys it cannot write, and every map here is
/// a struct with field-name keys. The empty fallback is therefore unreachable; it would in any
/// case fail every signature and decode check rather than pass one.
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_cbor::to_vec(value).unwrap_or_default()
}

/// The envelope header: routing and scheduling facts, no personal data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub v: u8,
    #[serde(with = "id_bytes")]
    pub id: EnvelopeId,
    pub from: AreaId,
    pub to: AreaId,
    pub created: DateTime<Utc>,
    pub priority: PriorityClass,
    pub due_by: DateTime<Utc>,
    pub content_type: String,
    pub payload_len: u64,
}

mod id_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::core::types::EnvelopeId;

    pub fn serialize<S: Serializer>(id: &EnvelopeId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(id.as_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EnvelopeId, D::Error> {
        let b = serde_bytes::ByteBuf::deserialize(d)?;
        EnvelopeId::from_slice(&b).map_err(serde::de::Error::custom)
    }
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        decode_versioned("header", b)
    }
}

/// The structure whose decoder also reads [`SHARED_KEY_VERSION`].
const ENVELOPE: &str = "envelope";

/// The versions this build reads of structure `what`.
fn readable(what: &str) -> &'static [u8] {
    if what == ENVELOPE {
        &ENVELOPE_VERSIONS
    } else {
        &[VERSION]
    }
}

/// [`readable`] for [`FormatError::Version`]'s message: "1", "1 and 2".
fn supported(what: &str) -> String {
    versions_text(readable(what), " and ")
}

/// `versions` for a message, joined by `conjunction`: "1 and 2", "1 or 2".
pub fn versions_text(versions: &[u8], conjunction: &str) -> String {
    let v: Vec<String> = versions.iter().map(u8::to_string).collect();
    v.join(conjunction)
}

/// A sealed envelope as it travels and is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireEnvelope {
    pub v: u8,
    pub header: serde_bytes::ByteBuf,
    pub enc: serde_bytes::ByteBuf,
    pub ct: serde_bytes::ByteBuf,
    pub sig: serde_bytes::ByteBuf,
}

impl WireEnvelope {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        decode_versioned(ENVELOPE, b)
    }
}

/// What a receipt attests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Durably written into the receiving area's inbox.
    Delivered,
    /// The referral it carries was already delivered from the same area by another envelope
    /// (the receiver's end-to-end check); no second inbox file was written. As final as
    /// `Delivered` for the sender.
    Duplicate,
}

/// The signed statement a receiver returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiptBody {
    pub v: u8,
    #[serde(with = "id_bytes")]
    pub envelope_id: EnvelopeId,
    #[serde(with = "serde_bytes")]
    pub envelope_sha256: [u8; 32],
    pub receiver: AreaId,
    pub received_at: DateTime<Utc>,
    pub status: ReceiptStatus,
    pub audit_head: String,
}

impl ReceiptBody {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        decode_versioned("receipt body", b)
    }
}

/// A receipt body with the receiver's signature over it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedReceipt {
    pub v: u8,
    pub body: serde_bytes::ByteBuf,
    pub sig: serde_bytes::ByteBuf,
}

impl SignedReceipt {
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        decode_versioned("receipt", b)
    }
}

/// The receiver's answer on the stream an envelope came in on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The signed receipt (the original one, for a re-send).
    Receipt(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Not accepted. `permanent`: sending again can never succeed.
    Refused {
        code: String,
        message: String,
        permanent: bool,
    },
}

/// The versioned frame around a [`Reply`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplyWire {
    v: u8,
    reply: Reply,
}

impl Reply {
    /// A refusal; `code` and `message` are cut to their limits (at a character boundary) so the
    /// encoded reply always fits [`MAX_REPLY_BYTES`].
    pub fn refused(code: &str, message: &str, permanent: bool) -> Self {
        Self::Refused {
            code: crate::core::text::truncate(code, MAX_REFUSAL_CODE).to_owned(),
            message: crate::core::text::truncate(message, MAX_REFUSAL_MESSAGE).to_owned(),
            permanent,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        encode(&ReplyWire {
            v: VERSION,
            reply: self.clone(),
        })
    }

    /// Decodes a reply of at most [`MAX_REPLY_BYTES`], refusing over-long refusal texts.
    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        if b.len() > MAX_REPLY_BYTES {
            return Err(FormatError::TooLarge {
                what: "reply",
                size: b.len(),
                max: MAX_REPLY_BYTES,
            });
        }
        let ReplyWire { reply, .. } = decode_versioned("reply", b)?;
        if let Self::Refused { code, message, .. } = &reply {
            if code.len() > MAX_REFUSAL_CODE || message.len() > MAX_REFUSAL_MESSAGE {
                return Err(FormatError::Malformed("reply"));
            }
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            v: 1,
            id: EnvelopeId::generate(),
            from: "west-midlands".parse().unwrap(),
            to: "london".parse().unwrap(),
            created: Utc::now(),
            priority: PriorityClass::Enhanced,
            due_by: Utc::now(),
            content_type: CONTENT_TYPE_REFERRAL_V1.into(),
            payload_len: 10,
        }
    }

    #[test]
    fn a_header_round_trips() {
        let h = header();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let mut h = header();
        h.v = 2;
        assert_eq!(
            Header::decode(&h.encode()),
            Err(FormatError::Version {
                what: "header",
                found: 2
            })
        );
    }

    #[test]
    fn replies_round_trip_and_garbage_is_refused() {
        for r in [
            Reply::Receipt(vec![1, 2, 3]),
            Reply::refused("disk_full", "later", false),
        ] {
            assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
        }
        assert!(Reply::decode(b"\xff\x00garbage").is_err());
    }

    /// A CBOR map with the given text keys, built by hand so a test can write what this build
    /// never would (another version, an extra field).
    fn cbor_map(fields: &[(&str, serde_cbor::Value)]) -> Vec<u8> {
        let map = fields
            .iter()
            .map(|(k, v)| (serde_cbor::Value::Text((*k).into()), v.clone()))
            .collect::<std::collections::BTreeMap<_, _>>();
        serde_cbor::to_vec(&serde_cbor::Value::Map(map)).unwrap()
    }

    #[test]
    fn a_newer_version_is_named_as_such_even_when_its_fields_differ() {
        let v2 = cbor_map(&[
            ("v", serde_cbor::Value::Integer(2)),
            ("something_new", serde_cbor::Value::Bool(true)),
        ]);
        let version = |what| FormatError::Version { what, found: 2 };
        assert_eq!(Header::decode(&v2).unwrap_err(), version("header"));
        // The envelope knows a version 2 (same fields), so an unknown field there is malformed,
        // and its next version is the one it names.
        assert_eq!(
            WireEnvelope::decode(&v2).unwrap_err(),
            FormatError::Malformed("envelope")
        );
        let v3 = cbor_map(&[("v", serde_cbor::Value::Integer(3))]);
        let err = WireEnvelope::decode(&v3).unwrap_err();
        assert_eq!(
            err,
            FormatError::Version {
                what: "envelope",
                found: 3
            }
        );
        assert_eq!(
            err.to_string(),
            "envelope version 3 is not supported (this build reads 1 and 2)"
        );
        assert_eq!(
            version("header").to_string(),
            "header version 2 is not supported (this build reads 1)"
        );
        assert_eq!(
            ReceiptBody::decode(&v2).unwrap_err(),
            version("receipt body")
        );
        assert_eq!(SignedReceipt::decode(&v2).unwrap_err(), version("receipt"));
        assert_eq!(Reply::decode(&v2).unwrap_err(), version("reply"));
    }

    #[test]
    fn an_unknown_field_in_a_known_version_is_malformed() {
        let h = header();
        let mut value: serde_cbor::Value = serde_cbor::from_slice(&h.encode()).unwrap();
        if let serde_cbor::Value::Map(m) = &mut value {
            m.insert(
                serde_cbor::Value::Text("name".into()),
                serde_cbor::Value::Text("x".into()),
            );
        }
        let bytes = serde_cbor::to_vec(&value).unwrap();
        assert_eq!(
            Header::decode(&bytes),
            Err(FormatError::Malformed("header"))
        );
    }

    #[test]
    fn a_forged_length_fails_at_the_end_of_the_input_instead_of_allocating() {
        // A byte string claiming 2^62 bytes, inside a map with `v: 1`.
        let mut bytes = vec![0xa2, 0x61, b'v', 0x01, 0x63, b'e', b'n', b'c', 0x5b];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        assert_eq!(
            WireEnvelope::decode(&bytes),
            Err(FormatError::Malformed("envelope"))
        );
    }

    #[test]
    fn an_oversized_reply_is_refused_before_decoding() {
        let huge = vec![0u8; MAX_REPLY_BYTES + 1];
        assert_eq!(
            Reply::decode(&huge),
            Err(FormatError::TooLarge {
                what: "reply",
                size: MAX_REPLY_BYTES + 1,
                max: MAX_REPLY_BYTES
            })
        );
    }

    #[test]
    fn refusal_texts_are_cut_to_their_limits_at_a_character_boundary() {
        let long = "é".repeat(MAX_REFUSAL_MESSAGE);
        let r = Reply::refused(&"c".repeat(100), &long, true);
        let Reply::Refused { code, message, .. } = &r else {
            panic!("not a refusal");
        };
        assert_eq!(code.len(), MAX_REFUSAL_CODE);
        assert_eq!(message.len(), MAX_REFUSAL_MESSAGE);
        assert!(r.encode().len() <= MAX_REPLY_BYTES);
        assert_eq!(Reply::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn a_peer_reply_with_an_over_long_message_is_malformed() {
        let r = Reply::Refused {
            code: "x".into(),
            message: "m".repeat(MAX_REFUSAL_MESSAGE + 1),
            permanent: false,
        };
        assert_eq!(
            Reply::decode(&r.encode()),
            Err(FormatError::Malformed("reply"))
        );
    }

    #[test]
    fn a_receipt_body_round_trips() {
        let body = ReceiptBody {
            v: 1,
            envelope_id: EnvelopeId::generate(),
            envelope_sha256: [7; 32],
            receiver: "london".parse().unwrap(),
            received_at: Utc::now(),
            status: ReceiptStatus::Delivered,
            audit_head: "17:abcd".into(),
        };
        assert_eq!(ReceiptBody::decode(&body.encode()).unwrap(), body);
    }
}
