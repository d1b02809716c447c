//! Shared by the benches: a store filled with `n` sealed, queued envelopes for london (one in
//! seven enhanced), written directly before the daemon starts (the restart figures), and a
//! process's memory figures from `/proc`; the daemon the benches measure; and the public-key
//! work of one delivery, timed.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use chrono::Utc;
use refex::adapters::store::{NewEnvelope, Store};
use refex::core::envelope::{Header, ReceiptBody, ReceiptStatus, CONTENT_TYPE_REFERRAL_V1};
use refex::core::referral::parse_json;
use refex::core::types::{AreaId, EnvelopeId, PriorityClass};
use refex::crypto::{
    self, KemSecretKey, OpenPolicy, OpenedEnvelope, SigningKey, VerifiedEnvelope, VerifyingKey,
};

use crate::harness::{referral, Node};

/// Builds the daemon as it ships (the release profile: fat LTO, one codegen unit) into
/// `target/ship` and has the nodes run it. `cargo bench` hands the benches a daemon built with
/// the `bench` profile, which keeps LTO off so the test suite builds quickly; that build spends
/// 8-10 % more CPU per referral, and the figures are meant to be of what ships.
/// `REFEX_DAEMON_BIN=path` measures another build instead (an A/B of two binaries).
pub fn use_shipped_daemon() {
    if let Some(bin) = std::env::var_os("REFEX_DAEMON_BIN") {
        println!("daemon: {} (REFEX_DAEMON_BIN)", Path::new(&bin).display());
        return;
    }
    let beside = Path::new(env!("CARGO_BIN_EXE_refex"));
    let target = beside
        .parent()
        .and_then(Path::parent)
        .expect("the test daemon lies in <target>/<profile>/");
    let ship = target.join("ship");
    eprintln!(
        "building the daemon as shipped (cargo build --release) into {}; minutes the first time",
        ship.display()
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--bin",
            "refex",
            "--target-dir",
        ])
        .arg(&ship)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the shipped daemon failed");
    let bin = ship.join("release").join("refex");
    println!("daemon: {} (release profile, as shipped)", bin.display());
    std::env::set_var("REFEX_DAEMON_BIN", &bin);
}

/// A standard-priority header for a payload of `len` bytes.
pub fn header(from: &AreaId, to: &AreaId, len: usize) -> Header {
    Header {
        v: 1,
        id: EnvelopeId::generate(),
        from: from.clone(),
        to: to.clone(),
        created: Utc::now(),
        priority: PriorityClass::Standard,
        due_by: Utc::now(),
        content_type: CONTENT_TYPE_REFERRAL_V1.into(),
        payload_len: len as u64,
    }
}

/// One delivery's public-key work between west-midlands and london, for timing: keys, a
/// referral payload and the receiver's open policy, made once.
pub struct DeliveryCrypto {
    signer: SigningKey,
    kem: KemSecretKey,
    /// Version-2 envelopes (one HPKE context shared by the envelopes to london), as the
    /// benches' federations seal; `None` seals version 1 (an HPKE key per envelope).
    shared: Option<crypto::SealContexts>,
    from: AreaId,
    to: AreaId,
    /// The referral, as CBOR.
    pub payload: Vec<u8>,
    policy: OpenPolicy,
    keys: Vec<VerifyingKey>,
}

impl DeliveryCrypto {
    /// Envelope format `version` (1, or 2: a shared HPKE context).
    pub fn new(version: u8) -> Self {
        let (signer, _) = SigningKey::generate().unwrap();
        let (kem, _) = KemSecretKey::generate().unwrap();
        let keys = vec![signer.public_key()];
        Self {
            signer,
            kem,
            shared: (version == 2).then(crypto::SealContexts::new),
            from: "west-midlands".parse().unwrap(),
            to: "london".parse().unwrap(),
            payload: parse_json(referral("BENCH-1", "london").as_bytes())
                .unwrap()
                .to_cbor(),
            policy: OpenPolicy {
                max_bytes: 1 << 20,
                max_age: chrono::Duration::days(1),
                max_skew: chrono::Duration::minutes(5),
            },
            keys,
        }
    }

    /// Seals the referral for london (HPKE, then the signature): the envelope's bytes.
    fn seal(&self) -> Vec<u8> {
        crypto::seal(
            header(&self.from, &self.to, self.payload.len()),
            &self.payload,
            &self.signer,
            &self.kem.public_key(),
            self.shared.as_ref(),
        )
        .unwrap()
        .to_bytes()
    }

    /// london's checks of an envelope's bytes (decode, signature), before opening it.
    fn verify(&self, sealed: &[u8]) -> VerifiedEnvelope {
        let keys = &self.keys;
        crypto::verify(
            sealed,
            &self.to,
            &self.from,
            |_| Some(keys.clone()),
            Utc::now(),
            &self.policy,
        )
        .unwrap()
    }

    /// london's signed receipt for `opened`, as bytes.
    fn sign_receipt(&self, opened: &OpenedEnvelope) -> Vec<u8> {
        let body = ReceiptBody {
            v: 1,
            envelope_id: opened.header.id,
            envelope_sha256: opened.digest,
            receiver: self.to.clone(),
            received_at: Utc::now(),
            status: ReceiptStatus::Delivered,
            audit_head: "0".repeat(64),
        };
        crypto::sign_receipt(&body, &self.signer).to_bytes()
    }

    /// west-midlands' check of london's receipt for `opened`.
    fn check_receipt(&self, receipt: &[u8], opened: &OpenedEnvelope) {
        crypto::verify_receipt(
            receipt,
            &self.keys,
            &opened.header.id,
            &opened.digest,
            &self.to,
        )
        .unwrap();
    }

