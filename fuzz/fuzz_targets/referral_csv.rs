//! Whatever a provider drops as CSV, parsing never panics and respects the row limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refex::core::referral::csv::{parse_csv, CsvLimits};

fuzz_target!(|data: &[u8]| {
    let limits = CsvLimits { max_rows: 100, max_field_bytes: 1024 };
    if let Ok(batch) = parse_csv(data, &limits) {
        assert!(batch.rows.len() <= 100);
    }
});
