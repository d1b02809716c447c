//! Refusal counting for the transport: the first refusal of each reason (and the first framing
//! violation per peer and rule) is logged at once, the rest summarised every
//! `SUMMARY_INTERVAL`, so a flood cannot fill the log; `totals` never resets (metrics read it).
//! A handshake the peer abandoned itself ([`ABANDONED`]) is not a refusal by this node: the
//! transport only `count`s it (metrics read `totals`; it logs it at DEBUG), so the crossing dials
//! of a federation's start leave no WARN for an operator to chase.
//! Must not: log anything that came from the network (reasons are our own text).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use tracing::warn;

use super::{lock, SUMMARY_INTERVAL};
use crate::core::types::AreaId;

/// Counts refusals per reason: the first of each is logged at once, the rest summarised.
/// `counts` is the current summary window (reset by `summarise`); `totals` never resets (it is
/// what a metrics endpoint or a test reads). `streams` does the same for framing violations of
/// authenticated peers, per (peer, rule).
#[derive(Default)]
pub(super) struct Refusals {
    pub(super) counts: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) totals: Mutex<BTreeMap<&'static str, u64>>,
    pub(super) streams: Mutex<BTreeMap<(AreaId, &'static str), u64>>,
}

/// A handshake the peer closed itself before it completed (see `abandoned_by_peer`).
pub(super) const ABANDONED: &str = "handshake abandoned by the peer";

impl Refusals {
    /// Counts `reason` in the totals only: no WARN, no summary (an attempt that is not a
    /// refusal by this node, such as [`ABANDONED`]).
    pub(super) fn count(&self, reason: &'static str) {
        *lock(&self.totals).entry(reason).or_insert(0) += 1;
    }

    /// Counts a refusal and logs the first of its reason in the window at WARN.
    pub(super) fn note(&self, reason: &'static str, remote: SocketAddr) {
        self.count(reason);
        let first = {
            let mut m = lock(&self.counts);
            let n = m.entry(reason).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            warn!(%remote, "connection refused: {reason} (more are summarised every {}s)", SUMMARY_INTERVAL.as_secs());
        }
    }

    /// A stream refused for breaking the framing: logged once per (peer, rule) per interval.
    /// The reason is our own text (numbers only), and the peer an `AreaId`: nothing raw.
    pub(super) fn note_stream(&self, peer: &AreaId, rule: &'static str, reason: &str) {
        let first = {
            let mut m = lock(&self.streams);
            let n = m.entry((peer.clone(), rule)).or_insert(0);
            *n += 1;
            *n == 1
        };
        if first {
            warn!(%peer, rule, "stream refused: {reason} (more are summarised every {}s)", SUMMARY_INTERVAL.as_secs());
        }
    }

    pub(super) fn summarise(&self) {
        let streams = std::mem::take(&mut *lock(&self.streams));
        for ((peer, rule), n) in streams.iter().filter(|(_, n)| **n > 1) {
            warn!(%peer, rule, "further streams refused in the last {}s: {}", SUMMARY_INTERVAL.as_secs(), n - 1);
        }
        let taken = std::mem::take(&mut *lock(&self.counts));
        let more: Vec<String> = taken
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(r, n)| format!("{r}: {}", n - 1))
            .collect();
        if !more.is_empty() {
            warn!(
                "further connections refused in the last {}s: {}",
                SUMMARY_INTERVAL.as_secs(),
                more.join(", ")
            );
        }
    }
}
