//! Adapters: each is the only user of its library or of the disk. `store` (sled), `transport`
//! (quinn, rustls), `outbox_dir` (inotify and the outbox files), `inbox_dir` (inbox files),
//! `audit` (the audit log files and its writer thread), `heap` (glibc malloc's trim),
//! `metrics_http` (hyper, the `/metrics` listener, and `/proc/self`), and `durable`, the one
//! shared write-sync-rename helper with the one disk-full classifier.
//! Must not: import `node` or `edge`; start a task that outlives the call that started it (the
//! transport's connection and stream tasks run under a tracker `serve` waits for; the store's
//! committer and the audit writer are threads joined by `close`); or import each other —
//! except `durable`, which all of them share.

pub mod audit;
pub mod backup;
pub mod durable;
pub mod format;
pub mod heap;
pub mod inbox_dir;
pub mod metrics_http;
pub mod outbox_dir;
pub mod store;
pub mod transport;
