//! QUIC transport with mutual TLS 1.3 (quinn 0.11, rustls 0.23 with ring): the only module
//! that touches quinn, rustls or x509-parser.
//!
//! Wire protocol `refex/1` (ALPN): one bidirectional stream per envelope; the client writes one
//! frame (u32 big-endian length, then that many bytes) and finishes; the server answers with one
//! frame and finishes. Frame sizes are checked against `max_frame_bytes` before any allocation.
//! Identity: both sides present certificates chaining to the federation CA (and not on its CRL);
//! the area is read from the certificate's single `urn:refex:area:<id>` URI SAN. The server passes
//! the authenticated area to the handler with every request; the client refuses a server whose
//! area is not the one it dialled.
//! Bounds: connections in total and per peer area, concurrent streams per connection (QUIC flow
//! control), handshake, idle and request timeouts.
//! Restarts: the endpoint's stateless-reset key and connection-id key are derived from the
//! node's TLS key, so a restarted node recognises its previous connection ids and resets its
//! peers' stale connections at once instead of leaving them to time out.
//! Must not: interpret frame contents (the receiver and sender do), or log payload bytes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::core::types::AreaId;

/// The ALPN protocol id.
pub const ALPN: &[u8] = b"refex/1";
const AREA_URI_PREFIX: &str = "urn:refex:area:";

/// Application error codes on streams and connections.
const CODE_TOO_LARGE: u32 = 1;
const CODE_NO_IDENTITY: u32 = 2;
const CODE_LIMIT: u32 = 3;
const CODE_SHUTDOWN: u32 = 4;

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Certificate, key or CRL files unusable.
    #[error("TLS material: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// Could not connect (peer down, unreachable, handshake failed or timed out).
    #[error("cannot connect to {peer}: {reason}")]
    Connect { peer: AreaId, reason: String },
    /// The peer's certificate does not name the expected area.
    #[error("peer at the address of {expected} presented the identity {found}")]
    Identity { expected: AreaId, found: String },
    /// The connection or stream failed mid-request.
    #[error("connection to {peer} failed: {reason}")]
    Lost { peer: AreaId, reason: String },
    /// No answer within the request timeout.
    #[error("request to {0} timed out")]
    Timeout(AreaId),
    /// The peer sent a frame over the limit, or broke the framing.
    #[error("protocol violation by {peer}: {reason}")]
    Protocol { peer: AreaId, reason: String },
}

impl TransportError {
    /// True for failures that a later retry may not meet (peer down, lost connection, timeout).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Lost { .. } | Self::Timeout(_)
        )
    }
}

/// Bounds on what a peer can drive.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_frame_bytes: u32,
    pub max_streams_per_connection: u32,
    pub max_connections_per_peer: u32,
    pub max_connections: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_streams_per_connection: 64,
            max_connections_per_peer: 4,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Where a peer listens and what it must prove to be.
#[derive(Clone, Debug)]
pub struct PeerAddr {
    pub area: AreaId,
    pub addr: SocketAddr,
    pub server_name: String,
}

/// The node's TLS material: CA roots, optional CRLs, certificate chain and key.
pub struct TlsIdentity {
    roots: Arc<rustls::RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_after: SystemTime,
}

fn tls_err(what: &str, e: impl std::fmt::Display) -> TransportError {
    TransportError::Tls(format!("{what}: {e}"))
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
        let key_text = String::from_utf8(key_text).map_err(|e| tls_err("key", e))?;
        let mut id = Self::from_pem(&read(ca)?, &read(cert)?, &key_text)?;
        if let Some(crl) = crl {
            id.crls = CertificateRevocationListDer::pem_slice_iter(read(crl)?.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| tls_err("CRL", e))?;
        }
        Ok(id)
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
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0),
            );
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| tls_err("key", e))?;
        Ok(Self {
            roots: Arc::new(roots),
            crls: Vec::new(),
            chain,
            key,
            not_after,
        })
    }

    /// When this node's certificate expires (for days-to-expiry alerts).
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn server_config(&self, limits: &Limits) -> Result<quinn::ServerConfig, TransportError> {
        let provider = Self::provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .with_crls(self.crls.clone())
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("server certificate", e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(tls).map_err(|e| tls_err("QUIC server", e))?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(transport_config(limits));
        Ok(config)
    }

    fn client_config(&self, limits: &Limits) -> Result<quinn::ClientConfig, TransportError> {
        let provider = Self::provider();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.roots.clone(),
            provider.clone(),
        )
        .with_crls(self.crls.clone())
        .build()
        .map_err(|e| tls_err("server verifier", e))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_err("TLS 1.3", e))?
            .with_webpki_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| tls_err("client certificate", e))?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicClientConfig::try_from(tls).map_err(|e| tls_err("QUIC client", e))?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(transport_config(limits));
        Ok(config)
    }

    /// The connection-id hash key: stable across restarts, secret (derived from the TLS key).
    fn cid_key(&self) -> u64 {
        let seed =
            crate::core::digest::sha256_parts(&[b"refex/1 connection ids", self.key.secret_der()]);
        u64::from_be_bytes(seed[..8].try_into().unwrap_or([0; 8]))
    }

    /// A stateless-reset key that survives restarts but is secret (derived from the TLS key).
    fn reset_key(&self) -> ring::hmac::Key {
        let seed =
            crate::core::digest::sha256_parts(&[b"refex/1 stateless reset", self.key.secret_der()]);
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed)
    }
}

