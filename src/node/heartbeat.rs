//! Progress heartbeats for the systemd watchdog: each long-running loop (intake, one sender per
//! area) beats once per iteration, and an idle loop still wakes at least every [`BEAT_EVERY`] to
//! beat, so a beat means "not stuck", not "busy". The audit writer thread beats the same way
//! (see `AuditLog::last_beat_ms`). The watchdog task in `run` pings `WATCHDOG=1` only while every
//! beat is fresher than half the watchdog interval.
//! Must not: be used for anything but liveness (no timing figures are derived from it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The longest an idle loop waits before beating again.
pub const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Wall-clock milliseconds since the Unix epoch (the unit of every beat).
pub fn now_ms() -> u64 {
    crate::adapters::audit::now_ms()
}

/// One loop's heartbeat.
#[derive(Clone)]
pub struct Beat(Arc<AtomicU64>);

impl Beat {
    /// Records progress now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }
}

/// Every registered loop's heartbeat, by name.
#[derive(Default)]
pub struct Heartbeats {
    beats: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

impl Heartbeats {
    /// Registers a loop (beating now) and returns its heartbeat.
    pub fn register(&self, name: &str) -> Beat {
        let cell = Arc::new(AtomicU64::new(now_ms()));
        if let Ok(mut b) = self.beats.lock() {
            b.retain(|(n, _)| n != name);
            b.push((name.to_owned(), cell.clone()));
        }
        Beat(cell)
    }

    /// Names of the loops (plus `extra` beats given as name and ms) older than `max_age`.
    pub fn stale(&self, max_age: Duration, extra: &[(&str, u64)]) -> Vec<String> {
        let now = now_ms();
        let limit = max_age.as_millis() as u64;
        let old = |at: u64| now.saturating_sub(at) > limit;
        let mut out: Vec<String> = self
            .beats
            .lock()
            .map(|b| {
                b.iter()
                    .filter(|(_, c)| old(c.load(Ordering::Relaxed)))
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_else(|_| vec!["heartbeat registry".into()]);
        out.extend(
            extra
                .iter()
                .filter(|(_, at)| old(*at))
                .map(|(n, _)| (*n).to_owned()),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_named_stale() {
        let hb = Heartbeats::default();
        let intake = hb.register("intake");
        let _sender = hb.register("sender:x");
        intake.beat();
        assert!(hb.stale(Duration::from_secs(60), &[]).is_empty());
        let stuck_since = now_ms() - 120_000;
        assert_eq!(
            hb.stale(Duration::from_secs(60), &[("audit writer", stuck_since)]),
            vec!["audit writer".to_string()]
        );
        // A zero age limit makes everything that did not beat in this millisecond stale;
        // a beat from two minutes ago is stale under a one-minute limit.
        hb.beats.lock().unwrap()[0]
            .1
            .store(stuck_since, Ordering::Relaxed);
        assert_eq!(
            hb.stale(Duration::from_secs(60), &[]),
            vec!["intake".to_string()]
        );
    }
}
