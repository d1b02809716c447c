//! Version-2 envelopes: one HPKE context shared by many envelopes to the same area.
//!
//! Version 1 pays an X25519 key generation and Diffie-Hellman to seal and another
//! Diffie-Hellman to open, for every envelope: about half of a delivery's public-key work.
//! Version 2 sets up one HPKE context per recipient key (RFC 9180 base mode, the same KEM and
//! KDF as version 1, the export-only AEAD; `info` = [`SHARED_INFO`]) and keeps it for at most
//! [`ROTATE_AFTER`] or [`ROTATE_EVERY`] envelopes. Each envelope is sealed under a key and nonce
//! exported from that context for it alone (RFC 9180 §5.3): `Export(EXPORT_LABEL ‖ envelope id,
//! 44)` = a ChaCha20-Poly1305 key (32 bytes) ‖ nonce (12), with the exact header bytes as AAD.
//! `enc` is the context's encapsulated key, so the receiver sets the context up once per `enc`
//! (kept in a bounded cache, [`OpenContexts`]) and opens each envelope of it with one export and
//! one AEAD. The signature covers the same parts as version 1 under its own tag, so neither
//! version's signature passes for the other's.
//!
//! Why it holds: the exporter is a PRF keyed by the context's exporter secret and an envelope id
//! is unique (128 bits, time-ordered, 74 of them random), so no key and nonce are ever used
//! twice; the header, which holds the id, is the AAD, so a ciphertext cannot be moved under
//! another header of the same context. The trade: a context stays in the sender's memory for up
//! to [`ROTATE_AFTER`], so whoever reads that memory in the window can open that window's
//! envelopes to that area — whose plaintexts passed through the same memory anyway.
//!
//! Invariants: no secret leaves this module except as a sealed or opened payload; both caches
//! are bounded (one sender context per recipient key, [`OPEN_CACHE`] receiver contexts).
//! Must not: log, or decide which version an area gets (the peer directory does).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hpke::aead::{AeadCtxR, AeadCtxS, ExportOnlyAead};
use hpke::kdf::HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

use super::keys::{Kem, KemPublicKey, KemSecretKey};
use super::seal::SealError;
use crate::core::types::EnvelopeId;

/// HPKE `info` of a version-2 context.
pub(super) const SHARED_INFO: &[u8] = b"refex/2 envelope context";
/// Exporter context prefix; the envelope id (16 bytes) follows.
const EXPORT_LABEL: &[u8] = b"refex/2 envelope key\0";
/// A sender context is replaced after this long…
pub const ROTATE_AFTER: Duration = Duration::from_secs(60);
/// …or after sealing this many envelopes, whichever comes first.
pub const ROTATE_EVERY: u32 = 10_000;
/// Receiver contexts kept (least recently used dropped first): one per busy sender and key.
pub const OPEN_CACHE: usize = 128;

type CtxS = AeadCtxS<ExportOnlyAead, HkdfSha256, Kem>;
type CtxR = AeadCtxR<ExportOnlyAead, HkdfSha256, Kem>;
type Opened = (Arc<CtxR>, u64);

struct SenderContext {
    ctx: Arc<CtxS>,
    enc: Vec<u8>,
    born: Instant,
    sealed: u32,
}

/// The sender's contexts, one per recipient encryption key.
pub struct SealContexts {
    by_recipient: Mutex<HashMap<[u8; 32], SenderContext>>,
    setups: std::sync::atomic::AtomicU64,
    every: u32,
    after: Duration,
}

impl Default for SealContexts {
    fn default() -> Self {
        Self::with_rotation(ROTATE_EVERY, ROTATE_AFTER)
    }
}

