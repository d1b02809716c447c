//! Node configuration: `refex.toml` plus `REFEX__SECTION__KEY` environment overrides, parsed
//! once into typed [`Settings`].
//!
//! Owns: reading the config file (through the `config` crate), the peer directory, postcode table
//! and bank-holiday files it names, and turning them into typed values (`Duration`, `NonZeroU32`,
//! `SocketAddr`, parsed tables). Every problem is collected and reported together, each naming
//! its key; unknown keys are errors (a typo must not silently fall back to a default).
//! Relative paths are relative to the directory holding the config file.
//! Must not: open keys' private material (the daemon does, with permission checks), start
//! anything, or be re-validated later: code holding `Settings` trusts it.
//!
//! The keys, with their defaults, are listed in `config/refex.example.toml`.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::adapters::transport::Limits as TransportLimits;
use crate::core::calendar::Calendar;
use crate::core::routing::RoutingTable;
use crate::core::types::AreaId;
use crate::crypto::directory::Directory;
use crate::crypto::OpenPolicy;

/// Every problem found in a configuration, each naming its key.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where the node keeps its files.
#[derive(Clone, Debug)]
pub struct Paths {
    pub outbox: PathBuf,
    pub inbox: PathBuf,
    pub state: PathBuf,
    pub audit: PathBuf,
}

/// Key and certificate files (read by the daemon with permission checks).
#[derive(Clone, Debug)]
pub struct KeyFiles {
    pub signing_key: PathBuf,
    pub encryption_key: PathBuf,
    pub subject_secret: PathBuf,
    pub tls_ca: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub tls_crl: Option<PathBuf>,
}

/// Outbox intake settings.
#[derive(Clone, Debug)]
pub struct Intake {
    pub settle: Duration,
    pub rescan_interval: Duration,
    pub max_file_bytes: u64,
    pub max_csv_rows: usize,
    pub max_field_bytes: usize,
    /// Ready files intake works on at once (so the store's and the audit's group commits share
    /// syncs across files); 1 takes one file at a time.
    pub parallel_files: usize,
    /// Bytes of ready files in hand at once: no new file is taken while the files in flight hold
    /// this many (so at most this plus one file; while a larger file is in hand, no other is
    /// taken).
    pub parallel_bytes: u64,
    /// Referrals in the files in hand at once (a JSON file is one, a CSV file its rows): no new
    /// file is taken while those in flight hold this many. Memory in flight follows referrals
    /// (each is sealed, stored and recorded), not input bytes: a 200-byte CSV row becomes a
    /// ~2.5 KB sealed envelope plus its records. A larger batch is also carried out in slices
    /// of this many referrals (stored, recorded and released slice by slice).
    pub parallel_referrals: u64,
    /// Refused files in `rejected/` (personal data) are purged after this long.
    pub rejected_retention: chrono::Duration,
}

/// Sending side settings.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Envelopes in flight to one peer. Past `max_in_flight_total` only while that peer is the
    /// only one busy (`node::slots`).
    pub max_in_flight_per_peer: NonZeroU32,
    /// Envelopes in flight to all peers together: with 42 peers, 32 each let a burst hold
    /// ~1,300 sends and their receipts in memory at once.
    pub max_in_flight_total: NonZeroU32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// After this long undelivered, an envelope is marked non-delivered and alerted.
    pub non_delivery_after: chrono::Duration,
}

/// Bounds on what a peer can drive: the transport's own limits, and the window an envelope's
/// creation time must fall in (both in their final types, handed over as they are).
#[derive(Clone, Debug)]
pub struct Limits {
    pub transport: TransportLimits,
    pub open: OpenPolicy,
}

/// Audit log settings.
#[derive(Clone, Debug)]
pub struct Audit {
    pub lawful_basis: String,
    pub purpose: String,
    pub checkpoint_interval: Duration,
    /// A checkpoint also after this many records, so a deleted tail is caught soon.
    pub checkpoint_every_records: u64,
    pub retention_days: u32,
}

