//! What one peer may hold of the node before and after authentication: handshake slots
//! reserved for directory peers, and a cap on the request bytes in flight per connection.
//!
//! Reserved slots: a handshake's peer is unknown until it completes, so the source address is
//! what decides. Addresses of the peer directory (a node dials from the socket it listens on),
//! addresses this node dialled and addresses that have authenticated before are *known*; a
//! handshake from any other address may take at most `max_handshakes - reserved_handshakes`
//! slots, so a flood of certificate-less handshakes never takes the last slots from a peer.
//! In-flight bytes: a stream reserves its frame's claimed length from its connection's byte
//! budget once the 4-byte prefix has arrived, and keeps it until its reply is written; a stream
//! that cannot get its bytes waits (bounded by the request timeout, then it is refused with
//! `CODE_LIMIT`). QUIC's connection receive window is set to the same cap, so bytes not yet
//! read are bounded too: at most twice the cap per connection.
//! Must not: hold a lock across an await.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::frame::FrameReader;
use super::{lock, Limits, TransportError};
use crate::core::types::AreaId;

/// The source addresses allowed into the reserved handshake slots.
#[derive(Default)]
pub(super) struct KnownPeers(Mutex<HashSet<SocketAddr>>);

/// At most this many learned addresses are kept (directory entries always are).
const MAX_LEARNED: usize = 4096;

impl KnownPeers {
    pub(super) fn add(&self, addr: SocketAddr) {
        let mut set = lock(&self.0);
        if set.len() < MAX_LEARNED || set.contains(&addr) {
            set.insert(addr);
        }
    }

    pub(super) fn contains(&self, addr: &SocketAddr) -> bool {
        lock(&self.0).contains(addr)
    }
}

/// Handshake slots an address may use: all for a known peer, the unreserved ones otherwise.
pub(super) fn handshake_slots(limits: &Limits, known: bool) -> usize {
    if known {
        limits.max_handshakes as usize
    } else {
        limits
            .max_handshakes
            .saturating_sub(limits.reserved_handshakes) as usize
    }
}

/// The effective per-connection cap: never below one whole frame and its prefix.
pub(super) fn inflight_cap(limits: &Limits) -> u32 {
    limits
        .max_inflight_bytes
        .max(limits.max_frame_bytes.saturating_add(4))
}

/// A connection's byte budget for request frames.
pub(super) fn connection_budget(limits: &Limits) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(inflight_cap(limits) as usize))
}

/// Reads one frame of at most `max` bytes, first reserving its claimed length from `budget`.
/// The permit is returned with the frame and must be held until the request is answered.
pub(super) async fn read_frame_budgeted(
    recv: &mut quinn::RecvStream,
    max: u32,
    budget: &Arc<Semaphore>,
    peer: &AreaId,
) -> Result<(Vec<u8>, OwnedSemaphorePermit), TransportError> {
    let protocol = |e: super::FrameError| TransportError::Protocol {
        peer: peer.clone(),
        rule: e.rule(),
        reason: e.to_string(),
    };
    let lost = |e: &dyn std::fmt::Display| TransportError::Lost {
        peer: peer.clone(),
        reason: e.to_string(),
    };
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv.read(&mut header[got..]).await {
            Ok(Some(n)) => got += n,
            Ok(None) => return Err(protocol(super::FrameError::Truncated { got, want: 4 })),
            Err(e) => return Err(lost(&e)),
        }
    }
    let mut reader = FrameReader::new(max);
    // Refuses an oversize claim before anything is reserved.
    reader.feed(&header).map_err(protocol)?;
    let claim = u32::from_be_bytes(header).saturating_add(4);
    let permit = budget
        .clone()
        .acquire_many_owned(claim)
        .await
        .map_err(|e| lost(&e))?;
    let frame = super::frame::read_rest(recv, reader, peer).await?;
    Ok((frame, permit))
}