impl SealContexts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Contexts replaced after `every` envelopes or `after`, whichever comes first (tests use
    /// small values; the node uses [`ROTATE_EVERY`] and [`ROTATE_AFTER`]).
    pub fn with_rotation(every: u32, after: Duration) -> Self {
        Self {
            by_recipient: Mutex::default(),
            setups: Default::default(),
            every: every.max(1),
            after,
        }
    }

    /// Contexts set up so far (each one X25519 key generation and Diffie-Hellman).
    pub fn setups(&self) -> u64 {
        self.setups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The current context to `recipient` and its `enc`, set up when there is none or it is due
    /// for rotation. The setup (~60 µs, once per context) runs under the lock, so concurrent
    /// sealers never set up two contexts where one is due.
    fn current(&self, recipient: &KemPublicKey) -> Result<(Arc<CtxS>, Vec<u8>), SealError> {
        let mut map = lock(&self.by_recipient);
        if let Some(c) = map.get_mut(&recipient.0) {
            if c.sealed < self.every && c.born.elapsed() < self.after {
                c.sealed += 1;
                return Ok((c.ctx.clone(), c.enc.clone()));
            }
        }
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&recipient.0)
            .map_err(|e| SealError::Hpke(e.to_string()))?;
        // The OS random source failing is not recoverable and not input-driven (random_bytes).
        let mut rng = rand_core::UnwrapErr(rand_core::OsRng);
        let (enc, ctx) = hpke::setup_sender::<ExportOnlyAead, HkdfSha256, Kem, _>(
            &OpModeS::Base,
            &pk,
            SHARED_INFO,
            &mut rng,
        )
        .map_err(|e| SealError::Hpke(e.to_string()))?;
        self.setups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ctx = Arc::new(ctx);
        let enc = enc.to_bytes().to_vec();
        // Keys rotated out of the directory leave their contexts behind; drop the stale ones.
        map.retain(|_, c| c.born.elapsed() < self.after);
        map.insert(
            recipient.0,
            SenderContext {
                ctx: ctx.clone(),
                enc: enc.clone(),
                born: Instant::now(),
                sealed: 1,
            },
        );
        Ok((ctx, enc))
    }

    /// Seals `plaintext` for envelope `id` under the current context to `recipient`, with
    /// `aad` (the header bytes); returns (`enc`, ciphertext ‖ tag).
    pub(super) fn seal(
        &self,
        recipient: &KemPublicKey,
        id: &EnvelopeId,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>), SealError> {
        let (ctx, enc) = self.current(recipient)?;
        let key = envelope_key(id, |label, out| ctx.export(label, out).is_ok())
            .ok_or_else(|| SealError::Hpke("export failed".into()))?;
        let mut out = plaintext.to_vec();
        key.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(key.1),
                Aad::from(aad),
                &mut out,
            )
            .map_err(|_| SealError::Hpke("AEAD seal failed".into()))?;
        Ok((enc, out))
    }
}

/// The receiver's contexts by `enc`, least recently used dropped first.
#[derive(Default)]
pub struct OpenContexts {
    /// By `enc`: the context and when it was last used (a tick of `tick`).
    by_enc: Mutex<HashMap<[u8; 32], Opened>>,
    tick: std::sync::atomic::AtomicU64,
    setups: std::sync::atomic::AtomicU64,
}

impl OpenContexts {
    /// Contexts set up so far (each one X25519 Diffie-Hellman).
    pub fn setups(&self) -> u64 {
        self.setups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Contexts held now (at most [`OPEN_CACHE`]).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.by_enc).len()
    }

    /// The context of `enc`, set up (one DH, under the lock: concurrent openers of the same
    /// context set it up once) when it is not held.
    fn get(&self, key: &KemSecretKey, enc: &[u8]) -> Option<Arc<CtxR>> {
        let enc: [u8; 32] = enc.try_into().ok()?;
        let now = self.tick.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut map = lock(&self.by_enc);
        if let Some((ctx, used)) = map.get_mut(&enc) {
            *used = now;
            return Some(ctx.clone());
        }
        let encapped = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc).ok()?;
        let ctx = hpke::setup_receiver::<ExportOnlyAead, HkdfSha256, Kem>(
            &OpModeR::Base,
            &key.sk,
            &encapped,
            SHARED_INFO,
        )
        .ok()?;
        self.setups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ctx = Arc::new(ctx);
        if map.len() >= OPEN_CACHE {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        map.insert(enc, (ctx.clone(), now));
        Some(ctx)
    }
}

/// Opens a version-2 ciphertext; `None` for any failure (a malformed `enc`, another
/// recipient's context, another envelope's id, a tampered header or ciphertext).
pub(super) fn open(
    key: &KemSecretKey,
    enc: &[u8],
    id: &EnvelopeId,
    aad: &[u8],
    ct: &[u8],
) -> Option<Vec<u8>> {
    let ctx = key.opened.get(key, enc)?;
    let (aead, nonce) = envelope_key(id, |label, out| ctx.export(label, out).is_ok())?;
    let mut buf = ct.to_vec();
    let len = aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        .ok()?
        .len();
    buf.truncate(len);
    Some(buf)
}

/// The AEAD key and nonce of envelope `id`, exported through `export(context, out)`.
fn envelope_key(
    id: &EnvelopeId,
    export: impl FnOnce(&[u8], &mut [u8]) -> bool,
) -> Option<(LessSafeKey, [u8; 12])> {
    let mut label = Vec::with_capacity(EXPORT_LABEL.len() + 16);
    label.extend_from_slice(EXPORT_LABEL);
    label.extend_from_slice(id.as_bytes());
    let mut okm = zeroize::Zeroizing::new([0u8; 44]);
    if !export(&label, &mut okm[..]) {
        return None;
    }
    let key = UnboundKey::new(&CHACHA20_POLY1305, &okm[..32]).ok()?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&okm[32..]);
    Some((LessSafeKey::new(key), nonce))
}

/// A poisoned cache lock only means another thread panicked mid-update of a map that is valid
/// after every statement; keep using it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
