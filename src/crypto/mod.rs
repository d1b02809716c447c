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
//! Envelope format v2 (`shared`): the same suite and fields, but one HPKE context per recipient
//! key shared by many envelopes, each sealed under a key exported from it for its id alone;
//! `info` = `refex/2 envelope context`, the signature tag `refex/2 envelope-signature`. Which
//! version an area gets is its peer-directory entry's `envelope_version`; both are opened.
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

pub mod certs;
pub mod checkpoint;
pub mod directory;
mod keys;
pub mod pki;
mod seal;
mod shared;

pub use keys::*;
pub use seal::*;
pub use shared::{SealContexts, OPEN_CACHE};

#[cfg(test)]
mod tests;
