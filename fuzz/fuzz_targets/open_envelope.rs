//! Whatever a peer sends, opening it never panics and never allocates past the limit: the checks
//! before decryption, and decryption itself (both envelope formats, through the check a receiver
//! makes of an envelope whose signer it does not know) with a fixed key of ours.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use refex::core::envelope::Reply;
use refex::crypto::{self, KemSecretKey, OpenPolicy};

static KEY: LazyLock<KemSecretKey> = LazyLock::new(|| KemSecretKey::generate().unwrap().0);

fuzz_target!(|data: &[u8]| {
    let me = "london".parse().unwrap();
    let peer = "west-midlands".parse().unwrap();
    let policy = OpenPolicy { max_bytes: 64 * 1024, max_age: chrono::Duration::days(30), max_skew: chrono::Duration::minutes(5) };
    let _ = crypto::verify(data, &me, &peer, |_| None, chrono::Utc::now(), &policy);
    let _ = crypto::intact_but_unknown_signer(data, &KEY);
    let _ = Reply::decode(data);
});
