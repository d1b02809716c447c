//! Replays every committed fuzz corpus file (`fuzz/corpus/TARGET/*`) through the same library
//! calls the fuzz target makes, so a plain `cargo test` guards against regressions without
//! cargo-fuzz. Each function here is the twin of `fuzz/fuzz_targets/<same name>.rs`: keep the
//! bodies identical (only `data` comes from a file instead of libFuzzer). A panic or failed
//! assertion names the corpus file that caused it.
//! Must not: skip a target silently — an empty or missing corpus directory fails the test.

use std::path::PathBuf;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus files", dir.display());
    for f in &files {
        let data = std::fs::read(f).unwrap();
        let r = std::panic::catch_unwind(|| body(&data));
        assert!(
            r.is_ok(),
            "corpus file {} fails target {target}",
            f.display()
        );
    }
}

/// Twin of fuzz/fuzz_targets/open_envelope.rs.
fn open_envelope(data: &[u8]) {
    use refex::core::envelope::Reply;
    use refex::crypto::{self, OpenPolicy};
    let me = "london".parse().unwrap();
    let peer = "west-midlands".parse().unwrap();
    let policy = OpenPolicy {
        max_bytes: 64 * 1024,
        max_age: chrono::Duration::days(30),
        max_skew: chrono::Duration::minutes(5),
    };
    let _ = crypto::verify(data, &me, &peer, |_| None, chrono::Utc::now(), &policy);
    static KEY: std::sync::LazyLock<crypto::KemSecretKey> =
        std::sync::LazyLock::new(|| crypto::KemSecretKey::generate().unwrap().0);
    let _ = crypto::intact_but_unknown_signer(data, &KEY);
    let _ = Reply::decode(data);
}

/// Twin of fuzz/fuzz_targets/referral_json.rs.
fn referral_json(data: &[u8]) {
    if let Ok(r) = refex::core::referral::parse_json(data) {
        let _ = refex::core::referral::validate(&r);
        let _ = refex::core::referral::Referral::from_cbor(&r.to_cbor());
    }
}

/// Twin of fuzz/fuzz_targets/referral_csv.rs.
fn referral_csv(data: &[u8]) {
    use refex::core::referral::csv::{parse_csv, CsvLimits};
    let limits = CsvLimits {
        max_rows: 100,
        max_field_bytes: 1024,
    };
    if let Ok(batch) = parse_csv(data, &limits) {
        assert!(batch.rows.len() <= 100);
    }
}

/// Twin of fuzz/fuzz_targets/reply_receipt.rs.
fn reply_receipt(data: &[u8]) {
    use refex::core::envelope::{ReceiptBody, Reply, SignedReceipt, MAX_REPLY_BYTES};
    if let Ok(reply) = Reply::decode(data) {
        assert!(reply.encode().len() <= MAX_REPLY_BYTES);
    }
    if let Ok(signed) = SignedReceipt::decode(data) {
        let _ = ReceiptBody::decode(&signed.body);
    }
    if let Ok(body) = ReceiptBody::decode(data) {
        assert_eq!(ReceiptBody::decode(&body.encode()).ok(), Some(body));
    }
}

/// Twin of fuzz/fuzz_targets/audit_line.rs.
fn audit_line(data: &[u8]) {
    use refex::core::audit::{line_hash, Record};
    if let Ok(rec) = serde_json::from_slice::<Record>(data) {
        let line = rec.line();
        assert_eq!(
            serde_json::from_str::<Record>(&line).ok().as_ref(),
            Some(&rec)
        );
        let _ = line_hash(line.as_bytes());
        let _ = refex::crypto::checkpoint::is_valid(&rec, &[]);
    }
}

/// Twin of fuzz/fuzz_targets/config_tables.rs.
fn config_tables(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = refex::crypto::directory::Directory::from_toml(text);
        let _ = refex::core::routing::RoutingTable::from_toml(text);
        let _ = refex::core::calendar::Calendar::from_toml(text);
    }
}

#[test]
fn corpus_open_envelope() {
    replay("open_envelope", open_envelope);
}

#[test]
fn corpus_referral_json() {
    replay("referral_json", referral_json);
}

#[test]
fn corpus_referral_csv() {
    replay("referral_csv", referral_csv);
}

#[test]
fn corpus_reply_receipt() {
    replay("reply_receipt", reply_receipt);
}

#[test]
fn corpus_audit_line() {
    replay("audit_line", audit_line);
}

#[test]
fn corpus_config_tables() {
    replay("config_tables", config_tables);
}
