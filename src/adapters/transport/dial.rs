//! Outgoing connections: one cached connection per peer area, dialled in its own task that
//! every request for that peer waits on (see "Isolation" in the parent module).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use std::time::Instant;
use tokio::sync::{watch, Notify};
use tracing::{debug, info};

use super::{
    area_of, lock, DialError, DialResult, Outbound, PeerAddr, Transport, TransportError,
    CODE_NO_IDENTITY,
};

impl Transport {
    /// The established connection to `peer`, dialling if there is none. The handshake runs in
    /// its own task, so neither a lock nor a caller's timeout holds it up or cuts it short;
    /// every request for the same peer waits on the same dial.
    pub(super) async fn connection(
        &self,
        peer: &PeerAddr,
    ) -> Result<quinn::Connection, TransportError> {
        // Rotate outgoing connections a little before the peer's server would close them.
        let max_age = self.shared.limits.max_connection_lifetime.mul_f64(0.9);
        self.shared.known.add(peer.addr);
        let mut done = {
            let mut m = lock(&self.shared.outbound);
            match m.get(&peer.area) {
                Some(Outbound::Up { conn, since })
                    if conn.close_reason().is_none() && since.elapsed() < max_age =>
                {
                    return Ok(conn.clone());
                }
                Some(Outbound::Dialing { done, .. }) => done.clone(),
                _ => {
                    let id = self.shared.next_dial.fetch_add(1, Ordering::Relaxed);
                    let (tx, rx) = watch::channel(None);
                    let redial = Arc::new(Notify::new());
                    m.insert(
                        peer.area.clone(),
                        Outbound::Dialing {
                            id,
                            done: rx.clone(),
                            redial: redial.clone(),
                        },
                    );
                    tokio::spawn(self.clone().dial(peer.clone(), id, tx, redial));
                    rx
                }
            }
        };
        let result = done
            .wait_for(Option::is_some)
            .await
            .map(|r| r.clone())
            .unwrap_or(None);
        match result {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => Err(e.into_error(&peer.area)),
            None => Err(DialError::Connect("dial abandoned".into()).into_error(&peer.area)),
        }
    }

    /// Dials `peer`, checks its area, and publishes the outcome to the cache (if the cache
    /// entry is still this dial's) and to every waiter. If the peer connects to us while the
    /// handshake is under way, the handshake starts over, once: its Initial packets went to a
    /// peer that was down, and QUIC resends them only on a growing probe timeout (seconds
    /// after the peer is back, with every send to it waiting).
    async fn dial(
        self,
        peer: PeerAddr,
        id: u64,
        done: watch::Sender<DialResult>,
        redial: Arc<Notify>,
    ) {
        let result = tokio::select! {
            r = self.handshake(&peer) => r,
            _ = redial.notified() => {
                debug!(peer = %peer.area, "the peer connected to us while we dialled it; dialling again");
                self.handshake(&peer).await
            }
        };
        {
            let mut m = lock(&self.shared.outbound);
            if matches!(m.get(&peer.area), Some(Outbound::Dialing { id: i, .. }) if *i == id) {
                match &result {
                    Ok(conn) => {
                        m.insert(
                            peer.area.clone(),
                            Outbound::Up {
                                conn: conn.clone(),
                                since: Instant::now(),
                            },
                        );
                    }
                    Err(_) => {
                        m.remove(&peer.area);
                    }
                }
            }
        }
        done.send_replace(Some(result));
    }

    async fn handshake(&self, peer: &PeerAddr) -> Result<quinn::Connection, DialError> {
        let config = self
            .shared
            .client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connecting = self
            .shared
            .endpoint
            .connect_with(config, peer.addr, &peer.server_name)
            .map_err(|e| DialError::Connect(e.to_string()))?;
        let conn =
            match tokio::time::timeout(self.shared.limits.handshake_timeout, connecting).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(DialError::Connect(e.to_string())),
                Err(_) => return Err(DialError::Connect("handshake timed out".into())),
            };
        match area_of(conn.peer_identity()) {
            Ok(a) if a == peer.area => {
                info!(peer = %peer.area, "connected");
                Ok(conn)
            }
            Ok(a) => {
                conn.close(CODE_NO_IDENTITY.into(), b"wrong area");
                Err(DialError::Identity(a.to_string()))
            }
            Err(why) => {
                conn.close(CODE_NO_IDENTITY.into(), b"no area identity");
                Err(DialError::Identity(why))
            }
        }
    }
}