/// Retention of state.
#[derive(Clone, Debug)]
pub struct Retention {
    /// How long the receiver remembers accepted envelope ids (dedup window).
    pub seen_ids_days: u32,
    /// How long a delivered envelope's record (receipt, no payload) is kept by the sender.
    pub receipts_days: u32,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logging, metrics and health thresholds.
#[derive(Clone, Debug)]
pub struct Telemetry {
    pub log_format: LogFormat,
    /// Where `GET /metrics` is served (`telemetry.metrics_addr`); off when `None`. Loopback
    /// only unless `telemetry.metrics_allow_remote = true`.
    pub metrics_addr: Option<SocketAddr>,
    /// A peer unreachable for longer than this makes `status` degraded.
    pub peer_down_warn: Duration,
}

/// The whole, validated node configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub config_file: PathBuf,
    pub area: AreaId,
    pub listen: SocketAddr,
    pub paths: Paths,
    pub keys: KeyFiles,
    pub directory_file: PathBuf,
    pub directory: Directory,
    pub postcodes_file: PathBuf,
    pub routing: RoutingTable,
    pub bank_holidays_file: PathBuf,
    pub calendar: Calendar,
    pub intake: Intake,
    pub delivery: Delivery,
    pub limits: Limits,
    pub audit: Audit,
    pub retention: Retention,
    pub telemetry: Telemetry,
    pub control_socket: PathBuf,
}

