//! TLS material and policy for the transport: the node's identity (CA roots, CRLs, chain, key),
//! the one builder that makes both the QUIC server and client configurations from it, the
//! area read from a peer certificate, and the re-check of a live peer against a (new) CRL and
//! its certificate's expiry.
//!
//! Invariants: both directions use the same roots, CRLs, certificate, TLS 1.3 only, the same
//! ALPN and the same QUIC transport parameters — they are built by one function, so they
//! cannot drift apart. A peer is re-checked by the serial of its leaf certificate against every
//! revoked serial of the loaded CRLs (the federation has one issuing CA) and by its `notAfter`.
//! Must not: log key bytes; accept a CRL file that does not parse (the old one is kept).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::{Limits, TransportError, ALPN};
use crate::core::types::AreaId;

const AREA_URI_PREFIX: &str = "urn:refex:area:";

/// The node's TLS material: CA roots, optional CRLs, certificate chain and key.
pub struct TlsIdentity {
    roots: Arc<rustls::RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: SystemTime,
    revoked: HashSet<Vec<u8>>,
}

pub(super) fn tls_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what}: {e}"))
}

fn epoch_secs(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0))
}

impl TlsIdentity {
    /// Loads PEM files. The key file must be private to its owner (checked by `crypto`).
    pub fn load(
        ca: &Path,
        cert: &Path,
        key: &Path,
        crl: Option<&Path>,
    ) -> Result<Self, TransportError> {
        let read =
            |p: &Path| std::fs::read_to_string(p).map_err(|e| tls_err(&p.display().to_string(), e));
        let key_text = crate::crypto::read_secret_file(key).map_err(|e| tls_err("key", e))?;
        let key_text = std::str::from_utf8(&key_text).map_err(|e| tls_err("key", e))?;
        let id = Self::from_pem(&read(ca)?, &read(cert)?, key_text)?;
        match crl {
            Some(crl) => id.with_crl_pem(&read(crl)?),
            None => Ok(id),
        }
    }

    /// Builds an identity from PEM text.
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Self, TransportError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(c.map_err(|e| tls_err("CA", e))?)
                .map_err(|e| tls_err("CA", e))?;
        }
        if roots.is_empty() {
            return Err(TransportError::Tls("CA file holds no certificate".into()));
        }
        let chain: Vec<_> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err("certificate", e))?;
        let first = chain
            .first()
            .ok_or_else(|| TransportError::Tls("certificate file is empty".into()))?;
        let (_, parsed) =
            x509_parser::parse_x509_certificate(first).map_err(|e| tls_err("certificate", e))?;
        let not_after = epoch_secs(parsed.validity().not_after.timestamp());
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| tls_err("key", e))?;
        Ok(Self {
            roots: Arc::new(roots),
            crls: Vec::new(),
            chain,
            key,
            not_after,
            revoked: HashSet::new(),
        })
    }

    /// Adds the CRLs in `pem` (one or more): refused by new handshakes and, on
    /// [`super::Transport::reload`], by live connections.
    pub fn with_crl_pem(mut self, pem: &str) -> Result<Self, TransportError> {
        let crls: Vec<_> = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| tls_err("CRL", e))?;
        for crl in &crls {
            let (_, parsed) = x509_parser::parse_x509_crl(crl).map_err(|e| tls_err("CRL", e))?;
            self.revoked.extend(
                parsed
                    .iter_revoked_certificates()
                    .map(|r| r.raw_serial().to_vec()),
            );
        }
        self.crls.extend(crls);
        Ok(self)
    }

    /// When this node's certificate expires (for days-to-expiry alerts).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// What live connections are re-checked against.
    pub(super) fn policy(&self) -> PeerPolicy {
        PeerPolicy {
            revoked: self.revoked.clone(),
        }
    }

    /// The QUIC server and client configurations, from one description: same provider, roots,
    /// CRLs, certificate, protocol version, ALPN and transport parameters.
    pub(super) fn quic_configs(
        &self,
        limits: &Limits,
    ) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let transport = transport_config(limits);
        let alpn = vec![ALPN.to_vec()];
        let tls13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        let (roots, crls) = (self.roots.clone(), self.crls.clone());
        let identity = || (self.chain.clone(), self.key.clone_key());

        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .with_crls(crls.clone())
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
        let (chain, key) = identity();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(tls13)
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| tls_err("server certificate", e))?;
        server.alpn_protocols = alpn.clone();

        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .with_crls(crls)
                .build()
                .map_err(|e| tls_err("server verifier", e))?;
        let (chain, key) = identity();
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(tls13)
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .map_err(|e| tls_err("client certificate", e))?;
        client.alpn_protocols = alpn;

        let quic = QuicServerConfig::try_from(server).map_err(|e| tls_err("QUIC server", e))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(transport.clone());
        // Address validation tokens are short-lived: they only prove a return path.
        server.retry_token_lifetime(Duration::from_secs(15));
        let quic = QuicClientConfig::try_from(client).map_err(|e| tls_err("QUIC client", e))?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        client.transport_config(transport);
        Ok((server, client))
    }

    /// A plain QUIC client configuration with this identity, as `Transport` itself dials with
    /// (tests drive hostile peers with it).
    pub fn client_config(&self, limits: &Limits) -> Result<quinn::ClientConfig, TransportError> {
        self.quic_configs(limits).map(|(_, c)| c)
    }

    /// The connection-id hash key: stable across restarts, secret (derived from the TLS key).
    pub(super) fn cid_key(&self) -> u64 {
        let seed =
            crate::core::digest::sha256_parts(&[b"refex/1 connection ids", self.key.secret_der()]);
        u64::from_be_bytes(seed[..8].try_into().unwrap_or([0; 8]))
    }

    /// A stateless-reset key that survives restarts but is secret (derived from the TLS key).
    pub(super) fn reset_key(&self) -> ring::hmac::Key {
        let seed =
            crate::core::digest::sha256_parts(&[b"refex/1 stateless reset", self.key.secret_der()]);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed)
    }
}

