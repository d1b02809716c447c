//! Logging setup and process-wide counters.
//!
//! Logs: `tracing` to stderr (journald adds timestamps under systemd), human or JSON, filtered
//! by `RUST_LOG` (default `info`). Field names are stable: `peer`, `envelope_id`, `file`, `row`.
//! No log line carries personal data: referral content never reaches a log call.
//! Counters are plain atomics read by `status`.
//! Must not: be imported by the pure or adapter layers.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

static NON_DELIVERED: AtomicU64 = AtomicU64::new(0);

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Counts an envelope marked non-delivered.
pub fn count_non_delivered() {
    NON_DELIVERED.fetch_add(1, Ordering::Relaxed);
}

/// The counters, for `status`.
pub fn snapshot() -> Value {
    json!({ "non_delivered_marked": NON_DELIVERED.load(Ordering::Relaxed) })
}
