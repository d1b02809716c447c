//! Test harness: a development federation in a temp dir, with each area's daemon run as a real
//! `refex run` process on its own loopback ports, through the same process harness the demo
//! uses (`refex::edge::harness`). Processes are killed and directories removed on drop.

#![allow(dead_code)]

use std::fs;
use std::net::UdpSocket;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use refex::core::types::AreaId;
use refex::edge::harness::{Daemon, HarnessError};
use refex::node::settings::Settings;

/// The daemon the nodes run: `REFEX_DAEMON_BIN` when set (the benches point it at the daemon as
/// shipped, see `tests/bench/common.rs`), else the one Cargo built beside these tests.
pub fn daemon_bin() -> PathBuf {
    std::env::var_os("REFEX_DAEMON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_refex").into())
}

/// Short windows for the crash and power-cut tests: quick pickup, quick retries.
pub const FAST_CRASH_CONFIG: &str = r#"
[intake]
settle_ms = 100
rescan_ms = 500
[delivery]
retry_initial_ms = 50
retry_max_ms = 500
[limits]
handshake_timeout_ms = 1000
request_timeout_ms = 3000
"#;

/// Each federation takes a block of ports of its own, so tests can run in parallel.
static NEXT_PORT: AtomicU16 = AtomicU16::new(0);
const BLOCK: u16 = 8;

