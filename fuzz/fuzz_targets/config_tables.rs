//! Whatever text sits in the peer directory, postcode table or bank-holiday file, parsing never
//! panics. (`Settings::load` itself reads a path through the `config` crate and checks that key
//! files exist, so it is not a pure function over text and has no target; these three are the
//! text parsers it calls.)
//! Twin: `tests/it/corpus.rs::config_tables` replays fuzz/corpus/config_tables through the same calls.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = refex::crypto::directory::Directory::from_toml(text);
        let _ = refex::core::routing::RoutingTable::from_toml(text);
        let _ = refex::core::calendar::Calendar::from_toml(text);
    }
});
