//! refex — REFerral EXchange between Police and Crime Commissioner areas.
//!
//! Provider systems drop referral files into an outbox directory; refex validates and routes
//! them, seals each into a signed, end-to-end encrypted envelope, stores it durably, and
//! delivers it over QUIC with mutual TLS to the daemon of the victim's home area, which writes it
//! into its inbox directory exactly once and answers with a signed receipt. Every step lands in
//! a hash-chained, signed audit log. `shared/DESIGN.md` is the contract; `README.md` explains use.
//!
//! # Layout
//! Modules are layered; imports only go downward (a module never imports a higher layer, and
//! adapters never import each other).
//! 1. Pure domain, no I/O, time passed in: [`types`], [`digest`], [`failpoint`], [`referral`] (model,
//!    validation, CSV), [`routing`], [`calendar`], [`envelope`] (wire formats), [`retry`],
//!    `audit::chain`.
//! 2. Crypto and key material: [`crypto`] (keys, seal/open, receipts), [`directory`] (peer
//!    directory with public keys), [`pki`] (development certificates, rcgen).
//! 3. Adapters, each the only user of its library: [`store`] (sled), [`transport`] (quinn,
//!    rustls), [`outbox_dir`] (inotify, outbox files), [`inbox_dir`] (inbox files), `audit::log`
//!    (audit files); [`durable`] is their shared write-sync-rename helper.
//! 4. Components: [`intake`], [`receiver`], [`sender`].
//! 5. Composition: [`config`], [`daemon`] (the only module that spawns long-lived tasks),
//!    [`control`] (local Unix socket), [`federation`] (development federation).
//! 6. Edge: [`cli`], [`demo`], [`telemetry`]; `main.rs` only calls [`cli::main`].

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod audit;
pub mod calendar;
pub mod cli;
pub mod config;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod demo;
pub mod digest;
pub mod directory;
pub mod durable;
pub mod envelope;
pub mod failpoint;
pub mod federation;
pub mod inbox_dir;
pub mod intake;
pub mod outbox_dir;
pub mod pki;
pub mod receiver;
pub mod referral;
pub mod retry;
pub mod routing;
pub mod sender;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod types;
