//! The running node: typed settings, the composition root that opens everything in order,
//! the one task tracker every task runs under (signals, watchdog, drain), the control socket,
//! and the three components that move referrals: intake, receiver and sender.
//! The only folder that spawns tasks.
//! Must not: import `edge` (except tests, which use the development federation as a fixture);
//! touch sled, quinn, inotify or the audit files except through `adapters`.

pub mod backup;
pub mod build;
pub mod check;
pub mod control;
pub mod heartbeat;
pub mod housekeeping;
pub mod intake;
pub mod metrics;
pub mod receiver;
pub mod run;
pub mod sender;
pub mod settings;
pub mod slots;

#[cfg(test)]
mod tests;