fn transport_config(limits: &Limits) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(limits.max_streams_per_connection.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Bytes a peer may send before they are read: one frame per stream, the in-flight cap per
    // connection (see `budget`).
    t.stream_receive_window(limits.max_frame_bytes.saturating_add(4).into());
    t.receive_window(super::budget::inflight_cap(limits).into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok());
    // Frequent enough that a peer which crashed and restarted answers with a stateless reset
    // within seconds (a waiting request sends nothing of its own).
    t.keep_alive_interval(Some((limits.idle_timeout / 3).min(Duration::from_secs(2))));
    Arc::new(t)
}

/// The revoked serials live connections are re-checked against.
#[derive(Default)]
pub(super) struct PeerPolicy {
    revoked: HashSet<Vec<u8>>,
}

impl PeerPolicy {
    /// Why a live connection's peer must be dropped now, if it must.
    pub(super) fn refuses(&self, conn: &quinn::Connection, now: SystemTime) -> Option<String> {
        let chain = match peer_chain(conn.peer_identity()) {
            Ok(c) => c,
            Err(why) => return Some(why),
        };
        let leaf = chain.first()?;
        let (_, cert) = match x509_parser::parse_x509_certificate(leaf) {
            Ok(c) => c,
            Err(e) => return Some(e.to_string()),
        };
        if self.revoked.contains(cert.raw_serial()) {
            return Some("certificate revoked".into());
        }
        if epoch_secs(cert.validity().not_after.timestamp()) <= now {
            return Some("certificate expired".into());
        }
        None
    }
}

fn peer_chain(
    identity: Option<Box<dyn std::any::Any>>,
) -> Result<Vec<CertificateDer<'static>>, String> {
    identity
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .ok_or_else(|| "no certificate".into())
}

/// The area named by a certificate chain's leaf, from its single area URI SAN.
pub(super) fn area_of(identity: Option<Box<dyn std::any::Any>>) -> Result<AreaId, String> {
    let chain = peer_chain(identity)?;
    let leaf = chain.first().ok_or("empty certificate chain")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("certificate has no subject alternative names")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(AREA_URI_PREFIX),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => AreaId::parse(one).map_err(|e| e.to_string()),
        [] => Err("certificate names no area (urn:refex:area:…)".into()),
        _ => Err("certificate names more than one area".into()),
    }
}
