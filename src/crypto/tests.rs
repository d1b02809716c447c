//! Unit tests of keys, sealing, opening and receipts.

use std::fs;

use chrono::{DateTime, Utc};
use hpke::{Kem as _, Serializable};

use super::keys::*;
use super::seal::*;
use crate::core::envelope::{FormatError, ReceiptBody, SignedReceipt, WireEnvelope, VERSION};
use crate::core::types::{AreaId, EnvelopeId};

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
    use super::*;
    use crate::core::envelope::{Header, ReceiptStatus, CONTENT_TYPE_REFERRAL_V1};
    use crate::core::types::PriorityClass;
    #[allow(unused_imports)]
    use crate::crypto::keys::*;

    /// West Midlands' signing key and London's encryption key (shared with the format-2 tests).
    pub(super) struct World {
        pub(super) sender: SigningKey,
        pub(super) kem: KemSecretKey,
        pub(super) wm: AreaId,
        pub(super) london: AreaId,
    }

    pub(super) fn world() -> World {
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
            None,
        )
        .unwrap()
        .to_bytes()
    }

    /// A format-1 envelope of one byte created at `created`.
    fn sealed_at(w: &World, created: DateTime<Utc>) -> Vec<u8> {
        seal(
            header(w, created, 1),
            b"x",
            &w.sender,
            &w.kem.public_key(),
            None,
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
            None,
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
            let bytes = sealed_at(&w, created);
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
        pub const IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
        pub const IKM_R: &str = "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
        pub const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
        pub const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
        pub const ENC: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
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
        let doc = hex::decode(text.trim().trim_start_matches("refex-ed25519-pkcs8-v1:")).unwrap();
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
        let sig = w
            .sender
            .sign(&signed_message(VERSION, &header_bytes, &enc, &ct));
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
        let r = seal(header(&w, Utc::now(), 4), b"hello", &w.sender, &pk, None);
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
            seal(h, b"hello", &w.sender, &pk, None),
            Err(SealError::Version(2))
        ));
    }

    #[test]
    fn a_stored_envelope_reloads_as_it_was_sealed() {
        let w = world();
        let h = header(&w, Utc::now(), 5);
        let sealed = seal(h.clone(), b"hello", &w.sender, &w.kem.public_key(), None).unwrap();
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
        assert_eq!(opened.digest, crate::core::digest::sha256(&bytes));
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
            let bytes = sealed_at(&w, created);
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

#[test]
fn the_idempotency_index_key_needs_the_secret_and_is_not_the_subject_key() {
    let (a, _) = SubjectSecret::generate().unwrap();
    let (b, _) = SubjectSecret::generate().unwrap();
    let k = a.index_key("test-records", "REF-1");
    assert_eq!(k, a.index_key("test-records", "REF-1"), "deterministic");
    assert_ne!(
        k,
        b.index_key("test-records", "REF-1"),
        "keyed by the node's secret"
    );
    assert_ne!(k, a.index_key("test-records", "REF-2"));
    assert_ne!(
        k,
        crate::core::digest::sha256("test-records\u{1f}REF-1".as_bytes()),
        "not the plain hash a dictionary of references could match"
    );
    assert_ne!(
        hex::encode(k),
        a.key("test-records", "REF-1").0,
        "domain-separated"
    );
}

/// Version-2 envelopes: one HPKE context shared by many envelopes to the same key.
mod shared_key_envelopes {
    use std::time::Duration;

    use super::*;
    use crate::core::envelope::{Header, CONTENT_TYPE_REFERRAL_V1, SHARED_KEY_VERSION};
    use crate::core::types::PriorityClass;
    use crate::crypto::directory::Directory;
    use crate::crypto::{SealContexts, OPEN_CACHE};

    use super::envelopes::{world, World};

    fn seal_v2(w: &World, contexts: &SealContexts, payload: &[u8]) -> Vec<u8> {
        let header = Header {
            v: 1,
            id: EnvelopeId::generate(),
            from: w.wm.clone(),
            to: w.london.clone(),
            created: Utc::now(),
            priority: PriorityClass::Standard,
            due_by: Utc::now(),
            content_type: CONTENT_TYPE_REFERRAL_V1.into(),
            payload_len: payload.len() as u64,
        };
        seal(
            header,
            payload,
            &w.sender,
            &w.kem.public_key(),
            Some(contexts),
        )
        .unwrap()
        .to_bytes()
    }

    fn open(w: &World, key: &KemSecretKey, bytes: &[u8]) -> Result<Vec<u8>, OpenError> {
        let keys = vec![w.sender.public_key()];
        let policy = OpenPolicy {
            max_bytes: 64 * 1024,
            max_age: chrono::Duration::days(1),
            max_skew: chrono::Duration::minutes(5),
        };
        let verified = verify(
            bytes,
            &w.london,
            &w.wm,
            |_| Some(keys.clone()),
            Utc::now(),
            &policy,
        )?;
        Ok(verified.decrypt(key)?.payload)
    }

    #[test]
    fn envelopes_share_one_context_and_each_opens_alone_in_any_order() {
        let w = world();
        let contexts = SealContexts::new();
        let sealed: Vec<Vec<u8>> = (0..3u8)
            .map(|i| seal_v2(&w, &contexts, &[b'a' + i; 40]))
            .collect();
        let wires: Vec<WireEnvelope> = sealed
            .iter()
            .map(|b| WireEnvelope::decode(b).unwrap())
            .collect();
        assert!(wires.iter().all(|x| x.v == SHARED_KEY_VERSION));
        assert!(
            wires.iter().all(|x| x.enc == wires[0].enc),
            "one encapsulated key for all three"
        );
        assert_ne!(wires[0].ct, wires[1].ct);
        assert_eq!(
            contexts.setups(),
            1,
            "one key generation and DH to seal three"
        );
        for i in [2, 0, 1] {
            assert_eq!(
                open(&w, &w.kem, &sealed[i]).unwrap(),
                vec![b'a' + i as u8; 40]
            );
        }
        assert_eq!(w.kem.shared_setups(), 1, "one DH to open three");
    }

    #[test]
    fn a_ciphertext_moved_under_another_header_of_its_context_does_not_open() {
        let w = world();
        let contexts = SealContexts::new();
        let a = WireEnvelope::decode(&seal_v2(&w, &contexts, b"first")).unwrap();
        let b = WireEnvelope::decode(&seal_v2(&w, &contexts, b"other")).unwrap();
        // Validly signed by the sender, so only the decryption can catch it.
        let sig = w.sender.sign(&signed_message(
            SHARED_KEY_VERSION,
            &a.header,
            &b.enc,
            &b.ct,
        ));
        let moved = WireEnvelope {
            v: SHARED_KEY_VERSION,
            header: a.header.clone(),
            enc: b.enc.clone(),
            ct: b.ct.clone(),
            sig: sig.to_vec().into(),
        }
        .encode();
        assert_eq!(open(&w, &w.kem, &moved).unwrap_err(), OpenError::Decrypt);
        assert!(!intact_but_unknown_signer(&moved, &w.kem));
        assert!(intact_but_unknown_signer(&a.encode(), &w.kem));
    }

    #[test]
    fn neither_version_s_signature_passes_for_the_other() {
        let w = world();
        let v2 = seal_v2(&w, &SealContexts::new(), b"hello");
        let as_v1 = tamper_version(&v2, VERSION);
        assert_eq!(
            open(&w, &w.kem, &as_v1).unwrap_err(),
            OpenError::BadSignature
        );
        let header = Header::decode(&WireEnvelope::decode(&v2).unwrap().header).unwrap();
        let v1 = seal(header, b"hello", &w.sender, &w.kem.public_key(), None)
            .unwrap()
            .to_bytes();
        assert_eq!(open(&w, &w.kem, &v1).unwrap(), b"hello");
        let as_v2 = tamper_version(&v1, SHARED_KEY_VERSION);
        assert_eq!(
            open(&w, &w.kem, &as_v2).unwrap_err(),
            OpenError::BadSignature
        );
    }

    fn tamper_version(bytes: &[u8], v: u8) -> Vec<u8> {
        let mut wire = WireEnvelope::decode(bytes).unwrap();
        wire.v = v;
        wire.encode()
    }

    #[test]
    fn another_recipient_cannot_open_and_a_context_rotates_after_its_budget() {
        let w = world();
        let contexts = SealContexts::with_rotation(2, Duration::from_secs(60));
        let sealed: Vec<Vec<u8>> = (0..5).map(|_| seal_v2(&w, &contexts, b"x")).collect();
        let encs: std::collections::BTreeSet<Vec<u8>> = sealed
            .iter()
            .map(|b| WireEnvelope::decode(b).unwrap().enc.into_vec())
            .collect();
        assert_eq!(encs.len(), 3, "two envelopes per context: 5 need 3");
        assert_eq!(contexts.setups(), 3);
        let stranger = KemSecretKey::generate().unwrap().0;
        assert_eq!(
            open(&w, &stranger, &sealed[0]).unwrap_err(),
            OpenError::Decrypt
        );
        let expired = SealContexts::with_rotation(100, Duration::ZERO);
        seal_v2(&w, &expired, b"x");
        seal_v2(&w, &expired, b"x");
        assert_eq!(expired.setups(), 2, "a context past its age is replaced");
    }

    #[test]
    fn the_receiver_keeps_a_bounded_number_of_contexts_and_reopens_an_evicted_one() {
        let w = world();
        let first = seal_v2(&w, &SealContexts::new(), b"first");
        open(&w, &w.kem, &first).unwrap();
        for _ in 0..OPEN_CACHE {
            open(&w, &w.kem, &seal_v2(&w, &SealContexts::new(), b"x")).unwrap();
        }
        assert_eq!(w.kem.opened.len(), OPEN_CACHE);
        let before = w.kem.shared_setups();
        assert_eq!(open(&w, &w.kem, &first).unwrap(), b"first");
        assert_eq!(
            w.kem.shared_setups(),
            before + 1,
            "evicted, so set up again"
        );
        assert_eq!(w.kem.opened.len(), OPEN_CACHE);
    }

    fn directory(extra: &str) -> Result<Directory, Vec<String>> {
        let (s, _) = SigningKey::generate().unwrap();
        let (k, _) = KemSecretKey::generate().unwrap();
        Directory::from_toml(&format!(
            "version = 1\n[[area]]\nid = \"london\"\nname = \"London\"\naddress = \"127.0.0.1:1\"\n\
             server_name = \"london.refex.internal\"\nsigning_keys = [\"{}\"]\n\
             encryption_key = \"{}\"\n{extra}",
            s.public_key().to_hex(),
            k.public_key().to_hex()
        ))
    }

    #[test]
    fn the_directory_says_which_areas_open_version_2_and_renders_it_back() {
        let london: AreaId = "london".parse().unwrap();
        let v1 = directory("").unwrap();
        assert!(!v1.get(&london).unwrap().opens_shared_key_envelopes());
        let v2 = directory("envelope_version = 2\n").unwrap();
        let entry = v2.get(&london).unwrap().clone();
        assert!(entry.opens_shared_key_envelopes());
        let again = Directory::from_toml(&Directory::render(&[entry])).unwrap();
        assert!(again.get(&london).unwrap().opens_shared_key_envelopes());
        let errors = directory("envelope_version = 3\n").unwrap_err();
        assert_eq!(
            errors,
            vec!["area 'london'.envelope_version: 3 is not 1 or 2".to_owned()]
        );
    }
}
