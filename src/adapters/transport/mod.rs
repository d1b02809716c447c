//! QUIC transport with mutual TLS 1.3 (quinn 0.11, rustls 0.23 with ring): the only module
//! that touches quinn, rustls or x509-parser.
//!
//! Wire protocol `refex/1` (ALPN): one bidirectional stream per envelope; the client writes one
//! frame (u32 big-endian length, then that many bytes) and finishes; the server answers with one
//! frame and finishes (`frame`: strict — bytes after the frame are refused; requests are bounded
//! by `max_frame_bytes`, replies by `max_reply_bytes`; buffers grow as bytes arrive).
//! Identity (`tls`): both sides present certificates chaining to the federation CA (and not on
//! its CRL); the area is read from the certificate's single `urn:refex:area:<id>` URI SAN. The
//! server passes the authenticated area to the handler with every request; the client refuses a
//! server whose area is not the one it dialled.
//! Isolation: outgoing connections are cached per peer area; a handshake runs in its own task,
//! outside every lock, and requests for the same peer wait on its result; a request that times
//! out resets only its own stream, and a connection leaves the cache only when it is closed.
//! A peer that connects to us is up: a dial to it under way starts over (once per dial, see
//! `dial`), and the node is told ([`Transport::on_peer_connected`]) so its sender stops
//! backing off.
//! Pre-authentication budget: handshakes in progress have their own bound (`max_handshakes`),
//! separate from `max_connections`, which counts authenticated connections only; above
//! `retry_above_handshakes` in progress, an unvalidated address is sent a QUIC Retry first.
//! Refusals are logged once per reason and then summarised per interval. A stream of an
//! authenticated peer that breaks the framing is reset (code 5), logged the same way per (peer,
//! rule), and reported on the [`Transport::take_violations`] queue for the node to audit.
//! Lifetime and revocation: `reload` swaps the server and client configurations on the endpoint
//! in use, drops cached outgoing connections, and re-checks every live connection's peer against
//! the new CRL and its certificate's expiry, closing those that fail (also re-checked on a
//! timer while serving). No connection outlives `max_connection_lifetime`.
//! Restarts: the endpoint's stateless-reset key and connection-id key are derived from the
//! node's TLS key, so a restarted node recognises its previous connection ids and resets its
//! peers' stale connections at once instead of leaving them to time out.
//! Must not: interpret frame contents (the receiver and sender do), log payload bytes, or hold
//! a lock across an await.

mod budget;
mod dial;
mod frame;
mod refusals;
mod tls;

use refusals::Refusals;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::core::types::AreaId;
use frame::{read_frame, write_frame};
pub use frame::{FrameError, FrameReader};
pub use tls::TlsIdentity;
use tls::{area_of, tls_err, PeerPolicy};

/// The ALPN protocol id.
pub const ALPN: &[u8] = b"refex/1";

/// Application error codes on streams and connections.
const CODE_NO_IDENTITY: u32 = 2;
const CODE_LIMIT: u32 = 3;
const CODE_SHUTDOWN: u32 = 4;
const CODE_PROTOCOL: u32 = 5;
const CODE_REVOKED: u32 = 6;
const CODE_LIFETIME: u32 = 7;

/// How often refusals are summarised, and live connections re-checked for expiry.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
const RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// How long a closing endpoint waits for its connections to drain. Each connection sends its
/// CONNECTION_CLOSE as soon as its driver runs (well inside this); the rest of the draining
/// period (three PTOs: ~0.1 s on a LAN, ~3 s for a connection whose handshake never finished,
/// as a refused simultaneous dial leaves) only answers late packets, which a socket about to
/// close cannot do anyway, and RFC 9000 section 10.2 lets an endpoint that closes its socket
/// end it early. Waiting it out cost every stop of a daemon 2 s (measured: SIGTERM to exit
/// 2.0-2.2 s, and the national demo stops 43 of them).
const CLOSE_NOTICE: Duration = Duration::from_millis(250);

