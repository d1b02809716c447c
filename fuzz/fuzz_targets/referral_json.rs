//! Whatever a provider drops as JSON, parsing and validation never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = refex::core::referral::parse_json(data) {
        let _ = refex::core::referral::validate(&r);
        let _ = refex::core::referral::Referral::from_cbor(&r.to_cbor());
    }
});