impl Settings {
    /// Loads `path` with environment overrides (`REFEX__PATHS__INBOX=/x` sets `paths.inbox`).
    pub fn load(path: &Path) -> Result<Self, ConfigErrors> {
        let env = config::Environment::with_prefix("REFEX")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true);
        Self::load_with(path, env)
    }

    fn load_with(path: &Path, env: config::Environment) -> Result<Self, ConfigErrors> {
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env)
            .build()
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        let value: Value = built
            .try_deserialize()
            .map_err(|e| ConfigErrors(vec![format!("{}: {e}", path.display())]))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut r = Reader::new(value, base);
        let settings = Self::read(&mut r, path);
        let mut errors = r.finish();
        match settings {
            Some(s) if errors.is_empty() => Ok(s),
            _ => {
                if errors.is_empty() {
                    errors.push("configuration incomplete".into());
                }
                Err(ConfigErrors(errors))
            }
        }
    }

    fn read(r: &mut Reader, config_file: &Path) -> Option<Self> {
        let area = r.required("area", |s| AreaId::parse(s).map_err(|e| e.to_string()));
        let listen = r.required("network.listen", parse_addr);
        let paths = Paths {
            outbox: r.path("paths.outbox"),
            inbox: r.path("paths.inbox"),
            state: r.path("paths.state"),
            audit: r.path("paths.audit"),
        };
        let keys = KeyFiles {
            signing_key: r.path("keys.signing_key"),
            encryption_key: r.path("keys.encryption_key"),
            subject_secret: r.path("keys.subject_secret"),
            tls_ca: r.path("keys.tls_ca"),
            tls_cert: r.path("keys.tls_cert"),
            tls_key: r.path("keys.tls_key"),
            tls_crl: r.optional_path("keys.tls_crl"),
        };
        for (key, p) in [
            ("keys.signing_key", &keys.signing_key),
            ("keys.encryption_key", &keys.encryption_key),
            ("keys.subject_secret", &keys.subject_secret),
            ("keys.tls_ca", &keys.tls_ca),
            ("keys.tls_cert", &keys.tls_cert),
            ("keys.tls_key", &keys.tls_key),
        ] {
            if !p.as_os_str().is_empty() && !p.is_file() {
                r.error(key, format!("file {} does not exist", p.display()));
            }
        }
        let directory_file = r.path("files.directory");
        let directory = r.load_file("files.directory", &directory_file, |t| {
            Directory::from_toml(t).map_err(|e| e.join("; "))
        });
        let postcodes_file = r.path("files.postcodes");
        let routing = r.load_file("files.postcodes", &postcodes_file, |t| {
            RoutingTable::from_toml(t).map_err(|e| e.to_string())
        });
        let bank_holidays_file = r.path("files.bank_holidays");
        let calendar = r.load_file("files.bank_holidays", &bank_holidays_file, |t| {
            Calendar::from_toml(t).map_err(|e| e.to_string())
        });

        let intake = Intake {
            settle: r.millis("intake.settle_ms", 2_000),
            rescan_interval: r.millis("intake.rescan_ms", 30_000),
            max_file_bytes: r.number("intake.max_file_bytes", 16 << 20, 1, 1 << 30),
            max_csv_rows: r.number("intake.max_csv_rows", 50_000, 1, 1_000_000) as usize,
            max_field_bytes: r.number("intake.max_field_bytes", 8_192, 64, 1 << 20) as usize,
            parallel_files: r.number("intake.parallel_files", 256, 1, 256) as usize,
            parallel_bytes: r.number("intake.parallel_bytes", 8 << 20, 64 << 10, 1 << 30),
            parallel_referrals: r.number("intake.parallel_referrals", 128, 1, 1_000_000),
            rejected_retention: chrono::Duration::days(r.number(
                "intake.rejected_retention_days",
                30,
                0,
                3_650,
            ) as i64),
        };
        let delivery = Delivery {
            max_in_flight_per_peer: r.count("delivery.max_in_flight_per_peer", 128, 1024),
            max_in_flight_total: r.count("delivery.max_in_flight_total", 64, 65_536),
            retry_initial: r.millis("delivery.retry_initial_ms", 500),
            retry_max: r.millis("delivery.retry_max_ms", 60_000),
            non_delivery_after: chrono::Duration::seconds(r.number(
                "delivery.non_delivery_after_secs",
                48 * 3600,
                1,
                365 * 86400,
            ) as i64),
        };
        let max_frame_bytes = r.number("limits.max_frame_bytes", 1 << 20, 1024, 64 << 20) as u32;
        let limits = Limits {
            transport: TransportLimits {
                max_frame_bytes,
                max_streams_per_connection: r.number(
                    "limits.max_streams_per_connection",
                    64,
                    1,
                    10_000,
                ) as u32,
                max_connections_per_peer: r.number("limits.max_connections_per_peer", 4, 1, 1_000)
                    as u32,
                max_connections: r.number("limits.max_connections", 256, 1, 100_000) as u32,
                max_handshakes: r.number("limits.max_handshakes", 64, 1, 100_000) as u32,
                reserved_handshakes: r.number("limits.reserved_handshakes", 16, 0, 100_000) as u32,
                retry_above_handshakes: r.number("limits.retry_above_handshakes", 16, 0, 100_000)
                    as u32,
                max_inflight_bytes: r.number(
                    "limits.max_inflight_bytes_per_connection",
                    4 * u64::from(max_frame_bytes),
                    1024,
                    1 << 30,
                ) as u32,
                handshake_timeout: r.millis("limits.handshake_timeout_ms", 5_000),
                idle_timeout: r.millis("limits.idle_timeout_ms", 30_000),
                request_timeout: r.millis("limits.request_timeout_ms", 30_000),
                max_connection_lifetime: Duration::from_secs(r.number(
                    "limits.max_connection_lifetime_secs",
                    3_600,
                    10,
                    7 * 86_400,
                )),
                ..TransportLimits::default()
            },
            open: OpenPolicy {
                max_bytes: max_frame_bytes as usize,
                // Bounded above, so the conversions cannot overflow.
                max_skew: chrono::Duration::seconds(r.number(
                    "limits.clock_skew_secs",
                    300,
                    0,
                    86_400,
                ) as i64),
                max_age: chrono::Duration::seconds(r.number(
                    "limits.max_envelope_age_secs",
                    30 * 86_400,
                    60,
                    3650 * 86_400,
                ) as i64),
            },
        };
        let audit = Audit {
            lawful_basis: r.string("audit.lawful_basis", "UK GDPR Art. 6(1)(e) public task; DPA 2018 s.35 (law enforcement)"),
            purpose: r.string("audit.purpose", "referral of victims of crime to the victim service of their area of residence (Victims' Code)"),
            checkpoint_interval: Duration::from_secs(r.number("audit.checkpoint_interval_secs", 300, 1, 86_400)),
            checkpoint_every_records: r.number("audit.checkpoint_every_records", 1000, 1, 1_000_000),
            retention_days: r.number("audit.retention_days", 2_557, 1, 36_500) as u32,
        };
        let retention = Retention {
            seen_ids_days: r.number("retention.seen_ids_days", 400, 1, 36_500) as u32,
            receipts_days: r.number("retention.receipts_days", 400, 1, 36_500) as u32,
        };
        let allow_remote = match r.string("telemetry.metrics_allow_remote", "false").as_str() {
            "true" => true,
            "false" => false,
            other => {
                r.error(
                    "telemetry.metrics_allow_remote",
                    format!("'{other}' is not true or false"),
                );
                false
            }
        };
        let telemetry = Telemetry {
            log_format: match r.string("telemetry.log_format", "human").as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                other => {
                    r.error(
                        "telemetry.log_format",
                        format!("'{other}' is not one of human, json"),
                    );
                    LogFormat::Human
                }
            },
            metrics_addr: r.text("telemetry.metrics_addr").and_then(|a| {
                match parse_addr(&a) {
                    Ok(addr) if addr.ip().is_loopback() || allow_remote => Some(addr),
                    Ok(addr) => {
                        r.error("telemetry.metrics_addr", format!("{addr} is not a loopback address; set telemetry.metrics_allow_remote = true to serve metrics beyond this host"));
                        None
                    }
                    Err(e) => {
                        r.error("telemetry.metrics_addr", e);
                        None
                    }
                }
            }),
            peer_down_warn: Duration::from_secs(r.number("telemetry.peer_down_warn_secs", 900, 1, 30 * 86_400)),
        };
        let control_socket = r
            .optional_path("control.socket")
            .unwrap_or_else(|| paths.state.join("control.sock"));

        // Dedup memory shorter than the window in which an envelope is still accepted would let
        // a replay of a forgotten id through as new.
        let accepted_for = limits.open.max_age + limits.open.max_skew;
        if chrono::Duration::days(i64::from(retention.seen_ids_days)) <= accepted_for {
            r.error(
                "retention.seen_ids_days",
                format!(
                    "must be longer than limits.max_envelope_age_secs plus limits.clock_skew_secs \
                     ({} s): an envelope replayed after its id is forgotten would be accepted again",
                    accepted_for.num_seconds()
                ),
            );
        }
        if delivery.retry_initial > delivery.retry_max {
            r.error(
                "delivery.retry_initial_ms",
                "must not exceed delivery.retry_max_ms".into(),
            );
        }
        let (area, listen, directory, routing, calendar) =
            (area?, listen?, directory?, routing?, calendar?);
        if !directory.contains(&area) {
            r.error(
                "area",
                format!("'{area}' is not listed in the peer directory"),
            );
        }
        for target in routing.areas().collect::<BTreeSet<_>>() {
            if !directory.contains(target) {
                r.error(
                    "files.postcodes",
                    format!("routes to area '{target}', which is not in the peer directory"),
                );
            }
        }
        Some(Self {
            config_file: config_file.to_owned(),
            area,
            listen,
            paths,
            keys,
            directory_file,
            directory,
            postcodes_file,
            routing,
            bank_holidays_file,
            calendar,
            intake,
            delivery,
            limits,
            audit,
            retention,
            telemetry,
            control_socket,
        })
    }

    /// The effective settings as text, for `check-config` (secrets are files; their paths are
    /// shown, never their contents).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
        line("config_file", self.config_file.display().to_string());
        line("area", self.area.to_string());
        line("network.listen", self.listen.to_string());
        line("paths.outbox", self.paths.outbox.display().to_string());
        line("paths.inbox", self.paths.inbox.display().to_string());
        line("paths.state", self.paths.state.display().to_string());
        line("paths.audit", self.paths.audit.display().to_string());
        line(
            "keys.signing_key",
            format!("{} (secret, not shown)", self.keys.signing_key.display()),
        );
        line(
            "keys.encryption_key",
            format!("{} (secret, not shown)", self.keys.encryption_key.display()),
        );
        line(
            "keys.subject_secret",
            format!("{} (secret, not shown)", self.keys.subject_secret.display()),
        );
        line("keys.tls_ca", self.keys.tls_ca.display().to_string());
        line("keys.tls_cert", self.keys.tls_cert.display().to_string());
        line(
            "keys.tls_key",
            format!("{} (secret, not shown)", self.keys.tls_key.display()),
        );
        line("keys.tls_crl", format!("{:?}", self.keys.tls_crl));
        line(
            "files.directory",
            format!(
                "{} ({} areas)",
                self.directory_file.display(),
                self.directory.areas().count()
            ),
        );
        line(
            "files.postcodes",
            format!(
                "{} ({} prefixes)",
                self.postcodes_file.display(),
                self.routing.len()
            ),
        );
        line(
            "files.bank_holidays",
            self.bank_holidays_file.display().to_string(),
        );
        line("intake", format!("{:?}", self.intake));
        line("delivery", format!("{:?}", self.delivery));
        line("limits", format!("{:?}", self.limits));
        line("audit", format!("{:?}", self.audit));
        line("retention", format!("{:?}", self.retention));
        line("telemetry", format!("{:?}", self.telemetry));
        line("control.socket", self.control_socket.display().to_string());
        out
    }
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not an address like 127.0.0.1:7401"))
}