/// Whether a handshake that did not complete was closed by the peer itself. A peer that closes
/// its own connection attempt before the handshake is done (QUIC then carries only
/// APPLICATION_ERROR, RFC 9000 section 10.2.3) has not been refused by us: that is what a dial
/// abandoned on purpose looks like (two areas dialling each other at start, where one starts
/// its dial over) and a peer stopping mid-handshake. A failure of the TLS exchange itself —
/// our verifier refusing the peer's certificate, or the peer's refusing ours (a crypto error
/// code) — is not, and stays `TLS handshake failed`.
fn abandoned_by_peer(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ApplicationClosed(_) => true,
        quinn::ConnectionError::ConnectionClosed(c) => {
            c.error_code == quinn_proto::TransportErrorCode::APPLICATION_ERROR
        }
        _ => false,
    }
}

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
    /// The peer sent a frame over the limit, or broke the framing. `rule` is the audit code
    /// (`frame_oversize`, `frame_truncated`, `frame_trailing`; see [`FrameError::rule`]).
    #[error("protocol violation by {peer}: {reason}")]
    Protocol {
        peer: AreaId,
        rule: &'static str,
        reason: String,
    },
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
    /// Largest reply read back from a peer (see `core::envelope::MAX_REPLY_BYTES`).
    pub max_reply_bytes: u32,
    pub max_streams_per_connection: u32,
    pub max_connections_per_peer: u32,
    /// Authenticated inbound connections in total.
    pub max_connections: u32,
    /// Inbound handshakes in progress (not yet authenticated), a budget of their own.
    pub max_handshakes: u32,
    /// Handshake slots only known peer addresses may use (see `budget`).
    pub reserved_handshakes: u32,
    /// Above this many inbound handshakes in progress, unvalidated addresses get a QUIC Retry.
    pub retry_above_handshakes: u32,
    /// Request bytes one inbound connection may have in flight (claimed frames being read or
    /// handled); also its QUIC receive window. Never below one frame.
    pub max_inflight_bytes: u32,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    /// No connection, in either direction, lives longer than this.
    pub max_connection_lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            max_reply_bytes: crate::core::envelope::MAX_REPLY_BYTES as u32,
            max_streams_per_connection: 64,
            max_connections_per_peer: 4,
            max_connections: 256,
            max_handshakes: 64,
            reserved_handshakes: 16,
            retry_above_handshakes: 16,
            max_inflight_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            max_connection_lifetime: Duration::from_secs(3600),
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

/// The outcome of a dial, shared by every request waiting for it.
#[derive(Clone)]
enum DialError {
    Connect(String),
    Identity(String),
}

impl DialError {
    fn into_error(self, peer: &AreaId) -> TransportError {
        match self {
            Self::Connect(reason) => TransportError::Connect {
                peer: peer.clone(),
                reason,
            },
            Self::Identity(found) => TransportError::Identity {
                expected: peer.clone(),
                found,
            },
        }
    }
}

type DialResult = Option<Result<quinn::Connection, DialError>>;

/// One peer's outgoing connection state.
enum Outbound {
    Dialing {
        id: u64,
        done: watch::Receiver<DialResult>,
        /// Notified when the peer connects to us meanwhile (see `dial`).
        redial: Arc<tokio::sync::Notify>,
    },
    Up {
        conn: quinn::Connection,
        since: Instant,
    },
}

/// A framing violation on a stream of an authenticated peer, reported to the node (which
/// audits it, aggregated per peer, rule and minute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameViolation {
    /// The TLS-authenticated area of the connection.
    pub peer: AreaId,
    /// `frame_oversize`, `frame_truncated` or `frame_trailing`.
    pub rule: &'static str,
}

/// Violations queued for the node beyond this are dropped (and only counted in the log
/// summary): a flood must not grow memory; the audit aggregates them anyway.
const VIOLATION_QUEUE: usize = 1024;

/// A std mutex guard, recovering from poisoning (the data are plain maps, always consistent).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Shared {
    endpoint: quinn::Endpoint,
    limits: Limits,
    client: RwLock<quinn::ClientConfig>,
    policy: RwLock<Arc<PeerPolicy>>,
    outbound: Mutex<HashMap<AreaId, Outbound>>,
    next_dial: AtomicU64,
    inbound: Mutex<HashMap<AreaId, u32>>,
    live: Mutex<HashMap<usize, quinn::Connection>>,
    known: budget::KnownPeers,
    refusals: Refusals,
    violations: tokio::sync::mpsc::Sender<FrameViolation>,
    violations_rx: Mutex<Option<tokio::sync::mpsc::Receiver<FrameViolation>>>,
    /// Called with the area of every authenticated inbound connection (see
    /// [`Transport::on_peer_connected`]).
    on_peer: Mutex<Option<PeerHook>>,
}

/// What runs when an authenticated peer connects to us.
type PeerHook = Arc<dyn Fn(&AreaId) + Send + Sync>;