fn transport_config(limits: &Limits) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(limits.max_streams_per_connection.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(quinn::IdleTimeout::try_from(limits.idle_timeout).ok());
    // Frequent enough that a peer which crashed and restarted answers with a stateless reset
    // within seconds (a waiting request sends nothing of its own).
    t.keep_alive_interval(Some((limits.idle_timeout / 3).min(Duration::from_secs(2))));
    Arc::new(t)
}

/// The area named by a certificate chain's leaf, from its single area URI SAN.
fn area_of(identity: Option<Box<dyn std::any::Any>>) -> Result<AreaId, String> {
    let chain = identity
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("no certificate")?;
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

struct Shared {
    endpoint: quinn::Endpoint,
    limits: Limits,
    connections: tokio::sync::Mutex<HashMap<AreaId, quinn::Connection>>,
    inbound: Mutex<HashMap<AreaId, u32>>,
}

/// A QUIC endpoint acting as both server and client. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

/// Counts an inbound connection for its peer; released on drop.
struct Slot {
    shared: Arc<Shared>,
    peer: AreaId,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.shared.inbound.lock() {
            if let Some(n) = m.get_mut(&self.peer) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

async fn read_frame(
    recv: &mut quinn::RecvStream,
    max: u32,
    peer: &AreaId,
) -> Result<Vec<u8>, TransportError> {
    let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(|e| lost(&e))?;
    let len = u32::from_be_bytes(len);
    if len > max {
        return Err(TransportError::Protocol {
            peer: peer.clone(),
            reason: format!("frame of {len} bytes exceeds {max}"),
        });
    }
    let mut buf = vec![0u8; len as usize];
    recv.read_exact(&mut buf).await.map_err(|e| lost(&e))?;
    Ok(buf)
}

async fn write_frame(
    send: &mut quinn::SendStream,
    data: &[u8],
    peer: &AreaId,
) -> Result<(), TransportError> {
    let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let len = u32::try_from(data.len()).map_err(|_| TransportError::Protocol {
        peer: peer.clone(),
        reason: "frame too large".into(),
    })?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(|e| lost(&e))?;
    send.write_all(data).await.map_err(|e| lost(&e))?;
    send.finish().map_err(|e| lost(&e))
}

impl Transport {
    /// Binds the endpoint. Must be called inside a tokio runtime.
    pub fn bind(
        listen: SocketAddr,
        tls: &TlsIdentity,
        limits: Limits,
    ) -> Result<Self, TransportError> {
        let socket = std::net::UdpSocket::bind(listen).map_err(|source| TransportError::Bind {
            addr: listen,
            source,
        })?;
        let mut config = quinn::EndpointConfig::new(Arc::new(tls.reset_key()));
        // Connection ids are validated with a keyed hash; the key, like the reset key, survives
        // restarts, so a restarted node recognises its old ids and answers with a reset instead
        // of silently dropping the packets (which would leave peers waiting for a timeout).
        let cid_key = tls.cid_key();
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Tls("no async runtime".into()))?;
        let mut endpoint =
            quinn::Endpoint::new(config, Some(tls.server_config(&limits)?), socket, runtime)
                .map_err(|source| TransportError::Bind {
                    addr: listen,
                    source,
                })?;
        endpoint.set_default_client_config(tls.client_config(&limits)?);
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint,
                limits,
                connections: tokio::sync::Mutex::new(HashMap::new()),
                inbound: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.shared
            .endpoint
            .local_addr()
            .map_err(|e| tls_err("local address", e))
    }

    /// Replaces the TLS material for new connections (SIGHUP) without dropping the endpoint.
    pub fn reload(&self, tls: &TlsIdentity) -> Result<(), TransportError> {
        let limits = &self.shared.limits;
        self.shared
            .endpoint
            .set_server_config(Some(tls.server_config(limits)?));
        let mut endpoint = self.shared.endpoint.clone();
        endpoint.set_default_client_config(tls.client_config(limits)?);
        Ok(())
    }

    /// Accepts connections until `shutdown`, calling `handler(peer_area, request)` for each
    /// stream and sending back what it returns.
    pub async fn serve<H, F>(&self, handler: H, shutdown: CancellationToken)
    where
        H: Fn(AreaId, Vec<u8>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Vec<u8>> + Send,
    {
        let total = Arc::new(tokio::sync::Semaphore::new(
            self.shared.limits.max_connections as usize,
        ));
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                i = self.shared.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let Ok(permit) = total.clone().try_acquire_owned() else {
                warn!(remote = %incoming.remote_address(), "connection refused: max_connections reached");
                incoming.refuse();
                continue;
            };
            let (this, handler, shutdown) = (self.clone(), handler.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _permit = permit;
                this.serve_connection(incoming, handler, shutdown).await;
            });
        }
    }

    async fn serve_connection<H, F>(
        &self,
        incoming: quinn::Incoming,
        handler: H,
        shutdown: CancellationToken,
    ) where
        H: Fn(AreaId, Vec<u8>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Vec<u8>> + Send,
    {
        let remote = incoming.remote_address();
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, "incoming connection failed: {e}");
                return;
            }
        };
        let conn =
            match tokio::time::timeout(self.shared.limits.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    warn!(%remote, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    warn!(%remote, "TLS handshake timed out");
                    return;
                }
            };
        let peer = match area_of(conn.peer_identity()) {
            Ok(a) => a,
            Err(why) => {
                warn!(%remote, "connection refused: {why}");
                conn.close(CODE_NO_IDENTITY.into(), b"no area identity");
                return;
            }
        };
        let _slot = {
            let Ok(mut m) = self.shared.inbound.lock() else {
                return;
            };
            let n = m.entry(peer.clone()).or_insert(0);
            if *n >= self.shared.limits.max_connections_per_peer {
                warn!(peer = %peer, "connection refused: max_connections_per_peer reached");
                conn.close(CODE_LIMIT.into(), b"too many connections");
                return;
            }
            *n += 1;
            Slot {
                shared: self.shared.clone(),
                peer: peer.clone(),
            }
        };
        let span = tracing::info_span!("connection", peer = %peer);
        async {
            debug!(%remote, "peer connected");
            loop {
                let (mut send, mut recv) = tokio::select! {
                    _ = shutdown.cancelled() => {
                        // Let streams already being handled finish; the client retries others.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        conn.close(CODE_SHUTDOWN.into(), b"shutting down");
                        break;
                    }
                    s = conn.accept_bi() => match s {
                        Ok(s) => s,
                        Err(e) => {
                            debug!("connection ended: {e}");
                            break;
                        }
                    },
                };
                let (handler, peer, max, timeout) = (
                    handler.clone(),
                    peer.clone(),
                    self.shared.limits.max_frame_bytes,
                    self.shared.limits.request_timeout,
                );
                tokio::spawn(
                    async move {
                        let request =
                            match tokio::time::timeout(timeout, read_frame(&mut recv, max, &peer))
                                .await
                            {
                                Ok(Ok(r)) => r,
                                Ok(Err(e @ TransportError::Protocol { .. })) => {
                                    warn!("stream refused: {e}");
                                    let _ = recv.stop(CODE_TOO_LARGE.into());
                                    let _ = send.reset(CODE_TOO_LARGE.into());
                                    return;
                                }
                                Ok(Err(e)) => {
                                    debug!("stream failed: {e}");
                                    return;
                                }
                                Err(_) => {
                                    warn!("stream timed out before its frame arrived");
                                    let _ = send.reset(CODE_LIMIT.into());
                                    return;
                                }
                            };
                        let reply = handler(peer.clone(), request).await;
                        if let Err(e) = write_frame(&mut send, &reply, &peer).await {
                            debug!("reply not delivered: {e}");
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        .instrument(span)
        .await;
    }

    async fn connection(&self, peer: &PeerAddr) -> Result<quinn::Connection, TransportError> {
        let mut cache = self.shared.connections.lock().await;
        if let Some(c) = cache.get(&peer.area) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let connect_err = |reason: String| TransportError::Connect {
            peer: peer.area.clone(),
            reason,
        };
        let connecting = self
            .shared
            .endpoint
            .connect(peer.addr, &peer.server_name)
            .map_err(|e| connect_err(e.to_string()))?;
        let conn =
            match tokio::time::timeout(self.shared.limits.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(connect_err(e.to_string())),
                Err(_) => return Err(connect_err("handshake timed out".into())),
            };
        match area_of(conn.peer_identity()) {
            Ok(a) if a == peer.area => {}
            Ok(a) => {
                conn.close(CODE_NO_IDENTITY.into(), b"wrong area");
                return Err(TransportError::Identity {
                    expected: peer.area.clone(),
                    found: a.to_string(),
                });
            }
            Err(why) => {
                conn.close(CODE_NO_IDENTITY.into(), b"no area identity");
                return Err(TransportError::Identity {
                    expected: peer.area.clone(),
                    found: why,
                });
            }
        }
        info!(peer = %peer.area, "connected");
        cache.insert(peer.area.clone(), conn.clone());
        Ok(conn)
    }

    /// Makes sure a connection to `peer` is established (handshake done, identity checked).
    pub async fn connect(&self, peer: &PeerAddr) -> Result<(), TransportError> {
        self.connection(peer).await.map(|_| ())
    }

    /// Sends one request on a new stream of the (cached) connection to `peer` and returns the
    /// reply, all within the request timeout.
    pub async fn request(
        &self,
        peer: &PeerAddr,
        request: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let timeout = self.shared.limits.request_timeout;
        let result = tokio::time::timeout(timeout, async {
            let conn = self.connection(peer).await?;
            let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
                peer: peer.area.clone(),
                reason: e.to_string(),
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
            write_frame(&mut send, request, &peer.area).await?;
            read_frame(&mut recv, self.shared.limits.max_frame_bytes, &peer.area).await
        })
        .await
        .unwrap_or_else(|_| Err(TransportError::Timeout(peer.area.clone())));
        if matches!(
            result,
            Err(TransportError::Lost { .. } | TransportError::Timeout(_))
        ) {
            // Drop a dead connection so the next request dials afresh.
            let mut cache = self.shared.connections.lock().await;
            if cache
                .get(&peer.area)
                .is_some_and(|c| c.close_reason().is_some())
                || matches!(result, Err(TransportError::Timeout(_)))
            {
                if let Some(c) = cache.remove(&peer.area) {
                    c.close(CODE_SHUTDOWN.into(), b"timed out");
                }
            }
        }
        result
    }

    /// How many outgoing connections are cached (tests: connection reuse).
    pub async fn cached_connections(&self) -> usize {
        self.shared.connections.lock().await.len()
    }

    /// Closes every connection and waits briefly for the peers to be told.
    pub async fn close(&self) {
        self.shared
            .endpoint
            .close(CODE_SHUTDOWN.into(), b"shutting down");
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.shared.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::crypto::pki::{area_server_name, DevCa};

    fn area(s: &str) -> AreaId {
        s.parse().unwrap()
    }

    fn identity(ca: &DevCa, a: &str) -> TlsIdentity {
        let node = ca.issue_node(&area(a), 30).unwrap();
        TlsIdentity::from_pem(&ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            max_frame_bytes: 4096,
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            ..Limits::default()
        }
    }

    /// A server for `server_area` whose handler echoes "<peer>:<len>" and counts its calls.
    async fn server(id: &TlsIdentity, calls: Arc<AtomicUsize>) -> (Transport, CancellationToken) {
        let t = Transport::bind("127.0.0.1:0".parse().unwrap(), id, limits()).unwrap();
        let token = CancellationToken::new();
        let (t2, tok) = (t.clone(), token.clone());
        tokio::spawn(async move {
            t2.serve(
                move |peer: AreaId, req: Vec<u8>| {
                    let calls = calls.clone();
                    async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        format!("{peer}:{}", req.len()).into_bytes()
                    }
                },
                tok,
            )
            .await
        });
        (t, token)
    }

    fn addr_of(t: &Transport, a: &str) -> PeerAddr {
        PeerAddr {
            area: area(a),
            addr: t.local_addr().unwrap(),
            server_name: area_server_name(&area(a)),
        }
    }

    #[tokio::test]
    async fn a_request_reaches_the_handler_with_the_authenticated_area() {
        let ca = DevCa::generate("test ca", 30).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (srv, _stop) = server(&identity(&ca, "london"), calls.clone()).await;
        let client = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity(&ca, "west-midlands"),
            limits(),
        )
        .unwrap();
        let reply = client
            .request(&addr_of(&srv, "london"), b"hello")
            .await
            .unwrap();
        assert_eq!(reply, b"west-midlands:5");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn many_concurrent_requests_share_one_connection() {
        let ca = DevCa::generate("test ca", 30).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (srv, _stop) = server(&identity(&ca, "london"), calls.clone()).await;
        let client = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity(&ca, "west-midlands"),
            limits(),
        )
        .unwrap();
        let peer = addr_of(&srv, "london");
        client.connect(&peer).await.unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (c, p) = (client.clone(), peer.clone());
                tokio::spawn(async move { c.request(&p, &vec![0u8; i]).await.unwrap() })
            })
            .collect();
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap(), format!("west-midlands:{i}").into_bytes());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 200);
        assert_eq!(client.cached_connections().await, 1);
    }

    #[tokio::test]
    async fn an_oversize_frame_is_refused_before_the_handler_and_the_connection_keeps_serving() {
        let ca = DevCa::generate("test ca", 30).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (srv, _stop) = server(&identity(&ca, "london"), calls.clone()).await;
        let client = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity(&ca, "west-midlands"),
            limits(),
        )
        .unwrap();
        let peer = addr_of(&srv, "london");
        // A frame header claiming 100 MB: the server must refuse it without allocating.
        let conn = client.connection(&peer).await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&(100_000_000u32).to_be_bytes())
            .await
            .unwrap();
        let _ = send.finish();
        assert!(
            read_frame(&mut recv, 4096, &peer.area).await.is_err(),
            "no reply to an oversize frame"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler never saw it");
        assert_eq!(
            client.request(&peer, b"ok").await.unwrap(),
            b"west-midlands:2"
        );
        // A real request over the server's limit is refused the same way.
        assert!(client.request(&peer, &vec![0u8; 5000]).await.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "only the normal request reached the handler"
        );
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let ca = DevCa::generate("test ca", 30).unwrap();
        let rogue = DevCa::generate("rogue ca", 30).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (srv, _stop) = server(&identity(&ca, "london"), calls.clone()).await;
        // Trusts the real CA, presents a rogue certificate.
        let node = rogue.issue_node(&area("west-midlands"), 30).unwrap();
        let id = TlsIdentity::from_pem(&ca.cert_pem(), &node.cert_pem, &node.key_pem).unwrap();
        let client = Transport::bind("127.0.0.1:0".parse().unwrap(), &id, limits()).unwrap();
        assert!(client
            .request(&addr_of(&srv, "london"), b"x")
            .await
            .is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_server_with_the_wrong_area_or_no_area_is_refused() {
        let ca = DevCa::generate("test ca", 30).unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let (srv, _stop) = server(&identity(&ca, "kent"), calls.clone()).await;
        let client = Transport::bind(
            "127.0.0.1:0".parse().unwrap(),
            &identity(&ca, "west-midlands"),
            limits(),
        )
        .unwrap();
        // Dialled as london, but the certificate (valid for kent) does not carry london's name.
        let mut peer = addr_of(&srv, "london");
        assert!(client.request(&peer, b"x").await.is_err());
        // Right DNS name, wrong area identity.
        peer.server_name = area_server_name(&area("kent"));
        let err = client.request(&peer, b"x").await.unwrap_err();
        assert!(matches!(err, TransportError::Identity { .. }), "{err}");
        assert_eq!(calls.load(Ordering::SeqCst), 0);

        let no_uri = ca
            .issue_without_area_uri(&area("west-midlands"), 30)
            .unwrap();
        let id = TlsIdentity::from_pem(&ca.cert_pem(), &no_uri.cert_pem, &no_uri.key_pem).unwrap();
        let anonymous = Transport::bind("127.0.0.1:0".parse().unwrap(), &id, limits()).unwrap();
        let (srv2, _stop2) = server(&identity(&ca, "london"), calls.clone()).await;
        assert!(
            anonymous
                .request(&addr_of(&srv2, "london"), b"x")
                .await
                .is_err(),
            "a client without an area is refused"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
