//! The sample referrals shipped in `config/samples/` (fake people), embedded so the demo needs
//! nothing beside the binary and the tests check the very bytes providers are shown.

/// The shipped samples, embedded so the demo needs nothing beside the binary.
pub const SAMPLES: &[(&str, &[u8])] = &[
    (
        "burglary-greater-manchester.json",
        include_bytes!("../../config/samples/burglary-greater-manchester.json"),
    ),
    (
        "domestic-abuse-london-by-postcode.json",
        include_bytes!("../../config/samples/domestic-abuse-london-by-postcode.json"),
    ),
    (
        "under-18-west-midlands.json",
        include_bytes!("../../config/samples/under-18-west-midlands.json"),
    ),
    (
        "hate-crime-merseyside.json",
        include_bytes!("../../config/samples/hate-crime-merseyside.json"),
    ),
    (
        "daily-2026-11-20.csv",
        include_bytes!("../../config/samples/daily-2026-11-20.csv"),
    ),
];