/// A QUIC endpoint acting as both server and client. Cheap to clone.
#[derive(Clone)]
pub struct Transport {
    shared: Arc<Shared>,
}

/// Counts an authenticated inbound connection for its peer; released on drop.
struct Slot {
    shared: Arc<Shared>,
    peer: AreaId,
    id: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(n) = lock(&self.shared.inbound).get_mut(&self.peer) {
            *n = n.saturating_sub(1);
        }
        lock(&self.shared.live).remove(&self.id);
    }
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
        let (server, client) = tls.quic_configs(&limits)?;
        let endpoint =
            quinn::Endpoint::new(config, Some(server), socket, runtime).map_err(|source| {
                TransportError::Bind {
                    addr: listen,
                    source,
                }
            })?;
        let (violations, violations_rx) = tokio::sync::mpsc::channel(VIOLATION_QUEUE);
        Ok(Self {
            shared: Arc::new(Shared {
                endpoint,
                limits,
                client: RwLock::new(client),
                policy: RwLock::new(Arc::new(tls.policy())),
                outbound: Mutex::new(HashMap::new()),
                next_dial: AtomicU64::new(0),
                inbound: Mutex::new(HashMap::new()),
                live: Mutex::new(HashMap::new()),
                known: budget::KnownPeers::default(),
                refusals: Refusals::default(),
                violations,
                violations_rx: Mutex::new(Some(violations_rx)),
                on_peer: Mutex::new(None),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.shared
            .endpoint
            .local_addr()
            .map_err(|e| tls_err("local address", e))
    }

    /// Adds peer addresses (the directory's) to those allowed the reserved handshake slots.
    pub fn know_peers(&self, addrs: impl IntoIterator<Item = SocketAddr>) {
        for a in addrs {
            self.shared.known.add(a);
        }
    }

    /// Replaces the TLS material for both directions (SIGHUP) without dropping the endpoint:
    /// new handshakes use it at once, cached outgoing connections are dropped (requests in
    /// flight on them finish), and every live connection whose peer the new CRL revokes, or
    /// whose certificate has expired, is closed.
    pub fn reload(&self, tls: &TlsIdentity) -> Result<(), TransportError> {
        let (server, client) = tls.quic_configs(&self.shared.limits)?;
        self.shared.endpoint.set_server_config(Some(server));
        *self
            .shared
            .client
            .write()
            .unwrap_or_else(|p| p.into_inner()) = client;
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(tls.policy());
        let dropped = std::mem::take(&mut *lock(&self.shared.outbound));
        self.recheck(dropped.into_values().filter_map(|o| match o {
            Outbound::Up { conn, .. } => Some(conn),
            Outbound::Dialing { .. } => None,
        }));
        Ok(())
    }

    /// Closes every live connection (inbound, and `outbound` plus the cached ones) whose peer
    /// the current policy refuses. Returns how many were closed.
    fn recheck(&self, outbound: impl Iterator<Item = quinn::Connection>) -> usize {
        let policy = self
            .shared
            .policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut conns: Vec<quinn::Connection> = lock(&self.shared.live).values().cloned().collect();
        conns.extend(outbound);
        conns.extend(
            lock(&self.shared.outbound)
                .values()
                .filter_map(|o| match o {
                    Outbound::Up { conn, .. } => Some(conn.clone()),
                    Outbound::Dialing { .. } => None,
                }),
        );
        let now = SystemTime::now();
        let mut closed = 0;
        for conn in conns {
            if let Some(why) = policy.refuses(&conn, now) {
                warn!(remote = %conn.remote_address(), "closing live connection: {why}");
                conn.close(CODE_REVOKED.into(), b"certificate no longer valid");
                closed += 1;
            }
        }
        closed
    }

    /// Accepts connections until `shutdown`, calling `handler(peer_area, request)` for each
    /// stream and sending back what it returns.
    pub async fn serve<H, F>(&self, handler: H, shutdown: CancellationToken)
    where
        H: Fn(AreaId, Vec<u8>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Vec<u8>> + Send,
    {
        let limits = &self.shared.limits;
        let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes as usize));
        let total = Arc::new(tokio::sync::Semaphore::new(limits.max_connections as usize));
        let mut summary = tokio::time::interval(SUMMARY_INTERVAL);
        let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
        // Every connection and stream task runs under this tracker, and `serve` returns only
        // once they have all ended: the node's own tracker, waiting on `serve`, waits for them.
        let tasks = TaskTracker::new();
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = summary.tick() => {
                    self.shared.refusals.summarise();
                    continue;
                }
                _ = recheck.tick() => {
                    self.recheck(std::iter::empty());
                    continue;
                }
                i = self.shared.endpoint.accept() => match i {
                    Some(i) => i,
                    None => break,
                },
            };
            let remote = incoming.remote_address();
            let in_progress = limits.max_handshakes as usize - handshakes.available_permits();
            if in_progress >= limits.retry_above_handshakes as usize
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                // Make the sender prove its address before it costs a handshake.
                if incoming.retry().is_err() {
                    self.shared.refusals.note("retry failed", remote);
                }
                continue;
            }
            let known = self.shared.known.contains(&remote);
            let slots = budget::handshake_slots(limits, known);
            let permit = match handshakes.clone().try_acquire_owned() {
                Ok(p) if in_progress < slots => p,
                _ => {
                    let why = if known {
                        "max_handshakes in progress"
                    } else {
                        "unreserved handshake slots in use"
                    };
                    self.shared.refusals.note(why, remote);
                    incoming.refuse();
                    continue;
                }
            };
            let (this, handler, shutdown, total, streams) = (
                self.clone(),
                handler.clone(),
                shutdown.clone(),
                total.clone(),
                tasks.clone(),
            );
            tasks.spawn(async move {
                this.serve_connection(incoming, permit, total, handler, streams, shutdown)
                    .await;
            });
        }
        tasks.close();
        tasks.wait().await;
    }

    async fn serve_connection<H, F>(
        &self,
        incoming: quinn::Incoming,
        handshake: tokio::sync::OwnedSemaphorePermit,
        total: Arc<tokio::sync::Semaphore>,
        handler: H,
        streams: TaskTracker,
        shutdown: CancellationToken,
    ) where
        H: Fn(AreaId, Vec<u8>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Vec<u8>> + Send,
    {
        let remote = incoming.remote_address();
        let refusals = &self.shared.refusals;
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                debug!(%remote, "incoming connection failed: {e}");
                refusals.note("incoming connection failed", remote);
                return;
            }
        };
        let conn = match tokio::time::timeout(self.shared.limits.handshake_timeout, connecting)
            .await
        {
            Ok(Ok(c)) => c,
            Ok(Err(e)) if abandoned_by_peer(&e) => {
                debug!(%remote, "connection attempt closed by the peer before its handshake completed: {e}");
                refusals.count(refusals::ABANDONED);
                return;
            }
            Ok(Err(e)) => {
                debug!(%remote, "TLS handshake refused: {e}");
                refusals.note("TLS handshake failed", remote);
                return;
            }
            Err(_) => {
                refusals.note("TLS handshake timed out", remote);
                return;
            }
        };
        drop(handshake);
        let peer = match area_of(conn.peer_identity()) {
            Ok(a) => a,
            Err(why) => {
                debug!(%remote, "connection refused: {why}");
                refusals.note("no area identity", remote);
                conn.close(CODE_NO_IDENTITY.into(), b"no area identity");
                return;
            }
        };
        let Ok(_permit) = total.try_acquire_owned() else {
            refusals.note("max_connections reached", remote);
            conn.close(CODE_LIMIT.into(), b"too many connections");
            return;
        };
        let _slot = {
            let mut m = lock(&self.shared.inbound);
            let n = m.entry(peer.clone()).or_insert(0);
            if *n >= self.shared.limits.max_connections_per_peer {
                drop(m);
                refusals.note("max_connections_per_peer reached", remote);
                conn.close(CODE_LIMIT.into(), b"too many connections");
                return;
            }
            *n += 1;
            lock(&self.shared.live).insert(conn.stable_id(), conn.clone());
            Slot {
                shared: self.shared.clone(),
                peer: peer.clone(),
                id: conn.stable_id(),
            }
        };
        self.shared.known.add(remote);
        if let Some(Outbound::Dialing { redial, .. }) = lock(&self.shared.outbound).get(&peer) {
            redial.notify_one();
        }
        let hook = lock(&self.shared.on_peer).clone();
        if let Some(hook) = hook {
            hook(&peer);
        }
        let bytes = budget::connection_budget(&self.shared.limits);
        let span = tracing::info_span!("connection", peer = %peer);
        let lifetime = tokio::time::sleep(self.shared.limits.max_connection_lifetime);
        tokio::pin!(lifetime);
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
                    _ = &mut lifetime => {
                        debug!("connection lifetime reached");
                        conn.close(CODE_LIFETIME.into(), b"connection lifetime reached");
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
                let (handler, peer, max, timeout, bytes, shared) = (
                    handler.clone(),
                    peer.clone(),
                    self.shared.limits.max_frame_bytes,
                    self.shared.limits.request_timeout,
                    bytes.clone(),
                    self.shared.clone(),
                );
                streams.spawn(
                    async move {
                        let read = budget::read_frame_budgeted(&mut recv, max, &bytes, &peer);
                        let (request, _held) = match tokio::time::timeout(timeout, read).await {
                            Ok(Ok(r)) => r,
                            Ok(Err(TransportError::Protocol { rule, reason, .. })) => {
                                shared.refusals.note_stream(&peer, rule, &reason);
                                let v = FrameViolation {
                                    peer: peer.clone(),
                                    rule,
                                };
                                let _ = shared.violations.try_send(v);
                                let _ = recv.stop(CODE_PROTOCOL.into());
                                let _ = send.reset(CODE_PROTOCOL.into());
                                return;
                            }
                            Ok(Err(e)) => {
                                debug!("stream failed: {e}");
                                return;
                            }
                            Err(_) => {
                                warn!("stream timed out before its frame arrived");
                                let _ = recv.stop(CODE_LIMIT.into());
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

    /// Makes sure a connection to `peer` is established (handshake done, identity checked).
    pub async fn connect(&self, peer: &PeerAddr) -> Result<(), TransportError> {
        self.connection(peer).await.map(|_| ())
    }

    /// Sends one request on a new stream of the (cached) connection to `peer` and returns the
    /// reply, all within the request timeout. A timeout abandons only this request's stream.
    pub async fn request(
        &self,
        peer: &PeerAddr,
        request: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let timeout = self.shared.limits.request_timeout;
        let max_reply = self.shared.limits.max_reply_bytes;
        let mut used = None;
        let result = tokio::time::timeout(timeout, async {
            let conn = self.connection(peer).await?;
            used = Some(conn.clone());
            let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
                peer: peer.area.clone(),
                reason: e.to_string(),
            };
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
            write_frame(&mut send, request, &peer.area).await?;
            read_frame(&mut recv, max_reply, &peer.area).await
        })
        .await
        .unwrap_or_else(|_| Err(TransportError::Timeout(peer.area.clone())));
        if let Some(conn) = used.filter(|c| c.close_reason().is_some()) {
            // Drop a dead connection so the next request dials afresh — but only that one.
            let mut m = lock(&self.shared.outbound);
            if matches!(m.get(&peer.area), Some(Outbound::Up { conn: c, .. }) if c.stable_id() == conn.stable_id())
            {
                m.remove(&peer.area);
            }
        }
        result
    }

    /// Calls `hook` with the area of every authenticated inbound connection, once its identity
    /// is checked and it holds a connection slot (so at most as often as the connection limits
    /// let a peer connect). The node uses it to learn that a peer it backs off from is up.
    pub fn on_peer_connected(&self, hook: impl Fn(&AreaId) + Send + Sync + 'static) {
        *lock(&self.shared.on_peer) = Some(Arc::new(hook));
    }

    /// The framing violations of authenticated peers, for the node to audit. Only the first
    /// call gets the queue; it holds at most `VIOLATION_QUEUE` (more are dropped unaudited but
    /// still logged in the summary). Nobody taking it is fine: violations are then only logged.
    pub fn take_violations(&self) -> Option<tokio::sync::mpsc::Receiver<FrameViolation>> {
        lock(&self.shared.violations_rx).take()
    }

    /// Inbound connections refused since start, per reason (never reset; read by metrics).
    pub fn refusal_totals(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.shared.refusals.totals).clone()
    }

    /// How many outgoing connections are cached (tests: connection reuse).
    pub async fn cached_connections(&self) -> usize {
        lock(&self.shared.outbound)
            .values()
            .filter(|o| matches!(o, Outbound::Up { .. }))
            .count()
    }

    /// QUIC connections open on this endpoint, inbound and outbound (`status`).
    pub fn open_connections(&self) -> usize {
        self.shared.endpoint.open_connections()
    }

    /// Closes every connection and waits briefly for the peers to be told.
    pub async fn close(&self) {
        self.shared
            .endpoint
            .close(CODE_SHUTDOWN.into(), b"shutting down");
        let _ = tokio::time::timeout(CLOSE_NOTICE, self.shared.endpoint.wait_idle()).await;
    }
}

#[cfg(test)]
mod tests;
