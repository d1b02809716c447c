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
//! - `ReceiptBody` {v, envelope_id, envelope_sha256 (SHA-256 of the exact wire envelope bytes),
//!   receiver, received_at, status, audit_head}; `SignedReceipt` {v, body (bstr), sig (bstr)}.
//! - `Reply` (receiver → sender, one per stream): `{"receipt": bstr}` or
//!   `{"refused": {code, message, permanent}}`.
//!
//! Invariant: decoding never trusts a length from the input beyond the input's own size (the
//! transport has already bounded the frame).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::types::{AreaId, EnvelopeId, PriorityClass};

/// The format version this build writes and accepts.
pub const VERSION: u8 = 1;

/// Content type of a `refex.referral.v1` payload encoded as CBOR.
pub const CONTENT_TYPE_REFERRAL_V1: &str = "application/vnd.refex.referral.v1+cbor";

/// Why bytes are not a valid structure of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not CBOR of the expected shape.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A version this build does not know.
    #[error("{what} version {found} is not supported (expected {VERSION})")]
    Version { what: &'static str, found: u8 },
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

    use crate::types::EnvelopeId;

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
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let h: Self = serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed("header"))?;
        check_version("header", h.v)?;
        Ok(h)
    }
}

fn check_version(what: &'static str, found: u8) -> Result<(), FormatError> {
    if found == VERSION {
        Ok(())
    } else {
        Err(FormatError::Version { what, found })
    }
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
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let w: Self = serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed("envelope"))?;
        check_version("envelope", w.v)?;
        Ok(w)
    }
}

/// What a receipt attests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptStatus {
    /// Durably written into the receiving area's inbox.
    Delivered,
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
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let r: Self =
            serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed("receipt body"))?;
        check_version("receipt", r.v)?;
        Ok(r)
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
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        let r: Self = serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed("receipt"))?;
        check_version("receipt", r.v)?;
        Ok(r)
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

impl Reply {
    pub fn refused(code: &str, message: &str, permanent: bool) -> Self {
        Self::Refused {
            code: code.to_owned(),
            message: message.to_owned(),
            permanent,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Result<Self, FormatError> {
        serde_cbor::from_slice(b).map_err(|_| FormatError::Malformed("reply"))
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
}