/// Walks the loaded configuration tree, recording every key it reads and every problem, so
/// that unread (unknown) keys can be reported at the end.
struct Reader {
    root: Value,
    base: PathBuf,
    seen: BTreeSet<String>,
    errors: Vec<String>,
}

impl Reader {
    fn new(root: Value, base: PathBuf) -> Self {
        Self {
            root,
            base,
            seen: BTreeSet::new(),
            errors: Vec::new(),
        }
    }

    fn error(&mut self, key: &str, msg: String) {
        self.errors.push(format!("{key}: {msg}"));
    }

    fn raw(&mut self, key: &str) -> Option<Value> {
        self.seen.insert(key.to_owned());
        let mut v = &self.root;
        for part in key.split('.') {
            v = v.get(part)?;
        }
        if v.is_null() {
            None
        } else {
            Some(v.clone())
        }
    }

    fn text(&mut self, key: &str) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.error(key, "expected a single value, found a table or list".into());
                None
            }
        }
    }

    fn required<T>(
        &mut self,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        match self.text(key) {
            None => {
                self.error(key, "is required".into());
                None
            }
            Some(s) => parse(&s).map_err(|e| self.error(key, e)).ok(),
        }
    }

    fn string(&mut self, key: &str, default: &str) -> String {
        self.text(key).unwrap_or_else(|| default.to_owned())
    }

    fn number(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(s) = self.text(key) else {
            return default;
        };
        match s.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.error(key, format!("{n} is outside {min}..={max}"));
                default
            }
            Err(_) => {
                self.error(key, format!("'{s}' is not a whole number"));
                default
            }
        }
    }

    /// A count of at least one.
    fn count(&mut self, key: &str, default: u32, max: u32) -> NonZeroU32 {
        let n = self.number(key, default.into(), 1, max.into());
        NonZeroU32::new(n as u32).unwrap_or(NonZeroU32::MIN)
    }

    fn millis(&mut self, key: &str, default: u64) -> Duration {
        Duration::from_millis(self.number(key, default, 1, 7 * 86_400_000))
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn path(&mut self, key: &str) -> PathBuf {
        match self.text(key) {
            Some(s) if !s.is_empty() => self.resolve(&s),
            _ => {
                self.error(key, "is required (a path)".into());
                PathBuf::new()
            }
        }
    }

    fn optional_path(&mut self, key: &str) -> Option<PathBuf> {
        self.text(key)
            .filter(|s| !s.is_empty())
            .map(|s| self.resolve(&s))
    }

    fn load_file<T>(
        &mut self,
        key: &str,
        path: &Path,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if path.as_os_str().is_empty() {
            return None;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => parse(&text)
                .map_err(|e| self.error(key, format!("{}: {e}", path.display())))
                .ok(),
            Err(e) => {
                self.error(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    /// Reports keys present in the file or environment that nothing read, then every problem.
    fn finish(mut self) -> Vec<String> {
        let mut unknown = Vec::new();
        collect_leaves(&self.root, String::new(), &mut unknown);
        for key in unknown {
            if !self.seen.contains(&key) {
                self.errors.push(format!("{key}: unknown key"));
            }
        }
        self.errors
    }
}

fn collect_leaves(v: &Value, prefix: String, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                collect_leaves(child, key, out);
            }
        }
        _ => out.push(prefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_minimal(dir: &Path, extra: &str) -> PathBuf {
        crate::edge::federation::init(
            dir,
            &["west-midlands".parse().unwrap(), "london".parse().unwrap()],
            17_400,
        )
        .unwrap();
        let path = dir.join("west-midlands/refex.toml");
        if !extra.is_empty() {
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str(extra);
            std::fs::write(&path, text).unwrap();
        }
        path
    }

    fn no_env() -> config::Environment {
        config::Environment::with_prefix("REFEX_TEST_NOTHING").separator("__")
    }

    #[test]
    fn a_generated_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_minimal(dir.path(), "");
        let s = Settings::load_with(&path, no_env()).unwrap();
        assert_eq!(s.area.as_str(), "west-midlands");
        assert_eq!(s.listen.port(), 17_400);
        assert!(s.paths.inbox.ends_with("west-midlands/inbox"));
    }

    #[test]
    fn a_dedup_memory_shorter_than_the_envelope_age_window_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_minimal(dir.path(), "\n[retention]\nseen_ids_days = 10\n");
        let err = Settings::load_with(&path, no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("retention.seen_ids_days"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_all_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_minimal(dir.path(), "\n[typo_section]\nx = 1\n");
        let text = std::fs::read_to_string(&path).unwrap();
        let text = text.replace(
            "[intake]",
            "[intake]\nsettle_msec = 5\nmax_csv_rows = \"many\"\nparallel_files = 0",
        );
        std::fs::write(&path, text).unwrap();
        let errs = Settings::load_with(&path, no_env()).unwrap_err().0;
        let all = errs.join("\n");
        assert!(all.contains("typo_section.x: unknown key"), "{all}");
        assert!(all.contains("intake.settle_msec: unknown key"), "{all}");
        assert!(
            all.contains("intake.max_csv_rows: 'many' is not a whole number"),
            "{all}"
        );
        assert!(
            all.contains("intake.parallel_files: 0 is outside 1..=256"),
            "{all}"
        );
    }

    #[test]
    fn environment_overrides_apply() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_minimal(dir.path(), "");
        let env = config::Environment::with_prefix("REFEX")
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .source(Some(
                [
                    (
                        "REFEX__NETWORK__LISTEN".to_owned(),
                        "127.0.0.1:19999".to_owned(),
                    ),
                    ("REFEX__INTAKE__SETTLE_MS".to_owned(), "750".to_owned()),
                ]
                .into_iter()
                .collect(),
            ));
        let s = Settings::load_with(&path, env).unwrap();
        assert_eq!(s.listen.port(), 19_999);
        assert_eq!(s.intake.settle, Duration::from_millis(750));
    }

    #[test]
    fn an_area_missing_from_the_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_minimal(dir.path(), "");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("area = \"west-midlands\"", "area = \"kent\"");
        std::fs::write(&path, text).unwrap();
        let errs = Settings::load_with(&path, no_env()).unwrap_err().0;
        assert!(
            errs.iter().any(|e| e.contains("'kent' is not listed")),
            "{errs:?}"
        );
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let dir = tempfile::tempdir().unwrap();
        write_minimal(dir.path(), "");
        // The example refers to files relative to itself; place it beside a generated federation.
        let example = include_str!("../../config/refex.example.toml");
        let path = dir.path().join("west-midlands/example.toml");
        std::fs::write(&path, example).unwrap();
        let s = Settings::load_with(&path, no_env()).unwrap();
        assert_eq!(s.area.as_str(), "west-midlands");
    }
}
