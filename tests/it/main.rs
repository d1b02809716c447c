//! Integration tests: real `refex run` processes exchanging referrals over QUIC on 127.0.0.1.
//! One test binary so the library links once; `harness` carries the detail.

#![allow(clippy::unwrap_used)]

mod harness;

mod audit_trail;
mod corpus;
mod crashpoints;
mod day2;
mod demo;
mod durability;
mod exchange;
mod faults;
mod history;
mod hostile;
mod intake;
mod layers;
mod lazyfs;
mod metrics;
mod outage;
mod package;
mod powercut;
mod powercut_named;
mod reload;
mod secrets;
mod torture;
