//! Whatever a peer returns on a stream, decoding the reply, the signed receipt and the receipt
//! body never panics, and a decoded reply re-encodes within the reply limit.
//! Twin: `tests/it/corpus.rs::reply_receipt` replays fuzz/corpus/reply_receipt through the same calls.
#![no_main]

use libfuzzer_sys::fuzz_target;
use refex::core::envelope::{ReceiptBody, Reply, SignedReceipt, MAX_REPLY_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = Reply::decode(data) {
        assert!(reply.encode().len() <= MAX_REPLY_BYTES);
    }
    if let Ok(signed) = SignedReceipt::decode(data) {
        let _ = ReceiptBody::decode(&signed.body);
    }
    if let Ok(body) = ReceiptBody::decode(data) {
        assert_eq!(ReceiptBody::decode(&body.encode()).ok(), Some(body));
    }
});