    /// The envelope's part: seal (HPKE and the signature), then verify and open it.
    pub fn envelope(&self) -> OpenedEnvelope {
        self.verify(&self.seal()).decrypt(&self.kem).unwrap()
    }

    /// The receipt's part: signed by the receiver, verified by the sender.
    pub fn receipt(&self, opened: &OpenedEnvelope) {
        self.check_receipt(&self.sign_receipt(opened), opened);
    }

    /// µs of one core per step of a delivery's public-key work, each timed over `n` in a row:
    /// seal (HPKE to the receiver's key, then the Ed25519 signature), verify (decode and
    /// signature), open (HPKE), and the receipt's signature and its check.
    pub fn steps_us(&self, n: u32) -> [(&'static str, f64); 5] {
        let per = |start: Instant| start.elapsed().as_secs_f64() * 1e6 / f64::from(n);
        let start = Instant::now();
        let sealed: Vec<Vec<u8>> = (0..n).map(|_| self.seal()).collect();
        let seal = per(start);
        let start = Instant::now();
        let verified: Vec<VerifiedEnvelope> = sealed.iter().map(|b| self.verify(b)).collect();
        let verify = per(start);
        let start = Instant::now();
        let opened: Vec<OpenedEnvelope> = verified
            .into_iter()
            .map(|v| v.decrypt(&self.kem).unwrap())
            .collect();
        let open = per(start);
        let start = Instant::now();
        let receipts: Vec<Vec<u8>> = opened.iter().map(|o| self.sign_receipt(o)).collect();
        let sign = per(start);
        let start = Instant::now();
        for (r, o) in receipts.iter().zip(&opened) {
            self.check_receipt(r, o);
        }
        let check = per(start);
        [
            ("seal (HPKE + signature)", seal),
            ("verify", verify),
            ("open (HPKE)", open),
            ("receipt signature", sign),
            ("receipt check", check),
        ]
    }
}

/// µs of one core for all of one delivery's public-key work, both ends, averaged over `n`:
/// seal (HPKE and the signature), verify, open, and the signed receipt (signed by the
/// receiver, verified by the sender). A delivery cannot cost less, so this bounds what two
/// daemons sharing this machine's cores can deliver. Timed in the bench's own build (the
/// `bench` profile, no LTO): a program built as shipped measured per-operation costs adding up
/// to 0.53–0.70 ms, the range this measured the same day (ring's are assembly, dalek's
/// hand-tuned Rust).
pub fn delivery_crypto_us(n: u32, version: u8) -> f64 {
    let c = DeliveryCrypto::new(version);
    let start = Instant::now();
    for _ in 0..n {
        let opened = c.envelope();
        c.receipt(&opened);
    }
    start.elapsed().as_secs_f64() * 1e6 / f64::from(n)
}

/// [`DeliveryCrypto::steps_us`] as one line: "seal (HPKE + signature) 80, verify 45, …".
pub fn crypto_steps_line(n: u32, version: u8) -> String {
    DeliveryCrypto::new(version)
        .steps_us(n)
        .iter()
        .map(|(what, us)| format!("{what} {us:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `n` queued envelopes for london into `wm`'s (stopped) store.
pub async fn fill(wm: &Node, n: u32) {
    let store = Store::open(&wm.settings.paths.state.join("db")).unwrap();
    let to: AreaId = "london".parse().unwrap();
    let (signer, _) = SigningKey::generate().unwrap();
    let kem = wm.settings.directory.get(&to).unwrap().encryption_key;
    let payload = parse_json(referral("BENCH", "london").as_bytes())
        .unwrap()
        .to_cbor();
    let contexts = crypto::SealContexts::new();
    for i in 0..n {
        let sealed = crypto::seal(
            header(&wm.area, &to, payload.len()),
            &payload,
            &signer,
            &kem,
            Some(&contexts),
        )
        .unwrap();
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        let e = NewEnvelope {
            id: sealed.id(),
            to: to.clone(),
            priority: if i % 7 == 0 {
                PriorityClass::Enhanced
            } else {
                PriorityClass::Standard
            },
            due_by: Utc::now(),
            created: Utc::now(),
            digest: [0; 32],
            sealed: sealed.to_bytes(),
            subject_key: None,
        };
        let id = store.enqueue(e, &key).unwrap().id();
        store.release(&[id]).unwrap();
    }
    store.close().await.unwrap();
    let queued = store.next_queued(&to, 10, &HashSet::new()).unwrap().len();
    assert_eq!(queued, 10, "the queue was filled");
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`); 0 when unreadable.
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time a process has used so far (user + system, all its threads, also those that have
/// ended), in milliseconds; 0 when unreadable ([`refex::edge::harness::cpu_secs`]).
pub fn cpu_ms(pid: u32) -> u64 {
    (refex::edge::harness::cpu_secs(pid) * 1000.0).round() as u64
}

/// The whole machine's CPU time so far from `/proc/stat`: (busy, idle + iowait), in clock ticks.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let at = |i: usize| ticks.get(i).copied().unwrap_or(0);
    let idle = at(3) + at(4);
    let busy = (0..8).filter(|&i| i != 3 && i != 4).map(at).sum();
    (busy, idle)
}

/// The share of the machine's CPU left idle between two [`machine_ticks`] readings, in %:
/// near 0 says a run was bound by CPU, not by waiting.
pub fn idle_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let busy = after.0.saturating_sub(before.0) as f64;
    let idle = after.1.saturating_sub(before.1) as f64;
    if busy + idle == 0.0 {
        0.0
    } else {
        100.0 * idle / (busy + idle)
    }
}
