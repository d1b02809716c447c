//! Whatever a peer sends, opening it never panics and never allocates past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refex::crypto::{self, OpenPolicy};
use refex::core::envelope::Reply;

fuzz_target!(|data: &[u8]| {
    let me = "london".parse().unwrap();
    let peer = "west-midlands".parse().unwrap();
    let policy = OpenPolicy { max_bytes: 64 * 1024, max_age: chrono::Duration::days(30), max_skew: chrono::Duration::minutes(5) };
    let _ = crypto::verify(data, &me, &peer, |_| None, chrono::Utc::now(), &policy);
    let _ = Reply::decode(data);
});
