//! Whatever a local user writes into an audit file, parsing a line as `audit::verify` does never
//! panics; a parsed record re-serialises to a line that parses back to the same record, and the
//! checkpoint check over it never panics.
//! Twin: `tests/it/corpus.rs::audit_line` replays fuzz/corpus/audit_line through the same calls.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refex::core::audit::{line_hash, Record};

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = serde_json::from_slice::<Record>(data) {
        let line = rec.line();
        assert_eq!(serde_json::from_str::<Record>(&line).ok().as_ref(), Some(&rec));
        let _ = line_hash(line.as_bytes());
        let _ = refex::crypto::checkpoint::is_valid(&rec, &[]);
    }
});
