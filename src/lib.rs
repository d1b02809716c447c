//! refex — REFerral EXchange between Police and Crime Commissioner areas.
//!
//! Provider systems drop referral files into an outbox directory; refex validates and routes
//! them, seals each into a signed, end-to-end encrypted envelope, stores it durably, and
//! delivers it over QUIC with mutual TLS to the daemon of the victim's home area, which writes it
//! into its inbox directory exactly once and answers with a signed receipt. Every step lands in
//! a hash-chained, signed audit log. `shared/DESIGN.md` is the contract; `README.md` explains use.
//!
//! # Layout
//! Five folders, one layer each. Imports only go downward:
//! `core` ← `crypto` ← `adapters` ← `node` ← `edge` (a folder may import the ones to its left,
//! never one to its right). Each folder's `mod.rs` says what it must not import;
//! `tests/it/layers.rs` checks the rule on every `use crate::…` path of non-test code.
//!
//! - [`core`] — pure: no tokio, no filesystem, `now` passed in. Domain types, digests, the
//!   referral model, validation and CSV, routing, the working-day calendar, the envelope wire
//!   format, the retry schedule, the audit record format and chain hashing, and the intake
//!   *plan* (file bytes + context → accepted referrals, refused rows, the error document).
//! - [`crypto`] — key files and keys, seal/verify/decrypt, receipts, signed audit checkpoints,
//!   the peer directory, the development PKI.
//! - [`adapters`] — each the only user of its library or of the disk: `store` (sled),
//!   `transport` (quinn, rustls), `outbox_dir` (inotify, outbox files), `inbox_dir`, `audit`
//!   (audit files), `metrics_http` (hyper, `/proc/self`), `heap` (glibc's `malloc_trim`), and
//!   `durable`, their shared write-sync-rename helper and disk-full classifier.
//! - [`node`] — the running node and the only folder that spawns tasks: typed settings, the
//!   composition root (`build`), `run` (one task tracker, signals, watchdog, drain),
//!   housekeeping, the control socket, intake, receiver, sender, and `metrics` (the state
//!   `status` and `GET /metrics` both read).
//! - [`edge`] — the CLI, the demo, the development federation, logging setup; `main.rs` only
//!   calls [`edge::cli::main`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod adapters;
pub mod core;
pub mod crypto;
pub mod edge;
pub mod node;