pub fn port_block(n: usize) -> u16 {
    if NEXT_PORT.load(Ordering::SeqCst) == 0 {
        // Spread concurrent test runs (e.g. CI and a developer) apart by process id, below
        // Linux's ephemeral range (32768-60999): a port checked free here is bound again at
        // every restart of its daemon, and in that range any socket bound to port 0 meanwhile
        // (an attacker's or a client's in another test) can take it ("Address already in use").
        let start = 20_000 + (std::process::id() % 120) as u16 * 100;
        let _ = NEXT_PORT.compare_exchange(0, start, Ordering::SeqCst, Ordering::SeqCst);
    }
    loop {
        let base = NEXT_PORT.fetch_add(BLOCK, Ordering::SeqCst);
        assert!(n as u16 <= BLOCK);
        let free = (0..n as u16).all(|i| UdpSocket::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
}

/// Waits until `ok` holds, polling; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

pub struct Federation {
    /// Declared before `dir`: nodes are stopped (and their logs shown) before it is removed.
    pub nodes: Vec<Node>,
    pub dir: tempfile::TempDir,
}

/// One area's daemon in a test: the library's process harness, with helpers that panic
/// (a test that cannot drive its daemon has failed) and that print the daemon's log on failure.
pub struct Node(Daemon);

impl Deref for Node {
    type Target = Daemon;
    fn deref(&self) -> &Daemon {
        &self.0
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Daemon {
        &mut self.0
    }
}

impl Federation {
    /// Creates the federation (no daemon started yet).
    pub fn new(areas: &[&str]) -> Self {
        Self::with_config(areas, "")
    }

    /// Creates the federation, appending `extra` TOML to every node's config.
    pub fn with_config(areas: &[&str], extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<AreaId> = areas.iter().map(|a| a.parse().expect("area id")).collect();
        let base = port_block(areas.len());
        let configs =
            refex::edge::federation::init(dir.path(), &ids, base).expect("federation init");
        let nodes = ids
            .into_iter()
            .zip(configs)
            .map(|(area, config)| {
                if !extra.is_empty() {
                    let mut text = fs::read_to_string(&config).expect("config");
                    text = merge_toml(&text, extra);
                    fs::write(&config, text).expect("config");
                }
                let settings = Settings::load(&config).expect("generated config loads");
                let log = dir.path().join(format!("{area}.log"));
                assert_eq!(settings.area, area);
                Node(Daemon::new(daemon_bin(), config, settings, log))
            })
            .collect();
        Self { nodes, dir }
    }

    pub fn node(&self, area: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.area.as_str() == area)
            .expect("area in federation")
    }

    pub fn node_mut(&mut self, area: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.area.as_str() == area)
            .expect("area in federation")
    }

    pub fn start_all(&mut self) {
        for n in &mut self.nodes {
            n.start();
        }
    }
}

/// Appends `extra` to `base`, replacing keys of sections that already exist.
fn merge_toml(base: &str, extra: &str) -> String {
    let mut doc: toml::Table = base.parse().expect("base toml");
    let add: toml::Table = extra.parse().expect("extra toml");
    for (k, v) in add {
        match (doc.get_mut(&k), v) {
            (Some(toml::Value::Table(t)), toml::Value::Table(add)) => t.extend(add),
            (_, v) => {
                doc.insert(k, v);
            }
        }
    }
    toml::to_string(&doc).expect("toml")
}

impl Node {
    /// Starts the daemon and waits until it serves. A node given a crash point
    /// (REFEX_CRASH_AT) may reach it during start-up, before its control socket is bound (a
    /// queued envelope is sent at once, say): that exit is the crash the test asked for, and
    /// the test goes on to find its "aborting at" line; any other exit at start panics.
    pub fn start(&mut self) {
        let before = self.log_text().len();
        if let Err(e) = self.0.start() {
            let text = self.log_text();
            let crashed_on_purpose = matches!(e, HarnessError::ExitedAtStart { .. })
                && self.extra_env.iter().any(|(k, _)| k == "REFEX_CRASH_AT")
                && text
                    .get(before..)
                    .is_some_and(|new| new.contains("REFEX_CRASH_AT: aborting at"));
            if !crashed_on_purpose {
                panic!("{e}; log:\n{text}");
            }
        }
    }

    /// Starts a daemon that is expected to exit at start (it never serves); see
    /// `faults::wait_exit`.
    pub fn start_expecting_exit(&mut self) {
        if let Err(e) = self.0.spawn() {
            panic!("{e}; log:\n{}", self.log_text());
        }
    }

    pub fn pid(&self) -> u32 {
        self.0.pid().expect("running")
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.0.stop().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends SIGHUP (reload keys and certificates).
    pub fn hangup(&self) {
        self.0.hangup().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Sends `sig` to the daemon (STOP freezes it: every stream sent to it stays open; CONT).
    pub fn send(&self, sig: rustix::process::Signal) {
        self.0.send(sig).unwrap_or_else(|e| panic!("{e}"));
    }

    /// `status --json`: the exit code and the parsed answer (panics on output that is not JSON).
    pub fn status_json(&self) -> (i32, serde_json::Value) {
        let (code, out, err) = self.cli(&["status", "--json"]);
        let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        (code, v)
    }

    /// `status --json` for a wait that polls: `None` while the daemon does not answer with it
    /// (starting, stopped, or an exit other than 0 or 2, "degraded", which still carries it).
    pub fn try_status_json(&self) -> Option<serde_json::Value> {
        let (code, out, _) = self.cli(&["status", "--json"]);
        if code != 0 && code != 2 {
            return None;
        }
        serde_json::from_str(&out).ok()
    }

    /// Drops a file the careful way: temporary name, then rename.
    pub fn drop_file(&self, name: &str, bytes: &[u8]) {
        self.0
            .drop_file(name, bytes)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Parsed inbox documents.
    pub fn inbox_docs(&self) -> Vec<serde_json::Value> {
        self.inbox_files()
            .iter()
            .filter_map(|p| serde_json::from_slice(&fs::read(p).ok()?).ok())
            .collect()
    }

    /// `refex <args> --config <this node's config>`, returning (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(daemon_bin())
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .expect("run refex");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // A failing test shows what each daemon said (its last lines).
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- log of {} (last {} lines) ----", self.area, tail.len());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// A CSV batch of theft referrals with consent, one row per `(source_ref, residence_area)`,
/// referred at [`referred_at`] (the header and row the intake and bench batches share).
pub fn theft_csv<R: AsRef<str>, A: AsRef<str>>(source_system: &str, rows: &[(R, A)]) -> String {
    let at = referred_at();
    let mut csv = String::from("source_system,source_ref,referred_at,residence_area,victim_name,victim_phone,offence_category,consent_referral\n");
    for (r, area) in rows {
        let (r, area) = (r.as_ref(), area.as_ref());
        csv.push_str(&format!(
            "{source_system},{r},{at},{area},Test Person,07700 900999,theft,yes\n"
        ));
    }
    csv
}

/// When the fixtures' referrals were made: 15 days before now, so they are past their due time
/// at intake (the standard referral is late, which tests of deadlines count on) yet well inside
/// the year intake accepts. A fixed day here would make the suite fail a year after it was
/// written, when every fixture became too old for intake.
pub fn referred_at() -> String {
    referred_at_minus(0)
}

/// [`referred_at`] less `minutes` (a consent recorded before the referral). Fixed for the
/// process, so a fixture made twice is the same bytes (tests compare them).
pub fn referred_at_minus(minutes: i64) -> String {
    static MADE: std::sync::OnceLock<chrono::DateTime<chrono::Utc>> = std::sync::OnceLock::new();
    let made = *MADE.get_or_init(|| chrono::Utc::now() - chrono::Duration::days(15));
    (made - chrono::Duration::minutes(minutes)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A valid referral (fake person) for `area`, as REFERRAL.md's JSON.
pub fn referral(source_ref: &str, area: &str) -> String {
    referral_with(source_ref, area, "burglary", false)
}

/// A referral with a chosen category; `enhanced` sets a VCOP priority flag.
pub fn referral_with(source_ref: &str, area: &str, category: &str, enhanced: bool) -> String {
    serde_json::json!({
        "schema": "refex.referral.v1",
        "source_system": "test-records",
        "source_ref": source_ref,
        "referring_org": "Test Police",
        "referred_at": referred_at(),
        "residence": { "area": area },
        "victim": {
            "name": "Testy McTestface",
            "date_of_birth": "1980-01-01",
            "phone": "07700 900999",
            "email": "testy@example.org",
            "address": "1 Test Street, Testtown",
            "preferred_language": "en",
            "needs": ["emotional support"]
        },
        "offence": { "category": category, "crime_ref": "TEST-0001", "date": "2026-11-19" },
        "priority": {
            "most_serious_crime": enhanced,
            "persistently_targeted": false,
            "vulnerable_or_intimidated": false
        },
        "consent": {
            "referral": true,
            "explicit": { "given": true, "recorded_by": "PC 0000", "recorded_at": referred_at_minus(8) }
        },
        "incident": null,
        "notes": "Fake note for tests."
    })
    .to_string()
}

/// A small tmpfs, unmounted on drop. Needs root (CI runs as root).
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub fn new(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "mounting a tmpfs failed: the disk-full tests need root (CI runs as root)"
        );
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
    /// Fills the filesystem; returns the filler file.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4k"])
            .arg(format!("of={}", filler.display()))
            .output();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// Every line of a node's audit files, in chain order.
pub fn audit_lines(dir: &Path) -> Vec<String> {
    refex::adapters::audit::log_files(dir)
        .unwrap()
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every record of a node's audit files, parsed, in chain order.
pub fn audit_records(dir: &Path) -> Vec<serde_json::Value> {
    audit_lines(dir)
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Federation {
    /// Stops every node (each must exit 0) and checks that each audit log verifies.
    pub fn stop_all_and_verify(&mut self) {
        for n in &mut self.nodes {
            assert!(n.stop().success(), "{} did not exit 0", n.area);
            n.assert_audit_verifies();
        }
    }
}

impl Node {
    /// `refex audit verify` of this node must pass.
    pub fn assert_audit_verifies(&self) {
        let (code, out, err) = self.cli(&["audit", "verify"]);
        assert_eq!(code, 0, "{}: audit verify failed: {out}{err}", self.area);
    }
}

/// The `source_ref` of every inbox document, sorted (duplicates kept, so a caller can count them).
pub fn source_refs(docs: &[serde_json::Value]) -> Vec<String> {
    let mut v: Vec<String> = docs
        .iter()
        .map(|d| d["source_ref"].as_str().unwrap_or("?").to_owned())
        .collect();
    v.sort();
    v
}
