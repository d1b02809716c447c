//! The pure core: domain types, the referral model and its validation, routing, the
//! working-day calendar, the envelope wire format, the retry schedule, the audit record format
//! and the intake plan. Everything here takes bytes and time (`now` is an argument) and returns
//! values.
//! Must not: import `crypto`, `adapters`, `node` or `edge`; use tokio; touch the filesystem or
//! the network. (`failpoint` reads one environment variable, once, for the crash tests.)

pub mod audit;
pub mod calendar;
pub mod digest;
pub mod envelope;
pub mod failpoint;
pub mod plan;
pub mod referral;
pub mod retry;
pub mod routing;
pub mod samples;
pub mod text;
pub mod types;
