//! Logging setup.
//!
//! Logs: `tracing` to stderr (journald adds timestamps under systemd), human or JSON, filtered
//! by `RUST_LOG` (default `info`). Field names are stable: `peer`, `envelope_id`, `file`, `row`.
//! No log line carries personal data: referral content never reaches a log call.
//! Must not: be imported by `node` or below (they only emit `tracing` events).

use tracing_subscriber::EnvFilter;

use crate::node::settings::LogFormat;

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
